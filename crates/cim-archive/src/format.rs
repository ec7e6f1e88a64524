//! The archive format (documented in docs/storage-manager.md): compressed segments (zstd;
//! gzip in archives written before it) of length-prefixed records, a JSON manifest per
//! segment, a cursor per stream, and the key layout inside a target's bucket.

use std::io::Read;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::hex;

/// First bytes of every segment (after decompression).
pub const SEGMENT_MAGIC: &[u8; 8] = b"CIMSEG1\n";
/// Format tag of manifests and cursors.
pub const MANIFEST_FORMAT: &str = "cim-archive-segment/1";
pub const CURSOR_FORMAT: &str = "cim-archive-cursor/1";
/// The manifest's `compression` of new segments. `"gzip"` (older segments) is still read.
pub const COMPRESSION: &str = "zstd";
/// zstd level 1: the fastest of the regular levels. Segments are written once and read rarely,
/// and the archive must keep up with the stream, so speed wins over the last few percent.
const ZSTD_LEVEL: i32 = 1;

/// A decoded archive record: one JetStream message.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub sequence: u64,
    /// When the origin server stored the message, nanoseconds since the Unix epoch (UTC).
    pub time_nanos: i64,
    pub subject: String,
    /// `(name, value)` in the order they were read; a name may repeat.
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
}

/// What is wrong with a segment or manifest. Names the object precisely.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FormatError {
    #[error("segment {key}: {message}")]
    Corrupt { key: String, message: String },
    #[error("manifest {key}: {message}")]
    BadManifest { key: String, message: String },
}

/// Builds one segment in memory (bounded by the archiver's segment size).
#[derive(Debug)]
pub struct SegmentWriter {
    raw: Vec<u8>,
    pub first: u64,
    pub last: u64,
    pub count: u64,
    pub first_time_nanos: i64,
    pub last_time_nanos: i64,
}

impl Default for SegmentWriter {
    fn default() -> Self {
        SegmentWriter::new()
    }
}

