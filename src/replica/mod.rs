//! Where replica bytes live. A `Pool` creates, sizes and deletes replicas; a
//! `ReplicaIo` reads and writes one: local files, another node's agent, or
//! an NFS export.

pub mod aligned;
#[cfg(test)]
pub(crate) mod conformance;
pub mod local;
pub mod nfs;
pub mod remote;

use std::io;

use crate::error::Result;

/// One replica's data. Called from many threads at once.
pub trait ReplicaIo: Send + Sync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Returns once the replica has the data (in its device cache at least;
    /// `flush` makes it durable).
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn flush(&self) -> io::Result<()>;
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Cheap liveness probe: `Err` says why the replica can no longer be trusted
    /// (its file was removed, its server is gone).
    fn check(&self) -> std::result::Result<(), String>;
    /// Makes sure no write issued before this call can still land, so what
    /// is copied afterwards is not overwritten by a late delivery.
    fn fence(&self) -> io::Result<()> {
        Ok(())
    }
    /// The replica's file, opened with O_DIRECT, when it is local.
    fn direct_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

/// A place replicas live: a directory on a disk, an agent, an NFS export.
pub trait Pool: Send + Sync {
    /// Creates a sparse replica of `size` bytes. Idempotent: an existing
    /// replica of that size is success.
    fn create(&self, name: &str, size: u64) -> Result<()>;
    /// Grows (never shrinks) the replica to `size` bytes.
    fn grow(&self, name: &str, size: u64) -> Result<()>;
    /// Deleting what is already gone is success.
    fn delete(&self, name: &str) -> Result<()>;
    /// `None` when the replica does not exist.
    fn size_of(&self, name: &str) -> Result<Option<u64>>;
    fn open(&self, name: &str) -> Result<Box<dyn ReplicaIo>>;
    /// Total bytes of the storage behind the pool.
    fn capacity(&self) -> Result<u64>;
    /// Replicas opened from now on write under staging claim `epoch`, so a
    /// newer claim can fence them out (remote pools; a local pool is only
    /// ever written by its own node).
    fn act_under_claim(&self, _epoch: u64) {}
    /// Bytes the storage itself says are still free, where it is shared
    /// with others (an NFS export); `None` when only our accounting counts.
    fn available(&self) -> Option<Result<u64>> {
        None
    }
}
