//! Verification of what the archiver committed, and the watermarks the retention guard reads.
//!
//! One task per stream and target follows the committed manifests in order, reads each segment
//! back from the target and checks its size and SHA-256 against the manifest (the bytes the
//! archiver hashed before uploading). Then it records, in `cim_storage_archive`:
//! `target.<STREAM>.<target>` (verified through on this target) and `verified.<STREAM>` (the
//! smallest over the required targets). Services remove nothing above `verified.<STREAM>`
//! (`cim_runtime::archive_guard`).
//!
//! It talks to S3 only when there is something to verify: the archiver announces every commit
//! (epoch and position, `archive::Archived`), and manifests are listed and read only while
//! that position is past the verified one (after a failure, again with backoff up to
//! `retry_max`). Idle, a fully verified stream costs no S3 request at all; the target's
//! reachability is then kept known by the prober (`health::run_prober`). A new epoch (the
//! stream was recreated) starts verification over.
//!
//! Every round, reachable or not, it exports `cim_archive_lag` (the stream's last sequence
//! minus the verified position) and `cim_archive_verified_sequence`, so the lag grows during
//! an outage or with refused credentials; and it says the service is degraded while a
//! required target is more than `max_lag` messages, or `max_lag_age`, behind.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use cim_events::{Component, resources, storage};
use cim_runtime::Degraded;
use cim_runtime::metrics::{ArchiveLabels, Metrics};
use tokio::sync::watch;

use cim_archive::S3Client;
use cim_archive::format::{self, Manifest};

use crate::health::{TargetHealth, unix_now};

/// Why a segment does not count as verified.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0}")]
    S3(#[from] cim_archive::S3Error),
    #[error(transparent)]
    Format(#[from] format::FormatError),
    #[error("segment {0} is missing")]
    Missing(String),
}

/// Reads one committed segment back and checks it against its manifest (size and SHA-256).
pub async fn check_segment(s3: &S3Client, manifest: &Manifest) -> Result<(), VerifyError> {
    let key = &manifest.segment_key;
    let body = s3.get(key).await?.ok_or_else(|| VerifyError::Missing(key.clone()))?;
    Ok(format::check_stored(manifest, &body)?)
}

/// The watermark bucket, created by provisioning.
async fn bucket(js: &jetstream::Context) -> Result<kv::Store, String> {
    let name = resources::kv_bucket(Component::StorageManager, storage::KV_ARCHIVE).map_err(|e| e.to_string())?;
    js.get_key_value(&name).await.map_err(|e| format!("{name}: {e}"))
}

async fn read_watermark(kv: &kv::Store, key: &str) -> Option<u64> {
    let v = kv.get(key).await.ok()??;
    serde_json::from_slice::<storage::Watermark>(&v).ok().map(|w| w.verified_seq)
}

async fn write_watermark(kv: &kv::Store, key: &str, w: &storage::Watermark) -> Result<(), String> {
    let body = serde_json::to_vec(w).map_err(|e| e.to_string())?;
    kv.put(key, body.into()).await.map(|_| ()).map_err(|e| format!("writing {key}: {e}"))
}

/// Everything a verifier task needs besides its stream and target.
#[derive(Clone)]
pub struct VerifySettings {
    /// The targets that must all hold a verified copy before anything may be removed.
    pub required: Arc<Vec<String>>,
    /// How often the stream's position is looked at (JetStream only).
    pub interval: Duration,
    /// Longest wait between S3 rounds while the target fails.
    pub retry_max: Duration,
    /// A required target this many messages behind makes the service degraded...
    pub max_lag: u64,
    /// ...and so does its oldest unverified message being older than this.
    pub max_lag_age: Duration,
    pub metrics: Metrics,
    pub health: TargetHealth,
    pub degraded: Degraded,
    /// Manifests must be signed with it.
    pub key: cim_archive::ArchiveKey,
}

/// Why an S3 round failed: the target (counts against its reachability) or what it holds.
enum RoundError {
    S3(cim_archive::S3Error),
    Other(String),
}

impl From<cim_archive::S3Error> for RoundError {
    fn from(e: cim_archive::S3Error) -> Self {
        RoundError::S3(e)
    }
}

impl std::fmt::Display for RoundError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RoundError::S3(e) => write!(f, "{e}"),
            RoundError::Other(e) => f.write_str(e),
        }
    }
}

