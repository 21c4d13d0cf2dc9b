//! The engine: one volume's replicas assembled into one block device.
//!
//! Write path, for every write the frontend hands us:
//! 1. copy the payload once into a page-aligned buffer shared by all replicas;
//! 2. send it to every healthy replica in parallel (the caller's thread does one);
//! 3. for every replica that failed: record it as faulted in the state store
//!    (fsynced) and only then stop using it;
//! 4. acknowledge when at least `min_healthy` replicas — and every replica not
//!    recorded as faulted — have the data.
//!
//! **Invariant:** a write is acknowledged only if every replica that did not
//! get it is already recorded faulted with a generation, so a stale replica
//! can never be taken for a current one.
//!
//! Hot path: `read_at`/`write_at` run per I/O; `info!` never fires here except
//! on a replica fault.

pub mod process;
pub mod workers;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tracing::{error, warn};

use crate::frontend::BlockDevice;
use crate::replica::ReplicaIo;
use crate::replica::aligned::{AlignedBuf, is_aligned};
use crate::store::StateStore;
use workers::Workers;

/// Linux reclaim must not wait on the thread that completes its I/O.
pub fn mark_io_flusher() {
    // From linux/prctl.h; libc does not export it.
    const PR_SET_IO_FLUSHER: libc::c_int = 57;
    // SAFETY: prctl(PR_SET_IO_FLUSHER) takes integer arguments only and
    // changes a flag of the calling thread; failure (old kernel) is harmless.
    unsafe {
        libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0);
    }
}

struct Slot {
    index: usize,
    io: Box<dyn ReplicaIo>,
    healthy: AtomicBool,
    /// Moving average of read latency, for choosing where reads go.
    read_latency_ns: AtomicU64,
}

pub struct Engine {
    volume_id: String,
    size: AtomicU64,
    slots: Vec<Arc<Slot>>,
    store: Arc<dyn StateStore>,
    min_healthy: usize,
    /// Serialises fault recording so each fault is persisted exactly once.
    fault_lock: Mutex<()>,
    workers: Workers,
    next_read: AtomicUsize,
}

pub struct EngineReplica {
    pub index: usize,
    pub io: Box<dyn ReplicaIo>,
}

impl Engine {
    pub fn new(
        volume_id: &str,
        size: u64,
        replicas: Vec<EngineReplica>,
        min_healthy: usize,
        store: Arc<dyn StateStore>,
        worker_threads: usize,
    ) -> io::Result<Engine> {
        let slots = replicas
            .into_iter()
            .map(|r| {
                Arc::new(Slot {
                    index: r.index,
                    io: r.io,
                    healthy: AtomicBool::new(true),
                    read_latency_ns: AtomicU64::new(0),
                })
            })
            .collect();
        Ok(Engine {
            volume_id: volume_id.to_string(),
            size: AtomicU64::new(size),
            slots,
            store,
            min_healthy: min_healthy.max(1),
            fault_lock: Mutex::new(()),
            workers: Workers::new("replica-io", worker_threads)?,
            next_read: AtomicUsize::new(0),
        })
    }

