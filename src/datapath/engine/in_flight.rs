//! Writes in flight. Overlapping ones go out one after the other, so every
//! replica applies them in the same order and ends up the same. And the
//! volume's write log (`core::extent_list`) lists each extent before the
//! first write in it is sent and unlists it once idle: an engine killed
//! mid-write, or a node lost, leaves the next engine the list of where its
//! healthy replicas may differ, which it makes agree before serving.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{Engine, Slot};
use crate::core::extent_list::ExtentList;
use crate::datapath::replica::aligned::AlignedBuf;

/// An extent leaves the write log once it has had no write for this long:
/// long enough that a busy extent costs one store write, not one a sweep.
pub const IDLE: Duration = Duration::from_secs(5);

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

/// What a resync found.
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
        let new = match &self.in_flight.lock()?.log {
            Some(log) => log.to_list(offset, len, self.size.load(Ordering::SeqCst)),
            None => return Ok(()),
        };
        if new.is_empty() {
            return Ok(());
        }
        let record = self.record_before_write("list where writes are in flight", &mut |r| {
            Ok(r.log_writes(&new))
        })?;
        let mut state = self.in_flight.lock()?;
        let now = Instant::now();
        for &e in &new {
            state.busy.entry(e).or_insert((0, now));
        }
        state.log = record.writing;
        Ok(())
    }

    /// Unlists from the write log every extent with no write in flight and
    /// none for `idle`. A store that cannot be written now leaves them
    /// listed there: a later engine compares a little more.
    pub fn sweep_write_log(&self, idle: Duration) {
        let Ok(_serial) = self.in_flight.logging.lock() else {
            return;
        };
        let quiet: Vec<u64> = {
            let Ok(mut state) = self.in_flight.lock() else {
                return;
            };
            let State { log, busy, .. } = &mut *state;
            let Some(log) = log.as_mut() else {
                return;
            };
            let now = Instant::now();
            let quiet: Vec<u64> = log
                .extents
                .iter()
                .copied()
                .filter(|e| {
                    busy.get(e)
                        .is_none_or(|(n, last)| *n == 0 && now.duration_since(*last) >= idle)
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

    /// Makes the healthy replicas agree wherever the write log says the
    /// last engine may have had writes in flight, copying from one of them
    /// to the others where they differ, then unlists those extents. Run
    /// before the engine serves: until then a read could see either.
    pub fn resync_in_flight(&self) -> io::Result<Resync> {
        let runs = match &self.in_flight.lock()?.log {
            Some(log) => log.byte_runs(self.size.load(Ordering::SeqCst)),
            None => Vec::new(),
        };
        let mut done = Resync::default();
        if !runs.is_empty() {
            let before = self.faulted_count();
            done = self.resync_runs(&runs)?;
            // A replica that failed meanwhile may have been left different
            // there, so it has missed those extents.
            if self.faulted_count() > before {
                for &(start, len) in &runs {
                    self.mark_missed(start, len)?;
                }
            }
            info!(volume_id = %self.volume_id, compared = done.compared, rewritten = done.rewritten, "replicas agree where writes were in flight");
        }
        self.sweep_write_log(Duration::ZERO);
        Ok(done)
    }

    fn faulted_count(&self) -> usize {
        self.slots().len() - self.healthy_count()
    }

    fn resync_runs(&self, runs: &[(u64, u64)]) -> io::Result<Resync> {
        // A source that fails is faulted and the next one starts over.
        loop {
            let mut healthy = self.healthy_slots();
            if healthy.len() < 2 {
                return Ok(Resync::default());
            }
            // A local file reads fastest.
            healthy.sort_by_key(|s| s.io.direct_fd().is_none());
            let source = healthy.remove(0);
            match self.resync_from(&source, &healthy, runs)? {
                Some(done) => return Ok(done),
                None => continue,
            }
        }
    }

    /// `None`: `source` failed (and is faulted).
    fn resync_from(
        &self,
        source: &Arc<Slot>,
        targets: &[Arc<Slot>],
        runs: &[(u64, u64)],
    ) -> io::Result<Option<Resync>> {
        let mut done = Resync::default();
        let mut wrote = vec![false; targets.len()];
        for &(start, len) in runs {
            let mut at = start;
            while at < start + len {
                let n = RESYNC_CHUNK.min(start + len - at);
                let mut want = AlignedBuf::zeroed(n as usize);
                if let Err(e) = self.read_from(source, want.as_mut_slice(), at) {
                    self.fault(source, &format!("read failed during resync: {e}"))?;
                    return Ok(None);
                }
                let zero = want.as_slice().iter().all(|&b| b == 0);
                let mut have = AlignedBuf::zeroed(n as usize);
                for (t, target) in targets.iter().enumerate() {
                    if !target.healthy.load(Ordering::SeqCst) {
                        continue;
                    }
                    let same = self
                        .read_from(target, have.as_mut_slice(), at)
                        .map(|()| have.as_slice() == want.as_slice());
                    let fixed = match same {
                        Ok(true) => Ok(()),
                        Ok(false) => {
                            self.admit()?;
                            done.rewritten += n;
                            wrote[t] = true;
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
                done.compared += n;
                at += n;
            }
        }
        for (target, _) in targets.iter().zip(&wrote).filter(|(_, w)| **w) {
            if let Err(e) = target.io.flush() {
                self.fault(target, &format!("flush failed during resync: {e}"))?;
            }
        }
        Ok(Some(done))
    }
}
