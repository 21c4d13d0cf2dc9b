//! HPACK (RFC 7541): a decoder (header blocks in, (name, value) fields
//! out, the dynamic table kept across blocks as the client's encoder
//! expects) and one encoding, literals that never touch the peer's
//! dynamic table. Pure logic; hostile input is an error, never a
//! panic, and costs time linear in its length: Huffman strings are decoded
//! with a canonical-code walk over precomputed tables, and decoding stops
//! as soon as the fields pass the caller's size limit.

use std::collections::VecDeque;

/// Why a header block cannot be decoded. Each is a COMPRESSION_ERROR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    #[error("the block ends inside a field")]
    Truncated,
    #[error("an integer is longer than HPACK allows")]
    IntegerOverflow,
    #[error("index {0} is in neither table")]
    BadIndex(usize),
    #[error("invalid Huffman string")]
    BadHuffman,
    #[error("dynamic table size {0} is over the allowed maximum")]
    TableTooLarge(usize),
    #[error("dynamic table size update after a field")]
    LateSizeUpdate,
    #[error("the fields are over {0} bytes")]
    ListTooLarge(usize),
}

/// The decoding half of one connection's HPACK context.
pub struct Decoder {
    /// Newest first: index 62 is `table[0]`.
    table: VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    max_size: usize,
    allowed_max: usize,
}

/// Bytes an entry takes in the table (RFC 7541 §4.1).
fn entry_size(name: &[u8], value: &[u8]) -> usize {
    name.len() + value.len() + 32
}

impl Decoder {
    /// A decoder whose table starts at the protocol's 4096 bytes and may be
    /// resized by the peer up to `allowed_max`.
    pub fn new(allowed_max: usize) -> Decoder {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max_size: 4096.min(allowed_max),
            allowed_max,
        }
    }

    /// Decodes one whole header block, calling `field` for each field in
    /// order. Fails (and stops) once the fields, counted as entries are,
    /// pass `list_limit` bytes.
    pub fn decode(
        &mut self,
        mut block: &[u8],
        list_limit: usize,
        mut field: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), HpackError> {
        let mut list_size = 0usize;
        let mut fields_seen = false;
        while let Some(&first) = block.first() {
            if first & 0xe0 == 0x20 {
                // 001xxxxx: dynamic table size update, only before fields.
                if fields_seen {
                    return Err(HpackError::LateSizeUpdate);
                }
                let size = integer(&mut block, 5)?;
                if size > self.allowed_max {
                    return Err(HpackError::TableTooLarge(size));
                }
                self.max_size = size;
                self.evict(0);
                continue;
            }
            fields_seen = true;
            let (name, value) = if first & 0x80 != 0 {
                let index = integer(&mut block, 7)?;
                let (name, value) = self.get(index)?;
                (name.to_vec(), value.to_vec())
            } else {
                let (prefix, indexing) = if first & 0x40 != 0 {
                    (6, true)
                } else {
                    // 0000xxxx without indexing, 0001xxxx never indexed.
                    (4, false)
                };
                let index = integer(&mut block, prefix)?;
                let name = if index == 0 {
                    string(&mut block)?
                } else {
                    self.get(index)?.0.to_vec()
                };
                let value = string(&mut block)?;
                if indexing {
                    self.insert(&name, &value);
                }
                (name, value)
            };
            list_size = list_size.saturating_add(entry_size(&name, &value));
            if list_size > list_limit {
                return Err(HpackError::ListTooLarge(list_limit));
            }
            field(&name, &value);
        }
        Ok(())
    }

    fn get(&self, index: usize) -> Result<(&[u8], &[u8]), HpackError> {
        if let Some(i) = index.checked_sub(1)
            && let Some(&(name, value)) = STATIC_TABLE.get(i)
        {
            return Ok((name, value));
        }
        index
            .checked_sub(STATIC_TABLE.len() + 1)
            .and_then(|i| self.table.get(i))
            .map(|(n, v)| (&n[..], &v[..]))
            .ok_or(HpackError::BadIndex(index))
    }

    fn insert(&mut self, name: &[u8], value: &[u8]) {
        let size = entry_size(name, value);
        if size > self.max_size {
            // An entry larger than the table empties it (RFC 7541 §4.4).
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict(size);
        self.table.push_front((name.to_vec(), value.to_vec()));
        self.size += size;
    }

    /// Evicts the oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max_size {
            let Some((name, value)) = self.table.pop_back() else {
                self.size = 0;
                return;
            };
            self.size -= entry_size(&name, &value);
        }
    }
}

