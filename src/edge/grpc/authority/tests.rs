#![allow(clippy::unwrap_used)]

use super::*;
use loona_hpack::Encoder;
use proptest::prelude::*;

const DATA: u8 = 0x0;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const WINDOW_UPDATE: u8 = 0x8;
const SOCKET_PATH: &[u8] = b"/var/lib/kubelet/plugins_registry/csi.terna.dev-reg.sock";

#[derive(Debug, Clone, PartialEq, Eq)]
struct Frame {
    frame_type: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

fn frame(frame_type: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    frame_header(payload.len(), frame_type, flags, stream, &mut out);
    out.extend_from_slice(payload);
    out
}

/// The frames after the preface, as a server would read them.
fn parse(bytes: &[u8]) -> Vec<Frame> {
    assert_eq!(&bytes[..PREFACE.len()], PREFACE);
    let mut rest = &bytes[PREFACE.len()..];
    let mut frames = Vec::new();
    while !rest.is_empty() {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        frames.push(Frame {
            frame_type: rest[3],
            flags: rest[4],
            stream: u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]),
            payload: rest[9..9 + len].to_vec(),
        });
        rest = &rest[9 + len..];
    }
    frames
}

type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// A header block as the server sees it: stream, END_STREAM, priority, fields.
#[derive(Debug, PartialEq, Eq)]
struct SeenBlock {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fields: Fields,
}

/// The header blocks in `frames`, decoded by one decoder as h2's would be;
/// checks what the server relies on: no padding, no frame over 16384 bytes,
/// CONTINUATIONs right after their HEADERS, and nothing indexed.
fn blocks(frames: &[Frame]) -> Vec<SeenBlock> {
    let mut decoder = loona_hpack::Decoder::new();
    let mut seen = Vec::new();
    let mut open: Option<(SeenBlock, Vec<u8>)> = None;
    for f in frames {
        assert!(f.payload.len() <= MIN_MAX_FRAME_SIZE);
        match f.frame_type {
            TYPE_HEADERS => {
                assert!(open.is_none());
                assert_eq!(f.flags & FLAG_PADDED, 0, "padding left in");
                let (priority, fragment) = split_headers_payload(&f.payload, f.flags).unwrap();
                let block = SeenBlock {
                    stream: f.stream,
                    end_stream: f.flags & FLAG_END_STREAM != 0,
                    priority,
                    fields: Vec::new(),
                };
                open = Some((block, fragment.to_vec()));
            }
            TYPE_CONTINUATION => {
                let (block, fragment) = open.as_mut().unwrap();
                assert_eq!(block.stream, f.stream);
                fragment.extend_from_slice(&f.payload);
            }
            _ => assert!(open.is_none(), "frame inside a header block"),
        }
        if matches!(f.frame_type, TYPE_HEADERS | TYPE_CONTINUATION)
            && f.flags & FLAG_END_HEADERS != 0
        {
            let (mut block, fragment) = open.take().unwrap();
            block.fields = decoder.decode(&fragment).unwrap();
            // Literal without indexing, new name: the first byte of every
            // field is 0x00, so nothing entered the server's table.
            assert!(reencoded_without_indexing(&fragment));
            seen.push(block);
        }
    }
    assert!(open.is_none());
    seen
}

fn reencoded_without_indexing(mut block: &[u8]) -> bool {
    fn string(b: &[u8]) -> Option<&[u8]> {
        let (len, used) = integer(b)?;
        b.get(used + len..)
    }
    fn integer(b: &[u8]) -> Option<(usize, usize)> {
        let first = usize::from(*b.first()? & 0x7f);
        if first < 0x7f {
            return Some((first, 1));
        }
        let mut value = first;
        let mut shift = 0;
        for (i, &byte) in b[1..].iter().enumerate() {
            value += usize::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                return Some((value, i + 2));
            }
        }
        None
    }
    while !block.is_empty() {
        if block[0] != 0 {
            return false;
        }
        let Some(rest) = string(&block[1..]).and_then(string) else {
            return false;
        };
        block = rest;
    }
    true
}

