//! The agent's local journal: which commands it has applied and what it believes it runs.
//!
//! ```text
//! sled db (one per agent process; several simulated hosts share it, keyed by host)
//!   tree "journal-applied":  "<host>/" + event id (16 bytes)  →  stream seq (u64 BE)
//!                            "<host>/commands-done"            →  the cursor: COMMANDS seq (u64 BE)
//!                            "<host>/done"                     →  (earlier versions) the cursor in EVENTS
//!                            "<host>/fenced-through"           →  EVENTS seq: no VM starts for commands up to it
//!   tree "journal-vms":      "<host>/" + VM id (16 bytes)     →  MessagePack JournalVm
//! ```
//! (Host ids have no `/`, so one host's keys never run into another's.) Earlier versions kept
//! a tree pair per host; sled rewrites its whole table of trees for every tree it creates, which
//! made a process of thousands of simulated hosts start in O(hosts²).
//! [`migrate_per_host_trees`] moves such a database over once.
//! The first two change in one sled transaction, flushed before the command is acknowledged, so
//! after a crash the journal says exactly which commands took effect. The cursor — every
//! command at or below it was handled — is where the agent's command consumer resumes when
//! the server lost it (the consumer's own state is kept in memory). It is written without a
//! flush: after a crash it can only be behind, and what is handed again is recognised above.
//! Earlier versions read their commands from EVENTS and kept their cursor there under `done`;
//! its presence tells the agent to move ([`Journal::read_commands_from_events`]).

use novacron_types::{EventId, Generation, HostId, IncarnationId, VmId};
use serde::{Deserialize, Serialize};
use sled::Transactional;

/// What the journal remembers of one VM on this host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalVm {
    /// The latest incarnation commanded here.
    pub incarnation: IncarnationId,
    /// The highest generation seen for this VM; older commands are refused.
    pub generation: Generation,
    /// Whether that incarnation should be running (`true`) or was stopped (`false`).
    pub running: bool,
}

/// Journal failures.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// sled failed.
    #[error("agent journal")]
    Sled(#[from] sled::Error),
    /// The write was cut short by a shutdown (it ran on the blocking pool).
    #[error("agent journal write interrupted by shutdown")]
    Interrupted,
    /// A stored record does not decode.
    #[error("agent journal record for VM {vm} is corrupt")]
    Corrupt {
        /// Which VM.
        vm: VmId,
        /// Why.
        #[source]
        source: rmp_serde::decode::Error,
    },
}

/// One host's journal.
#[derive(Clone)]
pub struct Journal {
    applied: sled::Tree,
    vms: sled::Tree,
    /// `"<host>/"`.
    prefix: Vec<u8>,
}

/// The tree of applied commands (and cursors), shared by the hosts of a database.
pub const APPLIED_TREE: &str = "journal-applied";
/// The tree of VM records, shared by the hosts of a database.
pub const VMS_TREE: &str = "journal-vms";
/// The tree of simulated hypervisors' VMs ([`crate::sim::SimDriver::persistent`]).
pub const SIM_TREE: &str = "sim-vms";

/// The cursor's key after the host prefix (event ids are 16 bytes: no clash).
const CURSOR_KEY: &[u8] = b"commands-done";
/// Where earlier versions kept their cursor, a sequence of EVENTS.
const EVENTS_CURSOR_KEY: &[u8] = b"done";
/// The last EVENTS sequence before this host was last declared failed.
const FENCED_THROUGH_KEY: &[u8] = b"fenced-through";

/// `"<host>/"`: the prefix of a host's keys in the shared trees.
#[must_use]
pub fn host_prefix(host: &HostId) -> Vec<u8> {
    format!("{host}/").into_bytes()
}

