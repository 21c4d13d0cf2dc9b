//! The admin-editable configuration of a data dir: pools, their tiers and
//! failure domains, and the overcommit ratio. Parsed and checked here;
//! read from and written to the data dir by `datapath::host::config_file`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::core::class::Tier;
use crate::core::error::{Error, Result};

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
    /// A cluster CA file kept elsewhere (shared with other machines, a
    /// mounted Secret), copied into the data dir's own whenever it changes;
    /// absent: the data dir's CA is made on first start and is its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_ca_file: Option<PathBuf>,
    /// How long a replica agent may take to answer before its replica is faulted.
    #[serde(default = "default_agent_timeout_ms")]
    pub agent_timeout_ms: u64,
    /// Connections this node's replica agent serves at once (one thread
    /// each); more are closed as they arrive.
    #[serde(default = "default_agent_max_connections")]
    pub agent_max_connections: usize,
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

/// Connections an agent serves at once by default. An engine keeps up to
/// 32 idle connections to each agent holding one of its replicas (more in
/// bursts), so this serves a dozen busy volumes per node pair; nodes with
/// more raise it.
pub const DEFAULT_AGENT_MAX_CONNECTIONS: usize = 512;

fn default_agent_max_connections() -> usize {
    DEFAULT_AGENT_MAX_CONNECTIONS
}

fn default_replace_after_secs() -> u64 {
    300
}

fn default_rebuild_mib_per_sec() -> u64 {
    256
}

pub(crate) const HEADER: &str = "\
# Terna standalone configuration, written with defaults on first start.
# Each pool is a directory standing for one disk. Edit tiers (fast | standard | slow),
# failure domains, zones, capacities and the overcommit ratio, then restart terna.
# Allocatable bytes of a pool = capacity_bytes (default: its filesystem's size) x overcommit_ratio.
# Pools on other machines: add [[nodes]] (name, agent = \"host:7420\") and give the pool
# node = \"name\"; both sides read the same cluster_token_file (make one with
# `openssl rand -hex 32 > token`; `terna agent` refuses to start without it) and the same cluster CA
# (copy tls/ca.json of this data dir to theirs, or point cluster_ca_file at one shared copy). A replica unreachable for
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
            cluster_ca_file: None,
            agent_timeout_ms: default_agent_timeout_ms(),
            agent_max_connections: default_agent_max_connections(),
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

    pub fn pool_path(&self, data_dir: &Path, pool: &PoolConfig) -> PathBuf {
        if pool.path.is_absolute() {
            pool.path.clone()
        } else {
            data_dir.join(&pool.path)
        }
    }
}

/// Shortest cluster token accepted.
pub const MIN_TOKEN_BYTES: usize = 16;
/// Longest cluster token accepted (it must fit in a pre-authentication Hello).
pub const MAX_TOKEN_BYTES: usize = 1024;
/// How the placeholder token deploy/kustomization.yaml once shipped
/// begins; it is public, so a token starting so protects nothing.
pub const PLACEHOLDER_TOKEN: &[u8] = b"REPLACE-ME";

/// Why a cluster token is refused, wherever it came from (a file, a
/// Secret); the caller says where it was and how to make a good one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenProblem {
    #[error("is {0} bytes, fewer than the {MIN_TOKEN_BYTES} required")]
    TooShort(usize),
    #[error("is {0} bytes, more than the {MAX_TOKEN_BYTES} allowed")]
    TooLong(usize),
    #[error("is the public placeholder that deploy/kustomization.yaml once shipped")]
    Placeholder,
}

