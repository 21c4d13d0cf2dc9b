//! The controller's view of the cluster's pools: every `StoragePool` whose
//! node reports it ready and recently, reached through that node's replica
//! agent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use crate::core::pool::{PoolEntry, Pools};
use crate::datapath::agent::transport::Transport;
use crate::datapath::replica::agent_fenced::AgentFencedPool;
use crate::datapath::replica::nfs::NfsPool;
use crate::datapath::replica::remote::{Client, RemotePool};
use crate::edge::kube::crd::{NfsPoolSpec, StoragePool};

/// Why a pool is left out of placement, for logs and `terna pools`.
pub fn unusable_reason(
    pool: &StoragePool,
    now: Timestamp,
    stale_after: Duration,
) -> Option<String> {
    let Some(status) = &pool.status else {
        return Some("its node has not registered it yet".into());
    };
    if status.health != "Ready" {
        return Some(format!(
            "its node reports it {}: {}",
            if status.health.is_empty() {
                "unknown"
            } else {
                &status.health
            },
            status.message.as_deref().unwrap_or("no reason given")
        ));
    }
    let Some(agent) = &status.agent else {
        return Some("its node has not published a replica agent address".into());
    };
    if agent.parse::<SocketAddr>().is_err() {
        return Some(format!("agent address {agent:?} is not host:port"));
    }
    let beat = status
        .heartbeat
        .as_deref()
        .and_then(|h| h.parse::<Timestamp>().ok());
    match beat {
        Some(t) if now.as_second() - t.as_second() <= stale_after.as_secs() as i64 => None,
        _ => Some(format!(
            "its node has not confirmed it for over {} s",
            stale_after.as_secs()
        )),
    }
}

/// Keeps one agent client per node address across rebuilds of the pool
/// set, so pooled connections survive.
pub struct PoolDirectory {
    token: Vec<u8>,
    transport: Transport,
    identity: String,
    timeout: Duration,
    stale_after: Duration,
    /// By agent address and the node it must prove to be.
    clients: Mutex<HashMap<(SocketAddr, String), Arc<Client>>>,
    /// Pools on this node are opened as local files, not through the agent.
    local_node: Option<String>,
    nfs: Mutex<HashMap<String, (NfsPoolSpec, NfsPool)>>,
}

impl PoolDirectory {
    pub fn new(
        token: &[u8],
        transport: Transport,
        identity: &str,
        timeout: Duration,
        stale_after: Duration,
    ) -> Self {
        PoolDirectory {
            token: token.to_vec(),
            transport,
            identity: identity.to_string(),
            timeout,
            stale_after,
            clients: Mutex::new(HashMap::new()),
            local_node: None,
            nfs: Mutex::new(HashMap::new()),
        }
    }

    /// Opens `node`'s own pools directly (the engine on that node).
    pub fn with_local_node(mut self, node: &str) -> Self {
        self.local_node = Some(node.to_string());
        self
    }

