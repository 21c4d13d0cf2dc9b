//! What each faulted replica has missed: its dirty map in memory, and
//! persisted (through `datapath::dirty_maps`) whenever it gains a region,
//! before the write that marked it is acknowledged.

use std::collections::BTreeMap;
use std::io;
use std::sync::MutexGuard;
use std::time::Duration;

use tracing::warn;

use super::Engine;
use crate::core::dirty::DirtyMap;
use crate::core::error::ErrorKind;
use crate::core::extent_list::ExtentList;
use crate::core::volume::VolumeRecord;

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
    /// persisting maps that gained a region, and listing extents new to
    /// the record. Must succeed before the write is acknowledged.
    pub(super) fn mark_missed(&self, offset: u64, len: u64) -> io::Result<()> {
        {
            let mut dirty = self.lock_dirty()?;
            // Every replica healthy (the usual case): nothing to list either.
            if dirty.is_empty() {
                return Ok(());
            }
            for (index, map) in dirty.iter_mut() {
                if map.mark(offset, len) {
                    self.persist_map(*index, map)?;
                }
            }
        }
        self.list_missed(offset, len)
    }

    pub(super) fn lock_listed(
        &self,
    ) -> io::Result<MutexGuard<'_, BTreeMap<usize, Option<ExtentList>>>> {
        self.listed
            .lock()
            .map_err(|_| io::Error::other("missed-extents lock poisoned"))
    }

    /// Lists the extents of `[offset, offset+len)` that faulted replicas'
    /// records do not list yet, in one store write: so whichever node
    /// holds the volume next knows what each missed. Nothing to list (the
    /// usual case, even while degraded) costs nothing.
    fn list_missed(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut listed = self.lock_listed()?;
        // The record's own list decides what is listed: this copy only
        // spares the store a write when nothing is new.
        let new: Vec<usize> = listed
            .iter()
            .filter(|(_, m)| {
                m.as_ref()
                    .is_some_and(|m| !m.unlisted(offset, len).is_empty())
            })
            .map(|(index, _)| *index)
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        let record = self.record_before_write("record what faulted replicas missed", &mut |r| {
            let mut changed = false;
            for &index in &new {
                changed |= r.list_missed(index, offset, len);
            }
            Ok(changed)
        })?;
        for index in new {
            // What the record says now: a replica replaced meanwhile keeps
            // no list (it misses everything).
            listed.insert(index, record.missed_of(index));
        }
        Ok(())
    }

    /// Applies `change` to the record before a write goes out, under this
    /// engine's claim. The store out (an API server restarting) or busy
    /// makes the write wait, as it would at the lease gate, rather than
    /// fail the pod's filesystem; anything else (the claim is another's
    /// above all) fails it: it must not be acknowledged.
    pub(super) fn record_before_write(
        &self,
        what: &str,
        change: &mut dyn FnMut(&mut VolumeRecord) -> crate::core::error::Result<bool>,
    ) -> io::Result<VolumeRecord> {
        let mut wait = Duration::from_millis(50);
        loop {
            let written = self.store.update(&self.volume_id, &mut |r| {
                self.still_claimed(r)?;
                change(r)
            });
            match written {
                Ok(Some(record)) => return Ok(record),
                Ok(None) => {
                    return Err(io::Error::other(format!(
                        "volume {} is gone",
                        self.volume_id
                    )));
                }
                Err(e) if matches!(e.kind, ErrorKind::Unavailable | ErrorKind::Aborted) => {
                    warn!(volume_id = %self.volume_id, error = %e.report(), "cannot {what} yet; the write waits");
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(2));
                    self.admit()?;
                }
                Err(e) => {
                    return Err(io::Error::other(format!("cannot {what}: {}", e.report())));
                }
            }
        }
    }

    /// Unlists from replica `index`'s record the extents catch-up has
    /// copied in full and nothing has written since, so an interrupted
    /// catch-up resumes where it was, on whichever node holds the volume
    /// next. Holds the dirty maps while the store is written: a write in
    /// such an extent meanwhile would find it listed and not list it again.
    pub(super) fn unlist_copied(&self, index: usize) -> io::Result<()> {
        let mut listed = self.lock_listed()?;
        let Some(Some(list)) = listed.get(&index) else {
            return Ok(());
        };
        let dirty = self.lock_dirty()?;
        let Some(map) = dirty.get(&index) else {
            return Ok(());
        };
        if list.copied(map).is_empty() {
            return Ok(());
        }
        let record = self
            .store
            .update(&self.volume_id, &mut |r| {
                self.still_claimed(r)?;
                Ok(r.unlist_copied(index, map))
            })
            .map_err(|e| {
                io::Error::other(format!("cannot record catch-up progress: {}", e.report()))
            })?;
        drop(dirty);
        listed.insert(index, record.and_then(|r| r.missed_of(index)));
        Ok(())
    }

    /// Starts keeping replica `index`'s list as `missed` (its record's).
    pub(super) fn keep_listing(&self, index: usize, missed: Option<ExtentList>) -> io::Result<()> {
        self.lock_listed()?.insert(index, missed);
        Ok(())
    }

    /// Stops listing for replica `index`, which rejoined.
    pub(super) fn stop_listing(&self, index: usize) {
        if let Ok(mut listed) = self.lock_listed() {
            listed.remove(&index);
        }
    }
}
