//! Deletions are part of a stream's history: a purge, a deleted message, an object store's
//! purge of an upload's metadata after its commit. One task per stream and target watches the
//! stream's deleted sequences and records those at or below the archive position that no
//! record names yet as a signed deletion record (`deletions/` beside the manifests), so a
//! restore deletes them again and brings back nothing that was gone. Messages deleted before
//! they were archived need no record: the manifests account for those gaps.
//!
//! Idle costs no S3 request: the stream's deleted count and first sequence (one JetStream
//! request per poll) must change before the full list is read and anything is written.

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use tokio::sync::watch;

use cim_archive::S3Client;
use cim_archive::format::{self, DELETIONS_FORMAT, Deletions, to_ranges};
use cim_archive::restore::{self, Trust};
use cim_archive::seal::ArchiveKey;

use crate::archive::Archived;

/// Follows the deletions of `stream` until `stop`, recording them on one target.
pub async fn run_deletions(
    js: jetstream::Context,
    s3: S3Client,
    key: ArchiveKey,
    stream: String,
    poll: Duration,
    mut archived: watch::Receiver<Archived>,
    mut stop: watch::Receiver<bool>,
) {
    let target = s3.target().name.clone();
    // The epoch whose records `known` holds, and the deleted sequences recorded in it.
    let mut epoch: Option<u64> = None;
    let mut known: Vec<(u64, u64)> = Vec::new();
    // The stream's (deleted count, first sequence) at the last look, and the smallest deleted
    // sequence then still above the archive position (0: none).
    let mut seen: Option<(u64, u64, u64)> = None;
    let mut waiting_above: u64 = 0;
    let mut failing: Option<String> = None;
    loop {
        let now = *archived.borrow_and_update();
        let round = async {
            if epoch != Some(now.epoch) {
                let trust = Trust::new(key.clone());
                let (records, problems) =
                    restore::deletions(&s3, &trust, &stream, now.epoch).await.map_err(|e| e.to_string())?;
                for p in problems {
                    tracing::error!(stream = %stream, target = %target, problem = %p, "a deletion record is not trusted");
                }
                known = merge(records.into_iter().flat_map(|d| d.ranges).collect());
                epoch = Some(now.epoch);
                seen = None;
            }
            if now.position == 0 {
                return Ok(());
            }
            let s = js.get_stream(&stream).await.map_err(|e| e.to_string())?;
            let info = s.get_info().await.map_err(|e| e.to_string())?;
            // The full list is read again only when something was deleted, or when deletions
            // the archive had not reached last time may now be below its position.
            let look = (info.state.deleted_count.unwrap_or(0), info.state.first_sequence, waiting_above);
            if seen == Some(look) && (waiting_above == 0 || now.position < waiting_above) {
                return Ok(());
            }
            let mut deleted: Vec<u64> = Vec::new();
            if info.state.deleted_count.unwrap_or(0) > 0 {
                let details = s.info_builder().with_deleted(true).fetch().await.map_err(|e| e.to_string())?;
                deleted = details.info.state.deleted.clone().unwrap_or_default();
            }
            // Everything below the first sequence was purged too.
            let below = info.state.first_sequence.saturating_sub(1).min(now.position);
            waiting_above = deleted.iter().copied().filter(|s| *s > now.position).min().unwrap_or(0);
            let mut new: Vec<u64> = deleted.into_iter().filter(|s| *s <= now.position).collect();
            new.sort_unstable();
            let mut ranges = to_ranges(new);
            if below > 0 {
                ranges.push((1, below));
            }
            let fresh = subtract(merge(ranges), &known);
            if !fresh.is_empty() {
                let mut record = Deletions {
                    format: DELETIONS_FORMAT.to_string(),
                    stream: stream.clone(),
                    epoch: now.epoch,
                    seen_unix_nanos: time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64,
                    through: info.state.last_sequence,
                    ranges: fresh.clone(),
                    key_id: None,
                    mac: None,
                };
                key.seal(&mut record);
                let k = format::deletions_key(
                    &s3.target().prefix,
                    &stream,
                    now.epoch,
                    info.state.last_sequence,
                    record.seen_unix_nanos,
                );
                let body = Bytes::from(serde_json::to_vec_pretty(&record).expect("deletions serialise"));
                s3.put(&k, body).await.map_err(|e| e.to_string())?;
                let n: u64 = fresh.iter().map(|(a, b)| b - a + 1).sum();
                tracing::info!(stream = %stream, target = %target, deleted = n, key = %k, "deletions archived");
                known = merge(known.iter().chain(fresh.iter()).copied().collect());
            }
            seen = Some((look.0, look.1, waiting_above));
            Ok::<(), String>(())
        }
        .await;
        match round {
            Ok(()) => {
                failing = None;
            }
            Err(e) => {
                if failing.as_deref() != Some(e.as_str()) {
                    tracing::warn!(stream = %stream, target = %target, error = %e, "recording deletions failed; retrying");
                    failing = Some(e);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}

/// Sorts and merges overlapping or adjacent inclusive ranges.
fn merge(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (a, b) in ranges {
        match out.last_mut() {
            Some((_, last)) if a <= last.saturating_add(1) => *last = (*last).max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// `ranges` minus `known` (both merged).
fn subtract(ranges: Vec<(u64, u64)>, known: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for (mut a, b) in ranges {
        for &(ka, kb) in known {
            if kb < a || ka > b {
                continue;
            }
            if ka > a {
                out.push((a, ka - 1));
            }
            a = kb.saturating_add(1);
            if a > b {
                break;
            }
        }
        if a <= b {
            out.push((a, b));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_subtract() {
        assert_eq!(merge(vec![(5, 6), (1, 2), (3, 3), (8, 9)]), vec![(1, 3), (5, 6), (8, 9)]);
        assert_eq!(subtract(vec![(1, 10)], &[(2, 3), (5, 5), (9, 12)]), vec![(1, 1), (4, 4), (6, 8)]);
        assert_eq!(subtract(vec![(1, 3)], &[(1, 3)]), vec![]);
        assert_eq!(subtract(vec![(4, 6)], &[]), vec![(4, 6)]);
    }
}
