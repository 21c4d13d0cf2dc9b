//! Our own FUSE server, speaking the kernel protocol on /dev/fuse directly:
//! one directory holding one regular file, `volume`, whose bytes are a
//! `BlockDevice`. Many threads read requests from the same session so that
//! the loop device's concurrent direct I/O reaches the engine concurrently.
//!
//! Hot path: `Worker::serve` handles every READ and WRITE; it allocates
//! nothing per request (one buffer per thread, reads land in a page-aligned
//! buffer so O_DIRECT replica reads need no bounce).

use std::fs::{File, OpenOptions};
use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use tracing::{debug, warn};

use crate::frontend::BlockDevice;
use crate::replica::aligned::AlignedBuf;

const FUSE_KERNEL_VERSION: u32 = 7;
/// Protocol minor we speak; the kernel answers with min(its, ours).
const FUSE_KERNEL_MINOR: u32 = 31;

const ROOT_INO: u64 = 1;
const FILE_INO: u64 = 2;
pub const FILE_NAME: &str = "volume";
/// Largest WRITE payload we accept; READs are capped the same way.
pub const MAX_WRITE: u32 = 1 << 20;
const MAX_PAGES: u16 = (MAX_WRITE / 4096) as u16;
/// Room for the request headers in front of a maximal WRITE payload.
const REQUEST_BUF: usize = MAX_WRITE as usize + 64 * 1024;

mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
}

mod init_flag {
    pub const ASYNC_READ: u32 = 1 << 0;
    pub const BIG_WRITES: u32 = 1 << 5;
    pub const ASYNC_DIO: u32 = 1 << 15;
    pub const PARALLEL_DIROPS: u32 = 1 << 18;
    pub const MAX_PAGES: u32 = 1 << 22;
}

const FOPEN_DIRECT_IO: u32 = 1 << 0;
const FOPEN_PARALLEL_DIRECT_WRITES: u32 = 1 << 6;
const FATTR_SIZE: u32 = 1 << 3;
const FALLOC_FL_KEEP_SIZE: u32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: u32 = 0x02;
const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FuseError + 'a {
    move |source| FuseError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone)]
pub struct FuseOptions {
    /// Threads reading requests; about the number of requests in flight
    /// the replicas need to keep their disks busy.
    pub threads: usize,
}

impl Default for FuseOptions {
    fn default() -> Self {
        FuseOptions { threads: 32 }
    }
}

pub struct FuseExport {
    mountpoint: PathBuf,
    threads: Vec<JoinHandle<()>>,
}

impl FuseExport {
    pub fn mount(
        mountpoint: &Path,
        device: Arc<dyn BlockDevice>,
        opts: FuseOptions,
    ) -> Result<FuseExport, FuseError> {
        let dev_path = Path::new("/dev/fuse");
        let fuse = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(dev_path)
            .map_err(io_err("open", dev_path))?;
        let data = format!(
            "fd={},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions",
            fuse.as_raw_fd()
        );
        mount(
            Some("terna"),
            mountpoint,
            Some("fuse.terna"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME,
            Some(data.as_str()),
        )
        .map_err(|e| io_err("mount FUSE on", mountpoint)(e.into()))?;
        let session = Arc::new(fuse);
        let mut threads = Vec::with_capacity(opts.threads);
        for i in 0..opts.threads.max(1) {
            let worker = Worker {
                fuse: session.clone(),
                device: device.clone(),
            };
            let spawned = std::thread::Builder::new()
                .name(format!("fuse-{i}"))
                .stack_size(512 * 1024)
                .spawn(move || worker.run());
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    let _ = unmount(mountpoint);
                    return Err(io_err("start FUSE thread for", mountpoint)(e));
                }
            }
        }
        Ok(FuseExport {
            mountpoint: mountpoint.to_path_buf(),
            threads,
        })
    }

    pub fn path(&self) -> PathBuf {
        self.mountpoint.join(FILE_NAME)
    }

    /// Blocks until the session ends (someone unmounted it).
    pub fn wait(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    pub fn unmount(self) -> Result<(), FuseError> {
        unmount(&self.mountpoint)?;
        self.wait();
        Ok(())
    }
}

