//! The agent's local journal: which commands it has applied and what it believes it runs.
//!
//! ```text
//! sled db (one per agent process; several simulated hosts share it, a tree pair each)
//!   tree "<host>/applied":  event id (16 bytes)  →  stream seq (u64 BE)
//!   tree "<host>/vms":      VM id (16 bytes)     →  MessagePack JournalVm
//! ```
//! Both trees change in one sled transaction, flushed before the command is acknowledged, so
//! after a crash the journal says exactly which commands took effect.

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

impl Journal {
    /// Opens the host's trees in `db`.
    ///
    /// # Errors
    /// When sled cannot open them.
    pub fn open(db: &sled::Db, host: &HostId) -> Result<Journal, JournalError> {
        Ok(Journal { applied: db.open_tree(format!("{host}/applied"))?, vms: db.open_tree(format!("{host}/vms"))? })
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
