//! Snapshots of the folded state, kept locally in sled.
//!
//! ```text
//! sled tree "snapshots":  key = seq (u64, big-endian)  →  value = MessagePack Snapshot
//! Snapshot { stream_created_ns, seq, hash, state: canonical ClusterState bytes }
//! ```
//! A snapshot belongs to one incarnation of the EVENTS stream, identified by its creation time:
//! if the stream was recreated (a new data directory, a wiped server), old snapshots are
//! ignored. The state's hash is stored and checked on load, so a corrupt snapshot is refused
//! instead of silently diverging; the caller then replays from the start.

use std::path::Path;

use novacron_state::ClusterState;
use serde::{Deserialize, Serialize};

/// One saved state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshot {
    /// Creation time of the EVENTS stream it was folded from, ns since the epoch.
    pub stream_created_ns: i128,
    /// The sequence the state was folded to.
    pub seq: u64,
    /// The state hash at `seq`.
    pub hash: String,
    /// The canonical encoding of the state.
    #[serde(with = "serde_bytes_compat")]
    pub state: Vec<u8>,
}

/// Snapshot store errors.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// sled failed.
    #[error("snapshot store at {path}")]
    Sled {
        /// Where.
        path: String,
        /// Why.
        #[source]
        source: sled::Error,
    },
    /// A stored snapshot does not decode or its hash does not match.
    #[error("snapshot at sequence {seq} is corrupt: {reason}")]
    Corrupt {
        /// Which.
        seq: u64,
        /// What is wrong.
        reason: String,
    },
}

/// Snapshots on local disk.
pub struct SnapshotStore {
    tree: sled::Tree,
    path: String,
    keep: usize,
}

/// The snapshot store's sled page cache.
const SNAPSHOT_CACHE_BYTES: u64 = 16 << 20;

impl SnapshotStore {
    /// Opens (or creates) the store in `dir`.
    ///
    /// # Errors
    /// When sled cannot open the directory (locked by another process, unreadable).
    pub fn open(dir: &Path) -> Result<SnapshotStore, SnapshotError> {
        let path = dir.display().to_string();
        let err = |source| SnapshotError::Sled { path: path.clone(), source };
        // Snapshots are written now and then and read once at start: sled's default page cache
        // (1 GiB) would keep them resident for nothing.
        let db = sled::Config::new().path(dir).cache_capacity(SNAPSHOT_CACHE_BYTES).open().map_err(err)?;
        let tree = db.open_tree("snapshots").map_err(err)?;
        Ok(SnapshotStore { tree, path, keep: 3 })
    }

    /// Saves the state, keeping the newest three snapshots.
    ///
    /// # Errors
    /// When sled fails to write or flush.
    pub fn save(&self, stream_created_ns: i128, state: &ClusterState) -> Result<(), SnapshotError> {
        let err = |source| SnapshotError::Sled { path: self.path.clone(), source };
        let snap =
            Snapshot { stream_created_ns, seq: state.seq, hash: state.hash().0, state: state.to_canonical_bytes() };
        self.tree.insert(state.seq.to_be_bytes(), novacron_types::encode(&snap)).map_err(err)?;
        while self.tree.len() > self.keep {
            if self.tree.pop_min().map_err(err)?.is_none() {
                break;
            }
        }
        self.tree.flush().map_err(err)?;
        Ok(())
    }

    /// The newest snapshot of this stream incarnation at or below `max_seq`, verified.
    ///
    /// # Errors
    /// When sled fails or the snapshot is corrupt.
    pub fn latest(&self, stream_created_ns: i128, max_seq: u64) -> Result<Option<ClusterState>, SnapshotError> {
        let err = |source| SnapshotError::Sled { path: self.path.clone(), source };
        for item in self.tree.iter().rev() {
            let (_, value) = item.map_err(err)?;
            let snap: Snapshot =
                rmp_serde::from_slice(&value).map_err(|e| SnapshotError::Corrupt { seq: 0, reason: e.to_string() })?;
            if snap.stream_created_ns != stream_created_ns || snap.seq > max_seq {
                continue;
            }
            let state = ClusterState::from_canonical_bytes(&snap.state)
                .map_err(|e| SnapshotError::Corrupt { seq: snap.seq, reason: e.to_string() })?;
            if state.hash().0 != snap.hash || state.seq != snap.seq {
                return Err(SnapshotError::Corrupt { seq: snap.seq, reason: "state hash mismatch".into() });
            }
            return Ok(Some(state));
        }
        Ok(None)
    }
}

/// Stores `Vec<u8>` as a MessagePack bin (not an array of integers).
mod serde_bytes_compat {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = a.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_bytes(V)
    }
}
