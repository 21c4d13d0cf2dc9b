//! The replica agent's wire protocol, version 2. Pure encoding and decoding.
//!
//! Every message is one frame:
//!
//! ```text
//! offset size field
//!  0     4    magic "TRNA" (0x41 0x4e 0x52 0x54 on the wire, little-endian u32)
//!  4     2    protocol version (2)
//!  6     2    message kind
//!  8     8    request id (a response carries its request's id)
//! 16     4    payload length (at most MAX_PAYLOAD)
//! 20     4    CRC32C of bytes 0..20
//! 24     4    CRC32C of the payload
//! 28     -    payload
//! ```
//!
//! Integers are little-endian; strings and byte strings are a u32 length
//! then the bytes. A frame that fails any check (magic, version, length,
//! either checksum, trailing bytes) ends the connection: nothing read from a
//! damaged frame is ever acted on. The first request on a connection must be
//! `Hello` with the cluster token; anything else is refused. Until Hello
//! succeeds a frame may carry at most `PRE_AUTH_MAX_PAYLOAD` bytes: a larger
//! one is refused from its header alone, before its payload is read.
//!
//! Names are decoded as sent (bounded only by the frame) and checked by the
//! agent, which answers a bad one with an error rather than dropping the
//! connection: pool names are plain names, replica names replica file names
//! (`replica::check_replica_name`).
//!
//! Fencing: a write sent before a link was cut can still arrive after the
//! link comes back, after the engine has already copied newer data over that
//! region. So before a replica catches up, the engine sends `Fence`; the
//! agent then refuses (ESTALE) writes and discards to that replica arriving
//! on any connection opened before the fence, and the fence itself waits for
//! such operations already under way.
//!
//! Claims: `Hello` says which staging claim of the volume (its epoch, 0 for
//! none) the connection acts under. A fence also raises the replica's claim
//! floor to the fencing connection's claim, and writes and discards under an
//! older claim are refused from then on, on new connections too. So an
//! engine whose node lost its claim (its lease expired and another node took
//! the volume over) cannot write to the replicas the new engine has fenced,
//! however it reconnects. Version 2 added the claim.
//!
//! `FenceEmpty` fences the same way and then swaps the replica for an
//! empty one of the same size under a new inode, for a replica about to be
//! rebuilt in full: an engine on the agent's own node writes its local
//! replicas directly, not through the agent, and one frozen in the middle
//! of a write that resumes after a takeover then writes only to a file
//! nobody reads any more. Agents before it answer it as an unknown kind,
//! and the engine retries the rebuild later.

use std::io::{self, Read};

use thiserror::Error;

pub const MAGIC: u32 = u32::from_le_bytes(*b"TRNA");
pub const VERSION: u16 = 2;
pub const HEADER_LEN: usize = 28;
/// Largest payload: a 4 MiB write plus its names.
pub const MAX_PAYLOAD: u32 = (4 << 20) + 4096;
/// Largest payload before Hello succeeds: a Hello (token, node name, claim)
/// fits easily, and nothing bigger is allocated for an unknown peer.
pub const PRE_AUTH_MAX_PAYLOAD: u32 = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Hello {
        token: Vec<u8>,
        node: String,
        /// The staging claim epoch this connection's writes act under.
        claim: u64,
    },
    Create {
        pool: String,
        name: String,
        size: u64,
    },
    Grow {
        pool: String,
        name: String,
        size: u64,
    },
    Delete {
        pool: String,
        name: String,
    },
    Stat {
        pool: String,
        name: String,
    },
    Capacity {
        pool: String,
    },
    Read {
        pool: String,
        name: String,
        offset: u64,
        len: u32,
    },
    Write {
        pool: String,
        name: String,
        offset: u64,
        data: Vec<u8>,
    },
    Flush {
        pool: String,
        name: String,
    },
    Discard {
        pool: String,
        name: String,
        offset: u64,
        len: u64,
    },
    Check {
        pool: String,
        name: String,
    },
    /// From now on, refuse writes to this replica that arrive on connections
    /// opened before this request (late deliveries from a cut link).
    Fence {
        pool: String,
        name: String,
    },
    /// Fences, then replaces the replica by an empty one of the same size.
    FenceEmpty {
        pool: String,
        name: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Ok,
    Hello {
        node: String,
    },
    Stat {
        size: Option<u64>,
    },
    Capacity {
        bytes: u64,
    },
    Data {
        data: Vec<u8>,
    },
    /// `errno` is the Linux error number the agent saw (EIO, ENOSPC, ...);
    /// `message` says what failed, for people.
    Error {
        errno: i32,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("bad magic {0:#010x}: not a terna agent peer")]
    Magic(u32),
    #[error("protocol version {0} is not supported (this side speaks {VERSION})")]
    Version(u16),
    #[error("header checksum mismatch")]
    HeaderChecksum,
    #[error("payload checksum mismatch")]
    PayloadChecksum,
    #[error("payload of {0} bytes exceeds the limit of {MAX_PAYLOAD}")]
    TooLarge(u32),
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    #[error("payload truncated")]
    Truncated,
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
}

