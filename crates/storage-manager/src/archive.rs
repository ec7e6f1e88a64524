//! The continuous archive: one task per stream and target reads the stream in order from its
//! durable cursor, cuts bounded segments, and commits each with segment → manifest → cursor.
//! S3 failures are retried with backoff (the lag grows, nothing is skipped); a restart
//! resumes after the last committed manifest, so there is no gap and no duplicate.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use bytes::Bytes;
use cim_events::{Component, resources};
use futures::StreamExt;
use tokio::sync::watch;

use crate::format::{self, CURSOR_FORMAT, Cursor, SegmentWriter};
use crate::s3::{S3Client, S3Error};

/// How segments are cut and failures retried.
#[derive(Clone, Debug)]
pub struct ArchiveSettings {
    /// A segment is cut when its uncompressed records reach this size (memory per task is
    /// about twice this).
    pub segment_bytes: usize,
    /// ...or when its first record has waited this long.
    pub linger: Duration,
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Multipart part size for objects copied by name.
    pub part_bytes: usize,
    /// How often object buckets are checked for objects to copy by name.
    pub object_poll: Duration,
    /// Targets that must all hold a verified copy before anything may be removed.
    pub required: Vec<String>,
    /// How often committed segments are read back and checked.
    pub verify_interval: Duration,
}

impl Default for ArchiveSettings {
    fn default() -> Self {
        ArchiveSettings {
            segment_bytes: 8 << 20,
            linger: Duration::from_secs(1),
            retry_min: Duration::from_millis(200),
            retry_max: Duration::from_secs(30),
            part_bytes: 8 << 20,
            object_poll: Duration::from_secs(5),
            required: Vec::new(),
            verify_interval: Duration::from_secs(5),
        }
    }
}

/// Every stream CIM archives: each component's event and dead-letter streams, and the
/// streams behind its object buckets. KV buckets are projections, rebuilt by replay, and are
/// not archived.
pub fn archived_streams() -> Vec<String> {
    let mut out = Vec::new();
    for c in Component::ALL {
        out.extend(resources::streams(c).into_iter().map(|s| s.name));
        out.extend(resources::object_buckets(c).into_iter().map(|b| b.stream_name()));
    }
    out
}

/// Reads the committed position of `stream` on a target: the cursor object, corrected by
/// any manifest committed after it (a crash between manifest and cursor). 0 = nothing yet.
pub async fn committed_position(s3: &S3Client, stream: &str) -> Result<(u64, Option<String>), S3Error> {
    let prefix = &s3.target().prefix;
    let cursor_key = format::cursor_key(prefix, stream);
    let mut position = 0;
    let mut last_manifest = None;
    if let Some(body) = s3.get(&cursor_key).await?
        && let Ok(c) = serde_json::from_slice::<Cursor>(&body)
    {
        position = c.last_seq;
        last_manifest = Some(c.manifest_key);
    }
    let later = s3.list(&format::manifests_prefix(prefix, stream), last_manifest.as_deref()).await?;
    for key in later {
        if let Some((_, last)) = format::parse_manifest_key(&key)
            && last > position
        {
            position = last;
            last_manifest = Some(key);
        }
    }
    Ok((position, last_manifest))
}

