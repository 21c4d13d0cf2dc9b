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
//!
//! This module is the write path (and reads); what happens around a fault
//! lives beside it: `faults` records one, `missed` keeps what faulted
//! replicas missed, `catch_up` brings them back, `replace` moves lost ones
//! to another pool, and `maintain` runs those rounds for the processes that
//! host an engine.

#[forbid(unsafe_code)]
pub mod assemble;
#[forbid(unsafe_code)]
mod catch_up;
#[forbid(unsafe_code)]
mod faults;
pub mod gate;
#[forbid(unsafe_code)]
pub mod in_flight;
#[forbid(unsafe_code)]
mod maintain;
#[forbid(unsafe_code)]
mod missed;
#[forbid(unsafe_code)]
pub mod ready;
#[forbid(unsafe_code)]
mod replace;
#[forbid(unsafe_code)]
pub mod workers;

use crate::core::extent_list::ExtentList;
use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use tracing::warn;

use crate::core::dirty::{DEFAULT_REGION, DirtyMap};
use crate::core::volume::StagedOn;

use crate::core::pool::ReplicaIo;
use crate::core::store::StateStore;
use crate::datapath::dirty_maps::VolumeDirtyMaps;
use crate::datapath::frontend::{BlockDevice, DirectRead};
use crate::datapath::replica::aligned::{ALIGN, AlignedBuf, is_aligned};
use workers::Workers;

struct Slot {
    index: usize,
    io: Box<dyn ReplicaIo>,
    healthy: AtomicBool,
    /// Moving average of read latency, for choosing where reads go.
    read_latency_ns: AtomicU64,
}

/// Writes to a region hold its stripe shared; catch-up holds it exclusive.
const STRIPES: usize = 256;

/// Reads of one such region go to the same replica (see `read_order`).
const READ_REGION: u64 = 1 << 20;

pub struct Engine {
    volume_id: String,
    size: AtomicU64,
    /// Replaced wholesale when a lost replica moves to another pool.
    slots: RwLock<Vec<Arc<Slot>>>,
    store: Arc<dyn StateStore>,
    min_healthy: usize,
    /// Serialises fault recording so each fault is persisted exactly once.
    fault_lock: Mutex<()>,
    workers: Workers,
    /// What each faulted replica (by replica index) has missed.
    dirty: Mutex<BTreeMap<usize, DirtyMap>>,
    /// What the record lists each faulted replica as having missed (`None`:
    /// the record keeps no list for it), so only new extents cost a store
    /// write (`core::extent_list`).
    listed: Mutex<BTreeMap<usize, Option<ExtentList>>>,
    /// Where dirty maps are persisted; `None` keeps them in memory only
    /// (tests).
    dirty_files: Option<VolumeDirtyMaps>,
    stripes: Vec<RwLock<()>>,
    /// Writes hold it shared; a replica rejoining holds it exclusive.
    membership: RwLock<()>,
    /// When each currently faulted replica (by index) was faulted.
    faulted_since: Mutex<BTreeMap<usize, Instant>>,
    rebuild: RebuildPolicy,
    stats: Arc<crate::core::metrics::IoStats>,
    claim: Option<StagedOn>,
    gate: Option<Arc<gate::WriteGate>>,
    /// Where the next read check of a passthrough replica goes on
    /// (`check_replicas`).
    read_check_at: AtomicU64,
    /// Writes in flight, and the write log (`in_flight`).
    in_flight: in_flight::InFlight,
    /// Some extents' healthy replicas may disagree yet (`in_flight`): a
    /// read checks which replica it must come from.
    unsynced: AtomicBool,
}

/// Finds a new home for lost replica `index`: creates it (empty) on some
/// eligible pool, records the move, and returns it opened.
pub type Replacer = Box<dyn Fn(usize) -> io::Result<Box<dyn ReplicaIo>> + Send + Sync>;