fn request_fields(authority: &[u8]) -> Fields {
    [
        (&b":method"[..], &b"POST"[..]),
        (b":scheme", b"http"),
        (b":path", b"/pluginregistration.Registration/GetInfo"),
        (b":authority", authority),
        (b"content-type", b"application/grpc"),
        (b"user-agent", b"grpc-go/1.83.2"),
        (b"te", b"trailers"),
    ]
    .iter()
    .map(|(n, v)| (n.to_vec(), v.to_vec()))
    .collect()
}

fn encode(encoder: &mut Encoder<'_>, fields: &Fields) -> Vec<u8> {
    encoder.encode(fields.iter().map(|(n, v)| (&n[..], &v[..])))
}

fn with_authority(fields: &Fields, authority: &[u8]) -> Fields {
    fields
        .iter()
        .map(|(n, v)| {
            let v = if n == b":authority" { authority } else { v };
            (n.clone(), v.to_vec())
        })
        .collect()
}

fn rewrite(input: &[u8]) -> (Result<(), Violation>, Vec<u8>) {
    let mut r = Rewriter::default();
    let mut out = Vec::new();
    let result = r.feed(input, &mut out);
    (result, out)
}

fn connection(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut bytes = PREFACE.to_vec();
    for f in frames {
        bytes.extend_from_slice(f);
    }
    bytes
}

#[test]
fn frames_other_than_headers_pass_unchanged() {
    let input = connection(&[
        frame(SETTINGS, 0, 0, &[0, 4, 0, 0x10, 0, 0]),
        frame(WINDOW_UPDATE, 0, 0, &[0, 0x0f, 0, 1]),
        frame(PING, 0, 0, &[1, 2, 3, 4, 5, 6, 7, 8]),
        frame(
            DATA,
            FLAG_END_STREAM | FLAG_PADDED,
            1,
            &[2, 0, 0, 0, 0, 0, 9, 9],
        ),
        frame(0xfa, 0xff, 7, b"unknown frame type"),
        frame(SETTINGS, 1, 0, &[]),
    ]);
    let (result, out) = rewrite(&input);
    assert_eq!(result, Ok(()));
    assert_eq!(out, input);
}

#[test]
fn a_socket_path_authority_becomes_localhost() {
    let fields = request_fields(SOCKET_PATH);
    let block = encode(&mut Encoder::new(), &fields);
    let input = connection(&[frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block)]);
    let mut r = Rewriter::default();
    let mut out = Vec::new();
    r.feed(&input, &mut out).unwrap();
    assert_eq!(r.replaced, 1);
    let seen = blocks(&parse(&out));
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].fields, with_authority(&fields, b"localhost"));
    assert_eq!(seen[0].stream, 1);
    assert!(!seen[0].end_stream);
}

#[test]
fn authorities_are_judged_as_h2_judges_them() {
    for valid in [
        &b"localhost"[..],
        b"[::]:50051",
        b"csi.terna.dev:443",
        b"127.0.0.1",
    ] {
        assert!(
            is_valid_authority(valid),
            "{}",
            String::from_utf8_lossy(valid)
        );
    }
    for invalid in [
        SOCKET_PATH,
        b"%2Frun%2Fx.sock",
        b"",
        b"unix:/run/x.sock",
        b"a b",
        b"\xff",
    ] {
        assert!(
            !is_valid_authority(invalid),
            "{}",
            String::from_utf8_lossy(invalid)
        );
    }
}

#[test]
fn a_valid_authority_is_kept() {
    let fields = request_fields(b"localhost:1234");
    let block = encode(&mut Encoder::new(), &fields);
    let input = connection(&[frame(
        TYPE_HEADERS,
        FLAG_END_HEADERS | FLAG_END_STREAM,
        3,
        &block,
    )]);
    let mut r = Rewriter::default();
    let mut out = Vec::new();
    r.feed(&input, &mut out).unwrap();
    assert_eq!(r.replaced, 0);
    let seen = blocks(&parse(&out));
    assert_eq!(seen[0].fields, fields);
    assert!(seen[0].end_stream);
}

