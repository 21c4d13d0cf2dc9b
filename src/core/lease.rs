//! How long an engine may go on writing on the strength of its node's
//! liveness Lease: the self-fencing half of "no split-brain on takeover"
//! (ARCHITECTURE.md, Fencing a stale holder).
//!
//! Another node takes a claim over once the holder's Lease was last renewed
//! at `R` and its own clock reads past `R + duration`. The holder's engines
//! stop submitting writes at `R + duration - margin` by their node's clock,
//! `margin` being the clock skew the cluster tolerates between nodes; so as
//! long as no two clocks differ by more than `margin`, every write a stale
//! engine submits is submitted before anyone may take over. A write already
//! submitted and then held up (a frozen process, a cut link) is what the
//! backends' own fences stop.

use std::time::{Duration, SystemTime};

/// A node's liveness Lease, as read by one of its engines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseState {
    /// Who holds it; the engine's own node, or nobody may write.
    pub holder: Option<String>,
    /// When the holder last renewed it, by the holder's clock.
    pub renewed: Option<SystemTime>,
    /// How long it holds unrenewed.
    pub duration: Duration,
}

/// The skew margin for a lease of `duration`: a quarter of it (10 s of the
/// default 40), so an engine still rides out half a lease of failed
/// renewals (renewed every quarter) before it pauses.
pub fn skew_margin(duration: Duration) -> Duration {
    duration / 4
}

/// For how long after `read_at` (a wall-clock instant taken *before* the
/// Lease was read) an engine of `node` may still submit writes, given the
/// Lease as read. `None`: not at all (another holder, never renewed, or
/// already past its bound).
pub fn writable_for(state: &LeaseState, node: &str, read_at: SystemTime) -> Option<Duration> {
    if state.holder.as_deref() != Some(node) {
        return None;
    }
    let most = state.duration.checked_sub(skew_margin(state.duration))?;
    let until = state.renewed?.checked_add(most)?;
    // Never more than one lease's worth: a renewal stamped in this clock's
    // future (a clock stepped back) must not open the gate for as long.
    until
        .duration_since(read_at)
        .ok()
        .filter(|d| !d.is_zero())
        .map(|d| d.min(most))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: Duration = Duration::from_secs(1_800_000_000);

    fn at(secs_ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + T0 + Duration::from_millis(secs_ms)
    }

    fn lease(holder: Option<&str>, renewed_ms: Option<u64>, duration_s: u64) -> LeaseState {
        LeaseState {
            holder: holder.map(String::from),
            renewed: renewed_ms.map(at),
            duration: Duration::from_secs(duration_s),
        }
    }

    #[test]
    fn a_fresh_lease_of_ours_lets_writes_go_on_until_three_quarters_of_it() {
        let l = lease(Some("n1"), Some(0), 40);
        assert_eq!(writable_for(&l, "n1", at(0)), Some(Duration::from_secs(30)));
        assert_eq!(
            writable_for(&l, "n1", at(10_000)),
            Some(Duration::from_secs(20))
        );
        assert_eq!(
            writable_for(&l, "n1", at(29_999)),
            Some(Duration::from_millis(1))
        );
        assert_eq!(writable_for(&l, "n1", at(30_000)), None);
        assert_eq!(writable_for(&l, "n1", at(90_000)), None);
    }

    #[test]
    fn another_holder_no_holder_or_no_renewal_allow_nothing() {
        assert_eq!(
            writable_for(&lease(Some("n2"), Some(0), 40), "n1", at(0)),
            None
        );
        assert_eq!(writable_for(&lease(None, Some(0), 40), "n1", at(0)), None);
        assert_eq!(
            writable_for(&lease(Some("n1"), None, 40), "n1", at(0)),
            None
        );
        assert_eq!(
            writable_for(&lease(Some("n1"), Some(0), 0), "n1", at(0)),
            None
        );
    }

    #[test]
    fn a_renewal_stamped_ahead_of_the_reader_is_not_trusted_beyond_its_bound() {
        // Stamped in the reader's future (a clock stepped back): never more
        // than one lease's worth from the reading.
        let l = lease(Some("n1"), Some(5_000), 40);
        assert_eq!(writable_for(&l, "n1", at(0)), Some(Duration::from_secs(30)));
        let l = lease(Some("n1"), Some(3_600_000), 40);
        assert_eq!(writable_for(&l, "n1", at(0)), Some(Duration::from_secs(30)));
    }

    proptest! {
        /// Whatever the reading, an engine never writes past the takeover
        /// time minus the margin: a taker whose clock is off by less than
        /// the margin takes over only after the engine's last write.
        #[test]
        fn writes_end_a_margin_before_anyone_may_take_over(
            renewed in 0u64..200_000,
            read in 0u64..200_000,
            duration in 1u64..600,
            skew_ms in 0u64..1_000_000,
        ) {
            let l = lease(Some("n1"), Some(renewed), duration);
            let d = Duration::from_secs(duration);
            if let Some(w) = writable_for(&l, "n1", at(read)) {
                prop_assert!(w <= d - skew_margin(d));
                let last_write = at(read) + w;
                let takeover = at(renewed) + d;
                prop_assert!(last_write + skew_margin(d) <= takeover);
                let skew = Duration::from_millis(skew_ms);
                if skew < skew_margin(d) {
                    // The taker's clock ahead by `skew`: it acts at
                    // `takeover - skew` real time, still after the last write.
                    prop_assert!(last_write < takeover - skew);
                }
            }
        }
    }
}
