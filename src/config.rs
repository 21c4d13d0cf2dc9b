//! The admin-editable configuration of a standalone data dir: pools, their
//! tiers and failure domains, and the overcommit ratio. Written once with
//! defaults on first start, read on every start after.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::class::Tier;
use crate::error::{Error, Result};
use crate::store::atomic_write;

pub const CONFIG_FILE: &str = "terna.toml";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Allocatable bytes of a pool = its capacity × this ratio (thin provisioning).
    #[serde(default = "default_overcommit")]
    pub overcommit_ratio: f64,
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
    /// Other nodes whose replica agents serve pools to this one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeConfig>,
    /// File holding the cluster token agents and engines authenticate with;
    /// relative paths are under the data dir.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_token_file: Option<PathBuf>,
    /// How long a replica agent may take to answer before its replica is faulted.
    #[serde(default = "default_agent_timeout_ms")]
    pub agent_timeout_ms: u64,
    /// A replica unreachable this long is replaced on another pool and rebuilt.
    #[serde(default = "default_replace_after_secs")]
    pub replace_after_secs: u64,
    /// Bandwidth for catch-up and rebuild copies, MiB/s; 0 means unlimited.
    #[serde(default = "default_rebuild_mib_per_sec")]
    pub rebuild_mib_per_sec: u64,
    /// Serve /metrics, /healthz and /readyz here (host:port); off when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub name: String,
    /// host:port of the node's replica agent.
    pub agent: std::net::SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub name: String,
    /// The node whose disk holds the pool; absent means this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Directory holding the pool's replica files on its node; relative
    /// paths are under that node's data dir. Unused for NFS pools.
    #[serde(default, skip_serializing_if = "path_is_empty")]
    pub path: PathBuf,
    /// An NFS export instead of a local directory: replicas are files on
    /// it, reached by Terna's own NFSv3 client (no kernel mount), from
    /// whichever node runs the engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nfs: Option<NfsPoolConfig>,
    pub tier: Tier,
    /// Failure domain for `failureDomain: node`: replicas of a volume never
    /// share one. Defaults to the node the pool is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Failure domain for `failureDomain: zone`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Capacity to account with; defaults to the size of the filesystem holding `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_bytes: Option<u64>,
}

fn path_is_empty(p: &Path) -> bool {
    p.as_os_str().is_empty()
}

/// Where an NFS pool lives: `server:export/subdir`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NfsPoolConfig {
    /// Host name or IP address of the NFS server.
    pub server: String,
    /// NFS port; absent asks the server's portmapper.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// MOUNT protocol port; absent asks the server's portmapper.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_port: Option<u16>,
    /// The exported path, as the server names it.
    pub export: String,
    /// Directory inside the export holding this pool's replicas (created
    /// on first use); absent means the export's root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subdir: Option<String>,
}

fn default_overcommit() -> f64 {
    1.0
}

fn default_agent_timeout_ms() -> u64 {
    5000
}

fn default_replace_after_secs() -> u64 {
    300
}

fn default_rebuild_mib_per_sec() -> u64 {
    256
}

const HEADER: &str = "\
# Terna standalone configuration, written with defaults on first start.
# Each pool is a directory standing for one disk. Edit tiers (fast | standard | slow),
# failure domains, zones, capacities and the overcommit ratio, then restart terna.
# Allocatable bytes of a pool = capacity_bytes (default: its filesystem's size) x overcommit_ratio.
# Pools on other machines: add [[nodes]] (name, agent = \"host:7420\") and give the pool
# node = \"name\"; both sides read the same cluster_token_file. A replica unreachable for
# replace_after_secs is replaced on another pool and rebuilt at up to rebuild_mib_per_sec.
";

impl Config {
    /// Three pools under `data_dir/pools`, each its own failure domain, so a
    /// 3-replica volume can be placed with no further configuration.
    pub fn default_standalone() -> Config {
        let pools = (1..=3)
            .map(|i| PoolConfig {
                name: format!("disk-{i}"),
                node: None,
                path: PathBuf::from(format!("pools/disk-{i}")),
                nfs: None,
                tier: Tier::Standard,
                domain: Some(format!("disk-{i}")),
                zone: Some(format!("zone-{i}")),
                capacity_bytes: None,
            })
            .collect();
        Config {
            overcommit_ratio: 1.0,
            pools,
            nodes: Vec::new(),
            cluster_token_file: None,
            agent_timeout_ms: default_agent_timeout_ms(),
            replace_after_secs: default_replace_after_secs(),
            rebuild_mib_per_sec: default_rebuild_mib_per_sec(),
            metrics_listen: None,
        }
    }

    /// A cluster node's default: one standard pool under `data_dir/pools`,
    /// its failure domain the node itself.
    pub fn default_node() -> Config {
        Config {
            pools: vec![PoolConfig {
                name: "default".into(),
                node: None,
                path: PathBuf::from("pools/default"),
                nfs: None,
                tier: Tier::Standard,
                domain: None,
                zone: None,
                capacity_bytes: None,
            }],
            ..Self::default_standalone()
        }
    }

    /// Loads `data_dir/terna.toml`, writing the default first when it is absent.
    pub fn load_or_init(data_dir: &Path) -> Result<Config> {
        Self::load_or_init_with(data_dir, Self::default_standalone)
    }