/// Archives `stream` to one target until `stop` turns true.
pub async fn run_stream(js: jetstream::Context, s3: S3Client, stream: String, settings: Arc<ArchiveSettings>, mut stop: watch::Receiver<bool>) {
    let target = s3.target().name.clone();
    let mut backoff = Backoff::new(&settings);
    let position = loop {
        match committed_position(&s3, &stream).await {
            Ok((p, _)) => break p,
            Err(e) => {
                tracing::warn!(stream = %stream, target = %target, error = %e, "cannot read the archive cursor; retrying");
                if backoff.wait(&mut stop).await {
                    return;
                }
            }
        }
    };
    tracing::info!(stream = %stream, target = %target, position, "archive resumes");
    let mut writer = SegmentWriter::new();
    // The last sequence handed to a commit; one commit runs while the next segment is read.
    let mut handed = position;
    let mut inflight: Option<tokio::task::JoinHandle<bool>> = None;
    'consumer: loop {
        if *stop.borrow() {
            return;
        }
        let start = if writer.is_empty() { handed } else { writer.last } + 1;
        let messages = async {
            let s = js.get_stream(&stream).await.map_err(|e| e.to_string())?;
            let consumer = s
                .create_consumer(jetstream::consumer::pull::OrderedConfig {
                    deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: start },
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?;
            consumer.messages().await.map_err(|e| e.to_string())
        }
        .await;
        let mut messages = match messages {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(stream = %stream, target = %target, error = %e, "stream not readable yet");
                if backoff.wait(&mut stop).await {
                    return;
                }
                continue;
            }
        };
        backoff.reset();
        let mut segment_started = Instant::now();
        loop {
            let deadline = tokio::time::Instant::from_std(segment_started + settings.linger);
            let flush = tokio::select! {
                _ = stop.changed() => {
                    let previous_done = match inflight.take() {
                        Some(t) => t.await.unwrap_or(false),
                        None => true,
                    };
                    if previous_done && !writer.is_empty() {
                        // One attempt to save what was read; if it fails, the next run reads it again.
                        let _ = commit(s3.clone(), stream.clone(), std::mem::take(&mut writer), stop.clone(), settings.clone(), true).await;
                    }
                    return;
                }
                _ = tokio::time::sleep_until(deadline), if !writer.is_empty() => true,
                next = messages.next() => match next {
                    None => continue 'consumer,
                    Some(Err(e)) => {
                        tracing::debug!(stream = %stream, target = %target, error = %e, "ordered consumer interrupted; recreating");
                        continue 'consumer;
                    }
                    Some(Ok(msg)) => {
                        let Ok(info) = msg.info() else { continue };
                        let seq = info.stream_sequence;
                        if seq < start || (!writer.is_empty() && seq <= writer.last) {
                            continue;
                        }
                        if writer.is_empty() {
                            if seq > handed + 1 && handed > 0 {
                                tracing::error!(stream = %stream, target = %target, from = handed + 1, to = seq - 1, "messages vanished from the stream before they were archived");
                            }
                            segment_started = Instant::now();
                        }
                        let nanos = (info.published.unix_timestamp_nanos()) as i64;
                        // Borrowed from the message: no copy of each name and value. Sorted by
                        // (name, value): the header map's order is not stable.
                        let mut headers: Vec<(&str, &str)> = msg
                            .headers
                            .as_ref()
                            .map(|h| h.iter().flat_map(|(k, vs)| vs.iter().map(move |x| (k.as_ref(), x.as_str()))).collect())
                            .unwrap_or_default();
                        headers.sort_unstable();
                        writer.push_borrowed(seq, nanos, msg.subject.as_str(), &headers, &msg.payload);
                        writer.raw_len() >= settings.segment_bytes
                    }
                },
            };
            if flush && !writer.is_empty() {
                // Wait for the previous segment's commit (segments commit in order), then hand
                // this one over and read on.
                if let Some(t) = inflight.take()
                    && !t.await.unwrap_or(false)
                {
                    return;
                }
                let full = std::mem::take(&mut writer);
                handed = full.last;
                inflight = Some(tokio::spawn(commit(s3.clone(), stream.clone(), full, stop.clone(), settings.clone(), false)));
                segment_started = Instant::now();
            }
        }
    }
}

/// Uploads segment, manifest, cursor, retrying each until it succeeds. Returns false when
/// asked to stop before it could (the next run re-reads the same messages).
async fn commit(
    s3: S3Client,
    stream: String,
    writer: SegmentWriter,
    mut stop: watch::Receiver<bool>,
    settings: Arc<ArchiveSettings>,
    once: bool,
) -> bool {
    let stream = stream.as_str();
    let prefix = s3.target().prefix.clone();
    let (segment, manifest) = writer.finish(stream, &prefix);
    let manifest_key = format::manifest_key(&prefix, stream, manifest.first_seq, manifest.last_seq);
    let cursor = Cursor {
        format: CURSOR_FORMAT.to_string(),
        stream: stream.to_string(),
        target: s3.target().name.clone(),
        last_seq: manifest.last_seq,
        manifest_key: manifest_key.clone(),
        updated_unix_nanos: time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64,
    };
    let steps: [(String, Bytes); 3] = [
        (manifest.segment_key.clone(), segment),
        (manifest_key, Bytes::from(serde_json::to_vec_pretty(&manifest).expect("manifest serialises"))),
        (format::cursor_key(&prefix, stream), Bytes::from(serde_json::to_vec_pretty(&cursor).expect("cursor serialises"))),
    ];
    let mut backoff = Backoff::new(&settings);
    for (key, body) in steps {
        loop {
            match s3.put(&key, body.clone()).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(stream, target = %s3.target().name, key = %key, error = %e, auth = e.is_auth(), "archive upload failed; retrying");
                    if once {
                        return false;
                    }
                    if backoff.wait(&mut stop).await {
                        return false;
                    }
                }
            }
        }
    }
    tracing::debug!(stream, target = %s3.target().name, first = manifest.first_seq, last = manifest.last_seq, count = manifest.count, "segment archived");
    true
}

/// Exponential backoff between `retry_min` and `retry_max`.
struct Backoff {
    current: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    fn new(s: &ArchiveSettings) -> Backoff {
        Backoff { current: s.retry_min, min: s.retry_min, max: s.retry_max }
    }
    fn reset(&mut self) {
        self.current = self.min;
    }
    fn next(&mut self) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        d
    }
    /// Sleeps the next delay; true if asked to stop meanwhile.
    async fn wait(&mut self, stop: &mut watch::Receiver<bool>) -> bool {
        let d = self.next();
        tokio::select! {
            _ = tokio::time::sleep(d) => *stop.borrow(),
            _ = stop.changed() => true,
        }
    }
}
