//! Writes in flight. Overlapping ones go out one after the other, so every
//! replica applies them in the same order and ends up the same. And the
//! volume's write log (`core::extent_list`) lists each extent before the
//! first write in it is sent and unlists it once idle: an engine killed
//! mid-write, or a node lost, leaves the next engine the list of where its
//! healthy replicas may differ. That engine reads those extents from one
//! replica only until it has made the others agree there (`resync_step`,
//! in the background, region by region under the stripe locks).

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{Engine, Slot};
use crate::core::extent_list::ExtentList;
use crate::datapath::replica::aligned::AlignedBuf;

/// An extent leaves the write log once it has had no write for this long
/// (and a flush since): long enough that an extent in use (a journal that
/// commits every 5 s) costs one store write, not one every few seconds.
pub const IDLE: Duration = Duration::from_secs(30);

/// How long one maintenance round may spend resynchronising.
const RESYNC_STEP: Duration = Duration::from_secs(5);

/// How much of the replicas a resync compares at a time.
const RESYNC_CHUNK: u64 = 1 << 20;

#[derive(Default)]
pub(super) struct InFlight {
    state: Mutex<State>,
    ended: Condvar,
    /// Serialises the store writes that list and unlist extents, so the
    /// log in `state` never names an extent the record does not.
    logging: Mutex<()>,
}

#[derive(Default)]
struct State {
    /// `[start, end)` of each write in flight.
    writes: Vec<(u64, u64)>,
    /// What the record's write log lists, or less; `None`: no log is kept
    /// (one replica cannot disagree with itself).
    log: Option<ExtentList>,
    /// Per extent listed by this engine: its writes in flight, and when
    /// the last one ended (or it was listed).
    busy: BTreeMap<u64, (usize, Instant)>,
    /// When the last flush that reached the replicas began: writes that
    /// ended before it are durable on each of them.
    flushed: Option<Instant>,
    /// Extents the last engine left listed that the healthy replicas do not
    /// agree on yet, and the replica reads of them go to meanwhile.
    unsynced: Option<Unsynced>,
}

struct Unsynced {
    source: usize,
    extents: std::collections::BTreeSet<u64>,
    /// How far into the first of `extents` the replicas agree.
    done_to: Option<u64>,
}

impl InFlight {
    pub(super) fn new(log: Option<ExtentList>) -> InFlight {
        InFlight {
            state: Mutex::new(State {
                log,
                ..State::default()
            }),
            ..InFlight::default()
        }
    }

    fn lock(&self) -> io::Result<MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| io::Error::other("in-flight lock poisoned"))
    }
}

impl State {
    /// The byte ranges of the extents not agreed on yet.
    fn unsynced_runs(&self, capacity: u64) -> Vec<(u64, u64)> {
        match (&self.log, &self.unsynced) {
            (Some(log), Some(u)) => ExtentList {
                extents: u.extents.clone(),
                ..log.clone()
            }
            .byte_runs(capacity),
            _ => Vec::new(),
        }
    }

    fn touched(&self, start: u64, end: u64) -> std::ops::Range<u64> {
        match &self.log {
            Some(log) if end > start && log.extent_bytes > 0 => {
                start / log.extent_bytes..(end - 1) / log.extent_bytes + 1
            }
            _ => 0..0,
        }
    }
}

/// A write in flight; dropping it ends it.
pub(super) struct Writing<'a> {
    in_flight: &'a InFlight,
    range: (u64, u64),
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        let (start, end) = self.range;
        if start == end {
            return;
        }
        // A poisoned lock has no waiter left to wake.
        let Ok(mut state) = self.in_flight.state.lock() else {
            return;
        };
        if let Some(at) = state.writes.iter().position(|&r| r == self.range) {
            state.writes.swap_remove(at);
        }
        let now = Instant::now();
        for e in state.touched(start, end) {
            if let Some((n, last)) = state.busy.get_mut(&e) {
                *n = n.saturating_sub(1);
                *last = now;
            }
        }
        drop(state);
        self.in_flight.ended.notify_all();
    }
}

/// What a resync has done so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Resync {
    /// Bytes compared on every healthy replica.
    pub compared: u64,
    /// Bytes rewritten on some replica because it differed from the source.
    pub rewritten: u64,
}

