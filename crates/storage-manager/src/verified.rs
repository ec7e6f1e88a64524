//! Verification of what the archiver committed, and the watermarks the retention guard reads.
//!
//! One task per stream and target follows the committed manifests in order, reads each segment
//! back from the target and checks its size and SHA-256 against the manifest (the bytes the
//! archiver hashed before uploading). Then it records, in `cim_storage_archive`:
//! `target.<STREAM>.<target>` (verified through on this target) and `verified.<STREAM>` (the
//! smallest over the required targets). Services remove nothing above `verified.<STREAM>`
//! (`cim_runtime::archive_guard`). It also exports `cim_archive_lag` and
//! `cim_archive_verified_sequence` per stream and target.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use cim_events::{Component, resources, storage};
use cim_runtime::metrics::{ArchiveLabels, Metrics};
use tokio::sync::watch;

use cim_archive::S3Client;
use cim_archive::format::{self, Manifest};

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
    pub interval: Duration,
    pub metrics: Metrics,
    /// Manifests must be signed with it.
    pub key: cim_archive::ArchiveKey,
}

/// Follows the manifests of `stream` on one target until `stop`, verifying every new segment
/// and advancing the watermarks.
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
    let mut verified: Option<u64> = None;
    // The last manifest verified: listing resumes after it.
    let mut after: Option<String> = None;
    let mut failing: Option<String> = None;
    // Looked up once it exists, not every round.
    let mut store: Option<kv::Store> = None;
    let mut epoch: Option<u64> = None;
    loop {
        // A new epoch (the stream was recreated) starts verification over: the watermarks
        // fall back to what is verified of the new history.
        let current = archived.borrow().epoch;
        if epoch.is_some_and(|e| e != current) {
            verified = Some(0);
            after = None;
        }
        epoch = Some(current);
        let round = async {
            let kv = match &store {
                Some(kv) => kv.clone(),
                None => store.insert(bucket(&js).await?).clone(),
            };
            let through = match verified {
                Some(v) => v,
                None => read_watermark(&kv, &target_key).await.unwrap_or(0),
            };
            let prefix = format::manifests_prefix(&s3.target().prefix, &stream, current);
            let keys = s3.list(&prefix, after.as_deref()).await.map_err(|e| e.to_string())?;
            let mut now = through;
            for key in keys {
                let Some((_, last)) = format::parse_manifest_key(&key) else { continue };
                if last <= now {
                    after = Some(key);
                    continue;
                }
                let body =
                    s3.get(&key).await.map_err(|e| e.to_string())?.ok_or_else(|| format!("manifest {key} vanished"))?;
                let manifest = Manifest::parse(&key, &body).map_err(|e| e.to_string())?;
                settings.key.check(&manifest).map_err(|e| format!("manifest {key}: {e}"))?;
                if manifest.first_seq <= now {
                    return Err(format!("manifest {key} overlaps what is verified (through {now})"));
                }
                check_segment(&s3, &manifest).await.map_err(|e| e.to_string())?;
                now = manifest.last_seq;
                after = Some(key);
            }
            if verified != Some(now) {
                write_watermark(&kv, &target_key, &storage::Watermark::new(&stream, now, vec![target.clone()])).await?;
                verified = Some(now);
            }
            // The removal watermark: the least over the required targets (absent while one of
            // them has verified nothing yet).
            let mut least: Option<u64> = Some(u64::MAX);
            for r in settings.required.iter() {
                let key = storage::target_key(&stream, r).map_err(|e| e.to_string())?;
                least = match (least, read_watermark(&kv, &key).await) {
                    (Some(l), Some(v)) => Some(l.min(v)),
                    _ => None,
                };
            }
            if let Some(least) = least.filter(|l| *l != u64::MAX && *l > 0)
                && read_watermark(&kv, &verified_key).await != Some(least)
            {
                write_watermark(
                    &kv,
                    &verified_key,
                    &storage::Watermark::new(&stream, least, settings.required.to_vec()),
                )
                .await?;
                tracing::debug!(stream = %stream, verified = least, "removal watermark advanced");
            }
            let last = match js.get_stream(&stream).await {
                Ok(mut s) => s.info().await.map(|i| i.state.last_sequence).unwrap_or(now),
                Err(_) => now,
            };
            settings.metrics.archive_verified.get_or_create(&labels).set(now as i64);
            settings.metrics.archive_lag.get_or_create(&labels).set(last.saturating_sub(now) as i64);
            Ok::<(), String>(())
        }
        .await;
        match round {
            Ok(()) => {
                if failing.take().is_some() {
                    tracing::info!(stream = %stream, target = %target, "archive verification recovered");
                }
            }
            Err(e) => {
                // Logged once per distinct problem; the watermark stays where it was.
                if failing.as_deref() != Some(e.as_str()) {
                    tracing::warn!(stream = %stream, target = %target, error = %e, "archive verification failed; the watermark holds");
                    failing = Some(e);
                }
            }
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
