//! Replicas as sparse files in a directory on this node's disk.
//!
//! Hot path: `LocalReplica::{read_at, write_at}` run for every I/O; they do no
//! metadata work and no allocation. Aligned I/O goes through an O_DIRECT
//! descriptor so nothing is cached twice; unaligned I/O (rare: the loop device
//! sends 4 KiB-aligned requests) falls back to a buffered descriptor, and
//! `flush` (fdatasync) makes both durable.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::replica::aligned::is_aligned;
use crate::replica::{Pool, ReplicaIo};

pub struct LocalPool {
    dir: PathBuf,
    capacity_override: Option<u64>,
}

impl LocalPool {
    pub fn new(dir: &Path, capacity_override: Option<u64>) -> Result<LocalPool> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("cannot create pool dir {}", dir.display()), e))?;
        Ok(LocalPool {
            dir: dir.to_path_buf(),
            capacity_override,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Pool for LocalPool {
    fn create(&self, name: &str, size: u64) -> Result<()> {
        let path = self.path(name);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("cannot create replica {}", path.display()), e))?;
        let current = file
            .metadata()
            .map_err(|e| Error::io(format!("cannot stat replica {}", path.display()), e))?
            .len();
        if current < size {
            file.set_len(size)
                .map_err(|e| Error::io(format!("cannot size replica {}", path.display()), e))?;
        }
        file.sync_all()
            .map_err(|e| Error::io(format!("cannot sync replica {}", path.display()), e))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(format!("cannot sync pool dir {}", self.dir.display()), e))
    }

    fn grow(&self, name: &str, size: u64) -> Result<()> {
        let path = self.path(name);
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("cannot open replica {}", path.display()), e))?;
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
        let path = self.path(name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(
                format!("cannot delete replica {}", path.display()),
                e,
            )),
        }
    }

    fn size_of(&self, name: &str) -> Result<Option<u64>> {
        let path = self.path(name);
        match std::fs::metadata(&path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(
                format!("cannot stat replica {}", path.display()),
                e,
            )),
        }
    }

    fn open(&self, name: &str) -> Result<Box<dyn ReplicaIo>> {
        Ok(Box::new(LocalReplica::open(&self.path(name))?))
    }

    fn capacity(&self) -> Result<u64> {
        if let Some(c) = self.capacity_override {
            return Ok(c);
        }
        let st = nix::sys::statvfs::statvfs(&self.dir).map_err(|e| {
            Error::io(
                format!("cannot statvfs pool dir {}", self.dir.display()),
                io::Error::from(e),
            )
        })?;
        Ok(st.blocks() * st.fragment_size())
    }
}

pub struct LocalReplica {
    path: PathBuf,
    direct: File,
    /// Whether `direct` really is O_DIRECT (tmpfs refuses it).
    is_direct: bool,
    buffered: File,
    inode: u64,
}

impl LocalReplica {
    pub fn open(path: &Path) -> Result<LocalReplica> {
        let open = |flags: i32| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(flags)
                .open(path)
                .map_err(|e| Error::io(format!("cannot open replica {}", path.display()), e))
        };
        let buffered = open(0)?;
        // Some filesystems (tmpfs) refuse O_DIRECT; then every I/O is buffered
        // and flush still makes it durable.
        let (direct, is_direct) = match open(libc::O_DIRECT) {
            Ok(f) => (f, true),
            Err(_) => (open(0)?, false),
        };
        let inode = buffered
            .metadata()
            .map_err(|e| Error::io(format!("cannot stat replica {}", path.display()), e))?
            .ino();
        Ok(LocalReplica {
            path: path.to_path_buf(),
            direct,
            is_direct,
            buffered,
            inode,
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
        let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
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

    fn check(&self) -> std::result::Result<(), String> {
        let open = self
            .buffered
            .metadata()
            .map_err(|e| format!("cannot stat open replica {}: {e}", self.path.display()))?;
        if open.nlink() == 0 {
            return Err(format!("replica file {} was removed", self.path.display()));
        }
        match std::fs::metadata(&self.path) {
            Ok(m) if m.ino() == self.inode => Ok(()),
            Ok(_) => Err(format!("replica file {} was replaced", self.path.display())),
            Err(e) => Err(format!(
                "replica file {} is unreachable: {e}",
                self.path.display()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::aligned::AlignedBuf;

    #[test]
    fn create_is_idempotent_and_grow_never_shrinks() {
        let dir = tempfile::tempdir().unwrap();
        let pool = LocalPool::new(dir.path(), None).unwrap();
        pool.create("r", 1 << 20).unwrap();
        pool.create("r", 1 << 20).unwrap();
        assert_eq!(pool.size_of("r").unwrap(), Some(1 << 20));
        pool.grow("r", 4 << 20).unwrap();
        pool.grow("r", 2 << 20).unwrap();
        assert_eq!(pool.size_of("r").unwrap(), Some(4 << 20));
        pool.delete("r").unwrap();
        pool.delete("r").unwrap();
        assert_eq!(pool.size_of("r").unwrap(), None);
        assert!(pool.capacity().unwrap() > 0);
    }

    #[test]
    fn aligned_and_unaligned_io_read_back_and_removal_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let pool = LocalPool::new(dir.path(), None).unwrap();
        pool.create("r", 1 << 20).unwrap();
        let r = pool.open("r").unwrap();
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
        r.read_at(back.as_mut_slice(), 4096).unwrap();
        assert!(back.as_slice()[..4096].iter().all(|&b| b == 0));
        assert!(back.as_slice()[4096..].iter().all(|&b| b == 5));
        assert!(r.check().is_ok());
        std::fs::remove_file(dir.path().join("r")).unwrap();
        let reason = r.check().unwrap_err();
        assert!(reason.contains("was removed"), "{reason}");
    }
}
