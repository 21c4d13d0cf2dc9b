//! Our own FUSE server, speaking the kernel protocol on `/dev/fuse` directly
//! (no libfuse, no fuser): it exposes one [`BlockDevice`] as a single regular
//! file, `volume`, in the root of the mount.
//!
//! Design:
//! - `mount(2)` is called directly (we are root); the kernel's INIT arrives
//!   on the device once the readers start.
//! - Reader threads (default 2), on the session fd made non-blocking, take
//!   every request; reads of the volume that the device
//!   hands out as a replica file they serve themselves with io_uring, the
//!   rest goes to helper threads (default 32) that answer synchronously
//!   (`reactor`).
//! - The file is opened with `FOPEN_DIRECT_IO`, and we negotiate async direct
//!   I/O, 1 MiB requests and 128 background requests, so a loop device with
//!   direct I/O on top sends its requests concurrently and unsplit.
//! - When the device has one file that is the whole volume (one local
//!   replica: `BlockDevice::passthrough_fd`), opens of the volume file are
//!   FUSE passthrough: the kernel registers that file as the open's backing
//!   file and reads and writes it itself, with the caller's O_DIRECT, and
//!   no READ or WRITE reaches us. Each request through us costs several
//!   thread wake-ups, which on a VM's halting CPUs cost more than the disk.
//!   The file is registered once per server (`FUSE_DEV_IOC_BACKING_OPEN`);
//!   a kernel that refuses it leaves us serving the I/O.
//! - Readers and helpers are marked `PR_SET_IO_FLUSHER` (a per-thread
//!   flag), so memory reclaim they trigger does not recurse into I/O that
//!   waits on them.
//!
//! The session ends when the kernel says so (ENODEV on read): after an
//! unmount, or an abort through fusectl.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::Mode;

use super::{BlockDevice, DirectRead};
use crate::datapath::host::mounts;
use crate::datapath::replica::aligned::{self, AlignedBuf};

mod reactor;

#[path = "fuse_abi.rs"]
#[allow(non_camel_case_types)]
pub mod abi;

use abi::*;

/// The exported file's name in the root of the mount.
pub const FILE_NAME: &str = "volume";
/// Largest WRITE (and READ) we negotiate: 1 MiB, i.e. 256 pages.
pub const MAX_WRITE: u32 = 1 << 20;
const PAGE: usize = 4096;
const MAX_PAGES: u16 = (MAX_WRITE as usize / PAGE) as u16;
const MAX_BACKGROUND: u16 = 128;
const CONGESTION_THRESHOLD: u16 = 96;
const IN_HEADER: usize = size_of::<fuse_in_header>();
/// Bytes in front of a WRITE's payload: the request header and `fuse_write_in`.
const WRITE_HEADERS: usize = IN_HEADER + size_of::<fuse_write_in>();
/// Where in the (page-aligned) buffer a request is read to: just far enough
/// before the second page that a WRITE's payload starts exactly on it. The
/// kernel puts the payload right after the headers, so this is the only way
/// to get it aligned without a copy. The engine must still not assume any
/// alignment of the slice it gets (other kernels may change the header size).
const REQ_OFFSET: usize = PAGE - WRITE_HEADERS;
/// Where READ data is assembled (the request has been parsed by then).
const DATA_OFFSET: usize = PAGE;
const BUF_LEN: usize = PAGE + MAX_WRITE as usize + PAGE;
// REQ_OFFSET and DATA_OFFSET count from a page boundary.
const _: () = assert!(aligned::ALIGN == PAGE);

const VOLUME_INO: u64 = 2;
const VOLUME_NAME: &[u8] = FILE_NAME.as_bytes();
/// Names never change, so lookups may be cached for a while.
const ENTRY_TTL_SECS: u64 = 60;
/// Attributes are not cached: a resized volume shows its new size at the next
/// stat (which also updates the inode size the loop driver reads).
const ATTR_TTL_SECS: u64 = 0;

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