/// Unmounts a FUSE export, also one left by a dead process. Not mounted is
/// success.
pub fn unmount(mountpoint: &Path) -> Result<(), FuseError> {
    if !is_mounted(mountpoint) {
        return Ok(());
    }
    match umount2(mountpoint, MntFlags::empty()) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(nix::errno::Errno::EBUSY) => umount2(mountpoint, MntFlags::MNT_DETACH)
            .map_err(|e| io_err("lazily unmount", mountpoint)(e.into())),
        Err(e) => Err(io_err("unmount", mountpoint)(e.into())),
    }
}

pub fn is_mounted(mountpoint: &Path) -> bool {
    crate::node::mounts::mount_at(mountpoint)
        .ok()
        .flatten()
        .is_some_and(|m| m.fs_type.starts_with("fuse"))
}

struct Worker {
    fuse: Arc<File>,
    device: Arc<dyn BlockDevice>,
}

/// Little-endian field reader over a request body; every read is checked.
struct Body<'a>(&'a [u8]);

impl Body<'_> {
    fn u32(&self, at: usize) -> Option<u32> {
        self.0
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&self, at: usize) -> Option<u64> {
        self.0.get(at..at + 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    }
}

/// A reply body being built; fields are appended little-endian.
#[derive(Default)]
struct Out(Vec<u8>);

impl Out {
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn zeros(&mut self, n: usize) -> &mut Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
}

