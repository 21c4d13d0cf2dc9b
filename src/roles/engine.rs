//! `terna engine`: the processes that run one staged volume's engine and its
//! FUSE export. They live apart from the node plugin so that restarting the
//! plugin never takes a mounted volume down with it.
//!
//! Two processes per volume:
//! - the supervisor (`terna engine`, what the node starts) mounts the FUSE
//!   session and holds its `/dev/fuse` fd, and does nothing else: no replica
//!   I/O, no state store, so little that can crash;
//! - the worker (`terna engine --fuse-fd N`, the supervisor's child) is the
//!   engine proper: it opens the replicas and answers the kernel on an
//!   inherited copy of that fd.
//!
//! The kernel keeps a FUSE session alive while any process holds its fd, so
//! a worker that dies (killed, crashed, out of memory) takes nothing down:
//! the loop device's requests wait, the supervisor starts a new worker on
//! the same session, and that worker has the kernel resend every request the
//! dead one had read but not answered (FUSE_NOTIFY_RESEND). Writes are
//! idempotent, so a resent write that had partly reached the replicas is
//! simply written again, everywhere. Before serving, a worker fences its
//! remote replicas, so writes the dead worker left in flight on the network
//! cannot land on top of newer ones.
//!
//! The supervisor prints `ready` on stdout once the first worker serves,
//! ends when the session does (SIGTERM unmounts it), and passes SIGUSR1
//! (re-read the size after an expansion) on to the worker.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use tracing::{error, info, warn};

use crate::core::data_dir::RunDir;
use crate::core::error::{Error, ErrorKind, Result};
use crate::core::store::StateStore;
use crate::core::volume::StagedOn;
use crate::datapath::engine::assemble::{Backing, assemble};
use crate::datapath::engine::gate::{LeaseReader, WriteGate};
use crate::datapath::frontend::BlockDevice;
use crate::datapath::frontend::fuse::{self, FuseExport, FuseOptions};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    pub data_dir: PathBuf,
    #[arg(long)]
    pub node_id: String,
    #[arg(long = "volume", value_name = "VOLUME")]
    pub volume_id: String,
    #[arg(long)]
    pub mountpoint: PathBuf,
    /// Set by the engine's supervisor for its worker: the FUSE session.
    #[arg(long)]
    pub fuse_fd: Option<RawFd>,
    /// The host's cgroup mount: the supervisor first leaves the node
    /// plugin's pod for the cgroup beside the pods, so the pod's end does
    /// not end the volume (set by `terna node --engine-cgroup-root`).
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
}

const CHECK_INTERVAL: Duration = Duration::from_secs(1);
const STATS_INTERVAL: Duration = Duration::from_secs(1);
const REPLICA_IO_THREADS: usize = 64;
/// Below the node plugin's own wait for `ready`, so a worker that never
/// comes up is reported by the supervisor, with its log.
const WORKER_READY_TIMEOUT: Duration = Duration::from_secs(25);
const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(100);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A worker that served this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// How often a worker makes sure its node still holds the volume's claim.
const CLAIM_CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// A worker's exit status when its claim was taken over: the supervisor
/// then ends the session instead of starting another worker.
const EXIT_CLAIM_LOST: i32 = 75;

pub fn run(args: Args) -> Result<()> {
    if args.fuse_fd.is_none()
        && let Some(root) = &args.cgroup_root
    {
        leave_pod(root, &args.volume_id);
    }
    let signals = SigSet::from_iter([Signal::SIGTERM, Signal::SIGINT, Signal::SIGUSR1]);
    // Blocked before any thread starts, so only the signal thread sees them.
    signals
        .thread_block()
        .map_err(|e| Error::io("cannot block signals", e.into()))?;
    match args.fuse_fd {
        None => supervise(&args, signals),
        Some(fd) => serve(&args, fd, signals),
    }
}

/// Before any thread: a move takes the whole process only while it is one
/// thread. A move that fails is loud but not fatal: the volume is served
/// either way, it just would not survive the plugin pod's end.
fn leave_pod(root: &std::path::Path, volume_id: &str) {
    use crate::datapath::host::cgroup::{self, Move};
    let memberships = match cgroup::own_memberships() {
        Ok(m) => m,
        Err(e) => {
            error!(volume_id, error = %e.report(), "cannot read this engine's cgroups; it ends with the node plugin's pod");
            return;
        }
    };
    for m in cgroup::leave_pod(root, &memberships, std::process::id()) {
        match m {
            Move::Moved { hierarchy, to } => {
                info!(volume_id, hierarchy, to = %to.display(), "engine left the node plugin's pod")
            }
            Move::Unmounted { hierarchy } => {
                warn!(volume_id, hierarchy, root = %root.display(), "cgroup hierarchy not mounted under the root given; the engine stays in the pod's cgroup there")
            }
            Move::Failed {
                hierarchy,
                error: e,
            } => {
                error!(volume_id, hierarchy, error = %e.report(), "engine cannot leave the node plugin's pod; it ends with the pod")
            }
        }
    }
}