pub struct EngineOptions {
    /// Writes fail (EIO) below this many healthy replicas.
    pub min_healthy: usize,
    /// Threads that run replica I/O in parallel.
    pub worker_threads: usize,
    /// The dir this volume's dirty maps are persisted in (made already);
    /// `None` keeps them in memory (tests).
    pub dirty_dir: Option<PathBuf>,
    pub rebuild: RebuildPolicy,
    /// The staging claim this engine serves under. Replica health is only
    /// recorded while the record still names it: an engine whose node lost
    /// the volume cannot fault the new holder's replicas and go on writing
    /// without them. `None`: unchecked (tests).
    pub claim: Option<StagedOn>,
    /// Writes wait at it while the node's lease is unconfirmed (see
    /// `gate`); `None`: one node only, nobody can take the volume over.
    pub gate: Option<Arc<gate::WriteGate>>,
    /// The volume's write log as this engine resumes it (its record's);
    /// `None`: none is kept (tests).
    pub write_log: Option<ExtentList>,
}

pub struct RebuildPolicy {
    /// A faulted replica unreachable for this long is replaced.
    pub replace_after: std::time::Duration,
    /// Copy bandwidth for catch-up and rebuild, bytes per second; 0: unlimited.
    pub bytes_per_sec: u64,
    pub replacer: Option<Replacer>,
}

impl Default for RebuildPolicy {
    fn default() -> Self {
        RebuildPolicy {
            replace_after: std::time::Duration::from_secs(300),
            bytes_per_sec: 0,
            replacer: None,
        }
    }
}

pub struct EngineReplica {
    pub index: usize,
    pub io: Box<dyn ReplicaIo>,
    /// `Some(map)`: the replica is faulted and has missed `map`'s regions.
    pub missed: Option<DirtyMap>,
    /// For a faulted replica: since when (the replacement grace period
    /// counts from here); `None` means now.
    pub faulted_since: Option<Instant>,
    /// For a faulted replica: what its record lists as missed, if it keeps
    /// a list (`ReplicaRecord::missed`).
    pub listed: Option<ExtentList>,
}

impl Engine {
    pub fn new(
        volume_id: &str,
        size: u64,
        replicas: Vec<EngineReplica>,
        store: Arc<dyn StateStore>,
        opts: EngineOptions,
    ) -> io::Result<Engine> {
        let EngineOptions {
            min_healthy,
            worker_threads,
            dirty_dir,
            rebuild,
            claim,
            gate,
            write_log,
        } = opts;
        let mut dirty = BTreeMap::new();
        let mut listed = BTreeMap::new();
        let mut faulted_since = BTreeMap::new();
        let slots = replicas
            .into_iter()
            .map(|r| {
                let healthy = r.missed.is_none();
                if let Some(map) = r.missed {
                    dirty.insert(r.index, map);
                    listed.insert(r.index, r.listed);
                    faulted_since.insert(r.index, r.faulted_since.unwrap_or_else(Instant::now));
                }
                Arc::new(Slot {
                    index: r.index,
                    io: r.io,
                    healthy: AtomicBool::new(healthy),
                    read_latency_ns: AtomicU64::new(0),
                })
            })
            .collect();
        Ok(Engine {
            slots: RwLock::new(slots),
            faulted_since: Mutex::new(faulted_since),
            rebuild,
            dirty: Mutex::new(dirty),
            listed: Mutex::new(listed),
            dirty_files: dirty_dir.map(VolumeDirtyMaps::in_dir),
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            membership: RwLock::new(()),
            volume_id: volume_id.to_string(),
            size: AtomicU64::new(size),
            store,
            min_healthy: min_healthy.max(1),
            fault_lock: Mutex::new(()),
            workers: Workers::new("replica-io", worker_threads)?,
            stats: Default::default(),
            claim,
            gate,
            read_check_at: AtomicU64::new(0),
            in_flight: in_flight::InFlight::new(write_log),
            unsynced: AtomicBool::new(false),
        })
    }

    /// The volume's I/O counters so far.
    pub fn io_stats(&self) -> crate::core::metrics::IoSnapshot {
        self.stats.snapshot()
    }