/// Errors of the FUSE export, with the mount point and operation.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    #[error("cannot open /dev/fuse to mount {}: {source}", mountpoint.display())]
    OpenDevice {
        mountpoint: PathBuf,
        source: io::Error,
    },
    #[error("cannot mount FUSE at {}: {source}", mountpoint.display())]
    Mount {
        mountpoint: PathBuf,
        source: io::Error,
    },
    #[error("cannot unmount FUSE at {}: {source}", mountpoint.display())]
    Unmount {
        mountpoint: PathBuf,
        source: io::Error,
    },
    #[error("FUSE export at {}: {op}: {source}", mountpoint.display())]
    Io {
        mountpoint: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    #[error("FUSE workers of {} still busy after {timeout:?} and an abort", mountpoint.display())]
    Hung {
        mountpoint: PathBuf,
        timeout: Duration,
    },
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
        let uid = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
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
        let session = Arc::new(Session {
            device,
            dev: Some(dev.clone()),
            backing: Mutex::new(Backing::Untried),
            generation: AtomicU64::new(0),
            uid,
            gid,
            time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        });
        export.session = Some(session.clone());
        let buffers = Arc::new(reactor::Buffers::new(opts.threads + 2 * opts.readers));
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
        Some(Revoker {
            path: self.path(),
            session: self.session.clone()?,
        })
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

/// Ends passthrough I/O: opens that have it read and write the backing
/// file in the kernel, so neither an abort of the session nor this process
/// exiting stops them. A fresh inode generation does: the file's entry is
/// invalidated and looked up again, the kernel finds the inode it holds is
/// of another generation (a reused node id) and fails all further I/O on
/// it with EIO, the loop device's included.
pub struct Revoker {
    path: PathBuf,
    session: Arc<Session>,
}

impl Revoker {
    /// True when passthrough I/O was live and is now refused; later opens
    /// of the file go through us.
    pub fn revoke(&self) -> io::Result<bool> {
        let Some(dev) = self.session.dev.as_ref() else {
            return Ok(false);
        };
        {
            let mut backing = self
                .session
                .backing
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let was = *backing;
            *backing = Backing::Revoked;
            if !matches!(was, Backing::Registered(_)) {
                return Ok(false);
            }
        }
        self.session.generation.fetch_add(1, Ordering::SeqCst);
        let arg = fuse_notify_inval_entry_out {
            parent: FUSE_ROOT_ID,
            namelen: VOLUME_NAME.len() as u32,
            flags: 0,
        };
        let len = size_of::<fuse_out_header>() + size_of_val(&arg) + VOLUME_NAME.len() + 1;
        let hdr = fuse_out_header {
            len: len as u32,
            error: FUSE_NOTIFY_INVAL_ENTRY,
            unique: 0,
        };
        nix::sys::uio::writev(
            dev.as_fd(),
            &[
                IoSlice::new(bytes_of(&hdr)),
                IoSlice::new(bytes_of(&arg)),
                IoSlice::new(VOLUME_NAME),
                IoSlice::new(&[0]),
            ],
        )?;
        // The lookup that makes the kernel compare generations.
        std::fs::metadata(&self.path)?;
        Ok(true)
    }
}

/// Opens `/dev/fuse` and mounts a session for it at `mountpoint`. The
/// returned fd is the session: it lives as long as any process holds a copy,
/// which is what lets a supervisor keep a volume's mount alive across a
/// restart of the server that answers it.
pub fn open_session(mountpoint: &Path) -> Result<OwnedFd, FuseError> {
    let dev = nix::fcntl::open("/dev/fuse", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| FuseError::OpenDevice {
            mountpoint: mountpoint.to_path_buf(),
            source: e.into(),
        })?;
    let uid = nix::unistd::getuid().as_raw();
    let gid = nix::unistd::getgid().as_raw();
    // rootmode is octal (S_IFDIR); user_id/group_id name the mounter.
    let data = format!(
        "fd={},rootmode=40000,user_id={uid},group_id={gid},allow_other,default_permissions",
        dev.as_raw_fd()
    );
    nix::mount::mount(
        Some("terna"),
        mountpoint,
        Some("fuse.terna"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME,
        Some(data.as_str()),
    )
    .map_err(|e| FuseError::Mount {
        mountpoint: mountpoint.to_path_buf(),
        source: e.into(),
    })?;
    Ok(dev)
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

/// Unmounts a FUSE export, e.g. one left behind by a dead process: no FUSE
/// mount there is success; busy falls back to a lazy unmount (the session
/// then lives on until the file's last user, e.g. a loop device, lets go).
pub fn unmount(mountpoint: &Path) -> Result<(), FuseError> {
    for _ in 0..16 {
        if !is_mounted(mountpoint) {
            return Ok(());
        }
        unmount_once(mountpoint)?;
    }
    Ok(())
}

fn unmount_once(mountpoint: &Path) -> Result<(), FuseError> {
    let err = |e: Errno| FuseError::Unmount {
        mountpoint: mountpoint.to_path_buf(),
        source: e.into(),
    };
    match nix::mount::umount2(mountpoint, MntFlags::empty()) {
        Ok(()) | Err(Errno::EINVAL | Errno::ENOENT) => Ok(()),
        Err(Errno::EBUSY) => match nix::mount::umount2(mountpoint, MntFlags::MNT_DETACH) {
            Ok(()) | Err(Errno::EINVAL | Errno::ENOENT) => Ok(()),
            Err(e) => Err(err(e)),
        },
        Err(e) => Err(err(e)),
    }
}

/// Whether a FUSE filesystem is mounted at `mountpoint` (per
/// /proc/self/mountinfo).
pub fn is_mounted(mountpoint: &Path) -> bool {
    fuse_mount_device(mountpoint).is_some()
}

/// The `major:minor` of the topmost FUSE mount at `mountpoint`.
fn fuse_mount_device(mountpoint: &Path) -> Option<(u64, u64)> {
    let want = normalize(mountpoint);
    mounts::mounts()
        .ok()?
        .into_iter()
        .rev()
        .filter(|m| m.is_fuse() && m.mount_point == want)
        .find_map(|m| m.device_number())
}

/// Resolves symlinks in the parent only: the mount point itself may be a
/// dead FUSE mount that cannot be stat'ed.
fn normalize(path: &Path) -> PathBuf {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) if !parent.as_os_str().is_empty() => parent
            .canonicalize()
            .map(|p| p.join(name))
            .unwrap_or_else(|_| path.to_path_buf()),
        _ => path.canonicalize().unwrap_or_else(|_| path.to_path_buf()),
    }
}

/// Aborts the FUSE session mounted at `mountpoint`: every request waiting
/// on it, and every later one, fails with ENOTCONN.
pub fn abort(mountpoint: &Path) {
    if let Some(conn) = mount_device(mountpoint) {
        abort_connection(conn);
    }
}

fn mount_device(mountpoint: &Path) -> Option<u64> {
    // The kernel's dev_t encoding, which fusectl uses for directory names.
    fuse_mount_device(mountpoint).map(|(major, minor)| (major << 20) | minor)
}

/// Aborts a FUSE connection through fusectl, mounting fusectl if needed.
fn abort_connection(conn: u64) {
    let dir = Path::new("/sys/fs/fuse/connections");
    let abort = dir.join(conn.to_string()).join("abort");
    if !abort.exists() {
        let _ = nix::mount::mount(
            Some("fusectl"),
            dir,
            Some("fusectl"),
            MsFlags::empty(),
            None::<&str>,
        );
    }
    if let Err(e) = std::fs::write(&abort, b"1") {
        tracing::warn!(path = %abort.display(), error = %e, "cannot abort FUSE connection");
    }
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

/// Answers request `unique` on `fd`, the fd it was read from (each fd
/// has its own queue of requests being processed).
fn reply(fd: &OwnedFd, unique: u64, resp: &Response<'_>) {
    let (error, payload): (i32, &[u8]) = match resp {
        Response::Error(e) => (-e, &[]),
        Response::Small(s) => (0, s.as_slice()),
        Response::Data(d) => (0, d),
    };
    let hdr = fuse_out_header {
        len: (size_of::<fuse_out_header>() + payload.len()) as u32,
        error,
        unique,
    };
    match nix::sys::uio::writev(
        fd.as_fd(),
        &[IoSlice::new(bytes_of(&hdr)), IoSlice::new(payload)],
    ) {
        // ENOENT: the request was interrupted or aborted meanwhile; ENODEV:
        // the session ended, which the readers notice and stop on.
        Ok(_) | Err(Errno::ENOENT | Errno::ENODEV) => {}
        Err(e) => tracing::warn!(error = %e, unique, "writing FUSE reply failed"),
    }
}

/// A reply body: an errno, a small structure, or READ data. Built on the
/// stack once per request; boxing `Small` would allocate instead.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
enum Response<'a> {
    Error(i32),
    Small(Small),
    Data(&'a [u8]),
}

#[derive(Debug)]
struct Small {
    buf: [u8; 256],
    len: usize,
}

impl Small {
    fn empty() -> Self {
        Self {
            buf: [0; 256],
            len: 0,
        }
    }

    fn of<T: Pod>(value: &T) -> Self {
        let mut s = Self::empty();
        s.push(bytes_of(value));
        s
    }

    fn push(&mut self, bytes: &[u8]) -> bool {
        let Some(dst) = self.buf.get_mut(self.len..self.len + bytes.len()) else {
            return false;
        };
        dst.copy_from_slice(bytes);
        self.len += bytes.len();
        true
    }

    fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

fn ok_empty() -> Response<'static> {
    Response::Small(Small::empty())
}

fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error()
        .filter(|n| (1..4096).contains(n))
        .unwrap_or(libc::EIO)
}

struct Session {
    device: Arc<dyn BlockDevice>,
    uid: u32,
    gid: u32,
    time: u64,
    /// The session's fd, to register passthrough backing files on (`None`
    /// in unit tests, which have no session).
    dev: Option<Arc<OwnedFd>>,
    backing: Mutex<Backing>,
    /// The volume file's inode generation; a new one revokes the old inode.
    generation: AtomicU64,
}

/// The device's file as a passthrough backing file of this session.
#[derive(Debug, Clone, Copy)]
enum Backing {
    Untried,
    Registered(i32),
    /// The kernel would not (no passthrough negotiated, no CAP_SYS_ADMIN,
    /// a backing file stacked too deep): I/O stays in user space.
    Refused,
    /// Passthrough was revoked (`Revoker`); never again in this session.
    Revoked,
}

impl Session {
    /// Handles the request of `n` bytes at `buf[REQ_OFFSET..]`; `None` means
    /// no reply (FORGET, INTERRUPT, or a request too short to answer).
    fn handle<'a>(&self, buf: &'a mut [u8], n: usize) -> Option<(u64, Response<'a>)> {
        let req = match parse_request(buf.get(REQ_OFFSET..REQ_OFFSET.checked_add(n)?)?) {
            Ok(req) => req,
            Err(ParseError::Short) => return None,
            Err(ParseError::Invalid { unique }) => {
                return Some((unique, Response::Error(libc::EINVAL)));
            }
        };
        let (unique, ino) = (req.unique, req.nodeid);
        let resp = match req.op {
            Operation::Read(arg) => {
                return Some((unique, self.read(ino, &arg, &mut buf[DATA_OFFSET..])));
            }
            Operation::Write { arg, payload } => self.write(ino, &arg, payload),
            Operation::NoReply => return None,
            Operation::Init(arg) => self.init(&arg),
            Operation::Lookup { name } => self.lookup(ino, name),
            Operation::Getattr => self.attr_reply(ino),
            Operation::Setattr(arg) => self.setattr(ino, &arg),
            Operation::Open => match ino {
                VOLUME_INO => Response::Small(Small::of(&self.open_volume())),
                FUSE_ROOT_ID => Response::Error(libc::EISDIR),
                _ => Response::Error(libc::ENOENT),
            },
            Operation::Opendir => match ino {
                FUSE_ROOT_ID => Response::Small(Small::of(&fuse_open_out::default())),
                _ => Response::Error(libc::ENOTDIR),
            },
            Operation::Readdir(arg) => self.readdir(ino, &arg),
            Operation::Fsync => match self.device.flush() {
                Ok(()) => ok_empty(),
                Err(e) => Response::Error(errno_of(&e)),
            },
            Operation::Acknowledge => ok_empty(),
            Operation::Statfs => {
                let blocks = self.device.size() / PAGE as u64;
                Response::Small(Small::of(&fuse_kstatfs {
                    blocks,
                    files: 2,
                    bsize: PAGE as u32,
                    namelen: 255,
                    frsize: PAGE as u32,
                    ..Default::default()
                }))
            }
            Operation::Fallocate(arg) => self.fallocate(ino, &arg),
            Operation::Unsupported(_) => Response::Error(libc::ENOSYS),
        };
        Some((unique, resp))
    }

    /// The request of `n` bytes at `buf[REQ_OFFSET..]` when it is a read
    /// of the volume that the device lets the caller do itself:
    /// (unique, offset, length, the read). Anything else goes to `handle`.
    fn direct_read(&self, buf: &[u8], n: usize) -> Option<(u64, u64, usize, Box<dyn DirectRead>)> {
        let req = parse_request(buf.get(REQ_OFFSET..REQ_OFFSET.checked_add(n)?)?).ok()?;
        let (VOLUME_INO, Operation::Read(arg)) = (req.nodeid, req.op) else {
            return None;
        };
        let len = arg.size as usize;
        if len == 0 || len > MAX_WRITE as usize {
            return None;
        }
        let direct = self.device.direct_read(arg.offset, len)?;
        Some((req.unique, arg.offset, len, direct))
    }

    fn init(&self, arg: &fuse_init_in) -> Response<'static> {
        if arg.major != FUSE_KERNEL_VERSION {
            tracing::error!(major = arg.major, "unsupported FUSE major version");
            return Response::Error(libc::EPROTO);
        }
        let want = FUSE_ASYNC_READ
            | FUSE_BIG_WRITES
            | FUSE_ASYNC_DIO
            | FUSE_PARALLEL_DIROPS
            | FUSE_MAX_PAGES;
        // Passthrough is asked for always: whether an open uses it is
        // decided per open (`open_volume`), also by restarted servers,
        // which never see this INIT.
        let passthrough = if arg.flags & FUSE_INIT_EXT != 0 {
            arg.flags2 & FUSE_PASSTHROUGH_FLAGS2
        } else {
            0
        };
        let mut unused = [0; 7];
        if passthrough != 0 {
            unused[0] = FUSE_MAX_STACK_DEPTH;
        }
        let out = fuse_init_out {
            major: FUSE_KERNEL_VERSION,
            minor: arg.minor.min(FUSE_KERNEL_MINOR_VERSION),
            max_readahead: arg.max_readahead.min(MAX_WRITE),
            flags: (arg.flags & want) | if passthrough != 0 { FUSE_INIT_EXT } else { 0 },
            flags2: passthrough,
            unused,
            max_background: MAX_BACKGROUND,
            congestion_threshold: CONGESTION_THRESHOLD,
            max_write: MAX_WRITE,
            time_gran: 1,
            max_pages: MAX_PAGES,
            ..Default::default()
        };
        tracing::debug!(
            kernel_minor = arg.minor,
            kernel_flags = format_args!("{:#x}", arg.flags),
            flags = format_args!("{:#x}", out.flags),
            "FUSE session initialised"
        );
        Response::Small(Small::of(&out))
    }

    /// Opens of the volume file are passthrough (the kernel reads and
    /// writes the backing file itself, no request reaches us) when the
    /// device offers a file for it; otherwise direct I/O through us.
    fn open_volume(&self) -> fuse_open_out {
        match self.backing_id() {
            Some(backing_id) => fuse_open_out {
                fh: 0,
                open_flags: FOPEN_PASSTHROUGH,
                backing_id,
            },
            None => fuse_open_out {
                fh: 0,
                open_flags: FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES,
                backing_id: 0,
            },
        }
    }

    fn backing_id(&self) -> Option<i32> {
        let dev = self.dev.as_ref()?;
        // Asked at every open: a file registered earlier must still be the
        // device's whole truth (its one replica still healthy).
        let file = self.device.passthrough_fd()?;
        let mut backing = self.backing.lock().unwrap_or_else(PoisonError::into_inner);
        match *backing {
            Backing::Registered(id) => return Some(id),
            Backing::Refused | Backing::Revoked => return None,
            Backing::Untried => {}
        }
        let map = fuse_backing_map {
            fd: file.as_raw_fd(),
            flags: 0,
            padding: 0,
        };
        // SAFETY: FUSE_DEV_IOC_BACKING_OPEN reads one fuse_backing_map from
        // the pointer, which points to a live local; both fds are open.
        let rc = unsafe {
            libc::ioctl(
                dev.as_raw_fd(),
                FUSE_DEV_IOC_BACKING_OPEN as libc::Ioctl,
                &map as *const fuse_backing_map,
            )
        };
        if rc > 0 {
            tracing::info!(
                backing_id = rc,
                "FUSE passthrough: the kernel serves this volume's I/O from its replica file"
            );
            *backing = Backing::Registered(rc);
            Some(rc)
        } else {
            tracing::info!(error = %io::Error::last_os_error(), "FUSE passthrough refused; serving I/O in user space");
            *backing = Backing::Refused;
            None
        }
    }

    fn attr(&self, ino: u64) -> Option<fuse_attr> {
        let (mode, nlink, size) = match ino {
            FUSE_ROOT_ID => (libc::S_IFDIR | 0o755, 2, 0),
            VOLUME_INO => (libc::S_IFREG | 0o600, 1, self.device.size()),
            _ => return None,
        };
        Some(fuse_attr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            mode,
            nlink,
            uid: self.uid,
            gid: self.gid,
            blksize: PAGE as u32,
            ..Default::default()
        })
    }

    fn attr_reply(&self, ino: u64) -> Response<'static> {
        match self.attr(ino) {
            Some(attr) => Response::Small(Small::of(&fuse_attr_out {
                attr_valid: ATTR_TTL_SECS,
                attr,
                ..Default::default()
            })),
            None => Response::Error(libc::ENOENT),
        }
    }

    fn lookup(&self, parent: u64, name: &[u8]) -> Response<'static> {
        if parent != FUSE_ROOT_ID || name != VOLUME_NAME {
            return Response::Error(libc::ENOENT);
        }
        match self.attr(VOLUME_INO) {
            Some(attr) => Response::Small(Small::of(&fuse_entry_out {
                nodeid: VOLUME_INO,
                generation: self.generation.load(Ordering::SeqCst),
                entry_valid: ENTRY_TTL_SECS,
                attr_valid: ATTR_TTL_SECS,
                attr,
                ..Default::default()
            })),
            None => Response::Error(libc::ENOENT),
        }
    }

    fn setattr(&self, ino: u64, arg: &fuse_setattr_in) -> Response<'static> {
        // The size belongs to the volume; anything else (times, mode) is
        // accepted and ignored.
        if ino == VOLUME_INO && arg.valid & FATTR_SIZE != 0 && arg.size != self.device.size() {
            return Response::Error(libc::EPERM);
        }
        self.attr_reply(ino)
    }

    fn readdir(&self, ino: u64, arg: &fuse_read_in) -> Response<'static> {
        if ino != FUSE_ROOT_ID {
            return Response::Error(libc::ENOTDIR);
        }
        let entries: [(u64, &[u8], u32); 3] = [
            (FUSE_ROOT_ID, b".", u32::from(libc::DT_DIR)),
            (FUSE_ROOT_ID, b"..", u32::from(libc::DT_DIR)),
            (VOLUME_INO, VOLUME_NAME, u32::from(libc::DT_REG)),
        ];
        let mut out = Small::empty();
        let limit = (arg.size as usize).min(out.buf.len());
        for (i, (ino, name, typ)) in entries.iter().enumerate().skip(arg.offset as usize) {
            let dirent = fuse_dirent {
                ino: *ino,
                off: i as u64 + 1,
                namelen: name.len() as u32,
                typ: *typ,
            };
            let rec = (size_of::<fuse_dirent>() + name.len()).next_multiple_of(8);
            if out.len + rec > limit {
                break;
            }
            let pad = [0u8; 8];
            out.push(bytes_of(&dirent));
            out.push(name);
            out.push(&pad[..rec - size_of::<fuse_dirent>() - name.len()]);
        }
        Response::Small(out)
    }

    fn read<'a>(&self, ino: u64, arg: &fuse_read_in, data: &'a mut [u8]) -> Response<'a> {
        if ino != VOLUME_INO {
            return Response::Error(libc::EISDIR);
        }
        let size = self.device.size();
        if arg.offset >= size {
            return Response::Data(&[]);
        }
        let len = (arg.size as u64).min(size - arg.offset) as usize;
        let Some(data) = data.get_mut(..len) else {
            return Response::Error(libc::EINVAL);
        };
        match self.device.read_at(data, arg.offset) {
            Ok(()) => Response::Data(data),
            Err(e) => Response::Error(errno_of(&e)),
        }
    }

    fn write(&self, ino: u64, arg: &fuse_write_in, payload: &[u8]) -> Response<'static> {
        if ino != VOLUME_INO {
            return Response::Error(libc::EISDIR);
        }
        match arg.offset.checked_add(arg.size.into()) {
            Some(end) if end <= self.device.size() => {}
            _ => return Response::Error(libc::ENOSPC),
        }
        match self.device.write_at(payload, arg.offset) {
            Ok(()) => Response::Small(Small::of(&fuse_write_out {
                size: arg.size,
                padding: 0,
            })),
            Err(e) => Response::Error(errno_of(&e)),
        }
    }

    fn fallocate(&self, ino: u64, arg: &fuse_fallocate_in) -> Response<'static> {
        if ino != VOLUME_INO {
            return Response::Error(libc::EISDIR);
        }
        const KEEP: u32 = libc::FALLOC_FL_KEEP_SIZE as u32;
        const PUNCH: u32 = libc::FALLOC_FL_PUNCH_HOLE as u32;
        const ZERO: u32 = libc::FALLOC_FL_ZERO_RANGE as u32;
        let size = self.device.size();
        let end = arg.offset.saturating_add(arg.length);
        let within = end <= size;
        let discard = |offset: u64, end: u64| {
            if end <= offset {
                return ok_empty();
            }
            match self.device.discard(offset, end - offset) {
                Ok(()) => ok_empty(),
                Err(e) => Response::Error(errno_of(&e)),
            }
        };
        match arg.mode {
            // Discard (the loop driver's REQ_OP_DISCARD, and write-zeroes
            // without NOUNMAP).
            m if m == PUNCH | KEEP => discard(arg.offset, end.min(size)),
            // Write-zeroes with NOUNMAP: discarded ranges read back as
            // zeroes (the BlockDevice contract), which is all it asks for.
            m if m == ZERO | KEEP => discard(arg.offset, end.min(size)),
            m if m == ZERO && within => discard(arg.offset, end),
            // Preallocation: the volume is always fully "allocated".
            m if m == KEEP => ok_empty(),
            0 if within => ok_empty(),
            _ => Response::Error(libc::EOPNOTSUPP),
        }
    }
}

