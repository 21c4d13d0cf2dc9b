//! Replacement: a faulted replica that stays unreachable past its grace
//! period is moved to another pool, empty and all dirty, for catch-up to
//! rebuild in full.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use tracing::{info, warn};

use super::{Engine, Slot};
use crate::core::dirty::{DEFAULT_REGION, DirtyMap};
use crate::core::extent_list::ExtentList;
use crate::datapath::frontend::BlockDevice;

impl Engine {
    /// Moves replicas that stayed unreachable past the grace period to
    /// another pool; catch-up then rebuilds them in full, in the background.
    pub fn replace_lost(&self) {
        let Some(replacer) = &self.rebuild.replacer else {
            return;
        };
        let overdue: Vec<Arc<Slot>> = {
            let Ok(since) = self.faulted_since.lock() else {
                return;
            };
            self.slots()
                .into_iter()
                .filter(|s| {
                    !s.healthy.load(Ordering::SeqCst)
                        && since
                            .get(&s.index)
                            .is_some_and(|t| t.elapsed() >= self.rebuild.replace_after)
                })
                .collect()
        };
        for old in overdue {
            if old.io.check().is_ok() {
                continue;
            }
            let index = old.index;
            let io = match replacer(index) {
                Ok(io) => io,
                Err(e) => {
                    warn!(volume_id = %self.volume_id, replica = index, error = %e, "cannot replace lost replica yet");
                    continue;
                }
            };
            let mut map = DirtyMap::new(self.size(), DEFAULT_REGION);
            map.mark_all();
            let swapped = (|| -> io::Result<()> {
                // The replacement's record lists everything (no write needs
                // to list anything), and catch-up unlists what it copies.
                self.keep_listing(index, Some(ExtentList::everything(self.size(), 0)))?;
                let mut dirty = self.lock_dirty()?;
                self.persist_map(index, &map)?;
                dirty.insert(index, map);
                let mut slots = self
                    .slots
                    .write()
                    .map_err(|_| io::Error::other("slots lock poisoned"))?;
                if let Some(pos) = slots.iter().position(|s| s.index == index) {
                    slots[pos] = Arc::new(Slot {
                        index,
                        io,
                        healthy: AtomicBool::new(false),
                        read_latency_ns: AtomicU64::new(0),
                    });
                }
                Ok(())
            })();
            match swapped {
                Ok(()) => {
                    if let Ok(mut since) = self.faulted_since.lock() {
                        since.insert(index, Instant::now());
                    }
                    info!(volume_id = %self.volume_id, replica = index, "lost replica replaced; rebuilding in full");
                }
                Err(e) => {
                    warn!(volume_id = %self.volume_id, replica = index, error = %e, "cannot swap in replacement")
                }
            }
        }
    }
}