    fn client(&self, addr: SocketAddr, node: &str) -> Arc<Client> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients
            .entry((addr, node.to_string()))
            .or_insert_with(|| {
                Arc::new(Client::new(
                    addr,
                    node,
                    &self.token,
                    &self.identity,
                    self.timeout,
                    self.transport.clone(),
                ))
            })
            .clone()
    }

    /// The NFS pool `name` as `spec` describes it; kept across rebuilds of
    /// the pool set (with its connections) while the spec stays the same.
    fn nfs_pool(&self, name: &str, spec: &NfsPoolSpec) -> NfsPool {
        let mut pools = self.nfs.lock().unwrap_or_else(|p| p.into_inner());
        match pools.get(name) {
            Some((s, pool)) if s == spec => pool.clone(),
            _ => {
                let pool = NfsPool::new(&spec.to_config(), self.timeout);
                pools.insert(name.to_string(), (spec.clone(), pool.clone()));
                pool
            }
        }
    }

    fn nfs_entry(&self, p: &StoragePool, spec: &NfsPoolSpec) -> Option<PoolEntry> {
        let name = p.metadata.name.clone()?;
        let node = if p.spec.node.is_empty() {
            crate::core::pool::nfs_node(&spec.server)
        } else {
            p.spec.node.clone()
        };
        Some(PoolEntry {
            backend: Box::new(self.nfs_pool(&name, spec)),
            name,
            domain: p.spec.domain.clone().unwrap_or_else(|| node.clone()),
            node,
            tier: p.spec.tier,
            zone: p.spec.zone.clone().unwrap_or_else(|| "default".into()),
            overcommit_ratio: p.spec.overcommit_ratio,
        })
    }

    /// The usable pools among `objects`. NFS pools are always offered:
    /// whether their server answers is found out when they are used.
    pub fn pools(&self, objects: &[Arc<StoragePool>]) -> Pools {
        Pools::from_entries(self.entries(objects))
    }

    /// The usable pools among `objects`, each on its own.
    pub fn entries(&self, objects: &[Arc<StoragePool>]) -> Vec<PoolEntry> {
        let now = Timestamp::now();
        let nfs = objects
            .iter()
            .filter_map(|p| self.nfs_entry(p, p.spec.nfs.as_ref()?));
        objects
            .iter()
            .filter(|p| p.spec.nfs.is_none())
            .filter(|p| unusable_reason(p, now, self.stale_after).is_none())
            .filter_map(|p| {
                let name = p.metadata.name.clone()?;
                let status = p.status.as_ref()?;
                let addr: SocketAddr = status.agent.as_deref()?.parse().ok()?;
                let backend: Box<dyn crate::core::pool::Pool> =
                    if self.local_node.as_deref() == Some(p.spec.node.as_str()) {
                        // Written here as local files; fenced through this
                        // node's agent, which other nodes write it through.
                        Box::new(AgentFencedPool::new(
                            crate::datapath::replica::local::LocalPool::new(
                                std::path::Path::new(&p.spec.path),
                                p.spec.capacity_bytes,
                            )
                            .ok()?,
                            RemotePool::new(self.client(addr, &p.spec.node), &name),
                        ))
                    } else {
                        Box::new(RemotePool::new(self.client(addr, &p.spec.node), &name))
                    };
                Some(PoolEntry {
                    name: name.clone(),
                    node: p.spec.node.clone(),
                    tier: p.spec.tier,
                    domain: p.spec.domain.clone().unwrap_or_else(|| p.spec.node.clone()),
                    zone: p.spec.zone.clone().unwrap_or_else(|| "default".into()),
                    overcommit_ratio: p.spec.overcommit_ratio,
                    backend,
                })
            })
            .chain(nfs)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::class::Tier;
    use crate::edge::kube::crd::{StoragePoolSpec, StoragePoolStatus};

    fn pool(status: Option<StoragePoolStatus>) -> StoragePool {
        let mut p = StoragePool::new(
            "n1-fast",
            StoragePoolSpec {
                node: "n1".into(),
                path: "/d".into(),
                nfs: None,
                tier: Tier::Fast,
                domain: None,
                zone: None,
                overcommit_ratio: None,
                capacity_bytes: None,
            },
        );
        p.status = status;
        p
    }

    #[test]
    fn only_ready_recent_pools_with_an_agent_are_usable() {
        let now = Timestamp::from_second(10_000).unwrap();
        let stale = Duration::from_secs(60);
        let ready = StoragePoolStatus {
            agent: Some("127.0.0.1:7420".into()),
            health: "Ready".into(),
            heartbeat: Some(Timestamp::from_second(9_990).unwrap().to_string()),
            ..Default::default()
        };
        assert_eq!(
            unusable_reason(&pool(Some(ready.clone())), now, stale),
            None
        );
        assert!(unusable_reason(&pool(None), now, stale).is_some());
        let old = StoragePoolStatus {
            heartbeat: Some(Timestamp::from_second(9_000).unwrap().to_string()),
            ..ready.clone()
        };
        assert!(
            unusable_reason(&pool(Some(old)), now, stale)
                .unwrap()
                .contains("60 s")
        );
        let sick = StoragePoolStatus {
            health: "NotReady".into(),
            message: Some("disk full".into()),
            ..ready.clone()
        };
        assert!(
            unusable_reason(&pool(Some(sick)), now, stale)
                .unwrap()
                .contains("disk full")
        );
        let no_agent = StoragePoolStatus {
            agent: None,
            ..ready
        };
        assert!(unusable_reason(&pool(Some(no_agent)), now, stale).is_some());
    }
}
