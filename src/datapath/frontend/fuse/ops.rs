//! What each request does to the one-file filesystem the export shows: a
//! root directory holding `volume`, whose bytes are the block device's.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use super::abi::*;
use super::buffer::{DATA_OFFSET, PAGE, REQ_OFFSET};
use super::passthrough::{Backing, backing_open};
use super::reply::{Response, Small, errno_of, ok_empty};
use super::request::{Operation, ParseError, parse_request};
use super::{FILE_NAME, MAX_WRITE};
use crate::datapath::frontend::{BlockDevice, DirectRead};

const MAX_PAGES: u16 = (MAX_WRITE as usize / PAGE) as u16;
const MAX_BACKGROUND: u16 = 128;
const CONGESTION_THRESHOLD: u16 = 96;

pub(super) const VOLUME_INO: u64 = 2;
pub(super) const VOLUME_NAME: &[u8] = FILE_NAME.as_bytes();
/// Names never change, so lookups may be cached for a while.
const ENTRY_TTL_SECS: u64 = 60;
/// Attributes are not cached: a resized volume shows its new size at the next
/// stat (which also updates the inode size the loop driver reads).
const ATTR_TTL_SECS: u64 = 0;

/// What the export serves, and the state its answers share.
pub(super) struct Session {
    pub(super) device: Arc<dyn BlockDevice>,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) time: u64,
    /// The session's fd, to register passthrough backing files on (`None`
    /// in unit tests, which have no session).
    pub(super) dev: Option<Arc<OwnedFd>>,
    pub(super) backing: Mutex<Backing>,
    /// The volume file's inode generation; a new one revokes the old inode.
    pub(super) generation: AtomicU64,
}

impl Session {
    /// Serves `device` on the session `dev`. The files show this process's
    /// user and group as owner, and now as their times.
    pub(super) fn new(device: Arc<dyn BlockDevice>, dev: Arc<OwnedFd>) -> Session {
        Session {
            device,
            dev: Some(dev),
            backing: Mutex::new(Backing::Untried),
            generation: AtomicU64::new(0),
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }

    /// Handles the request of `n` bytes at `buf[REQ_OFFSET..]`; `None` means
    /// no reply (FORGET, INTERRUPT, or a request too short to answer).
    pub(super) fn handle<'a>(&self, buf: &'a mut [u8], n: usize) -> Option<(u64, Response<'a>)> {
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
    pub(super) fn direct_read(
        &self,
        buf: &[u8],
        n: usize,
    ) -> Option<(u64, u64, usize, Box<dyn DirectRead>)> {
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
    pub(super) fn open_volume(&self) -> fuse_open_out {
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
        let limit = (arg.size as usize).min(Small::CAPACITY);
        for (i, (ino, name, typ)) in entries.iter().enumerate().skip(arg.offset as usize) {
            let dirent = fuse_dirent {
                ino: *ino,
                off: i as u64 + 1,
                namelen: name.len() as u32,
                typ: *typ,
            };
            let rec = (size_of::<fuse_dirent>() + name.len()).next_multiple_of(8);
            if out.len() + rec > limit {
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

impl Session {
    pub(super) fn backing_id(&self) -> Option<i32> {
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
        match backing_open(dev.as_fd(), file.as_fd()) {
            Ok(id) => {
                tracing::info!(
                    backing_id = id,
                    "FUSE passthrough: the kernel serves this volume's I/O from its replica file"
                );
                *backing = Backing::Registered(id);
                Some(id)
            }
            Err(e) => {
                tracing::info!(error = %e, "FUSE passthrough refused; serving I/O in user space");
                *backing = Backing::Refused;
                None
            }
        }
    }
}
