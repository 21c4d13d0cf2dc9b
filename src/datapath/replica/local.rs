//! Replicas as sparse files in a directory on this node's disk.
//!
//! Hot path: `LocalReplica::{read_at, write_at}` run for every I/O; they do no
//! metadata work and no allocation. Aligned I/O goes through an O_DIRECT
//! descriptor so nothing is cached twice; unaligned I/O (rare: the loop device
//! sends 4 KiB-aligned requests) falls back to a buffered descriptor, and
//! `flush` (fdatasync) makes both durable.
//!
//! Confinement: a pool touches nothing but replica files directly inside its
//! directory. Names must be replica file names (`replica::check_replica_name`:
//! no `/`, no `..`, no NUL), and every file is opened, stat'ed and unlinked
//! relative to the directory's descriptor with `O_NOFOLLOW`, so neither a
//! caller's name nor a symbolic link planted in the pool leads outside it.
//! Replica files are 0600 and the directory 0700: volume contents are
//! readable by root only. Pools written by older versions (0644 files in a
//! 0755 directory) are tightened when opened.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstat, fstatat};
use nix::unistd::{UnlinkatFlags, unlinkat};

use crate::core::error::{Error, ErrorKind, Result};
use crate::core::pool::{Pool, ReplicaIo, check_replica_name, is_replica_name};
use crate::datapath::replica::aligned::is_aligned;

/// Replica files: owner only.
pub const REPLICA_MODE: u32 = 0o600;

pub struct LocalPool {
    dir: PathBuf,
    capacity_override: Option<u64>,
}

/// Opens the pool directory, by its configured path (an admin's symbolic
/// link or a disk mounted there since is followed), for one operation: what
/// is inside it is then reached only through this descriptor.
fn open_dir(dir: &Path) -> Result<OwnedFd> {
    openat(
        nix::fcntl::AT_FDCWD,
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        Error::io(
            format!("cannot open pool dir {}", dir.display()),
            errno_io(e),
        )
    })
}

/// Creates the pool directory 0700 (parents too), or tightens one an older
/// version left open, but only when it holds nothing but replicas: a pool
/// pointed at a directory with other files in it (by mistake, or at `/etc`)
/// never has its mode changed; its replica files are 0600 all the same.
fn restrict_pool_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(crate::datapath::host::files::PRIVATE_DIR_MODE)
        .create(dir)
        .map_err(|e| Error::io(format!("cannot create pool dir {}", dir.display()), e))?;
    let mode = std::fs::metadata(dir)
        .map_err(|e| Error::io(format!("cannot stat pool dir {}", dir.display()), e))?
        .permissions()
        .mode()
        & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    let foreign = std::fs::read_dir(dir)
        .map_err(|e| Error::io(format!("cannot list pool dir {}", dir.display()), e))?
        .flatten()
        .find(|e| {
            let name = e.file_name();
            !name
                .to_str()
                .is_some_and(|n| is_replica_name(n) || matches!(n, ".terna-probe" | "lost+found"))
        });
    if let Some(entry) = foreign {
        tracing::warn!(
            dir = %dir.display(),
            mode = format!("{mode:o}"),
            other = ?entry.file_name(),
            "pool directory holds more than replicas: its mode is left as it is (replicas are 0600)"
        );
        return Ok(());
    }
    std::fs::set_permissions(
        dir,
        std::fs::Permissions::from_mode(crate::datapath::host::files::PRIVATE_DIR_MODE),
    )
    .map_err(|e| Error::io(format!("cannot restrict pool dir {}", dir.display()), e))?;
    tracing::info!(dir = %dir.display(), was = format!("{mode:o}"), "pool directory restricted to mode 700");
    Ok(())
}

