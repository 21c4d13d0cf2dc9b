//! FUSE passthrough: registering the device's file as the backing file of
//! opens of the volume, and revoking it.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use super::abi::*;
use super::ops::{Session, VOLUME_NAME};

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
    pub(super) fn new(path: PathBuf, session: Arc<Session>) -> Revoker {
        Revoker { path, session }
    }

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

/// `FUSE_DEV_IOC_BACKING_OPEN`: registers `file` as a backing file of the
/// session `dev`, and returns its id.
fn backing_open(dev: BorrowedFd<'_>, file: BorrowedFd<'_>) -> io::Result<i32> {
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