/// Moves what earlier versions kept in per-host trees (`<host>/applied`, `<host>/vms`,
/// `<host>/sim`) into the shared trees, then drops them. Idempotent; one pass over the
/// database. Returns how many trees it moved.
///
/// # Errors
/// When sled fails (nothing is dropped before its contents are flushed to the new place).
pub fn migrate_per_host_trees(db: &sled::Db) -> Result<usize, JournalError> {
    let mut moved = 0;
    for name in db.tree_names() {
        let Ok(text) = std::str::from_utf8(&name) else { continue };
        let Some((host, kind)) = text.rsplit_once('/') else { continue };
        let Ok(host) = HostId::new(host) else { continue };
        let target = match kind {
            "applied" => APPLIED_TREE,
            "vms" => VMS_TREE,
            "sim" => SIM_TREE,
            _ => continue,
        };
        let old = db.open_tree(&name)?;
        let new = db.open_tree(target)?;
        let prefix = host_prefix(&host);
        for item in &old {
            let (k, v) = item?;
            new.insert([&prefix[..], &k].concat(), v)?;
        }
        new.flush()?;
        db.drop_tree(&name)?;
        moved += 1;
    }
    Ok(moved)
}

/// Opens the journal database at `path`, waiting up to `patience` while its file lock is
/// held. An agent restarted inside one process (the tests do it) needs this: sled's background
/// threads let go of the lock a moment after the last handle is dropped. Another process
/// holding the lock is waited for just as long, so keep `patience` short outside tests.
///
/// # Errors
/// sled's error, once `patience` has run out or for anything but the lock.
pub fn open_when_released(path: &std::path::Path, patience: std::time::Duration) -> Result<sled::Db, sled::Error> {
    let deadline = std::time::Instant::now() + patience;
    loop {
        match sled::open(path) {
            Err(e) if std::time::Instant::now() < deadline && e.to_string().contains("could not acquire lock") => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            opened => return opened,
        }
    }
}

impl Journal {
    /// Opens the host's trees in `db`.
    ///
    /// # Errors
    /// When sled cannot open them.
    pub fn open(db: &sled::Db, host: &HostId) -> Result<Journal, JournalError> {
        Ok(Journal { applied: db.open_tree(APPLIED_TREE)?, vms: db.open_tree(VMS_TREE)?, prefix: host_prefix(host) })
    }

    fn key(&self, id: &[u8]) -> Vec<u8> {
        [&self.prefix[..], id].concat()
    }

    /// The sequence of COMMANDS at and below which every command for this host was handled
    /// (0: none yet).
    ///
    /// # Errors
    /// When sled fails.
    pub fn cursor(&self) -> Result<u64, JournalError> {
        self.sequence(CURSOR_KEY)
    }

