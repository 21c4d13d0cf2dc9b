//! The client→server half of an HTTP/2 connection, rewritten so that the
//! HTTP/2 library under tonic accepts every real gRPC client.
//!
//! h2 resets any stream whose `:authority` is not a valid URI authority
//! (PROTOCOL_ERROR, "malformed authority"). grpc-go dialing a socket path
//! without `WithAuthority` (the kubelet's plugin registration client) sends
//! the raw path, e.g. `/var/lib/kubelet/plugins_registry/x-reg.sock`; other
//! clients send a percent-encoded path. [`Rewriter`] parses the bytes the
//! client sends: the connection preface, then frames. Every header block
//! (HEADERS plus CONTINUATIONs) is HPACK-decoded and encoded again with
//! literals only, so the server's decoder table stays empty and never
//! depends on us; an invalid `:authority` becomes `localhost`, padding is
//! dropped, and the block is split into frames of at most 16384 bytes, the
//! size every peer accepts. Every other frame is copied as it arrives, its
//! payload never buffered.
//!
//! Pure logic: no I/O, no async. Hostile bytes cannot make it panic or
//! buffer without bound: a frame longer than the server accepts, a header
//! block over [`MAX_HEADER_BLOCK`] bytes (or decoding to more than
//! [`MAX_HEADER_LIST`]), malformed HPACK or framing is a [`Violation`], and
//! the caller closes the connection.

#[cfg(test)]
use super::hpack::encode_integer;
use super::hpack::{Decoder, HpackError, encode_literal};

/// What a client sends before its first frame (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The largest frame every HTTP/2 peer must accept, and what tonic's server
/// (h2's default SETTINGS_MAX_FRAME_SIZE) accepts.
pub const MIN_MAX_FRAME_SIZE: usize = 16_384;
/// The most header block bytes (all its fragments) one request may send.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// The most a header block may decode to, counted as HPACK does (name +
/// value + 32 per field): bounds what indexed references can expand to.
pub const MAX_HEADER_LIST: usize = 64 * 1024;
/// The largest dynamic table a client may ask our decoder to keep.
pub const MAX_DECODER_TABLE: usize = 64 * 1024;
/// What an invalid `:authority` is replaced with.
pub const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

const FRAME_HEADER_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_PUSH_PROMISE: u8 = 0x5;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// Why a connection is closed. Each one is also a protocol error the server
/// would close the connection for (or a limit of ours).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("the client did not start with the HTTP/2 connection preface")]
    BadPreface,
    #[error("frame of {len} bytes is over the {max} byte maximum")]
    FrameTooLarge { len: usize, max: usize },
    #[error("header block on stream {stream} is over {MAX_HEADER_BLOCK} bytes")]
    HeaderBlockTooLarge { stream: u32 },
    #[error("header block on stream {stream} decodes to over {MAX_HEADER_LIST} bytes")]
    HeaderListTooLarge { stream: u32 },
    #[error("expected a CONTINUATION of stream {stream}, got frame type {frame_type:#x}")]
    ContinuationExpected { stream: u32, frame_type: u8 },
    #[error("CONTINUATION on stream {stream} without an open header block")]
    UnexpectedContinuation { stream: u32 },
    #[error("HEADERS on stream 0")]
    HeadersOnStreamZero,
    #[error("HEADERS on stream {stream} with padding or priority longer than the frame")]
    BadPadding { stream: u32 },
    #[error("PUSH_PROMISE from a client")]
    PushPromise,
    #[error("undecodable header block on stream {stream}: {reason}")]
    Hpack { stream: u32, reason: String },
}

/// Rewrites one connection's client→server bytes; see the module doc.
pub struct Rewriter {
    state: State,
    max_frame_size: usize,
    decoder: Decoder,
    /// The frame header being read, `header_len` bytes of it so far.
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    /// The HEADERS or CONTINUATION payload being collected.
    payload: Vec<u8>,
    /// The header block that is waiting for its END_HEADERS.
    block: Option<Block>,
    failed: Option<Violation>,
    /// How many `:authority` values were replaced, and the first one, for
    /// the caller's logs.
    pub replaced: u64,
    pub first_replaced: Option<Vec<u8>>,
}

enum State {
    /// `n` bytes of the preface seen.
    Preface(usize),
    FrameHeader,
    /// Copying a frame's payload: this many bytes to go.
    Copy(usize),
    /// Collecting a HEADERS or CONTINUATION payload of `len` bytes.
    Collect {
        frame_type: u8,
        flags: u8,
        stream: u32,
        len: usize,
    },
}

