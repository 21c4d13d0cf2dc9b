//! Builds a volume's engine from the data dir: configuration, state store,
//! pools, every replica opened (faulted ones with what they missed), and the
//! replacement hook. Shared by the engine process and offline repair.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::warn;

use crate::config::Config;
use crate::controller::ControllerCore;
use crate::dirty::{DEFAULT_REGION, DirtyMap};
use crate::engine::{
    Engine, EngineOptions, EngineReplica, RebuildPolicy, Replacer, dirty_map_file,
};
use crate::error::{Error, ErrorKind, Result};
use crate::pools::Pools;
use crate::replica::ReplicaIo;
use crate::store::{FileStore, StateStore};
use crate::volume::{ReplicaState, replica_file_name, unix_now};

/// A replica that cannot be reached at all; every operation fails.
struct Unreachable(String);

impl ReplicaIo for Unreachable {
    fn read_at(&self, _: &mut [u8], _: u64) -> std::io::Result<()> {
        Err(std::io::Error::other(self.0.clone()))
    }
    fn write_at(&self, _: &[u8], _: u64) -> std::io::Result<()> {
        Err(std::io::Error::other(self.0.clone()))
    }
    fn flush(&self) -> std::io::Result<()> {
        Err(std::io::Error::other(self.0.clone()))
    }
    fn discard(&self, _: u64, _: u64) -> std::io::Result<()> {
        Err(std::io::Error::other(self.0.clone()))
    }
    fn check(&self) -> std::result::Result<(), String> {
        Err(self.0.clone())
    }
}

pub fn assemble(
    data_dir: &std::path::Path,
    node_id: &str,
    volume_id: &str,
    io_threads: usize,
) -> Result<(Arc<Engine>, Arc<dyn StateStore>)> {
    let config = Config::load_or_init(data_dir)?;
    let (store, pools): (Arc<dyn StateStore>, Arc<Pools>) =
        match crate::cluster::node::ClusterBacking::open(data_dir, node_id, &config)? {
            Some(cluster) => (cluster.store, cluster.pools),
            None => (
                Arc::new(FileStore::open(&crate::state_dir(data_dir))?),
                Arc::new(Pools::from_config(&config, data_dir, node_id)?),
            ),
        };
    let record = store
        .get(volume_id)?
        .ok_or_else(|| Error::not_found(format!("volume {volume_id} does not exist")))?;
    let dirty_dir = crate::dirty_dir(data_dir, volume_id);
    std::fs::create_dir_all(&dirty_dir)
        .map_err(|e| Error::io(format!("cannot create {}", dirty_dir.display()), e))?;

    let mut replicas = Vec::new();
    for (index, replica) in record.replicas.iter().enumerate() {
        let opened = pools
            .get(&replica.pool)
            .and_then(|p| p.backend.open(&replica_file_name(volume_id, index)));
        if let ReplicaState::Faulted { since, .. } = &replica.state {
            // A faulted replica that is still there can catch up: on what
            // its dirty map says, or on everything when the map is lost. One
            // that cannot be opened stays in the engine as unreachable, so
            // it is replaced once its grace period is over.
            let io = opened.unwrap_or_else(|e| {
                Box::new(Unreachable(format!(
                    "replica {index} on pool {}: {e}",
                    replica.pool
                )))
            });
            {
                let map = std::fs::read(dirty_dir.join(dirty_map_file(index)))
                    .ok()
                    .and_then(|b| DirtyMap::decode(&b))
                    .unwrap_or_else(|| {
                        let mut m = DirtyMap::new(record.capacity_bytes, DEFAULT_REGION);
                        m.mark_all();
                        m
                    });
                let ago = Duration::from_secs(unix_now().saturating_sub(*since));
                replicas.push(EngineReplica {
                    index,
                    io,
                    missed: Some(map),
                    faulted_since: Instant::now().checked_sub(ago),
                });
            }
            continue;
        }
        match opened {
            Ok(io) => replicas.push(EngineReplica {
                index,
                io,
                missed: None,
                faulted_since: None,
            }),
            Err(e) => {
                // Nothing has been written through this engine yet, so
                // recording the fault now is in time, and it has missed
                // nothing so far.
                warn!(volume_id, replica = index, error = %e, "replica cannot be opened");
                let reason = format!("cannot open at engine start: {e}");
                store.update(volume_id, &mut |r| Ok(r.fault_replica(index, &reason)))?;
                replicas.push(EngineReplica {
                    index,
                    io: Box::new(Unreachable(reason)),
                    missed: Some(DirtyMap::new(record.capacity_bytes, DEFAULT_REGION)),
                    faulted_since: None,
                });
            }
        }
    }
    let healthy = replicas.iter().filter(|r| r.missed.is_none()).count();
    let min_healthy = usize::from(record.class.min_healthy);
    if healthy < min_healthy {
        return Err(Error::new(
            ErrorKind::Unavailable,
            format!(
                "volume {volume_id} has {healthy} usable replica(s), its class needs {min_healthy}"
            ),
        ));
    }
    let controller = Arc::new(ControllerCore::new(
        store.clone(),
        pools.clone(),
        config.overcommit_ratio,
    ));
    let replacer: Replacer = {
        let volume_id = volume_id.to_string();
        Box::new(move |index| {
            let pool = controller
                .replace_replica(&volume_id, index)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            pools
                .get(&pool)
                .and_then(|p| p.backend.open(&replica_file_name(&volume_id, index)))
                .map_err(|e| std::io::Error::other(e.to_string()))
        })
    };
    let engine = Engine::new(
        volume_id,
        record.capacity_bytes,
        replicas,
        store.clone(),
        EngineOptions {
            min_healthy,
            worker_threads: io_threads,
            dirty_dir: Some(dirty_dir),
            rebuild: RebuildPolicy {
                replace_after: Duration::from_secs(config.replace_after_secs),
                bytes_per_sec: config.rebuild_mib_per_sec << 20,
                replacer: Some(replacer),
            },
        },
    )
    .map_err(|e| Error::io("cannot start replica I/O threads", e))?;
    Ok((Arc::new(engine), store))
}