/// A request read from `/dev/fuse`, parsed but not yet acted on. Borrows
/// the request buffer (a WRITE's payload, a LOOKUP's name).
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub unique: u64,
    pub nodeid: u64,
    pub op: Operation<'a>,
}

/// What a request asks for, with its argument structure read and checked
/// against the request's length. Only what the export serves is told
/// apart; everything else is `Unsupported`.
#[derive(Debug, Clone, Copy)]
pub enum Operation<'a> {
    Read(fuse_read_in),
    /// `payload` is exactly `arg.size` bytes.
    Write {
        arg: fuse_write_in,
        payload: &'a [u8],
    },
    /// FORGET, BATCH_FORGET, INTERRUPT: never answered.
    NoReply,
    /// Zero-extended when an old kernel sends it shorter (at least 16 bytes).
    Init(fuse_init_in),
    /// The name up to its NUL.
    Lookup {
        name: &'a [u8],
    },
    Getattr,
    Setattr(fuse_setattr_in),
    Open,
    Opendir,
    Readdir(fuse_read_in),
    Fsync,
    /// FLUSH, RELEASE, RELEASEDIR, ACCESS, DESTROY: answered with success.
    Acknowledge,
    Statfs,
    Fallocate(fuse_fallocate_in),
    Unsupported(u32),
}

