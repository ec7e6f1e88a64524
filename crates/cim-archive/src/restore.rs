//! Reading an archive back: the catalogue of a target (streams and their manifests), `verify`
//! (every checksum, every gap named), and `restore` into a fresh JetStream, message by
//! message with the original subjects and headers, up to a sequence or a time.

use async_nats::HeaderMap;
use async_nats::jetstream;

use crate::format::{self, FormatError, Manifest, Record};
use crate::s3::{S3Client, S3Error};

/// Something an archive could not give back, named precisely.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(transparent)]
    S3(#[from] S3Error),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("segment {key} is missing (listed by manifest {manifest})")]
    MissingSegment { key: String, manifest: String },
    #[error("stream {stream}: sequences {from}..{to} are not covered by any manifest")]
    Gap { stream: String, from: u64, to: u64 },
    #[error("stream {stream}: manifests {a} and {b} overlap")]
    Overlap { stream: String, a: String, b: String },
    #[error("stream {stream}: {message}")]
    Nats { stream: String, message: String },
    #[error("reading segment {key} failed: {message}")]
    Read { key: String, message: String },
}

/// The streams a target holds, from its `streams/` prefix.
pub async fn archived_stream_names(s3: &S3Client) -> Result<Vec<String>, S3Error> {
    let prefix = format!("{}streams/", s3.target().prefix);
    let mut names: Vec<String> = s3
        .list(&prefix, None)
        .await?
        .into_iter()
        .filter_map(|k| k.strip_prefix(&prefix).and_then(|r| r.split('/').next()).map(str::to_string))
        .collect();
    names.dedup();
    Ok(names)
}

/// The manifests of one stream in sequence order; a manifest that cannot be read or parsed
/// is an error naming it.
pub async fn manifests(s3: &S3Client, stream: &str) -> Result<Vec<(String, Manifest)>, ArchiveError> {
    let keys = s3.list(&format::manifests_prefix(&s3.target().prefix, stream), None).await?;
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        let body = s3
            .get(&key)
            .await?
            .ok_or_else(|| FormatError::BadManifest { key: key.clone(), message: "vanished while listing".into() })?;
        let m = Manifest::parse(&key, &body)?;
        if m.stream != stream {
            return Err(FormatError::BadManifest { key, message: format!("belongs to stream {}", m.stream) }.into());
        }
        out.push((key, m));
    }
    out.sort_by_key(|(_, m)| m.first_seq);
    Ok(out)
}

/// Checks that manifests chain without overlap (gaps between them are reported, since the
/// archive never skips: a gap means a lost segment).
fn check_chain(stream: &str, manifests: &[(String, Manifest)]) -> Vec<ArchiveError> {
    let mut problems = Vec::new();
    for w in manifests.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        if b.1.first_seq <= a.1.last_seq {
            problems.push(ArchiveError::Overlap { stream: stream.into(), a: a.0.clone(), b: b.0.clone() });
        } else if b.1.first_seq > a.1.last_seq + 1 {
            problems.push(ArchiveError::Gap { stream: stream.into(), from: a.1.last_seq + 1, to: b.1.first_seq - 1 });
        }
    }
    problems
}

/// Where a restore stops.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Until {
    All,
    /// Up to and including this stream sequence (per stream).
    Sequence(u64),
    /// Messages stored at or before this time (nanoseconds since the epoch, UTC).
    Time(i128),
}

impl Until {
    fn admits(&self, r: &Record) -> bool {
        match *self {
            Until::All => true,
            Until::Sequence(s) => r.sequence <= s,
            Until::Time(t) => (r.time_nanos as i128) <= t,
        }
    }
    fn past(&self, m: &Manifest) -> bool {
        match *self {
            Until::All => false,
            Until::Sequence(s) => m.first_seq > s,
            Until::Time(t) => (m.first_time_nanos as i128) > t,
        }
    }
}

/// What verify or restore found for one stream.
#[derive(Debug, Default)]
pub struct StreamReport {
    pub stream: String,
    pub segments: u64,
    pub messages: u64,
    pub bytes: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub problems: Vec<String>,
}