struct Block {
    stream: u32,
    end_stream: bool,
    /// The HEADERS frame's priority fields, kept as sent.
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

impl Default for Rewriter {
    fn default() -> Self {
        Self::new(MIN_MAX_FRAME_SIZE)
    }
}

impl Rewriter {
    /// A rewriter for a connection whose server accepts frames of up to
    /// `max_frame_size` bytes (its SETTINGS_MAX_FRAME_SIZE).
    pub fn new(max_frame_size: usize) -> Rewriter {
        Rewriter {
            state: State::Preface(0),
            max_frame_size,
            decoder: Decoder::new(MAX_DECODER_TABLE),
            header: [0; FRAME_HEADER_LEN],
            header_len: 0,
            payload: Vec::new(),
            block: None,
            failed: None,
            replaced: 0,
            first_replaced: None,
        }
    }

    /// Takes the next bytes the client sent and appends what the server
    /// should receive to `out`. Bytes of a frame still incomplete are held
    /// (payloads of frames other than HEADERS and CONTINUATION are copied
    /// at once). After a violation every call fails with it again.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), Violation> {
        if let Some(v) = &self.failed {
            return Err(v.clone());
        }
        while !input.is_empty() {
            if let Err(v) = self.step(&mut input, out) {
                self.failed = Some(v.clone());
                return Err(v);
            }
        }
        Ok(())
    }

    /// Consumes some of `input` (at least one byte).
    fn step(&mut self, input: &mut &[u8], out: &mut Vec<u8>) -> Result<(), Violation> {
        match self.state {
            State::Preface(seen) => {
                let n = (PREFACE.len() - seen).min(input.len());
                let (now, rest) = input.split_at(n);
                if PREFACE.get(seen..seen + n) != Some(now) {
                    return Err(Violation::BadPreface);
                }
                out.extend_from_slice(now);
                *input = rest;
                self.state = if seen + n == PREFACE.len() {
                    State::FrameHeader
                } else {
                    State::Preface(seen + n)
                };
            }
            State::FrameHeader => {
                let n = (FRAME_HEADER_LEN - self.header_len).min(input.len());
                let (now, rest) = input.split_at(n);
                self.header[self.header_len..self.header_len + n].copy_from_slice(now);
                self.header_len += n;
                *input = rest;
                if self.header_len == FRAME_HEADER_LEN {
                    self.header_len = 0;
                    self.start_frame(out)?;
                }
            }
            State::Copy(remaining) => {
                let n = remaining.min(input.len());
                let (now, rest) = input.split_at(n);
                out.extend_from_slice(now);
                *input = rest;
                self.state = if n == remaining {
                    State::FrameHeader
                } else {
                    State::Copy(remaining - n)
                };
            }
            State::Collect {
                frame_type,
                flags,
                stream,
                len,
            } => {
                let n = (len - self.payload.len()).min(input.len());
                let (now, rest) = input.split_at(n);
                self.payload.extend_from_slice(now);
                *input = rest;
                if self.payload.len() == len {
                    self.end_frame(frame_type, flags, stream, out)?;
                }
            }
        }
        Ok(())
    }

    /// A frame header is complete: decide what to do with the payload.
    fn start_frame(&mut self, out: &mut Vec<u8>) -> Result<(), Violation> {
        let h = self.header;
        let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        let frame_type = h[3];
        let flags = h[4];
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        if len > self.max_frame_size {
            return Err(Violation::FrameTooLarge {
                len,
                max: self.max_frame_size,
            });
        }
        if let Some(block) = &self.block
            && (frame_type != TYPE_CONTINUATION || stream != block.stream)
        {
            return Err(Violation::ContinuationExpected {
                stream: block.stream,
                frame_type,
            });
        }
        match frame_type {
            TYPE_HEADERS | TYPE_CONTINUATION => {
                if frame_type == TYPE_CONTINUATION && self.block.is_none() {
                    return Err(Violation::UnexpectedContinuation { stream });
                }
                if frame_type == TYPE_HEADERS && stream == 0 {
                    return Err(Violation::HeadersOnStreamZero);
                }
                self.payload.clear();
                self.state = State::Collect {
                    frame_type,
                    flags,
                    stream,
                    len,
                };
                if len == 0 {
                    self.end_frame(frame_type, flags, stream, out)?;
                }
            }
            TYPE_PUSH_PROMISE => return Err(Violation::PushPromise),
            _ => {
                out.extend_from_slice(&h);
                self.state = if len == 0 {
                    State::FrameHeader
                } else {
                    State::Copy(len)
                };
            }
        }
        Ok(())
    }

