//! FUSE passthrough: registering the device's file as the backing file of
//! opens of the volume (`revoke` ends it).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::abi::*;

/// The device's file as a passthrough backing file of this session.
#[derive(Debug, Clone, Copy)]
pub(super) enum Backing {
    Untried,
    Registered(i32),
    /// The kernel would not (no passthrough negotiated, no CAP_SYS_ADMIN,
    /// a backing file stacked too deep): I/O stays in user space.
    Refused,
    /// Passthrough was revoked (`Revoker`); never again in this session.
    Revoked,
}

/// `FUSE_DEV_IOC_BACKING_OPEN`: registers `file` as a backing file of the
/// session `dev`, and returns its id.
pub(super) fn backing_open(dev: BorrowedFd<'_>, file: BorrowedFd<'_>) -> io::Result<i32> {
    let map = fuse_backing_map {
        fd: file.as_raw_fd(),
        flags: 0,
        padding: 0,
    };
    // SAFETY: FUSE_DEV_IOC_BACKING_OPEN copies one `struct
    // fuse_backing_map` (its layout pinned in `abi`) from the address, a
    // local that lives through the call, and keeps no pointer to it. Both
    // fds are borrowed, so open; the kernel takes its own reference to
    // `file`.
    let rc = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            FUSE_DEV_IOC_BACKING_OPEN as libc::Ioctl,
            &raw const map,
        )
    };
    if rc > 0 {
        Ok(rc)
    } else {
        Err(io::Error::last_os_error())
    }
}