    pub fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::SeqCst);
        if let Ok(mut dirty) = self.dirty.lock() {
            for map in dirty.values_mut() {
                map.resize(size);
            }
        }
    }

    fn slots(&self) -> Vec<Arc<Slot>> {
        self.slots.read().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn healthy_count(&self) -> usize {
        self.slots()
            .iter()
            .filter(|s| s.healthy.load(Ordering::SeqCst))
            .count()
    }

    fn healthy_slots(&self) -> Vec<Arc<Slot>> {
        self.slots()
            .into_iter()
            .filter(|s| s.healthy.load(Ordering::SeqCst))
            .collect()
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
        let mut unrecorded = None;
        // Every answer before returning, even when a fault cannot be
        // recorded: the write counts as in flight until none is pending.
        for (slot, result) in rx.iter().take(slots.len()) {
            match result {
                Ok(()) => ok += 1,
                Err(e) => {
                    warn!(volume_id = %self.volume_id, replica = slot.index, op = what, error = %e, "replica I/O failed");
                    if let Err(f) = self.fault(&slot, &format!("{what} failed: {e}")) {
                        unrecorded.get_or_insert(f);
                    }
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(f) = unrecorded {
            return Err(f);
        }
        if ok >= self.min_healthy {
            Ok(())
        } else {
            Err(first_error.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EIO)))
        }
    }

    fn stripe_range(&self, offset: u64, len: u64) -> Vec<usize> {
        if len == 0 {
            return Vec::new();
        }
        let first = offset / DEFAULT_REGION;
        let last = (offset + len - 1) / DEFAULT_REGION;
        let mut s: Vec<usize> = (first..=last.min(first + STRIPES as u64 - 1))
            .map(|r| (r % STRIPES as u64) as usize)
            .collect();
        s.sort_unstable();
        s.dedup();
        s
    }

    /// Runs a data-changing operation the way every write must: stripes
    /// shared, fanned out, and recorded in the dirty maps before returning.
    fn mutate(
        &self,
        what: &'static str,
        offset: u64,
        len: u64,
        op: impl Fn(&dyn ReplicaIo) -> io::Result<()> + Send + Sync + 'static,
    ) -> io::Result<()> {
        let _member = self
            .membership
            .read()
            .map_err(|_| io::Error::other("membership lock poisoned"))?;
        let stripes = self.stripe_range(offset, len);
        let _guards: Vec<_> = stripes
            .iter()
            .map(|&i| self.stripes[i].read())
            .collect::<Result<_, _>>()
            .map_err(|_| io::Error::other("stripe lock poisoned"))?;
        let _writing = self.begin_write(offset, len)?;
        // After any wait for overlapping writes, right before it goes out.
        self.admit()?;
        // Write-ahead for replicas already faulted: should this node die
        // mid-write, the others may hold what the faulted ones lack, and
        // whoever catches them up must know where.
        self.mark_missed(offset, len)?;
        let result = self.fan_out(what, op);
        // Again for replicas that faulted during this write; marked even
        // when the operation failed: some replicas may have it.
        self.mark_missed(offset, len)?;
        result
    }

    /// Waits until this engine may write (see `gate`).
    fn admit(&self) -> io::Result<()> {
        match &self.gate {
            Some(g) => g.admit(&self.volume_id),
            None => Ok(()),
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
        slot.note_read_latency(start.elapsed());
        Ok(())
    }
}

impl Slot {
    fn note_read_latency(&self, took: std::time::Duration) {
        let took = took.as_nanos() as u64;
        let old = self.read_latency_ns.load(Ordering::Relaxed);
        self.read_latency_ns
            .store(old - old / 8 + took / 8, Ordering::Relaxed);
    }
}

/// A read of one replica's file done by the frontend itself.
struct ReplicaRead {
    slot: Arc<Slot>,
    fd: std::os::fd::RawFd,
    len: usize,
    started: Instant,
    stats: Arc<crate::core::metrics::IoStats>,
}

impl DirectRead for ReplicaRead {
    fn fd(&self) -> std::os::fd::RawFd {
        self.fd
    }

    fn done(self: Box<Self>) {
        let took = self.started.elapsed();
        self.slot.note_read_latency(took);
        self.stats
            .record(crate::core::metrics::Op::Read, self.len, took, true);
    }
}

impl Engine {
    /// The replica the kernel reads and writes itself when the volume's
    /// opens are passthrough (`BlockDevice::passthrough_fd`): its only one,
    /// healthy and a local file.
    fn passthrough_slot(&self) -> Option<Arc<Slot>> {
        let slots = self.slots();
        let [only] = slots.as_slice() else {
            return None;
        };
        (only.healthy.load(Ordering::SeqCst) && only.io.direct_fd().is_some()).then(|| only.clone())
    }

    /// Healthy replicas in the order to try a read at `offset` on: fastest
    /// first; among equals, each region of the volume is read from one
    /// replica, so regions spread over the replicas while each replica's
    /// share stays in its disk's caches (which a per-request rotation
    /// would triple).
    fn read_order(&self, offset: u64, len: u64) -> Vec<Arc<Slot>> {
        let mut slots = self.healthy_slots();
        if let Some(source) = self.unsynced_source(offset, len) {
            // The others may hold another version there until resynced.
            slots.retain(|s| s.index == source);
            return slots;
        }
        let spin = (offset / READ_REGION) as usize;
        if !slots.is_empty() {
            let n = slots.len();
            slots.rotate_left(spin % n);
        }
        slots.sort_by_key(|s| s.read_latency_ns.load(Ordering::Relaxed) / 200_000);
        slots
    }

    fn read_replicas(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, buf.len())?;
        let mut last = io::Error::from_raw_os_error(libc::EIO);
        let mut order = self.read_order(offset, buf.len() as u64);
        let mut failed = Vec::new();
        while let Some(slot) = order.first().cloned() {
            match self.read_from(&slot, buf, offset) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    warn!(volume_id = %self.volume_id, replica = slot.index, error = %e, "replica read failed");
                    self.fault(&slot, &format!("read failed: {e}"))?;
                    failed.push(slot.index);
                    last = e;
                }
            }
            // Asked again: a fault may have moved where this read must go.
            order = self.read_order(offset, buf.len() as u64);
            order.retain(|s| !failed.contains(&s.index));
        }
        Err(last)
    }

    fn write_replicas(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, buf.len())?;
        let data = Arc::new(AlignedBuf::copy_of(buf));
        self.mutate("write", offset, buf.len() as u64, move |io| {
            io.write_at(data.as_slice(), offset)
        })
    }
}

