//! What each faulted replica has missed: its dirty map in memory, and
//! persisted (through `datapath::dirty_maps`) whenever it gains a region,
//! before the write that marked it is acknowledged.

use std::collections::BTreeMap;
use std::io;
use std::sync::MutexGuard;

use tracing::warn;

use super::Engine;
use crate::core::dirty::DirtyMap;

impl Engine {
    pub(super) fn lock_dirty(&self) -> io::Result<MutexGuard<'_, BTreeMap<usize, DirtyMap>>> {
        self.dirty
            .lock()
            .map_err(|_| io::Error::other("dirty map lock poisoned"))
    }

    pub(super) fn persist_map(&self, index: usize, map: &DirtyMap) -> io::Result<()> {
        let Some(files) = &self.dirty_files else {
            return Ok(());
        };
        files.save(index, map).map_err(io::Error::other)
    }

    /// Removes the persisted map of replica `index`, which has rejoined.
    pub(super) fn remove_map_file(&self, index: usize) {
        let Some(files) = &self.dirty_files else {
            return;
        };
        // One left behind is harmless: a replica that faults again starts a
        // new map over it, and a healthy one's map is never read.
        if let Err(e) = files.remove(index) {
            warn!(volume_id = %self.volume_id, replica = index, error = %e.report(), "cannot remove the dirty map of a rejoined replica");
        }
    }

    /// Records `[offset, offset+len)` as missed by every faulted replica,
    /// persisting maps that gained a region. Must succeed before the write
    /// is acknowledged.
    pub(super) fn mark_missed(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut dirty = self.lock_dirty()?;
        for (index, map) in dirty.iter_mut() {
            if map.mark(offset, len) {
                self.persist_map(*index, map)?;
            }
        }
        Ok(())
    }
}
