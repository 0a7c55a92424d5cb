//! The agent's local journal: which commands it has applied and what it believes it runs.
//!
//! ```text
//! sled db (one per agent process; several simulated hosts share it, a tree pair each)
//!   tree "<host>/applied":  event id (16 bytes)  →  stream seq (u64 BE)
//!   tree "<host>/vms":      VM id (16 bytes)     →  MessagePack JournalVm
//!                           "done" (4 bytes)     →  the cursor: stream seq (u64 BE)
//! ```
//! The first two change in one sled transaction, flushed before the command is acknowledged, so
//! after a crash the journal says exactly which commands took effect. The cursor — every
//! command at or below it was handled — is where the agent's command consumer resumes when
//! the server lost it (the consumer's own state is kept in memory). It is written without a
//! flush: after a crash it can only be behind, and what is handed again is recognised above.

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
}

/// The cursor's key in the `applied` tree (event ids are 16 bytes: no clash). Not a tree of
/// its own: sled rewrites its whole table of trees for every tree it creates, which is what a
/// process of thousands of simulated hosts spends its start-up on.
const CURSOR_KEY: &[u8] = b"done";

impl Journal {
    /// Opens the host's trees in `db`.
    ///
    /// # Errors
    /// When sled cannot open them.
    pub fn open(db: &sled::Db, host: &HostId) -> Result<Journal, JournalError> {
        Ok(Journal { applied: db.open_tree(format!("{host}/applied"))?, vms: db.open_tree(format!("{host}/vms"))? })
    }

    /// The stream sequence at and below which every command for this host was handled (0:
    /// none yet).
    ///
    /// # Errors
    /// When sled fails.
    pub fn cursor(&self) -> Result<u64, JournalError> {
        Ok(self
            .applied
            .get(CURSOR_KEY)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, u64::from_be_bytes))
    }

    /// Moves the cursor forward to `seq` (never back). Not flushed: see the module docs.
    ///
    /// # Errors
    /// When sled fails.
    pub fn advance_cursor(&self, seq: u64) -> Result<(), JournalError> {
        self.applied.fetch_and_update(CURSOR_KEY, |old| {
            let old = old.and_then(|v| <[u8; 8]>::try_from(v).ok()).map_or(0, u64::from_be_bytes);
            Some(old.max(seq).to_be_bytes().to_vec())
        })?;
        Ok(())
    }

    /// Whether the command with this event id was already applied.
    ///
    /// # Errors
    /// When sled fails.
    pub fn is_applied(&self, id: EventId) -> Result<bool, JournalError> {
        Ok(self.applied.contains_key(id.0.as_bytes())?)
    }

    /// What the journal says of a VM.
    ///
    /// # Errors
    /// When sled fails or the record is corrupt.
    pub fn vm(&self, vm: VmId) -> Result<Option<JournalVm>, JournalError> {
        match self.vms.get(vm.0.as_bytes())? {
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
        let result: sled::transaction::TransactionResult<(), ()> =
            (&self.applied, &self.vms).transaction(|(applied, vms)| {
                applied.insert(id.0.as_bytes(), &seq.to_be_bytes())?;
                if let Some(v) = &value {
                    vms.insert(vm.0.as_bytes(), v.as_slice())?;
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
        self.applied.flush()?;
        self.vms.flush()?;
        Ok(())
    }

    /// Replaces what the journal says of a VM outside any command (a crash the driver saw, a
    /// reconciliation, a self-fence). Flushed before returning.
    ///
    /// # Errors
    /// When sled fails.
    pub fn set_vm(&self, vm: VmId, record: &JournalVm) -> Result<(), JournalError> {
        self.vms.insert(vm.0.as_bytes(), novacron_types::encode(record))?;
        self.vms.flush()?;
        Ok(())
    }

    /// Every VM the journal knows, for reconciliation at start.
    ///
    /// # Errors
    /// When sled fails or a record is corrupt.
    pub fn vms(&self) -> Result<Vec<(VmId, JournalVm)>, JournalError> {
        let mut out = Vec::new();
        for item in &self.vms {
            let (k, v) = item?;
            let vm = VmId(uuid::Uuid::from_slice(&k).unwrap_or_default());
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
    fn the_cursor_only_moves_forward_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let host = HostId::new("h1").unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let j = Journal::open(&db, &host).unwrap();
            assert_eq!(j.cursor().unwrap(), 0, "a new journal has handled nothing");
            j.advance_cursor(7).unwrap();
            j.advance_cursor(5).unwrap();
            assert_eq!(j.cursor().unwrap(), 7, "never back");
            // Another host's journal in the same database has its own cursor.
            assert_eq!(Journal::open(&db, &HostId::new("h2").unwrap()).unwrap().cursor().unwrap(), 0);
            db.flush().unwrap();
        }
        let db = sled::open(dir.path()).unwrap();
        assert_eq!(Journal::open(&db, &host).unwrap().cursor().unwrap(), 7);
    }
}
