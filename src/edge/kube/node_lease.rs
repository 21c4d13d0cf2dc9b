//! Each cluster node's liveness Lease (`terna-node-<node>`): the node
//! renews its own, and reads the others' before taking over a staging claim
//! of a node that died holding a volume.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
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
    }
}

/// Node liveness from the nodes' Leases. A node without one is dead too:
/// deleting a dead node's Lease is how an admin frees its claims at once.
pub struct LeaseLiveness {
    leases: Api<Lease>,
    handle: tokio::runtime::Handle,
}

impl NodeLiveness for LeaseLiveness {
    fn expired(&self, node: &str) -> Result<bool> {
        let lease = self
            .handle
            .block_on(self.leases.get_opt(&lease_name(node)))
            .map_err(|e| {
                Error::new(
                    ErrorKind::Unavailable,
                    format!("cannot read the lease of node {node}: {e}"),
                )
            })?;
        let spec = lease.as_ref().and_then(|l| l.spec.as_ref());
        // Seen from a neutral identity: Take means nobody holds it now.
        Ok(lease.is_none() || decide(spec, "", Timestamp::now()) == Decision::Take)
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