fn errno_io(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn is_regular(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG
}

/// What `openat` says about a name in a pool, as an error for people.
fn open_error(path: &Path, what: &str, e: nix::errno::Errno) -> Error {
    match e {
        nix::errno::Errno::ELOOP => Error::with_source(
            ErrorKind::FailedPrecondition,
            format!(
                "replica {} is a symbolic link; a pool never follows links",
                path.display()
            ),
            errno_io(e),
        ),
        nix::errno::Errno::ENOENT => Error::with_source(
            ErrorKind::NotFound,
            format!(
                "cannot {what} replica {}: it does not exist",
                path.display()
            ),
            errno_io(e),
        ),
        _ => Error::io(
            format!("cannot {what} replica {}", path.display()),
            errno_io(e),
        ),
    }
}

/// Opens `name` in the pool directory `dir`: never through a symbolic link,
/// and only a regular file.
fn open_in(dir: &OwnedFd, path: &Path, name: &str, flags: OFlag, what: &str) -> Result<File> {
    let fd = openat(
        dir.as_fd(),
        name,
        flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        Mode::from_bits_truncate(REPLICA_MODE),
    )
    .map_err(|e| open_error(path, what, e))?;
    let st = fstat(&fd).map_err(|e| {
        Error::io(
            format!("cannot stat replica {}", path.display()),
            errno_io(e),
        )
    })?;
    if !is_regular(&st) {
        return Err(Error::precondition(format!(
            "replica {} is not a regular file",
            path.display()
        )));
    }
    // O_NONBLOCK only kept a planted FIFO from blocking the open.
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags & OFlag::O_DIRECT)).map_err(
        |e| {
            Error::io(
                format!("cannot open replica {}", path.display()),
                errno_io(e),
            )
        },
    )?;
    let file = File::from(fd);
    if st.st_mode & 0o7777 != REPLICA_MODE {
        fchmod(&file, Mode::from_bits_truncate(REPLICA_MODE)).map_err(|e| {
            Error::io(
                format!("cannot restrict replica {}", path.display()),
                errno_io(e),
            )
        })?;
    }
    Ok(file)
}

impl LocalPool {
    pub fn new(dir: &Path, capacity_override: Option<u64>) -> Result<LocalPool> {
        restrict_pool_dir(dir)?;
        let pool = LocalPool {
            dir: dir.to_path_buf(),
            capacity_override,
        };
        pool.restrict_replicas()?;
        Ok(pool)
    }

    /// Tightens replica files an older version created 0644.
    fn restrict_replicas(&self) -> Result<()> {
        let fd = open_dir(&self.dir)?;
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| Error::io(format!("cannot list pool dir {}", self.dir.display()), e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str().filter(|n| is_replica_name(n)) else {
                continue;
            };
            if let Ok(st) = fstatat(fd.as_fd(), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
                && is_regular(&st)
                && st.st_mode & 0o077 != 0
            {
                open_in(&fd, &self.path(name), name, OFlag::O_RDONLY, "restrict")?;
            }
        }
        Ok(())
    }

    /// For messages only: nothing is ever opened by this path.
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn open_file(&self, dir: &OwnedFd, name: &str, flags: OFlag, what: &str) -> Result<File> {
        check_replica_name(name)?;
        open_in(dir, &self.path(name), name, flags, what)
    }

    fn sync_dir(&self, dir: &OwnedFd) -> Result<()> {
        nix::unistd::fsync(dir.as_fd()).map_err(|e| {
            Error::io(
                format!("cannot sync pool dir {}", self.dir.display()),
                errno_io(e),
            )
        })
    }
}

/// Sizes beyond what a file offset can hold are refused before any syscall.
fn check_size(path: &Path, size: u64) -> Result<()> {
    if i64::try_from(size).is_err() {
        return Err(Error::new(
            ErrorKind::OutOfRange,
            format!(
                "replica {} cannot be {size} bytes: larger than a file can be",
                path.display()
            ),
        ));
    }
    Ok(())
}

impl Pool for LocalPool {
    fn create(&self, name: &str, size: u64) -> Result<()> {
        check_replica_name(name)?;
        let path = self.path(name);
        check_size(&path, size)?;
        let dir = open_dir(&self.dir)?;
        let file = self.open_file(&dir, name, OFlag::O_CREAT | OFlag::O_WRONLY, "create")?;
        let current = file
            .metadata()
            .map_err(|e| Error::io(format!("cannot stat replica {}", path.display()), e))?
            .len();
        if current < size
            && let Err(e) = file.set_len(size)
        {
            // A file this call made and could not size is no replica: it
            // would be taken for one of size 0 later.
            if current == 0 {
                let _ = unlinkat(dir.as_fd(), name, UnlinkatFlags::NoRemoveDir);
            }
            return Err(Error::io(
                format!("cannot size replica {}", path.display()),
                e,
            ));
        }
        file.sync_all()
            .map_err(|e| Error::io(format!("cannot sync replica {}", path.display()), e))?;
        self.sync_dir(&dir)
    }

