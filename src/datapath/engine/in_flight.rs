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

    /// Takes over what the write log lists, before serving: faulted
    /// replicas count those extents as missed (writes in flight may have
    /// reached the others there), and with two healthy replicas or more,
    /// reads of them go to one replica only until `resync_step` has made
    /// the others agree.
    pub fn start_resync(&self) -> io::Result<()> {
        let runs = {
            let mut state = self.in_flight.lock()?;
            let Some(log) = state.log.clone() else {
                return Ok(());
            };
            if log.extents.is_empty() {
                return Ok(());
            }
            let mut healthy = self.healthy_slots();
            if healthy.len() >= 2 {
                // A local file reads fastest.
                healthy.sort_by_key(|s| s.io.direct_fd().is_none());
                state.unsynced = Some(Unsynced {
                    source: healthy[0].index,
                    extents: log.extents.clone(),
                });
                self.unsynced.store(true, Ordering::SeqCst);
            }
            log.byte_runs(self.size.load(Ordering::SeqCst))
        };
        if self.faulted_count() > 0 {
            for (start, len) in runs {
                self.mark_missed(start, len)?;
            }
        }
        Ok(())
    }

    /// After replica faults while extents are not agreed on yet: the
    /// faulted ones have missed those extents.
    pub(super) fn mark_unsynced_missed(&self) -> io::Result<()> {
        if !self.unsynced.load(Ordering::SeqCst) {
            return Ok(());
        }
        let runs = self
            .in_flight
            .lock()?
            .unsynced_runs(self.size.load(Ordering::SeqCst));
        for (start, len) in runs {
            self.mark_missed(start, len)?;
        }
        Ok(())
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
        if !self.unsynced.load(Ordering::SeqCst) {
            return done;
        }
        let started = Instant::now();
        while started.elapsed() < RESYNC_STEP {
            let next = match self.in_flight.lock() {
                Ok(state) => match (&state.log, &state.unsynced) {
                    (Some(log), Some(u)) => {
                        u.extents.first().map(|&e| (e, u.source, log.extent_bytes))
                    }
                    _ => None,
                },
                Err(_) => return done,
            };
            let Some((extent, source, extent_bytes)) = next else {
                self.finish_resync();
                break;
            };
            match self.resync_extent(extent, extent_bytes, source, &mut done) {
                Ok(true) => {
                    if let Ok(mut state) = self.in_flight.lock()
                        && let Some(u) = state.unsynced.as_mut()
                    {
                        u.extents.remove(&extent);
                    }
                }
                // The source failed (and is faulted): another one, from
                // the start, or nothing left to compare.
                Ok(false) => self.new_resync_source(),
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

    fn finish_resync(&self) {
        if let Ok(mut state) = self.in_flight.lock() {
            state.unsynced = None;
        }
        self.unsynced.store(false, Ordering::SeqCst);
    }

    fn new_resync_source(&self) {
        let mut healthy = self.healthy_slots();
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

    fn faulted_count(&self) -> usize {
        self.slots().len() - self.healthy_count()
    }

    /// `Ok(false)`: the source failed (and is faulted).
    fn resync_extent(
        &self,
        extent: u64,
        extent_bytes: u64,
        source: usize,
        done: &mut Resync,
    ) -> io::Result<bool> {
        let size = self.size.load(Ordering::SeqCst);
        let start = extent.saturating_mul(extent_bytes).min(size);
        let end = start.saturating_add(extent_bytes).min(size);
        let mut at = start;
        while at < end {
            let n = RESYNC_CHUNK.min(end - at);
            let healthy = self.healthy_slots();
            let Some(src) = healthy.iter().find(|s| s.index == source).cloned() else {
                return Ok(false);
            };
            let targets: Vec<Arc<Slot>> =
                healthy.into_iter().filter(|s| s.index != source).collect();
            {
                // Writes to this region wait; a write after this copy
                // reaches every replica anyway.
                let _stripe = self.stripes[((at / RESYNC_CHUNK) % super::STRIPES as u64) as usize]
                    .write()
                    .map_err(|_| io::Error::other("stripe lock poisoned"))?;
                if !self.resync_chunk(&src, &targets, at, n, done)? {
                    return Ok(false);
                }
            }
            done.compared += n;
            at += n;
        }
        // Agreed only once durable on each of them.
        for slot in self.healthy_slots() {
            if let Err(e) = slot.io.flush() {
                self.fault(&slot, &format!("flush failed during resync: {e}"))?;
            }
        }
        Ok(self.healthy_slots().iter().any(|s| s.index == source))
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