    pub fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::SeqCst);
    }

    pub fn healthy_count(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.healthy.load(Ordering::SeqCst))
            .count()
    }

    fn healthy_slots(&self) -> Vec<Arc<Slot>> {
        self.slots
            .iter()
            .filter(|s| s.healthy.load(Ordering::SeqCst))
            .cloned()
            .collect()
    }

    /// Records replica `slot` as faulted in the state store, then stops
    /// using it. Err means the fault could not be persisted: the caller must
    /// not acknowledge anything that the replica missed.
    fn fault(&self, slot: &Slot, reason: &str) -> io::Result<()> {
        let _guard = self
            .fault_lock
            .lock()
            .map_err(|_| io::Error::other("fault lock poisoned"))?;
        if !slot.healthy.load(Ordering::SeqCst) {
            return Ok(());
        }
        let index = slot.index;
        let persisted = self
            .store
            .update(&self.volume_id, &mut |r| Ok(r.fault_replica(index, reason)));
        match persisted {
            Ok(_) => {
                slot.healthy.store(false, Ordering::SeqCst);
                error!(volume_id = %self.volume_id, replica = index, %reason, "replica faulted");
                Ok(())
            }
            Err(e) => {
                error!(volume_id = %self.volume_id, replica = index, error = %e, "cannot record replica fault");
                Err(io::Error::other(format!("cannot record fault: {e}")))
            }
        }
    }

    /// Runs `op` on every healthy replica at once, faults the ones that
    /// fail, and decides whether the operation as a whole succeeded.
    fn fan_out(
        &self,
        what: &'static str,
        op: impl Fn(&dyn ReplicaIo) -> io::Result<()> + Send + Sync + 'static,
    ) -> io::Result<()> {
        let slots = self.healthy_slots();
        if slots.is_empty() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let op = Arc::new(op);
        let (tx, rx) = crossbeam_channel::bounded(slots.len());
        for slot in slots.iter().skip(1) {
            let slot = slot.clone();
            let op = op.clone();
            let tx = tx.clone();
            self.workers.run(move || {
                let result = op(slot.io.as_ref());
                let _ = tx.send((slot, result));
            });
        }
        let first = slots[0].clone();
        let result = op(first.io.as_ref());
        let _ = tx.send((first, result));
        drop(tx);

        let mut ok = 0usize;
        let mut first_error = None;
        for (slot, result) in rx.iter().take(slots.len()) {
            match result {
                Ok(()) => ok += 1,
                Err(e) => {
                    warn!(volume_id = %self.volume_id, replica = slot.index, op = what, error = %e, "replica I/O failed");
                    self.fault(&slot, &format!("{what} failed: {e}"))?;
                    first_error.get_or_insert(e);
                }
            }
        }
        if ok >= self.min_healthy {
            Ok(())
        } else {
            Err(first_error.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EIO)))
        }
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

    fn check_range(&self, offset: u64, len: usize) -> io::Result<()> {
        let end = offset
            .checked_add(len as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        if end > self.size.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(())
    }

    fn read_from(&self, slot: &Slot, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = Instant::now();
        if is_aligned(buf.as_ptr(), buf.len(), offset) {
            slot.io.read_at(buf, offset)?;
        } else {
            let mut bounce = AlignedBuf::zeroed(buf.len());
            slot.io.read_at(bounce.as_mut_slice(), offset)?;
            buf.copy_from_slice(bounce.as_slice());
        }
        let took = start.elapsed().as_nanos() as u64;
        let old = slot.read_latency_ns.load(Ordering::Relaxed);
        slot.read_latency_ns
            .store(old - old / 8 + took / 8, Ordering::Relaxed);
        Ok(())
    }
}

impl BlockDevice for Engine {
    fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, buf.len())?;
        let mut slots = self.healthy_slots();
        // Fastest replica first; rotate among equals so load spreads.
        let spin = self.next_read.fetch_add(1, Ordering::Relaxed);
        if !slots.is_empty() {
            let n = slots.len();
            slots.rotate_left(spin % n);
        }
        slots.sort_by_key(|s| s.read_latency_ns.load(Ordering::Relaxed) / 200_000);
        let mut last = io::Error::from_raw_os_error(libc::EIO);
        for slot in slots {
            match self.read_from(&slot, buf, offset) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    warn!(volume_id = %self.volume_id, replica = slot.index, error = %e, "replica read failed");
                    self.fault(&slot, &format!("read failed: {e}"))?;
                    last = e;
                }
            }
        }
        Err(last)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, buf.len())?;
        let data = Arc::new(AlignedBuf::copy_of(buf));
        self.fan_out("write", move |io| io.write_at(data.as_slice(), offset))
    }

    fn flush(&self) -> io::Result<()> {
        self.fan_out("flush", |io| io.flush())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let len = len.min(self.size().saturating_sub(offset));
        self.fan_out("discard", move |io| io.discard(offset, len))
    }
}

#[cfg(test)]
mod tests;