    fn grow(&self, name: &str, size: u64) -> Result<()> {
        check_replica_name(name)?;
        let path = self.path(name);
        check_size(&path, size)?;
        let file = self.open_file(&open_dir(&self.dir)?, name, OFlag::O_WRONLY, "grow")?;
        let current = file
            .metadata()
            .map_err(|e| Error::io(format!("cannot stat replica {}", path.display()), e))?
            .len();
        if current < size {
            file.set_len(size)
                .and_then(|()| file.sync_all())
                .map_err(|e| Error::io(format!("cannot grow replica {}", path.display()), e))?;
        }
        Ok(())
    }

    fn delete(&self, name: &str) -> Result<()> {
        check_replica_name(name)?;
        // unlinkat removes a symbolic link itself, never what it points to.
        let dir = open_dir(&self.dir)?;
        match unlinkat(dir.as_fd(), name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(nix::errno::Errno::ENOENT) => Ok(()),
            Err(e) => Err(Error::io(
                format!("cannot delete replica {}", self.path(name).display()),
                errno_io(e),
            )),
        }
    }

    fn size_of(&self, name: &str) -> Result<Option<u64>> {
        check_replica_name(name)?;
        let path = self.path(name);
        match fstatat(
            open_dir(&self.dir)?.as_fd(),
            name,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) if is_regular(&st) => Ok(Some(st.st_size as u64)),
            Ok(_) => Err(Error::precondition(format!(
                "replica {} is not a regular file",
                path.display()
            ))),
            Err(nix::errno::Errno::ENOENT) => Ok(None),
            Err(e) => Err(Error::io(
                format!("cannot stat replica {}", path.display()),
                errno_io(e),
            )),
        }
    }

    fn open(&self, name: &str) -> Result<Box<dyn ReplicaIo>> {
        check_replica_name(name)?;
        Ok(Box::new(LocalReplica::open_in(&self.dir, name)?))
    }

    /// An empty file of the replica's size renamed over it: at every
    /// instant the name is a whole replica, the old one or the new.
    fn recreate_empty(&self, name: &str) -> Result<()> {
        check_replica_name(name)?;
        let path = self.path(name);
        let size = self.size_of(name)?.ok_or_else(|| {
            Error::not_found(format!("replica {} does not exist", path.display()))
        })?;
        let dir = open_dir(&self.dir)?;
        // Not a replica name, so no listing takes a leftover for one.
        let temp = format!(".{name}.empty");
        let file = open_in(
            &dir,
            &self.path(&temp),
            &temp,
            OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_WRONLY,
            "recreate",
        )?;
        file.set_len(size)
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io(format!("cannot size replica {}", path.display()), e))?;
        nix::fcntl::renameat(dir.as_fd(), temp.as_str(), dir.as_fd(), name).map_err(|e| {
            Error::io(
                format!("cannot replace replica {}", path.display()),
                errno_io(e),
            )
        })?;
        self.sync_dir(&dir)
    }

    fn capacity(&self) -> Result<u64> {
        if let Some(c) = self.capacity_override {
            return Ok(c);
        }
        let st = nix::sys::statvfs::statvfs(&self.dir).map_err(|e| {
            Error::io(
                format!("cannot statvfs pool dir {}", self.dir.display()),
                errno_io(e),
            )
        })?;
        Ok(st.blocks() * st.fragment_size())
    }
}

pub struct LocalReplica {
    /// The pool directory and the replica's name in it, for `check`.
    dir: PathBuf,
    name: String,
    /// For messages.
    path: PathBuf,
    direct: File,
    /// Whether `direct` really is O_DIRECT (tmpfs refuses it).
    is_direct: bool,
    buffered: File,
    inode: u64,
}

