//! The node side of a volume: start its engine, attach the loop device, make
//! and mount the filesystem (stage); bind it into pods (publish); and undo
//! each step. Every operation checks what is already in place first, so it
//! can be repeated after a crash at any point.

pub mod filesystem;
pub mod metrics;
pub mod mounts;

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::capability::{AccessMode, AccessType, Capability};
use crate::error::{Error, ErrorKind, Result};
use crate::frontend::fuse;
use crate::frontend::loopdev::{LoopDevice, LoopOptions};
use crate::store::StateStore;
use crate::volume::{Phase, StagedOn, VolumeRecord};

const ENGINE_READY_TIMEOUT: Duration = Duration::from_secs(30);
const ENGINE_EXIT_TIMEOUT: Duration = Duration::from_secs(15);

pub struct NodeCore {
    data_dir: PathBuf,
    node_id: String,
    store: Arc<dyn StateStore>,
    /// Engines this process started, reaped when they stop.
    children: Mutex<HashMap<String, Child>>,
    /// Tells whether another node's claim has lapsed; `None` (standalone:
    /// one node) never takes a claim over.
    liveness: Option<Arc<dyn NodeLiveness>>,
}

/// Whether nodes are still alive, for taking over the staging claim of one
/// that died holding a volume.
pub trait NodeLiveness: Send + Sync {
    /// True once `node` has stopped renewing its lease for longer than the
    /// lease lasts.
    fn expired(&self, node: &str) -> Result<bool>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeStats {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub inodes: Option<(u64, u64, u64)>,
    pub abnormal: Option<String>,
}

impl NodeCore {
    pub fn new(data_dir: &Path, node_id: &str, store: Arc<dyn StateStore>) -> NodeCore {
        NodeCore {
            data_dir: data_dir.to_path_buf(),
            node_id: node_id.to_string(),
            store,
            children: Mutex::new(HashMap::new()),
            liveness: None,
        }
    }

    /// Lets stage take over claims of nodes `liveness` says are gone.
    pub fn with_liveness(mut self, liveness: Arc<dyn NodeLiveness>) -> NodeCore {
        self.liveness = Some(liveness);
        self
    }