#[test]
fn padding_is_dropped_and_priority_kept() {
    let fields = request_fields(b"%2Frun%2Fx.sock");
    let block = encode(&mut Encoder::new(), &fields);
    let mut payload = vec![7];
    payload.extend_from_slice(&[0x80, 0, 0, 3, 15]);
    payload.extend_from_slice(&block);
    payload.extend_from_slice(&[0; 7]);
    let input = connection(&[frame(
        TYPE_HEADERS,
        FLAG_END_HEADERS | FLAG_PADDED | FLAG_PRIORITY,
        5,
        &payload,
    )]);
    let (result, out) = rewrite(&input);
    assert_eq!(result, Ok(()));
    let seen = blocks(&parse(&out));
    assert_eq!(seen[0].priority, Some([0x80, 0, 0, 3, 15]));
    assert_eq!(seen[0].fields, with_authority(&fields, b"localhost"));
}

#[test]
fn continuations_are_joined_and_large_blocks_split() {
    let mut fields = request_fields(SOCKET_PATH);
    fields.push((b"x-big".to_vec(), vec![b'v'; 40_000]));
    let block = encode(&mut Encoder::new(), &fields);
    let mut frames = vec![frame(TYPE_HEADERS, 0, 9, &block[..100])];
    frames.push(frame(TYPE_CONTINUATION, 0, 9, &block[100..16_000]));
    frames.push(frame(TYPE_CONTINUATION, 0, 9, &[]));
    frames.push(frame(TYPE_CONTINUATION, 0, 9, &block[16_000..32_000]));
    frames.push(frame(
        TYPE_CONTINUATION,
        FLAG_END_HEADERS,
        9,
        &block[32_000..],
    ));
    frames.push(frame(DATA, FLAG_END_STREAM, 9, &[0, 0, 0, 0, 0]));
    let (result, out) = rewrite(&connection(&frames));
    assert_eq!(result, Ok(()));
    let parsed = parse(&out);
    assert!(parsed.len() >= 4, "{} frames", parsed.len());
    assert_eq!(parsed.last().unwrap().payload, [0, 0, 0, 0, 0]);
    let seen = blocks(&parsed);
    assert_eq!(seen[0].fields, with_authority(&fields, b"localhost"));
}

#[test]
fn the_clients_dynamic_table_is_followed_across_blocks() {
    // As grpc-go's encoder does, the first block adds `:authority` to the
    // dynamic table and later blocks refer to it by index (62), an entry
    // only our decoder has seen.
    let mut first = vec![0x83, 0x41]; // :method POST, then :authority indexed
    encode_integer(SOCKET_PATH.len(), 7, 0, &mut first);
    first.extend_from_slice(SOCKET_PATH);
    let second = vec![0x83, 0x80 | 62];
    // A dynamic table size update at the start of a block is followed too.
    let third = vec![0x3f, 0xe1, 0x1f, 0x83, 0x80 | 62]; // size update to 4096
    let input = connection(&[
        frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &first),
        frame(DATA, FLAG_END_STREAM, 1, &[0, 0, 0, 0, 0]),
        frame(TYPE_HEADERS, FLAG_END_HEADERS, 3, &second),
        frame(TYPE_HEADERS, FLAG_END_HEADERS, 5, &third),
    ]);
    let mut r = Rewriter::default();
    let mut out = Vec::new();
    r.feed(&input, &mut out).unwrap();
    assert_eq!(r.replaced, 3);
    let expected = vec![
        (b":method".to_vec(), b"POST".to_vec()),
        (b":authority".to_vec(), b"localhost".to_vec()),
    ];
    let seen = blocks(&parse(&out));
    assert_eq!(seen.len(), 3);
    for block in seen {
        assert_eq!(block.fields, expected);
    }
}

#[test]
fn hpack_string_lengths_of_every_size_round_trip() {
    for len in [0, 1, 126, 127, 128, 255, 16_383, 16_384, 30_000] {
        let fields = vec![(b"x-len".to_vec(), vec![b'a'; len])];
        let block = encode(&mut Encoder::new(), &fields);
        let mut frames = Vec::new();
        let mut chunks = block.chunks(MIN_MAX_FRAME_SIZE).peekable();
        let mut first = true;
        while let Some(c) = chunks.next() {
            let flags = if chunks.peek().is_none() {
                FLAG_END_HEADERS
            } else {
                0
            };
            let t = if first {
                TYPE_HEADERS
            } else {
                TYPE_CONTINUATION
            };
            frames.push(frame(t, flags, 1, c));
            first = false;
        }
        let (result, out) = rewrite(&connection(&frames));
        assert_eq!(result, Ok(()));
        assert_eq!(
            blocks(&parse(&out))[0].fields,
            fields,
            "value of {len} bytes"
        );
    }
}