/// Reads the manifests committed after `after` and checks each new segment; returns the
/// position verified through (`through` when nothing new). `after` follows what was read.
async fn s3_round(
    s3: &S3Client,
    key: &cim_archive::ArchiveKey,
    stream: &str,
    epoch: u64,
    through: u64,
    after: &mut Option<String>,
    verified_now: &mut u64,
) -> Result<(), RoundError> {
    let prefix = format::manifests_prefix(&s3.target().prefix, stream, epoch);
    let keys = s3.list(&prefix, after.as_deref()).await?;
    *verified_now = through;
    for name in keys {
        let Some((_, last)) = format::parse_manifest_key(&name) else { continue };
        if last <= *verified_now {
            *after = Some(name);
            continue;
        }
        let body = s3.get(&name).await?.ok_or_else(|| RoundError::Other(format!("manifest {name} vanished")))?;
        let manifest = Manifest::parse(&name, &body).map_err(|e| RoundError::Other(e.to_string()))?;
        key.check(&manifest).map_err(|e| RoundError::Other(format!("manifest {name}: {e}")))?;
        if manifest.first_seq <= *verified_now {
            return Err(RoundError::Other(format!(
                "manifest {name} overlaps what is verified (through {verified_now})"
            )));
        }
        match check_segment(s3, &manifest).await {
            Ok(()) => {}
            Err(VerifyError::S3(e)) => return Err(RoundError::S3(e)),
            Err(e) => return Err(RoundError::Other(e.to_string())),
        }
        *verified_now = manifest.last_seq;
        *after = Some(name);
    }
    Ok(())
}

/// Writes the removal watermark: the least over the required targets (absent while one of
/// them has verified nothing yet).
async fn update_removal_watermark(
    kv: &kv::Store,
    stream: &str,
    verified_key: &str,
    required: &[String],
) -> Result<(), String> {
    let mut least: Option<u64> = Some(u64::MAX);
    for r in required {
        let key = storage::target_key(stream, r).map_err(|e| e.to_string())?;
        least = match (least, read_watermark(kv, &key).await) {
            (Some(l), Some(v)) => Some(l.min(v)),
            _ => None,
        };
    }
    // It may also go down: a stream recreated under its name starts a new epoch, whose
    // sequences are not verified however far the old history was.
    let current = read_watermark(kv, verified_key).await;
    if let Some(least) = least.filter(|l| *l != u64::MAX)
        && current != Some(least)
        && (least > 0 || current.is_some())
    {
        write_watermark(kv, verified_key, &storage::Watermark::new(stream, least, required.to_vec())).await?;
        if current.is_some_and(|c| c > least) {
            tracing::warn!(stream = %stream, verified = least, was = current, "removal watermark lowered (a new epoch)");
        } else {
            tracing::debug!(stream = %stream, verified = least, "removal watermark advanced");
        }
    }
    Ok(())
}

/// The stream's last sequence, or `None` when it is not there (not provisioned, NATS down).
async fn stream_last(js: &jetstream::Context, stream: &str) -> Option<u64> {
    js.get_stream(stream).await.ok().map(|s| s.cached_info().state.last_sequence)
}

/// How long the oldest message not yet verified has waited (`None` when it is not there).
async fn oldest_unverified_age(js: &jetstream::Context, stream: &str, verified: u64) -> Option<Duration> {
    let s = js.get_stream(stream).await.ok()?;
    let m = s.get_raw_message(verified + 1).await.ok()?;
    let age = time::OffsetDateTime::now_utc() - m.time;
    Some(Duration::try_from(age).unwrap_or_default())
}