impl LocalReplica {
    /// Opens replica `name` (already checked to be a replica file name) in
    /// the pool directory `dir`.
    fn open_in(dir_path: &Path, name: &str) -> Result<LocalReplica> {
        let path = dir_path.join(name);
        let dir = open_dir(dir_path)?;
        let buffered = open_in(&dir, &path, name, OFlag::O_RDWR, "open")?;
        // Some filesystems (tmpfs) refuse O_DIRECT; then every I/O is buffered
        // and flush still makes it durable.
        let (direct, is_direct) =
            match open_in(&dir, &path, name, OFlag::O_RDWR | OFlag::O_DIRECT, "open") {
                Ok(f) => (f, true),
                Err(_) => (open_in(&dir, &path, name, OFlag::O_RDWR, "open")?, false),
            };
        let stat = |f: &File| {
            f.metadata()
                .map_err(|e| Error::io(format!("cannot stat replica {}", path.display()), e))
        };
        let (b, d) = (stat(&buffered)?, stat(&direct)?);
        if (b.dev(), b.ino()) != (d.dev(), d.ino()) {
            return Err(Error::precondition(format!(
                "replica {} was replaced while it was being opened",
                path.display()
            )));
        }
        Ok(LocalReplica {
            dir: dir_path.to_path_buf(),
            name: name.to_string(),
            path,
            direct,
            is_direct,
            buffered,
            inode: b.ino(),
        })
    }
}