/// Why a request buffer is not a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Shorter than a request header: there is no `unique` to answer.
    Short,
    /// Its length field disagrees with what was read, or its argument is
    /// short: answered with EINVAL.
    Invalid { unique: u64 },
}

/// Parses one request exactly as read from `/dev/fuse` (the read's length
/// is `req.len()`). Pure and allocation-free: the hot path calls it on
/// every request, and it is what `tests/fuzz.rs` feeds hostile bytes.
pub fn parse_request(req: &[u8]) -> Result<Request<'_>, ParseError> {
    let hdr: fuse_in_header = read(req).ok_or(ParseError::Short)?;
    let invalid = ParseError::Invalid { unique: hdr.unique };
    if hdr.len as usize != req.len() {
        return Err(invalid);
    }
    let body = &req[IN_HEADER..];
    let op = match hdr.opcode {
        FUSE_READ => Operation::Read(read(body).ok_or(invalid)?),
        FUSE_WRITE => {
            let arg: fuse_write_in = read(body).ok_or(invalid)?;
            // The payload follows fuse_write_in; with REQ_OFFSET it is page
            // aligned in our buffer, but that is our trick, not a kernel
            // promise.
            let start = size_of::<fuse_write_in>();
            let payload = body.get(start..start + arg.size as usize).ok_or(invalid)?;
            Operation::Write { arg, payload }
        }
        FUSE_FORGET | FUSE_BATCH_FORGET | FUSE_INTERRUPT => Operation::NoReply,
        FUSE_INIT if body.len() < 16 => return Err(invalid),
        FUSE_INIT => Operation::Init(read_prefix(body)),
        FUSE_LOOKUP => Operation::Lookup {
            name: body.split(|b| *b == 0).next().unwrap_or_default(),
        },
        FUSE_GETATTR => Operation::Getattr,
        FUSE_SETATTR => Operation::Setattr(read(body).ok_or(invalid)?),
        FUSE_OPEN => Operation::Open,
        FUSE_OPENDIR => Operation::Opendir,
        FUSE_READDIR => Operation::Readdir(read(body).ok_or(invalid)?),
        FUSE_FSYNC => Operation::Fsync,
        FUSE_FLUSH | FUSE_RELEASE | FUSE_RELEASEDIR | FUSE_ACCESS | FUSE_DESTROY => {
            Operation::Acknowledge
        }
        FUSE_STATFS => Operation::Statfs,
        FUSE_FALLOCATE => Operation::Fallocate(read(body).ok_or(invalid)?),
        other => Operation::Unsupported(other),
    };
    Ok(Request {
        unique: hdr.unique,
        nodeid: hdr.nodeid,
        op,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Mem(Mutex<Vec<u8>>);

    impl BlockDevice for Mem {
        fn size(&self) -> u64 {
            self.0.lock().map(|v| v.len() as u64).unwrap_or(0)
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            let v = self.0.lock().map_err(|_| io::Error::other("poisoned"))?;
            let o = offset as usize;
            buf.copy_from_slice(&v[o..o + buf.len()]);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            let mut v = self.0.lock().map_err(|_| io::Error::other("poisoned"))?;
            let o = offset as usize;
            v[o..o + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::EROFS))
        }
        fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
            let mut v = self.0.lock().map_err(|_| io::Error::other("poisoned"))?;
            v[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
    }

    fn session() -> Session {
        Session {
            device: Arc::new(Mem(Mutex::new(vec![7; 1 << 16]))),
            dev: None,
            backing: Mutex::new(Backing::Untried),
            generation: AtomicU64::new(0),
            uid: 0,
            gid: 0,
            time: 0,
        }
    }

    /// Puts a request (header + body) where the worker would read it.
    fn request(buf: &mut [u8], opcode: u32, nodeid: u64, body: &[u8]) -> usize {
        let n = IN_HEADER + body.len();
        let hdr = fuse_in_header {
            len: n as u32,
            opcode,
            unique: 42,
            nodeid,
            ..Default::default()
        };
        buf[REQ_OFFSET..REQ_OFFSET + IN_HEADER].copy_from_slice(bytes_of(&hdr));
        buf[REQ_OFFSET + IN_HEADER..REQ_OFFSET + n].copy_from_slice(body);
        n
    }

    fn small(resp: Option<(u64, Response<'_>)>) -> Vec<u8> {
        match resp {
            Some((42, Response::Small(s))) => s.as_slice().to_vec(),
            other => panic!("unexpected reply {other:?}"),
        }
    }

    fn errno(resp: Option<(u64, Response<'_>)>) -> i32 {
        match resp {
            Some((42, Response::Error(e))) => e,
            other => panic!("unexpected reply {other:?}"),
        }
    }

    #[test]
    fn write_payload_is_page_aligned_and_lands() {
        let s = session();
        let mut buf = AlignedBuf::zeroed(BUF_LEN);
        let buf = buf.as_mut_slice();
        let mut body = bytes_of(&fuse_write_in {
            offset: 4096,
            size: 8192,
            ..Default::default()
        })
        .to_vec();
        body.extend(std::iter::repeat_n(0xab, 8192));
        let n = request(buf, FUSE_WRITE, VOLUME_INO, &body);
        assert_eq!(buf[PAGE..PAGE + 8192].as_ptr() as usize % PAGE, 0);
        assert_eq!(buf[PAGE], 0xab);
        let out = small(s.handle(buf, n));
        assert_eq!(read::<fuse_write_out>(&out).unwrap().size, 8192);

        let n = request(
            buf,
            FUSE_READ,
            VOLUME_INO,
            bytes_of(&fuse_read_in {
                offset: 4000,
                size: 200,
                ..Default::default()
            }),
        );
        match s.handle(buf, n) {
            Some((42, Response::Data(d))) => {
                assert_eq!(&d[..96], &[7; 96][..]);
                assert_eq!(&d[96..], &[0xab; 104][..]);
            }
            other => panic!("unexpected reply {other:?}"),
        }
    }

    #[test]
    fn errors_and_limits() {
        let s = session();
        let mut buf = AlignedBuf::zeroed(BUF_LEN);
        let buf = buf.as_mut_slice();
        // Beyond the end.
        let mut body = bytes_of(&fuse_write_in {
            offset: (1 << 16) - 10,
            size: 20,
            ..Default::default()
        })
        .to_vec();
        body.extend([0; 20]);
        let n = request(buf, FUSE_WRITE, VOLUME_INO, &body);
        assert_eq!(errno(s.handle(buf, n)), libc::ENOSPC);
        // Payload shorter than announced.
        let n = request(buf, FUSE_WRITE, VOLUME_INO, &body[..50]);
        assert_eq!(errno(s.handle(buf, n)), libc::EINVAL);
        // fsync maps the device's errno.
        let n = request(buf, FUSE_FSYNC, VOLUME_INO, &[0; 16]);
        assert_eq!(errno(s.handle(buf, n)), libc::EROFS);
        // Resize refused, other setattr accepted.
        let set = |valid, size| {
            bytes_of(&fuse_setattr_in {
                valid,
                size,
                ..Default::default()
            })
            .to_vec()
        };
        let n = request(buf, FUSE_SETATTR, VOLUME_INO, &set(FATTR_SIZE, 5));
        assert_eq!(errno(s.handle(buf, n)), libc::EPERM);
        let n = request(buf, FUSE_SETATTR, VOLUME_INO, &set(FATTR_SIZE, 1 << 16));
        let out = small(s.handle(buf, n));
        assert_eq!(read::<fuse_attr_out>(&out).unwrap().attr.size, 1 << 16);
        // Unknown opcode.
        let n = request(buf, 4242, VOLUME_INO, &[]);
        assert_eq!(errno(s.handle(buf, n)), libc::ENOSYS);
        // Fallocate modes.
        let fa = |mode, offset, length| {
            bytes_of(&fuse_fallocate_in {
                mode,
                offset,
                length,
                ..Default::default()
            })
            .to_vec()
        };
        let n = request(buf, FUSE_FALLOCATE, VOLUME_INO, &fa(0x8, 0, 10));
        assert_eq!(errno(s.handle(buf, n)), libc::EOPNOTSUPP);
        let n = request(buf, FUSE_FALLOCATE, VOLUME_INO, &fa(0, 0, 1 << 20));
        assert_eq!(errno(s.handle(buf, n)), libc::EOPNOTSUPP);
        let n = request(buf, FUSE_FALLOCATE, VOLUME_INO, &fa(3, 100, 1 << 20));
        assert!(small(s.handle(buf, n)).is_empty());
        let mut data = [1u8; 4];
        s.device.read_at(&mut data, 1 << 15).unwrap();
        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn init_lookup_readdir() {
        let s = session();
        let mut buf = AlignedBuf::zeroed(BUF_LEN);
        let buf = buf.as_mut_slice();
        let init = fuse_init_in {
            major: 7,
            minor: 44,
            max_readahead: 128 << 10,
            flags: u32::MAX,
            ..Default::default()
        };
        // Old kernels send only the first 16 bytes.
        let n = request(buf, FUSE_INIT, 0, &bytes_of(&init)[..16]);
        let out: fuse_init_out = read(&small(s.handle(buf, n))).unwrap();
        assert_eq!((out.major, out.minor), (7, FUSE_KERNEL_MINOR_VERSION));
        assert_eq!(out.max_write, 1 << 20);
        assert_eq!(out.max_pages, 256);
        assert_eq!(out.flags & FUSE_WRITEBACK_CACHE, 0);
        assert_ne!(out.flags & FUSE_MAX_PAGES, 0);

        let n = request(buf, FUSE_LOOKUP, FUSE_ROOT_ID, b"volume\0");
        let out: fuse_entry_out = read(&small(s.handle(buf, n))).unwrap();
        assert_eq!((out.nodeid, out.attr.size), (VOLUME_INO, 1 << 16));
        let n = request(buf, FUSE_LOOKUP, FUSE_ROOT_ID, b"other\0");
        assert_eq!(errno(s.handle(buf, n)), libc::ENOENT);

        let rd = |offset| {
            bytes_of(&fuse_read_in {
                offset,
                size: 4096,
                ..Default::default()
            })
            .to_vec()
        };
        let n = request(buf, FUSE_READDIR, FUSE_ROOT_ID, &rd(0));
        assert_eq!(small(s.handle(buf, n)).len(), 96);
        let n = request(buf, FUSE_READDIR, FUSE_ROOT_ID, &rd(2));
        let out = small(s.handle(buf, n));
        assert_eq!(&out[24..30], b"volume");
        let n = request(buf, FUSE_READDIR, FUSE_ROOT_ID, &rd(3));
        assert!(small(s.handle(buf, n)).is_empty());
    }

    #[test]
    fn passthrough_is_asked_for_only_when_offered_and_opens_without_a_backing_file_go_through_us() {
        let s = session();
        let mut buf = AlignedBuf::zeroed(BUF_LEN);
        let buf = buf.as_mut_slice();
        let mut init = fuse_init_in {
            major: 7,
            minor: 44,
            max_readahead: 128 << 10,
            flags: FUSE_INIT_EXT | FUSE_ASYNC_DIO,
            flags2: FUSE_PASSTHROUGH_FLAGS2,
            ..Default::default()
        };
        let n = request(buf, FUSE_INIT, 0, bytes_of(&init));
        let out: fuse_init_out = read(&small(s.handle(buf, n))).unwrap();
        assert_ne!(out.flags & FUSE_INIT_EXT, 0);
        assert_eq!(out.flags2, FUSE_PASSTHROUGH_FLAGS2);
        assert_eq!(out.unused[0], FUSE_MAX_STACK_DEPTH, "max_stack_depth");
        // Without FUSE_INIT_EXT the second word is not the kernel's.
        init.flags = FUSE_ASYNC_DIO;
        let n = request(buf, FUSE_INIT, 0, bytes_of(&init));
        let out: fuse_init_out = read(&small(s.handle(buf, n))).unwrap();
        assert_eq!(
            (out.flags & FUSE_INIT_EXT, out.flags2, out.unused[0]),
            (0, 0, 0)
        );

        // The test device offers no backing file: direct I/O through us.
        let n = request(buf, FUSE_OPEN, VOLUME_INO, &[0; 8]);
        let out: fuse_open_out = read(&small(s.handle(buf, n))).unwrap();
        assert_eq!(
            (out.open_flags, out.backing_id),
            (FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES, 0)
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_requests_never_panic(
            opcode in 0u32..64,
            nodeid in 0u64..4,
            len_delta in -8i64..8,
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
        ) {
            let s = session();
            let mut buf = AlignedBuf::zeroed(BUF_LEN);
            let buf = buf.as_mut_slice();
            let n = request(buf, opcode, nodeid, &body);
            // Corrupt the length field sometimes, and truncate the read.
            let claimed = (n as i64 + len_delta).max(0) as u32;
            buf[REQ_OFFSET..REQ_OFFSET + 4].copy_from_slice(&claimed.to_ne_bytes());
            let _ = s.handle(buf, n);
            let _ = s.handle(buf, n.min(39));
            buf[REQ_OFFSET..REQ_OFFSET + 4].copy_from_slice(&(n as u32).to_ne_bytes());
            let _ = s.handle(buf, n);
        }
    }
}