#[test]
fn protocol_violations_close_the_connection() {
    let block = encode(&mut Encoder::new(), &request_fields(SOCKET_PATH));
    let cases: Vec<(Vec<u8>, Violation)> = vec![
        (b"GET / HTTP/1.1\r\n\r\n".to_vec(), Violation::BadPreface),
        (
            connection(&[frame(DATA, 0, 1, &[0; MIN_MAX_FRAME_SIZE + 1])]),
            Violation::FrameTooLarge {
                len: MIN_MAX_FRAME_SIZE + 1,
                max: MIN_MAX_FRAME_SIZE,
            },
        ),
        (
            connection(&[frame(TYPE_HEADERS, 0, 1, &block), frame(DATA, 0, 1, &[])]),
            Violation::ContinuationExpected {
                stream: 1,
                frame_type: DATA,
            },
        ),
        (
            connection(&[
                frame(TYPE_HEADERS, 0, 1, &block),
                frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, &[]),
            ]),
            Violation::ContinuationExpected {
                stream: 1,
                frame_type: TYPE_CONTINUATION,
            },
        ),
        (
            connection(&[frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &block)]),
            Violation::UnexpectedContinuation { stream: 1 },
        ),
        (
            connection(&[frame(TYPE_HEADERS, FLAG_END_HEADERS, 0, &block)]),
            Violation::HeadersOnStreamZero,
        ),
        (
            connection(&[frame(
                TYPE_HEADERS,
                FLAG_END_HEADERS | FLAG_PADDED,
                1,
                &[9, 1, 2],
            )]),
            Violation::BadPadding { stream: 1 },
        ),
        (
            connection(&[frame(
                TYPE_HEADERS,
                FLAG_END_HEADERS | FLAG_PRIORITY,
                1,
                &[0, 0],
            )]),
            Violation::BadPadding { stream: 1 },
        ),
        (
            connection(&[frame(TYPE_PUSH_PROMISE, FLAG_END_HEADERS, 1, &[0, 0, 0, 2])]),
            Violation::PushPromise,
        ),
        (
            // Index 62 is not in an empty dynamic table.
            connection(&[frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &[0x80 | 62])]),
            Violation::Hpack {
                stream: 1,
                reason: "index 62 is in neither table".into(),
            },
        ),
    ];
    for (input, expected) in cases {
        let mut r = Rewriter::default();
        let mut out = Vec::new();
        assert_eq!(r.feed(&input, &mut out), Err(expected.clone()));
        // Once broken, always broken.
        assert_eq!(r.feed(b"more", &mut out), Err(expected));
    }
}

#[test]
fn a_header_block_is_capped() {
    let chunk = vec![0u8; MIN_MAX_FRAME_SIZE];
    let mut frames = vec![frame(TYPE_HEADERS, 0, 1, &chunk)];
    for _ in 0..4 {
        frames.push(frame(TYPE_CONTINUATION, 0, 1, &chunk));
    }
    let mut r = Rewriter::default();
    let mut out = Vec::new();
    assert_eq!(
        r.feed(&connection(&frames), &mut out),
        Err(Violation::HeaderBlockTooLarge { stream: 1 })
    );
    // Nothing of the block reached the server.
    assert_eq!(out, PREFACE);
}

#[test]
fn indexed_references_cannot_expand_without_bound() {
    // One 4000-byte entry in the table, then 2000 one-byte references to it:
    // 8 MB decoded from a 2 KB block.
    let mut block = vec![0x40];
    encode_integer(1, 7, 0, &mut block);
    block.push(b'x');
    encode_integer(4000, 7, 0, &mut block);
    block.extend_from_slice(&[b'y'; 4000]);
    block.extend_from_slice(&[0x80 | 62; 2000]);
    let input = connection(&[
        frame(
            TYPE_HEADERS,
            0,
            1,
            &block[..MIN_MAX_FRAME_SIZE.min(block.len())],
        ),
        frame(
            TYPE_CONTINUATION,
            FLAG_END_HEADERS,
            1,
            &block[MIN_MAX_FRAME_SIZE.min(block.len())..],
        ),
    ]);
    let (result, _) = rewrite(&input);
    assert_eq!(result, Err(Violation::HeaderListTooLarge { stream: 1 }));
}

