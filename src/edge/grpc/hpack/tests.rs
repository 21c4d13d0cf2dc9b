#![allow(clippy::unwrap_used)]

use super::*;
use proptest::prelude::*;

type Fields = Vec<(Vec<u8>, Vec<u8>)>;

fn decode(decoder: &mut Decoder, block: &[u8]) -> Result<Fields, HpackError> {
    let mut fields = Vec::new();
    decoder.decode(block, usize::MAX, |n, v| {
        fields.push((n.to_vec(), v.to_vec()))
    })?;
    Ok(fields)
}

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn fields(list: &[(&str, &str)]) -> Fields {
    list.iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
}

/// The code of each symbol, from the canonical tables.
fn codes() -> Vec<(u32, u8)> {
    let t = &CANONICAL;
    let mut codes = vec![(0, 0); 257];
    for len in 1..=MAX_CODE_LENGTH {
        for i in 0..t.count[len] {
            let symbol = t.symbols[usize::from(t.offset[len]) + i as usize];
            codes[usize::from(symbol)] = (t.first[len] + i, len as u8);
        }
    }
    codes
}

fn huffman_encode(data: &[u8]) -> Vec<u8> {
    let codes = codes();
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u64, 0u32);
    for &b in data {
        let (code, len) = codes[usize::from(b)];
        acc = acc << len | u64::from(code);
        bits += u32::from(len);
        while bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    if bits > 0 {
        let pad = 8 - bits;
        out.push(((acc << pad) | ((1 << pad) - 1)) as u8);
    }
    out
}

fn loona(block: &[u8]) -> Option<Fields> {
    loona_hpack::Decoder::new().decode(block).ok()
}

#[test]
fn the_canonical_code_is_the_rfcs() {
    // A few entries of RFC 7541 Appendix B.
    let codes = codes();
    assert_eq!(codes[0], (0x1ff8, 13));
    assert_eq!(codes[usize::from(b' ')], (0x14, 6));
    assert_eq!(codes[usize::from(b'0')], (0x0, 5));
    assert_eq!(codes[usize::from(b'a')], (0x3, 5));
    assert_eq!(codes[usize::from(b'A')], (0x21, 6));
    assert_eq!(codes[usize::from(b'/')], (0x18, 6));
    assert_eq!(codes[255], (0x3ffffee, 26));
    assert_eq!(codes[256], (0x3fffffff, 30));
}

#[test]
fn rfc_7541_appendix_c_requests() {
    // C.3: without Huffman; C.4: the same requests with Huffman. Each list
    // is three blocks on one connection, the later ones indexing into the
    // dynamic table.
    let first = fields(&[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
    ]);
    let mut second = first.clone();
    second.push((b"cache-control".to_vec(), b"no-cache".to_vec()));
    let third = fields(&[
        (":method", "GET"),
        (":scheme", "https"),
        (":path", "/index.html"),
        (":authority", "www.example.com"),
        ("custom-key", "custom-value"),
    ]);
    let c3 = [
        "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
        "8286 84be 5808 6e6f 2d63 6163 6865",
        "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
    ];
    let c4 = [
        "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
        "8286 84be 5886 a8eb 1064 9cbf",
        "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
    ];
    for blocks in [c3, c4] {
        let mut decoder = Decoder::new(4096);
        let mut reference = loona_hpack::Decoder::new();
        for (block, expected) in blocks.iter().zip([&first, &second, &third]) {
            let block = hex(block);
            assert_eq!(&decode(&mut decoder, &block).unwrap(), expected);
            assert_eq!(&reference.decode(&block).unwrap(), expected);
        }
        // The table now holds custom-key, cache-control, :authority (C.3.3).
        assert_eq!(decoder.table.len(), 3);
        assert_eq!(decoder.size, 164);
    }
}

#[test]
fn the_table_evicts_oldest_first_and_resizes() {
    let mut decoder = Decoder::new(4096);
    let mut block = Vec::new();
    for i in 0..100u8 {
        // Literal with incremental indexing, new name: 32 + 4 + 32 bytes.
        block.push(0x40);
        block.push(4);
        block.extend_from_slice(&[b'n', b'a', b'm', i]);
        block.push(32);
        block.extend_from_slice(&[i; 32]);
    }
    assert_eq!(decode(&mut decoder, &block).unwrap().len(), 100);
    assert!(decoder.size <= 4096);
    assert_eq!(decoder.table.len(), 4096 / 68);
    // Index 62 is the newest.
    let newest = decode(&mut decoder, &[0x80 | 62]).unwrap();
    assert_eq!(newest[0].0, b"nam\x63");
    // A size update to 0 empties the table; then 62 is no entry.
    assert_eq!(decode(&mut decoder, &[0x20]), Ok(vec![]));
    assert_eq!(
        decode(&mut decoder, &[0x80 | 62]),
        Err(HpackError::BadIndex(62))
    );
    // More than the allowed maximum is refused.
    let mut update = Vec::new();
    update.extend_from_slice(&[0x3f, 0xe2, 0x1f]); // 4097
    assert_eq!(
        decode(&mut decoder, &update),
        Err(HpackError::TableTooLarge(4097))
    );
    // An entry larger than the whole table empties it.
    let mut decoder = Decoder::new(4096);
    let mut big = vec![0x40, 1, b'x', 0x7f];
    let rest = 5000 - 127;
    big.extend_from_slice(&[((rest % 128) | 0x80) as u8, (rest / 128) as u8]);
    big.extend_from_slice(&[b'y'; 5000]);
    decode(&mut decoder, &hex("4003 6162 6301 64")).unwrap();
    assert_eq!(decoder.table.len(), 1);
    decode(&mut decoder, &big).unwrap();
    assert_eq!((decoder.table.len(), decoder.size), (0, 0));
}