/// Re-reads every segment of `stream` and checks every checksum and the chain.
pub async fn verify_stream(s3: &S3Client, stream: &str) -> StreamReport {
    let mut report = StreamReport { stream: stream.to_string(), ..Default::default() };
    let ms = match manifests(s3, stream).await {
        Ok(m) => m,
        Err(e) => {
            report.problems.push(e.to_string());
            return report;
        }
    };
    report.problems.extend(check_chain(stream, &ms).into_iter().map(|e| e.to_string()));
    for (key, m) in &ms {
        match read_segment(s3, key, m).await {
            Ok(records) => {
                report.segments += 1;
                report.messages += records.len() as u64;
                report.bytes += m.segment_bytes;
                if report.first_seq == 0 {
                    report.first_seq = m.first_seq;
                }
                report.last_seq = m.last_seq;
            }
            Err(e) => report.problems.push(e.to_string()),
        }
    }
    report
}

/// What verify found among the copies by name of one object bucket.
#[derive(Debug, Default)]
pub struct ObjectsReport {
    pub bucket: String,
    /// Copies whose name is a CID and whose bytes hash to it.
    pub verified: u64,
    pub bytes: u64,
    /// Copies whose name is not a CID (e.g. plugin modules): their bytes are checked through
    /// the bucket's archived stream, not by name.
    pub not_by_cid: u64,
    pub problems: Vec<String>,
}

/// Re-reads every copy by name of `bucket` on the target (`objects/<bucket>/<name>`) and
/// checks each one named by a CID against that CID (streamed: memory stays bounded).
pub async fn verify_objects(s3: &S3Client, bucket: &str) -> ObjectsReport {
    let mut report = ObjectsReport { bucket: bucket.to_string(), ..Default::default() };
    let prefix = format::object_key(&s3.target().prefix, bucket, "");
    let keys = match s3.list(&prefix, None).await {
        Ok(k) => k,
        Err(e) => {
            report.problems.push(format!("listing {prefix}: {e}"));
            return report;
        }
    };
    for key in keys {
        let name = key.strip_prefix(&prefix).unwrap_or(&key);
        let Ok(cid) = name.parse::<cim_events::Cid>() else {
            report.not_by_cid += 1;
            continue;
        };
        match s3.get_sha256(&key).await {
            Ok(Some((size, digest))) => {
                let actual = cim_events::Cid::from_sha256(digest);
                if actual == cid {
                    report.verified += 1;
                    report.bytes += size;
                } else {
                    report
                        .problems
                        .push(format!("object {key}: its bytes hash to {actual}, not to the CID it is named by"));
                }
            }
            Ok(None) => report.problems.push(format!("object {key} vanished while listing")),
            Err(e) => report.problems.push(format!("object {key}: {e}")),
        }
    }
    report
}

async fn read_segment(s3: &S3Client, manifest_key: &str, m: &Manifest) -> Result<Vec<Record>, ArchiveError> {
    let body = s3.get(&m.segment_key).await?.ok_or_else(|| ArchiveError::MissingSegment {
        key: m.segment_key.clone(),
        manifest: manifest_key.to_string(),
    })?;
    // zstd and two SHA-256 passes: off the async worker threads.
    let m = m.clone();
    let key = m.segment_key.clone();
    tokio::task::spawn_blocking(move || format::decode_segment(&m, &body))
        .await
        .map_err(|e| ArchiveError::Read { key, message: e.to_string() })?
        .map_err(ArchiveError::from)
}

/// A segment being read (fetched, decompressed and checked) in the background; dropped, it
/// stops the read.
struct Prefetch(tokio::task::JoinHandle<Result<Vec<Record>, ArchiveError>>);

impl Prefetch {
    fn start(s3: &S3Client, manifest_key: &str, m: &Manifest) -> Prefetch {
        let (s3, manifest_key, m) = (s3.clone(), manifest_key.to_string(), m.clone());
        Prefetch(tokio::spawn(async move { read_segment(&s3, &manifest_key, &m).await }))
    }

