//! The pools this process can reach, built from the configuration, with the
//! labels placement needs.

use std::collections::BTreeMap;
use std::path::Path;

use crate::class::Tier;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::replica::Pool;
use crate::replica::local::LocalPool;

pub struct PoolEntry {
    pub name: String,
    pub node: String,
    pub tier: Tier,
    pub domain: String,
    pub zone: String,
    pub backend: Box<dyn Pool>,
}

pub struct Pools {
    entries: BTreeMap<String, PoolEntry>,
}

impl Pools {
    /// Every configured pool, as local pools of `node`.
    pub fn from_config(config: &Config, data_dir: &Path, node: &str) -> Result<Pools> {
        let mut entries = BTreeMap::new();
        for pool in &config.pools {
            let backend = LocalPool::new(&config.pool_path(data_dir, pool), pool.capacity_bytes)?;
            entries.insert(
                pool.name.clone(),
                PoolEntry {
                    name: pool.name.clone(),
                    node: node.to_string(),
                    tier: pool.tier,
                    domain: pool.domain.clone().unwrap_or_else(|| node.to_string()),
                    zone: pool.zone.clone().unwrap_or_else(|| "default".to_string()),
                    backend: Box::new(backend),
                },
            );
        }
        Ok(Pools { entries })
    }

    pub fn get(&self, name: &str) -> Result<&PoolEntry> {
        self.entries.get(name).ok_or_else(|| {
            Error::precondition(format!(
                "pool {name:?} is not configured on this node (known: {})",
                self.entries.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = &PoolEntry> {
        self.entries.values()
    }
}
