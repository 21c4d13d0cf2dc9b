//! Catch-up: a faulted replica that is reachable again gets the regions
//! its dirty map says it missed, copied from the healthy ones while I/O
//! goes on, and rejoins. A replacement (all regions dirty) is rebuilt the
//! same way.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{Engine, STRIPES, Slot};
use crate::datapath::frontend::BlockDevice;
use crate::datapath::replica::aligned::AlignedBuf;

impl Engine {
    /// Copies what faulted-but-reachable replicas missed and lets them
    /// rejoin. Returns the bytes copied. Safe to run while I/O continues.
    pub fn catch_up(&self) -> u64 {
        let mut total = 0;
        // Passes until one heals nothing: when every replica had faulted,
        // the one that missed nothing heals first (it needs no source) and
        // becomes the source the others copy from in the next pass.
        loop {
            let pending: Vec<Arc<Slot>> = {
                let Ok(dirty) = self.dirty.lock() else {
                    return total;
                };
                self.slots()
                    .into_iter()
                    .filter(|s| !s.healthy.load(Ordering::SeqCst) && dirty.contains_key(&s.index))
                    .collect()
            };
            let mut healed = false;
            for slot in pending {
                if slot.io.check().is_err() {
                    continue;
                }
                match self.catch_up_one(&slot) {
                    Ok(bytes) => {
                        total += bytes;
                        healed = true;
                    }
                    Err(e) => {
                        warn!(volume_id = %self.volume_id, replica = slot.index, error = %e, "catch-up interrupted; will retry");
                    }
                }
            }
            if !healed {
                return total;
            }
        }
    }

    fn copy_region(&self, slot: &Slot, start: u64, len: u64) -> io::Result<()> {
        let mut buf = AlignedBuf::zeroed(len as usize);
        self.read_at(buf.as_mut_slice(), start)?;
        self.admit()?;
        if buf.as_slice().iter().all(|&b| b == 0) {
            // Keeps rebuilt replicas thin: a hole reads as zeroes too.
            slot.io.discard(start, len)
        } else {
            slot.io.write_at(buf.as_slice(), start)
        }
    }

    /// Copies the regions of `slot`'s map that are dirty now; each under
    /// its stripe lock unless `paused` (all writes already stopped).
    fn copy_dirty(&self, slot: &Slot, paused: bool) -> io::Result<u64> {
        let regions: Vec<(u64, u64, u64)> = {
            let dirty = self.lock_dirty()?;
            let Some(map) = dirty.get(&slot.index) else {
                return Ok(0);
            };
            map.dirty_regions()
                .map(|r| {
                    let (start, len) = map.range(r);
                    (r, start, len)
                })
                .collect()
        };
        let mut bytes = 0;
        let started = Instant::now();
        for (n, (region, start, len)) in regions.into_iter().enumerate() {
            {
                let _stripe = if paused {
                    None
                } else {
                    Some(
                        self.stripes[(region % STRIPES as u64) as usize]
                            .write()
                            .map_err(|_| io::Error::other("stripe lock poisoned"))?,
                    )
                };
                self.copy_region(slot, start, len)?;
                if let Some(map) = self.lock_dirty()?.get_mut(&slot.index) {
                    map.clear(region);
                }
            }
            bytes += len;
            // Persist progress now and then, so an interrupted rebuild
            // resumes, here or on another node.
            if n % 64 == 63 {
                if let Some(map) = self.lock_dirty()?.get(&slot.index) {
                    self.persist_map(slot.index, map)?;
                }
                // Progress only: a store out now costs a longer resume.
                if !paused && let Err(e) = self.unlist_copied(slot.index) {
                    warn!(volume_id = %self.volume_id, replica = slot.index, error = %e, "cannot record catch-up progress");
                }
            }
            let limit = self.rebuild.bytes_per_sec;
            if limit > 0 && !paused {
                let due = Duration::from_secs_f64(bytes as f64 / limit as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        // Persist progress so an interrupted catch-up resumes, never restarts.
        if let Some(map) = self.lock_dirty()?.get(&slot.index) {
            self.persist_map(slot.index, map)?;
        }
        Ok(bytes)
    }

    fn catch_up_one(&self, slot: &Slot) -> io::Result<u64> {
        // Writes sent before the fault may still be in flight on a link that
        // came back; they must not land on top of what is copied now. A
        // replica to be copied in full from a healthy one is emptied too.
        let whole = self
            .lock_dirty()?
            .get(&slot.index)
            .is_some_and(|m| m.count() == m.regions() && m.regions() > 0);
        // A fence changes what the agents accept: a stale engine must not.
        self.admit()?;
        if whole && self.healthy_count() > 0 {
            slot.io.fence_empty()?;
        } else {
            slot.io.fence()?;
        }
        let mut bytes = self.copy_dirty(slot, false)?;
        let _paused = self
            .membership
            .write()
            .map_err(|_| io::Error::other("membership lock poisoned"))?;
        bytes += self.copy_dirty(slot, true)?;
        slot.io.flush()?;
        let index = slot.index;
        self.store
            .update(&self.volume_id, &mut |r| {
                self.still_claimed(r)?;
                Ok(r.heal_replica(index, bytes))
            })
            .map_err(|e| {
                io::Error::other(format!("cannot record replica healthy: {}", e.report()))
            })?;
        self.lock_dirty()?.remove(&index);
        self.stop_listing(index);
        if let Ok(mut since) = self.faulted_since.lock() {
            since.remove(&index);
        }
        self.remove_map_file(index);
        slot.healthy.store(true, Ordering::SeqCst);
        info!(volume_id = %self.volume_id, replica = index, bytes, "replica caught up and rejoined");
        Ok(bytes)
    }
}
