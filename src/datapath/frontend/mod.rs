//! How the kernel sees a volume: the engine is exported as one file through
//! FUSE, and that file is attached to a loop device with direct I/O. The
//! filesystem (or the pod, in Block mode) uses the loop device.

pub mod fuse;
pub mod inherited;
pub mod loopdev;

use std::io;
use std::os::fd::{OwnedFd, RawFd};

/// Marks the calling thread `PR_SET_IO_FLUSHER`, so memory reclaim it
/// triggers does not wait on I/O that this thread completes. Needs
/// CAP_SYS_RESOURCE; old kernels refuse it (EINVAL).
pub fn mark_io_flusher() -> io::Result<()> {
    // From linux/prctl.h; libc does not export it.
    const PR_SET_IO_FLUSHER: libc::c_int = 57;
    // SAFETY: prctl with integer arguments only; it sets a flag of the
    // calling thread (PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE).
    let rc = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1 as libc::c_ulong, 0, 0, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A byte-addressable volume as the frontend needs it. The engine implements
/// this; the frontend knows nothing about replicas.
///
/// Every method may be called from many threads at once. `write_at` returns
/// only once the data is durable on every healthy replica that will serve it
/// (the engine's contract), so the frontend can acknowledge the kernel directly.
pub trait BlockDevice: Send + Sync + 'static {
    /// Current size in bytes.
    fn size(&self) -> u64;
    /// Fill `buf` from `offset`. Reads past the end are an error (EINVAL).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Make every acknowledged write durable.
    fn flush(&self) -> io::Result<()>;
    /// The range no longer holds data; reads of it return zeroes afterwards.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// A file holding the whole volume, byte for byte, that the kernel may
    /// read and write directly (FUSE passthrough) because nothing else has
    /// to see the I/O: a volume of one local replica. `None` otherwise.
    fn passthrough_fd(&self) -> Option<OwnedFd> {
        None
    }
    /// Where the caller may read `len` bytes at `offset` itself, with
    /// asynchronous I/O, in place of `read_at`: a replica file opened
    /// O_DIRECT, so the caller's buffer must be page aligned. `None`: use
    /// `read_at` (a range not page aligned, no local healthy replica).
    fn direct_read(&self, _offset: u64, _len: usize) -> Option<Box<dyn DirectRead>> {
        None
    }
}

/// A read the caller performs on a replica file (see
/// [`BlockDevice::direct_read`]). Holding it keeps the file open. A read
/// that fails or comes back short is dropped and done again with `read_at`,
/// which records the replica's fault and reads another one.
pub trait DirectRead: Send {
    /// The file, to read at the offset asked for.
    fn fd(&self) -> RawFd;
    /// The read completed in full.
    fn done(self: Box<Self>);
}
