//! Revoking FUSE passthrough, once the volume's one replica can no longer
//! be trusted.

use std::io::{self, IoSlice};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use super::abi::*;
use super::ops::{Session, VOLUME_NAME};
use super::passthrough::Backing;

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