/// The one check every cluster token passes: surrounding whitespace is not
/// part of it (a file's trailing newline), and what is left must be
/// `MIN_TOKEN_BYTES..=MAX_TOKEN_BYTES` long and not the placeholder.
/// Returns the token without the whitespace.
pub fn check_cluster_token(raw: &[u8]) -> Result<&[u8], TokenProblem> {
    let token = raw.trim_ascii();
    if token.len() < MIN_TOKEN_BYTES {
        return Err(TokenProblem::TooShort(token.len()));
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenProblem::TooLong(token.len()));
    }
    if token.starts_with(PLACEHOLDER_TOKEN) {
        return Err(TokenProblem::Placeholder);
    }
    Ok(token)
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::host::config_file::cluster_token;

    #[test]
    fn default_config_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let written = crate::datapath::host::config_file::load_or_init(dir.path()).unwrap();
        let read = crate::datapath::host::config_file::load_or_init(dir.path()).unwrap();
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

    fn with_token(dir: &Path, token: &[u8]) -> Config {
        std::fs::write(dir.join("token"), token).unwrap();
        Config {
            cluster_token_file: Some("token".into()),
            ..Config::default_standalone()
        }
    }

    #[test]
    fn cluster_tokens_are_trimmed_and_checked_for_length_and_the_placeholder() {
        assert_eq!(
            check_cluster_token(b"  0123456789abcdef\n"),
            Ok(&b"0123456789abcdef"[..])
        );
        assert_eq!(
            check_cluster_token(b"0123456789abcde\n"),
            Err(TokenProblem::TooShort(15))
        );
        assert_eq!(check_cluster_token(b""), Err(TokenProblem::TooShort(0)));
        assert_eq!(
            check_cluster_token(&[b'x'; MAX_TOKEN_BYTES + 1]),
            Err(TokenProblem::TooLong(MAX_TOKEN_BYTES + 1))
        );
        assert!(check_cluster_token(&[b'x'; MAX_TOKEN_BYTES]).is_ok());
        assert_eq!(
            check_cluster_token(b"REPLACE-ME-with-the-output-of-openssl-rand-hex-32"),
            Err(TokenProblem::Placeholder)
        );
    }

    #[test]
    fn a_missing_short_long_or_placeholder_token_is_refused_saying_how_to_make_one() {
        let dir = tempfile::tempdir().unwrap();
        let err = cluster_token(&Config::default_standalone(), dir.path()).unwrap_err();
        assert!(
            err.message.contains("cluster_token_file"),
            "{}",
            err.message
        );
        assert!(
            err.message.contains("openssl rand -hex 32"),
            "{}",
            err.message
        );
        for bad in [
            &b""[..],
            b"\n",
            b"   \n",
            b"short-token\n",
            b"REPLACE-ME-with-the-output-of-openssl-rand-hex-32",
            &[b'x'; 2000][..],
        ] {
            let err = cluster_token(&with_token(dir.path(), bad), dir.path()).unwrap_err();
            assert!(
                err.message.contains("cluster_token_file"),
                "{}",
                err.message
            );
            assert!(
                err.message.contains("openssl rand -hex 32"),
                "{}",
                err.message
            );
        }
        let missing = Config {
            cluster_token_file: Some("/nonexistent/token".into()),
            ..Config::default_standalone()
        };
        let err =
            crate::datapath::host::config_file::cluster_token(&missing, dir.path()).unwrap_err();
        assert!(
            err.message.contains("/nonexistent/token"),
            "{}",
            err.message
        );
        let good = "0123456789abcdef0123456789abcdef";
        let config = with_token(dir.path(), format!("  {good}\n").as_bytes());
        assert_eq!(
            crate::datapath::host::config_file::cluster_token(&config, dir.path()).unwrap(),
            good.as_bytes()
        );
    }

    #[test]
    fn the_token_and_the_private_dirs_are_tightened_at_start() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        // As an older version left it: everything 0755, the token 0644.
        for d in ["state/volumes", "dirty/tv-x", "fences/p"] {
            std::fs::create_dir_all(data.join(d)).unwrap();
        }
        for d in ["", "state", "dirty", "fences"] {
            std::fs::set_permissions(data.join(d), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let config = with_token(&data, b"0123456789abcdef0123456789abcdef");
        std::fs::set_permissions(data.join("token"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        crate::datapath::host::config_file::load_or_init(&data).unwrap();
        for d in ["state", "dirty", "fences"] {
            assert_eq!(mode(&data.join(d)), 0o700, "{d}");
        }
        assert_eq!(mode(&data.join(CONFIG_FILE)), 0o600);
        crate::datapath::host::config_file::cluster_token(&config, &data).unwrap();
        assert_eq!(mode(&data.join("token")), 0o600);
        assert_eq!(mode(&data), 0o700);
        // A new data dir is private from the start.
        let fresh = root.path().join("fresh/data");
        crate::datapath::host::config_file::load_or_init(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o700);
    }
}