impl BlockDevice for Engine {
    fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let started = Instant::now();
        let result = self.read_replicas(buf, offset);
        let (len, ok) = (buf.len(), result.is_ok());
        self.stats
            .record(crate::core::metrics::Op::Read, len, started.elapsed(), ok);
        result
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let started = Instant::now();
        let result = self.write_replicas(buf, offset);
        let ok = result.is_ok();
        self.stats.record(
            crate::core::metrics::Op::Write,
            buf.len(),
            started.elapsed(),
            ok,
        );
        result
    }

    fn flush(&self) -> io::Result<()> {
        let started = Instant::now();
        let result = self.fan_out("flush", |io| io.flush());
        let ok = result.is_ok();
        if ok {
            self.note_flushed(started);
        }
        self.stats
            .record(crate::core::metrics::Op::Flush, 0, started.elapsed(), ok);
        result
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let len = len.min(self.size().saturating_sub(offset));
        self.mutate("discard", offset, len, move |io| io.discard(offset, len))
    }

    /// The replica `read_at` would try first, when it is a local file
    /// open O_DIRECT; any other replica needs the engine's own I/O.
    fn direct_read(&self, offset: u64, len: usize) -> Option<Box<dyn DirectRead>> {
        self.check_range(offset, len).ok()?;
        if !len.is_multiple_of(ALIGN) || !offset.is_multiple_of(ALIGN as u64) {
            return None;
        }
        let slot = self.read_order(offset, len as u64).into_iter().next()?;
        let fd = slot.io.direct_fd()?;
        Some(Box::new(ReplicaRead {
            slot,
            fd,
            len,
            started: Instant::now(),
            stats: self.stats.clone(),
        }))
    }

    /// Only a volume of exactly one replica, local and healthy: with more,
    /// every write must reach each of them through us, and a volume whose
    /// replica is remote has no file here.
    fn passthrough_fd(&self) -> Option<std::os::fd::OwnedFd> {
        let only = self.passthrough_slot()?;
        let fd = only.io.direct_fd()?;
        // SAFETY: `fd` belongs to the replica `only` keeps open for the
        // whole call; the duplicate shares its open file (and O_DIRECT).
        let dup = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }.try_clone_to_owned();
        dup.map_err(
            |e| warn!(volume_id = %self.volume_id, error = %e, "cannot duplicate the replica's fd"),
        )
        .ok()
    }
}

#[cfg(test)]
mod tests;
