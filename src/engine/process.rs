//! `terna engine`: the process that runs one staged volume's engine and its
//! FUSE export. It lives apart from the node plugin so that restarting the
//! plugin never takes a mounted volume down with it.
//!
//! It prints `ready` on stdout once the export is mounted, ends when the
//! FUSE mount goes away (SIGTERM unmounts it), and re-reads the volume's
//! size from the state store on SIGUSR1 (after an expansion).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};
use tracing::{info, warn};

use crate::config::Config;
use crate::controller::ControllerCore;
use crate::dirty::{DEFAULT_REGION, DirtyMap};
use crate::engine::{
    Engine, EngineOptions, EngineReplica, RebuildPolicy, Replacer, dirty_map_file,
};
use crate::error::{Error, Result};
use crate::frontend::BlockDevice;
use crate::frontend::fuse::{self, FuseExport, FuseOptions};
use crate::pools::Pools;
use crate::store::{FileStore, StateStore};
use crate::volume::replica_file_name;

pub struct EngineArgs {
    pub data_dir: PathBuf,
    pub node_id: String,
    pub volume_id: String,
    pub mountpoint: PathBuf,
}

const CHECK_INTERVAL: Duration = Duration::from_secs(1);
const REPLICA_IO_THREADS: usize = 64;

pub fn run(args: EngineArgs) -> Result<()> {
    let signals = SigSet::from_iter([Signal::SIGTERM, Signal::SIGINT, Signal::SIGUSR1]);
    // Blocked before any thread starts, so only the signal thread sees them.
    signals
        .thread_block()
        .map_err(|e| Error::io("cannot block signals", e.into()))?;

    let config = Config::load_or_init(&args.data_dir)?;
    let store: Arc<dyn StateStore> = Arc::new(FileStore::open(&crate::state_dir(&args.data_dir))?);
    let pools = Pools::from_config(&config, &args.data_dir, &args.node_id)?;
    let volume_id = args.volume_id.as_str();
    let record = store
        .get(volume_id)?
        .ok_or_else(|| Error::not_found(format!("volume {volume_id} does not exist")))?;

    // Dirty maps live beside the FUSE mountpoint, in the volume's run dir.
    let dirty_dir = args
        .mountpoint
        .parent()
        .map(|p| p.to_path_buf())
        .ok_or_else(|| Error::invalid("mountpoint has no parent dir"))?;
    let mut replicas = Vec::new();
    for (index, replica) in record.replicas.iter().enumerate() {
        let opened = pools
            .get(&replica.pool)
            .and_then(|p| p.backend.open(&replica_file_name(volume_id, index)));
        if !replica.is_healthy() {
            // A faulted replica that is still there can catch up: on what
            // its dirty map says, or on everything when the map is lost.
            if let Ok(io) = opened {
                let map = std::fs::read(dirty_dir.join(dirty_map_file(index)))
                    .ok()
                    .and_then(|b| DirtyMap::decode(&b))
                    .unwrap_or_else(|| {
                        let mut m = DirtyMap::new(record.capacity_bytes, DEFAULT_REGION);
                        m.mark_all();
                        m
                    });
                replicas.push(EngineReplica {
                    index,
                    io,
                    missed: Some(map),
                });
            }
            continue;
        }
        match opened {
            Ok(io) => replicas.push(EngineReplica {
                index,
                io,
                missed: None,
            }),
            Err(e) => {
                // Nothing has been written through this engine yet, so
                // recording the fault now is in time; without a map the
                // replica copies everything if it returns.
                warn!(volume_id, replica = index, error = %e, "replica cannot be opened");
                let reason = format!("cannot open at engine start: {e}");
                store.update(volume_id, &mut |r| Ok(r.fault_replica(index, &reason)))?;
            }
        }
    }
    let healthy = replicas.iter().filter(|r| r.missed.is_none()).count();
    let pools = Arc::new(pools);
    let controller = Arc::new(ControllerCore::new(
        store.clone(),
        pools.clone(),
        config.overcommit_ratio,
    ));
    let replacer: Replacer = {
        let pools = pools.clone();
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
    let rebuild = RebuildPolicy {
        replace_after: Duration::from_secs(config.replace_after_secs),
        bytes_per_sec: config.rebuild_mib_per_sec << 20,
        replacer: Some(replacer),
    };
    let min_healthy = usize::from(record.class.min_healthy);
    if healthy < min_healthy {
        return Err(Error::new(
            crate::error::ErrorKind::Unavailable,
            format!(
                "volume {volume_id} has {healthy} usable replica(s), its class needs {min_healthy}"
            ),
        ));
    }
    let engine = Arc::new(
        Engine::new(
            volume_id,
            record.capacity_bytes,
            replicas,
            store.clone(),
            EngineOptions {
                min_healthy,
                worker_threads: REPLICA_IO_THREADS,
                dirty_dir: Some(dirty_dir),
                rebuild,
            },
        )
        .map_err(|e| Error::io("cannot start replica I/O threads", e))?,
    );
    let export = FuseExport::mount(&args.mountpoint, engine.clone(), FuseOptions::default())
        .map_err(|e| {
            Error::with_source(
                crate::error::ErrorKind::Internal,
                "cannot mount FUSE export",
                e,
            )
        })?;
    info!(volume_id, healthy = engine.healthy_count(), "engine ready");
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "ready").and_then(|()| stdout.flush());

    let stop = Arc::new(AtomicBool::new(false));
    let checker = {
        let engine = engine.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("replica-check".into())
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    engine.check_replicas();
                    engine.replace_lost();
                    engine.catch_up();
                    std::thread::sleep(CHECK_INTERVAL);
                }
            })
            .map_err(|e| Error::io("cannot start replica checker", e))?
    };
    {
        let engine = engine.clone();
        let store = store.clone();
        let mountpoint = args.mountpoint.clone();
        let volume_id = volume_id.to_string();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                loop {
                    match signals.wait() {
                        Ok(Signal::SIGUSR1) => match store.get(&volume_id) {
                            Ok(Some(r)) => {
                                info!(volume_id, size = r.capacity_bytes, "engine size reloaded");
                                engine.set_size(r.capacity_bytes);
                            }
                            other => warn!(volume_id, ?other, "cannot reload volume size"),
                        },
                        Ok(_) => {
                            if let Err(e) = fuse::unmount(&mountpoint) {
                                warn!(volume_id, error = %e, "cannot unmount FUSE export");
                            }
                            return;
                        }
                        Err(e) => {
                            warn!(volume_id, error = %e, "sigwait failed");
                            return;
                        }
                    }
                }
            })
            .map_err(|e| Error::io("cannot start signal thread", e))?;
    }

    export.wait();
    stop.store(true, Ordering::SeqCst);
    let _ = checker.join();
    if let Err(e) = engine.flush() {
        warn!(volume_id, error = %e, "final flush failed");
    }
    info!(volume_id, "engine stopped");
    Ok(())
}