#[test]
fn malformed_blocks_are_errors() {
    let cases: Vec<(Vec<u8>, HpackError)> = vec![
        (vec![0x80], HpackError::BadIndex(0)),
        (vec![0x80 | 62], HpackError::BadIndex(62)),
        (vec![0x41], HpackError::Truncated),
        (vec![0x00, 0x05, b'a'], HpackError::Truncated),
        (
            vec![0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
            HpackError::IntegerOverflow,
        ),
        (vec![0xff, 0x80], HpackError::Truncated),
        (vec![0x82, 0x20], HpackError::LateSizeUpdate),
        // Huffman "a" padded with zeros instead of ones.
        (vec![0x00, 0x81, 0x18, 0x81, 0x18], HpackError::BadHuffman),
        // Eight bits of padding.
        (
            vec![0x00, 0x81, 0x1f, 0x82, 0x1f, 0xff],
            HpackError::BadHuffman,
        ),
        // EOS inside the string.
        (
            vec![0x00, 0x81, 0x1f, 0x84, 0xff, 0xff, 0xff, 0xff],
            HpackError::BadHuffman,
        ),
    ];
    for (block, expected) in cases {
        assert_eq!(
            decode(&mut Decoder::new(4096), &block),
            Err(expected),
            "{block:02x?}"
        );
    }
}

#[test]
fn decoding_stops_at_the_list_limit() {
    let mut block = vec![0x40, 1, b'x', 100];
    block.extend_from_slice(&[b'y'; 100]);
    block.extend_from_slice(&[0x80 | 62; 10_000]);
    let mut seen = 0;
    let result = Decoder::new(4096).decode(&block, 1000, |_, _| seen += 1);
    assert_eq!(result, Err(HpackError::ListTooLarge(1000)));
    assert_eq!(seen, 1000 / 133);
}

proptest! {
    #[test]
    fn huffman_round_trips(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        prop_assert_eq!(huffman_decode(&huffman_encode(&data)), Ok(data));
    }

    /// Random blocks built from every representation, strings raw or
    /// Huffman: decoded as loona-hpack decodes them.
    #[test]
    fn decodes_as_a_second_implementation_does(
        blocks in proptest::collection::vec(
            proptest::collection::vec(
                (0u8..5, any::<u16>(), proptest::collection::vec(any::<u8>(), 0..40),
                 proptest::collection::vec(any::<u8>(), 0..40), any::<bool>()),
                1..10,
            ),
            1..5,
        ),
    ) {
        let mut ours = Decoder::new(4096);
        let mut reference = loona_hpack::Decoder::new();
        for block in blocks {
            let mut bytes = Vec::new();
            for (kind, index, name, value, huffman) in block {
                let string = |s: &[u8], out: &mut Vec<u8>| {
                    let s = if huffman { huffman_encode(s) } else { s.to_vec() };
                    let mut len = Vec::new();
                    encode_integer(s.len(), 7, if huffman { 0x80 } else { 0 }, &mut len);
                    out.extend_from_slice(&len);
                    out.extend_from_slice(&s);
                };
                let index = usize::from(index) % STATIC_TABLE.len() + 1;
                match kind {
                    0 => encode_integer(index, 7, 0x80, &mut bytes),
                    1..=3 => {
                        let (prefix, first) = [(6, 0x40), (4, 0x00), (4, 0x10)][usize::from(kind - 1)];
                        encode_integer(0, prefix, first, &mut bytes);
                        string(&name, &mut bytes);
                        string(&value, &mut bytes);
                    }
                    _ => {
                        encode_integer(index, 6, 0x40, &mut bytes);
                        string(&value, &mut bytes);
                    }
                }
            }
            let expected = reference.decode(&bytes);
            prop_assert!(expected.is_ok());
            prop_assert_eq!(decode(&mut ours, &bytes).ok(), expected.ok());
        }
    }

    /// Random bytes: never a panic, and whatever both accept, both decode
    /// alike.
    #[test]
    fn random_blocks_decode_alike_or_fail(block in proptest::collection::vec(any::<u8>(), 0..300)) {
        let ours = decode(&mut Decoder::new(4096), &block);
        if let (Ok(ours), Some(theirs)) = (&ours, loona(&block)) {
            prop_assert_eq!(ours, &theirs);
        }
    }
}
