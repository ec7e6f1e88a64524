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

use cim_archive::catalog::{Position, committed_position, newest_epoch};
use cim_archive::format::{self, CURSOR_FORMAT, Cursor, SegmentWriter};
use cim_archive::s3::S3Client;
use cim_archive::seal::ArchiveKey;

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

/// Where the archive of a stream stands, as its archiver publishes it: the epoch and the
/// position committed on the target (the deletion tracker and the verifier follow it).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Archived {
    pub epoch: u64,
    pub position: u64,
}

/// What the archiver knows about the stream it archives: JetStream's creation time and the
/// record last handed to a commit (its digest goes into the cursor).
#[derive(Clone, Debug, Default)]
struct StreamIdentity {
    created_nanos: Option<i64>,
}

impl StreamIdentity {
    /// What the commit of the segment following `prev_last_seq` and ending with `last_record`
    /// signs and records.
    fn seal(
        &self,
        key: &ArchiveKey,
        epoch: u64,
        prev_last_seq: u64,
        last_record: Option<(async_nats::Subject, Bytes)>,
        archived: &watch::Sender<Archived>,
    ) -> Seal {
        Seal {
            key: key.clone(),
            epoch,
            prev_last_seq,
            stream_created_nanos: self.created_nanos,
            last_digest: last_record.map(|(s, p)| format::record_digest(s.as_str(), &p)),
            archived: archived.clone(),
        }
    }
}

/// Whether the stream holds the history the archive holds up to `pos` (`None`), or why not.
/// Compared: the stream's last sequence with the position, then the creation time recorded
/// in the cursor, then the digest of the record at the cursor's position. A cursor from
/// before identities were recorded is checked by position alone.
async fn other_history(js: &jetstream::Context, stream: &str, pos: &Position) -> Result<Option<String>, String> {
    if pos.last_seq == 0 {
        return Ok(None);
    }
    let s = js.get_stream(stream).await.map_err(|e| e.to_string())?;
    let info = s.get_info().await.map_err(|e| e.to_string())?;
    if info.state.last_sequence < pos.last_seq {
        return Ok(Some(format!(
            "the stream ends at sequence {} but the archive holds it up to {}",
            info.state.last_sequence, pos.last_seq
        )));
    }
    let Some(c) = &pos.cursor else { return Ok(None) };
    if c.stream_created_nanos.is_none_or(|n| n == info.created.unix_timestamp_nanos() as i64) {
        return Ok(None);
    }
    let Some(digest) = &c.last_digest else { return Ok(None) };
    match s.get_raw_message(c.last_seq).await {
        Ok(m) if format::record_digest(m.subject.as_str(), &m.payload) == *digest => Ok(None),
        Ok(_) => Ok(Some(format!("the message at sequence {} is not the one archived there", c.last_seq))),
        // Deleted since (a restore deletes what the original had deleted): the position
        // checks above are all there is to go by.
        Err(_) => Ok(None),
    }
}