impl ReplicaIo for LocalReplica {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if is_aligned(buf.as_ptr(), buf.len(), offset) {
            match self.direct.read_exact_at(buf, offset) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                other => return other,
            }
        }
        self.buffered.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if is_aligned(buf.as_ptr(), buf.len(), offset) {
            match self.direct.write_all_at(buf, offset) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                other => return other,
            }
        }
        self.buffered.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.buffered.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        if off.checked_add(len).is_none() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        nix::fcntl::fallocate(
            &self.buffered,
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
        .map_err(io::Error::from)
    }

    fn direct_fd(&self) -> Option<RawFd> {
        self.is_direct.then(|| self.direct.as_raw_fd())
    }

    fn size(&self) -> Option<io::Result<u64>> {
        Some(self.buffered.metadata().map(|m| m.len()))
    }

    fn check(&self) -> std::result::Result<(), String> {
        let open = self
            .buffered
            .metadata()
            .map_err(|e| format!("cannot stat open replica {}: {e}", self.path.display()))?;
        if open.nlink() == 0 {
            return Err(format!("replica file {} was removed", self.path.display()));
        }
        let dir = open_dir(&self.dir).map_err(|e| e.report().to_string())?;
        match fstatat(
            dir.as_fd(),
            self.name.as_str(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) if st.st_ino == self.inode => Ok(()),
            Ok(_) => Err(format!("replica file {} was replaced", self.path.display())),
            Err(e) => Err(format!(
                "replica file {} is unreachable: {}",
                self.path.display(),
                errno_io(e)
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::replica::aligned::AlignedBuf;
    use std::os::unix::fs::PermissionsExt;

    fn name(index: usize) -> String {
        crate::core::volume::replica_file_name(&crate::core::volume::volume_id_for("local"), index)
    }

    fn mode_of(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn create_is_idempotent_and_grow_never_shrinks() {
        let dir = tempfile::tempdir().unwrap();
        let pool = LocalPool::new(dir.path(), None).unwrap();
        let r = name(0);
        pool.create(&r, 1 << 20).unwrap();
        pool.create(&r, 1 << 20).unwrap();
        assert_eq!(pool.size_of(&r).unwrap(), Some(1 << 20));
        pool.grow(&r, 4 << 20).unwrap();
        pool.grow(&r, 2 << 20).unwrap();
        assert_eq!(pool.size_of(&r).unwrap(), Some(4 << 20));
        pool.delete(&r).unwrap();
        pool.delete(&r).unwrap();
        assert_eq!(pool.size_of(&r).unwrap(), None);
        assert!(pool.capacity().unwrap() > 0);
        // Sizes no file can have are refused before anything is created.
        let err = pool.create(&r, u64::MAX).unwrap_err();
        assert_eq!(err.kind, ErrorKind::OutOfRange, "{err}");
        assert_eq!(pool.size_of(&r).unwrap(), None);
    }

    #[test]
    fn aligned_and_unaligned_io_read_back_and_removal_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let pool = LocalPool::new(dir.path(), None).unwrap();
        pool.create(&name(0), 1 << 20).unwrap();
        let r = pool.open(&name(0)).unwrap();
        let data = AlignedBuf::copy_of(&[5u8; 8192]);
        r.write_at(data.as_slice(), 4096).unwrap();
        r.write_at(b"hello", 3).unwrap();
        r.flush().unwrap();
        let mut back = AlignedBuf::zeroed(8192);
        r.read_at(back.as_mut_slice(), 4096).unwrap();
        assert_eq!(back.as_slice(), data.as_slice());
        let mut small = [0u8; 5];
        r.read_at(&mut small, 3).unwrap();
        assert_eq!(&small, b"hello");
        r.discard(4096, 4096).unwrap();
        r.discard(4096, 0).unwrap();
        assert!(r.discard(u64::MAX - 10, 100).is_err());
        assert!(r.discard(i64::MAX as u64, 4096).is_err());
        r.read_at(back.as_mut_slice(), 4096).unwrap();
        assert!(back.as_slice()[..4096].iter().all(|&b| b == 0));
        assert!(back.as_slice()[4096..].iter().all(|&b| b == 5));
        let mut far = [0u8; 16];
        assert!(r.read_at(&mut far, u64::MAX - 8).is_err());
        assert!(r.check().is_ok());
        std::fs::remove_file(dir.path().join(name(0))).unwrap();
        let reason = r.check().unwrap_err();
        assert!(reason.contains("was removed"), "{reason}");
    }

    /// Every operation refuses names that are not replica file names, and
    #[test]
    fn a_create_the_file_system_cannot_size_leaves_no_file() {
        let root = tempfile::tempdir().unwrap();
        let pool = LocalPool::new(root.path(), None).unwrap();
        let name =
            crate::core::volume::replica_file_name(&crate::core::volume::volume_id_for("huge"), 0);
        // Past ext4's and xfs's largest file, inside i64.
        if pool.create(&name, 1 << 62).is_err() {
            assert_eq!(pool.size_of(&name).unwrap(), None);
        } else {
            // A file system that takes it (btrfs, tmpfs) holds a real replica.
            assert_eq!(pool.size_of(&name).unwrap(), Some(1 << 62));
        }
    }

    /// nothing outside the pool is created, read or removed.
    #[test]
    fn names_outside_the_replica_format_are_refused_by_every_operation() {
        let root = tempfile::tempdir().unwrap();
        let pool_dir = root.path().join("pools/p");
        let pool = LocalPool::new(&pool_dir, None).unwrap();
        let outside = root.path().join("secret");
        std::fs::write(&outside, b"keep").unwrap();
        let long = "a".repeat(4096);
        let abs = outside.display().to_string();
        let bad = [
            "../../secret",
            "../../../etc/passwd",
            "/etc/passwd",
            abs.as_str(),
            "a/b",
            "tv-0123456789abcdef01234567.r0.img\0",
            "\0",
            long.as_str(),
            ".",
            "..",
            "",
            "secret",
        ];
        for name in bad {
            let kind = |r: Result<()>| r.unwrap_err().kind;
            assert_eq!(
                kind(pool.create(name, 4096)),
                ErrorKind::InvalidArgument,
                "{name:?}"
            );
            assert_eq!(
                kind(pool.grow(name, 4096)),
                ErrorKind::InvalidArgument,
                "{name:?}"
            );
            assert_eq!(
                kind(pool.delete(name)),
                ErrorKind::InvalidArgument,
                "{name:?}"
            );
            assert_eq!(
                kind(pool.size_of(name).map(drop)),
                ErrorKind::InvalidArgument,
                "{name:?}"
            );
            assert_eq!(
                kind(pool.open(name).map(drop)),
                ErrorKind::InvalidArgument,
                "{name:?}"
            );
        }
        assert_eq!(std::fs::read(&outside).unwrap(), b"keep");
        assert!(!root.path().join("pools/a").exists());
        assert_eq!(std::fs::read_dir(&pool_dir).unwrap().count(), 0);
    }

    /// A symbolic link planted in the pool under a replica's name is never
    /// followed: not to create, size, open, grow or stat through, and
    /// deleting it removes the link, not its target.
    #[test]
    fn a_symlink_planted_in_the_pool_leads_nowhere() {
        let root = tempfile::tempdir().unwrap();
        let pool_dir = root.path().join("pool");
        let pool = LocalPool::new(&pool_dir, None).unwrap();
        let target = root.path().join("terna.toml");
        std::fs::write(&target, b"secret config").unwrap();
        let link = name(1);
        std::os::unix::fs::symlink(&target, pool_dir.join(&link)).unwrap();
        for r in [pool.create(&link, 1 << 20), pool.grow(&link, 1 << 20)] {
            let err = r.unwrap_err();
            assert_eq!(err.kind, ErrorKind::FailedPrecondition, "{err}");
            assert!(err.message.contains("symbolic link"), "{err}");
        }
        assert!(pool.open(&link).is_err());
        assert!(pool.size_of(&link).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"secret config");
        pool.delete(&link).unwrap();
        assert!(!pool_dir.join(&link).exists());
        assert_eq!(std::fs::read(&target).unwrap(), b"secret config");
        // A directory or a FIFO under a replica's name is no replica either.
        std::fs::create_dir(pool_dir.join(name(2))).unwrap();
        assert!(pool.open(&name(2)).is_err());
        assert!(pool.size_of(&name(2)).is_err());
        nix::unistd::mkfifo(&pool_dir.join(name(3)), Mode::from_bits_truncate(0o600)).unwrap();
        let err = pool.open(&name(3)).map(drop).unwrap_err();
        assert!(err.message.contains("not a regular file"), "{err}");
    }

    /// The pool directory is found by its path on every operation, so a
    /// disk mounted there (or the directory replaced) after the pool was
    /// made is where replicas go, as with plain paths.
    #[test]
    fn the_pool_dir_is_resolved_by_its_path_each_time() {
        let root = tempfile::tempdir().unwrap();
        let pool_dir = root.path().join("pool");
        let pool = LocalPool::new(&pool_dir, None).unwrap();
        pool.create(&name(0), 4096).unwrap();
        let r = pool.open(&name(0)).unwrap();
        std::fs::rename(&pool_dir, root.path().join("old")).unwrap();
        std::fs::create_dir(&pool_dir).unwrap();
        assert!(
            r.check().is_err(),
            "the replica's path no longer leads to it"
        );
        assert_eq!(pool.size_of(&name(0)).unwrap(), None);
        pool.create(&name(1), 4096).unwrap();
        assert!(pool_dir.join(name(1)).exists());
        assert!(!root.path().join("old").join(name(1)).exists());
    }

    #[test]
    fn replicas_and_their_pool_are_private_and_old_ones_are_tightened() {
        let root = tempfile::tempdir().unwrap();
        let pool_dir = root.path().join("pool");
        // As an older version left it: 0755 directory, 0644 replica.
        std::fs::create_dir(&pool_dir).unwrap();
        std::fs::set_permissions(&pool_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let old = pool_dir.join(name(0));
        std::fs::write(&old, vec![7u8; 4096]).unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
        let pool = LocalPool::new(&pool_dir, None).unwrap();
        assert_eq!(mode_of(&pool_dir), 0o700);
        assert_eq!(mode_of(&old), REPLICA_MODE);
        // A directory holding more than replicas keeps its mode (a pool
        // pointed at /etc must not close it), but its replicas are closed.
        let shared = root.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
        let other = shared.join("not-a-replica");
        std::fs::write(&other, b"x").unwrap();
        std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o644)).unwrap();
        let in_shared = shared.join(name(5));
        std::fs::write(&in_shared, b"x").unwrap();
        std::fs::set_permissions(&in_shared, std::fs::Permissions::from_mode(0o644)).unwrap();
        LocalPool::new(&shared, None).unwrap();
        assert_eq!(mode_of(&shared), 0o755);
        assert_eq!(mode_of(&other), 0o644, "only replica files are touched");
        assert_eq!(mode_of(&in_shared), REPLICA_MODE);
        pool.create(&name(1), 1 << 20).unwrap();
        let new = pool_dir.join(name(1));
        assert_eq!(mode_of(&new), REPLICA_MODE);
        // A nested pool directory is created private, parents included.
        let nested = root.path().join("a/b/pool");
        LocalPool::new(&nested, None).unwrap();
        assert_eq!(mode_of(&nested), 0o700);
        // Another user cannot read a replica (when we can become one).
        if nix::unistd::geteuid().is_root() {
            use std::os::unix::process::CommandExt;
            std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            let out = std::process::Command::new("cat")
                .arg(&new)
                .uid(65534)
                .gid(65534)
                .output()
                .unwrap();
            assert!(!out.status.success(), "nobody read a replica");
            // Even with the directory opened up, the file itself is closed.
            std::fs::set_permissions(&pool_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            let out = std::process::Command::new("cat")
                .arg(&old)
                .uid(65534)
                .gid(65534)
                .output()
                .unwrap();
            assert!(!out.status.success(), "nobody read a replica");
        }
    }
}
