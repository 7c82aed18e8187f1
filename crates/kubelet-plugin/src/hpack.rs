//! HPACK (RFC 7541): the header compression of HTTP/2, just enough to read a client's
//! request headers and write them out again.
//!
//! [`Decoder`] follows the client's dynamic table (one per connection, in wire order) and
//! expands every header block into its fields. [`encode`] writes fields back as literals
//! that never touch the receiver's dynamic table, so the re-encoded stream is
//! self-contained whatever the client compressed and however it sized its table.

use std::collections::VecDeque;
use std::sync::OnceLock;

/// Why a header block could not be decoded. The connection cannot continue after one
/// (RFC 7541 §2.3.3: a decoding error is a connection error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    /// The block ended inside a representation.
    #[error("header block truncated")]
    Truncated,
    /// An integer does not fit (more than 28 bits).
    #[error("integer overflow in header block")]
    IntegerOverflow,
    /// An index outside the static and dynamic tables.
    #[error("header index {0} is outside the tables")]
    BadIndex(usize),
    /// A Huffman string that does not decode (bad padding or the EOS symbol).
    #[error("invalid Huffman-coded string")]
    Huffman,
    /// A dynamic table size update above what we allow.
    #[error("dynamic table size update to {0} bytes exceeds the limit")]
    TableSize(usize),
    /// The expanded header list is larger than we accept.
    #[error("header list expands beyond {0} bytes")]
    ListTooLarge(usize),
}

/// One header field; `sensitive` is HPACK's "never indexed" flag, kept on re-encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// Lower-case name, pseudo-headers (`:authority`) included.
    pub name: Vec<u8>,
    /// The value as sent.
    pub value: Vec<u8>,
    /// Sent as "never indexed".
    pub sensitive: bool,
}

/// RFC 7541 Appendix A.
const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// The protocol's initial dynamic table size (SETTINGS_HEADER_TABLE_SIZE default).
pub const DEFAULT_TABLE_SIZE: usize = 4096;

/// Decodes one direction's header blocks, keeping its dynamic table.
#[derive(Debug)]
pub struct Decoder {
    /// Newest first, as HPACK indexes it.
    table: VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    max_size: usize,
    /// The largest size update the encoder may ask for.
    size_limit: usize,
    /// The largest expanded header list (RFC 7541 §4.1 sizes) accepted.
    list_limit: usize,
}

impl Decoder {
    /// A decoder that accepts table size updates up to `size_limit` bytes and header lists
    /// up to `list_limit` bytes.
    pub fn new(size_limit: usize, list_limit: usize) -> Self {
        Self {
            table: VecDeque::new(),
            size: 0,
            max_size: DEFAULT_TABLE_SIZE.min(size_limit),
            size_limit,
            list_limit,
        }
    }

    /// Decode one complete header block.
    pub fn decode(&mut self, mut block: &[u8]) -> Result<Vec<Field>, HpackError> {
        let mut fields = Vec::new();
        let mut list_size = 0usize;
        while let Some(&first) = block.first() {
            let field = if first & 0x80 != 0 {
                let index = read_int(&mut block, 7)?;
                let (name, value) = self.entry(index)?;
                Field {
                    name,
                    value,
                    sensitive: false,
                }
            } else if first & 0xc0 == 0x40 {
                let field = self.literal(&mut block, 6, false)?;
                self.insert(field.name.clone(), field.value.clone());
                field
            } else if first & 0xe0 == 0x20 {
                let size = read_int(&mut block, 5)?;
                if size > self.size_limit {
                    return Err(HpackError::TableSize(size));
                }
                self.max_size = size;
                self.evict(0);
                continue;
            } else {
                // 0000xxxx without indexing, 0001xxxx never indexed.
                self.literal(&mut block, 4, first & 0x10 != 0)?
            };
            list_size += field.name.len() + field.value.len() + 32;
            if list_size > self.list_limit {
                return Err(HpackError::ListTooLarge(self.list_limit));
            }
            fields.push(field);
        }
        Ok(fields)
    }

    fn literal(&self, block: &mut &[u8], prefix: u8, sensitive: bool) -> Result<Field, HpackError> {
        let index = read_int(block, prefix)?;
        let name = if index == 0 {
            read_string(block)?
        } else {
            self.entry(index)?.0
        };
        let value = read_string(block)?;
        Ok(Field {
            name,
            value,
            sensitive,
        })
    }

