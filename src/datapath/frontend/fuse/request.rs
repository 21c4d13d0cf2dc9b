//! Parsing a request as read from `/dev/fuse`.

use super::abi::*;

pub(super) const IN_HEADER: usize = size_of::<fuse_in_header>();

/// A request read from `/dev/fuse`, parsed but not yet acted on. Borrows
/// the request buffer (a WRITE's payload, a LOOKUP's name).
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub unique: u64,
    pub nodeid: u64,
    pub op: Operation<'a>,
}

/// What a request asks for, with its argument structure read and checked
/// against the request's length. Only what the export serves is told
/// apart; everything else is `Unsupported`.
#[derive(Debug, Clone, Copy)]
pub enum Operation<'a> {
    Read(fuse_read_in),
    /// `payload` is exactly `arg.size` bytes.
    Write {
        arg: fuse_write_in,
        payload: &'a [u8],
    },
    /// FORGET, BATCH_FORGET, INTERRUPT: never answered.
    NoReply,
    /// Zero-extended when an old kernel sends it shorter (at least 16 bytes).
    Init(fuse_init_in),
    /// The name up to its NUL.
    Lookup {
        name: &'a [u8],
    },
    Getattr,
    Setattr(fuse_setattr_in),
    Open,
    Opendir,
    Readdir(fuse_read_in),
    Fsync,
    /// FLUSH, RELEASE, RELEASEDIR, ACCESS, DESTROY: answered with success.
    Acknowledge,
    Statfs,
    Fallocate(fuse_fallocate_in),
    Unsupported(u32),
}

/// Why a request buffer is not a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Shorter than a request header: there is no `unique` to answer.
    Short,
    /// Its length field disagrees with what was read, or its argument is
    /// short: answered with EINVAL.
    Invalid { unique: u64 },
}

/// Parses one request exactly as read from `/dev/fuse` (the read's length
/// is `req.len()`). Pure and allocation-free: the hot path calls it on
/// every request, and it is what `tests/fuzz.rs` feeds hostile bytes.
pub fn parse_request(req: &[u8]) -> Result<Request<'_>, ParseError> {
    let hdr: fuse_in_header = read(req).ok_or(ParseError::Short)?;
    let invalid = ParseError::Invalid { unique: hdr.unique };
    if hdr.len as usize != req.len() {
        return Err(invalid);
    }
    let body = &req[IN_HEADER..];
    let op = match hdr.opcode {
        FUSE_READ => Operation::Read(read(body).ok_or(invalid)?),
        FUSE_WRITE => {
            let arg: fuse_write_in = read(body).ok_or(invalid)?;
            // The payload follows fuse_write_in; with REQ_OFFSET it is page
            // aligned in our buffer, but that is our trick, not a kernel
            // promise.
            let start = size_of::<fuse_write_in>();
            let payload = body.get(start..start + arg.size as usize).ok_or(invalid)?;
            Operation::Write { arg, payload }
        }
        FUSE_FORGET | FUSE_BATCH_FORGET | FUSE_INTERRUPT => Operation::NoReply,
        FUSE_INIT if body.len() < 16 => return Err(invalid),
        FUSE_INIT => Operation::Init(read_prefix(body)),
        FUSE_LOOKUP => Operation::Lookup {
            name: body.split(|b| *b == 0).next().unwrap_or_default(),
        },
        FUSE_GETATTR => Operation::Getattr,
        FUSE_SETATTR => Operation::Setattr(read(body).ok_or(invalid)?),
        FUSE_OPEN => Operation::Open,
        FUSE_OPENDIR => Operation::Opendir,
        FUSE_READDIR => Operation::Readdir(read(body).ok_or(invalid)?),
        FUSE_FSYNC => Operation::Fsync,
        FUSE_FLUSH | FUSE_RELEASE | FUSE_RELEASEDIR | FUSE_ACCESS | FUSE_DESTROY => {
            Operation::Acknowledge
        }
        FUSE_STATFS => Operation::Statfs,
        FUSE_FALLOCATE => Operation::Fallocate(read(body).ok_or(invalid)?),
        other => Operation::Unsupported(other),
    };
    Ok(Request {
        unique: hdr.unique,
        nodeid: hdr.nodeid,
        op,
    })
}