/// Follows the manifests of `stream` on one target until `stop`, verifying every new segment
/// the archiver announces on `archived` and advancing the watermarks; exports the lag every
/// round.
pub async fn run_verifier(
    js: jetstream::Context,
    s3: S3Client,
    stream: String,
    settings: VerifySettings,
    archived: watch::Receiver<crate::archive::Archived>,
    mut stop: watch::Receiver<bool>,
) {
    let target = s3.target().name.clone();
    let labels = ArchiveLabels { stream: stream.clone(), target: target.clone() };
    let (Ok(target_key), Ok(verified_key)) = (storage::target_key(&stream, &target), storage::verified_key(&stream))
    else {
        tracing::error!(stream = %stream, target = %target, "no watermark key for this stream and target");
        return;
    };
    let required = settings.required.contains(&target);
    let lag_key = format!("archive-lag/{target}/{stream}");
    let verify_key = format!("archive-verify/{target}/{stream}");
    let mut verified: Option<u64> = None;
    // The last manifest verified: listing resumes after it.
    let mut after: Option<String> = None;
    let mut failing: Option<String> = None;
    // Looked up once it exists, not every round.
    let mut store: Option<kv::Store> = None;
    // When the next S3 round may run, and the wait after one that failed or found nothing.
    let mut next_s3 = Instant::now();
    let mut wait = settings.interval;
    // The archiver's commit last looked at: a new one means "look now".
    let mut seen: Option<crate::archive::Archived> = None;
    let mut epoch: Option<u64> = None;
    loop {
        let announced = *archived.borrow();
        // A new epoch (the stream was recreated) starts verification over: the watermark
        // falls back to what is verified of the new history.
        if epoch.is_some_and(|e| e != announced.epoch) {
            verified = Some(0);
            after = None;
            if let Some(kv) = &store
                && let Err(e) =
                    write_watermark(kv, &target_key, &storage::Watermark::new(&stream, 0, vec![target.clone()])).await
            {
                tracing::warn!(stream = %stream, error = %e, "watermark not reset for the new epoch");
            }
        }
        epoch = Some(announced.epoch);
        let last = stream_last(&js, &stream).await;
        if store.is_none() {
            match bucket(&js).await {
                Ok(kv) => {
                    verified = Some(read_watermark(&kv, &target_key).await.unwrap_or(0));
                    if let Err(e) = update_removal_watermark(&kv, &stream, &verified_key, &settings.required).await {
                        tracing::debug!(stream = %stream, error = %e, "removal watermark not written");
                    }
                    store = Some(kv);
                }
                Err(e) => tracing::debug!(stream = %stream, error = %e, "watermark bucket not there yet"),
            }
        }
        if let (Some(kv), Some(through)) = (&store, verified)
            && announced.position > through
        {
            if seen != Some(announced) {
                next_s3 = Instant::now();
                wait = settings.interval;
            }
            if Instant::now() >= next_s3 {
                seen = Some(announced);
                let mut now = through;
                let round = s3_round(&s3, &settings.key, &stream, announced.epoch, through, &mut after, &mut now).await;
                let round = match round {
                    Ok(()) if now > through => {
                        write_watermark(kv, &target_key, &storage::Watermark::new(&stream, now, vec![target.clone()]))
                            .await
                            .map_err(RoundError::Other)
                    }
                    other => other,
                };
                match round {
                    Ok(()) => {
                        settings.health.ok();
                        settings.metrics.archive_verified_time.get_or_create(&labels).set(unix_now());
                        settings.degraded.set(&verify_key, None);
                        if failing.take().is_some() {
                            tracing::info!(stream = %stream, target = %target, "archive verification recovered");
                        }
                        if now > through {
                            verified = Some(now);
                            if let Err(e) =
                                update_removal_watermark(kv, &stream, &verified_key, &settings.required).await
                            {
                                tracing::warn!(stream = %stream, error = %e, "removal watermark not written");
                            }
                            // More may be committed already: look again next round.
                            wait = settings.interval;
                            next_s3 = Instant::now();
                        } else {
                            // Announced but not listed yet: look again, less and less often.
                            next_s3 = Instant::now() + wait;
                            wait = (wait * 2).min(settings.retry_max.max(settings.interval));
                        }
                    }
                    Err(e) => {
                        let text = e.to_string();
                        match &e {
                            RoundError::S3(_) => settings.health.failed(&text),
                            RoundError::Other(_) => settings.degraded.set(
                                &verify_key,
                                Some(format!("archive of {stream} on {target} does not verify: {text}")),
                            ),
                        }
                        // Logged once per distinct problem; the watermark stays where it was.
                        if failing.as_deref() != Some(text.as_str()) {
                            tracing::warn!(stream = %stream, target = %target, error = %text, "archive verification failed; the watermark holds");
                            failing = Some(text);
                        }
                        next_s3 = Instant::now() + wait;
                        wait = (wait * 2).min(settings.retry_max.max(settings.interval));
                    }
                }
            }
        }
        // Exported every round, whatever S3 said: an outage shows as a growing lag.
        if let Some(last) = last {
            let through = verified.unwrap_or(0);
            let lag = last.saturating_sub(through);
            settings.metrics.archive_verified.get_or_create(&labels).set(through as i64);
            settings.metrics.archive_lag.get_or_create(&labels).set(lag as i64);
            let behind = if !required || lag == 0 {
                None
            } else if lag > settings.max_lag {
                Some(format!("archive of {stream} on {target} is {lag} messages behind (max {})", settings.max_lag))
            } else {
                match oldest_unverified_age(&js, &stream, through).await {
                    Some(age) if age > settings.max_lag_age => Some(format!(
                        "archive of {stream} on {target} is {}s behind (max {}s)",
                        age.as_secs(),
                        settings.max_lag_age.as_secs()
                    )),
                    _ => None,
                }
            };
            settings.degraded.set(&lag_key, behind);
        }
        tokio::select! {
            _ = tokio::time::sleep(settings.interval) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}
