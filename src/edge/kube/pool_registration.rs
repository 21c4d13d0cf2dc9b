//! A cluster node's StoragePools: the ones its `terna.toml` declares are
//! registered (as `<node>-<pool>` objects), and every one naming the node,
//! an admin's too, is served by its replica agent and has its status
//! (agent address, capacity, use, health, heartbeat) reported.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tracing::{info, warn};

use crate::core::config::Config;
use crate::core::error::{Error, ErrorKind, Result};
use crate::core::pool::Pool;
use crate::datapath::agent::server::AgentState;
use crate::datapath::replica::local::LocalPool;
use crate::edge::kube::crd::{NfsPoolSpec, StoragePool, StoragePoolSpec, human_bytes};

/// MiB written and read by the probe of a newly served pool.
const PROBE_MIB: usize = 64;

/// The object name of a configured pool: pool names are per node, object
/// names cluster-wide.
pub fn object_name(node: &str, pool: &str) -> String {
    format!("{node}-{pool}")
}

/// The StoragePools this node's configuration declares.
pub fn configured_pools(config: &Config, data_dir: &Path, node: &str) -> Vec<StoragePool> {
    config
        .pools
        .iter()
        .filter(|p| p.node.as_deref().is_none_or(|n| n == node))
        .map(|p| match &p.nfs {
            // An export is the cluster's, not this node's: one object,
            // named after the pool, whichever node declares it.
            Some(nfs) => StoragePool::new(
                &p.name,
                StoragePoolSpec {
                    node: String::new(),
                    path: String::new(),
                    nfs: Some(NfsPoolSpec::from_config(nfs)),
                    tier: p.tier,
                    domain: p.domain.clone(),
                    zone: p.zone.clone(),
                    overcommit_ratio: None,
                    capacity_bytes: p.capacity_bytes,
                },
            ),
            None => StoragePool::new(
                &object_name(node, &p.name),
                StoragePoolSpec {
                    node: node.to_string(),
                    path: config.pool_path(data_dir, p).display().to_string(),
                    nfs: None,
                    tier: p.tier,
                    domain: p.domain.clone(),
                    zone: p.zone.clone(),
                    overcommit_ratio: None,
                    capacity_bytes: p.capacity_bytes,
                },
            ),
        })
        .collect()
}

/// One node's side of the StoragePools.
pub struct PoolRegistration {
    api: Api<StoragePool>,
    node: String,
    /// The address other nodes reach this node's agent at.
    agent_advertise: SocketAddr,
}

impl PoolRegistration {
    pub fn new(client: kube::Client, node: &str, agent_advertise: SocketAddr) -> Self {
        PoolRegistration {
            api: Api::all(client),
            node: node.to_string(),
            agent_advertise,
        }
    }

    /// Registers every pool `config` declares for this node.
    pub async fn register_configured(&self, config: &Config, data_dir: &Path) -> Result<()> {
        for pool in configured_pools(config, data_dir, &self.node) {
            self.register(&pool).await?;
        }
        Ok(())
    }

    /// Creates the object, or brings its spec in line with the configuration.
    async fn register(&self, pool: &StoragePool) -> Result<()> {
        let name = pool.metadata.name.clone().unwrap_or_default();
        let failed = |e: kube::Error| {
            Error::new(
                ErrorKind::Unavailable,
                format!("cannot register StoragePool {name}: {e}"),
            )
        };
        match self.api.get_opt(&name).await.map_err(failed)? {
            None => match self.api.create(&PostParams::default(), pool).await {
                Ok(_) => info!(pool = %name, "pool registered"),
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(failed(e)),
            },
            Some(mut existing) if existing.spec != pool.spec => {
                existing.spec = pool.spec.clone();
                self.api
                    .replace(&name, &PostParams::default(), &existing)
                    .await
                    .map_err(failed)?;
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// Serves every pool naming this node and reports each one's state.
    pub async fn heartbeat(&self, agent: &AgentState) -> Result<()> {
        let pools = self
            .api
            .list(&ListParams::default())
            .await
            .map_err(|e| Error::new(ErrorKind::Unavailable, e.to_string()))?;
        let served = agent.pool_names();
        for pool in pools.items.iter().filter(|p| p.spec.node == self.node) {
            let Some(name) = pool.metadata.name.clone() else {
                continue;
            };
            let path = PathBuf::from(&pool.spec.path);
            let (health, message, capacity) = match LocalPool::new(&path, pool.spec.capacity_bytes)
            {
                Ok(local) => match local.capacity() {
                    Ok(capacity) => {
                        if !served.contains(&name) {
                            info!(pool = %name, path = %path.display(), "serving pool");
                            agent.add_pool(&name, Box::new(local));
                            self.measure(&name, &path).await;
                        }
                        ("Ready", None, capacity)
                    }
                    Err(e) => ("NotReady", Some(e.report().to_string()), 0),
                },
                Err(e) => ("NotReady", Some(e.report().to_string()), 0),
            };
            let status = json!({
                "status": {
                    "agent": self.agent_advertise.to_string(),
                    "capacityBytes": capacity,
                    "capacity": human_bytes(capacity),
                    "usedBytes": statvfs_used(&path).unwrap_or(0),
                    "zone": pool.spec.zone.clone().unwrap_or_else(|| "default".into()),
                    "health": health,
                    "message": message,
                    "heartbeat": Timestamp::now().to_string(),
                }
            });
            if let Err(e) = self
                .api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await
            {
                warn!(pool = %name, error = %e, "cannot update pool status");
            }
        }
        Ok(())
    }

    /// Probes a newly served pool's speed, for `terna pools` and placement.
    async fn measure(&self, name: &str, path: &Path) {
        let probe_path = path.to_path_buf();
        match tokio::task::spawn_blocking(move || {
            crate::datapath::host::probe::measure(&probe_path, PROBE_MIB)
        })
        .await
        {
            Ok(Ok((write, read))) => {
                info!(pool = %name, write_mib_s = write, read_mib_s = read, "pool measured");
                let patch = json!({"status": {
                    "measuredWriteMibPerSec": (write * 10.0).round() / 10.0,
                    "measuredReadMibPerSec": (read * 10.0).round() / 10.0,
                }});
                let _ = self
                    .api
                    .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await;
            }
            Ok(Err(e)) => warn!(pool = %name, error = %e, "cannot measure pool"),
            Err(e) => warn!(pool = %name, error = %e, "pool probe failed"),
        }
    }
}

fn statvfs_used(path: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    Some((st.blocks() - st.blocks_free()) * st.fragment_size())
}