    async fn records(mut self, key: &str) -> Result<Vec<Record>, ArchiveError> {
        match (&mut self.0).await {
            Ok(r) => r,
            Err(e) => Err(ArchiveError::Read { key: key.to_string(), message: e.to_string() }),
        }
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Restores `stream` from the archive into `js`, where the stream must already exist
/// (created by provisioning or by the caller) and be empty. Messages are published in
/// order with their original subject, headers and payload; a corrupt or missing segment
/// stops this stream there (nothing after a hole is restored, so order is never broken)
/// and is reported. With `dry_run`, everything is read and checked but nothing published.
pub async fn restore_stream(
    s3: &S3Client,
    js: &jetstream::Context,
    stream: &str,
    until: Until,
    dry_run: bool,
    progress: &(dyn Fn(&str, u64) + Sync),
) -> StreamReport {
    let mut report = StreamReport { stream: stream.to_string(), ..Default::default() };
    let ms = match manifests(s3, stream).await {
        Ok(m) => m,
        Err(e) => {
            report.problems.push(e.to_string());
            return report;
        }
    };
    let chain = check_chain(stream, &ms);
    if let Some(first) = chain.into_iter().next() {
        // An overlap or gap: restore up to it only.
        report.problems.push(format!("{first}; restored up to it"));
    }
    let mut expected_next: Option<u64> = None;
    let mut pending = std::collections::VecDeque::new();
    // The next segment is read while this one is published.
    let mut next_read: Option<Prefetch> = None;
    let report = 'restore: {
        for (i, (key, m)) in ms.iter().enumerate() {
            if until.past(m) {
                break;
            }
            if let Some(n) = expected_next
                && m.first_seq != n
            {
                break;
            }
            let read = next_read.take().unwrap_or_else(|| Prefetch::start(s3, key, m));
            if let Some((next_key, next)) = ms.get(i + 1)
                && !until.past(next)
            {
                next_read = Some(Prefetch::start(s3, next_key, next));
            }
            let records = match read.records(&m.segment_key).await {
                Ok(r) => r,
                Err(e) => {
                    report.problems.push(format!("{e}; messages from sequence {} on were not restored", m.first_seq));
                    break 'restore report;
                }
            };
            report.segments += 1;
            report.bytes += m.segment_bytes;
            for r in records {
                if !until.admits(&r) {
                    break 'restore report;
                }
                if !dry_run {
                    let mut headers = HeaderMap::new();
                    // Publish-time preconditions (Nats-Expected-*) are not data: they referred to
                    // the original stream's state and are dropped.
                    for (k, v) in r.headers.iter().filter(|(k, _)| !k.starts_with("Nats-Expected-")) {
                        headers.append(k.as_str(), v.as_str());
                    }
                    // De-duplication by Nats-Msg-Id would drop messages published again with the
                    // same id; the archive holds only what the stream kept, so every message goes in.
                    // Acks are awaited in windows: one connection keeps the order.
                    match js.publish_with_headers(r.subject.clone(), headers, r.payload.clone()).await {
                        Ok(ack) => pending.push_back((r.sequence, ack)),
                        Err(e) => {
                            report
                                .problems
                                .push(format!("sequence {}: publish failed: {e}; stopped there", r.sequence));
                            break 'restore report;
                        }
                    }
                    if pending.len() >= ACK_WINDOW
                        && let Err(p) = drain_acks(&mut pending, ACK_WINDOW / 2).await
                    {
                        report.problems.push(p);
                        break 'restore report;
                    }
                }
                if report.messages == 0 {
                    report.first_seq = r.sequence;
                }
                report.messages += 1;
                report.last_seq = r.sequence;
                if report.messages.is_multiple_of(1000) {
                    progress(stream, report.messages);
                }
            }
            expected_next = Some(m.last_seq + 1);
        }
        break 'restore report;
    };
    let mut report = report;
    if let Err(p) = drain_acks(&mut pending, 0).await {
        report.problems.push(p);
    }
    progress(stream, report.messages);
    report
}

const ACK_WINDOW: usize = 512;

/// Awaits acks until at most `keep` are outstanding; the first failure names its sequence.
async fn drain_acks(
    pending: &mut std::collections::VecDeque<(u64, jetstream::context::PublishAckFuture)>,
    keep: usize,
) -> Result<(), String> {
    while pending.len() > keep {
        let (seq, ack) = pending.pop_front().expect("non-empty");
        if let Err(e) = ack.await {
            pending.clear();
            return Err(format!("sequence {seq}: publish failed: {e}; messages after it may be missing"));
        }
    }
    Ok(())
}
