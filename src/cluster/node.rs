//! `terna node`'s cluster duties: serve this node's pools through its
//! replica agent and keep a `StoragePool` object per pool current, so the
//! controller places replicas only where a live node says there is room.
//!
//! Pools come from two places: the node's `terna.toml` (registered as
//! `<node>-<pool>` objects), and `StoragePool` objects an admin creates
//! naming this node, which are served from the next heartbeat on.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tracing::{info, warn};

use super::crd::{StoragePool, StoragePoolSpec, human_bytes};
use crate::agent::server::{self, AgentState};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::replica::Pool;
use crate::replica::local::LocalPool;

/// MiB written and read by the probe of a newly served pool.
const PROBE_MIB: usize = 64;

pub struct NodeOptions {
    pub data_dir: PathBuf,
    pub node_id: String,
    pub agent_listen: SocketAddr,
    /// The address other nodes reach this agent at.
    pub agent_advertise: SocketAddr,
    pub heartbeat: Duration,
}

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
        .map(|p| {
            StoragePool::new(
                &object_name(node, &p.name),
                StoragePoolSpec {
                    node: node.to_string(),
                    path: config.pool_path(data_dir, p).display().to_string(),
                    tier: p.tier,
                    domain: p.domain.clone(),
                    zone: p.zone.clone(),
                    overcommit_ratio: None,
                    capacity_bytes: p.capacity_bytes,
                },
            )
        })
        .collect()
}

fn statvfs_used(path: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    Some((st.blocks() - st.blocks_free()) * st.fragment_size())
}

/// Runs until the agent stops: the agent on its own threads, the
/// registration loop here.
pub async fn run(client: kube::Client, opts: NodeOptions) -> Result<()> {
    let config = Config::load_or_init_with(&opts.data_dir, Config::default_node)?;
    let token = config.cluster_token(&opts.data_dir)?;
    let agent = Arc::new(AgentState::new(&opts.node_id, &token, Default::default()));
    let listener = TcpListener::bind(opts.agent_listen)
        .map_err(|e| Error::io(format!("cannot listen on {}", opts.agent_listen), e))?;
    let serving = agent.clone();
    let agent_thread = std::thread::Builder::new()
        .name("agent".into())
        .spawn(move || server::serve(listener, serving))
        .map_err(|e| Error::io("cannot start the replica agent", e))?;
    info!(node = %opts.node_id, listen = %opts.agent_listen, "replica agent serving");

    let api: Api<StoragePool> = Api::all(client);
    for pool in configured_pools(&config, &opts.data_dir, &opts.node_id) {
        register(&api, &pool).await?;
    }
    loop {
        if agent_thread.is_finished() {
            return Err(Error::internal("the replica agent stopped"));
        }
        if let Err(e) = heartbeat(&api, &agent, &opts).await {
            warn!(error = %e, "cannot report pools");
        }
        tokio::time::sleep(opts.heartbeat).await;
    }
}

/// Creates the object, or brings its spec in line with the configuration.
async fn register(api: &Api<StoragePool>, pool: &StoragePool) -> Result<()> {
    let name = pool.metadata.name.clone().unwrap_or_default();
    let failed = |e: kube::Error| {
        Error::new(
            crate::error::ErrorKind::Unavailable,
            format!("cannot register StoragePool {name}: {e}"),
        )
    };
    match api.get_opt(&name).await.map_err(failed)? {
        None => match api.create(&PostParams::default(), pool).await {
            Ok(_) => info!(pool = %name, "pool registered"),
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(failed(e)),
        },
        Some(mut existing) if existing.spec != pool.spec => {
            existing.spec = pool.spec.clone();
            api.replace(&name, &PostParams::default(), &existing)
                .await
                .map_err(failed)?;
        }
        Some(_) => {}
    }
    Ok(())
}

/// Serves every pool naming this node and reports each one's state.
async fn heartbeat(api: &Api<StoragePool>, agent: &AgentState, opts: &NodeOptions) -> Result<()> {
    let pools = api
        .list(&ListParams::default())
        .await
        .map_err(|e| Error::new(crate::error::ErrorKind::Unavailable, e.to_string()))?;
    let served = agent.pool_names();
    for pool in pools.items.iter().filter(|p| p.spec.node == opts.node_id) {
        let Some(name) = pool.metadata.name.clone() else {
            continue;
        };
        let path = PathBuf::from(&pool.spec.path);
        let local = LocalPool::new(&path, pool.spec.capacity_bytes);
        let (health, message, capacity) = match local {
            Ok(local) => match local.capacity() {
                Ok(capacity) => {
                    if !served.contains(&name) {
                        info!(pool = %name, path = %path.display(), "serving pool");
                        agent.add_pool(&name, Box::new(local));
                        let probe_path = path.clone();
                        match tokio::task::spawn_blocking(move || {
                            super::probe::measure(&probe_path, PROBE_MIB)
                        })
                        .await
                        {
                            Ok(Ok((write, read))) => {
                                info!(pool = %name, write_mib_s = write, read_mib_s = read, "pool measured");
                                let patch = json!({"status": {
                                    "measuredWriteMibPerSec": (write * 10.0).round() / 10.0,
                                    "measuredReadMibPerSec": (read * 10.0).round() / 10.0,
                                }});
                                let _ = api
                                    .patch_status(
                                        &name,
                                        &PatchParams::default(),
                                        &Patch::Merge(&patch),
                                    )
                                    .await;
                            }
                            Ok(Err(e)) => warn!(pool = %name, error = %e, "cannot measure pool"),
                            Err(e) => warn!(pool = %name, error = %e, "pool probe failed"),
                        }
                    }
                    ("Ready", None, capacity)
                }
                Err(e) => ("NotReady", Some(e.to_string()), 0),
            },
            Err(e) => ("NotReady", Some(e.to_string()), 0),
        };
        let status = json!({
            "status": {
                "agent": opts.agent_advertise.to_string(),
                "capacityBytes": capacity,
                "capacity": human_bytes(capacity),
                "usedBytes": statvfs_used(&path).unwrap_or(0),
                "zone": pool.spec.zone.clone().unwrap_or_else(|| "default".into()),
                "health": health,
                "message": message,
                "heartbeat": Timestamp::now().to_string(),
            }
        });
        if let Err(e) = api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
        {
            warn!(pool = %name, error = %e, "cannot update pool status");
        }
    }
    Ok(())
}
