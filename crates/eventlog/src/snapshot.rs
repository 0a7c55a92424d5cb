//! Snapshots of the folded state: one file per snapshot, streamed in and out.
//!
//! ```text
//! <dir>/state-<seq, 20 digits>.snap:
//!     the state's canonical encoding (MessagePack)
//!     trailer: MessagePack SnapshotTrailer { stream_created_ns, seq, hash, bytes }
//!     trailer length (u32, big-endian)
//!     b"NCSNAP01"
//! ```
//! A snapshot is encoded straight into a buffered file (and hashed on the way): saving never
//! holds the encoding in memory — with 100,000 VMs it is some 140 MB. It is written to a
//! `.tmp` file, synced, then renamed, so a file with the final name is always complete; a crash
//! mid-save leaves only a `.tmp`, which the next open removes. The newest three are kept.
//!
//! Not in sled, where the first version kept them: sled held every inserted value in memory
//! (four to five copies of the encoding at the peak of a save, measured with heaptrack), and
//! after an I/O error (a full disk, a removed directory) dropping a sled tree waited forever for
//! a flush, which hung the orchestrator's shutdown. Here a failed save is an error, logged, and
//! the next one tries again. Snapshots left by that version (a sled database in the same
//! directory) are removed at open; the state is then replayed from the log once.
//!
//! A snapshot belongs to one incarnation of the EVENTS stream, identified by its creation time:
//! if the stream was recreated (a new data directory, a wiped server), old snapshots are
//! ignored. The state's hash is stored and checked on load, so a corrupt snapshot is refused
//! instead of silently diverging; the caller then replays from the start.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use novacron_state::ClusterState;
use serde::{Deserialize, Serialize};

/// What the end of a snapshot file says about the state before it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotTrailer {
    /// Creation time of the EVENTS stream it was folded from, ns since the epoch.
    pub stream_created_ns: i128,
    /// The sequence the state was folded to.
    pub seq: u64,
    /// The state hash at `seq`.
    pub hash: String,
    /// The encoding's length in bytes.
    pub bytes: u64,
}

/// Snapshot store errors.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The file system failed.
    #[error("snapshot store: {what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
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
    dir: PathBuf,
    keep: usize,
}

const MAGIC: &[u8; 8] = b"NCSNAP01";
const SUFFIX: &str = ".snap";
const TMP_SUFFIX: &str = ".snap.tmp";
/// Files of the sled database the first version kept here.
const OLD_LAYOUT: [&str; 3] = ["conf", "db", "blobs"];

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.display().to_string();
    move |source| SnapshotError::Io { what, path, source }
}