    /// A sequence kept under `key` (0 when absent).
    fn sequence(&self, key: &[u8]) -> Result<u64, JournalError> {
        Ok(self
            .applied
            .get(self.key(key))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, u64::from_be_bytes))
    }

    /// Raises the sequence under `key` to `seq`, never lowering it (not flushed).
    fn raise(&self, key: &[u8], seq: u64) -> Result<(), JournalError> {
        self.applied.fetch_and_update(self.key(key), |old| {
            let old = old.and_then(|v| <[u8; 8]>::try_from(v).ok()).map_or(0, u64::from_be_bytes);
            Some(old.max(seq).to_be_bytes().to_vec())
        })?;
        Ok(())
    }

    /// Whether an earlier version of the agent read this host's commands from EVENTS (it left
    /// its cursor there).
    ///
    /// # Errors
    /// When sled fails.
    pub fn read_commands_from_events(&self) -> Result<bool, JournalError> {
        Ok(self.applied.contains_key(self.key(EVENTS_CURSOR_KEY))?)
    }

    /// Forgets the cursor of an earlier version (in EVENTS), once its consumer there is gone.
    /// Flushed.
    ///
    /// # Errors
    /// When sled fails.
    pub fn forget_events_cursor(&self) -> Result<(), JournalError> {
        self.applied.remove(self.key(EVENTS_CURSOR_KEY))?;
        self.applied.flush()?;
        Ok(())
    }

    /// Moves the cursor forward to `seq` (never back). Not flushed: see the module docs.
    ///
    /// # Errors
    /// When sled fails.
    pub fn advance_cursor(&self, seq: u64) -> Result<(), JournalError> {
        self.raise(CURSOR_KEY, seq)
    }

    /// The last EVENTS sequence written before the orchestrator last declared this host failed
    /// (0: never). A command logged at or below it was issued before that: the orchestrator
    /// has placed its VM elsewhere since, so it must not start here.
    ///
    /// # Errors
    /// When sled fails.
    pub fn fenced_through(&self) -> Result<u64, JournalError> {
        self.sequence(FENCED_THROUGH_KEY)
    }

    /// Raises [`Journal::fenced_through`] to `seq` (never lowers it). Flushed before returning:
    /// the agent takes a fresh lease only after this, and a restart must still know it.
    ///
    /// # Errors
    /// When sled fails.
    pub fn raise_fenced_through(&self, seq: u64) -> Result<(), JournalError> {
        self.raise(FENCED_THROUGH_KEY, seq)?;
        self.applied.flush()?;
        Ok(())
    }

    /// Whether the command with this event id was already applied.
    ///
    /// # Errors
    /// When sled fails.
    pub fn is_applied(&self, id: EventId) -> Result<bool, JournalError> {
        Ok(self.applied.contains_key(self.key(id.0.as_bytes()))?)
    }

    /// What the journal says of a VM.
    ///
    /// # Errors
    /// When sled fails or the record is corrupt.
    pub fn vm(&self, vm: VmId) -> Result<Option<JournalVm>, JournalError> {
        match self.vms.get(self.key(vm.0.as_bytes()))? {
            None => Ok(None),
            Some(bytes) => {
                rmp_serde::from_slice(&bytes).map(Some).map_err(|source| JournalError::Corrupt { vm, source })
            }
        }
    }

    /// Records that command `id` (at stream `seq`) was applied and what the VM's record is now
    /// (`None`: leave it unchanged, e.g. a refused stale command). Flushed before returning.
    ///
    /// # Errors
    /// When sled fails.
    pub fn record(&self, id: EventId, seq: u64, vm: VmId, record: Option<&JournalVm>) -> Result<(), JournalError> {
        let value = record.map(novacron_types::encode);
        let (id_key, vm_key) = (self.key(id.0.as_bytes()), self.key(vm.0.as_bytes()));
        let result: sled::transaction::TransactionResult<(), ()> =
            (&self.applied, &self.vms).transaction(|(applied, vms)| {
                applied.insert(id_key.as_slice(), &seq.to_be_bytes())?;
                if let Some(v) = &value {
                    vms.insert(vm_key.as_slice(), v.as_slice())?;
                }
                Ok(())
            });
        match result {
            Ok(()) => {}
            Err(sled::transaction::TransactionError::Storage(e)) => {
                return Err(JournalError::Sled(e));
            }
            Err(sled::transaction::TransactionError::Abort(())) => {} // never aborted above
        }
        // One flush makes both trees durable: they share the database's log.
        self.applied.flush()?;
        Ok(())
    }

    /// Replaces what the journal says of a VM outside any command (a crash the driver saw, a
    /// reconciliation, a self-fence). Flushed before returning.
    ///
    /// # Errors
    /// When sled fails.
    pub fn set_vm(&self, vm: VmId, record: &JournalVm) -> Result<(), JournalError> {
        self.vms.insert(self.key(vm.0.as_bytes()), novacron_types::encode(record))?;
        self.vms.flush()?;
        Ok(())
    }

    /// Every VM the journal knows, for reconciliation at start.
    ///
    /// # Errors
    /// When sled fails or a record is corrupt.
    pub fn vms(&self) -> Result<Vec<(VmId, JournalVm)>, JournalError> {
        let mut out = Vec::new();
        for item in self.vms.scan_prefix(&self.prefix) {
            let (k, v) = item?;
            let vm = VmId(uuid::Uuid::from_slice(&k[self.prefix.len()..]).unwrap_or_default());
            let rec = rmp_serde::from_slice(&v).map_err(|source| JournalError::Corrupt { vm, source })?;
            out.push((vm, rec));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cursor_and_the_fence_sequence_only_move_forward_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let host = HostId::new("h1").unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let j = Journal::open(&db, &host).unwrap();
            assert_eq!(j.cursor().unwrap(), 0, "a new journal has handled nothing");
            j.advance_cursor(7).unwrap();
            j.advance_cursor(5).unwrap();
            assert_eq!(j.cursor().unwrap(), 7, "never back");
            assert_eq!(j.fenced_through().unwrap(), 0, "never declared failed");
            j.raise_fenced_through(40).unwrap();
            j.raise_fenced_through(30).unwrap();
            assert_eq!(j.fenced_through().unwrap(), 40, "never lowered");
            // Another host's journal in the same database has its own cursor.
            assert_eq!(Journal::open(&db, &HostId::new("h2").unwrap()).unwrap().cursor().unwrap(), 0);
            db.flush().unwrap();
        }
        let db = open_when_released(dir.path(), std::time::Duration::from_secs(10)).unwrap();
        let j = Journal::open(&db, &host).unwrap();
        assert_eq!((j.cursor().unwrap(), j.fenced_through().unwrap()), (7, 40));
    }

    #[test]
    fn per_host_trees_of_an_earlier_version_are_moved_into_the_shared_ones() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let (id, vm) = (EventId::new_v7(), VmId::new_v7());
        let rec = JournalVm { incarnation: IncarnationId::new_v7(), generation: Generation(3), running: true };
        // The layout before: a tree pair per host (and the simulated hypervisor's tree).
        db.open_tree("h1/applied").unwrap().insert(id.0.as_bytes(), &9u64.to_be_bytes()).unwrap();
        db.open_tree("h1/applied").unwrap().insert(b"done", &9u64.to_be_bytes()).unwrap();
        db.open_tree("h1/vms").unwrap().insert(vm.0.as_bytes(), novacron_types::encode(&rec)).unwrap();
        db.open_tree("h1/sim").unwrap().insert(vm.0.as_bytes(), b"x".to_vec()).unwrap();
        db.open_tree("h10/vms").unwrap().insert(vm.0.as_bytes(), novacron_types::encode(&rec)).unwrap();
        assert_eq!(migrate_per_host_trees(&db).unwrap(), 4);
        assert_eq!(migrate_per_host_trees(&db).unwrap(), 0, "idempotent");
        assert!(!db.tree_names().iter().any(|n| n.as_ref() == b"h1/vms"), "the old trees are gone");
        let j = Journal::open(&db, &HostId::new("h1").unwrap()).unwrap();
        assert!(j.is_applied(id).unwrap());
        // That version's cursor was in EVENTS: it tells the agent to move, not where to resume.
        assert_eq!(j.cursor().unwrap(), 0);
        assert!(j.read_commands_from_events().unwrap());
        j.forget_events_cursor().unwrap();
        assert!(!j.read_commands_from_events().unwrap());
        assert_eq!(j.vms().unwrap(), vec![(vm, rec.clone())]);
        // h10's records stay h10's (the prefix ends with '/').
        let j10 = Journal::open(&db, &HostId::new("h10").unwrap()).unwrap();
        assert!(!j10.is_applied(id).unwrap());
        assert_eq!(j10.vms().unwrap().len(), 1);
        assert_eq!(
            db.open_tree(SIM_TREE)
                .unwrap()
                .get(b"h1/".iter().chain(vm.0.as_bytes()).copied().collect::<Vec<u8>>())
                .unwrap()
                .as_deref(),
            Some(&b"x"[..])
        );
    }
}