impl SegmentWriter {
    pub fn new() -> SegmentWriter {
        SegmentWriter {
            raw: SEGMENT_MAGIC.to_vec(),
            first: 0,
            last: 0,
            count: 0,
            first_time_nanos: 0,
            last_time_nanos: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Uncompressed size so far.
    pub fn raw_len(&self) -> usize {
        self.raw.len()
    }

    /// Appends a message. Sequences must increase (gaps are allowed: deleted messages).
    /// Headers are written in the order given.
    pub fn push(
        &mut self,
        sequence: u64,
        time_nanos: i64,
        subject: &str,
        headers: &[(String, String)],
        payload: &[u8],
    ) {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self.push_borrowed(sequence, time_nanos, subject, &headers, payload);
    }

    /// [`SegmentWriter::push`] with borrowed headers: the archiver's path, which encodes a
    /// message without copying its header names and values.
    pub fn push_borrowed(
        &mut self,
        sequence: u64,
        time_nanos: i64,
        subject: &str,
        headers: &[(&str, &str)],
        payload: &[u8],
    ) {
        debug_assert!(self.count == 0 || sequence > self.last);
        if self.count == 0 {
            self.first = sequence;
            self.first_time_nanos = time_nanos;
        }
        self.last = sequence;
        self.last_time_nanos = time_nanos;
        self.count += 1;
        let raw = &mut self.raw;
        raw.reserve(8 + 8 + 12 + subject.len() + header_block_len(headers) + payload.len());
        raw.extend_from_slice(&sequence.to_be_bytes());
        raw.extend_from_slice(&time_nanos.to_be_bytes());
        put_bytes(raw, subject.as_bytes());
        raw.extend_from_slice(&(header_block_len(headers) as u32).to_be_bytes());
        encode_headers(raw, headers);
        put_bytes(raw, payload);
    }

    /// Compresses the segment and describes it in its manifest.
    pub fn finish(self, stream: &str, prefix: &str) -> (Bytes, Manifest) {
        let raw_sha256 = hex(&Sha256::digest(&self.raw));
        // Compressing from memory into memory fails only on allocation failure.
        let compressed = zstd::bulk::compress(&self.raw, ZSTD_LEVEL).expect("zstd into memory");
        let manifest = Manifest {
            format: MANIFEST_FORMAT.to_string(),
            stream: stream.to_string(),
            first_seq: self.first,
            last_seq: self.last,
            count: self.count,
            first_time_nanos: self.first_time_nanos,
            last_time_nanos: self.last_time_nanos,
            segment_key: segment_key(prefix, stream, self.first, self.last),
            segment_bytes: compressed.len() as u64,
            segment_sha256: hex(&Sha256::digest(&compressed)),
            raw_bytes: self.raw.len() as u64,
            raw_sha256,
            compression: COMPRESSION.to_string(),
        };
        (Bytes::from(compressed), manifest)
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

const HEADER_LINE: &[u8] = b"NATS/1.0\r\n";

/// Length of [`encode_headers`]' output.
fn header_block_len(headers: &[(&str, &str)]) -> usize {
    if headers.is_empty() {
        return 0;
    }
    HEADER_LINE.len() + headers.iter().map(|(k, v)| k.len() + 2 + v.len() + 2).sum::<usize>() + 2
}

/// Appends the NATS wire header block (`NATS/1.0\r\nName: value\r\n…\r\n`), nothing when
/// there are no headers.
fn encode_headers(out: &mut Vec<u8>, headers: &[(&str, &str)]) {
    if headers.is_empty() {
        return;
    }
    out.extend_from_slice(HEADER_LINE);
    for (k, v) in headers {
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn decode_headers(block: &[u8]) -> Result<Vec<(String, String)>, String> {
    if block.is_empty() {
        return Ok(Vec::new());
    }
    let text = std::str::from_utf8(block).map_err(|_| "header block is not utf-8".to_string())?;
    let mut lines = text.split("\r\n");
    if lines.next() != Some("NATS/1.0") {
        return Err("header block does not start with NATS/1.0".into());
    }
    let mut out = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (k, v) = line.split_once(": ").ok_or_else(|| format!("bad header line {line:?}"))?;
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// Checks that a stored segment is the one its manifest describes: its size and the SHA-256
/// of its (compressed) bytes.
pub fn check_stored(manifest: &Manifest, compressed: &[u8]) -> Result<(), FormatError> {
    let corrupt = |message: String| FormatError::Corrupt { key: manifest.segment_key.clone(), message };
    if compressed.len() as u64 != manifest.segment_bytes {
        return Err(corrupt(format!(
            "size {} differs from the manifest's {}",
            compressed.len(),
            manifest.segment_bytes
        )));
    }
    let sha = hex(&Sha256::digest(compressed));
    if sha != manifest.segment_sha256 {
        return Err(corrupt(format!("sha256 {sha} differs from the manifest's {}", manifest.segment_sha256)));
    }
    Ok(())
}

/// Checks a segment against its manifest (size, SHA-256 of the compressed and the raw bytes,
/// magic, record count, first/last sequence) and decodes its records.
pub fn decode_segment(manifest: &Manifest, compressed: &[u8]) -> Result<Vec<Record>, FormatError> {
    let key = manifest.segment_key.clone();
    let corrupt = |message: String| FormatError::Corrupt { key: key.clone(), message };
    check_stored(manifest, compressed)?;
    // `raw_bytes` is only checked after decompressing: do not let it size a huge allocation.
    let mut raw = Vec::with_capacity((manifest.raw_bytes as usize).min(256 << 20));
    match manifest.compression.as_str() {
        "zstd" => zstd::stream::read::Decoder::new(compressed)
            .and_then(|mut d| d.read_to_end(&mut raw))
            .map_err(|e| corrupt(format!("zstd: {e}")))?,
        "gzip" => {
            flate2::read::GzDecoder::new(compressed).read_to_end(&mut raw).map_err(|e| corrupt(format!("gzip: {e}")))?
        }
        other => return Err(corrupt(format!("unknown compression {other:?}"))),
    };
    if hex(&Sha256::digest(&raw)) != manifest.raw_sha256 {
        return Err(corrupt("sha256 of the decompressed records differs from the manifest".into()));
    }
    if raw.len() < 8 || &raw[..8] != SEGMENT_MAGIC {
        return Err(corrupt("not a cim segment (bad magic)".into()));
    }
    let mut records = Vec::new();
    let mut at = 8usize;
    let take = |at: &mut usize, n: usize| -> Result<&[u8], FormatError> {
        let end = at
            .checked_add(n)
            .filter(|&e| e <= raw.len())
            .ok_or_else(|| corrupt(format!("truncated record at byte {at}")))?;
        let s = &raw[*at..end];
        *at = end;
        Ok(s)
    };
    while at < raw.len() {
        let sequence = u64::from_be_bytes(take(&mut at, 8)?.try_into().expect("8 bytes"));
        let time_nanos = i64::from_be_bytes(take(&mut at, 8)?.try_into().expect("8 bytes"));
        let n = u32::from_be_bytes(take(&mut at, 4)?.try_into().expect("4 bytes")) as usize;
        let subject = String::from_utf8(take(&mut at, n)?.to_vec())
            .map_err(|_| corrupt(format!("sequence {sequence}: subject is not utf-8")))?;
        let n = u32::from_be_bytes(take(&mut at, 4)?.try_into().expect("4 bytes")) as usize;
        let headers = decode_headers(take(&mut at, n)?).map_err(|m| corrupt(format!("sequence {sequence}: {m}")))?;
        let n = u32::from_be_bytes(take(&mut at, 4)?.try_into().expect("4 bytes")) as usize;
        let payload = Bytes::copy_from_slice(take(&mut at, n)?);
        if let Some(prev) = records.last().map(|r: &Record| r.sequence)
            && sequence <= prev
        {
            return Err(corrupt(format!("sequence {sequence} follows {prev}")));
        }
        records.push(Record { sequence, time_nanos, subject, headers, payload });
    }
    let (first, last) = (records.first().map(|r| r.sequence), records.last().map(|r| r.sequence));
    if records.len() as u64 != manifest.count || first != Some(manifest.first_seq) || last != Some(manifest.last_seq) {
        return Err(corrupt(format!(
            "holds {} records {:?}..{:?}, the manifest says {} records {}..{}",
            records.len(),
            first,
            last,
            manifest.count,
            manifest.first_seq,
            manifest.last_seq
        )));
    }
    Ok(records)
}

/// Describes one segment. Written after its segment: a manifest is the commit of a segment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub stream: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub count: u64,
    pub first_time_nanos: i64,
    pub last_time_nanos: i64,
    pub segment_key: String,
    pub segment_bytes: u64,
    pub segment_sha256: String,
    pub raw_bytes: u64,
    pub raw_sha256: String,
    pub compression: String,
}

impl Manifest {
    pub fn parse(key: &str, body: &[u8]) -> Result<Manifest, FormatError> {
        let m: Manifest = serde_json::from_slice(body)
            .map_err(|e| FormatError::BadManifest { key: key.to_string(), message: format!("{e}") })?;
        if m.format != MANIFEST_FORMAT {
            return Err(FormatError::BadManifest {
                key: key.to_string(),
                message: format!("unknown format {:?}", m.format),
            });
        }
        if m.first_seq > m.last_seq || m.count == 0 || m.count > m.last_seq - m.first_seq + 1 {
            return Err(FormatError::BadManifest {
                key: key.to_string(),
                message: format!("inconsistent range {}..{} with {} records", m.first_seq, m.last_seq, m.count),
            });
        }
        Ok(m)
    }
}

/// The archive position of one stream on one target: everything up to `last_seq` is archived.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cursor {
    pub format: String,
    pub stream: String,
    pub target: String,
    pub last_seq: u64,
    pub manifest_key: String,
    pub updated_unix_nanos: i64,
}

/// `<prefix>streams/<STREAM>/`
pub fn stream_prefix(prefix: &str, stream: &str) -> String {
    format!("{prefix}streams/{stream}/")
}

/// Sequences are zero-padded to 20 digits so keys sort in sequence order.
pub fn segment_key(prefix: &str, stream: &str, first: u64, last: u64) -> String {
    format!("{}segments/{first:020}-{last:020}.cimseg.zst", stream_prefix(prefix, stream))
}

pub fn manifest_key(prefix: &str, stream: &str, first: u64, last: u64) -> String {
    format!("{}manifests/{first:020}-{last:020}.json", stream_prefix(prefix, stream))
}

pub fn manifests_prefix(prefix: &str, stream: &str) -> String {
    format!("{}manifests/", stream_prefix(prefix, stream))
}

pub fn cursor_key(prefix: &str, stream: &str) -> String {
    format!("{}cursor.json", stream_prefix(prefix, stream))
}

/// `<prefix>objects/<bucket>/<name>`: an object copied by name (a CID for the content bucket).
pub fn object_key(prefix: &str, bucket: &str, name: &str) -> String {
    format!("{prefix}objects/{bucket}/{name}")
}

/// `(first, last)` of a manifest key, if it is one.
pub fn parse_manifest_key(key: &str) -> Option<(u64, u64)> {
    let name = key.rsplit('/').next()?.strip_suffix(".json")?;
    let (a, b) = name.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Bytes, Manifest) {
        let mut w = SegmentWriter::new();
        w.push(3, 10, "orders.a", &[("ce-id".into(), "1".into()), ("ce-id".into(), "2".into())], b"hello");
        w.push(5, 11, "orders.b", &[], b"");
        w.finish("S", "p/")
    }

    #[test]
    fn segments_round_trip() {
        let (bytes, m) = sample();
        assert_eq!((m.first_seq, m.last_seq, m.count), (3, 5, 2));
        assert_eq!(m.segment_key, "p/streams/S/segments/00000000000000000003-00000000000000000005.cimseg.zst");
        assert_eq!(m.compression, "zstd");
        let records = decode_segment(&m, &bytes).unwrap();
        assert_eq!(
            records[0].headers,
            vec![("ce-id".to_string(), "1".to_string()), ("ce-id".to_string(), "2".to_string())]
        );
        assert_eq!(records[0].payload, Bytes::from_static(b"hello"));
        assert_eq!(records[1].sequence, 5);
        assert!(records[1].headers.is_empty());
        let json = serde_json::to_vec(&m).unwrap();
        assert_eq!(Manifest::parse("k", &json).unwrap(), m);
    }

    #[test]
    fn corruption_is_named() {
        let (bytes, m) = sample();
        let mut bad = bytes.to_vec();
        let n = bad.len();
        bad[n / 2] ^= 0xff;
        let e = decode_segment(&m, &bad).unwrap_err();
        assert!(e.to_string().starts_with(&format!("segment {}: sha256", m.segment_key)), "{e}");
        let e = decode_segment(&m, &bytes[..n - 1]).unwrap_err();
        assert!(e.to_string().contains("size"), "{e}");
        assert!(Manifest::parse("k", b"{}").unwrap_err().to_string().starts_with("manifest k:"));
    }

    /// A segment as the archiver wrote it before zstd: gzip, `.cimseg.gz`.
    fn gzip_sample() -> (Bytes, Manifest) {
        use std::io::Write;
        let mut w = SegmentWriter::new();
        w.push(7, 12, "orders.c", &[("a".into(), "x".into())], b"old");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&w.raw).unwrap();
        let compressed = gz.finish().unwrap();
        let (_, mut m) = w.finish("S", "p/");
        m.segment_key = m.segment_key.replace(".zst", ".gz");
        m.segment_bytes = compressed.len() as u64;
        m.segment_sha256 = hex(&Sha256::digest(&compressed));
        m.compression = "gzip".into();
        (Bytes::from(compressed), m)
    }

    #[test]
    fn gzip_segments_still_decode() {
        let (bytes, m) = gzip_sample();
        let records = decode_segment(&m, &bytes).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!((records[0].sequence, records[0].subject.as_str()), (7, "orders.c"));
        assert_eq!(records[0].headers, vec![("a".to_string(), "x".to_string())]);
        assert_eq!(records[0].payload, Bytes::from_static(b"old"));
    }

    #[test]
    fn unknown_compression_is_named() {
        let (bytes, mut m) = sample();
        m.compression = "lz77".into();
        let e = decode_segment(&m, &bytes).unwrap_err();
        assert!(e.to_string().contains("unknown compression \"lz77\""), "{e}");
        // A gzip manifest over zstd bytes: the right checksum, the wrong decoder.
        let (bytes, mut m) = sample();
        m.compression = "gzip".into();
        assert!(decode_segment(&m, &bytes).unwrap_err().to_string().contains("gzip"));
    }

    #[test]
    fn borrowed_and_owned_headers_encode_alike() {
        let owned = [("b".to_string(), "2".to_string()), ("a".to_string(), "1".to_string())];
        let mut a = SegmentWriter::new();
        a.push(1, 2, "s", &owned, b"p");
        let mut b = SegmentWriter::new();
        b.push_borrowed(1, 2, "s", &[("b", "2"), ("a", "1")], b"p");
        assert_eq!(a.raw, b.raw);
        let block = b"NATS/1.0\r\nb: 2\r\na: 1\r\n\r\n";
        assert!(a.raw.windows(block.len()).any(|w| w == block));
        assert_eq!(header_block_len(&[("b", "2"), ("a", "1")]), block.len());
        assert_eq!(header_block_len(&[]), 0);
    }

    #[test]
    fn manifest_keys_parse() {
        assert_eq!(parse_manifest_key(&manifest_key("", "S", 1, 20)), Some((1, 20)));
        assert_eq!(parse_manifest_key("x/cursor.json"), None);
    }
}
