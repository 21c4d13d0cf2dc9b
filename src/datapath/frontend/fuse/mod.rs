//! Our own FUSE server, speaking the kernel protocol on `/dev/fuse` directly
//! (no libfuse, no fuser): it exposes one [`BlockDevice`](super::BlockDevice) as a single regular
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
//!
//! The parts: `mount` mounts, unmounts and aborts sessions; `export` runs
//! one (the threads, and stopping them); `reactor` is what those threads
//! do; `buffer` lays out and pools the request buffers; `request` parses
//! what the kernel sends, `ops` answers it, `reply` encodes and writes the
//! answer; `passthrough` registers the backing file and `revoke` ends it;
//! `abi` is the kernel's structures.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

#[allow(non_camel_case_types)]
pub mod abi;
#[forbid(unsafe_code)]
mod buffer;
#[forbid(unsafe_code)]
mod export;
#[forbid(unsafe_code)]
mod mount;
#[forbid(unsafe_code)]
mod ops;
mod passthrough;
mod reactor;
#[forbid(unsafe_code)]
mod reply;
#[forbid(unsafe_code)]
mod request;
#[forbid(unsafe_code)]
mod revoke;
#[cfg(test)]
#[forbid(unsafe_code)]
mod tests;

pub use export::{FuseExport, FuseOptions};
pub use mount::{abort, is_mounted, open_session, unmount};
pub use request::{Operation, ParseError, Request, parse_request};
pub use revoke::Revoker;

/// The exported file's name in the root of the mount.
pub const FILE_NAME: &str = "volume";
/// Largest WRITE (and READ) we negotiate: 1 MiB, i.e. 256 pages.
pub const MAX_WRITE: u32 = 1 << 20;

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
