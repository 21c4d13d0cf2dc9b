//! The request handling end to end, without a kernel: requests laid out in
//! a buffer as the readers read them, answered by a session on a memory
//! device.

use std::io;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use super::abi::*;
use super::buffer::{BUF_LEN, PAGE, REQ_OFFSET};
use super::ops::{Session, VOLUME_INO};
use super::passthrough::Backing;
use super::reply::Response;
use super::request::IN_HEADER;
use crate::datapath::frontend::BlockDevice;
use crate::datapath::replica::aligned::AlignedBuf;

struct Mem(Mutex<Vec<u8>>);

impl BlockDevice for Mem {
    fn size(&self) -> u64 {
        self.0.lock().map(|v| v.len() as u64).unwrap_or(0)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let v = self.0.lock().map_err(|_| io::Error::other("poisoned"))?;
        let o = offset as usize;
        buf.copy_from_slice(&v[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut v = self.0.lock().map_err(|_| io::Error::other("poisoned"))?;
        let o = offset as usize;
        v[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut v = self.0.lock().map_err(|_| io::Error::other("poisoned"))?;
        v[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

fn session() -> Session {
    Session {
        device: Arc::new(Mem(Mutex::new(vec![7; 1 << 16]))),
        dev: None,
        backing: Mutex::new(Backing::Untried),
        generation: AtomicU64::new(0),
        uid: 0,
        gid: 0,
        time: 0,
    }
}

/// Puts a request (header + body) where the worker would read it.
fn request(buf: &mut [u8], opcode: u32, nodeid: u64, body: &[u8]) -> usize {
    let n = IN_HEADER + body.len();
    let hdr = fuse_in_header {
        len: n as u32,
        opcode,
        unique: 42,
        nodeid,
        ..Default::default()
    };
    buf[REQ_OFFSET..REQ_OFFSET + IN_HEADER].copy_from_slice(bytes_of(&hdr));
    buf[REQ_OFFSET + IN_HEADER..REQ_OFFSET + n].copy_from_slice(body);
    n
}

fn small(resp: Option<(u64, Response<'_>)>) -> Vec<u8> {
    match resp {
        Some((42, Response::Small(s))) => s.as_slice().to_vec(),
        other => panic!("unexpected reply {other:?}"),
    }
}

fn errno(resp: Option<(u64, Response<'_>)>) -> i32 {
    match resp {
        Some((42, Response::Error(e))) => e,
        other => panic!("unexpected reply {other:?}"),
    }
}

#[test]
fn write_payload_is_page_aligned_and_lands() {
    let s = session();
    let mut buf = AlignedBuf::zeroed(BUF_LEN);
    let buf = buf.as_mut_slice();
    let mut body = bytes_of(&fuse_write_in {
        offset: 4096,
        size: 8192,
        ..Default::default()
    })
    .to_vec();
    body.extend(std::iter::repeat_n(0xab, 8192));
    let n = request(buf, FUSE_WRITE, VOLUME_INO, &body);
    assert_eq!(buf[PAGE..PAGE + 8192].as_ptr() as usize % PAGE, 0);
    assert_eq!(buf[PAGE], 0xab);
    let out = small(s.handle(buf, n));
    assert_eq!(read::<fuse_write_out>(&out).unwrap().size, 8192);

    let n = request(
        buf,
        FUSE_READ,
        VOLUME_INO,
        bytes_of(&fuse_read_in {
            offset: 4000,
            size: 200,
            ..Default::default()
        }),
    );
    match s.handle(buf, n) {
        Some((42, Response::Data(d))) => {
            assert_eq!(&d[..96], &[7; 96][..]);
            assert_eq!(&d[96..], &[0xab; 104][..]);
        }
        other => panic!("unexpected reply {other:?}"),
    }
}

#[test]
fn errors_and_limits() {
    let s = session();
    let mut buf = AlignedBuf::zeroed(BUF_LEN);
    let buf = buf.as_mut_slice();
    // Beyond the end.
    let mut body = bytes_of(&fuse_write_in {
        offset: (1 << 16) - 10,
        size: 20,
        ..Default::default()
    })
    .to_vec();
    body.extend([0; 20]);
    let n = request(buf, FUSE_WRITE, VOLUME_INO, &body);
    assert_eq!(errno(s.handle(buf, n)), libc::ENOSPC);
    // Payload shorter than announced.
    let n = request(buf, FUSE_WRITE, VOLUME_INO, &body[..50]);
    assert_eq!(errno(s.handle(buf, n)), libc::EINVAL);
    // fsync maps the device's errno.
    let n = request(buf, FUSE_FSYNC, VOLUME_INO, &[0; 16]);
    assert_eq!(errno(s.handle(buf, n)), libc::EROFS);
    // Resize refused, other setattr accepted.
    let set = |valid, size| {
        bytes_of(&fuse_setattr_in {
            valid,
            size,
            ..Default::default()
        })
        .to_vec()
    };
    let n = request(buf, FUSE_SETATTR, VOLUME_INO, &set(FATTR_SIZE, 5));
    assert_eq!(errno(s.handle(buf, n)), libc::EPERM);
    let n = request(buf, FUSE_SETATTR, VOLUME_INO, &set(FATTR_SIZE, 1 << 16));
    let out = small(s.handle(buf, n));
    assert_eq!(read::<fuse_attr_out>(&out).unwrap().attr.size, 1 << 16);
    // Unknown opcode.
    let n = request(buf, 4242, VOLUME_INO, &[]);
    assert_eq!(errno(s.handle(buf, n)), libc::ENOSYS);
    // Fallocate modes.
    let fa = |mode, offset, length| {
        bytes_of(&fuse_fallocate_in {
            mode,
            offset,
            length,
            ..Default::default()
        })
        .to_vec()
    };
    let n = request(buf, FUSE_FALLOCATE, VOLUME_INO, &fa(0x8, 0, 10));
    assert_eq!(errno(s.handle(buf, n)), libc::EOPNOTSUPP);
    let n = request(buf, FUSE_FALLOCATE, VOLUME_INO, &fa(0, 0, 1 << 20));
    assert_eq!(errno(s.handle(buf, n)), libc::EOPNOTSUPP);
    let n = request(buf, FUSE_FALLOCATE, VOLUME_INO, &fa(3, 100, 1 << 20));
    assert!(small(s.handle(buf, n)).is_empty());
    let mut data = [1u8; 4];
    s.device.read_at(&mut data, 1 << 15).unwrap();
    assert_eq!(data, [0; 4]);
}

#[test]
fn init_lookup_readdir() {
    let s = session();
    let mut buf = AlignedBuf::zeroed(BUF_LEN);
    let buf = buf.as_mut_slice();
    let init = fuse_init_in {
        major: 7,
        minor: 44,
        max_readahead: 128 << 10,
        flags: u32::MAX,
        ..Default::default()
    };
    // Old kernels send only the first 16 bytes.
    let n = request(buf, FUSE_INIT, 0, &bytes_of(&init)[..16]);
    let out: fuse_init_out = read(&small(s.handle(buf, n))).unwrap();
    assert_eq!((out.major, out.minor), (7, FUSE_KERNEL_MINOR_VERSION));
    assert_eq!(out.max_write, 1 << 20);
    assert_eq!(out.max_pages, 256);
    assert_eq!(out.flags & FUSE_WRITEBACK_CACHE, 0);
    assert_ne!(out.flags & FUSE_MAX_PAGES, 0);

    let n = request(buf, FUSE_LOOKUP, FUSE_ROOT_ID, b"volume\0");
    let out: fuse_entry_out = read(&small(s.handle(buf, n))).unwrap();
    assert_eq!((out.nodeid, out.attr.size), (VOLUME_INO, 1 << 16));
    let n = request(buf, FUSE_LOOKUP, FUSE_ROOT_ID, b"other\0");
    assert_eq!(errno(s.handle(buf, n)), libc::ENOENT);

    let rd = |offset| {
        bytes_of(&fuse_read_in {
            offset,
            size: 4096,
            ..Default::default()
        })
        .to_vec()
    };
    let n = request(buf, FUSE_READDIR, FUSE_ROOT_ID, &rd(0));
    assert_eq!(small(s.handle(buf, n)).len(), 96);
    let n = request(buf, FUSE_READDIR, FUSE_ROOT_ID, &rd(2));
    let out = small(s.handle(buf, n));
    assert_eq!(&out[24..30], b"volume");
    let n = request(buf, FUSE_READDIR, FUSE_ROOT_ID, &rd(3));
    assert!(small(s.handle(buf, n)).is_empty());
}

#[test]
fn passthrough_is_asked_for_only_when_offered_and_opens_without_a_backing_file_go_through_us() {
    let s = session();
    let mut buf = AlignedBuf::zeroed(BUF_LEN);
    let buf = buf.as_mut_slice();
    let mut init = fuse_init_in {
        major: 7,
        minor: 44,
        max_readahead: 128 << 10,
        flags: FUSE_INIT_EXT | FUSE_ASYNC_DIO,
        flags2: FUSE_PASSTHROUGH_FLAGS2,
        ..Default::default()
    };
    let n = request(buf, FUSE_INIT, 0, bytes_of(&init));
    let out: fuse_init_out = read(&small(s.handle(buf, n))).unwrap();
    assert_ne!(out.flags & FUSE_INIT_EXT, 0);
    assert_eq!(out.flags2, FUSE_PASSTHROUGH_FLAGS2);
    assert_eq!(out.unused[0], FUSE_MAX_STACK_DEPTH, "max_stack_depth");
    // Without FUSE_INIT_EXT the second word is not the kernel's.
    init.flags = FUSE_ASYNC_DIO;
    let n = request(buf, FUSE_INIT, 0, bytes_of(&init));
    let out: fuse_init_out = read(&small(s.handle(buf, n))).unwrap();
    assert_eq!(
        (out.flags & FUSE_INIT_EXT, out.flags2, out.unused[0]),
        (0, 0, 0)
    );

    // The test device offers no backing file: direct I/O through us.
    let n = request(buf, FUSE_OPEN, VOLUME_INO, &[0; 8]);
    let out: fuse_open_out = read(&small(s.handle(buf, n))).unwrap();
    assert_eq!(
        (out.open_flags, out.backing_id),
        (FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES, 0)
    );
}

proptest::proptest! {
    #[test]
    fn arbitrary_requests_never_panic(
        opcode in 0u32..64,
        nodeid in 0u64..4,
        len_delta in -8i64..8,
        body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
    ) {
        let s = session();
        let mut buf = AlignedBuf::zeroed(BUF_LEN);
        let buf = buf.as_mut_slice();
        let n = request(buf, opcode, nodeid, &body);
        // Corrupt the length field sometimes, and truncate the read.
        let claimed = (n as i64 + len_delta).max(0) as u32;
        buf[REQ_OFFSET..REQ_OFFSET + 4].copy_from_slice(&claimed.to_ne_bytes());
        let _ = s.handle(buf, n);
        let _ = s.handle(buf, n.min(39));
        buf[REQ_OFFSET..REQ_OFFSET + 4].copy_from_slice(&(n as u32).to_ne_bytes());
        let _ = s.handle(buf, n);
    }
}
