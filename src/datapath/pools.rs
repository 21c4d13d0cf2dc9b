//! The pools this process can reach, built from the configuration, with the
//! labels placement needs.

use std::collections::BTreeMap;
use std::path::Path;

use crate::core::config::{Config, NfsPoolConfig, PoolConfig};
use crate::core::error::{Error, Result};
use crate::core::pool::Pool;
use crate::core::pool::{PoolEntry, Pools, nfs_node};
use crate::datapath::agent::transport::Transport;
use crate::datapath::replica::agent_fenced::AgentFencedPool;
use crate::datapath::replica::local::LocalPool;
use crate::datapath::replica::nfs::NfsPool;
use crate::datapath::replica::remote::{Client, RemotePool};
use crate::datapath::tls::Identity;
use std::sync::Arc;
use std::time::Duration;

fn nfs_entry(pool: &PoolConfig, nfs: &NfsPoolConfig, timeout: Duration) -> PoolEntry {
    let node = nfs_node(&nfs.server);
    PoolEntry {
        name: pool.name.clone(),
        domain: pool.domain.clone().unwrap_or_else(|| node.clone()),
        zone: pool.zone.clone().unwrap_or_else(|| "default".to_string()),
        node,
        tier: pool.tier,
        overcommit_ratio: None,
        backend: Box::new(NfsPool::new(nfs, timeout)),
    }
}

/// The token `from_config` reaches other nodes' agents with, read by
/// the role once for its process. Only pools on other nodes need it: a
/// data dir of local (and NFS) pools runs without one, and gets none.
pub fn cluster_token(config: &Config, data_dir: &Path, node: &str) -> Result<Vec<u8>> {
    let remote = config
        .pools
        .iter()
        .any(|p| p.nfs.is_none() && p.node.as_deref().is_some_and(|n| n != node));
    if !remote {
        return Ok(Vec::new());
    }
    crate::datapath::host::config_file::cluster_token(config, data_dir).map_err(|e| Error {
        message: format!(
            "pools on other nodes are configured, which needs the cluster token: {}",
            e.message
        ),
        ..e
    })
}

/// What this process's agent connections run over: mutual TLS as
/// `identity`, with the data dir's CA (read when first needed, so a data
/// dir of local pools needs none).
pub fn transport(data_dir: &Path, identity: &str) -> Transport {
    let file = crate::core::data_dir::ca_file(data_dir);
    Transport::Tls(Identity::from_file(identity, file))
}

/// Every configured pool: this node's as local pools, other nodes'
/// through their replica agents, authenticated with `token` over
/// `transport`.
pub fn from_config(
    config: &Config,
    data_dir: &Path,
    node: &str,
    token: &[u8],
    transport: &Transport,
) -> Result<Pools> {
    let timeout = Duration::from_millis(config.agent_timeout_ms);
    let clients: BTreeMap<&str, Arc<Client>> = config
        .nodes
        .iter()
        .map(|n| {
            (
                n.name.as_str(),
                Arc::new(Client::new(
                    n.agent,
                    &n.name,
                    token,
                    node,
                    timeout,
                    transport.clone(),
                )),
            )
        })
        .collect();
    let mut entries = BTreeMap::new();
    for pool in &config.pools {
        if let Some(nfs) = &pool.nfs {
            entries.insert(pool.name.clone(), nfs_entry(pool, nfs, timeout));
            continue;
        }
        let pool_node = pool.node.clone().unwrap_or_else(|| node.to_string());
        let backend: Box<dyn Pool> = match clients.get(pool_node.as_str()) {
            Some(client) if pool_node != node => {
                Box::new(RemotePool::new(client.clone(), &pool.name))
            }
            local => {
                let pool_here =
                    LocalPool::new(&config.pool_path(data_dir, pool), pool.capacity_bytes)?;
                match local {
                    // Other nodes write it through this node's agent: a
                    // fence must reach the agent too.
                    Some(client) => Box::new(AgentFencedPool::new(
                        pool_here,
                        RemotePool::new(client.clone(), &pool.name),
                    )),
                    None => Box::new(pool_here),
                }
            }
        };
        entries.insert(
            pool.name.clone(),
            PoolEntry {
                name: pool.name.clone(),
                node: pool_node.clone(),
                tier: pool.tier,
                domain: pool.domain.clone().unwrap_or_else(|| pool_node.clone()),
                zone: pool.zone.clone().unwrap_or_else(|| "default".to_string()),
                overcommit_ratio: None,
                backend,
            },
        );
    }
    Ok(Pools::from_entries(entries.into_values().collect()))
}

/// The pools on `node`'s own disks, for its replica agent to serve.
pub fn local_to(
    config: &Config,
    data_dir: &Path,
    node: &str,
) -> Result<BTreeMap<String, Box<dyn Pool>>> {
    let mut out: BTreeMap<String, Box<dyn Pool>> = BTreeMap::new();
    for pool in &config.pools {
        // NFS pools are reached directly from every node, never served.
        if pool.nfs.is_none() && pool.node.as_deref().is_none_or(|n| n == node) {
            out.insert(
                pool.name.clone(),
                Box::new(LocalPool::new(
                    &config.pool_path(data_dir, pool),
                    pool.capacity_bytes,
                )?),
            );
        }
    }
    Ok(out)
}