impl Engine {
    /// Starts a write of `[offset, offset+len)`: waits for overlapping
    /// writes in flight to end, then lists its extents in the write log
    /// (a store write, only for extents not listed yet).
    pub(super) fn begin_write(&self, offset: u64, len: u64) -> io::Result<Writing<'_>> {
        let range = (offset, offset.saturating_add(len));
        if len == 0 {
            return Ok(Writing {
                in_flight: &self.in_flight,
                range: (offset, offset),
            });
        }
        let must_list = {
            let mut state = self.in_flight.lock()?;
            while state
                .writes
                .iter()
                .any(|&(s, e)| s < range.1 && range.0 < e)
            {
                state = self
                    .in_flight
                    .ended
                    .wait(state)
                    .map_err(|_| io::Error::other("in-flight lock poisoned"))?;
            }
            state.writes.push(range);
            let now = Instant::now();
            for e in state.touched(range.0, range.1) {
                state.busy.entry(e).or_insert((0, now)).0 += 1;
            }
            state
                .log
                .as_ref()
                .is_some_and(|log| !log.unlisted(offset, len).is_empty())
        };
        let writing = Writing {
            in_flight: &self.in_flight,
            range,
        };
        if must_list {
            self.log_writes(offset, len)?;
        }
        Ok(writing)
    }

    fn log_writes(&self, offset: u64, len: u64) -> io::Result<()> {
        let _serial = self
            .in_flight
            .logging
            .lock()
            .map_err(|_| io::Error::other("write-log lock poisoned"))?;
        // Another write may have listed them meanwhile.
        let (new, extent_bytes) = match &self.in_flight.lock()?.log {
            Some(log) => (
                log.to_list(offset, len, self.size.load(Ordering::SeqCst)),
                log.extent_bytes,
            ),
            None => return Ok(()),
        };
        if new.is_empty() {
            return Ok(());
        }
        let record = self.record_before_write("list where writes are in flight", &mut |r| {
            Ok(r.log_writes(extent_bytes, &new))
        })?;
        let mut state = self.in_flight.lock()?;
        let now = Instant::now();
        for &e in &new {
            state.busy.entry(e).or_insert((0, now));
        }
        // The record's log, in this engine's extents (`log_writes` keeps
        // them): it may list more than this engine knew, never less.
        if let Some(log) = record.writing.filter(|l| l.extent_bytes == extent_bytes) {
            state.log = Some(log);
        }
        Ok(())
    }

    /// A flush that began at `started` reached every healthy replica.
    pub(super) fn note_flushed(&self, started: Instant) {
        if let Ok(mut state) = self.in_flight.lock() {
            state.flushed = Some(state.flushed.map_or(started, |f| f.max(started)));
        }
    }

    /// Unlists from the write log every extent with no write in flight,
    /// none for `idle`, a flush since its last one, and its replicas agreed
    /// on. A store that cannot be written now leaves them listed there: a
    /// later engine compares a little more.
    pub fn sweep_write_log(&self, idle: Duration) {
        let Ok(_serial) = self.in_flight.logging.lock() else {
            return;
        };
        let quiet: Vec<u64> = {
            let Ok(mut state) = self.in_flight.lock() else {
                return;
            };
            let State {
                log,
                busy,
                flushed,
                unsynced,
                ..
            } = &mut *state;
            let Some(log) = log.as_mut() else {
                return;
            };
            let now = Instant::now();
            let quiet: Vec<u64> = log
                .extents
                .iter()
                .copied()
                .filter(|e| !unsynced.as_ref().is_some_and(|u| u.extents.contains(e)))
                .filter(|e| {
                    busy.get(e).is_none_or(|(n, last)| {
                        *n == 0
                            && now.duration_since(*last) >= idle
                            && flushed.is_some_and(|f| f >= *last)
                    })
                })
                .collect();
            // Unlisted here first: a write from now on lists it again, and
            // waits for this sweep's store write to do so.
            log.unlist(&quiet);
            for e in &quiet {
                busy.remove(e);
            }
            quiet
        };
        if quiet.is_empty() {
            return;
        }
        let unlogged = self.store.update(&self.volume_id, &mut |r| {
            self.still_claimed(r)?;
            Ok(r.unlog_writes(&quiet))
        });
        if let Err(e) = unlogged {
            warn!(volume_id = %self.volume_id, error = %e.report(), "cannot unlist idle extents from the write log yet");
        }
    }

    /// Takes over what the write log lists, before serving (and before
    /// the fences, which may fault a replica): with two healthy replicas
    /// or more, reads of the listed extents go to one of them only until
    /// `resync_step` has made the others agree. Replicas already faulted
    /// are not concerned: the engine that faulted them listed what they
    /// missed before writing it.
    pub fn start_resync(&self) -> io::Result<()> {
        let mut state = self.in_flight.lock()?;
        let Some(log) = state.log.clone() else {
            return Ok(());
        };
        let mut healthy = self.healthy_slots();
        if log.extents.is_empty() || healthy.len() < 2 {
            return Ok(());
        }
        // A local file reads fastest.
        healthy.sort_by_key(|s| s.io.direct_fd().is_none());
        state.unsynced = Some(Unsynced {
            source: healthy[0].index,
            extents: log.extents.clone(),
            done_to: None,
        });
        self.unsynced.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Where the healthy replicas may disagree yet, as byte ranges.
    pub(super) fn unsynced_runs(&self) -> Vec<(u64, u64)> {
        if !self.unsynced.load(Ordering::SeqCst) {
            return Vec::new();
        }
        self.in_flight
            .lock()
            .map(|s| s.unsynced_runs(self.size.load(Ordering::SeqCst)))
            .unwrap_or_default()
    }

    /// Replica `index` is about to stop serving: if reads of extents not
    /// agreed on yet came from it, they come from another healthy replica
    /// from now on; with none left to disagree, the resync is over.
    pub(super) fn unsynced_source_lost(&self, index: usize) {
        if !self.unsynced.load(Ordering::SeqCst) {
            return;
        }
        let is_source = self
            .in_flight
            .lock()
            .is_ok_and(|s| s.unsynced.as_ref().is_some_and(|u| u.source == index));
        let others = self
            .healthy_slots()
            .into_iter()
            .filter(|s| s.index != index)
            .count();
        if is_source || others < 2 {
            self.new_resync_source(Some(index));
        }
    }

    /// The replica a read of `[offset, offset+len)` must come from while
    /// the healthy replicas may disagree there; `None`: any.
    pub(super) fn unsynced_source(&self, offset: u64, len: u64) -> Option<usize> {
        if !self.unsynced.load(Ordering::SeqCst) {
            return None;
        }
        let state = self.in_flight.lock().ok()?;
        let (log, u) = (state.log.as_ref()?, state.unsynced.as_ref()?);
        let end = offset.saturating_add(len.max(1));
        let first = offset / log.extent_bytes.max(1);
        let last = (end - 1) / log.extent_bytes.max(1);
        (first..=last)
            .any(|e| u.extents.contains(&e))
            .then_some(u.source)
    }

    /// Makes the healthy replicas agree on the extents the last engine
    /// left listed, for up to `RESYNC_STEP`: each 1 MiB region under its
    /// stripe lock, read from the source and rewritten where another
    /// differs; an extent is done once every replica is flushed after.
    /// Returns what this step did.
    pub fn resync_step(&self) -> Resync {
        let mut done = Resync::default();
        let started = Instant::now();
        while self.unsynced.load(Ordering::SeqCst) && started.elapsed() < RESYNC_STEP {
            let size = self.size.load(Ordering::SeqCst);
            let next = match self.in_flight.lock() {
                Ok(state) => match (&state.log, &state.unsynced) {
                    (Some(log), Some(u)) => u.extents.first().map(|&e| {
                        let start = e.saturating_mul(log.extent_bytes).min(size);
                        let end = start.saturating_add(log.extent_bytes).min(size);
                        (e, u.done_to.unwrap_or(start).max(start), end, u.source)
                    }),
                    _ => None,
                },
                Err(_) => return done,
            };
            let Some((extent, at, end, source)) = next else {
                self.finish_resync();
                break;
            };
            let step = if at < end {
                let n = RESYNC_CHUNK.min(end - at);
                self.resync_region(source, at, n, &mut done)
                    .map(|ok| ok.then_some(at + n))
            } else {
                self.flush_agreed().map(|()| Some(end))
            };
            match step {
                Ok(Some(to)) => {
                    if let Ok(mut state) = self.in_flight.lock()
                        && let Some(u) = state.unsynced.as_mut()
                    {
                        if at >= end {
                            u.extents.remove(&extent);
                            u.done_to = None;
                        } else {
                            u.done_to = Some(to);
                        }
                    }
                }
                // The source failed (and is faulted, another chosen).
                Ok(None) => {}
                Err(e) => {
                    warn!(volume_id = %self.volume_id, error = %e, "resync interrupted; will retry");
                    break;
                }
            }
        }
        if done.compared > 0 {
            info!(volume_id = %self.volume_id, compared = done.compared, rewritten = done.rewritten, "replicas agree where writes were in flight");
        }
        done
    }

    /// Agreed only once durable on each of them.
    fn flush_agreed(&self) -> io::Result<()> {
        for slot in self.healthy_slots() {
            if let Err(e) = slot.io.flush() {
                self.fault(&slot, &format!("flush failed during resync: {e}"))?;
            }
        }
        Ok(())
    }

    /// `Ok(false)`: the source failed (and is faulted).
    fn resync_region(&self, source: usize, at: u64, n: u64, done: &mut Resync) -> io::Result<bool> {
        let healthy = self.healthy_slots();
        let Some(src) = healthy.iter().find(|s| s.index == source).cloned() else {
            return Ok(false);
        };
        let targets: Vec<Arc<Slot>> = healthy.into_iter().filter(|s| s.index != source).collect();
        // Writes to this region wait; one after this copy reaches every
        // replica anyway.
        let _stripe = self.stripes[((at / RESYNC_CHUNK) % super::STRIPES as u64) as usize]
            .write()
            .map_err(|_| io::Error::other("stripe lock poisoned"))?;
        let ok = self.resync_chunk(&src, &targets, at, n, done)?;
        if ok {
            done.compared += n;
        }
        Ok(ok)
    }

    fn finish_resync(&self) {
        if let Ok(mut state) = self.in_flight.lock() {
            state.unsynced = None;
        }
        self.unsynced.store(false, Ordering::SeqCst);
    }

    /// Picks the replica reads of what is not agreed on come from, among
    /// the healthy ones but `except`.
    fn new_resync_source(&self, except: Option<usize>) {
        let mut healthy: Vec<Arc<Slot>> = self
            .healthy_slots()
            .into_iter()
            .filter(|s| Some(s.index) != except)
            .collect();
        if healthy.len() < 2 {
            // Nothing left to disagree with; the faulted ones were marked.
            self.finish_resync();
            return;
        }
        healthy.sort_by_key(|s| s.io.direct_fd().is_none());
        if let Ok(mut state) = self.in_flight.lock()
            && let Some(u) = state.unsynced.as_mut()
        {
            u.source = healthy[0].index;
        }
    }

    /// `Ok(false)`: the source failed (and is faulted).
    fn resync_chunk(
        &self,
        source: &Arc<Slot>,
        targets: &[Arc<Slot>],
        at: u64,
        n: u64,
        done: &mut Resync,
    ) -> io::Result<bool> {
        let mut want = AlignedBuf::zeroed(n as usize);
        if let Err(e) = self.read_from(source, want.as_mut_slice(), at) {
            self.fault(source, &format!("read failed during resync: {e}"))?;
            return Ok(false);
        }
        let zero = want.as_slice().iter().all(|&b| b == 0);
        let mut have = AlignedBuf::zeroed(n as usize);
        for target in targets {
            let same = self
                .read_from(target, have.as_mut_slice(), at)
                .map(|()| have.as_slice() == want.as_slice());
            let fixed = match same {
                Ok(true) => Ok(()),
                Ok(false) => {
                    self.admit()?;
                    done.rewritten += n;
                    if zero {
                        target.io.discard(at, n)
                    } else {
                        target.io.write_at(want.as_slice(), at)
                    }
                }
                Err(e) => Err(e),
            };
            if let Err(e) = fixed {
                self.fault(target, &format!("resync failed: {e}"))?;
            }
        }
        Ok(true)
    }
}
