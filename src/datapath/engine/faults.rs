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
use crate::datapath::replica::aligned::{ALIGN, AlignedBuf};

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
        // Where the healthy replicas may still disagree (`in_flight`): this
        // one has missed that too, recorded with the fault itself.
        let unsynced = self.unsynced_runs();
        let persisted = self.store.update(&self.volume_id, &mut |r| {
            self.still_claimed(r)?;
            let mut changed = r.fault_replica(index, reason);
            for &(start, len) in &unsynced {
                changed |= r.list_missed(index, start, len);
            }
            Ok(changed)
        });
        match persisted {
            Ok(record) => {
                // The map and the list exist before any write skips this
                // replica, so every skipped write is marked in both.
                let mut dirty = self.lock_dirty()?;
                let map = match dirty.entry(index) {
                    Entry::Vacant(e) => e.insert(DirtyMap::new(self.size(), DEFAULT_REGION)),
                    Entry::Occupied(e) => e.into_mut(),
                };
                for &(start, len) in &unsynced {
                    map.mark(start, len);
                }
                self.persist_map(index, map)?;
                drop(dirty);
                self.keep_listing(index, record.and_then(|r| r.missed_of(index)))?;
                if let Ok(mut since) = self.faulted_since.lock() {
                    since.entry(index).or_insert_with(Instant::now);
                }
                // Reads the healthy ones may disagree on came from it: from
                // now on they come from another (a version as good).
                self.unsynced_source_lost(index);
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
        self.read_check();
    }

    /// A passthrough volume's reads and writes go from the kernel to its
    /// replica without us, so its disk failing (EIO) would reach the pod and
    /// never the record: read some of the replica ourselves each check,
    /// and fault it when that fails.
    fn read_check(&self) {
        let Some(slot) = self.passthrough_slot() else {
            return;
        };
        let (reads, next) = read_checks(self.read_check_at.load(Ordering::SeqCst), self.size());
        for (offset, len) in reads {
            let mut buf = AlignedBuf::zeroed(len);
            if let Err(e) = slot.io.read_at(buf.as_mut_slice(), offset) {
                let _ = self.fault(
                    &slot,
                    &format!("read check of {len} bytes at {offset} failed: {e}"),
                );
                return;
            }
        }
        self.read_check_at.store(next, Ordering::SeqCst);
    }
}

/// What one check reads of a passthrough replica of `size` bytes: its first
/// block, where a filesystem's superblock is (written once formatted, so a
/// dead disk shows there at once), and the next window of a pass over the
/// whole replica from `cursor`, for a disk failing in places; and where
/// the pass goes on next time.
fn read_checks(cursor: u64, size: u64) -> (Vec<(u64, usize)>, u64) {
    let align = ALIGN as u64;
    let end = size - size % align;
    let mut reads = Vec::new();
    if end == 0 {
        return (reads, 0);
    }
    reads.push((0, ALIGN));
    let at = if cursor < end { cursor } else { 0 };
    let len = READ_CHECK_WINDOW.min(end - at);
    reads.push((at, len as usize));
    let next = if at + len >= end { 0 } else { at + len };
    (reads, next)
}

/// How much of a passthrough replica each check reads besides its first
/// block: 1 MiB a second is little next to any disk, and a pass over a
/// 100 GiB replica takes a day.
const READ_CHECK_WINDOW: u64 = 1 << 20;

#[cfg(test)]
mod read_check_tests {
    use super::*;

    #[test]
    fn a_pass_covers_the_replica_window_by_window_then_starts_again() {
        let size = (5 << 19) + 4096 + 100;
        let mut cursor = 0;
        let mut covered = Vec::new();
        for _ in 0..4 {
            let (reads, next) = read_checks(cursor, size);
            assert_eq!(reads[0], (0, ALIGN), "the first block every time");
            assert_eq!(reads.len(), 2);
            covered.push(reads[1]);
            cursor = next;
        }
        assert_eq!(
            covered,
            vec![
                (0, 1 << 20),
                (1 << 20, 1 << 20),
                (2 << 20, (1 << 19) + 4096),
                (0, 1 << 20)
            ]
        );
        // A cursor past the end starts over; nothing to read of a replica
        // smaller than a block.
        assert_eq!(read_checks(size * 2, size).0[1], (0, 1 << 20));
        assert_eq!(read_checks(0, 100), (vec![], 0));
    }
}