    fn entry(&self, index: usize) -> Result<(Vec<u8>, Vec<u8>), HpackError> {
        match index {
            0 => Err(HpackError::BadIndex(0)),
            1..=61 => {
                let (n, v) = STATIC_TABLE[index - 1];
                Ok((n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            }
            _ => self
                .table
                .get(index - 62)
                .cloned()
                .ok_or(HpackError::BadIndex(index)),
        }
    }

    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let size = name.len() + value.len() + 32;
        if size > self.max_size {
            // §4.4: an entry larger than the table empties it and is not added.
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict(size);
        self.size += size;
        self.table.push_front((name, value));
    }

    /// Evict oldest entries until `incoming` more bytes fit.
    fn evict(&mut self, incoming: usize) {
        while self.size + incoming > self.max_size {
            match self.table.pop_back() {
                Some((n, v)) => self.size -= n.len() + v.len() + 32,
                None => break,
            }
        }
    }

    /// The dynamic table's current size in bytes (RFC 7541 §4.1).
    pub fn table_size(&self) -> usize {
        self.size
    }
}

/// Encode `fields` as literals without indexing (never-indexed where the client said so),
/// names from the static table where it has them, strings raw.
pub fn encode(fields: &[Field]) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        fields
            .iter()
            .map(|f| f.name.len() + f.value.len() + 4)
            .sum(),
    );
    for f in fields {
        let flags = if f.sensitive { 0x10 } else { 0x00 };
        match STATIC_TABLE
            .iter()
            .position(|(n, _)| n.as_bytes() == f.name)
        {
            Some(i) => write_int(&mut out, flags, 4, i + 1),
            None => {
                write_int(&mut out, flags, 4, 0);
                write_string(&mut out, &f.name);
            }
        }
        write_string(&mut out, &f.value);
    }
    out
}

/// §5.1: an integer with an N-bit prefix.
fn read_int(block: &mut &[u8], prefix: u8) -> Result<usize, HpackError> {
    let (&first, rest) = block.split_first().ok_or(HpackError::Truncated)?;
    *block = rest;
    let max = (1usize << prefix) - 1;
    let mut value = usize::from(first) & max;
    if value < max {
        return Ok(value);
    }
    let mut shift = 0u32;
    loop {
        let (&b, rest) = block.split_first().ok_or(HpackError::Truncated)?;
        *block = rest;
        if shift > 21 {
            return Err(HpackError::IntegerOverflow);
        }
        value += usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
}

fn write_int(out: &mut Vec<u8>, flags: u8, prefix: u8, value: usize) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    let mut rest = value - max;
    while rest >= 0x80 {
        out.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// §5.2: a string literal, Huffman-coded or raw.
fn read_string(block: &mut &[u8]) -> Result<Vec<u8>, HpackError> {
    let huffman = block.first().ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = read_int(block, 7)?;
    if block.len() < len {
        return Err(HpackError::Truncated);
    }
    let (data, rest) = block.split_at(len);
    *block = rest;
    if huffman {
        huffman_decode(data)
    } else {
        Ok(data.to_vec())
    }
}

fn write_string(out: &mut Vec<u8>, s: &[u8]) {
    write_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// RFC 7541 Appendix B: the code length of each symbol, 0..=255 then EOS (256). The code is
/// canonical (codes assigned in order of length, then symbol), so the lengths determine it.
const CODE_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, // 0x00
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28, // 0x10
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, // ' ' ..= '/'
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, // '0' ..= '?'
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, // '@' ..= 'O'
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, // 'P' ..= '_'
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, // '`' ..= 'o'
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, // 'p' ..= 0x7f
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, // 0x80
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, // 0x90
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, // 0xa0
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, // 0xb0
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, // 0xc0
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, // 0xd0
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, // 0xe0
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, // 0xf0
    30, // EOS
];

const EOS: u16 = 256;

/// The canonical code as decoding tables: for each length, the first code of that length,
/// how many codes have it, and where its symbols start in `symbols`.
#[derive(Debug)]
struct Canonical {
    first: [u32; 31],
    count: [u32; 31],
    offset: [usize; 31],
    symbols: Vec<u16>,
}

fn canonical() -> &'static Canonical {
    static TABLE: OnceLock<Canonical> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut symbols: Vec<u16> = (0..=EOS).collect();
        symbols.sort_by_key(|&s| (CODE_LENGTHS[usize::from(s)], s));
        let mut c = Canonical {
            first: [0; 31],
            count: [0; 31],
            offset: [0; 31],
            symbols,
        };
        for &len in &CODE_LENGTHS {
            c.count[usize::from(len)] += 1;
        }
        let (mut code, mut offset) = (0u32, 0usize);
        for len in 1..31 {
            code <<= 1;
            c.first[len] = code;
            c.offset[len] = offset;
            code += c.count[len];
            offset += c.count[len] as usize;
        }
        c
    })
}