#[test]
fn a_frame_split_at_every_byte_gives_the_same_bytes() {
    let fields = request_fields(SOCKET_PATH);
    let input = connection(&[
        frame(SETTINGS, 0, 0, &[0, 4, 0, 0x10, 0, 0]),
        frame(TYPE_HEADERS, FLAG_PADDED, 1, &{
            let block = encode(&mut Encoder::new(), &fields);
            let mut p = vec![3];
            p.extend_from_slice(&block[..10]);
            p.extend_from_slice(&[0; 3]);
            p.extend_from_slice(&[]);
            p
        }),
        frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &{
            let block = encode(&mut Encoder::new(), &fields);
            block[10..].to_vec()
        }),
        frame(DATA, FLAG_END_STREAM, 1, &[0, 0, 0, 0, 0]),
    ]);
    let (_, whole) = rewrite(&input);
    for split in 0..=input.len() {
        let mut r = Rewriter::default();
        let mut out = Vec::new();
        r.feed(&input[..split], &mut out).unwrap();
        r.feed(&input[split..], &mut out).unwrap();
        assert_eq!(out, whole, "split at {split}");
    }
    assert_eq!(
        blocks(&parse(&whole))[0].fields,
        with_authority(&fields, b"localhost")
    );
}

/// What grpc-go v1.72.1 (the kubelet v1.34's) sent for the kubelet's
/// registration GetInfo, dialing
/// `/tmp/cap/var/lib/kubelet/plugins_registry/csi.terna.dev-reg.sock`:
/// preface, SETTINGS, SETTINGS ack, HEADERS (Huffman strings, indexed into
/// the dynamic table), DATA. Captured from a socket.
const GRPC_GO_GET_INFO: &[u8] = &[
    0x50, 0x52, 0x49, 0x20, 0x2a, 0x20, 0x48, 0x54, 0x54, 0x50, 0x2f, 0x32, 0x2e, 0x30, 0x0d, 0x0a,
    0x0d, 0x0a, 0x53, 0x4d, 0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x90, 0x01, 0x04, 0x00,
    0x00, 0x00, 0x01, 0x83, 0x86, 0x45, 0x9c, 0x62, 0xba, 0x2d, 0x98, 0xd5, 0x58, 0x59, 0x8c, 0x84,
    0xd8, 0x34, 0x98, 0xf5, 0x2f, 0xb4, 0xb3, 0x19, 0x09, 0xb0, 0x69, 0x31, 0xea, 0x63, 0x11, 0x53,
    0x92, 0xa9, 0x4f, 0x41, 0xb8, 0x54, 0x58, 0x53, 0x4d, 0x6a, 0x8b, 0x09, 0x07, 0x5a, 0xa2, 0xc3,
    0xdc, 0x76, 0x2a, 0x2c, 0x34, 0x1a, 0x35, 0x45, 0x87, 0xad, 0xb1, 0x96, 0x82, 0xa5, 0x51, 0x61,
    0xae, 0x8b, 0x66, 0x35, 0x48, 0x8a, 0xc2, 0xcc, 0x64, 0x26, 0xcf, 0x4a, 0x8b, 0x09, 0x10, 0x65,
    0xd2, 0x5b, 0x2a, 0x1a, 0xf2, 0x17, 0xba, 0xd6, 0x16, 0x65, 0xd0, 0x72, 0x75, 0x5f, 0x8b, 0x1d,
    0x75, 0xd0, 0x62, 0x0d, 0x26, 0x3d, 0x4c, 0x4d, 0x65, 0x64, 0x7a, 0x8a, 0x9a, 0xca, 0xc8, 0xb4,
    0xc7, 0x60, 0x2b, 0xba, 0x25, 0xc3, 0x40, 0x02, 0x74, 0x65, 0x86, 0x4d, 0x83, 0x35, 0x05, 0xb1,
    0x1f, 0x40, 0x89, 0x9a, 0xca, 0xc8, 0xb2, 0x4d, 0x49, 0x4f, 0x6a, 0x7f, 0x86, 0x0b, 0xef, 0x09,
    0xb0, 0x3f, 0x6f, 0x00, 0x00, 0x05, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00,
    0x00,
];