    pub fn load_or_init_with(data_dir: &Path, default: fn() -> Config) -> Result<Config> {
        let path = data_dir.join(CONFIG_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text, &path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let config = default();
                let body = toml::to_string_pretty(&config)
                    .map_err(|e| Error::internal(format!("cannot encode default config: {e}")))?;
                atomic_write(&path, format!("{HEADER}\n{body}").as_bytes())?;
                Ok(config)
            }
            Err(e) => Err(Error::io(format!("cannot read {}", path.display()), e)),
        }
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        let config: Config =
            toml::from_str(text).map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        if !(self.overcommit_ratio.is_finite() && self.overcommit_ratio > 0.0) {
            return Err(Error::invalid(format!(
                "{}: overcommit_ratio must be a positive number, got {}",
                path.display(),
                self.overcommit_ratio
            )));
        }
        let mut names = std::collections::BTreeSet::new();
        for pool in &self.pools {
            if pool.name.is_empty()
                || !pool
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            {
                return Err(Error::invalid(format!(
                    "{}: pool name {:?} must be non-empty and use only letters, digits, '-', '_' and '.'",
                    path.display(),
                    pool.name
                )));
            }
            if let Some(node) = &pool.node
                && !self.nodes.iter().any(|n| &n.name == node)
            {
                return Err(Error::invalid(format!(
                    "{}: pool {:?} is on node {node:?}, which has no [[nodes]] entry with its agent address",
                    path.display(),
                    pool.name
                )));
            }
            match &pool.nfs {
                None if pool.path.as_os_str().is_empty() => {
                    return Err(Error::invalid(format!(
                        "{}: pool {:?} needs a path (a local directory) or an [pools.nfs] table",
                        path.display(),
                        pool.name
                    )));
                }
                Some(_) if !pool.path.as_os_str().is_empty() || pool.node.is_some() => {
                    return Err(Error::invalid(format!(
                        "{}: NFS pool {:?} takes neither path nor node: it is reached from every node",
                        path.display(),
                        pool.name
                    )));
                }
                Some(nfs) if nfs.server.is_empty() || !nfs.export.starts_with('/') => {
                    return Err(Error::invalid(format!(
                        "{}: NFS pool {:?} needs a server and an absolute export path, got {:?}:{:?}",
                        path.display(),
                        pool.name,
                        nfs.server,
                        nfs.export
                    )));
                }
                _ => {}
            }
            if !names.insert(pool.name.as_str()) {
                return Err(Error::invalid(format!(
                    "{}: pool name {:?} is used twice",
                    path.display(),
                    pool.name
                )));
            }
        }
        Ok(())
    }

    /// The cluster token, or an empty one when no token file is configured
    /// (agents then accept only peers that also have none).
    pub fn cluster_token(&self, data_dir: &Path) -> Result<Vec<u8>> {
        let Some(file) = &self.cluster_token_file else {
            return Ok(Vec::new());
        };
        let path = if file.is_absolute() {
            file.clone()
        } else {
            data_dir.join(file)
        };
        let token = std::fs::read(&path)
            .map_err(|e| Error::io(format!("cannot read cluster token {}", path.display()), e))?;
        Ok(token.trim_ascii().to_vec())
    }

    pub fn pool_path(&self, data_dir: &Path, pool: &PoolConfig) -> PathBuf {
        if pool.path.is_absolute() {
            pool.path.clone()
        } else {
            data_dir.join(&pool.path)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let written = Config::load_or_init(dir.path()).unwrap();
        let read = Config::load_or_init(dir.path()).unwrap();
        assert_eq!(written, read);
        assert_eq!(read.pools.len(), 3);
        let text = std::fs::read_to_string(dir.path().join(CONFIG_FILE)).unwrap();
        assert!(text.starts_with("# Terna standalone configuration"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_rejected_with_the_file_named() {
        let p = Path::new("/x/terna.toml");
        let err = Config::parse("overcommit = 2.0\n", p).unwrap_err();
        assert!(err.message.contains("/x/terna.toml"), "{}", err.message);
        assert!(err.message.contains("overcommit"), "{}", err.message);
        let err = Config::parse("overcommit_ratio = 0.0\n", p).unwrap_err();
        assert!(err.message.contains("positive"), "{}", err.message);
        let dup = "[[pools]]\nname='a'\npath='a'\ntier='fast'\n[[pools]]\nname='a'\npath='b'\ntier='slow'\n";
        assert!(Config::parse(dup, p).unwrap_err().message.contains("twice"));
        let bad_tier = "[[pools]]\nname='a'\npath='a'\ntier='blazing'\n";
        assert!(Config::parse(bad_tier, p).is_err());
        let orphan = "[[pools]]\nname='a'\nnode='n9'\npath='a'\ntier='fast'\n";
        let err = Config::parse(orphan, p).unwrap_err();
        assert!(
            err.message.contains("no [[nodes]] entry"),
            "{}",
            err.message
        );
        let ok = "[[nodes]]\nname='n9'\nagent='10.1.0.9:7420'\n[[pools]]\nname='a'\nnode='n9'\npath='a'\ntier='fast'\n";
        Config::parse(ok, p).unwrap();
    }
}
