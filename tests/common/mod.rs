//! What the integration tests share: starting `terna standalone` on a
//! temporary data dir and stopping it by its pid, and checking that nothing
//! (mount, loop device) is left behind.
#![allow(dead_code, clippy::unwrap_used)]

pub mod cluster;
pub mod csi_client;
pub mod nfs;
pub mod writer;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The tests mount filesystems and attach loop devices: they need root.
/// Returns false (after saying why) when the test cannot run here.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test} needs root (mounts, loop devices, FUSE) and CI runs as root");
    }
    eprintln!("SKIPPING {test}: needs root for mounts, loop devices and FUSE");
    false
}

/// Like `require_root`, but never skips: a test that must not pass silently.
pub fn assert_root(test: &str) {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "{test} needs root (it mounts filesystems, attaches loop devices and uses FUSE): \
         run it as root, e.g. `sudo -E cargo test --test {test}`"
    );
}

pub struct Standalone {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub data_dir: PathBuf,
    child: Option<Child>,
}

impl Standalone {
    pub fn start() -> Standalone {
        Self::start_with(|_| {})
    }

    /// Starts terna after `prepare` has had the chance to write into the
    /// (not yet existing) data dir, e.g. a terna.toml.
    pub fn start_with(prepare: impl FnOnce(&Path)) -> Standalone {
        let dir = tempfile::Builder::new()
            .prefix("terna-test-")
            .tempdir()
            .unwrap();
        let data_dir = dir.path().join("data");
        prepare(&data_dir);
        let socket = dir.path().join("csi.sock");
        let mut s = Standalone {
            dir,
            socket,
            data_dir,
            child: None,
        };
        s.spawn();
        s
    }

    /// Kills the process with SIGKILL, as a crash would: no cleanup runs.
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Starts terna again on the same data dir and socket.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("terna.log"))
            .unwrap();
        let _ = std::fs::remove_file(&self.socket);
        let child = Command::new(env!("CARGO_BIN_EXE_terna"))
            .arg("standalone")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--endpoint")
            .arg(format!("unix://{}", self.socket.display()))
            .arg("--node-id")
            .arg("test-node")
            .env("TERNA_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.socket.exists() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("terna exited early ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "terna did not listen:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("terna.log")).unwrap_or_default()
    }

    /// The file of replica `index` of `volume_id`, in whichever pool holds it.
    pub fn find_replica(&self, volume_id: &str, index: usize) -> Option<PathBuf> {
        let name = format!("{volume_id}.r{index}.img");
        std::fs::read_dir(self.data_dir.join("pools"))
            .ok()?
            .flatten()
            .map(|pool| pool.path().join(&name))
            .find(|p| p.exists())
    }

    /// Stops terna by its pid (SIGTERM, then waits), then fails if it did not
    /// exit cleanly or if any mount, loop device or process referencing the
    /// test's directory remains (after cleaning that up).
    pub fn stop_and_check_clean(mut self) {
        let problems = self.stop_and_find_leftovers();
        assert!(
            problems.is_empty(),
            "left behind: {problems:#?}\n{}",
            self.log()
        );
    }

    /// Stops terna, then returns what is wrong (an unclean exit, leftover
    /// mounts, loop devices, processes), having cleaned up best-effort.
    pub fn stop_and_find_leftovers(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(status) = self.stop()
            && !status.success()
        {
            problems.push(format!("terna did not exit cleanly on SIGTERM: {status}"));
        }
        problems.extend(leftovers(self.dir.path()));
        cleanup(self.dir.path());
        problems
    }

    /// SIGTERM by pid, then waits up to 20 s (then SIGKILL). Returns the exit
    /// status if terna was running.
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                eprintln!("terna did not exit within 20 s of SIGTERM: killing it");
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("---- terna log ----\n{}", self.log());
        }
        cleanup(self.dir.path());
    }
}

/// Mounts, loop devices and processes that reference anything under `dir`.
pub fn leftovers(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for m in terna::datapath::host::mounts::parse_mountinfo(&mountinfo) {
        if m.mount_point.starts_with(dir) {
            found.push(format!("mount {} ({})", m.mount_point.display(), m.fs_type));
        }
    }
    for entry in std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(b) = std::fs::read_to_string(entry.path().join("loop/backing_file"))
            && Path::new(b.trim()).starts_with(dir)
        {
            found.push(format!(
                "loop {} -> {}",
                entry.file_name().to_string_lossy(),
                b.trim()
            ));
        }
    }
    for (pid, cmd) in processes_under(dir) {
        found.push(format!("process {pid}: {cmd}"));
    }
    found
}

/// Processes other than this one whose command line names a path under
/// `dir`, such as volume engines that outlived their node plugin.
fn processes_under(dir: &Path) -> Vec<(i32, String)> {
    let needle = dir.to_string_lossy().into_owned() + "/";
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter_map(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(&needle).then(|| (pid, cmd.trim().to_owned()))
        })
        .collect()
}

/// Best effort: unmount everything under `dir` (deepest first), detach
/// loop devices backed by files under it, and stop engines serving it.
pub fn cleanup(dir: &Path) {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = terna::datapath::host::mounts::parse_mountinfo(&mountinfo)
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    // Filesystems and bind mounts first, so loop devices and FUSE go free.
    for p in points.iter().filter(|p| !p.ends_with("fuse")) {
        let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
    }
    for entry in std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(b) = std::fs::read_to_string(entry.path().join("loop/backing_file"))
            && Path::new(b.trim()).starts_with(dir)
        {
            let dev = Path::new("/dev").join(entry.file_name());
            let _ = terna::datapath::frontend::loopdev::LoopDevice::open(&dev).detach();
        }
    }
    for p in points.iter().filter(|p| p.ends_with("fuse")) {
        let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
    }
    for (pid, _) in processes_under(dir) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    // SIGKILL takes effect asynchronously; a dead process's cmdline is empty.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_under(dir).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Deterministic pseudo-random content, so a wrong byte anywhere shows.
pub fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `data` to a new file at `path` and fsyncs it; returns its SHA-256.
pub fn write_synced(path: &Path, data: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
    sha2::Sha256::digest(data).to_vec()
}