enum Reply {
    /// No reply at all (FORGET, INTERRUPT).
    None,
    Error(i32),
    Data(Vec<u8>),
    /// READ: `len` bytes of the worker's read buffer.
    ReadBuf(usize),
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl Worker {
    fn run(self) {
        crate::engine::mark_io_flusher();
        let mut request = AlignedBuf::zeroed(REQUEST_BUF);
        let mut read_buf = AlignedBuf::zeroed(MAX_WRITE as usize);
        loop {
            let n = match (*self.fuse).read_at(request.as_mut_slice(), 0) {
                Ok(n) => n,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::ENOENT) => continue,
                    // ENODEV: unmounted; the session is over.
                    Some(libc::ENODEV) => return,
                    _ => {
                        warn!(error = %e, "FUSE read failed; worker stops");
                        return;
                    }
                },
            };
            let req = &request.as_slice()[..n];
            let head = Body(req);
            let (Some(len), Some(opcode), Some(unique), Some(nodeid)) =
                (head.u32(0), head.u32(4), head.u64(8), head.u64(16))
            else {
                continue;
            };
            if len as usize != n || n < IN_HEADER {
                self.send(unique, Reply::Error(libc::EIO), &read_buf);
                continue;
            }
            let body = &req[IN_HEADER..];
            let reply = self.serve(opcode, nodeid, body, read_buf.as_mut_slice());
            self.send(unique, reply, &read_buf);
            if opcode == op::DESTROY {
                return;
            }
        }
    }

    fn send(&self, unique: u64, reply: Reply, read_buf: &AlignedBuf) {
        let (error, payload): (i32, &[u8]) = match &reply {
            Reply::None => return,
            Reply::Error(e) => (-e, &[]),
            Reply::Data(d) => (0, d.as_slice()),
            Reply::ReadBuf(n) => (0, &read_buf.as_slice()[..*n]),
        };
        let mut header = [0u8; OUT_HEADER];
        header[0..4].copy_from_slice(&((OUT_HEADER + payload.len()) as u32).to_le_bytes());
        header[4..8].copy_from_slice(&error.to_le_bytes());
        header[8..16].copy_from_slice(&unique.to_le_bytes());
        let iov = [IoSlice::new(&header), IoSlice::new(payload)];
        if let Err(e) = nix::sys::uio::writev(&*self.fuse, &iov) {
            // ENOENT: the request was interrupted and the kernel forgot it.
            if e != nix::errno::Errno::ENOENT {
                debug!(error = %e, "FUSE reply failed");
            }
        }
    }

    fn attr(&self, out: &mut Out, ino: u64) {
        let (size, mode, nlink) = if ino == ROOT_INO {
            (0, libc::S_IFDIR | 0o755, 2)
        } else {
            (self.device.size(), libc::S_IFREG | 0o600, 1)
        };
        out.u64(ino)
            .u64(size)
            .u64(size.div_ceil(512))
            .u64(0)
            .u64(0)
            .u64(0)
            .u32(0)
            .u32(0)
            .u32(0)
            .u32(mode)
            .u32(nlink)
            .u32(0)
            .u32(0)
            .u32(0)
            .u32(4096)
            .u32(0);
    }

    fn attr_out(&self, ino: u64) -> Reply {
        let mut out = Out::default();
        // Validity 0: size changes after an expansion are seen at once.
        out.u64(0).u32(0).u32(0);
        self.attr(&mut out, ino);
        Reply::Data(out.0)
    }

    fn serve(&self, opcode: u32, nodeid: u64, body: &[u8], read_buf: &mut [u8]) -> Reply {
        let b = Body(body);
        match opcode {
            op::INIT => {
                let (Some(major), Some(max_readahead), Some(kernel_flags)) =
                    (b.u32(0), b.u32(8), b.u32(12))
                else {
                    return Reply::Error(libc::EINVAL);
                };
                if major != FUSE_KERNEL_VERSION {
                    return Reply::Error(libc::EPROTO);
                }
                let wanted = init_flag::ASYNC_READ
                    | init_flag::BIG_WRITES
                    | init_flag::ASYNC_DIO
                    | init_flag::PARALLEL_DIROPS
                    | init_flag::MAX_PAGES;
                let mut out = Out::default();
                out.u32(FUSE_KERNEL_VERSION)
                    .u32(FUSE_KERNEL_MINOR)
                    .u32(max_readahead)
                    .u32(kernel_flags & wanted)
                    .u16(128) // max_background
                    .u16(96) // congestion_threshold
                    .u32(MAX_WRITE)
                    .u32(1) // time_gran
                    .u16(MAX_PAGES)
                    .u16(0) // map_alignment
                    .u32(0) // flags2
                    .zeros(28); // max_stack_depth, request_timeout, unused
                Reply::Data(out.0)
            }
            op::LOOKUP => {
                let name = body.split(|&c| c == 0).next().unwrap_or_default();
                if nodeid != ROOT_INO || name != FILE_NAME.as_bytes() {
                    return Reply::Error(libc::ENOENT);
                }
                let mut out = Out::default();
                out.u64(FILE_INO).u64(0).u64(1).u64(0).u32(0).u32(0);
                self.attr(&mut out, FILE_INO);
                Reply::Data(out.0)
            }
            op::FORGET | op::BATCH_FORGET | op::INTERRUPT => Reply::None,
            op::GETATTR => self.attr_out(nodeid),
            op::SETATTR => {
                let (Some(valid), Some(size)) = (b.u32(0), b.u64(16)) else {
                    return Reply::Error(libc::EINVAL);
                };
                if valid & FATTR_SIZE != 0 && (nodeid != FILE_INO || size != self.device.size()) {
                    // The volume's size changes only through expansion.
                    return Reply::Error(libc::EPERM);
                }
                self.attr_out(nodeid)
            }
            op::OPEN => {
                if nodeid != FILE_INO {
                    return Reply::Error(libc::EISDIR);
                }
                let mut out = Out::default();
                out.u64(0)
                    .u32(FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES)
                    .u32(0);
                Reply::Data(out.0)
            }
            op::OPENDIR => {
                if nodeid != ROOT_INO {
                    return Reply::Error(libc::ENOTDIR);
                }
                let mut out = Out::default();
                out.u64(0).u32(0).u32(0);
                Reply::Data(out.0)
            }
            op::READ => {
                let (Some(offset), Some(size)) = (b.u64(8), b.u32(16)) else {
                    return Reply::Error(libc::EINVAL);
                };
                let total = self.device.size();
                if offset >= total {
                    return Reply::ReadBuf(0);
                }
                let len = (size.min(MAX_WRITE) as u64).min(total - offset) as usize;
                match self.device.read_at(&mut read_buf[..len], offset) {
                    Ok(()) => Reply::ReadBuf(len),
                    Err(e) => Reply::Error(errno(&e)),
                }
            }
            op::WRITE => {
                let (Some(offset), Some(size)) = (b.u64(8), b.u32(16)) else {
                    return Reply::Error(libc::EINVAL);
                };
                let Some(data) = body.get(40..40 + size as usize) else {
                    return Reply::Error(libc::EINVAL);
                };
                match self.device.write_at(data, offset) {
                    Ok(()) => {
                        let mut out = Out::default();
                        out.u32(size).u32(0);
                        Reply::Data(out.0)
                    }
                    Err(e) => Reply::Error(errno(&e)),
                }
            }
            op::FSYNC | op::FSYNCDIR => match self.device.flush() {
                Ok(()) => Reply::Data(Vec::new()),
                Err(e) => Reply::Error(errno(&e)),
            },
            op::FLUSH | op::RELEASE | op::RELEASEDIR | op::ACCESS | op::DESTROY => {
                Reply::Data(Vec::new())
            }
            op::STATFS => {
                let size = self.device.size();
                let mut out = Out::default();
                out.u64(size / 4096)
                    .u64(0)
                    .u64(0)
                    .u64(2)
                    .u64(0)
                    .u32(4096)
                    .u32(255)
                    .u32(4096)
                    .u32(0)
                    .zeros(24);
                Reply::Data(out.0)
            }
            op::FALLOCATE => {
                let (Some(offset), Some(length), Some(mode)) = (b.u64(8), b.u64(16), b.u32(24))
                else {
                    return Reply::Error(libc::EINVAL);
                };
                if mode == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE {
                    match self.device.discard(offset, length) {
                        Ok(()) => Reply::Data(Vec::new()),
                        Err(e) => Reply::Error(errno(&e)),
                    }
                } else if mode & !FALLOC_FL_KEEP_SIZE == 0
                    && offset.saturating_add(length) <= self.device.size()
                {
                    // Replicas are thin; space inside the volume is already promised.
                    Reply::Data(Vec::new())
                } else {
                    Reply::Error(libc::EOPNOTSUPP)
                }
            }
            op::READDIR => {
                let (Some(offset), Some(size)) = (b.u64(8), b.u32(16)) else {
                    return Reply::Error(libc::EINVAL);
                };
                let entries: [(u64, &str, u32); 3] = [
                    (ROOT_INO, ".", libc::DT_DIR as u32),
                    (ROOT_INO, "..", libc::DT_DIR as u32),
                    (FILE_INO, FILE_NAME, libc::DT_REG as u32),
                ];
                let mut out = Out::default();
                for (i, (ino, name, kind)) in entries.iter().enumerate().skip(offset as usize) {
                    let rec = (24 + name.len()).next_multiple_of(8);
                    if out.0.len() + rec > size as usize {
                        break;
                    }
                    out.u64(*ino)
                        .u64(i as u64 + 1)
                        .u32(name.len() as u32)
                        .u32(*kind);
                    out.0.extend_from_slice(name.as_bytes());
                    out.zeros(rec - 24 - name.len());
                }
                Reply::Data(out.0)
            }
            _ => Reply::Error(libc::ENOSYS),
        }
    }
}