impl SnapshotStore {
    /// Opens (or creates) the store in `dir`, removing unfinished saves and snapshots of the
    /// earlier layout.
    ///
    /// # Errors
    /// When the directory cannot be created or read.
    pub fn open(dir: &Path) -> Result<SnapshotStore, SnapshotError> {
        std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
        let store = SnapshotStore { dir: dir.to_owned(), keep: 3 };
        let mut old = false;
        for entry in std::fs::read_dir(dir).map_err(io("cannot read", dir))? {
            let entry = entry.map_err(io("cannot read", dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.ends_with(TMP_SUFFIX) {
                tracing::info!(path = %path.display(), "removing an unfinished snapshot");
                std::fs::remove_file(&path).map_err(io("cannot remove", &path))?;
            } else if OLD_LAYOUT.contains(&name.as_str()) || name.starts_with("snap.") {
                old = true;
                let removed = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
                removed.map_err(io("cannot remove", &path))?;
            }
        }
        if old {
            tracing::info!(dir = %dir.display(), "removed snapshots of the earlier (sled) layout; the state is replayed from the log once");
        }
        Ok(store)
    }

    fn path_of(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("state-{seq:020}{SUFFIX}"))
    }

    /// Sequences of the complete snapshots, oldest first.
    fn saved(&self) -> Result<Vec<u64>, SnapshotError> {
        let mut seqs = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io("cannot read", &self.dir))? {
            let name = entry.map_err(io("cannot read", &self.dir))?.file_name();
            let name = name.to_string_lossy();
            if let Some(Ok(seq)) = name.strip_prefix("state-").and_then(|n| n.strip_suffix(SUFFIX)).map(str::parse) {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();
        Ok(seqs)
    }

    /// Saves the state, keeping the newest three snapshots.
    ///
    /// # Errors
    /// When the file cannot be written, synced or renamed (a full disk, say); nothing is lost
    /// but the snapshot: the log stays the record.
    pub fn save(&self, stream_created_ns: i128, state: &ClusterState) -> Result<(), SnapshotError> {
        let path = self.path_of(state.seq);
        let tmp = path.with_extension("snap.tmp");
        let written = write_file(&tmp, stream_created_ns, state).map_err(io("cannot write", &tmp));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written?;
        std::fs::rename(&tmp, &path).map_err(io("cannot rename", &tmp))?;
        // The rename itself is durable once the directory is synced.
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io("cannot sync", &self.dir))?;
        let saved = self.saved()?;
        for seq in &saved[..saved.len().saturating_sub(self.keep)] {
            let old = self.path_of(*seq);
            std::fs::remove_file(&old).map_err(io("cannot remove", &old))?;
        }
        Ok(())
    }

    /// The newest snapshot of this stream incarnation at or below `max_seq`, verified.
    ///
    /// # Errors
    /// When a file cannot be read or the snapshot is corrupt.
    pub fn latest(&self, stream_created_ns: i128, max_seq: u64) -> Result<Option<ClusterState>, SnapshotError> {
        for seq in self.saved()?.into_iter().rev() {
            if seq > max_seq {
                continue;
            }
            let path = self.path_of(seq);
            let corrupt = |reason: String| SnapshotError::Corrupt { seq, reason };
            let mut file = File::open(&path).map_err(io("cannot open", &path))?;
            let trailer = read_trailer(&mut file).map_err(corrupt)?;
            if trailer.stream_created_ns != stream_created_ns {
                continue;
            }
            file.seek(SeekFrom::Start(0)).map_err(io("cannot read", &path))?;
            let mut body = BufReader::with_capacity(1 << 20, file).take(trailer.bytes);
            let state = ClusterState::from_canonical_reader(&mut body).map_err(|e| corrupt(e.to_string()))?;
            if body.limit() != 0 {
                return Err(corrupt(format!("{} bytes after the state", body.limit())));
            }
            if state.seq != seq || trailer.seq != seq || state.hash().0 != trailer.hash {
                return Err(corrupt("state hash mismatch".into()));
            }
            return Ok(Some(state));
        }
        Ok(None)
    }
}

/// Streams the state, then its trailer, into `path` and syncs it.
fn write_file(path: &Path, stream_created_ns: i128, state: &ClusterState) -> std::io::Result<()> {
    let mut out = Counting { inner: BufWriter::with_capacity(1 << 20, File::create(path)?), bytes: 0 };
    let hash = state.write_canonical(&mut out)?;
    let trailer = SnapshotTrailer { stream_created_ns, seq: state.seq, hash: hash.0, bytes: out.bytes };
    let encoded = novacron_types::encode(&trailer);
    let len = u32::try_from(encoded.len()).map_err(std::io::Error::other)?;
    out.write_all(&encoded)?;
    out.write_all(&len.to_be_bytes())?;
    out.write_all(MAGIC)?;
    let file = out.inner.into_inner().map_err(std::io::IntoInnerError::into_error)?;
    file.sync_all()
}

fn read_trailer(file: &mut File) -> Result<SnapshotTrailer, String> {
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    if size < 12 {
        return Err(format!("{size} bytes: too short"));
    }
    let mut end = [0u8; 12];
    file.seek(SeekFrom::Start(size - 12)).and_then(|_| file.read_exact(&mut end)).map_err(|e| e.to_string())?;
    if &end[4..] != MAGIC {
        return Err("no snapshot trailer".into());
    }
    let len = u64::from(u32::from_be_bytes([end[0], end[1], end[2], end[3]]));
    if len + 12 > size {
        return Err(format!("a trailer of {len} bytes in a file of {size}"));
    }
    let mut raw = vec![0u8; len as usize];
    file.seek(SeekFrom::Start(size - 12 - len)).and_then(|_| file.read_exact(&mut raw)).map_err(|e| e.to_string())?;
    let trailer: SnapshotTrailer = rmp_serde::from_slice(&raw).map_err(|e| format!("trailer: {e}"))?;
    if trailer.bytes + len + 12 != size {
        return Err(format!("the trailer says {} bytes of state in a file of {size}", trailer.bytes));
    }
    Ok(trailer)
}

/// Counts what passes through.
struct Counting<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
