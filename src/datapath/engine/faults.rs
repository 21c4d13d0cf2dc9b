//! Fault recording: a replica that fails is recorded faulted in the state
//! store (fsynced), with a dirty map persisted for it, before the engine
//! stops using it — so no write it missed is acknowledged unrecorded.

use std::collections::btree_map::Entry;
use std::io;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tracing::error;

use super::{Engine, Slot};
use crate::core::dirty::{DEFAULT_REGION, DirtyMap};
use crate::core::error::{Error, Result};
use crate::core::volume::VolumeRecord;
use crate::datapath::frontend::BlockDevice;

impl Engine {
    /// Replica health may only be recorded while the record still names
    /// this engine's claim (see `EngineOptions::claim`).
    pub(super) fn still_claimed(&self, r: &VolumeRecord) -> Result<()> {
        match &self.claim {
            Some(c) if r.staged_on.as_ref() != Some(c) => Err(Error::precondition(format!(
                "volume {} is no longer claimed by node {} (epoch {})",
                self.volume_id, c.node, c.epoch
            ))),
            _ => Ok(()),
        }
    }

    /// Records replica `slot` as faulted in the state store, then stops
    /// using it. Err means the fault could not be persisted: the caller must
    /// not acknowledge anything that the replica missed.
    pub(super) fn fault(&self, slot: &Slot, reason: &str) -> io::Result<()> {
        let _guard = self
            .fault_lock
            .lock()
            .map_err(|_| io::Error::other("fault lock poisoned"))?;
        if !slot.healthy.load(Ordering::SeqCst) {
            return Ok(());
        }
        let index = slot.index;
        let persisted = self.store.update(&self.volume_id, &mut |r| {
            self.still_claimed(r)?;
            Ok(r.fault_replica(index, reason))
        });
        match persisted {
            Ok(_) => {
                // The map exists before any write skips this replica, so
                // every skipped write is marked in it.
                let mut dirty = self.lock_dirty()?;
                if let Entry::Vacant(e) = dirty.entry(index) {
                    let map = DirtyMap::new(self.size(), DEFAULT_REGION);
                    self.persist_map(index, &map)?;
                    e.insert(map);
                }
                drop(dirty);
                if let Ok(mut since) = self.faulted_since.lock() {
                    since.entry(index).or_insert_with(Instant::now);
                }
                slot.healthy.store(false, Ordering::SeqCst);
                error!(volume_id = %self.volume_id, replica = index, %reason, "replica faulted");
                Ok(())
            }
            Err(e) => {
                error!(volume_id = %self.volume_id, replica = index, error = %e.report(), "cannot record replica fault");
                Err(io::Error::other(format!(
                    "cannot record fault: {}",
                    e.report()
                )))
            }
        }
    }

    /// Fences every healthy replica, so writes an earlier engine of this
    /// volume left in flight cannot land after this one's. A replica that
    /// cannot be fenced is faulted; Err means that could not be recorded.
    pub fn fence_replicas(&self) -> io::Result<()> {
        for slot in self.healthy_slots() {
            if let Err(e) = slot.io.fence() {
                self.fault(&slot, &format!("cannot fence: {e}"))?;
            }
        }
        Ok(())
    }

    /// Probes every healthy replica and faults those that are gone. Run
    /// periodically so a removed replica is noticed even with no I/O.
    pub fn check_replicas(&self) {
        for slot in self.healthy_slots() {
            if let Err(reason) = slot.io.check() {
                // A failure to persist is retried at the next check; writes
                // meanwhile still go to this replica, so nothing is lost.
                let _ = self.fault(&slot, &reason);
            }
        }
    }
}
