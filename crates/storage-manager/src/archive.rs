//! The continuous archive: one task per stream and target reads the stream in order from its
//! durable cursor, cuts bounded segments, and commits each with segment → manifest → cursor.
//! Up to `uploads_in_flight` segments are compressed and uploaded at once while reading goes
//! on, but manifests and cursors are written strictly in sequence order: a segment's manifest
//! waits for the previous segment's cursor, so the archive never shows a later range before an
//! earlier one (a crash leaves at most unreferenced segment objects, overwritten on resume).
//! S3 failures are retried with backoff (the lag grows, nothing is skipped); a restart
//! resumes after the last committed manifest, so there is no gap and no duplicate.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use cim_archive::catalog::committed_position;
use cim_archive::format::{self, CURSOR_FORMAT, Cursor, SegmentWriter};
use cim_archive::s3::S3Client;

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
    /// Segments compressed and uploaded at the same time per stream and target (at least 1;
    /// memory per task is about `segment_bytes` times this plus one).
    pub uploads_in_flight: usize,
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
            uploads_in_flight: 2,
        }
    }
}

/// Archives `stream` to one target until `stop` turns true.
pub async fn run_stream(
    js: jetstream::Context,
    s3: S3Client,
    stream: String,
    settings: Arc<ArchiveSettings>,
    mut stop: watch::Receiver<bool>,
) {
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
    // The last sequence handed to a commit; up to `uploads_in_flight` commits run, oldest
    // first, while the next segment is read.
    let mut handed = position;
    let mut inflight: VecDeque<JoinHandle<bool>> = VecDeque::new();
    // Resolves when the newest commit has written its cursor: the next one's manifest waits on it.
    let mut last_done: Option<oneshot::Receiver<bool>> = None;
    let max_inflight = settings.uploads_in_flight.max(1);
    'consumer: loop {
        if *stop.borrow() {
            break;
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
                    break 'consumer;
                }
                continue;
            }
        };
        backoff.reset();
        let mut segment_started = Instant::now();
        loop {
            // An atomic load; the select's stop branch is not polled while messages are ready.
            if stop.has_changed().unwrap_or(true) {
                break 'consumer;
            }
            let deadline = tokio::time::Instant::from_std(segment_started + settings.linger);
            // Biased, messages first: while messages are buffered (the steady state when
            // catching up) the stop and timer branches are not polled, so no timer or watch
            // registration per message; they are when the consumer has nothing ready.
            let flush = tokio::select! {
                biased;
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
                        // Checked here too: with messages always ready the timer branch
                        // below is never polled.
                        writer.raw_len() >= settings.segment_bytes || segment_started.elapsed() >= settings.linger
                    }
                },
                _ = stop.changed() => break 'consumer,
                _ = tokio::time::sleep_until(deadline), if !writer.is_empty() => true,
            };
            if flush && !writer.is_empty() {
                // With the pipeline full, wait for the oldest commit, then hand this segment
                // over and read on. A commit gives up only when asked to stop.
                while inflight.len() >= max_inflight {
                    let oldest = inflight.pop_front().expect("non-empty");
                    if !oldest.await.unwrap_or(false) {
                        return;
                    }
                }
                let full = std::mem::take(&mut writer);
                handed = full.last;
                let (done, done_rx) = oneshot::channel();
                let previous = last_done.replace(done_rx);
                inflight.push_back(tokio::spawn(commit(
                    s3.clone(),
                    stream.clone(),
                    full,
                    previous,
                    done,
                    stop.clone(),
                    settings.clone(),
                    false,
                )));
                segment_started = Instant::now();
            }
        }
    }
    // Asked to stop: let the commits in flight finish in order, then one attempt to save what
    // was read; if that fails, the next run reads it again.
    let mut previous_done = true;
    for t in inflight.drain(..) {
        previous_done &= t.await.unwrap_or(false);
    }
    if previous_done && !writer.is_empty() {
        let (done, _) = oneshot::channel();
        let _ = commit(s3.clone(), stream.clone(), writer, None, done, stop.clone(), settings.clone(), true).await;
    }
}

/// Compresses and uploads the segment, then — once `previous` (the commit before it) has
/// written its cursor — the manifest and the cursor, retrying each until it succeeds, and
/// reports on `done`. Returns false when asked to stop before it could, or when the previous
/// commit did not finish (the next run re-reads the same messages).
#[allow(clippy::too_many_arguments)]
async fn commit(
    s3: S3Client,
    stream: String,
    writer: SegmentWriter,
    previous: Option<oneshot::Receiver<bool>>,
    done: oneshot::Sender<bool>,
    mut stop: watch::Receiver<bool>,
    settings: Arc<ArchiveSettings>,
    once: bool,
) -> bool {
    let stream = stream.as_str();
    let prefix = s3.target().prefix.clone();
    // zstd and two SHA-256 passes: CPU work, kept off the async worker threads.
    let finished = {
        let (stream, prefix) = (stream.to_string(), prefix.clone());
        tokio::task::spawn_blocking(move || writer.finish(&stream, &prefix)).await
    };
    let (segment, manifest) = match finished {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(stream, target = %s3.target().name, error = %e, "compressing a segment failed; it is read again on the next run");
            return false;
        }
    };
    let manifest_key = format::manifest_key(&prefix, stream, manifest.first_seq, manifest.last_seq);
    let cursor = Cursor {
        format: CURSOR_FORMAT.to_string(),
        stream: stream.to_string(),
        target: s3.target().name.clone(),
        last_seq: manifest.last_seq,
        manifest_key: manifest_key.clone(),
        updated_unix_nanos: time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64,
    };
    let mut backoff = Backoff::new(&settings);
    let mut put = async |key: &str, body: Bytes, sha256: Option<&str>| loop {
        match s3.put_hashed(key, body.clone(), sha256).await {
            Ok(()) => return true,
            Err(e) => {
                tracing::warn!(stream, target = %s3.target().name, key = %key, error = %e, auth = e.is_auth(), "archive upload failed; retrying");
                if once || backoff.wait(&mut stop).await {
                    return false;
                }
            }
        }
    };
    if !put(&manifest.segment_key, segment, Some(manifest.segment_sha256.as_str())).await {
        return false;
    }
    // The earlier range must be committed first: this manifest may not appear before it.
    if let Some(p) = previous
        && !p.await.unwrap_or(false)
    {
        return false;
    }
    let manifest_body = Bytes::from(serde_json::to_vec_pretty(&manifest).expect("manifest serialises"));
    if !put(&manifest_key, manifest_body, None).await {
        return false;
    }
    let cursor_body = Bytes::from(serde_json::to_vec_pretty(&cursor).expect("cursor serialises"));
    if !put(&format::cursor_key(&prefix, stream), cursor_body, None).await {
        return false;
    }
    tracing::debug!(stream, target = %s3.target().name, first = manifest.first_seq, last = manifest.last_seq, count = manifest.count, "segment archived");
    let _ = done.send(true);
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
