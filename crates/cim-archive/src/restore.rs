//! Reading an archive back: the catalogue of a target (streams and their manifests), `verify`
//! (every checksum, every gap named), and `restore` into a fresh JetStream, message by
//! message with the original subjects and headers, up to a sequence or a time.

use async_nats::HeaderMap;
use async_nats::jetstream;

use crate::format::{self, Deletions, FormatError, Manifest, Record};
use crate::s3::{S3Client, S3Error};
use crate::seal::{ArchiveKey, SealError, Sealed};

/// Something an archive could not give back, named precisely.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(transparent)]
    S3(#[from] S3Error),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(transparent)]
    Target(#[from] crate::TargetError),
    #[error("segment {key} is missing (listed by manifest {manifest})")]
    MissingSegment { key: String, manifest: String },
    #[error("stream {stream}: sequences {from}..{to} are missing from the archive ({why})")]
    Gap { stream: String, from: u64, to: u64, why: String },
    #[error("stream {stream}: manifests {a} and {b} overlap")]
    Overlap { stream: String, a: String, b: String },
    #[error("stream {stream}: {message}")]
    Nats { stream: String, message: String },
    #[error("reading segment {key} failed: {message}")]
    Read { key: String, message: String },
}

/// `_INBOX.cim-restore`: the inbox prefix of `cimctl restore`'s NATS connection. Its restore
/// identity may receive replies only below it (`cimctl deploy nats-permissions`: `restore`).
pub fn inbox_prefix() -> String {
    let all = cim_events::subject::all_inboxes();
    format!("{}.cim-restore", all.trim_end_matches(".>"))
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

/// How archive objects are authenticated when read back.
#[derive(Clone, Debug)]
pub struct Trust {
    pub key: ArchiveKey,
    /// Accept unsigned manifests and deletion records (archives written before they were
    /// signed). Objects signed with another key, or altered, are refused regardless.
    pub allow_unsigned: bool,
}

impl Trust {
    pub fn new(key: ArchiveKey) -> Trust {
        Trust { key, allow_unsigned: false }
    }

    fn check<T: Sealed + Clone>(&self, what: &str, value: &T) -> Result<(), String> {
        match self.key.check(value) {
            Ok(()) => Ok(()),
            Err(SealError::Unsigned) if self.allow_unsigned => Ok(()),
            Err(e) => Err(format!("{what}: {e}")),
        }
    }
}

/// Manifests read at the same time.
const MANIFEST_READS: usize = 16;

/// The manifests of one epoch of a stream in sequence order, each read, parsed and its
/// signature checked. A manifest that fails is named in the problems and left out; the others
/// are still returned, so one broken manifest never hides the rest of the archive.
pub async fn manifests(
    s3: &S3Client,
    trust: &Trust,
    stream: &str,
    epoch: u64,
) -> Result<(Vec<(String, Manifest)>, Vec<String>), S3Error> {
    let keys = s3.list(&format::manifests_prefix(&s3.target().prefix, stream, epoch), None).await?;
    let mut out = Vec::with_capacity(keys.len());
    let mut problems = Vec::new();
    // Read MANIFEST_READS at a time: one round trip each, not one after the other.
    let mut bodies = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(MANIFEST_READS) {
        let reads: Vec<_> = chunk
            .iter()
            .map(|k| {
                let (s3, k) = (s3.clone(), k.clone());
                tokio::spawn(async move { s3.get(&k).await })
            })
            .collect();
        for (key, read) in chunk.iter().zip(reads) {
            let body = read.await.map_err(|e| S3Error::Invalid {
                target: s3.target().name.clone(),
                message: format!("reading manifest {key}: {e}"),
            })??;
            bodies.push((key.clone(), body));
        }
    }
    for (key, body) in bodies {
        let Some(body) = body else {
            problems.push(format!("manifest {key} vanished while listing"));
            continue;
        };
        let m = match Manifest::parse(&key, &body) {
            Ok(m) => m,
            Err(e) => {
                problems.push(e.to_string());
                continue;
            }
        };
        if m.stream != stream || m.epoch != epoch {
            problems.push(format!("manifest {key}: belongs to stream {} epoch {}", m.stream, m.epoch));
            continue;
        }
        if let Err(e) = trust.check(&format!("manifest {key}"), &m) {
            problems.push(e);
            continue;
        }
        if format::parse_manifest_key(&key) != Some((m.first_seq, m.last_seq))
            || m.segment_key != format::segment_key(&s3.target().prefix, stream, epoch, m.first_seq, m.last_seq)
        {
            problems.push(format!("manifest {key}: its key or segment key does not match its range"));
            continue;
        }
        out.push((key, m));
    }
    out.sort_by_key(|(_, m)| m.first_seq);
    Ok((out, problems))
}

/// Checks that manifests chain: no overlap, and no sequence unaccounted for. A manifest names
/// the position it follows (`prev_last_seq`), so a gap the stream itself had (messages deleted
/// before they were archived) is told apart from a lost manifest.
fn check_chain(stream: &str, manifests: &[(String, Manifest)]) -> Vec<ArchiveError> {
    let mut problems = Vec::new();
    if let Some((key, m)) = manifests.first()
        && m.prev_last_seq.is_some_and(|p| p > 0)
    {
        problems.push(ArchiveError::Gap {
            stream: stream.into(),
            from: 1,
            to: m.prev_last_seq.unwrap_or(0),
            why: format!("the first manifest present ({key}) follows sequence {}", m.prev_last_seq.unwrap_or(0)),
        });
    }
    for w in manifests.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        if b.1.first_seq <= a.1.last_seq {
            problems.push(ArchiveError::Overlap { stream: stream.into(), a: a.0.clone(), b: b.0.clone() });
        } else if let Some(prev) = b.1.prev_last_seq {
            if prev != a.1.last_seq {
                problems.push(ArchiveError::Gap {
                    stream: stream.into(),
                    from: a.1.last_seq + 1,
                    to: prev,
                    why: format!("manifest {} follows sequence {prev}", b.0),
                });
            }
        } else if b.1.first_seq > a.1.last_seq + 1 {
            problems.push(ArchiveError::Gap {
                stream: stream.into(),
                from: a.1.last_seq + 1,
                to: b.1.first_seq - 1,
                why: "no manifest covers them".into(),
            });
        }
    }
    problems
}

/// The deletion records of one epoch of a stream: each read, parsed and checked; a bad one
/// is named in the problems.
pub async fn deletions(
    s3: &S3Client,
    trust: &Trust,
    stream: &str,
    epoch: u64,
) -> Result<(Vec<Deletions>, Vec<String>), S3Error> {
    let keys = s3.list(&format::deletions_prefix(&s3.target().prefix, stream, epoch), None).await?;
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for key in keys {
        let Some(body) = s3.get(&key).await? else { continue };
        let d: Deletions = match serde_json::from_slice(&body) {
            Ok(d) => d,
            Err(e) => {
                problems.push(format!("deletion record {key}: {e}"));
                continue;
            }
        };
        if d.format != format::DELETIONS_FORMAT || d.stream != stream || d.epoch != epoch {
            problems.push(format!("deletion record {key}: not a deletion record of {stream} epoch {epoch}"));
            continue;
        }
        if let Err(e) = trust.check(&format!("deletion record {key}"), &d) {
            problems.push(e);
            continue;
        }
        out.push(d);
    }
    Ok((out, problems))
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
    pub epoch: u64,
    /// Sequences recorded as deleted after they were archived.
    pub deletions: u64,
    /// Restore: archived messages that were deleted in the stream (restored, then deleted).
    pub deleted_seen: u64,
    /// Restore: sequences deleted again (deleted messages and placeholders for gaps).
    pub deleted: u64,
    pub segments: u64,
    pub messages: u64,
    pub bytes: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub problems: Vec<String>,
}

/// Re-reads every epoch of `stream`: every manifest's signature, the chain of manifests,
/// the cursor against the newest manifest, every segment present against the manifests (a
/// segment past the newest manifest means a manifest is missing), every segment's checksums,
/// and every deletion record's signature. One report per epoch; nothing is skipped because
/// something else was broken.
pub async fn verify_stream(s3: &S3Client, trust: &Trust, stream: &str) -> Vec<StreamReport> {
    let position = crate::catalog::committed_position(s3, &trust.key, stream).await;
    let epochs = match crate::catalog::epochs(s3, stream).await {
        Ok(e) => e,
        Err(e) => {
            let mut report = StreamReport { stream: stream.to_string(), ..Default::default() };
            report.problems.push(e.to_string());
            return vec![report];
        }
    };
    let mut reports = Vec::new();
    for epoch in epochs {
        let mut report = StreamReport { stream: stream.to_string(), epoch, ..Default::default() };
        let (ms, problems) = match manifests(s3, trust, stream, epoch).await {
            Ok(m) => m,
            Err(e) => {
                report.problems.push(e.to_string());
                reports.push(report);
                continue;
            }
        };
        report.problems.extend(problems);
        if epoch > 0 && ms.is_empty() && report.problems.is_empty() {
            continue;
        }
        report.problems.extend(check_chain(stream, &ms).into_iter().map(|e| e.to_string()));
        let newest = ms.last().map(|(_, m)| m.last_seq).unwrap_or(0);
        match &position {
            Ok(p) => {
                if let Some(c) = &p.cursor_problem {
                    report.problems.push(c.clone());
                }
                if let Some(c) = p.cursor.as_ref().filter(|c| c.epoch == epoch) {
                    if c.last_seq > newest {
                        report.problems.push(format!(
                            "the cursor says sequences up to {} are archived, but the manifests present end at {newest}: the newest manifests are missing",
                            c.last_seq
                        ));
                    } else if !ms.iter().any(|(k, _)| *k == c.manifest_key) {
                        report.problems.push(format!("the cursor names manifest {}, which is missing", c.manifest_key));
                    }
                }
            }
            Err(e) => report.problems.push(format!("reading the cursor: {e}")),
        }
        match s3.list(&format::segments_prefix(&s3.target().prefix, stream, epoch), None).await {
            Ok(keys) => {
                for key in keys {
                    if let Some((_, last)) = format::parse_segment_key(&key)
                        && last > newest
                    {
                        report.problems.push(format!(
                            "segment {key} has no manifest (its manifest is missing, or its upload is still in progress)"
                        ));
                    }
                }
            }
            Err(e) => report.problems.push(format!("listing segments: {e}")),
        }
        match deletions(s3, trust, stream, epoch).await {
            Ok((d, problems)) => {
                report.deletions = d.iter().map(|d| d.ranges.iter().map(|(a, b)| b - a + 1).sum::<u64>()).sum();
                report.problems.extend(problems);
            }
            Err(e) => report.problems.push(format!("listing deletion records: {e}")),
        }
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
        reports.push(report);
    }
    reports
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

/// How a restore runs.
pub struct RestoreOptions<'a> {
    pub trust: &'a Trust,
    pub until: Until,
    /// Read and check everything, publish nothing.
    pub dry_run: bool,
    /// The epoch to restore; by default the one being archived (the stream's current history).
    pub epoch: Option<u64>,
    pub progress: &'a (dyn Fn(&str, u64) + Sync),
}

/// The header restore puts on the placeholder messages that take the sequence numbers of
/// messages deleted before they were archived; every placeholder is deleted again before
/// the restore ends.
pub const FILLER_HEADER: &str = "Cim-Restore-Filler";

/// The duplicate window of a stream while it is being restored: short, so that messages the
/// original stream stored with the same `Nats-Msg-Id` (more than its window apart) are all
/// stored again. Restore waits this long before publishing an id again.
const RESTORE_DUPLICATE_WINDOW: std::time::Duration = std::time::Duration::from_millis(100);

/// Whether a header of an archived message is published again: publish-time preconditions
/// (`Nats-Expected-*`) and instructions to the server (`Nats-Rollup`, which would purge other
/// messages) are not data and are dropped; so is anything naming the JetStream API.
fn keeps_header(name: &str) -> bool {
    !(name.starts_with("Nats-Expected-") || name.eq_ignore_ascii_case("Nats-Rollup") || name.starts_with("$JS"))
}

/// NATS subject matching: `*` matches one token, `>` the rest.
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Inclusive sequence ranges, ascending, asked in ascending order.
struct RangeSet {
    ranges: Vec<(u64, u64)>,
    at: usize,
}

impl RangeSet {
    fn new(mut ranges: Vec<(u64, u64)>) -> RangeSet {
        ranges.sort_unstable();
        RangeSet { ranges, at: 0 }
    }
    /// Whether `seq` is in the set; calls must not go backwards.
    fn contains(&mut self, seq: u64) -> bool {
        while self.at < self.ranges.len() && self.ranges[self.at].1 < seq {
            self.at += 1;
        }
        self.ranges.get(self.at).is_some_and(|(a, _)| *a <= seq)
    }
}

/// Restores epoch `opts.epoch` of the archived stream `stream` into the stream `into` (the
/// same name, or the leaf's stream for the cluster's mirror of it), which must exist and be
/// empty. The result is the original stream, message for message: every message at its
/// original sequence with its subject, headers and payload; messages that had been deleted
/// (before archiving, or after: the deletion records) are deleted again, so nothing purged
/// comes back and no sequence moves. Every record's subject must be one of `into`'s subjects.
/// A corrupt or missing segment stops this stream there (nothing after a hole is restored, so
/// order is never broken) and is reported. Times are the restore's own: JetStream sets them.
pub async fn restore_stream(
    s3: &S3Client,
    js: &jetstream::Context,
    stream: &str,
    into: &str,
    opts: &RestoreOptions<'_>,
) -> StreamReport {
    let mut report = StreamReport { stream: stream.to_string(), ..Default::default() };
    let position = match crate::catalog::committed_position(s3, &opts.trust.key, stream).await {
        Ok(p) => p,
        Err(e) => {
            report.problems.push(e.to_string());
            return report;
        }
    };
    if let Some(p) = &position.cursor_problem {
        report.problems.push(p.clone());
    }
    let epoch = opts.epoch.unwrap_or(position.epoch);
    report.epoch = epoch;
    let ms = match manifests(s3, opts.trust, stream, epoch).await {
        Ok((m, problems)) => {
            report.problems.extend(problems);
            m
        }
        Err(e) => {
            report.problems.push(e.to_string());
            return report;
        }
    };
    if let Some(first) = check_chain(stream, &ms).into_iter().next() {
        // An overlap or a gap: restore up to it only.
        report.problems.push(format!("{first}; restored up to it"));
    }
    let newest = ms.last().map(|(_, m)| m.last_seq).unwrap_or(0);
    if let Some(c) = position.cursor.as_ref().filter(|c| c.epoch == epoch && c.last_seq > newest) {
        report.problems.push(format!(
            "the cursor says sequences up to {} are archived, but the manifests present end at {newest}: the newest manifests are missing",
            c.last_seq
        ));
    }
    // The first segment is fetched and checked while the deletions are read and the stream
    // is prepared.
    let first_read = ms.first().filter(|(_, m)| !opts.until.past(m)).map(|(k, m)| Prefetch::start(s3, k, m));
    let deleted = match deletions(s3, opts.trust, stream, epoch).await {
        Ok((d, problems)) => {
            report.problems.extend(problems);
            let applies = |d: &Deletions| match opts.until {
                Until::All => true,
                // Seen while the stream ended at `s` may have come after `s`: kept (data wins).
                Until::Sequence(s) => d.through < s,
                Until::Time(t) => (d.seen_unix_nanos as i128) <= t,
            };
            d.into_iter().filter(applies).flat_map(|d| d.ranges).collect()
        }
        Err(e) => {
            report.problems.push(e.to_string());
            return report;
        }
    };
    let mut deleted = RangeSet::new(deleted);
    let mut target = None;
    if !opts.dry_run {
        match Target::open(js, into).await {
            Ok(t) => target = Some(t),
            Err(e) => {
                report.problems.push(e);
                return report;
            }
        }
    }
    let outcome = publish_all(s3, stream, &ms, opts, first_read, &mut deleted, target.as_mut(), &mut report).await;
    if let Err(p) = outcome {
        report.problems.push(p);
    }
    if let Some(t) = target
        && let Err(p) = t.finish(&mut report).await
    {
        report.problems.push(p);
    }
    (opts.progress)(stream, report.messages);
    report
}

/// The stream being restored into.
struct Target {
    stream: jetstream::stream::Stream,
    js: jetstream::Context,
    subjects: Vec<String>,
    /// The duplicate window to put back.
    window: std::time::Duration,
    /// The next sequence the stream assigns.
    next: u64,
    pending: std::collections::VecDeque<(u64, jetstream::context::PublishAckFuture)>,
    /// Sequences to delete once everything is stored: placeholders and deleted messages.
    delete: Vec<u64>,
    /// `Nats-Msg-Id`s published within the last window, by a hash of the id (no copy of each
    /// id; two ids with the same hash only cost a wait), and when.
    recent_ids: std::collections::HashMap<u64, std::time::Instant>,
    id_hasher: std::collections::hash_map::RandomState,
}

impl Target {
    async fn open(js: &jetstream::Context, into: &str) -> Result<Target, String> {
        let stream = js.get_stream(into).await.map_err(|e| format!("stream {into}: {e}"))?;
        let info = stream.get_info().await.map_err(|e| format!("stream {into}: {e}"))?;
        if info.state.messages > 0 || info.state.last_sequence > 0 {
            return Err(format!(
                "stream {into} is not empty (last sequence {}): restore needs a fresh stream",
                info.state.last_sequence
            ));
        }
        let mut config = info.config.clone();
        let window = config.duplicate_window;
        config.duplicate_window = RESTORE_DUPLICATE_WINDOW;
        js.update_stream(&config).await.map_err(|e| format!("stream {into}: shortening its duplicate window: {e}"))?;
        Ok(Target {
            stream,
            js: js.clone(),
            subjects: info.config.subjects.clone(),
            window,
            next: 1,
            pending: Default::default(),
            delete: Vec::new(),
            recent_ids: Default::default(),
            id_hasher: Default::default(),
        })
    }

    /// Moves an empty stream's first sequence to `first`, so the first record keeps its
    /// sequence without placeholders. Falls back to placeholders if the server does not.
    async fn start_at(&mut self, first: u64) {
        if first <= 1 || self.next != 1 {
            return;
        }
        if self.stream.purge().sequence(first).await.is_ok()
            && let Ok(info) = self.stream.get_info().await
            && info.state.last_sequence == first - 1
        {
            self.next = first;
        }
    }

    /// Publishes one message (`id`: its `Nats-Msg-Id`, if it has one) and checks the acks
    /// that fall out of the window.
    async fn publish(
        &mut self,
        seq: u64,
        subject: &str,
        headers: HeaderMap,
        id: Option<&str>,
        payload: bytes::Bytes,
    ) -> Result<(), String> {
        if let Some(id) = id {
            let id = {
                use std::hash::BuildHasher;
                self.id_hasher.hash_one(id)
            };
            // The same id within the window would be taken for a duplicate and dropped: let
            // everything before it be stored, then wait the window out.
            if let Some(at) = self.recent_ids.get(&id) {
                let quiet = RESTORE_DUPLICATE_WINDOW * 2;
                let waited = at.elapsed();
                if waited < quiet {
                    self.drain(0).await?;
                    tokio::time::sleep(quiet - waited).await;
                }
            }
            if self.recent_ids.len() > 100_000 {
                let quiet = RESTORE_DUPLICATE_WINDOW * 2;
                self.recent_ids.retain(|_, at| at.elapsed() < quiet);
            }
            self.recent_ids.insert(id, std::time::Instant::now());
        }
        let ack = self
            .js
            .publish_with_headers(subject.to_string(), headers, payload)
            .await
            .map_err(|e| format!("sequence {seq}: publish failed: {e}; stopped there"))?;
        self.pending.push_back((seq, ack));
        self.next = seq + 1;
        if self.pending.len() >= ACK_WINDOW {
            // The oldest ack, usually already in: the window stays full.
            self.drain(ACK_WINDOW - 1).await?;
        }
        Ok(())
    }

    /// Awaits acks until at most `keep` are outstanding; each must have stored its message
    /// at the original sequence.
    async fn drain(&mut self, keep: usize) -> Result<(), String> {
        while self.pending.len() > keep {
            let (seq, ack) = self.pending.pop_front().expect("non-empty");
            match ack.await {
                Ok(a) if a.duplicate => {
                    self.pending.clear();
                    return Err(format!(
                        "sequence {seq}: taken for a duplicate of sequence {}; stopped there",
                        a.sequence
                    ));
                }
                Ok(a) if a.sequence != seq => {
                    self.pending.clear();
                    return Err(format!("sequence {seq}: stored as sequence {}; stopped there", a.sequence));
                }
                Ok(_) => {}
                Err(e) => {
                    self.pending.clear();
                    return Err(format!("sequence {seq}: publish failed: {e}; messages after it may be missing"));
                }
            }
        }
        Ok(())
    }

    /// Stores what is in flight, deletes placeholders and deleted messages, and puts the
    /// duplicate window back.
    async fn finish(mut self, report: &mut StreamReport) -> Result<(), String> {
        let drained = self.drain(0).await;
        let config = self.stream.get_info().await.map(|i| i.config).ok();
        let denied = config.as_ref().is_some_and(|c| c.deny_delete);
        if !self.delete.is_empty() && denied {
            // A stream that denies deletes (event streams) is opened for them while it is
            // restored, and closed again below.
            if let Some(mut c) = config.clone() {
                c.deny_delete = false;
                if let Err(e) = self.js.update_stream(&c).await {
                    report.problems.push(format!("allowing deletes for the restore: {e}"));
                }
            }
        }
        for seq in std::mem::take(&mut self.delete) {
            match self.stream.delete_message(seq).await {
                Ok(_) => report.deleted += 1,
                Err(e) => report.problems.push(format!("sequence {seq}: deleting it again failed: {e}")),
            }
        }
        if let Some(mut c) = config {
            c.duplicate_window = self.window;
            if let Err(e) = self.js.update_stream(&c).await {
                report.problems.push(format!("putting the stream's configuration back: {e}"));
            }
        }
        drained
    }
}

/// Reads the segments in order (the next one is read while this one is published) and
/// publishes their records, placeholders for the gaps, and marks what is to be deleted.
/// `first_read` is the first manifest's segment, already being read.
#[allow(clippy::too_many_arguments)]
async fn publish_all(
    s3: &S3Client,
    stream: &str,
    ms: &[(String, Manifest)],
    opts: &RestoreOptions<'_>,
    first_read: Option<Prefetch>,
    deleted: &mut RangeSet,
    mut target: Option<&mut Target>,
    report: &mut StreamReport,
) -> Result<(), String> {
    let mut prev: Option<&Manifest> = None;
    let mut next_read: Option<Prefetch> = first_read;
    for (i, (key, m)) in ms.iter().enumerate() {
        if opts.until.past(m) {
            break;
        }
        if let Some(p) = prev {
            let chained = m.first_seq > p.last_seq
                && match m.prev_last_seq {
                    Some(prev_last) => prev_last == p.last_seq,
                    None => m.first_seq == p.last_seq + 1,
                };
            if !chained {
                break;
            }
        } else if m.prev_last_seq.is_some_and(|p| p > 0) {
            break;
        }
        let read = next_read.take().unwrap_or_else(|| Prefetch::start(s3, key, m));
        if let Some((next_key, next)) = ms.get(i + 1)
            && !opts.until.past(next)
        {
            next_read = Some(Prefetch::start(s3, next_key, next));
        }
        let records = read
            .records(&m.segment_key)
            .await
            .map_err(|e| format!("{e}; messages from sequence {} on were not restored", m.first_seq))?;
        report.segments += 1;
        report.bytes += m.segment_bytes;
        for r in records {
            if !opts.until.admits(&r) {
                return Ok(());
            }
            let is_deleted = deleted.contains(r.sequence);
            if let Some(t) = target.as_deref_mut() {
                if !t.subjects.iter().any(|f| subject_matches(f, &r.subject)) {
                    return Err(format!(
                        "sequence {}: subject {} is not one of the stream's subjects ({}); stopped there",
                        r.sequence,
                        r.subject,
                        t.subjects.join(", ")
                    ));
                }
                t.start_at(r.sequence).await;
                while t.next < r.sequence {
                    let mut filler = HeaderMap::new();
                    filler.insert(FILLER_HEADER, "true");
                    let seq = t.next;
                    t.publish(seq, &r.subject, filler, None, bytes::Bytes::new()).await?;
                    t.delete.push(seq);
                }
                let mut headers = HeaderMap::new();
                let mut id = None;
                for (k, v) in r.headers.iter().filter(|(k, _)| keeps_header(k)) {
                    if id.is_none() && k == "Nats-Msg-Id" {
                        id = Some(v.as_str());
                    }
                    headers.append(k.as_str(), v.as_str());
                }
                t.publish(r.sequence, &r.subject, headers, id, r.payload.clone()).await?;
                if is_deleted {
                    t.delete.push(r.sequence);
                }
            }
            if report.messages == 0 && report.deleted_seen == 0 {
                report.first_seq = r.sequence;
            }
            if is_deleted {
                report.deleted_seen += 1;
            } else {
                report.messages += 1;
            }
            report.last_seq = r.sequence;
            if report.messages.is_multiple_of(1000) {
                (opts.progress)(stream, report.messages);
            }
        }
        prev = Some(m);
    }
    Ok(())
}

/// Publishes awaiting their acks. Deep enough that the server always has publishes queued
/// while acks come back (the client allows 5,000); each ack is still checked, in order.
const ACK_WINDOW: usize = 2048;
