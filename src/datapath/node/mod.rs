//! The node side of a volume: start its engine, attach the loop device, make
//! and mount the filesystem (stage); bind it into pods (publish); and undo
//! each step. Every operation checks what is already in place first, so it
//! can be repeated after a crash at any point.

pub mod paths;

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::core::capability::{AccessMode, AccessType, Capability};
use crate::core::data_dir::RunDir;
use crate::core::error::{Error, ErrorKind, Result};
use crate::core::store::StateStore;
use crate::core::volume::{Phase, StagedOn, VolumeRecord};
use crate::datapath::frontend::fuse;
use crate::datapath::frontend::loopdev::{LoopDevice, LoopError, LoopOptions};
use crate::datapath::host::{filesystem, mounts};

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
    /// Directories besides the data dir no volume is staged or published
    /// in or above: this node's pools.
    protected: Vec<PathBuf>,
    /// The host's cgroup mount, when engines must leave the pod this
    /// process runs in (see `host::cgroup`).
    engine_cgroup_root: Option<PathBuf>,
}

/// Whether nodes are still alive, for taking over the staging claim of one
/// that died holding a volume.
pub trait NodeLiveness: Send + Sync {
    /// True once `node` has stopped renewing its lease for longer than the
    /// lease lasts, and this node now holds that lease off for a while (so
    /// a late renewal of `node`'s cannot open its engines' write gates
    /// before its claims are taken over).
    fn hold_off_if_expired(&self, node: &str) -> Result<bool>;
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
            protected: Vec::new(),
            engine_cgroup_root: None,
        }
    }

    /// Never stages or publishes in or above these directories (the pools).
    pub fn with_protected(mut self, dirs: impl IntoIterator<Item = PathBuf>) -> NodeCore {
        self.protected.extend(dirs);
        self
    }

    /// Engines it starts move out of this process's pod into the cgroup
    /// beside the pods, under the host's cgroup mount `root`, so that the
    /// pod's end does not end them.
    pub fn with_engine_cgroup_root(mut self, root: Option<PathBuf>) -> NodeCore {
        self.engine_cgroup_root = root;
        self
    }

    /// Lets stage take over claims of nodes `liveness` says are gone.
    pub fn with_liveness(mut self, liveness: Arc<dyn NodeLiveness>) -> NodeCore {
        self.liveness = Some(liveness);
        self
    }

    fn holder_expired(&self, node: &str) -> Result<bool> {
        match &self.liveness {
            Some(l) if node != self.node_id => l.hold_off_if_expired(node),
            _ => Ok(false),
        }
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    fn run_dir(&self, volume_id: &str) -> RunDir {
        RunDir::of(&self.data_dir, volume_id)
    }

    fn fuse_dir(&self, volume_id: &str) -> PathBuf {
        self.run_dir(volume_id).fuse_dir()
    }

    fn backing_file(&self, volume_id: &str) -> PathBuf {
        self.fuse_dir(volume_id).join(fuse::FILE_NAME)
    }

    /// The volume's record. The id is checked before anything else, and
    /// every path built from an id is built after this succeeded.
    fn record(&self, volume_id: &str) -> Result<VolumeRecord> {
        crate::core::volume::check_volume_id(volume_id)?;
        self.store
            .get(volume_id)?
            .ok_or_else(|| Error::not_found(format!("volume {volume_id} does not exist")))
    }

    /// Refuses a staging path or target that is not a plain absolute path,
    /// or lies in a system directory or Terna's own data dir.
    fn check_caller_path(&self, path: &Path, what: &str) -> Result<()> {
        paths::caller_path(&path.to_string_lossy(), what)?;
        let mut own: Vec<PathBuf> = vec![self.data_dir.clone()];
        own.extend(self.protected.iter().cloned());
        let real: Vec<PathBuf> = own
            .iter()
            .filter_map(|p| std::fs::canonicalize(p).ok())
            .collect();
        own.extend(real);
        let own: Vec<&Path> = own.iter().map(PathBuf::as_path).collect();
        paths::outside_protected(path, what, &own)?;
        // Mounting follows symlinks, while the mount table and every later
        // call name the real path: a path through a symlink could be
        // published twice and never unpublished.
        if paths::resolved(path) != path {
            return Err(Error::invalid(format!(
                "{what} {} leads through a symlink; give the path it resolves to",
                crate::core::volume::shown(&path.to_string_lossy())
            )));
        }
        Ok(())
    }

    /// Where the volumes staged on this node live: no volume is mounted
    /// inside or above another.
    fn check_outside_volumes(&self, path: &Path, what: &str, volume_id: &str) -> Result<()> {
        let records = self.store.list()?;
        let occupied: Vec<(&str, &Path)> = records
            .iter()
            .filter_map(|r| {
                // A repair claim has no staging path.
                let staged = r
                    .staged_on
                    .as_ref()
                    .filter(|s| s.node == self.node_id && !s.is_repair())?;
                Some(
                    std::iter::once(staged.staging_path.as_str())
                        .chain(r.published.iter().map(String::as_str))
                        .map(move |p| (r.id.as_str(), Path::new(p))),
                )
            })
            .flatten()
            .collect();
        paths::outside_volumes(path, what, volume_id, &occupied)
    }

    pub fn stage(&self, volume_id: &str, staging_path: &Path, cap: &Capability) -> Result<()> {
        cap.check()?;
        let record = self.record(volume_id)?;
        self.check_caller_path(staging_path, "staging target path")?;
        self.check_outside_volumes(staging_path, "staging target path", volume_id)?;
        if record.phase != Phase::Ready {
            return Err(Error::precondition(format!(
                "volume {volume_id} is {:?}, not ready",
                record.phase
            )));
        }
        // Something already mounted at the staging path must be this
        // volume's own device, or staging stops before touching anything.
        let staged_mount = mounts::mount_at(staging_path)?;
        let own_mount = staged_mount
            .as_ref()
            .is_some_and(|m| self.own_device_of(volume_id, m).is_some());
        if let Some(m) = &staged_mount
            && own_mount
        {
            // Staged already: only the same way is the same request.
            let differs = match &cap.access_type {
                AccessType::Block => Some("a block device".to_string()),
                AccessType::Mount {
                    fs_type: Some(fs), ..
                } if fs.as_str() != m.fs_type => Some(fs.as_str().to_string()),
                AccessType::Mount { mount_flags, .. } => self
                    .staged_flags(volume_id)
                    .filter(|staged| *staged != sorted(mount_flags))
                    .map(|staged| {
                        format!(
                            "mount flags [{}] (staged with [{}])",
                            sorted(mount_flags).join(", "),
                            staged.join(", ")
                        )
                    }),
            };
            if let Some(asked) = differs {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "volume {volume_id} is staged at {} with {}, not as {asked}; unstage it first",
                        staging_path.display(),
                        m.fs_type
                    ),
                ));
            }
        }
        if let Some(m) = staged_mount
            && !own_mount
        {
            return Err(Error::precondition(format!(
                "staging path {} already has {} ({}) mounted, not volume {volume_id}; unmount it first",
                staging_path.display(),
                m.source,
                m.fs_type
            )));
        }
        if let AccessType::Mount { .. } = &cap.access_type
            && std::fs::symlink_metadata(staging_path).is_ok_and(|m| !m.is_dir())
        {
            return Err(Error::invalid(format!(
                "staging target path {} exists and is not a directory",
                staging_path.display()
            )));
        }
        let staging = staging_path.to_string_lossy().into_owned();
        let was_here = record
            .staged_on
            .as_ref()
            .is_some_and(|s| s.node == self.node_id && s.staging_path == staging);
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
            && !dead.is_repair()
            && self.holder_expired(&dead.node)?
        {
            conflict = claim(Some(&dead))?;
            if conflict.is_none() {
                warn!(volume_id, dead = %dead.node, "took over the staging claim of a node whose lease expired");
            }
        }
        if let Some(s) = conflict {
            if s.is_repair() {
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

        // Staged here already, as asked: a failure now (the first block not
        // answering, say) is reported, and the kubelet's NodeUnstageVolume
        // or retry deals with it.
        let staged_before = was_here
            && self.engine_running(volume_id)?
            && match cap.access_type {
                AccessType::Mount { .. } => own_mount,
                AccessType::Block => self.device(volume_id)?.is_some(),
            };
        let staged = self.stage_claimed(volume_id, staging_path, cap, &record);
        if let Err(e) = &staged
            && !staged_before
        {
            // A stage that failed once it had started the engine or
            // attached the device (the first one here, or one after a
            // reboot or crash left only the claim) leaves nothing holding
            // the volume: a retry at another path, or a DeleteVolume, must
            // not find it claimed with an engine running.
            if let Err(undo) = self.unstage(volume_id, staging_path) {
                warn!(volume_id, error = %e.report(), undo_error = %undo.report(), "failed stage could not be undone");
            }
        }
        staged
    }

    /// The rest of `stage`, once the claim is this node's.
    fn stage_claimed(
        &self,
        volume_id: &str,
        staging_path: &Path,
        cap: &Capability,
        record: &VolumeRecord,
    ) -> Result<()> {
        if !self.engine_running(volume_id)? {
            // The engine (its supervisor) died: the device still reads from
            // its dead session and can never work again. Rebuild the stack
            // unless a pod still holds it.
            self.drop_dead_device(volume_id, staging_path)?;
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
                let file = self.run_dir(volume_id).mount_flags_file();
                let mut text = sorted(mount_flags).join("\n");
                text.push('\n');
                std::fs::write(&file, text)
                    .map_err(|e| Error::io(format!("cannot write {}", file.display()), e))?;
            }
        }
        // OK means the volume answers, not only that the pieces exist.
        read_first_block(device.path()).map_err(|e| {
            Error::with_source(
                ErrorKind::Unavailable,
                format!(
                    "volume {volume_id} is staged but its device {} does not answer reads",
                    device.path().display()
                ),
                e,
            )
        })?;
        info!(volume_id, device = %device.path().display(), "volume staged");
        Ok(())
    }

    /// Tears down the loop device of an engine that is gone (and the
    /// staging mount on it), so staging can start afresh. Refused while
    /// anything but the staging path still holds the device: taking it
    /// from under a pod would hand the pod whatever volume gets the device
    /// next.
    fn drop_dead_device(&self, volume_id: &str, staging: &Path) -> Result<()> {
        let mut dev = None;
        let held = self.holders(volume_id, Some(staging))?;
        if !held.is_empty() {
            return Err(Error::precondition(format!(
                "the engine of volume {volume_id} stopped while it is published at {}; \
                 unpublish and unstage it, then stage it again",
                join_paths(&held)
            )));
        }
        while let Some(m) = mounts::mount_at(staging)? {
            let Some(d) = self.own_device_of(volume_id, &m) else {
                break;
            };
            mounts::unmount_one(staging)?;
            dev = dev.or(Some(d));
        }
        for dev in self.devices_to_release(volume_id, dev)? {
            warn!(volume_id, device = %dev.path().display(), "engine of staged volume is gone; restaging");
            release_device(volume_id, &dev)?;
        }
        Ok(())
    }

    /// The loop device serving `volume_id`, if it is staged here.
    pub fn device(&self, volume_id: &str) -> Result<Option<LoopDevice>> {
        let found = LoopDevice::find_all_by_backing(&self.backing_file(volume_id))
            .map_err(|e| Error::with_source(ErrorKind::Internal, "cannot scan loop devices", e))?
            .into_iter()
            .filter(|d| !d.tearing_down())
            .find(|d| self.backed_here(volume_id, d));
        Ok(found.or_else(|| self.detached_device(volume_id)))
    }

    /// Whether `dev`, whose backing path reads as this volume's FUSE file,
    /// is backed by this node's FUSE session of it. A path is the same in
    /// every mount namespace, and several nodes may share a kernel (or a
    /// node comes back after a crash, its old device number taken by
    /// another volume or node): without a FUSE mount of the volume here,
    /// the device is someone else's, and with one it must be on that
    /// mount's filesystem. The device staging recorded is taken at its
    /// word, so that the kernel, which asks the FUSE session for the
    /// device's backing numbers, is only asked about strangers: an engine
    /// that is frozen would hold the question up.
    fn backed_here(&self, volume_id: &str, dev: &LoopDevice) -> bool {
        let Ok(run) = std::fs::canonicalize(self.run_dir(volume_id).path()) else {
            return false;
        };
        let Ok(Some(session)) = mounts::mount_at(&RunDir::at(run).fuse_dir()) else {
            return false;
        };
        if !session.is_fuse() {
            return false;
        }
        if self.recorded_device(volume_id).as_deref() == Some(dev.path()) {
            return true;
        }
        dev.backing_device()
            .is_ok_and(|backing| session.device_number() == Some(backing))
    }

    /// The loop device staging recorded for this volume here.
    fn recorded_device(&self, volume_id: &str) -> Option<PathBuf> {
        let recorded = std::fs::read_to_string(self.run_dir(volume_id).device_file()).ok()?;
        Some(PathBuf::from(recorded.trim()))
    }

    /// Every loop device of this volume, those an earlier teardown left
    /// waiting for their last close too, and `also` (found by its mount).
    fn devices_to_release(
        &self,
        volume_id: &str,
        also: Option<LoopDevice>,
    ) -> Result<Vec<LoopDevice>> {
        let mut devices = LoopDevice::find_all_by_backing(&self.backing_file(volume_id))
            .map_err(|e| Error::with_source(ErrorKind::Internal, "cannot scan loop devices", e))?;
        devices.retain(|d| self.backed_here(volume_id, d));
        for dev in also.into_iter().chain(self.detached_device(volume_id)) {
            if !devices.iter().any(|d| d.path() == dev.path()) {
                devices.push(dev);
            }
        }
        Ok(devices)
    }

    /// The device recorded at staging, if its FUSE export has since been
    /// unmounted under it (the engine ended its session): the kernel then
    /// names the backing file `/volume`, relative to no mount, and only the
    /// record says whose it is. A device reused by another volume names
    /// that volume's full path instead.
    fn detached_device(&self, volume_id: &str) -> Option<LoopDevice> {
        let dev = LoopDevice::open(&self.recorded_device(volume_id)?);
        (dev.backing_file()? == Path::new("/volume")).then_some(dev)
    }

    fn ensure_loop(&self, volume_id: &str) -> Result<LoopDevice> {
        let dev = match self.device(volume_id)? {
            Some(dev) => dev,
            None => LoopDevice::attach(
                &self.backing_file(volume_id),
                LoopOptions {
                    read_only: false,
                    direct_io: true,
                },
            )
            .map_err(|e| Error::with_source(ErrorKind::Internal, "cannot attach loop device", e))?,
        };
        let record = self.run_dir(volume_id).device_file();
        std::fs::write(&record, dev.path().to_string_lossy().as_bytes())
            .map_err(|e| Error::io(format!("cannot write {}", record.display()), e))?;
        Ok(dev)
    }

    /// The mount flags the volume was staged with here; `None` when it
    /// was staged before they were recorded.
    fn staged_flags(&self, volume_id: &str) -> Option<Vec<String>> {
        let text = std::fs::read_to_string(self.run_dir(volume_id).mount_flags_file()).ok()?;
        Some(
            text.lines()
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect(),
        )
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
            .is_some_and(|pid| is_engine_process(pid, &self.node_id, volume_id)))
    }

    fn engine_pid(&self, volume_id: &str) -> Option<i32> {
        std::fs::read_to_string(self.run_dir(volume_id).engine_pid_file())
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
    }

    fn ensure_engine(&self, volume_id: &str) -> Result<()> {
        if self.engine_running(volume_id)? {
            return Ok(());
        }
        // A dead engine leaves its mount behind (reads fail with ENOTCONN).
        self.stop_engine(volume_id)?;
        // The run dir holds the volume's FUSE file: root's only.
        crate::datapath::host::files::private_dir(self.run_dir(volume_id).path())?;
        let dir = self.fuse_dir(volume_id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
        let log_path = self.run_dir(volume_id).engine_log_file();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(|e| Error::io(format!("cannot open {}", log_path.display()), e))?;
        let exe = std::env::current_exe().map_err(|e| Error::io("cannot find own binary", e))?;
        let mut engine = Command::new(exe);
        engine.arg("engine");
        if let Some(root) = &self.engine_cgroup_root {
            engine.arg("--cgroup-root").arg(root);
        }
        let mut child = engine
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
        if !crate::datapath::engine::ready::says_ready(&mut child, ENGINE_READY_TIMEOUT) {
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
        // Replaced whole: a pid file read half written would look like a
        // dead engine, and a live volume's session would be torn down.
        crate::datapath::host::files::atomic_write(
            &self.run_dir(volume_id).engine_pid_file(),
            pid.to_string().as_bytes(),
        )?;
        Ok(())
    }

    /// Stops the engine by unmounting its export (it exits when the kernel
    /// ends the session), and waits for the process to go.
    fn stop_engine(&self, volume_id: &str) -> Result<()> {
        let dir = self.fuse_dir(volume_id);
        fuse::unmount(&dir).map_err(|e| {
            Error::with_source(ErrorKind::Internal, "cannot unmount FUSE export", e)
        })?;
        let pid_file = self.run_dir(volume_id).engine_pid_file();
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
            while is_engine_process(pid, &self.node_id, volume_id) {
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
        let record = self.record(volume_id)?;
        self.check_caller_path(staging_path, "staging target path")?;
        let here = record.staged_on.as_ref().filter(|s| s.node == self.node_id);
        if let Some(s) = here {
            if s.is_repair() {
                return Err(Error::new(
                    ErrorKind::Aborted,
                    format!("volume {volume_id} is being repaired on this node; retry shortly"),
                ));
            }
            if Path::new(&s.staging_path) != staging_path {
                return Err(Error::precondition(format!(
                    "volume {volume_id} is staged at {}, not at {}; nothing was unstaged",
                    s.staging_path,
                    staging_path.display()
                )));
            }
        }
        // Published anywhere, as the kernel sees it: a pod still holds the
        // device, and tearing it down would hand the pod the next volume
        // that gets this loop device.
        let held = self.holders(volume_id, Some(staging_path))?;
        if !held.is_empty() {
            return Err(Error::precondition(format!(
                "volume {volume_id} is still published at {}; NodeUnpublishVolume first",
                join_paths(&held)
            )));
        }
        // What is mounted at the staging path is unmounted only while it is
        // this volume; a foreign mount there is left alone.
        let mut orphan = None;
        while let Some(m) = mounts::mount_at(staging_path)? {
            let Some(dev) = self.own_device_of(volume_id, &m) else {
                if here.is_some() {
                    return Err(Error::precondition(format!(
                        "staging path {} has {} ({}) mounted over volume {volume_id}; unmount it first",
                        staging_path.display(),
                        m.source,
                        m.fs_type
                    )));
                }
                break;
            };
            mounts::unmount_one(staging_path)?;
            orphan = Some(dev);
        }
        // Before the engine stops, so that whoever still reads the device
        // gets answers and closes it. Once the engine's session is gone the
        // device's backing path no longer resolves, so it may only be known
        // from the staging mount or the recorded device.
        for dev in self.devices_to_release(volume_id, orphan)? {
            release_device(volume_id, &dev)?;
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
        let _ = std::fs::remove_dir_all(self.run_dir(volume_id).path());
        info!(volume_id, "volume unstaged");
        Ok(())
    }

    /// The loop device `m` is mounted from (a filesystem on it, or a bind
    /// mount of its device node), if that device is this volume's.
    fn own_device_of(&self, volume_id: &str, m: &mounts::MountEntry) -> Option<LoopDevice> {
        let path = if m.source.starts_with("/dev/loop") {
            PathBuf::from(&m.source)
        } else if m.root.starts_with("/loop") && !m.root[1..].contains('/') {
            Path::new("/dev").join(&m.root[1..])
        } else {
            return None;
        };
        let dev = LoopDevice::open(&path);
        let backing = dev.backing_file()?;
        let ours = ((backing == self.backing_file(volume_id)
            || std::fs::canonicalize(self.run_dir(volume_id).path())
                .is_ok_and(|run| backing == RunDir::at(run).fuse_dir().join(fuse::FILE_NAME)))
            && self.backed_here(volume_id, &dev))
            || self
                .detached_device(volume_id)
                .is_some_and(|d| d.path() == dev.path());
        if !ours {
            return None;
        }
        // A bind mount of some other file that merely sits at `/loopN`
        // inside its filesystem is not the device node.
        if !m.source.starts_with("/dev/loop") {
            let node = std::fs::metadata(&m.mount_point).ok()?;
            let dev_node = std::fs::metadata(&path).ok()?;
            if !node.file_type().is_block_device() || node.rdev() != dev_node.rdev() {
                return None;
            }
        }
        Some(dev)
    }

    /// Where this volume's device is mounted on this node, other than at
    /// `except`: filesystems on it and bind mounts of its device node.
    fn holders(&self, volume_id: &str, except: Option<&Path>) -> Result<Vec<PathBuf>> {
        Ok(mounts::mounts()?
            .into_iter()
            .filter(|m| Some(m.mount_point.as_path()) != except)
            .filter(|m| self.own_device_of(volume_id, m).is_some())
            .map(|m| m.mount_point)
            .collect())
    }

    /// `path` is where this volume is staged on this node, or one of its
    /// publish targets (by the record, or as mounted).
    fn check_volume_path(&self, record: &VolumeRecord, path: &Path) -> Result<()> {
        let text = path.to_string_lossy();
        let staged_here = record
            .staged_on
            .as_ref()
            .is_some_and(|s| s.node == self.node_id && Path::new(&s.staging_path) == path);
        let published = record.published.iter().any(|p| *p == text);
        let mounted =
            mounts::mount_at(path)?.is_some_and(|m| self.own_device_of(&record.id, &m).is_some());
        if staged_here || published || mounted {
            Ok(())
        } else {
            Err(Error::not_found(format!(
                "volume {} is not staged or published at {}",
                record.id,
                path.display()
            )))
        }
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
        self.check_caller_path(staging_path, "staging target path")?;
        self.check_caller_path(target, "target path")?;
        if target == staging_path {
            return Err(Error::invalid(
                "target path and staging target path are the same",
            ));
        }
        let staged = record
            .staged_on
            .as_ref()
            .filter(|s| s.node == self.node_id && !s.is_repair())
            .ok_or_else(|| {
                Error::precondition(format!(
                    "volume {volume_id} is not staged on this node; NodeStageVolume first"
                ))
            })?;
        if Path::new(&staged.staging_path) != staging_path {
            return Err(Error::precondition(format!(
                "volume {volume_id} is staged at {}, not at {}",
                staged.staging_path,
                staging_path.display()
            )));
        }
        self.check_outside_volumes(target, "target path", volume_id)?;
        let t = target.to_string_lossy().into_owned();
        if let Some(m) = mounts::mount_at(target)? {
            if self.own_device_of(volume_id, &m).is_none() {
                return Err(Error::precondition(format!(
                    "target path {} already has {} ({}) mounted, not volume {volume_id}",
                    target.display(),
                    m.source,
                    m.fs_type
                )));
            }
            if m.read_only() != read_only {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "volume {volume_id} is already published at {} {}; unpublish it to change that",
                        target.display(),
                        if m.read_only() {
                            "read-only"
                        } else {
                            "read-write"
                        }
                    ),
                ));
            }
            self.record_published(volume_id, &t)?;
            return Ok(());
        }
        if cap.mode == AccessMode::SingleNodeSingleWriter
            && let Some(other) = record.published.iter().find(|p| **p != t)
        {
            return Err(Error::precondition(format!(
                "volume {volume_id} is single-writer and already published at {other}"
            )));
        }
        let device = self.device(volume_id)?.ok_or_else(|| {
            Error::precondition(format!(
                "volume {volume_id} has no device; NodeStageVolume first"
            ))
        })?;
        if !self.engine_running(volume_id)? {
            return Err(Error::precondition(format!(
                "the engine of volume {volume_id} is not running; NodeStageVolume again first"
            )));
        }
        let staged_fs = mounts::mount_at(staging_path)?
            .is_some_and(|m| self.own_device_of(volume_id, &m).is_some());
        match (&cap.access_type, staged_fs) {
            (AccessType::Mount { .. }, false) => {
                return Err(Error::precondition(format!(
                    "volume {volume_id} is not mounted at its staging path {}; NodeStageVolume first",
                    staging_path.display()
                )));
            }
            // Its raw device under a mounted filesystem: writes to one
            // corrupt the other.
            (AccessType::Block, true) => {
                return Err(Error::precondition(format!(
                    "volume {volume_id} is staged with a filesystem; publish it as a filesystem, or unstage it and stage it as a block device"
                )));
            }
            _ => {}
        }
        // What is already at the target stays the caller's: it must be what
        // publish would make, and is never removed if publishing fails.
        let existed = match std::fs::symlink_metadata(target) {
            Ok(m) => {
                let fits = match &cap.access_type {
                    AccessType::Mount { .. } => m.is_dir(),
                    AccessType::Block => m.is_file(),
                };
                if !fits {
                    return Err(Error::invalid(format!(
                        "target path {} exists and is not {}",
                        target.display(),
                        match &cap.access_type {
                            AccessType::Mount { .. } => "a directory",
                            AccessType::Block => "a regular file",
                        }
                    )));
                }
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(Error::io(format!("cannot inspect {}", target.display()), e)),
        };
        // Recorded before anything is made at the target, so unpublish
        // knows the target is this volume's whatever step a crash hits.
        self.record_published(volume_id, &t)?;
        let made = match &cap.access_type {
            AccessType::Mount { mount_flags, .. } => std::fs::create_dir_all(target)
                .map_err(|e| Error::io(format!("cannot create {}", target.display()), e))
                .and_then(|()| mounts::bind_mount(staging_path, target, read_only, mount_flags)),
            AccessType::Block => target
                .parent()
                .map_or(Ok(()), |parent| {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| Error::io(format!("cannot create {}", parent.display()), e))
                })
                .and_then(|()| {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .mode(0o600)
                        .open(target)
                        .map(drop)
                        .map_err(|e| Error::io(format!("cannot create {}", target.display()), e))
                })
                .and_then(|()| mounts::bind_mount(device.path(), target, read_only, &[])),
        };
        if let Err(e) = made {
            if existed {
                let _ = self.forget_target(volume_id, target);
            } else {
                let _ = self.unpublish(volume_id, target);
            }
            return Err(e);
        }
        info!(volume_id, target = %target.display(), read_only, "volume published");
        Ok(())
    }

    /// Undoes a publish at a target that existed before it: unmounts what
    /// is the volume's there and drops the record, removing nothing.
    fn forget_target(&self, volume_id: &str, target: &Path) -> Result<()> {
        while let Some(m) = mounts::mount_at(target)? {
            if self.own_device_of(volume_id, &m).is_none() {
                break;
            }
            mounts::unmount_one(target)?;
        }
        let t = target.to_string_lossy().into_owned();
        self.store.update(volume_id, &mut |r| {
            let before = r.published.len();
            r.published.retain(|p| p != &t);
            Ok(r.published.len() != before)
        })?;
        Ok(())
    }

    fn record_published(&self, volume_id: &str, target: &str) -> Result<()> {
        self.store.update(volume_id, &mut |r| {
            if r.published.iter().any(|p| p == target) {
                Ok(false)
            } else {
                r.published.push(target.to_string());
                Ok(true)
            }
        })?;
        Ok(())
    }

    pub fn unpublish(&self, volume_id: &str, target: &Path) -> Result<()> {
        let record = self.record(volume_id)?;
        self.check_caller_path(target, "target path")?;
        let t = target.to_string_lossy().into_owned();
        let mut ours = record.published.contains(&t);
        while let Some(m) = mounts::mount_at(target)? {
            if self.own_device_of(volume_id, &m).is_none() {
                if !ours {
                    // Not this volume's: nothing of it is published here.
                    return Ok(());
                }
                return Err(Error::precondition(format!(
                    "target path {} has {} ({}) mounted, which is not volume {volume_id}; left alone",
                    target.display(),
                    m.source,
                    m.fs_type
                )));
            }
            mounts::unmount_one(target)?;
            ours = true;
        }
        if !ours {
            return Ok(());
        }
        // Only what publish made: an empty directory or an empty file.
        let removed = match std::fs::symlink_metadata(target) {
            Ok(m) if m.is_dir() => std::fs::remove_dir(target),
            Ok(m) if m.is_file() && m.len() == 0 => std::fs::remove_file(target),
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = removed {
            warn!(volume_id, target = %target.display(), error = %e, "target left in place");
        }
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
        self.check_volume_path(&record, path)?;
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
    pub fn expand(&self, volume_id: &str, volume_path: &Path, block: bool) -> Result<u64> {
        let record = self.record(volume_id)?;
        self.check_volume_path(&record, volume_path)?;
        let mount_path = (!block && volume_path.is_dir()).then_some(volume_path);
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

fn join_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads the device's first 4 KiB, bypassing the page cache: proves the
/// loop device, the FUSE session and the engine behind it all answer.
fn read_first_block(device: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)?;
    let mut buf = crate::datapath::replica::aligned::AlignedBuf::zeroed(4096);
    file.read_at(buf.as_mut_slice(), 0).map(drop)
}

/// Whether `pid` is this node's engine of `volume_id`. A pid file can
/// outlive its process (a node back from a crash) and the pid be reused,
/// by anything or by another node's engine of the same volume where nodes
/// share a kernel: only the exact command line `ensure_engine` starts
/// counts, never a process that merely mentions the volume.
fn is_engine_process(pid: i32, node_id: &str, volume_id: &str) -> bool {
    // A binary replaced on disk since (an upgrade) reads as "terna (deleted)".
    let Some(exe) = std::env::current_exe().ok().and_then(|e| {
        e.file_name().map(|n| {
            let n = n.as_bytes();
            n.strip_suffix(b" (deleted)").unwrap_or(n).to_vec()
        })
    }) else {
        return false;
    };
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| is_engine_cmdline(&c, &exe, node_id, volume_id))
}

/// `exe`: the file name of the binary engines are started from (ours).
fn is_engine_cmdline(cmdline: &[u8], exe: &[u8], node_id: &str, volume_id: &str) -> bool {
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let program = args
        .first()
        .and_then(|a| a.rsplit(|&b| b == b'/').next())
        .unwrap_or_default();
    let value_of = |flag: &str| {
        args.iter()
            .position(|a| *a == flag.as_bytes())
            .and_then(|i| args.get(i + 1))
            .copied()
    };
    program == exe
        && args.get(1) == Some(&b"engine".as_slice())
        && value_of("--volume") == Some(volume_id.as_bytes())
        && value_of("--node-id") == Some(node_id.as_bytes())
        // A worker of the engine serves the same session; only its
        // supervisor is the engine a pid file names.
        && value_of("--fuse-fd").is_none()
}

/// Detaches a loop device nothing mounts any more (the callers checked),
/// and returns once it is gone. One some process still has open (udev's
/// probe, a filesystem still being released) is waited for: the kernel has
/// armed autoclear, detaches it at the last close and binds it to nothing
/// else before. One that never lets go is Unavailable, naming its holders:
/// the caller keeps the claim, and its retry finds the device again
/// (`LoopDevice::find_all_by_backing`) and finishes.
fn release_device(volume_id: &str, dev: &LoopDevice) -> Result<()> {
    match dev.detach() {
        Ok(()) => Ok(()),
        Err(e @ LoopError::Busy { .. }) => Err(Error::with_source(
            ErrorKind::Unavailable,
            format!(
                "the loop device of volume {volume_id} will not detach; retry once it is closed"
            ),
            e,
        )),
        Err(e) => Err(Error::with_source(
            ErrorKind::Internal,
            "cannot detach loop device",
            e,
        )),
    }
}

/// Mount flags in a canonical order: the same set is the same request.
fn sorted(flags: &[String]) -> Vec<String> {
    let mut flags = flags.to_vec();
    flags.sort();
    flags.dedup();
    flags
}

#[cfg(test)]
mod tests {
    use super::is_engine_cmdline;

    fn cmdline(args: &[&str]) -> Vec<u8> {
        let mut c = args.join("\0").into_bytes();
        c.push(0);
        c
    }

    #[test]
    fn only_this_nodes_engine_of_the_volume_is_taken_for_it() {
        let (node, vol) = ("node-2", "tv-0123456789abcdef01234567");
        let ours = [
            "/usr/bin/terna",
            "engine",
            "--cgroup-root",
            "/sys/fs/cgroup/terna",
            "--data-dir",
            "/var/lib/terna",
            "--node-id",
            node,
            "--volume",
            vol,
            "--mountpoint",
            "/var/lib/terna/run/x/fuse",
        ];
        assert!(is_engine_cmdline(&cmdline(&ours), b"terna", node, vol));
        let mut other_node = ours;
        other_node[7] = "node-3";
        let mut other_volume = ours;
        other_volume[9] = "tv-0123456789abcdef01234568";
        let mut longer_id = ours;
        let longer = format!("{vol}0");
        longer_id[9] = &longer;
        let worker: Vec<&str> = ours.iter().copied().chain(["--fuse-fd", "5"]).collect();
        for (what, args) in [
            ("another node's engine", other_node.to_vec()),
            ("another volume's engine", other_volume.to_vec()),
            ("an id it is a prefix of", longer_id.to_vec()),
            ("a worker", worker),
            (
                "a process that mentions it",
                vec!["grep", "engine", "--volume", vol, "--node-id", node],
            ),
            (
                "another program's engine",
                [&["/usr/bin/other"][..], &ours[1..]].concat(),
            ),
            ("a flag with no value", vec!["terna", "engine", "--volume"]),
            ("nothing", vec![]),
        ] {
            assert!(
                !is_engine_cmdline(&cmdline(&args), b"terna", node, vol),
                "{what}"
            );
        }
        assert!(!is_engine_cmdline(b"", b"terna", node, vol));
    }
}
