//! Request buffers: where in a buffer a request is read and a READ's data
//! assembled, and a pool of buffers to reuse.

use std::sync::{Mutex, PoisonError};

use super::MAX_WRITE;
use super::abi::{fuse_in_header, fuse_write_in};
use crate::datapath::replica::aligned::{self, AlignedBuf};

pub(super) const PAGE: usize = 4096;
/// Bytes in front of a WRITE's payload: the request header and `fuse_write_in`.
const WRITE_HEADERS: usize = size_of::<fuse_in_header>() + size_of::<fuse_write_in>();
/// Where in the (page-aligned) buffer a request is read to: just far enough
/// before the second page that a WRITE's payload starts exactly on it. The
/// kernel puts the payload right after the headers, so this is the only way
/// to get it aligned without a copy. The engine must still not assume any
/// alignment of the slice it gets (other kernels may change the header size).
pub(super) const REQ_OFFSET: usize = PAGE - WRITE_HEADERS;
/// Where READ data is assembled (the request has been parsed by then).
pub(super) const DATA_OFFSET: usize = PAGE;
pub(super) const BUF_LEN: usize = PAGE + MAX_WRITE as usize + PAGE;
// REQ_OFFSET and DATA_OFFSET count from a page boundary.
const _: () = assert!(aligned::ALIGN == PAGE);

/// Request buffers (1 MiB and a bit each), reused between requests.
pub(super) struct Buffers {
    free: Mutex<Vec<AlignedBuf>>,
    keep: usize,
}

impl Buffers {
    /// Keeps up to `keep` buffers for reuse; more are freed when returned.
    pub(super) fn new(keep: usize) -> Buffers {
        Buffers {
            free: Mutex::new(Vec::new()),
            keep,
        }
    }

    pub(super) fn take(&self) -> AlignedBuf {
        let reused = self
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        reused.unwrap_or_else(|| AlignedBuf::zeroed(BUF_LEN))
    }

    pub(super) fn put(&self, buf: AlignedBuf) {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        if free.len() < self.keep {
            free.push(buf);
        }
    }
}
