//! A running export: the threads that serve one session, and stopping
//! them (unmount, wait, abort if they hang).

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;

use super::abi::{FUSE_NOTIFY_RESEND, bytes_of, fuse_out_header};
use super::buffer::Buffers;
use super::mount::{abort_connection, mount_device, open_session, unmount_once};
use super::ops::Session;
use super::revoke::Revoker;
use super::{FILE_NAME, FuseError, reactor};
use crate::datapath::frontend::BlockDevice;

/// Tuning of a FUSE export.
#[derive(Debug, Clone)]
pub struct FuseOptions {
    /// Threads that take requests off `/dev/fuse` and serve reads of the
    /// volume asynchronously (io_uring); see `reactor`.
    pub readers: usize,
    /// Threads that answer every other request synchronously, i.e. writes
    /// (and reads the readers cannot serve) in flight at once.
    pub threads: usize,
    /// How long `unmount`/drop wait for the session to end before aborting
    /// the connection through fusectl.
    pub stop_timeout: Duration,
}

impl Default for FuseOptions {
    fn default() -> Self {
        Self {
            readers: 2,
            threads: 32,
            stop_timeout: Duration::from_secs(10),
        }
    }
}

/// A mounted FUSE export of one block device.
pub struct FuseExport {
    mountpoint: PathBuf,
    threads: Vec<JoinHandle<()>>,
    stop_timeout: Duration,
    /// The session's fd, which the readers share.
    _session_fd: Arc<OwnedFd>,
    session: Option<Arc<Session>>,
    stopped: bool,
}

impl FuseExport {
    /// Mounts `device` as `mountpoint/volume` and starts the workers.
    pub fn mount(
        mountpoint: &Path,
        device: Arc<dyn BlockDevice>,
        opts: FuseOptions,
    ) -> Result<FuseExport, FuseError> {
        let dev = open_session(mountpoint)?;
        FuseExport::serve(mountpoint, dev, device, opts)
    }

    /// Serves the session of `dev`, a `/dev/fuse` fd whose mount is at
    /// `mountpoint`. The session may be one an earlier (crashed) server
    /// held: the kernel is first asked to send again every request that
    /// server read and never answered, so none is lost or left hanging.
    pub fn serve(
        mountpoint: &Path,
        dev: OwnedFd,
        device: Arc<dyn BlockDevice>,
        opts: FuseOptions,
    ) -> Result<FuseExport, FuseError> {
        if let Err(e) = request_resend(&dev) {
            // Kernels before 6.9: requests a crashed server had read stay
            // unanswered; nothing to resend on a fresh session either way.
            tracing::debug!(error = %e, "FUSE_NOTIFY_RESEND refused");
        }
        let dev = Arc::new(dev);
        // From here on, an early return drops `export`, which unmounts and
        // stops the workers started so far.
        let mut export = FuseExport {
            mountpoint: mountpoint.to_path_buf(),
            threads: Vec::new(),
            stop_timeout: opts.stop_timeout,
            _session_fd: dev.clone(),
            session: None,
            stopped: false,
        };
        let session = Arc::new(Session::new(device, dev.clone()));
        export.session = Some(session.clone());
        let buffers = Arc::new(Buffers::new(opts.threads + 2 * opts.readers));
        // Bounded: a reader with this many requests waiting for helpers
        // stops taking more, so the kernel keeps the rest, not our memory
        // (a 1 MiB buffer each, and the engine's copy of each write).
        let (to_helpers, requests) = crossbeam_channel::bounded(opts.threads.max(1));
        let spawn_failed = |e| FuseError::Io {
            mountpoint: mountpoint.to_path_buf(),
            op: "spawn FUSE thread",
            source: e,
        };
        for i in 0..opts.threads.max(1) {
            let (session, requests, buffers) = (session.clone(), requests.clone(), buffers.clone());
            let handle = std::thread::Builder::new()
                .name(format!("fuse-{i}"))
                .stack_size(512 * 1024)
                .spawn(move || reactor::helper(&session, requests, &buffers))
                .map_err(spawn_failed)?;
            export.threads.push(handle);
        }
        set_nonblocking(&dev).map_err(|e| FuseError::Io {
            mountpoint: mountpoint.to_path_buf(),
            op: "make the /dev/fuse fd non-blocking",
            source: e,
        })?;
        for i in 0..opts.readers.max(1) {
            let (session, dev, to_helpers, buffers) = (
                session.clone(),
                dev.clone(),
                to_helpers.clone(),
                buffers.clone(),
            );
            let handle = std::thread::Builder::new()
                .name(format!("fuse-reader-{i}"))
                .stack_size(512 * 1024)
                .spawn(move || reactor::reader(&session, dev, &buffers, to_helpers))
                .map_err(spawn_failed)?;
            export.threads.push(handle);
        }
        Ok(export)
    }