fn internal(what: &'static str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::with_source(ErrorKind::Internal, what, e)
}

fn supervise(args: &Args, signals: SigSet) -> Result<()> {
    let volume_id = args.volume_id.as_str();
    let session = fuse::open_session(&args.mountpoint)
        .map_err(|e| internal("cannot mount FUSE export", e))?;
    // The workers' copy: without close-on-exec, so it survives their exec.
    let inheritable = nix::unistd::dup(session.as_fd())
        .map_err(|e| Error::io("cannot duplicate the FUSE fd", e.into()))?;
    let worker_pid = Arc::new(AtomicI32::new(0));
    let stopping = Arc::new(AtomicBool::new(false));
    {
        let (worker_pid, stopping) = (worker_pid.clone(), stopping.clone());
        let mountpoint = args.mountpoint.clone();
        let volume_id = volume_id.to_string();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                loop {
                    match signals.wait() {
                        Ok(Signal::SIGUSR1) => {
                            let pid = worker_pid.load(Ordering::SeqCst);
                            if pid > 0 {
                                let _ = nix::sys::signal::kill(
                                    nix::unistd::Pid::from_raw(pid),
                                    Signal::SIGUSR1,
                                );
                            }
                        }
                        Ok(_) => {
                            stopping.store(true, Ordering::SeqCst);
                            if let Err(e) = fuse::unmount(&mountpoint) {
                                warn!(volume_id, error = %e, "cannot unmount FUSE export");
                            }
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

    let run_dir = RunDir::around(&args.mountpoint);
    let mut restarts = 0u64;
    let mut backoff = RESTART_BACKOFF_MIN;
    loop {
        let started = Instant::now();
        let child = match start_worker(args, inheritable.as_raw_fd()) {
            Ok(child) => child,
            Err(e) if restarts == 0 => {
                let _ = fuse::unmount(&args.mountpoint);
                return Err(e);
            }
            Err(e) => {
                error!(volume_id, error = %e.report(), "engine worker did not come back; retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(RESTART_BACKOFF_MAX);
                continue;
            }
        };
        let mut child = child;
        let pid = i32::try_from(child.id()).unwrap_or(0);
        worker_pid.store(pid, Ordering::SeqCst);
        if let Some(dir) = &run_dir {
            // Replaced whole: a reader never sees it empty or half written.
            let _ = crate::datapath::host::files::atomic_write(
                &dir.worker_pid_file(),
                pid.to_string().as_bytes(),
            );
        }
        if restarts == 0 {
            info!(volume_id, worker = pid, "engine ready");
            let mut stdout = std::io::stdout();
            let _ = writeln!(stdout, "ready").and_then(|()| stdout.flush());
        } else {
            info!(
                volume_id,
                worker = pid,
                restarts,
                "engine worker restarted on the same session"
            );
        }
        let status = child
            .wait()
            .map_err(|e| Error::io("cannot wait for the engine worker", e))?;
        worker_pid.store(0, Ordering::SeqCst);
        if status.success() || stopping.load(Ordering::SeqCst) || session_ended(&session) {
            info!(volume_id, %status, "engine stopped");
            return Ok(());
        }
        if status.code() == Some(EXIT_CLAIM_LOST) {
            // Another node serves the volume now: every request here must
            // fail rather than wait for a worker that may not write.
            fuse::abort(&args.mountpoint);
            let _ = fuse::unmount(&args.mountpoint);
            return Err(Error::precondition(format!(
                "volume {volume_id} was taken over by another node; its session here is aborted"
            )));
        }
        restarts += 1;
        error!(
            volume_id,
            worker = pid,
            %status,
            signal = status.signal(),
            "engine worker died; its session lives on, starting another"
        );
        if started.elapsed() > STABLE_AFTER {
            backoff = RESTART_BACKOFF_MIN;
        } else {
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(RESTART_BACKOFF_MAX);
        }
    }
}

/// Whether the kernel has ended the session (unmounted and released, or
/// aborted): `/dev/fuse` then polls as an error.
fn session_ended(session: &OwnedFd) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(session.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP)),
        Err(_) => false,
    }
}

/// Starts a worker on the session and waits until it serves.
fn start_worker(args: &Args, fd: RawFd) -> Result<Child> {
    let exe = std::env::current_exe().map_err(|e| Error::io("cannot find own binary", e))?;
    let mut cmd = Command::new(exe);
    cmd.arg("engine")
        .arg("--data-dir")
        .arg(&args.data_dir)
        .arg("--node-id")
        .arg(&args.node_id)
        .arg("--volume")
        .arg(&args.volume_id)
        .arg("--mountpoint")
        .arg(&args.mountpoint)
        .arg("--fuse-fd")
        .arg(fd.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    // A worker must not outlive its supervisor: it would keep the session
    // alive with nobody left to restart it.
    crate::datapath::host::process::die_with_parent(&mut cmd);
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io("cannot start the engine worker", e))?;
    if !crate::datapath::engine::ready::says_ready(&mut child, WORKER_READY_TIMEOUT) {
        let _ = child.kill();
        let status = child.wait();
        return Err(Error::new(
            ErrorKind::Unavailable,
            format!(
                "engine worker for volume {} did not start ({status:?})",
                args.volume_id
            ),
        ));
    }
    Ok(child)
}

fn serve(args: &Args, fd: RawFd, signals: SigSet) -> Result<()> {
    let session = crate::datapath::frontend::inherited::adopt_session_fd(fd)?;
    let volume_id = args.volume_id.as_str();
    let config = crate::datapath::host::config_file::load_or_init(&args.data_dir)?;
    // The engine process is a role: it alone decides what its engine runs
    // on (a cluster node's data dir names its cluster in `cluster.json`).
    let transport = crate::datapath::pools::transport(&args.data_dir, &args.node_id);
    let backing = match crate::edge::kube::backing::read_cluster_file(&args.data_dir)? {
        Some(cluster) => crate::edge::kube::backing::open(
            &cluster,
            &args.node_id,
            &config,
            &crate::datapath::host::config_file::cluster_token(&config, &args.data_dir)?,
            &transport,
        )?,
        None => Backing::standalone(
            &args.data_dir,
            &args.node_id,
            &config,
            &crate::datapath::pools::cluster_token(&config, &args.data_dir, &args.node_id)?,
            &transport,
        )?,
    };
    let store = backing.store.clone();
    let gate = backing.leases.as_ref().map(|_| Arc::new(WriteGate::new()));
    let engine = assemble(
        &args.data_dir,
        &args.node_id,
        volume_id,
        REPLICA_IO_THREADS,
        &config,
        &backing,
        gate.clone(),
    )?;
    let claim = store
        .get(volume_id)?
        .and_then(|r| r.staged_on)
        .filter(|s| s.node == args.node_id)
        .ok_or_else(|| {
            Error::precondition(format!(
                "volume {volume_id} is not claimed by node {}",
                args.node_id
            ))
        })?;
    let confirm = {
        let (leases, gate, store) = (backing.leases.clone(), gate.clone(), store.clone());
        let (node, volume_id, claim) = (args.node_id.clone(), volume_id.to_string(), claim.clone());
        move || match (&leases, &gate) {
            (Some(leases), Some(gate)) => confirm_claim(
                leases.as_ref(),
                gate,
                store.as_ref(),
                &node,
                &volume_id,
                &claim,
            ),
            // No leases (one node, or a data dir shared by its processes):
            // the claim alone says whether this engine still serves.
            _ => claim_still_ours(store.as_ref(), &volume_id, &claim),
        }
    };
    // The first writes below (fences, resent requests) already need it.
    if let Err(e) = confirm() {
        warn!(volume_id, error = %e.report(), "cannot confirm this node's lease yet; writes wait for it");
    }
    // Before the fences (a replica that fails one is faulted, and must
    // then count what is not agreed on yet as missed) and before serving:
    // reads of those extents keep to one replica until the maintenance
    // rounds, after the fences, have resynchronised them.
    engine
        .start_resync()
        .map_err(|e| Error::io("cannot take over the write log", e))?;
    engine
        .fence_replicas()
        .map_err(|e| Error::io("cannot fence the volume's replicas", e))?;
    let export = FuseExport::serve(
        &args.mountpoint,
        session,
        engine.clone(),
        FuseOptions::default(),
    )
    .map_err(|e| internal("cannot serve FUSE export", e))?;
    info!(
        volume_id,
        healthy = engine.healthy_count(),
        "engine worker serving"
    );
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "ready").and_then(|()| stdout.flush());

    let stop = Arc::new(AtomicBool::new(false));
    // I/O counters for the node's /metrics, as a file beside the FUSE
    // mount; a reader sees the old or the new snapshot, never half of one.
    if let Some(run_dir) = RunDir::around(&args.mountpoint) {
        let engine = engine.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("stats".into())
            .spawn(move || {
                let (path, tmp) = (run_dir.stats_file(), run_dir.stats_temp_file());
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
    let (revoker, vid) = (export.revoker(), volume_id.to_string());
    // Passthrough I/O never reaches us, so it must be ended before this
    // engine stops answering for the volume: when its one replica is lost
    // (reads would otherwise go on from a removed file) or its claim moved.
    let revoke = move |why: &str| {
        if let Some(r) = &revoker {
            match r.revoke() {
                Ok(true) => warn!(volume_id = %vid, why, "passthrough I/O revoked"),
                Ok(false) => {}
                Err(e) => {
                    error!(volume_id = %vid, error = %e, why, "cannot revoke passthrough I/O")
                }
            }
        }
    };
    let revoke = Arc::new(revoke);
    let checker = {
        let (engine, stop, revoke) = (engine.clone(), stop.clone(), revoke.clone());
        std::thread::Builder::new()
            .name("replica-check".into())
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    engine.maintain(|| revoke("no healthy replica left"));
                    std::thread::sleep(CHECK_INTERVAL);
                }
            })
            .map_err(|e| Error::io("cannot start replica checker", e))?
    };
    // Its own thread: maintenance may itself wait at the gate (a catch-up
    // copy is a write), and only this thread can open it again.
    {
        let (stop, gate) = (stop.clone(), gate.clone());
        let volume_id = volume_id.to_string();
        let claim = claim.clone();
        std::thread::Builder::new()
            .name("claim-check".into())
            .spawn(move || {
                let mut claim_checked = Instant::now();
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(CHECK_INTERVAL);
                    // Sooner while the gate is about to lapse or has.
                    let due = gate.as_ref().map_or(CLAIM_CHECK_INTERVAL, |g| {
                        if g.remaining() < CLAIM_CHECK_INTERVAL * 2 {
                            CHECK_INTERVAL
                        } else {
                            CLAIM_CHECK_INTERVAL
                        }
                    });
                    if claim_checked.elapsed() < due {
                        continue;
                    }
                    claim_checked = Instant::now();
                    match confirm() {
                        Ok(Confirmed::Ours) => {}
                        Ok(Confirmed::Lost(now)) => {
                            error!(
                                volume_id,
                                epoch = claim.epoch,
                                ?now,
                                "this node's claim on the volume is gone; the engine stops"
                            );
                            if let Some(g) = &gate {
                                g.lose();
                            }
                            revoke("the claim moved to another node");
                            std::process::exit(EXIT_CLAIM_LOST);
                        }
                        // Unreachable store: writes go on while the gate
                        // allows, then wait for the next reading.
                        Err(e) => {
                            warn!(volume_id, error = %e.report(), "cannot confirm this node's claim")
                        }
                    }
                }
            })
            .map_err(|e| Error::io("cannot start the claim check", e))?;
    }
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
    match engine.flush() {
        // Nothing is in flight now: the next engine need compare nothing.
        Ok(()) => engine.sweep_write_log(Duration::ZERO),
        Err(e) => warn!(volume_id, error = %e, "final flush failed"),
    }
    info!(volume_id, "engine stopped");
    Ok(())
}