#[test]
fn a_captured_grpc_go_request_is_rewritten() {
    let mut r = Rewriter::default();
    let mut out = Vec::new();
    r.feed(GRPC_GO_GET_INFO, &mut out).unwrap();
    assert_eq!(
        r.first_replaced.as_deref(),
        Some(
            &b"%2Ftmp%2Fcap%2Fvar%2Flib%2Fkubelet%2Fplugins_registry%2Fcsi.terna.dev-reg.sock"[..]
        )
    );
    let frames = parse(&out);
    let seen = blocks(&frames);
    let field = |name: &str| {
        seen[0]
            .fields
            .iter()
            .find(|(n, _)| n == name.as_bytes())
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(field(":authority").as_deref(), Some("localhost"));
    assert_eq!(
        field(":path").as_deref(),
        Some("/pluginregistration.Registration/GetInfo")
    );
    assert_eq!(field("content-type").as_deref(), Some("application/grpc"));
    // SETTINGS, its ack and the DATA frame are byte for byte the same.
    let original = parse(GRPC_GO_GET_INFO);
    let others = |f: &[Frame]| -> Vec<Frame> {
        f.iter()
            .filter(|f| f.frame_type != TYPE_HEADERS)
            .cloned()
            .collect()
    };
    assert_eq!(others(&frames), others(&original));
    assert_eq!(others(&frames).len(), 3);
}

/// One frame a client might send, for the property tests.
#[derive(Debug, Clone)]
enum ClientFrame {
    Other {
        frame_type: u8,
        flags: u8,
        stream: u32,
        payload: Vec<u8>,
    },
    Headers {
        stream: u32,
        end_stream: bool,
        padding: Option<u8>,
        priority: Option<[u8; 5]>,
        fields: Fields,
        /// Where the block is cut into HEADERS + CONTINUATIONs.
        cuts: Vec<usize>,
    },
}

fn field() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    let name = prop_oneof![
        Just(b":authority".to_vec()),
        Just(b":path".to_vec()),
        Just(b"content-type".to_vec()),
        "[a-z-]{1,12}".prop_map(String::into_bytes),
    ];
    let value = prop_oneof![
        Just(SOCKET_PATH.to_vec()),
        Just(b"localhost".to_vec()),
        Just(b"%2Frun%2Fx.sock".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..300),
    ];
    (name, value)
}

fn client_frame() -> impl Strategy<Value = ClientFrame> {
    let other = (
        prop_oneof![
            Just(DATA),
            Just(SETTINGS),
            Just(PING),
            Just(WINDOW_UPDATE),
            Just(0x3u8),
            0x0au8..=0xff
        ],
        any::<u8>(),
        0u32..8,
        proptest::collection::vec(any::<u8>(), 0..200),
    )
        .prop_map(|(frame_type, flags, stream, payload)| ClientFrame::Other {
            frame_type,
            flags,
            stream,
            payload,
        });
    let headers = (
        1u32..8,
        any::<bool>(),
        proptest::option::of(any::<u8>()),
        proptest::option::of(any::<[u8; 5]>()),
        proptest::collection::vec(field(), 0..8),
        proptest::collection::vec(any::<usize>(), 0..4),
    )
        .prop_map(|(stream, end_stream, padding, priority, fields, cuts)| {
            ClientFrame::Headers {
                stream,
                end_stream,
                padding,
                priority,
                fields,
                cuts,
            }
        });
    prop_oneof![other, headers]
}