/// An integer with a `prefix`-bit prefix (RFC 7541 §5.1), consumed from
/// `block`. Values are capped at 2^28, far above any sane length or index.
fn integer(block: &mut &[u8], prefix: u8) -> Result<usize, HpackError> {
    let (&first, mut rest) = block.split_first().ok_or(HpackError::Truncated)?;
    let max_prefix = (1usize << prefix) - 1;
    let mut value = usize::from(first) & max_prefix;
    if value == max_prefix {
        let mut shift = 0;
        loop {
            let (&byte, after) = rest.split_first().ok_or(HpackError::Truncated)?;
            rest = after;
            if shift > 21 {
                return Err(HpackError::IntegerOverflow);
            }
            value += usize::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
        }
    }
    *block = rest;
    Ok(value)
}

/// A string literal (RFC 7541 §5.2), consumed from `block`.
fn string(block: &mut &[u8]) -> Result<Vec<u8>, HpackError> {
    let huffman = block.first().ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = integer(block, 7)?;
    let (raw, rest) = block.split_at_checked(len).ok_or(HpackError::Truncated)?;
    *block = rest;
    if huffman {
        huffman_decode(raw)
    } else {
        Ok(raw.to_vec())
    }
}

/// Appends an HPACK integer with a `prefix_bits`-bit prefix (RFC 7541 §5.1); `first`
/// holds the bits above the prefix.
pub fn encode_integer(value: usize, prefix_bits: u8, first: u8, out: &mut Vec<u8>) {
    let max_prefix = (1usize << prefix_bits) - 1;
    if value < max_prefix {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max_prefix as u8);
    let mut rest = value - max_prefix;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// "Literal Header Field without Indexing — New Name" with both strings
/// raw (RFC 7541 §6.2.2): nothing enters the server's dynamic table.
pub fn encode_literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0x00);
    for s in [name, value] {
        encode_integer(s.len(), 7, 0x00, out);
        out.extend_from_slice(s);
    }
}

/// Code lengths of the HPACK Huffman code (RFC 7541 Appendix B), symbols
/// 0..=255 then EOS (256). The code is canonical: codes of one length are
/// consecutive in symbol order, so the lengths alone define it.
const CODE_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
];
const EOS: u16 = 256;
const MAX_CODE_LENGTH: usize = 30;

/// Per code length: the first code, how many codes, and where their
/// symbols start in `symbols` (sorted by length, then symbol).
struct Canonical {
    first: [u32; MAX_CODE_LENGTH + 1],
    count: [u32; MAX_CODE_LENGTH + 1],
    offset: [u16; MAX_CODE_LENGTH + 1],
    symbols: [u16; 257],
}

const fn canonical() -> Canonical {
    let mut c = Canonical {
        first: [0; MAX_CODE_LENGTH + 1],
        count: [0; MAX_CODE_LENGTH + 1],
        offset: [0; MAX_CODE_LENGTH + 1],
        symbols: [0; 257],
    };
    let mut s = 0;
    while s < 257 {
        c.count[CODE_LENGTHS[s] as usize] += 1;
        s += 1;
    }
    let mut code = 0u32;
    let mut next = 0u16;
    let mut len = 1;
    while len <= MAX_CODE_LENGTH {
        c.first[len] = code;
        c.offset[len] = next;
        let mut s = 0;
        while s < 257 {
            if CODE_LENGTHS[s] as usize == len {
                c.symbols[next as usize] = s as u16;
                next += 1;
            }
            s += 1;
        }
        code = (code + c.count[len]) << 1;
        len += 1;
    }
    c
}

static CANONICAL: Canonical = canonical();

fn huffman_decode(raw: &[u8]) -> Result<Vec<u8>, HpackError> {
    let t = &CANONICAL;
    let mut out = Vec::with_capacity(raw.len() * 8 / 5 + 1);
    let mut code = 0u32;
    let mut len = 0usize;
    for &byte in raw {
        for bit in (0..8).rev() {
            code = code << 1 | u32::from(byte >> bit & 1);
            len += 1;
            let index = code.wrapping_sub(t.first[len]);
            if index < t.count[len] {
                let symbol = t.symbols[usize::from(t.offset[len]) + index as usize];
                if symbol == EOS {
                    return Err(HpackError::BadHuffman);
                }
                out.push(symbol as u8);
                code = 0;
                len = 0;
            } else if len == MAX_CODE_LENGTH {
                return Err(HpackError::BadHuffman);
            }
        }
    }
    // Padding: fewer than 8 bits, all ones (the start of EOS).
    if len >= 8 || code != (1 << len) - 1 {
        return Err(HpackError::BadHuffman);
    }
    Ok(out)
}

/// RFC 7541 Appendix A.
static STATIC_TABLE: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

#[cfg(test)]
mod tests;
