//! The write gate: an engine submits a write to its replicas only while its
//! node's Lease says no other node may have taken the volume over (see
//! `core::lease`). Its role's checker renews the gate from each reading of
//! the Lease; a write that finds it lapsed waits for the next reading, and
//! fails only once the claim is known lost.
//!
//! Time is CLOCK_BOOTTIME: it goes on while the process is frozen (SIGSTOP)
//! and while the machine is suspended, so an engine that wakes up after
//! either finds its gate lapsed before it writes anything.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use nix::time::{ClockId, clock_gettime};
use tracing::warn;

use crate::core::error::Result;
use crate::core::lease::LeaseState;

/// Reads a node's liveness Lease (in a cluster, from the API server).
pub trait LeaseReader: Send + Sync {
    fn read(&self, node: &str) -> Result<LeaseState>;
}

/// How often a stalled write logs that it is still waiting.
const STALL_REPORT: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct WriteGate {
    /// CLOCK_BOOTTIME nanoseconds until which writes may be submitted.
    until_ns: AtomicU64,
    /// The claim is gone: nothing may be written, ever.
    lost: AtomicBool,
    changed: Mutex<()>,
    wake: Condvar,
}

fn boot_ns() -> u64 {
    // CLOCK_BOOTTIME exists on every kernel Terna supports; were it to
    // fail, 0 reads as "no time left", which only stalls writes.
    clock_gettime(ClockId::CLOCK_BOOTTIME)
        .map(|t| {
            (t.tv_sec() as u64)
                .saturating_mul(1_000_000_000)
                .saturating_add(t.tv_nsec() as u64)
        })
        .unwrap_or(0)
}

impl WriteGate {
    /// A closed gate: nothing is written until the first reading opens it.
    pub fn new() -> WriteGate {
        WriteGate::default()
    }

    /// The instant to measure a reading from: take it before reading.
    pub fn now(&self) -> u64 {
        boot_ns()
    }

    /// A reading begun at `read_at` (from `now`) allows writes for `span`
    /// more, `None` for no more. Replaces what earlier readings allowed:
    /// the newest reading is the truth, even when it allows less.
    pub fn allow(&self, read_at: u64, span: Option<Duration>) {
        let until = span.map_or(0, |s| {
            read_at.saturating_add(u64::try_from(s.as_nanos()).unwrap_or(u64::MAX))
        });
        self.until_ns.store(until, Ordering::SeqCst);
        let _guard = self.changed.lock();
        self.wake.notify_all();
    }

    /// The claim is gone: every waiting and later write fails.
    pub fn lose(&self) {
        self.lost.store(true, Ordering::SeqCst);
        self.until_ns.store(0, Ordering::SeqCst);
        let _guard = self.changed.lock();
        self.wake.notify_all();
    }

    /// How much longer writes may be submitted; zero once lapsed.
    pub fn remaining(&self) -> Duration {
        Duration::from_nanos(
            self.until_ns
                .load(Ordering::SeqCst)
                .saturating_sub(boot_ns()),
        )
    }

    /// Returns once a write may be submitted now; EIO once the claim is
    /// lost. Call it right before the replica I/O it guards.
    pub fn admit(&self, volume_id: &str) -> io::Result<()> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        if boot_ns() < self.until_ns.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut guard = self
            .changed
            .lock()
            .map_err(|_| io::Error::other("write gate poisoned"))?;
        let mut waited = Duration::ZERO;
        loop {
            if self.lost.load(Ordering::SeqCst) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            if boot_ns() < self.until_ns.load(Ordering::SeqCst) {
                return Ok(());
            }
            let (g, timeout) = self
                .wake
                .wait_timeout(guard, STALL_REPORT)
                .map_err(|_| io::Error::other("write gate poisoned"))?;
            guard = g;
            if timeout.timed_out() {
                waited += STALL_REPORT;
                warn!(
                    volume_id,
                    waited_secs = waited.as_secs(),
                    "writes paused: this node's lease cannot be confirmed"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn a_new_gate_is_closed_and_a_reading_opens_it_for_its_span() {
        let gate = Arc::new(WriteGate::new());
        assert_eq!(gate.remaining(), Duration::ZERO);
        let t = gate.now();
        gate.allow(t, Some(Duration::from_secs(60)));
        gate.admit("v").unwrap();
        assert!(gate.remaining() > Duration::from_secs(50));
        gate.allow(gate.now(), None);
        assert_eq!(gate.remaining(), Duration::ZERO);
    }

    #[test]
    fn a_stalled_write_goes_on_at_the_next_good_reading() {
        let gate = Arc::new(WriteGate::new());
        let writer = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                gate.admit("v").map(|()| started.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        assert!(!writer.is_finished(), "a closed gate lets nothing through");
        gate.allow(gate.now(), Some(Duration::from_secs(60)));
        let waited = writer.join().unwrap().unwrap();
        assert!(waited >= Duration::from_millis(250), "{waited:?}");
    }

    #[test]
    fn a_lost_claim_fails_waiting_and_later_writes() {
        let gate = Arc::new(WriteGate::new());
        let writer = {
            let gate = gate.clone();
            std::thread::spawn(move || gate.admit("v"))
        };
        std::thread::sleep(Duration::from_millis(200));
        gate.lose();
        let e = writer.join().unwrap().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        gate.allow(gate.now(), Some(Duration::from_secs(60)));
        assert_eq!(gate.admit("v").unwrap_err().raw_os_error(), Some(libc::EIO));
    }

    #[test]
    fn a_reading_taken_long_ago_allows_only_what_is_left_of_it() {
        let gate = WriteGate::new();
        let long_ago = gate.now().saturating_sub(50_000_000_000);
        gate.allow(long_ago, Some(Duration::from_secs(30)));
        assert_eq!(gate.remaining(), Duration::ZERO);
    }
}
