#!/usr/bin/env bash
# Prints the path of a nats-server at least MIN_VERSION, or nothing.
# Order: $NOVACRON_NATS_SERVER, nats-server on PATH, then LOCAL (the project's pinned copy).
# usage: find-nats-server.sh MIN_VERSION LOCAL_PATH
set -u
min="$1"; local_bin="$2"
new_enough() {
  local v
  v=$("$1" --version 2>/dev/null | sed -n 's/.*v\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n1)
  [ -n "$v" ] || return 1
  [ "$(printf '%s\n%s\n' "$min" "$v" | sort -V | head -n1)" = "$min" ]
}
for c in "${NOVACRON_NATS_SERVER:-}" "$(command -v nats-server 2>/dev/null)" "$local_bin"; do
  if [ -n "$c" ] && [ -x "$c" ] && new_enough "$c"; then echo "$c"; exit 0; fi
done
exit 0