    fn holder_expired(&self, node: &str) -> Result<bool> {
        match &self.liveness {
            Some(l) if node != self.node_id => l.expired(node),
            _ => Ok(false),
        }
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    fn run_dir(&self, volume_id: &str) -> PathBuf {
        self.data_dir.join("run").join(volume_id)
    }

    fn fuse_dir(&self, volume_id: &str) -> PathBuf {
        self.run_dir(volume_id).join("fuse")
    }

    fn backing_file(&self, volume_id: &str) -> PathBuf {
        self.fuse_dir(volume_id).join("volume")
    }

    fn record(&self, volume_id: &str) -> Result<VolumeRecord> {
        self.store
            .get(volume_id)?
            .ok_or_else(|| Error::not_found(format!("volume {volume_id} does not exist")))
    }

    pub fn stage(&self, volume_id: &str, staging_path: &Path, cap: &Capability) -> Result<()> {
        cap.check()?;
        let record = self.record(volume_id)?;
        if record.phase != Phase::Ready {
            return Err(Error::precondition(format!(
                "volume {volume_id} is {:?}, not ready",
                record.phase
            )));
        }
        let staging = staging_path.to_string_lossy().into_owned();
        // Claim the volume for this node before anything touches its data.
        let node = self.node_id.clone();
        let claim = |dead: Option<&StagedOn>| -> Result<Option<StagedOn>> {
            let mut conflict = None;
            self.store.update(volume_id, &mut |r| {
                let (changed, c) = r.try_claim(&node, &staging, dead);
                conflict = c;
                Ok(changed)
            })?;
            Ok(conflict)
        };
        let mut conflict = claim(None)?;
        if let Some(dead) = conflict.clone()
            && dead.staging_path != crate::repair::REPAIR_CLAIM
            && self.holder_expired(&dead.node)?
        {
            conflict = claim(Some(&dead))?;
            if conflict.is_none() {
                warn!(volume_id, dead = %dead.node, "took over the staging claim of a node whose lease expired");
            }
        }
        if let Some(s) = conflict {
            if s.staging_path == crate::repair::REPAIR_CLAIM {
                return Err(Error::new(
                    ErrorKind::Aborted,
                    format!(
                        "volume {volume_id} is being repaired on node {}; retry shortly",
                        s.node
                    ),
                ));
            }
            return Err(Error::precondition(format!(
                "volume {volume_id} is staged on node {} at {}; unstage it there first",
                s.node, s.staging_path
            )));
        }

        self.ensure_engine(volume_id)?;
        let device = self.ensure_loop(volume_id)?;
        if let AccessType::Mount {
            fs_type,
            mount_flags,
        } = &cap.access_type
        {
            let fs = fs_type.unwrap_or(record.class.fs_type);
            if !mounts::is_mounted(staging_path)? {
                if record.capacity_bytes < fs.min_bytes()
                    && filesystem::probe(device.path())?.is_none()
                {
                    return Err(Error::precondition(format!(
                        "volume {volume_id} has {} bytes, {} needs at least {}: create it larger or use ext4",
                        record.capacity_bytes,
                        fs.as_str(),
                        fs.min_bytes()
                    )));
                }
                filesystem::ensure(device.path(), fs)?;
                std::fs::create_dir_all(staging_path).map_err(|e| {
                    Error::io(format!("cannot create {}", staging_path.display()), e)
                })?;
                mounts::mount_fs(device.path(), staging_path, fs.as_str(), mount_flags)?;
            }
        }
        info!(volume_id, device = %device.path().display(), "volume staged");
        Ok(())
    }

    /// The loop device serving `volume_id`, if it is staged here.
    pub fn device(&self, volume_id: &str) -> Result<Option<LoopDevice>> {
        LoopDevice::find_by_backing(&self.backing_file(volume_id))
            .map_err(|e| Error::with_source(ErrorKind::Internal, "cannot scan loop devices", e))
    }

    fn ensure_loop(&self, volume_id: &str) -> Result<LoopDevice> {
        if let Some(dev) = self.device(volume_id)? {
            return Ok(dev);
        }
        LoopDevice::attach(
            &self.backing_file(volume_id),
            LoopOptions {
                read_only: false,
                direct_io: true,
            },
        )
        .map_err(|e| Error::with_source(ErrorKind::Internal, "cannot attach loop device", e))
    }

    /// The engine's supervisor is alive and its session mounted. Nothing
    /// here touches the export itself: while a crashed worker is being
    /// replaced, requests to it wait, and so would a stat.
    fn engine_running(&self, volume_id: &str) -> Result<bool> {
        let dir = self.fuse_dir(volume_id);
        if !mounts::mount_at(&dir)?.is_some_and(|m| m.fs_type.starts_with("fuse")) {
            return Ok(false);
        }
        Ok(self
            .engine_pid(volume_id)
            .is_some_and(|pid| is_engine_process(pid, volume_id)))
    }

    fn engine_pid(&self, volume_id: &str) -> Option<i32> {
        std::fs::read_to_string(self.run_dir(volume_id).join("engine.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
    }

    fn ensure_engine(&self, volume_id: &str) -> Result<()> {
        if self.engine_running(volume_id)? {
            return Ok(());
        }
        // A dead engine leaves its mount behind (reads fail with ENOTCONN).
        self.stop_engine(volume_id)?;
        let dir = self.fuse_dir(volume_id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
        let log_path = self.run_dir(volume_id).join("engine.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| Error::io(format!("cannot open {}", log_path.display()), e))?;
        let exe = std::env::current_exe().map_err(|e| Error::io("cannot find own binary", e))?;
        let mut child = Command::new(exe)
            .arg("engine")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--node-id")
            .arg(&self.node_id)
            .arg("--volume")
            .arg(volume_id)
            .arg("--mountpoint")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            // Its own process group: a signal to the plugin must not reach
            // the engines serving mounted volumes.
            .process_group(0)
            .spawn()
            .map_err(|e| Error::io("cannot start engine", e))?;
        if !crate::engine::process::says_ready(&mut child, ENGINE_READY_TIMEOUT) {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "engine for volume {volume_id} did not start: {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                ),
            ));
        }
        let pid = child.id();
        if let Ok(mut children) = self.children.lock() {
            children.insert(volume_id.to_string(), child);
        }
        std::fs::write(self.run_dir(volume_id).join("engine.pid"), pid.to_string())
            .map_err(|e| Error::io("cannot write engine pid file", e))?;
        Ok(())
    }

    /// Stops the engine by unmounting its export (it exits when the kernel
    /// ends the session), and waits for the process to go.
    fn stop_engine(&self, volume_id: &str) -> Result<()> {
        let dir = self.fuse_dir(volume_id);
        fuse::unmount(&dir).map_err(|e| {
            Error::with_source(ErrorKind::Internal, "cannot unmount FUSE export", e)
        })?;
        let pid_file = self.run_dir(volume_id).join("engine.pid");
        let pid = self.engine_pid(volume_id);
        let child = self
            .children
            .lock()
            .ok()
            .and_then(|mut c| c.remove(volume_id));
        if let Some(mut child) = child {
            let deadline = Instant::now() + ENGINE_EXIT_TIMEOUT;
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    warn!(volume_id, "engine did not exit; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        } else if let Some(pid) = pid {
            // Started by an earlier run of this process: not our child.
            let deadline = Instant::now() + ENGINE_EXIT_TIMEOUT;
            while is_engine_process(pid, volume_id) {
                if Instant::now() > deadline {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = std::fs::remove_file(pid_file);
        Ok(())
    }

    pub fn unstage(&self, volume_id: &str, staging_path: &Path) -> Result<()> {
        // Once the engine's session is gone (its worker lost the claim, or
        // it died with the node), the loop device's backing path no longer
        // resolves, so the device is only known as what the staging path
        // was mounted from.
        let orphan = mounts::mount_at(staging_path)?
            .filter(|m| m.source.starts_with("/dev/loop"))
            .map(|m| LoopDevice::open(Path::new(&m.source)))
            .filter(|d| d.backing_file().is_some_and(|b| !b.exists()));
        mounts::unmount_all(staging_path)?;
        if let Some(dev) = self.device(volume_id)?.or(orphan) {
            dev.detach().map_err(|e| {
                Error::with_source(ErrorKind::Internal, "cannot detach loop device", e)
            })?;
        }
        self.stop_engine(volume_id)?;
        let node = self.node_id.clone();
        self.store.update(volume_id, &mut |r| {
            if r.staged_on.as_ref().is_some_and(|s| s.node == node) {
                r.staged_on = None;
                r.published.clear();
                Ok(true)
            } else {
                Ok(false)
            }
        })?;
        let _ = std::fs::remove_dir_all(self.run_dir(volume_id));
        info!(volume_id, "volume unstaged");
        Ok(())
    }

    pub fn publish(
        &self,
        volume_id: &str,
        staging_path: &Path,
        target: &Path,
        cap: &Capability,
        read_only: bool,
    ) -> Result<()> {
        cap.check()?;
        let record = self.record(volume_id)?;
        if record
            .staged_on
            .as_ref()
            .is_none_or(|s| s.node != self.node_id)
        {
            return Err(Error::precondition(format!(
                "volume {volume_id} is not staged on this node; NodeStageVolume first"
            )));
        }
        if mounts::is_mounted(target)? {
            return Ok(());
        }
        let t = target.to_string_lossy().into_owned();
        if cap.mode == AccessMode::SingleNodeSingleWriter
            && let Some(other) = record.published.iter().find(|p| **p != t)
        {
            return Err(Error::precondition(format!(
                "volume {volume_id} is single-writer and already published at {other}"
            )));
        }
        match &cap.access_type {
            AccessType::Mount { mount_flags, .. } => {
                if !mounts::is_mounted(staging_path)? {
                    return Err(Error::precondition(format!(
                        "staging path {} is not mounted; NodeStageVolume first",
                        staging_path.display()
                    )));
                }
                std::fs::create_dir_all(target)
                    .map_err(|e| Error::io(format!("cannot create {}", target.display()), e))?;
                mounts::bind_mount(staging_path, target, read_only, mount_flags)?;
            }
            AccessType::Block => {
                let dev = self.device(volume_id)?.ok_or_else(|| {
                    Error::precondition(format!(
                        "volume {volume_id} has no device; NodeStageVolume first"
                    ))
                })?;
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| Error::io(format!("cannot create {}", parent.display()), e))?;
                }
                if !target.exists() {
                    std::fs::File::create(target)
                        .map_err(|e| Error::io(format!("cannot create {}", target.display()), e))?;
                }
                mounts::bind_mount(dev.path(), target, read_only, &[])?;
            }
        }
        self.store.update(volume_id, &mut |r| {
            if r.published.contains(&t) {
                Ok(false)
            } else {
                r.published.push(t.clone());
                Ok(true)
            }
        })?;
        info!(volume_id, target = %target.display(), read_only, "volume published");
        Ok(())
    }

    pub fn unpublish(&self, volume_id: &str, target: &Path) -> Result<()> {
        self.record(volume_id)?;
        mounts::unmount_all(target)?;
        match std::fs::metadata(target) {
            Ok(m) if m.is_dir() => std::fs::remove_dir(target),
            Ok(_) => std::fs::remove_file(target),
            Err(_) => Ok(()),
        }
        .map_err(|e| Error::io(format!("cannot remove {}", target.display()), e))?;
        let t = target.to_string_lossy().into_owned();
        self.store.update(volume_id, &mut |r| {
            let before = r.published.len();
            r.published.retain(|p| p != &t);
            Ok(r.published.len() != before)
        })?;
        info!(volume_id, target = %target.display(), "volume unpublished");
        Ok(())
    }

    pub fn stats(&self, volume_id: &str, path: &Path) -> Result<VolumeStats> {
        let record = self.record(volume_id)?;
        let meta = std::fs::metadata(path)
            .map_err(|_| Error::not_found(format!("path {} does not exist", path.display())))?;
        let mut abnormal = record.degradation();
        if record.staged_on.is_some() && !self.engine_running(volume_id)? {
            abnormal = Some(format!(
                "engine of volume {volume_id} is not running{}",
                abnormal.map(|a| format!("; {a}")).unwrap_or_default()
            ));
        }
        if meta.is_dir() {
            let st = nix::sys::statvfs::statvfs(path)
                .map_err(|e| Error::io(format!("cannot statvfs {}", path.display()), e.into()))?;
            let frag = st.fragment_size();
            let total = st.blocks() * frag;
            let avail = st.blocks_available() * frag;
            let free = st.blocks_free() * frag;
            Ok(VolumeStats {
                total_bytes: total,
                available_bytes: avail,
                used_bytes: total.saturating_sub(free),
                inodes: Some((
                    st.files(),
                    st.files_available(),
                    st.files().saturating_sub(st.files_free()),
                )),
                abnormal,
            })
        } else {
            Ok(VolumeStats {
                total_bytes: record.capacity_bytes,
                available_bytes: 0,
                used_bytes: 0,
                inodes: None,
                abnormal,
            })
        }
    }

    /// Makes the staged device (and its filesystem, when `mount_path` is
    /// given) as large as the volume record says.
    pub fn expand(&self, volume_id: &str, mount_path: Option<&Path>) -> Result<u64> {
        let record = self.record(volume_id)?;
        let dev = self.device(volume_id)?.ok_or_else(|| {
            Error::precondition(format!("volume {volume_id} is not staged on this node"))
        })?;
        let want = record.capacity_bytes;
        let backing = self.backing_file(volume_id);
        let pid = self.engine_pid(volume_id).ok_or_else(|| {
            Error::precondition(format!("engine of volume {volume_id} is not running"))
        })?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let size = std::fs::metadata(&backing)
                .map_err(|e| Error::io(format!("cannot stat {}", backing.display()), e))?
                .len();
            if size >= want {
                break;
            }
            if Instant::now() > deadline {
                return Err(Error::internal(format!(
                    "engine of volume {volume_id} still reports {size} bytes, expected {want}"
                )));
            }
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGUSR1,
            )
            .map_err(|e| Error::io("cannot signal engine", e.into()))?;
            std::thread::sleep(Duration::from_millis(50));
        }
        dev.set_capacity()
            .map_err(|e| Error::with_source(ErrorKind::Internal, "cannot grow loop device", e))?;
        if let Some(path) = mount_path {
            filesystem::grow(dev.path(), path)?;
        }
        info!(volume_id, bytes = want, "volume expanded on node");
        Ok(want)
    }
}

fn is_engine_process(pid: i32, volume_id: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let text = String::from_utf8_lossy(&c);
            text.contains("engine") && text.contains(volume_id)
        })
        .unwrap_or(false)
}