    /// The exported file, `mountpoint/volume`.
    pub fn path(&self) -> PathBuf {
        self.mountpoint.join(FILE_NAME)
    }

    /// What ends passthrough I/O on this export, for another thread.
    pub fn revoker(&self) -> Option<Revoker> {
        Some(Revoker::new(self.path(), self.session.clone()?))
    }

    /// Unmounts (lazily if the file is still in use, e.g. by a loop device)
    /// and waits for the session to end; if it does not within the stop
    /// timeout, aborts the connection.
    pub fn unmount(mut self) -> Result<(), FuseError> {
        self.stop()
    }

    /// Blocks until the kernel ends the session (someone unmounted the
    /// export), then joins the workers.
    pub fn wait(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.stopped = true;
    }

    fn stop(&mut self) -> Result<(), FuseError> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        // Found before unmounting: fusectl names connections by device number.
        let conn = mount_device(&self.mountpoint);
        let unmounted = unmount_once(&self.mountpoint);
        if self.join_within(self.stop_timeout) {
            return unmounted;
        }
        tracing::warn!(mountpoint = %self.mountpoint.display(), "FUSE session still alive, aborting it");
        if let Some(conn) = conn {
            abort_connection(conn);
        }
        if self.join_within(self.stop_timeout) {
            return unmounted;
        }
        // Leave the stuck threads behind rather than hang.
        self.threads.clear();
        unmounted.and(Err(FuseError::Hung {
            mountpoint: self.mountpoint.clone(),
            timeout: self.stop_timeout,
        }))
    }

    fn join_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.threads.iter().any(|t| !t.is_finished()) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        true
    }
}

impl Drop for FuseExport {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(error = %e, "stopping FUSE export");
        }
    }
}

/// Asks the kernel to queue again every request of this session that was
/// read but not answered (FUSE_NOTIFY_RESEND, Linux 6.9+).
fn request_resend(dev: &OwnedFd) -> io::Result<()> {
    let hdr = fuse_out_header {
        len: size_of::<fuse_out_header>() as u32,
        error: FUSE_NOTIFY_RESEND,
        unique: 0,
    };
    nix::unistd::write(dev, bytes_of(&hdr))?;
    Ok(())
}

/// Readers wait for requests and for their reads at once, so they read
/// the session without blocking. They share the session's own open file:
/// a clone (`FUSE_DEV_IOC_CLONE`) has its own queue of requests being
/// processed, which the kernel fails with EIO when the clone closes, e.g.
/// when a worker is killed; on the session's file, which the supervisor
/// keeps open, they stay queued for the next worker (`request_resend`).
fn set_nonblocking(dev: &OwnedFd) -> io::Result<()> {
    let flags = OFlag::from_bits_retain(nix::fcntl::fcntl(dev, nix::fcntl::FcntlArg::F_GETFL)?);
    nix::fcntl::fcntl(
        dev,
        nix::fcntl::FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK),
    )?;
    Ok(())
}