enum Confirmed {
    Ours,
    /// The record names another claim now (or none).
    Lost(Option<StagedOn>),
}

fn claim_still_ours(
    store: &dyn StateStore,
    volume_id: &str,
    claim: &StagedOn,
) -> Result<Confirmed> {
    let now = store.get(volume_id)?.and_then(|r| r.staged_on);
    Ok(if now.as_ref() == Some(claim) {
        Confirmed::Ours
    } else {
        Confirmed::Lost(now)
    })
}

/// One reading of this node's Lease and then of the volume's claim,
/// applied to the gate: writes may go on a margin short of when another
/// node could take the volume over (`core::lease`). The Lease is read
/// first: a claim seen ours after it means no takeover had happened by
/// then, and none can until that Lease lapses.
fn confirm_claim(
    leases: &dyn LeaseReader,
    gate: &WriteGate,
    store: &dyn StateStore,
    node: &str,
    volume_id: &str,
    claim: &StagedOn,
) -> Result<Confirmed> {
    let (read_at, wall) = (gate.now(), std::time::SystemTime::now());
    let lease = leases.read(node)?;
    if let lost @ Confirmed::Lost(_) = claim_still_ours(store, volume_id, claim)? {
        return Ok(lost);
    }
    let span = crate::core::lease::writable_for(&lease, node, wall);
    if span.is_none() {
        warn!(
            volume_id,
            ?lease,
            "this node's lease is not current; writes wait until it is renewed"
        );
    }
    gate.allow(read_at, span);
    Ok(Confirmed::Ours)
}