    /// A HEADERS or CONTINUATION payload is complete.
    fn end_frame(
        &mut self,
        frame_type: u8,
        flags: u8,
        stream: u32,
        out: &mut Vec<u8>,
    ) -> Result<(), Violation> {
        self.state = State::FrameHeader;
        let payload = std::mem::take(&mut self.payload);
        let fragment = if frame_type == TYPE_HEADERS {
            let (priority, fragment) =
                split_headers_payload(&payload, flags).ok_or(Violation::BadPadding { stream })?;
            self.block = Some(Block {
                stream,
                end_stream: flags & FLAG_END_STREAM != 0,
                priority,
                fragment: Vec::with_capacity(fragment.len()),
            });
            fragment
        } else {
            &payload[..]
        };
        let Some(block) = self.block.as_mut() else {
            return Err(Violation::UnexpectedContinuation { stream });
        };
        if block.fragment.len() + fragment.len() > MAX_HEADER_BLOCK {
            return Err(Violation::HeaderBlockTooLarge { stream });
        }
        block.fragment.extend_from_slice(fragment);
        // Keep the allocation for the next frame.
        self.payload = payload;
        self.payload.clear();
        if flags & FLAG_END_HEADERS != 0
            && let Some(block) = self.block.take()
        {
            self.finish_block(block, out)?;
        }
        Ok(())
    }

    /// Decodes a whole header block, replaces an invalid `:authority` and
    /// writes the block again as HEADERS + CONTINUATION frames.
    fn finish_block(&mut self, block: Block, out: &mut Vec<u8>) -> Result<(), Violation> {
        let stream = block.stream;
        let mut encoded = Vec::with_capacity(block.fragment.len() * 2);
        let Rewriter {
            decoder,
            replaced,
            first_replaced,
            ..
        } = self;
        decoder
            .decode(&block.fragment, MAX_HEADER_LIST, |name, value| {
                if name == b":authority" && !is_valid_authority(value) {
                    *replaced += 1;
                    first_replaced.get_or_insert_with(|| value.to_vec());
                    encode_literal(name, REPLACEMENT_AUTHORITY, &mut encoded);
                } else {
                    encode_literal(name, value, &mut encoded);
                }
            })
            .map_err(|e| match e {
                HpackError::ListTooLarge(_) => Violation::HeaderListTooLarge { stream },
                e => Violation::Hpack {
                    stream,
                    reason: e.to_string(),
                },
            })?;
        write_header_frames(
            stream,
            block.end_stream,
            block.priority,
            &encoded,
            MIN_MAX_FRAME_SIZE,
            out,
        );
        Ok(())
    }
}

/// Whether h2 accepts `value` as an `:authority`: the same parse it uses.
pub fn is_valid_authority(value: &[u8]) -> bool {
    ::http::uri::Authority::try_from(value).is_ok()
}

/// A HEADERS payload's priority fields and header block fragment, padding
/// removed; None when the padding or priority overruns the payload.
fn split_headers_payload(payload: &[u8], flags: u8) -> Option<(Option<[u8; 5]>, &[u8])> {
    let mut rest = payload;
    let mut pad = 0usize;
    if flags & FLAG_PADDED != 0 {
        let (&len, after) = rest.split_first()?;
        pad = usize::from(len);
        rest = after;
    }
    let mut priority = None;
    if flags & FLAG_PRIORITY != 0 {
        let (fields, after) = rest.split_at_checked(5)?;
        priority = Some(<[u8; 5]>::try_from(fields).ok()?);
        rest = after;
    }
    let end = rest.len().checked_sub(pad)?;
    Some((priority, rest.get(..end)?))
}

/// One header block as a HEADERS frame and as many CONTINUATIONs as it
/// takes, none with a payload over `max_frame_size`.
fn write_header_frames(
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    block: &[u8],
    max_frame_size: usize,
    out: &mut Vec<u8>,
) {
    let prefix = if priority.is_some() { 5 } else { 0 };
    let first_len = block.len().min(max_frame_size - prefix);
    let (first, mut rest) = block.split_at(first_len);
    let mut flags = 0;
    if end_stream {
        flags |= FLAG_END_STREAM;
    }
    if priority.is_some() {
        flags |= FLAG_PRIORITY;
    }
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    frame_header(prefix + first.len(), TYPE_HEADERS, flags, stream, out);
    if let Some(p) = priority {
        out.extend_from_slice(&p);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, after) = rest.split_at(rest.len().min(max_frame_size));
        rest = after;
        let flags = if rest.is_empty() { FLAG_END_HEADERS } else { 0 };
        frame_header(chunk.len(), TYPE_CONTINUATION, flags, stream, out);
        out.extend_from_slice(chunk);
    }
}

fn frame_header(len: usize, frame_type: u8, flags: u8, stream: u32, out: &mut Vec<u8>) {
    let len = (len as u32).to_be_bytes();
    out.extend_from_slice(&len[1..]);
    out.push(frame_type);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
}

#[cfg(test)]
mod tests;
