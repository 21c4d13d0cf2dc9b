//! Replies: what a request is answered with, and writing it to the fd the
//! request came from.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;

use super::abi::{Pod, bytes_of, fuse_out_header};

/// Answers request `unique` on `fd`, the fd it was read from (each fd
/// has its own queue of requests being processed).
pub(super) fn reply(fd: &OwnedFd, unique: u64, resp: &Response<'_>) {
    let (error, payload): (i32, &[u8]) = match resp {
        Response::Error(e) => (-e, &[]),
        Response::Small(s) => (0, s.as_slice()),
        Response::Data(d) => (0, d),
    };
    let hdr = fuse_out_header {
        len: (size_of::<fuse_out_header>() + payload.len()) as u32,
        error,
        unique,
    };
    match nix::sys::uio::writev(
        fd.as_fd(),
        &[IoSlice::new(bytes_of(&hdr)), IoSlice::new(payload)],
    ) {
        // ENOENT: the request was interrupted or aborted meanwhile; ENODEV:
        // the session ended, which the readers notice and stop on.
        Ok(_) | Err(Errno::ENOENT | Errno::ENODEV) => {}
        Err(e) => tracing::warn!(error = %e, unique, "writing FUSE reply failed"),
    }
}

/// A reply body: an errno, a small structure, or READ data. Built on the
/// stack once per request; boxing `Small` would allocate instead.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub(super) enum Response<'a> {
    Error(i32),
    Small(Small),
    Data(&'a [u8]),
}

#[derive(Debug)]
pub(super) struct Small {
    buf: [u8; Small::CAPACITY],
    len: usize,
}

impl Small {
    /// Enough for the largest structure we reply with, and for the root's
    /// three directory entries.
    pub(super) const CAPACITY: usize = 256;

    pub(super) fn empty() -> Self {
        Self {
            buf: [0; Small::CAPACITY],
            len: 0,
        }
    }

    pub(super) fn of<T: Pod>(value: &T) -> Self {
        let mut s = Self::empty();
        s.push(bytes_of(value));
        s
    }

    pub(super) fn push(&mut self, bytes: &[u8]) -> bool {
        let Some(dst) = self.buf.get_mut(self.len..self.len + bytes.len()) else {
            return false;
        };
        dst.copy_from_slice(bytes);
        self.len += bytes.len();
        true
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

pub(super) fn ok_empty() -> Response<'static> {
    Response::Small(Small::empty())
}

pub(super) fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error()
        .filter(|n| (1..4096).contains(n))
        .unwrap_or(libc::EIO)
}
