//! Each cluster node's liveness Lease (`terna-node-<node>`): the node
//! renews its own, and reads the others' before taking over a staging claim
//! of a node that died holding a volume.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::api::PostParams;
use tracing::warn;

use crate::core::error::{Error, ErrorKind, Result};
use crate::datapath::node::NodeLiveness;
use crate::edge::kube::leader::{Decision, LeaseConfig, decide, try_acquire};

/// The name of `node`'s liveness Lease.
pub fn lease_name(node: &str) -> String {
    format!("terna-node-{node}")
}

/// Waits until `node` holds its Lease in `namespace`, then renews it in the
/// background for as long as the runtime runs. The caller serves CSI Node
/// only after this returns: a node never stages a volume without a live
/// lease standing for its claims.
pub async fn hold(
    client: kube::Client,
    namespace: &str,
    node: &str,
    duration: Duration,
) -> LeaseLiveness {
    let leases: Api<Lease> = Api::namespaced(client, namespace);
    let lease = LeaseConfig {
        namespace: namespace.to_string(),
        name: lease_name(node),
        identity: node.to_string(),
        duration,
        renew_every: duration / 4,
    };
    while !matches!(try_acquire(&leases, &lease).await, Ok(true)) {
        warn!(lease = %lease.name, "cannot take this node's lease yet");
        tokio::time::sleep(lease.renew_every).await;
    }
    {
        let leases = leases.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(lease.renew_every).await;
                if let Err(e) = try_acquire(&leases, &lease).await {
                    warn!(lease = %lease.name, error = %e, "cannot renew this node's lease");
                }
            }
        });
    }
    LeaseLiveness {
        leases,
        handle: tokio::runtime::Handle::current(),
        identity: node.to_string(),
        hold_off: crate::core::lease::skew_margin(duration).max(Duration::from_secs(1)),
    }
}

/// Node liveness from the nodes' Leases. A node without one is dead too:
/// deleting a dead node's Lease is how an admin frees its claims at once.
pub struct LeaseLiveness {
    leases: Api<Lease>,
    handle: tokio::runtime::Handle,
    /// This node, which holds a lapsed Lease off before taking its claims.
    identity: String,
    hold_off: Duration,
}

/// Who holds a lapsed Lease of another node while `taker` takes its
/// claims over.
pub fn holding_off(taker: &str) -> String {
    format!("{taker} (taking over)")
}

/// The Lease `taker` writes over a lapsed one before taking over the node's
/// claims: held by it for `hold_off`. Without it, the node renewing just
/// after the lapse was seen would let its engines read a fresh Lease and
/// their claim (not yet taken) and write on for most of a lease after the
/// takeover. Its renewal now waits `hold_off`, by which time the claims
/// are the taker's, and its engines read a Lease that is not theirs.
/// `None`: the Lease has not lapsed.
pub fn held_off(
    spec: Option<&LeaseSpec>,
    taker: &str,
    hold_off: Duration,
    now: Timestamp,
) -> Option<LeaseSpec> {
    if decide(spec, "", now) != Decision::Take {
        return None;
    }
    let transitions = spec.and_then(|s| s.lease_transitions).unwrap_or(0);
    Some(LeaseSpec {
        holder_identity: Some(holding_off(taker)),
        lease_duration_seconds: Some(i32::try_from(hold_off.as_secs().max(1)).unwrap_or(i32::MAX)),
        acquire_time: Some(MicroTime(now)),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions.saturating_add(1)),
        ..Default::default()
    })
}

impl NodeLiveness for LeaseLiveness {
    /// Read, then written only over the version read (a renewal in between
    /// makes the write conflict: the node is alive after all).
    fn hold_off_if_expired(&self, node: &str) -> Result<bool> {
        let unavailable = |what: &str, e: kube::Error| {
            Error::new(
                ErrorKind::Unavailable,
                format!("cannot {what} the lease of node {node}: {e}"),
            )
        };
        let name = lease_name(node);
        let lease = self
            .handle
            .block_on(self.leases.get_opt(&name))
            .map_err(|e| unavailable("read", e))?;
        let now = Timestamp::now();
        let Some(spec) = held_off(
            lease.as_ref().and_then(|l| l.spec.as_ref()),
            &self.identity,
            self.hold_off,
            now,
        ) else {
            return Ok(false);
        };
        let written = match lease {
            Some(mut lease) => {
                lease.spec = Some(spec);
                self.handle
                    .block_on(self.leases.replace(&name, &PostParams::default(), &lease))
            }
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        ..Default::default()
                    },
                    spec: Some(spec),
                };
                self.handle
                    .block_on(self.leases.create(&PostParams::default(), &lease))
            }
        };
        match written {
            Ok(_) => Ok(true),
            // Renewed (or recreated) since it was read: alive.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(unavailable("hold off", e)),
        }
    }
}

