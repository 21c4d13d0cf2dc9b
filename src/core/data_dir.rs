//! The data dir: where each kind of state lives in it. Its one owner is
//! `datapath::host::lock`. Pure paths: nothing here touches the disk.

use std::path::{Path, PathBuf};

/// Where the file state store keeps its state.
pub fn state_root(data_dir: &Path) -> PathBuf {
    data_dir.join("state")
}

/// Where the file state store keeps volume records.
pub fn state_dir(data_dir: &Path) -> PathBuf {
    state_root(data_dir).join("volumes")
}

/// Where every volume's dirty maps are kept.
pub fn dirty_root(data_dir: &Path) -> PathBuf {
    data_dir.join("dirty")
}

/// Where a volume's dirty maps are kept; they outlive staging, so a
/// replica that returns while the volume is unstaged still catches up
/// incrementally.
pub fn dirty_dir(data_dir: &Path, volume_id: &str) -> PathBuf {
    dirty_root(data_dir).join(volume_id)
}

/// The cluster CA every process on the data dir makes its TLS identity
/// from (`datapath::tls`).
pub fn ca_file(data_dir: &Path) -> PathBuf {
    data_dir.join("tls").join("ca.json")
}

/// Where an agent keeps its replicas' claim floors.
pub fn fence_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("fences")
}

/// Where the run dirs of the volumes staged on this node are, one per
/// volume, named by its id.
pub fn run_root(data_dir: &Path) -> PathBuf {
    data_dir.join("run")
}

/// A staged volume's run dir (`run/<volume>/`): its engine's FUSE mount,
/// pid files, log and I/O counters, and the loop device staging attached.
/// It lives only while the volume is staged here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir(PathBuf);

impl RunDir {
    pub fn of(data_dir: &Path, volume_id: &str) -> RunDir {
        RunDir(run_root(data_dir).join(volume_id))
    }

    /// The run dir a FUSE mountpoint (`fuse_dir`) sits in; the engine
    /// process is handed only the mountpoint.
    pub fn around(mountpoint: &Path) -> Option<RunDir> {
        mountpoint.parent().map(|p| RunDir(p.to_path_buf()))
    }

    /// A run dir found at `path` (its canonical form, say).
    pub fn at(path: PathBuf) -> RunDir {
        RunDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Where the engine mounts its FUSE export.
    pub fn fuse_dir(&self) -> PathBuf {
        self.0.join("fuse")
    }

    /// The loop device staging attached, recorded by its path.
    pub fn device_file(&self) -> PathBuf {
        self.0.join("device")
    }

    /// The mount flags the volume's filesystem was staged with, one a line,
    /// sorted: a restage asking for others is not the same request.
    pub fn mount_flags_file(&self) -> PathBuf {
        self.0.join("mount-flags")
    }

    /// The pid of the engine's supervisor.
    pub fn engine_pid_file(&self) -> PathBuf {
        self.0.join("engine.pid")
    }

    /// The pid of the engine worker serving now.
    pub fn worker_pid_file(&self) -> PathBuf {
        self.0.join("engine-worker.pid")
    }

    /// The engine processes' stderr.
    pub fn engine_log_file(&self) -> PathBuf {
        self.0.join("engine.log")
    }

    /// The engine's latest I/O counters, for the node's /metrics.
    pub fn stats_file(&self) -> PathBuf {
        self.0.join("stats.json")
    }

    /// Where the next I/O counters are written before they replace
    /// `stats_file`, so a reader never sees half of them.
    pub fn stats_temp_file(&self) -> PathBuf {
        self.0.join(".stats.json.tmp")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_dir_layout_is_what_existing_data_dirs_have() {
        let run = RunDir::of(Path::new("/d"), "tv-1");
        assert_eq!(run.path(), Path::new("/d/run/tv-1"));
        assert_eq!(run.fuse_dir(), Path::new("/d/run/tv-1/fuse"));
        assert_eq!(run.device_file(), Path::new("/d/run/tv-1/device"));
        assert_eq!(run.mount_flags_file(), Path::new("/d/run/tv-1/mount-flags"));
        assert_eq!(run.engine_pid_file(), Path::new("/d/run/tv-1/engine.pid"));
        assert_eq!(
            run.worker_pid_file(),
            Path::new("/d/run/tv-1/engine-worker.pid")
        );
        assert_eq!(run.engine_log_file(), Path::new("/d/run/tv-1/engine.log"));
        assert_eq!(run.stats_file(), Path::new("/d/run/tv-1/stats.json"));
        assert_eq!(RunDir::around(&run.fuse_dir()), Some(run));
        assert_eq!(
            dirty_dir(Path::new("/d"), "tv-1"),
            Path::new("/d/dirty/tv-1")
        );
    }
}
