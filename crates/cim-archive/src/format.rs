//! The archive format (documented in docs/storage-manager.md): compressed segments (zstd;
//! gzip in archives written before it) of length-prefixed records, a JSON manifest per
//! segment, a cursor per stream, and the key layout inside a target's bucket.

use std::io::Read;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::hex;
use crate::seal::Sealed;

/// First bytes of every segment (after decompression).
pub const SEGMENT_MAGIC: &[u8; 8] = b"CIMSEG1\n";
/// Format tag of the manifests written now (version 2: no hash of the decompressed records).
pub const MANIFEST_FORMAT: &str = "cim-archive-segment/2";
/// Format tag of manifests written before version 2: they also carry `raw_sha256`, the SHA-256
/// of the decompressed records, which readers still check.
pub const MANIFEST_FORMAT_V1: &str = "cim-archive-segment/1";
pub const CURSOR_FORMAT: &str = "cim-archive-cursor/1";
pub const DELETIONS_FORMAT: &str = "cim-archive-deletions/1";
/// The largest decompressed segment accepted: a manifest claiming more is refused before
/// anything is decompressed, and decompression stops at the manifest's size (a "zip bomb"
/// cannot take the reader's memory).
pub const MAX_RAW_SEGMENT_BYTES: u64 = 1 << 30;
/// The manifest's `compression` of new segments. `"gzip"` (older segments) is still read.
pub const COMPRESSION: &str = "zstd";
/// zstd level 1: the fastest of the regular levels. Segments are written once and read rarely,
/// and the archive must keep up with the stream, so speed wins over the last few percent.
const ZSTD_LEVEL: i32 = 1;
/// zstd's first "fast" level (`--fast=1`): no entropy coding of literals, about twice level
/// 1's speed. Used for a segment when level 1 buys almost nothing over it (payloads that are
/// already compressed or encrypted): the same bytes stored, half the CPU.
const ZSTD_FAST_LEVEL: i32 = -1;
/// How much of a segment is compressed at both levels to choose between them.
const LEVEL_SAMPLE_BYTES: usize = 64 << 10;