const LEASE_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A node's Lease as its engines read it, to know how long they may write
/// (`core::lease`). A Lease that is missing has no holder.
pub struct KubeLeaseReader {
    leases: Api<Lease>,
    runtime: std::sync::Arc<tokio::runtime::Runtime>,
}

impl KubeLeaseReader {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        runtime: std::sync::Arc<tokio::runtime::Runtime>,
    ) -> KubeLeaseReader {
        KubeLeaseReader {
            leases: Api::namespaced(client, namespace),
            runtime,
        }
    }
}

impl crate::datapath::engine::gate::LeaseReader for KubeLeaseReader {
    fn read(&self, node: &str) -> Result<crate::core::lease::LeaseState> {
        // Bounded well under the engine's margin: a reading that hangs on a
        // dead connection must not keep the gate shut once the API server
        // answers again.
        let lease = self
            .runtime
            // Made inside the runtime: a timer needs its driver.
            .block_on(async {
                tokio::time::timeout(LEASE_READ_TIMEOUT, self.leases.get_opt(&lease_name(node)))
                    .await
            })
            .map_err(|_| {
                Error::new(
                    ErrorKind::Unavailable,
                    format!("reading the lease of node {node} took over {LEASE_READ_TIMEOUT:?}"),
                )
            })?
            .map_err(|e| {
                Error::new(
                    ErrorKind::Unavailable,
                    format!("cannot read the lease of node {node}: {e}"),
                )
            })?;
        let spec = lease.and_then(|l| l.spec).unwrap_or_default();
        let renewed = spec
            .renew_time
            .as_ref()
            .or(spec.acquire_time.as_ref())
            .and_then(|t| {
                let ns = t.0.as_nanosecond();
                u64::try_from(ns)
                    .ok()
                    .map(|ns| std::time::UNIX_EPOCH + Duration::from_nanos(ns))
            });
        Ok(crate::core::lease::LeaseState {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            renewed,
            duration: Duration::from_secs(
                u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0),
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str, renewed_secs_ago: i64, duration: i32, now: Timestamp) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(duration),
            renew_time: Some(MicroTime(
                now - k8s_openapi::jiff::SignedDuration::from_secs(renewed_secs_ago),
            )),
            lease_transitions: Some(3),
            ..Default::default()
        }
    }

    #[test]
    fn only_a_lapsed_or_missing_lease_is_held_off_and_then_its_node_waits() {
        let now = Timestamp::from_second(2_000_000_000).unwrap();
        let hold = Duration::from_secs(10);
        assert_eq!(
            held_off(Some(&spec("n1", 39, 40, now)), "n2", hold, now),
            None
        );
        let lapsed = held_off(Some(&spec("n1", 41, 40, now)), "n2", hold, now).unwrap();
        assert_eq!(lapsed.holder_identity.as_deref(), Some("n2 (taking over)"));
        assert_eq!(lapsed.lease_transitions, Some(4));
        assert_eq!(lapsed.lease_duration_seconds, Some(10));
        assert!(
            held_off(None, "n2", hold, now).is_some(),
            "deleted: held off too"
        );
        // The node's own renewal now waits the hold off out, and another
        // taker does not take it from the first.
        assert_eq!(decide(Some(&lapsed), "n1", now), Decision::Wait);
        assert_eq!(held_off(Some(&lapsed), "n3", hold, now), None);
        let later = now + k8s_openapi::jiff::SignedDuration::from_secs(11);
        assert_eq!(decide(Some(&lapsed), "n1", later), Decision::Take);
        // Its engines read a Lease that is not their node's: no writes.
        let state = crate::core::lease::LeaseState {
            holder: lapsed.holder_identity.clone(),
            renewed: Some(std::time::UNIX_EPOCH + Duration::from_secs(2_000_000_000)),
            duration: hold,
        };
        assert_eq!(
            crate::core::lease::writable_for(
                &state,
                "n1",
                std::time::UNIX_EPOCH + Duration::from_secs(2_000_000_000)
            ),
            None
        );
    }
}
