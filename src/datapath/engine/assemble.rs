//! Builds a volume's engine on the store and pools its role hands over:
//! every replica opened (faulted ones with what they missed), and the
//! replacement hook. Shared by the engine process and offline repair.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tracing::warn;

use crate::core::config::Config;
use crate::core::controller::ControllerCore;
use crate::core::dirty::{DEFAULT_REGION, DirtyMap};
use crate::core::error::{Error, ErrorKind, Result};
use crate::core::pool::Pools;
use crate::core::pool::ReplicaIo;
use crate::core::store::StateStore;
use crate::core::volume::{ReplicaState, replica_file_name, unix_now};
use crate::datapath::dirty_maps::DirtyMapFiles;
use crate::datapath::engine::gate::{LeaseReader, WriteGate};
use crate::datapath::engine::{Engine, EngineOptions, EngineReplica, RebuildPolicy, Replacer};
use crate::datapath::host::files::FileStore;

type Opener = Box<dyn Fn() -> Result<Box<dyn ReplicaIo>> + Send + Sync>;

/// A faulted replica that could not be opened when the engine started (its
/// node away, its file gone): every call tries to open it again, so one
/// whose node comes back catches up on what it missed instead of waiting
/// out the grace period to be replaced and rebuilt in full.
struct Reopening {
    what: String,
    open: Opener,
    io: OnceLock<Box<dyn ReplicaIo>>,
}

impl Reopening {
    fn get(&self) -> std::io::Result<&dyn ReplicaIo> {
        if self.io.get().is_none() {
            let io = (self.open)()
                .map_err(|e| std::io::Error::other(format!("{}: {}", self.what, e.report())))?;
            // A racing caller may have opened it first; either copy serves.
            let _ = self.io.set(io);
        }
        self.io
            .get()
            .map(|io| io.as_ref())
            .ok_or_else(|| std::io::Error::other(self.what.clone()))
    }
}

impl ReplicaIo for Reopening {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.get()?.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.get()?.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.get()?.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.get()?.discard(offset, len)
    }
    fn check(&self) -> std::result::Result<(), String> {
        self.get().map_err(|e| e.to_string())?.check()
    }
    fn fence(&self) -> std::io::Result<()> {
        self.get()?.fence()
    }
    fn fence_empty(&self) -> std::io::Result<()> {
        self.get()?.fence_empty()
    }
}

fn reopening(pools: &Arc<Pools>, volume_id: &str, index: usize, pool: &str) -> Box<dyn ReplicaIo> {
    let (pools, name, pool_name) = (
        pools.clone(),
        replica_file_name(volume_id, index),
        pool.to_string(),
    );
    Box::new(Reopening {
        what: format!("replica {index} on pool {pool}"),
        open: Box::new(move || pools.get(&pool_name)?.backend.open(&name)),
        io: OnceLock::new(),
    })
}

/// What an engine is built on, handed over by the role that starts it: a
/// standalone's files and configured pools, or a cluster's TernaVolumes and
/// StoragePools. The engine never decides which.
#[derive(Clone)]
pub struct Backing {
    pub store: Arc<dyn StateStore>,
    pub pools: Arc<Pools>,
    /// The nodes' liveness Leases, where other nodes may take a volume
    /// over (a cluster); engines then write only through a `WriteGate`.
    pub leases: Option<Arc<dyn LeaseReader>>,
}

impl Backing {
    /// A standalone data dir's: the file store and the configured pools,
    /// other nodes' reached with `token` over `transport`.
    pub fn standalone(
        data_dir: &std::path::Path,
        node_id: &str,
        config: &Config,
        token: &[u8],
        transport: &crate::datapath::agent::transport::Transport,
    ) -> Result<Backing> {
        Ok(Backing {
            store: Arc::new(FileStore::open(&crate::core::data_dir::state_dir(
                data_dir,
            ))?),
            pools: Arc::new(crate::datapath::pools::from_config(
                config, data_dir, node_id, token, transport,
            )?),
            leases: None,
        })
    }
}

/// `gate`: what the engine's writes wait at, kept by the caller from the
/// node's Lease; `None` only where no other node can take the volume over
/// while this engine runs.
pub fn assemble(
    data_dir: &std::path::Path,
    node_id: &str,
    volume_id: &str,
    io_threads: usize,
    config: &Config,
    backing: &Backing,
    gate: Option<Arc<WriteGate>>,
) -> Result<Arc<Engine>> {
    let (store, pools) = (backing.store.clone(), backing.pools.clone());
    let record = store
        .get(volume_id)?
        .ok_or_else(|| Error::not_found(format!("volume {volume_id} does not exist")))?;
    // Replicas are written under this node's claim on the volume, so once
    // another node takes it over, this engine's writes are fenced out.
    let claim = record.staged_on.clone().filter(|s| s.node == node_id);
    pools.act_under_claim(claim.as_ref().map_or(0, |s| s.epoch));
    let dirty_maps = DirtyMapFiles::new(data_dir).volume(volume_id);
    dirty_maps.create_dir()?;

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
                warn!(volume_id, replica = index, error = %e.report(), "faulted replica cannot be opened yet");
                reopening(&pools, volume_id, index, &replica.pool)
            });
            let map = dirty_maps.load(index).unwrap_or_else(|e| {
                warn!(volume_id, replica = index, error = %e.report(), "dirty map unreadable; catching up on everything");
                None
            });
            let map = map.unwrap_or_else(|| {
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
                warn!(volume_id, replica = index, error = %e.report(), "replica cannot be opened");
                let reason = format!("cannot open at engine start: {}", e.report());
                store.update(volume_id, &mut |r| Ok(r.fault_replica(index, &reason)))?;
                replicas.push(EngineReplica {
                    index,
                    io: reopening(&pools, volume_id, index, &replica.pool),
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
                .map_err(|e| std::io::Error::other(e.report().to_string()))?;
            pools
                .get(&pool)
                .and_then(|p| p.backend.open(&replica_file_name(&volume_id, index)))
                .map_err(|e| std::io::Error::other(e.report().to_string()))
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
            dirty_dir: Some(dirty_maps.dir().to_path_buf()),
            rebuild: RebuildPolicy {
                replace_after: Duration::from_secs(config.replace_after_secs),
                bytes_per_sec: config.rebuild_mib_per_sec << 20,
                replacer: Some(replacer),
            },
            claim,
            gate,
        },
    )
    .map_err(|e| Error::io("cannot start replica I/O threads", e))?;
    Ok(Arc::new(engine))
}