/// A decoded frame header; the payload follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: u16,
    pub id: u64,
    pub len: u32,
    pub payload_crc: u32,
}

pub fn decode_header(bytes: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
    let u32_at =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let magic = u32_at(0);
    if magic != MAGIC {
        return Err(FrameError::Magic(magic));
    }
    if crc32c::crc32c(&bytes[..20]) != u32_at(20) {
        return Err(FrameError::HeaderChecksum);
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != VERSION {
        return Err(FrameError::Version(version));
    }
    let len = u32_at(16);
    if len > MAX_PAYLOAD {
        return Err(FrameError::TooLarge(len));
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&bytes[8..16]);
    Ok(Header {
        kind: u16::from_le_bytes([bytes[6], bytes[7]]),
        id: u64::from_le_bytes(id),
        len,
        payload_crc: u32_at(24),
    })
}

pub fn check_payload(header: &Header, payload: &[u8]) -> Result<(), FrameError> {
    if crc32c::crc32c(payload) != header.payload_crc {
        return Err(FrameError::PayloadChecksum);
    }
    Ok(())
}

fn frame(kind: u16, id: u64, payload: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn i32(mut self, v: i32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(&(v.len() as u32).to_le_bytes());
        self.0.extend_from_slice(v);
        self
    }
    fn str(self, v: &str) -> Self {
        self.bytes(v.as_bytes())
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.0.len() < n {
            return Err(FrameError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i32(&mut self) -> Result<i32, FrameError> {
        self.u32().map(|v| v as i32)
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, FrameError> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    /// A name as sent; the agent decides whether it is acceptable (invalid
    /// UTF-8 becomes U+FFFD, which no valid name contains).
    fn name(&mut self) -> Result<String, FrameError> {
        self.text()
    }
    fn text(&mut self) -> Result<String, FrameError> {
        Ok(String::from_utf8_lossy(&self.bytes()?).into_owned())
    }
    fn finish(self) -> Result<(), FrameError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Trailing(self.0.len()))
        }
    }
}

/// The kind of a `Hello` frame: the only one accepted before authentication.
pub const HELLO_KIND: u16 = kind::HELLO;

mod kind {
    pub const HELLO: u16 = 1;
    pub const CREATE: u16 = 2;
    pub const GROW: u16 = 3;
    pub const DELETE: u16 = 4;
    pub const STAT: u16 = 5;
    pub const CAPACITY: u16 = 6;
    pub const READ: u16 = 7;
    pub const WRITE: u16 = 8;
    pub const FLUSH: u16 = 9;
    pub const DISCARD: u16 = 10;
    pub const CHECK: u16 = 11;
    pub const FENCE: u16 = 12;
    pub const FENCE_EMPTY: u16 = 13;
    pub const R_OK: u16 = 100;
    pub const R_HELLO: u16 = 101;
    pub const R_STAT: u16 = 102;
    pub const R_CAPACITY: u16 = 103;
    pub const R_DATA: u16 = 104;
    pub const R_ERROR: u16 = 105;
}

impl Request {
    pub fn encode(&self, id: u64) -> Vec<u8> {
        let w = Writer::default();
        let (k, w) = match self {
            Request::Hello { token, node, claim } => {
                (kind::HELLO, w.bytes(token).str(node).u64(*claim))
            }
            Request::Create { pool, name, size } => {
                (kind::CREATE, w.str(pool).str(name).u64(*size))
            }
            Request::Grow { pool, name, size } => (kind::GROW, w.str(pool).str(name).u64(*size)),
            Request::Delete { pool, name } => (kind::DELETE, w.str(pool).str(name)),
            Request::Stat { pool, name } => (kind::STAT, w.str(pool).str(name)),
            Request::Capacity { pool } => (kind::CAPACITY, w.str(pool)),
            Request::Read {
                pool,
                name,
                offset,
                len,
            } => (kind::READ, w.str(pool).str(name).u64(*offset).u32(*len)),
            Request::Write {
                pool,
                name,
                offset,
                data,
            } => (kind::WRITE, w.str(pool).str(name).u64(*offset).bytes(data)),
            Request::Flush { pool, name } => (kind::FLUSH, w.str(pool).str(name)),
            Request::Discard {
                pool,
                name,
                offset,
                len,
            } => (kind::DISCARD, w.str(pool).str(name).u64(*offset).u64(*len)),
            Request::Check { pool, name } => (kind::CHECK, w.str(pool).str(name)),
            Request::Fence { pool, name } => (kind::FENCE, w.str(pool).str(name)),
            Request::FenceEmpty { pool, name } => (kind::FENCE_EMPTY, w.str(pool).str(name)),
        };
        frame(k, id, w.0)
    }

    pub fn decode(kind: u16, payload: &[u8]) -> Result<Request, FrameError> {
        let mut r = Reader(payload);
        let req = match kind {
            kind::HELLO => Request::Hello {
                token: r.bytes()?,
                node: r.name()?,
                claim: r.u64()?,
            },
            kind::CREATE => Request::Create {
                pool: r.name()?,
                name: r.name()?,
                size: r.u64()?,
            },
            kind::GROW => Request::Grow {
                pool: r.name()?,
                name: r.name()?,
                size: r.u64()?,
            },
            kind::DELETE => Request::Delete {
                pool: r.name()?,
                name: r.name()?,
            },
            kind::STAT => Request::Stat {
                pool: r.name()?,
                name: r.name()?,
            },
            kind::CAPACITY => Request::Capacity { pool: r.name()? },
            kind::READ => Request::Read {
                pool: r.name()?,
                name: r.name()?,
                offset: r.u64()?,
                len: r.u32()?,
            },
            kind::WRITE => Request::Write {
                pool: r.name()?,
                name: r.name()?,
                offset: r.u64()?,
                data: r.bytes()?,
            },
            kind::FLUSH => Request::Flush {
                pool: r.name()?,
                name: r.name()?,
            },
            kind::DISCARD => Request::Discard {
                pool: r.name()?,
                name: r.name()?,
                offset: r.u64()?,
                len: r.u64()?,
            },
            kind::CHECK => Request::Check {
                pool: r.name()?,
                name: r.name()?,
            },
            kind::FENCE => Request::Fence {
                pool: r.name()?,
                name: r.name()?,
            },
            kind::FENCE_EMPTY => Request::FenceEmpty {
                pool: r.name()?,
                name: r.name()?,
            },
            other => return Err(FrameError::UnknownKind(other)),
        };
        r.finish()?;
        Ok(req)
    }
}

impl Response {
    pub fn encode(&self, id: u64) -> Vec<u8> {
        let w = Writer::default();
        let (k, w) = match self {
            Response::Ok => (kind::R_OK, w),
            Response::Hello { node } => (kind::R_HELLO, w.str(node)),
            Response::Stat { size } => (
                kind::R_STAT,
                match size {
                    Some(s) => w.u32(1).u64(*s),
                    None => w.u32(0).u64(0),
                },
            ),
            Response::Capacity { bytes } => (kind::R_CAPACITY, w.u64(*bytes)),
            Response::Data { data } => (kind::R_DATA, w.bytes(data)),
            Response::Error { errno, message } => (kind::R_ERROR, w.i32(*errno).str(message)),
        };
        frame(k, id, w.0)
    }

    pub fn decode(kind: u16, payload: &[u8]) -> Result<Response, FrameError> {
        let mut r = Reader(payload);
        let resp = match kind {
            kind::R_OK => Response::Ok,
            kind::R_HELLO => Response::Hello { node: r.name()? },
            kind::R_STAT => {
                let exists = r.u32()? != 0;
                let size = r.u64()?;
                Response::Stat {
                    size: exists.then_some(size),
                }
            }
            kind::R_CAPACITY => Response::Capacity { bytes: r.u64()? },
            kind::R_DATA => Response::Data { data: r.bytes()? },
            kind::R_ERROR => Response::Error {
                errno: r.i32()?,
                message: r.text()?,
            },
            other => return Err(FrameError::UnknownKind(other)),
        };
        r.finish()?;
        Ok(resp)
    }
}

/// Splits one encoded frame into its header and payload, checking both.
pub fn split_frame(bytes: &[u8]) -> Result<(Header, &[u8]), FrameError> {
    let head: &[u8; HEADER_LEN] = bytes
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(FrameError::Truncated)?;
    let header = decode_header(head)?;
    let payload = bytes
        .get(HEADER_LEN..HEADER_LEN + header.len as usize)
        .ok_or(FrameError::Truncated)?;
    check_payload(&header, payload)?;
    if bytes.len() != HEADER_LEN + header.len as usize {
        return Err(FrameError::Trailing(
            bytes.len() - HEADER_LEN - header.len as usize,
        ));
    }
    Ok((header, payload))
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub fn read_frame(stream: &mut impl Read) -> io::Result<Option<(Header, Vec<u8>)>> {
    let mut head = [0u8; HEADER_LEN];
    match stream.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let header = decode_header(&head).map_err(invalid)?;
    let mut payload = vec![0u8; header.len as usize];
    stream.read_exact(&mut payload)?;
    check_payload(&header, &payload).map_err(invalid)?;
    Ok(Some((header, payload)))
}

pub fn invalid(e: FrameError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_name() -> impl Strategy<Value = String> {
        "[a-z0-9.-]{0,40}"
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        prop_oneof![
            (
                proptest::collection::vec(any::<u8>(), 0..64),
                arb_name(),
                any::<u64>()
            )
                .prop_map(|(token, node, claim)| Request::Hello { token, node, claim }),
            (arb_name(), arb_name(), any::<u64>()).prop_map(|(pool, name, size)| Request::Create {
                pool,
                name,
                size
            }),
            (arb_name(), arb_name(), any::<u64>()).prop_map(|(pool, name, size)| Request::Grow {
                pool,
                name,
                size
            }),
            (arb_name(), arb_name()).prop_map(|(pool, name)| Request::Delete { pool, name }),
            (arb_name(), arb_name()).prop_map(|(pool, name)| Request::Stat { pool, name }),
            arb_name().prop_map(|pool| Request::Capacity { pool }),
            (arb_name(), arb_name(), any::<u64>(), any::<u32>()).prop_map(
                |(pool, name, offset, len)| Request::Read {
                    pool,
                    name,
                    offset,
                    len
                }
            ),
            (
                arb_name(),
                arb_name(),
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 0..4096)
            )
                .prop_map(|(pool, name, offset, data)| Request::Write {
                    pool,
                    name,
                    offset,
                    data
                }),
            (arb_name(), arb_name()).prop_map(|(pool, name)| Request::Flush { pool, name }),
            (arb_name(), arb_name(), any::<u64>(), any::<u64>()).prop_map(
                |(pool, name, offset, len)| Request::Discard {
                    pool,
                    name,
                    offset,
                    len
                }
            ),
            (arb_name(), arb_name()).prop_map(|(pool, name)| Request::Check { pool, name }),
            (arb_name(), arb_name()).prop_map(|(pool, name)| Request::Fence { pool, name }),
            (arb_name(), arb_name()).prop_map(|(pool, name)| Request::FenceEmpty { pool, name }),
        ]
    }

    fn arb_response() -> impl Strategy<Value = Response> {
        prop_oneof![
            Just(Response::Ok),
            arb_name().prop_map(|node| Response::Hello { node }),
            proptest::option::of(any::<u64>()).prop_map(|size| Response::Stat { size }),
            any::<u64>().prop_map(|bytes| Response::Capacity { bytes }),
            proptest::collection::vec(any::<u8>(), 0..4096)
                .prop_map(|data| Response::Data { data }),
            (any::<i32>(), ".{0,80}")
                .prop_map(|(errno, message)| Response::Error { errno, message }),
        ]
    }

    proptest! {
        #[test]
        fn requests_round_trip(req in arb_request(), id in any::<u64>()) {
            let bytes = req.encode(id);
            let (h, payload) = split_frame(&bytes).unwrap();
            prop_assert_eq!(h.id, id);
            prop_assert_eq!(Request::decode(h.kind, payload).unwrap(), req);
        }

        #[test]
        fn responses_round_trip(resp in arb_response(), id in any::<u64>()) {
            let bytes = resp.encode(id);
            let (h, payload) = split_frame(&bytes).unwrap();
            prop_assert_eq!(h.id, id);
            prop_assert_eq!(Response::decode(h.kind, payload).unwrap(), resp);
        }

        #[test]
        fn any_single_bit_flip_is_detected(req in arb_request(), bit in any::<prop::sample::Index>()) {
            let mut bytes = req.encode(7);
            let i = bit.index(bytes.len() * 8);
            bytes[i / 8] ^= 1 << (i % 8);
            // A flipped length can still frame, but the checksums catch it.
            prop_assert!(split_frame(&bytes).is_err());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256), kind in any::<u16>()) {
            let _ = split_frame(&bytes);
            let _ = Request::decode(kind, &bytes);
            let _ = Response::decode(kind, &bytes);
        }
    }

    #[test]
    fn oversized_and_foreign_frames_are_refused_by_the_header_alone() {
        let mut bytes = Request::Capacity { pool: "p".into() }.encode(1);
        bytes[16..20].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        let crc = crc32c::crc32c(&bytes[..20]);
        bytes[20..24].copy_from_slice(&crc.to_le_bytes());
        let head: [u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().unwrap();
        assert_eq!(
            decode_header(&head),
            Err(FrameError::TooLarge(MAX_PAYLOAD + 1))
        );
        let http: [u8; HEADER_LEN] = *b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\0";
        assert!(matches!(decode_header(&http), Err(FrameError::Magic(_))));
        // Long and non-UTF-8 names decode (the agent answers them with an
        // error); only the frame limits their length.
        let long = "x".repeat(4096);
        let bytes = Request::Stat {
            pool: long.clone(),
            name: long.clone(),
        }
        .encode(1);
        let (h, p) = split_frame(&bytes).unwrap();
        assert_eq!(
            Request::decode(h.kind, p),
            Ok(Request::Stat {
                pool: long.clone(),
                name: long
            })
        );
        let mut raw = Vec::new();
        raw.extend_from_slice(&1u32.to_le_bytes());
        raw.push(b'p');
        raw.extend_from_slice(&2u32.to_le_bytes());
        raw.extend_from_slice(&[0xff, 0]);
        assert_eq!(
            Request::decode(kind::FLUSH, &raw),
            Ok(Request::Flush {
                pool: "p".into(),
                name: "\u{fffd}\0".into()
            })
        );
    }
}