/// A connection's bytes, and the frames (header blocks decoded) that the
/// server should see.
fn client_bytes(frames: &[ClientFrame]) -> (Vec<u8>, Vec<Frame>, Vec<SeenBlock>) {
    let mut encoder = Encoder::new();
    let mut bytes = PREFACE.to_vec();
    let mut others = Vec::new();
    let mut expected_blocks = Vec::new();
    for f in frames {
        match f {
            ClientFrame::Other {
                frame_type,
                flags,
                stream,
                payload,
            } => {
                bytes.extend_from_slice(&frame(*frame_type, *flags, *stream, payload));
                others.push(Frame {
                    frame_type: *frame_type,
                    flags: *flags,
                    stream: *stream,
                    payload: payload.clone(),
                });
            }
            ClientFrame::Headers {
                stream,
                end_stream,
                padding,
                priority,
                fields,
                cuts,
            } => {
                let block = encode(&mut encoder, fields);
                let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (block.len() + 1)).collect();
                cuts.push(0);
                cuts.push(block.len());
                cuts.sort_unstable();
                cuts.dedup();
                // A header block of zero bytes is one empty HEADERS frame.
                let pieces: Vec<&[u8]> = if block.is_empty() {
                    vec![&block[..]]
                } else {
                    cuts.windows(2).map(|w| &block[w[0]..w[1]]).collect()
                };
                for (i, piece) in pieces.iter().enumerate() {
                    let last = i + 1 == pieces.len();
                    let mut flags = if last { FLAG_END_HEADERS } else { 0 };
                    if i == 0 {
                        let mut payload = Vec::new();
                        if let Some(pad) = padding {
                            flags |= FLAG_PADDED;
                            payload.push(*pad);
                        }
                        if let Some(p) = priority {
                            flags |= FLAG_PRIORITY;
                            payload.extend_from_slice(p);
                        }
                        payload.extend_from_slice(piece);
                        payload.extend(std::iter::repeat_n(0, usize::from(padding.unwrap_or(0))));
                        if *end_stream {
                            flags |= FLAG_END_STREAM;
                        }
                        bytes.extend_from_slice(&frame(TYPE_HEADERS, flags, *stream, &payload));
                    } else {
                        bytes.extend_from_slice(&frame(TYPE_CONTINUATION, flags, *stream, piece));
                    }
                }
                let fields = fields
                    .iter()
                    .map(|(n, v)| {
                        let v = if n == b":authority" && !is_valid_authority(v) {
                            REPLACEMENT_AUTHORITY.to_vec()
                        } else {
                            v.clone()
                        };
                        (n.clone(), v)
                    })
                    .collect();
                expected_blocks.push(SeenBlock {
                    stream: *stream,
                    end_stream: *end_stream,
                    priority: *priority,
                    fields,
                });
            }
        }
    }
    (bytes, others, expected_blocks)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// However the bytes are split across reads, the server gets every
    /// other frame unchanged and every header block with the same fields,
    /// an invalid authority replaced.
    #[test]
    fn any_split_of_valid_frames_is_rewritten_the_same(
        frames in proptest::collection::vec(client_frame(), 0..12),
        splits in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let (input, others, expected_blocks) = client_bytes(&frames);
        let mut splits: Vec<usize> = splits.iter().map(|s| s % (input.len() + 1)).collect();
        splits.push(0);
        splits.push(input.len());
        splits.sort_unstable();
        let mut r = Rewriter::default();
        let mut out = Vec::new();
        for w in splits.windows(2) {
            prop_assert_eq!(r.feed(&input[w[0]..w[1]], &mut out), Ok(()));
        }
        let parsed = parse(&out);
        let seen_others: Vec<Frame> = parsed
            .iter()
            .filter(|f| !matches!(f.frame_type, TYPE_HEADERS | TYPE_CONTINUATION))
            .cloned()
            .collect();
        prop_assert_eq!(seen_others, others);
        prop_assert_eq!(blocks(&parsed), expected_blocks);
    }

    /// Random bytes, with or without a valid start, never panic.
    #[test]
    fn random_bytes_never_panic(
        preface in any::<bool>(),
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..2000), 0..8),
    ) {
        let mut r = Rewriter::default();
        let mut out = Vec::new();
        if preface {
            r.feed(PREFACE, &mut out).unwrap();
        }
        for c in &chunks {
            if r.feed(c, &mut out).is_err() {
                break;
            }
        }
    }

    /// Random frames whose header blocks are random bytes never panic.
    #[test]
    fn random_header_blocks_never_panic(
        blocks in proptest::collection::vec(
            (any::<u8>(), 0u32..4, proptest::collection::vec(any::<u8>(), 0..600)),
            0..8,
        ),
    ) {
        let frames: Vec<Vec<u8>> = blocks
            .iter()
            .enumerate()
            .map(|(i, (flags, stream, payload))| {
                let t = if i % 3 == 2 { TYPE_CONTINUATION } else { TYPE_HEADERS };
                frame(t, *flags, *stream, payload)
            })
            .collect();
        let _ = rewrite(&connection(&frames));
    }
}