/// The level for these records: [`ZSTD_LEVEL`], unless on a sample it saves less than 2% of
/// the sample over [`ZSTD_FAST_LEVEL`].
fn zstd_level(raw: &[u8]) -> i32 {
    let sample = &raw[..raw.len().min(LEVEL_SAMPLE_BYTES)];
    let size = |level| zstd::bulk::compress(sample, level).map(|c| c.len()).unwrap_or(usize::MAX);
    let (regular, fast) = (size(ZSTD_LEVEL), size(ZSTD_FAST_LEVEL));
    if fast.saturating_sub(regular) < sample.len() / 50 { ZSTD_FAST_LEVEL } else { ZSTD_LEVEL }
}

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

    /// Compresses the segment and describes it in its manifest (unsigned: the archiver seals
    /// it). `prev_last_seq` is the archive position this segment follows: sequences between
    /// it and `first` were not in the stream when it was read (deleted before archiving).
    ///
    /// One SHA-256 pass, over the compressed bytes: the signed manifest authenticates them,
    /// and decompressing authenticated bytes is deterministic, so a hash of the decompressed
    /// records (format 1's `raw_sha256`) would add CPU and no assurance.
    pub fn finish(self, stream: &str, prefix: &str, epoch: u64, prev_last_seq: u64) -> (Bytes, Manifest) {
        // Compressing from memory into memory fails only on allocation failure.
        let compressed = zstd::bulk::compress(&self.raw, zstd_level(&self.raw)).expect("zstd into memory");
        let manifest = Manifest {
            format: MANIFEST_FORMAT.to_string(),
            stream: stream.to_string(),
            first_seq: self.first,
            last_seq: self.last,
            count: self.count,
            first_time_nanos: self.first_time_nanos,
            last_time_nanos: self.last_time_nanos,
            segment_key: segment_key(prefix, stream, epoch, self.first, self.last),
            segment_bytes: compressed.len() as u64,
            segment_sha256: hex(&Sha256::digest(&compressed)),
            raw_bytes: self.raw.len() as u64,
            raw_sha256: None,
            compression: COMPRESSION.to_string(),
            epoch,
            prev_last_seq: Some(prev_last_seq),
            key_id: None,
            mac: None,
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

/// Checks a segment against its manifest (size, SHA-256 of the compressed bytes, and of the
/// decompressed ones where a format 1 manifest records it; magic, record count, first/last
/// sequence) and decodes its records.
pub fn decode_segment(manifest: &Manifest, compressed: &[u8]) -> Result<Vec<Record>, FormatError> {
    let key = manifest.segment_key.clone();
    let corrupt = |message: String| FormatError::Corrupt { key: key.clone(), message };
    check_stored(manifest, compressed)?;
    if manifest.raw_bytes > MAX_RAW_SEGMENT_BYTES {
        return Err(corrupt(format!(
            "the manifest claims {} decompressed bytes, more than the {MAX_RAW_SEGMENT_BYTES} accepted",
            manifest.raw_bytes
        )));
    }
    // Decompression stops one byte past the manifest's size: more is an error, never memory.
    let limit = manifest.raw_bytes + 1;
    let mut raw = Vec::with_capacity((manifest.raw_bytes as usize).min(256 << 20));
    match manifest.compression.as_str() {
        "zstd" => zstd::stream::read::Decoder::new(compressed)
            .and_then(|d| d.take(limit).read_to_end(&mut raw))
            .map_err(|e| corrupt(format!("zstd: {e}")))?,
        "gzip" => flate2::read::GzDecoder::new(compressed)
            .take(limit)
            .read_to_end(&mut raw)
            .map_err(|e| corrupt(format!("gzip: {e}")))?,
        other => return Err(corrupt(format!("unknown compression {other:?}"))),
    };
    if raw.len() as u64 != manifest.raw_bytes {
        return Err(corrupt(format!(
            "decompresses to {}{} bytes, the manifest says {}",
            if raw.len() as u64 == limit { "more than " } else { "" },
            raw.len().min(manifest.raw_bytes as usize),
            manifest.raw_bytes
        )));
    }
    if let Some(raw_sha256) = &manifest.raw_sha256
        && hex(&Sha256::digest(&raw)) != *raw_sha256
    {
        return Err(corrupt("sha256 of the decompressed records differs from the manifest".into()));
    }
    if raw.len() < 8 || &raw[..8] != SEGMENT_MAGIC {
        return Err(corrupt("not a cim segment (bad magic)".into()));
    }
    // Payloads are slices of the decompressed buffer: no copy per record.
    let raw = Bytes::from(raw);
    // A record takes at least 28 bytes (sequence, time, three lengths): the capacity never
    // exceeds what the buffer can hold, whatever the manifest claims.
    let mut records = Vec::with_capacity(manifest.count.min(raw.len() as u64 / 28) as usize);
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
        let start = at;
        take(&mut at, n)?;
        let payload = raw.slice(start..at);
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
    /// SHA-256 of the decompressed records: in format 1 manifests only (and checked there);
    /// format 2 authenticates the compressed bytes alone (see [`SegmentWriter::finish`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_sha256: Option<String>,
    pub compression: String,
    /// Which history of the stream this is: a stream recreated or renumbered under the same
    /// name is archived as a new epoch (`streams/<STREAM>/epochs/<N>/`), never mixed in.
    #[serde(default)]
    pub epoch: u64,
    /// The archive position this segment follows (absent in archives written before it was
    /// recorded): sequences `prev_last_seq + 1 .. first_seq - 1` had been deleted from the
    /// stream before they could be archived. Together with the gaps inside segments, this
    /// makes every missing sequence accounted for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_last_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl Sealed for Manifest {
    fn seal_fields(&self) -> (Option<&str>, Option<&str>) {
        (self.key_id.as_deref(), self.mac.as_deref())
    }
    fn set_seal(&mut self, key_id: Option<String>, mac: Option<String>) {
        self.key_id = key_id;
        self.mac = mac;
    }
}

impl Manifest {
    pub fn parse(key: &str, body: &[u8]) -> Result<Manifest, FormatError> {
        let m: Manifest = serde_json::from_slice(body)
            .map_err(|e| FormatError::BadManifest { key: key.to_string(), message: format!("{e}") })?;
        if m.format != MANIFEST_FORMAT && m.format != MANIFEST_FORMAT_V1 {
            return Err(FormatError::BadManifest {
                key: key.to_string(),
                message: format!("unknown format {:?}", m.format),
            });
        }
        if m.format == MANIFEST_FORMAT_V1 && m.raw_sha256.is_none() {
            return Err(FormatError::BadManifest {
                key: key.to_string(),
                message: format!("a {MANIFEST_FORMAT_V1} manifest without raw_sha256"),
            });
        }
        // `count - 1 > last - first`, not `count > last - first + 1`: a range of every sequence
        // (0..=u64::MAX) must not overflow.
        if m.first_seq > m.last_seq || m.count == 0 || m.count - 1 > m.last_seq - m.first_seq {
            return Err(FormatError::BadManifest {
                key: key.to_string(),
                message: format!("inconsistent range {}..{} with {} records", m.first_seq, m.last_seq, m.count),
            });
        }
        if m.prev_last_seq.is_some_and(|p| p >= m.first_seq) {
            return Err(FormatError::BadManifest {
                key: key.to_string(),
                message: format!("follows sequence {:?}, not before its first {}", m.prev_last_seq, m.first_seq),
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
    /// The epoch being archived (see [`Manifest::epoch`]).
    #[serde(default)]
    pub epoch: u64,
    /// When the archived stream was created (nanoseconds since the epoch, as JetStream reports
    /// it), and the SHA-256 of the subject and payload of the record at `last_seq`: together,
    /// the stream's identity. The archiver compares them with the stream before resuming.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_created_nanos: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl Sealed for Cursor {
    fn seal_fields(&self) -> (Option<&str>, Option<&str>) {
        (self.key_id.as_deref(), self.mac.as_deref())
    }
    fn set_seal(&mut self, key_id: Option<String>, mac: Option<String>) {
        self.key_id = key_id;
        self.mac = mac;
    }
}

/// The digest of a record recorded in a cursor: SHA-256 over the subject, a zero byte, and
/// the payload.
pub fn record_digest(subject: &str, payload: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(subject.as_bytes());
    h.update([0u8]);
    h.update(payload);
    hex(&h.finalize())
}

/// Sequences removed from the stream after they were archived (a purge, a delete, an object
/// store's purge of an upload's metadata), recorded so that a restore reproduces the stream's
/// visible state and resurrects nothing. Sealed like manifests.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Deletions {
    pub format: String,
    pub stream: String,
    pub epoch: u64,
    /// When the deletions were seen (nanoseconds since the epoch, UTC): a point-in-time
    /// restore applies only those seen at or before its time.
    pub seen_unix_nanos: i64,
    /// The stream's last sequence when they were seen: they happened before the stream went
    /// past it, so a restore `--until` a sequence applies only those with `through` below it
    /// (one seen while the stream still ended at that sequence may have come after it, and is
    /// not applied: data is kept).
    pub through: u64,
    /// Inclusive ranges of sequences, ascending, each at or below the archive position.
    pub ranges: Vec<(u64, u64)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl Sealed for Deletions {
    fn seal_fields(&self) -> (Option<&str>, Option<&str>) {
        (self.key_id.as_deref(), self.mac.as_deref())
    }
    fn set_seal(&mut self, key_id: Option<String>, mac: Option<String>) {
        self.key_id = key_id;
        self.mac = mac;
    }
}

/// Collapses ascending sequences into inclusive ranges.
pub fn to_ranges(seqs: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for s in seqs {
        match out.last_mut() {
            Some((_, b)) if *b + 1 == s => *b = s,
            Some((_, b)) if *b >= s => {}
            _ => out.push((s, s)),
        }
    }
    out
}

/// `<prefix>streams/<STREAM>/`
pub fn stream_prefix(prefix: &str, stream: &str) -> String {
    format!("{prefix}streams/{stream}/")
}

/// Where one epoch of a stream is kept: epoch 0 directly under the stream's prefix (the layout
/// of archives written before epochs), epoch N under `epochs/<N>/`.
pub fn epoch_prefix(prefix: &str, stream: &str, epoch: u64) -> String {
    match epoch {
        0 => stream_prefix(prefix, stream),
        n => format!("{}{n:06}/", epochs_prefix(prefix, stream)),
    }
}

/// `<prefix>streams/<STREAM>/epochs/`: listing it names the epochs after the first.
pub fn epochs_prefix(prefix: &str, stream: &str) -> String {
    format!("{}epochs/", stream_prefix(prefix, stream))
}

/// Sequences are zero-padded to 20 digits so keys sort in sequence order.
pub fn segment_key(prefix: &str, stream: &str, epoch: u64, first: u64, last: u64) -> String {
    format!("{}segments/{first:020}-{last:020}.cimseg.zst", epoch_prefix(prefix, stream, epoch))
}

pub fn segments_prefix(prefix: &str, stream: &str, epoch: u64) -> String {
    format!("{}segments/", epoch_prefix(prefix, stream, epoch))
}

pub fn manifest_key(prefix: &str, stream: &str, epoch: u64, first: u64, last: u64) -> String {
    format!("{}manifests/{first:020}-{last:020}.json", epoch_prefix(prefix, stream, epoch))
}

pub fn manifests_prefix(prefix: &str, stream: &str, epoch: u64) -> String {
    format!("{}manifests/", epoch_prefix(prefix, stream, epoch))
}

/// A deletion record: named by the stream's last sequence when it was written and the time,
/// so they list in the order they were written.
pub fn deletions_key(prefix: &str, stream: &str, epoch: u64, through: u64, nanos: i64) -> String {
    format!("{}{through:020}-{nanos:020}.json", deletions_prefix(prefix, stream, epoch))
}

pub fn deletions_prefix(prefix: &str, stream: &str, epoch: u64) -> String {
    format!("{}deletions/", epoch_prefix(prefix, stream, epoch))
}

/// The epoch numbers found under [`epochs_prefix`] in a listing of keys.
pub fn parse_epochs(epochs_prefix: &str, keys: &[String]) -> Vec<u64> {
    let mut out: Vec<u64> =
        keys.iter().filter_map(|k| k.strip_prefix(epochs_prefix)?.split('/').next()?.parse().ok()).collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// `(first, last)` of a segment key, if it is one.
pub fn parse_segment_key(key: &str) -> Option<(u64, u64)> {
    let name = key.rsplit('/').next()?;
    let name = name.strip_suffix(".cimseg.zst").or_else(|| name.strip_suffix(".cimseg.gz"))?;
    let (a, b) = name.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
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

    /// The secret the format 1 fixture's archive key is derived from.
    pub(crate) const FORMAT1_SECRET: &[u8] = b"cim format 1 fixture signing key";

    /// The manifest (JSON) and segment of the format 1 fixture.
    pub(crate) fn format1_fixture() -> (&'static [u8], &'static [u8]) {
        (
            include_bytes!("../tests/fixtures/format1/manifest.json"),
            include_bytes!("../tests/fixtures/format1/segment.cimseg.zst"),
        )
    }

    fn sample() -> (Bytes, Manifest) {
        let mut w = SegmentWriter::new();
        w.push(3, 10, "orders.a", &[("ce-id".into(), "1".into()), ("ce-id".into(), "2".into())], b"hello");
        w.push(5, 11, "orders.b", &[], b"");
        w.finish("S", "p/", 0, 2)
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
    fn format_2_manifests_authenticate_the_compressed_bytes_only() {
        let (bytes, m) = sample();
        assert_eq!(m.format, MANIFEST_FORMAT);
        assert_eq!(m.raw_sha256, None);
        let json = String::from_utf8(serde_json::to_vec_pretty(&m).unwrap()).unwrap();
        assert!(json.contains("\"format\": \"cim-archive-segment/2\"") && !json.contains("raw_sha256"), "{json}");
        assert_eq!(m.segment_sha256, hex(&Sha256::digest(&bytes)));
        // A format 1 manifest must carry the hash of the records it promised.
        let mut v1 = m.clone();
        v1.format = MANIFEST_FORMAT_V1.into();
        let e = Manifest::parse("k", &serde_json::to_vec(&v1).unwrap()).unwrap_err();
        assert!(e.to_string().contains("without raw_sha256"), "{e}");
    }

    /// An archive written by the code before format 2 (`tests/fixtures/format1`, made with
    /// `SegmentWriter::finish` and `ArchiveKey::seal` as they were): its manifest is still
    /// accepted with its signature, its segment decodes, and the hash of its decompressed records
    /// is still checked.
    #[test]
    fn format_1_segments_still_verify_and_decode() {
        let (manifest_json, segment) = format1_fixture();
        let m = Manifest::parse("fixture", manifest_json).unwrap();
        assert_eq!(m.format, MANIFEST_FORMAT_V1);
        let key = crate::ArchiveKey::derive(FORMAT1_SECRET);
        assert_eq!(key.check(&m), Ok(()));
        let records = decode_segment(&m, segment).unwrap();
        assert_eq!(records.len() as u64, m.count);
        assert_eq!((records[0].sequence, records.last().unwrap().sequence), (m.first_seq, m.last_seq));
        // The same segment under a manifest whose record hash is wrong (and so signed by nobody):
        // the decompressed records are still checked against it.
        let mut wrong = m.clone();
        wrong.raw_sha256 = Some(hex(&Sha256::digest(b"other records")));
        assert_ne!(key.check(&wrong), Ok(()));
        let e = decode_segment(&wrong, segment).unwrap_err();
        assert!(e.to_string().contains("sha256 of the decompressed records differs"), "{e}");
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
        let w_raw = w.raw.clone();
        let (_, mut m) = w.finish("S", "p/", 0, 6);
        m.segment_key = m.segment_key.replace(".zst", ".gz");
        m.segment_bytes = compressed.len() as u64;
        m.segment_sha256 = hex(&Sha256::digest(&compressed));
        m.compression = "gzip".into();
        // Written in format 1, which also hashed the decompressed records.
        m.format = MANIFEST_FORMAT_V1.into();
        m.raw_sha256 = Some(hex(&Sha256::digest(&w_raw)));
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
        assert_eq!(parse_manifest_key(&manifest_key("", "S", 0, 1, 20)), Some((1, 20)));
        assert_eq!(parse_manifest_key("x/cursor.json"), None);
        assert_eq!(parse_segment_key(&segment_key("p/", "S", 3, 4, 9)), Some((4, 9)));
        assert_eq!(
            manifest_key("p/", "S", 3, 1, 2),
            "p/streams/S/epochs/000003/manifests/00000000000000000001-00000000000000000002.json"
        );
        let keys =
            vec![manifest_key("p/", "S", 3, 1, 2), segment_key("p/", "S", 12, 1, 2), "p/streams/S/epochs/x".into()];
        assert_eq!(parse_epochs(&epochs_prefix("p/", "S"), &keys), vec![3, 12]);
    }

    #[test]
    fn decompression_is_bounded_by_the_manifest() {
        // A segment whose records decompress to far more than its manifest admits.
        let mut w = SegmentWriter::new();
        w.push(1, 1, "s", &[], &vec![0u8; 1 << 20]);
        let (bytes, mut m) = w.finish("S", "", 0, 0);
        m.raw_bytes = 1000;
        let e = decode_segment(&m, &bytes).unwrap_err().to_string();
        assert!(e.contains("more than 1000"), "{e}");
        m.raw_bytes = MAX_RAW_SEGMENT_BYTES + 1;
        let e = decode_segment(&m, &bytes).unwrap_err().to_string();
        assert!(e.contains("more than the"), "{e}");
    }

    #[test]
    fn the_fast_level_is_chosen_only_where_level_one_buys_nothing() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let random: Vec<u8> = (0..LEVEL_SAMPLE_BYTES)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert_eq!(zstd_level(&random), ZSTD_FAST_LEVEL);
        // Events as JSON with random ids: text whose literals entropy coding halves.
        let json: Vec<u8> = random
            .chunks(16)
            .take(2000)
            .flat_map(|id| {
                let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
                format!("{{\"id\":\"{id}\",\"type\":\"cim.unit.tagged\"}}").into_bytes()
            })
            .collect();
        assert_eq!(zstd_level(&json), ZSTD_LEVEL);
        // Either way the segment decodes.
        for payload in [&random[..], &json[..]] {
            let mut w = SegmentWriter::new();
            w.push(1, 1, "s", &[], payload);
            let (bytes, m) = w.finish("S", "", 0, 0);
            assert_eq!(decode_segment(&m, &bytes).unwrap()[0].payload, payload);
        }
    }

    #[test]
    fn ranges_collapse() {
        assert_eq!(to_ranges([1, 2, 3, 7, 9, 10]), vec![(1, 3), (7, 7), (9, 10)]);
        assert_eq!(to_ranges([]), vec![]);
    }
}