/// Archives `stream` to one target until `stop` turns true.
pub async fn run_stream(
    js: jetstream::Context,
    s3: S3Client,
    key: ArchiveKey,
    stream: String,
    settings: Arc<ArchiveSettings>,
    archived: watch::Sender<Archived>,
    mut stop: watch::Receiver<bool>,
) {
    let target = s3.target().name.clone();
    let mut backoff = Backoff::new(&settings);
    let mut pos = loop {
        match committed_position(&s3, &key, &stream).await {
            Ok(p) => break p,
            Err(e) => {
                tracing::warn!(stream = %stream, target = %target, error = %e, "cannot read the archive cursor; retrying");
                if backoff.wait(&mut stop).await {
                    return;
                }
            }
        }
    };
    if let Some(problem) = &pos.cursor_problem {
        tracing::error!(stream = %stream, target = %target, problem = %problem, "the archive cursor is not trusted; the position comes from the manifests");
    }
    tracing::info!(stream = %stream, target = %target, epoch = pos.epoch, position = pos.last_seq, "archive resumes");
    let mut identity = StreamIdentity::default();
    let mut writer = SegmentWriter::new();
    // The last record pushed: its digest goes into the cursor of the segment it ends.
    let mut last_record: Option<(async_nats::Subject, Bytes)> = None;
    // The last sequence handed to a commit; up to `uploads_in_flight` commits run, oldest
    // first, while the next segment is read.
    let mut handed = pos.last_seq;
    let mut inflight: VecDeque<JoinHandle<bool>> = VecDeque::new();
    // Resolves when the newest commit has written its cursor: the next one's manifest waits on it.
    let mut last_done: Option<oneshot::Receiver<bool>> = None;
    let max_inflight = settings.uploads_in_flight.max(1);
    archived.send_replace(Archived { epoch: pos.epoch, position: pos.last_seq });
    'consumer: loop {
        if *stop.borrow() {
            break;
        }
        // The cursor is never trusted over the stream: before reading on (at start, and
        // whenever the consumer is recreated), the stream must still be the history archived.
        // A stream recreated or renumbered under the same name is archived as a new epoch,
        // from its first message, never skipped and never mixed into the old one.
        while inflight.front().is_some_and(|h| h.is_finished()) {
            if !inflight.pop_front().expect("non-empty").await.unwrap_or(false) {
                return;
            }
        }
        if writer.is_empty() && inflight.is_empty() {
            match other_history(&js, &stream, &Position { last_seq: handed, ..pos.clone() }).await {
                Ok(None) => {}
                Ok(Some(why)) => {
                    let next = match newest_epoch(&s3, &stream).await {
                        Ok(e) => e.max(pos.epoch) + 1,
                        Err(e) => {
                            tracing::warn!(stream = %stream, target = %target, error = %e, "cannot list the archive's epochs; retrying");
                            if backoff.wait(&mut stop).await {
                                break 'consumer;
                            }
                            continue;
                        }
                    };
                    tracing::error!(stream = %stream, target = %target, why = %why, old_epoch = pos.epoch, new_epoch = next, "ALARM: the stream is not the history archived (recreated or renumbered); archiving it as a new epoch");
                    pos = Position { epoch: next, ..Position::default() };
                    handed = 0;
                    last_done = None;
                    archived.send_replace(Archived { epoch: pos.epoch, position: 0 });
                }
                Err(e) => {
                    tracing::debug!(stream = %stream, target = %target, error = %e, "stream not readable yet");
                    if backoff.wait(&mut stop).await {
                        break 'consumer;
                    }
                    continue;
                }
            }
            if let Ok(s) = js.get_stream(&stream).await
                && let Ok(info) = s.get_info().await
            {
                identity.created_nanos = Some(info.created.unix_timestamp_nanos() as i64);
            }
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
        // Whether the segment's first record was read while more were waiting in the stream.
        let mut began_behind = false;
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
                            if seq > handed + 1 {
                                // Recorded: the manifest names the position it follows.
                                tracing::debug!(stream = %stream, target = %target, from = handed + 1, to = seq - 1, "messages deleted before they were archived");
                            }
                            segment_started = Instant::now();
                            began_behind = info.pending > 0;
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
                        last_record = Some((msg.subject.clone(), msg.payload.clone()));
                        // Checked here too: with messages always ready the timer branch
                        // below is never polled.
                        writer.raw_len() >= settings.segment_bytes
                            || segment_started.elapsed() >= settings.linger
                            || (info.pending == 0 && began_behind && waited_in_stream(writer.first_time_nanos, settings.linger))
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
                let seal = identity.seal(&key, pos.epoch, handed, last_record.take(), &archived);
                handed = full.last;
                let (done, done_rx) = oneshot::channel();
                let previous = last_done.replace(done_rx);
                inflight.push_back(tokio::spawn(commit(
                    s3.clone(),
                    stream.clone(),
                    full,
                    seal,
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
        let seal = identity.seal(&key, pos.epoch, handed, last_record.take(), &archived);
        let _ =
            commit(s3.clone(), stream.clone(), writer, seal, None, done, stop.clone(), settings.clone(), true).await;
    }
}

/// Whether a record stored at `stored_nanos` (JetStream's clock, nanoseconds since the Unix
/// epoch) has been in the stream at least `linger` (by this host's clock).
///
/// The linger bounds how long a record waits before its segment is committed. A segment that
/// began while the archiver was behind (catching up after a restart or an outage) holds
/// records that have already waited in the stream; once the archiver has caught up (nothing
/// more pending) and the first of them is older than the linger, waiting another linger on
/// the archiver's clock only delays the commit. A segment of records that arrived in a burst
/// (stored just now) still waits its linger, so bursts do not cut small segments. Clocks
/// further apart than the linger can only cut such a segment early, never late.
fn waited_in_stream(stored_nanos: i64, linger: Duration) -> bool {
    let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    now - stored_nanos as i128 >= linger.as_nanos() as i128
}

/// What a commit signs and records besides the segment: the key, the epoch, the position the
/// segment follows, the stream's identity for the cursor, and where to announce the commit.
struct Seal {
    key: ArchiveKey,
    epoch: u64,
    prev_last_seq: u64,
    stream_created_nanos: Option<i64>,
    last_digest: Option<String>,
    archived: watch::Sender<Archived>,
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
    seal: Seal,
    previous: Option<oneshot::Receiver<bool>>,
    done: oneshot::Sender<bool>,
    mut stop: watch::Receiver<bool>,
    settings: Arc<ArchiveSettings>,
    once: bool,
) -> bool {
    let stream = stream.as_str();
    let prefix = s3.target().prefix.clone();
    // zstd, the SHA-256 of the compressed segment (for its manifest) and its CRC32C (for the
    // upload): CPU work, kept off the async worker threads.
    let finished = {
        let (stream, prefix, epoch, prev) = (stream.to_string(), prefix.clone(), seal.epoch, seal.prev_last_seq);
        tokio::task::spawn_blocking(move || {
            let (segment, manifest) = writer.finish(&stream, &prefix, epoch, prev);
            let crc = cim_archive::s3::crc32c(&segment);
            (segment, manifest, crc)
        })
        .await
    };
    let (segment, mut manifest, crc) = match finished {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(stream, target = %s3.target().name, error = %e, "compressing a segment failed; it is read again on the next run");
            return false;
        }
    };
    seal.key.seal(&mut manifest);
    let manifest_key = format::manifest_key(&prefix, stream, seal.epoch, manifest.first_seq, manifest.last_seq);
    let mut cursor = Cursor {
        format: CURSOR_FORMAT.to_string(),
        stream: stream.to_string(),
        target: s3.target().name.clone(),
        last_seq: manifest.last_seq,
        manifest_key: manifest_key.clone(),
        updated_unix_nanos: time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64,
        epoch: seal.epoch,
        stream_created_nanos: seal.stream_created_nanos,
        last_digest: seal.last_digest.clone(),
        key_id: None,
        mac: None,
    };
    seal.key.seal(&mut cursor);
    let mut backoff = Backoff::new(&settings);
    // The segment goes with its CRC32C (`crc`); manifest and cursor, small, signed over their
    // SHA-256 as any other object.
    let mut put = async |key: &str, body: Bytes, crc: Option<u32>| loop {
        let sent = match crc {
            Some(crc) => s3.put_segment(key, body.clone(), crc).await,
            None => s3.put(key, body.clone()).await,
        };
        match sent {
            Ok(()) => return true,
            Err(e) => {
                tracing::warn!(stream, target = %s3.target().name, key = %key, error = %e, auth = e.is_auth(), "archive upload failed; retrying");
                if once || backoff.wait(&mut stop).await {
                    return false;
                }
            }
        }
    };
    if !put(&manifest.segment_key, segment, Some(crc)).await {
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
    seal.archived.send_replace(Archived { epoch: seal.epoch, position: manifest.last_seq });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_has_waited_in_the_stream_only_after_the_linger() {
        let linger = Duration::from_millis(200);
        let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64;
        assert!(waited_in_stream(now - 2 * linger.as_nanos() as i64, linger));
        assert!(!waited_in_stream(now, linger));
        // Stored "in the future" (the server's clock ahead of this one): not waited.
        assert!(!waited_in_stream(now + linger.as_nanos() as i64, linger));
    }
}
