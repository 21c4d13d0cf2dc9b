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

use crate::engine::assemble::assemble;
use crate::error::{Error, Result};
use crate::frontend::BlockDevice;
use crate::frontend::fuse::{self, FuseExport, FuseOptions};

pub struct EngineArgs {
    pub data_dir: PathBuf,
    pub node_id: String,
    pub volume_id: String,
    pub mountpoint: PathBuf,
}

const CHECK_INTERVAL: Duration = Duration::from_secs(1);
const STATS_INTERVAL: Duration = Duration::from_secs(1);
const REPLICA_IO_THREADS: usize = 64;

pub fn run(args: EngineArgs) -> Result<()> {
    let signals = SigSet::from_iter([Signal::SIGTERM, Signal::SIGINT, Signal::SIGUSR1]);
    // Blocked before any thread starts, so only the signal thread sees them.
    signals
        .thread_block()
        .map_err(|e| Error::io("cannot block signals", e.into()))?;

    let volume_id = args.volume_id.as_str();
    let (engine, store) = assemble(&args.data_dir, &args.node_id, volume_id, REPLICA_IO_THREADS)?;
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
    // I/O counters for the node's /metrics, as a file beside the FUSE
    // mount; a reader sees the old or the new snapshot, never half of one.
    if let Some(run_dir) = args.mountpoint.parent().map(|p| p.to_path_buf()) {
        let engine = engine.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("stats".into())
            .spawn(move || {
                let (path, tmp) = (
                    run_dir.join(crate::node::metrics::STATS_FILE),
                    run_dir.join(".stats.json.tmp"),
                );
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(bytes) = serde_json::to_vec(&engine.io_stats()) {
                        let _ =
                            std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &path));
                    }
                    std::thread::sleep(STATS_INTERVAL);
                }
            })
            .map_err(|e| Error::io("cannot start the stats writer", e))?;
    }
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