/// §5.2 and Appendix B: decode a Huffman string. Padding must be at most 7 one-bits (a
/// prefix of EOS); EOS itself is an error.
pub fn huffman_decode(data: &[u8]) -> Result<Vec<u8>, HpackError> {
    let table = canonical();
    let mut out = Vec::with_capacity(data.len() * 8 / 5);
    let (mut code, mut len, mut all_ones) = (0u32, 0usize, true);
    for &byte in data {
        for shift in (0..8).rev() {
            let bit = u32::from(byte >> shift) & 1;
            code = (code << 1) | bit;
            len += 1;
            all_ones &= bit == 1;
            if len > 30 {
                return Err(HpackError::Huffman);
            }
            let index = code.wrapping_sub(table.first[len]);
            if code >= table.first[len] && index < table.count[len] {
                let symbol = table.symbols[table.offset[len] + index as usize];
                if symbol == EOS {
                    return Err(HpackError::Huffman);
                }
                out.push(symbol as u8);
                (code, len, all_ones) = (0, 0, true);
            }
        }
    }
    if len > 7 || !all_ones {
        return Err(HpackError::Huffman);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn pairs(fields: &[Field]) -> Vec<(String, String)> {
        fields
            .iter()
            .map(|f| {
                (
                    String::from_utf8(f.name.clone()).unwrap(),
                    String::from_utf8(f.value.clone()).unwrap(),
                )
            })
            .collect()
    }

    fn owned(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    // RFC 7541 C.3 (requests, raw strings) and C.4 (the same, Huffman-coded): three blocks
    // on one connection, the later ones indexing the dynamic table the earlier ones filled.
    const REQUESTS: [&[(&str, &str)]; 3] = [
        &[
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            (":authority", "www.example.com"),
        ],
        &[
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            (":authority", "www.example.com"),
            ("cache-control", "no-cache"),
        ],
        &[
            (":method", "GET"),
            (":scheme", "https"),
            (":path", "/index.html"),
            (":authority", "www.example.com"),
            ("custom-key", "custom-value"),
        ],
    ];

    #[test]
    fn rfc7541_request_examples_decode_with_and_without_huffman() {
        let raw = [
            "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
            "8286 84be 5808 6e6f 2d63 6163 6865",
            "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
        ];
        let huffman = [
            "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
            "8286 84be 5886 a8eb 1064 9cbf",
            "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
        ];
        for blocks in [raw, huffman] {
            let mut d = Decoder::new(DEFAULT_TABLE_SIZE, 1 << 20);
            for ((block, expected), size) in blocks.iter().zip(REQUESTS).zip([57, 110, 164]) {
                assert_eq!(pairs(&d.decode(&hex(block)).unwrap()), owned(expected));
                assert_eq!(d.table_size(), size);
            }
        }
    }

    #[test]
    fn rfc7541_response_examples_evict_from_a_small_table() {
        // C.5: a 256-byte table, so the second and third responses evict entries.
        let blocks = [
            "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133
             2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70
             6c65 2e63 6f6d",
            "4803 3330 37c1 c0bf",
            "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d
             54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049
             5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e
             3d31",
        ];
        let date1 = "Mon, 21 Oct 2013 20:13:21 GMT";
        let date2 = "Mon, 21 Oct 2013 20:13:22 GMT";
        let location = "https://www.example.com";
        let expected: [&[(&str, &str)]; 3] = [
            &[
                (":status", "302"),
                ("cache-control", "private"),
                ("date", date1),
                ("location", location),
            ],
            &[
                (":status", "307"),
                ("cache-control", "private"),
                ("date", date1),
                ("location", location),
            ],
            &[
                (":status", "200"),
                ("cache-control", "private"),
                ("date", date2),
                ("location", location),
                ("content-encoding", "gzip"),
                (
                    "set-cookie",
                    "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1",
                ),
            ],
        ];
        let mut d = Decoder::new(DEFAULT_TABLE_SIZE, 1 << 20);
        d.max_size = 256;
        for ((block, expected), size) in blocks.iter().zip(expected).zip([222, 222, 215]) {
            assert_eq!(pairs(&d.decode(&hex(block)).unwrap()), owned(expected));
            assert_eq!(d.table_size(), size);
        }
    }

    #[test]
    fn re_encoded_fields_decode_to_the_same_list_without_touching_the_table() {
        let fields = vec![
            Field {
                name: b":authority".to_vec(),
                value: b"localhost".to_vec(),
                sensitive: false,
            },
            Field {
                name: b"x-custom".to_vec(),
                value: vec![b'v'; 300],
                sensitive: false,
            },
            Field {
                name: b"authorization".to_vec(),
                value: b"Bearer secret".to_vec(),
                sensitive: true,
            },
        ];
        let block = encode(&fields);
        let mut d = Decoder::new(DEFAULT_TABLE_SIZE, 1 << 20);
        assert_eq!(d.decode(&block).unwrap(), fields);
        assert_eq!(d.table_size(), 0);
        // 300 needs a continuation byte after the 7-bit prefix.
        assert!(block.windows(3).any(|w| w == [0x7f, 0xad, 0x01]));
    }

    #[test]
    fn malformed_blocks_are_errors_not_panics() {
        let mut d = Decoder::new(DEFAULT_TABLE_SIZE, 1 << 20);
        assert_eq!(d.decode(&[0x80]), Err(HpackError::BadIndex(0)));
        assert_eq!(d.decode(&[0xbe]), Err(HpackError::BadIndex(62)));
        assert_eq!(d.decode(&[0x41, 0x05, b'a']), Err(HpackError::Truncated));
        assert_eq!(
            d.decode(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Err(HpackError::IntegerOverflow)
        );
        assert_eq!(
            d.decode(&[0x3f, 0xe1, 0xff, 0x03]),
            Err(HpackError::TableSize(65536))
        );
        // Huffman: 8 bits of padding, and a non-EOS-prefix padding.
        assert_eq!(huffman_decode(&[0xff]), Err(HpackError::Huffman));
        assert_eq!(huffman_decode(&[0x00]), Err(HpackError::Huffman));
        // The EOS symbol itself (30 one-bits).
        assert_eq!(
            huffman_decode(&[0xff, 0xff, 0xff, 0xfc]),
            Err(HpackError::Huffman)
        );
        // A small block of references cannot expand past the list limit.
        let mut d = Decoder::new(DEFAULT_TABLE_SIZE, 4096);
        let mut bomb = vec![0x40, 0x01, b'x', 0x7f, 0xa1, 0x1e];
        bomb.extend(vec![b'y'; 4000]);
        bomb.extend(std::iter::repeat_n(0xbe, 8));
        assert_eq!(d.decode(&bomb), Err(HpackError::ListTooLarge(4096)));
    }

    #[test]
    fn every_symbol_round_trips_through_the_canonical_code() {
        // Encode each byte with the code derived from the lengths, padded with ones, and
        // decode it back: the tables agree with themselves for all 256 symbols.
        let t = canonical();
        for symbol in 0u16..256 {
            let len = usize::from(CODE_LENGTHS[usize::from(symbol)]);
            let rank = t.symbols[t.offset[len]..]
                .iter()
                .position(|&s| s == symbol)
                .unwrap();
            let code = u64::from(t.first[len]) + rank as u64;
            let bits = len.div_ceil(8) * 8;
            let padded = (code << (bits - len)) | ((1u64 << (bits - len)) - 1);
            let bytes: Vec<u8> = (0..bits / 8)
                .rev()
                .map(|i| (padded >> (i * 8)) as u8)
                .collect();
            assert_eq!(huffman_decode(&bytes).unwrap(), vec![symbol as u8]);
        }
    }
}
