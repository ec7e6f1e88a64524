//! Objects by name (the content bucket's names are CIDs): besides the bucket's stream, every
//! live object is copied to `<prefix>objects/<bucket>/<name>` as a plain S3 object, so the
//! content is readable with any S3 tool. Streamed from the object store in parts (multipart
//! upload above one part; two parts upload while the next is read), so memory stays at three
//! parts whatever the size.
//!
//! Idle means no S3 request: the task remembers (in memory) every object it copied or found
//! on the target — name, nuid, digest, size — and a poll looks at the bucket's stream first:
//! while its last sequence has not moved, nothing is listed and nothing is sent. An object
//! not remembered (after a restart: each once) is looked up with a HEAD and skipped when the
//! target holds it with the same size; a new version of a name (another nuid or digest) is
//! copied again.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use cim_archive::S3Client;
use cim_archive::format::object_key;

use crate::health::TargetHealth;

/// S3's smallest part (except the last).
pub const MIN_PART_BYTES: usize = 5 << 20;

/// One version of an object, as far as copying it is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Version {
    nuid: String,
    digest: Option<String>,
    size: u64,
}

/// What one bucket's copy task knows: the objects the target holds, and the bucket stream's
/// last sequence when everything up to it was copied.
#[derive(Default)]
pub struct Copied {
    objects: HashMap<String, Version>,
    synced_through: Option<u64>,
}

impl Copied {
    /// How many objects are remembered as copied.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }
}

/// Copies new objects of `bucket` (its stream is `stream`) to the target every `poll`, until
/// `stop`.
#[allow(clippy::too_many_arguments)]
pub async fn run_bucket(
    js: jetstream::Context,
    s3: S3Client,
    bucket: String,
    stream: String,
    part_bytes: usize,
    poll: Duration,
    health: TargetHealth,
    mut stop: watch::Receiver<bool>,
) {
    let mut copied = Copied::default();
    let mut failing: Option<String> = None;
    loop {
        match sync_once(&js, &s3, &bucket, &stream, part_bytes, &mut copied, &health, &stop).await {
            Ok(n) => {
                if n > 0 {
                    tracing::info!(bucket = %bucket, target = %s3.target().name, objects = n, "objects archived by name");
                }
                if failing.take().is_some() {
                    tracing::info!(bucket = %bucket, target = %s3.target().name, "object archive recovered");
                }
            }
            Err(e) => {
                if failing.as_deref() != Some(e.as_str()) {
                    tracing::warn!(bucket = %bucket, target = %s3.target().name, error = %e, "object archive failed; retrying");
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

/// One pass: every live object not yet on the target. Returns how many were copied. Sends
/// nothing to S3 when the bucket's stream has not moved since the last complete pass, or when
/// every live object is remembered as copied.
#[allow(clippy::too_many_arguments)]
pub async fn sync_once(
    js: &jetstream::Context,
    s3: &S3Client,
    bucket: &str,
    stream: &str,
    part_bytes: usize,
    copied: &mut Copied,
    health: &TargetHealth,
    stop: &watch::Receiver<bool>,
) -> Result<usize, String> {
    // The stream's position first (one JetStream request): unchanged means nothing to do.
    let Ok(s) = js.get_stream(stream).await else { return Ok(0) };
    let last = s.cached_info().state.last_sequence;
    if copied.synced_through == Some(last) {
        return Ok(0);
    }
    let Ok(store) = js.get_object_store(bucket).await else { return Ok(0) };
    let mut list = store.list().await.map_err(|e| e.to_string())?;
    let mut live = Vec::new();
    while let Some(info) = list.next().await {
        let info = info.map_err(|e| e.to_string())?;
        if !info.deleted {
            live.push((info.name, Version { nuid: info.nuid, digest: info.digest, size: info.size as u64 }));
        }
    }
    // Forget what is gone, so memory follows the bucket.
    let names: std::collections::HashSet<&str> = live.iter().map(|(n, _)| n.as_str()).collect();
    copied.objects.retain(|n, _| names.contains(n.as_str()));
    let mut n = 0;
    for (name, version) in live {
        if *stop.borrow() {
            return Ok(n);
        }
        if copied.objects.get(&name) == Some(&version) {
            continue;
        }
        let key = object_key(&s3.target().prefix, bucket, &name);
        let known = copied.objects.contains_key(&name);
        // Not remembered (first pass after a start): the target may hold it already.
        if !known {
            let head = s3.head(&key).await;
            health.report(&head);
            if head.map_err(|e| e.to_string())? == Some(version.size) {
                copied.objects.insert(name, version);
                continue;
            }
        }
        let mut obj = store.get(&name).await.map_err(|e| format!("{name}: {e}"))?;
        match upload_parts(s3, &key, &mut obj, part_bytes.max(MIN_PART_BYTES)).await {
            Ok(()) => health.ok(),
            Err(UploadError::S3(e)) => {
                health.failed(&e.to_string());
                return Err(format!("{name}: {e}"));
            }
            Err(e) => return Err(format!("{name}: {e}")),
        }
        copied.objects.insert(name, version);
        n += 1;
    }
    copied.synced_through = Some(last);
    Ok(n)
}

/// Reads up to `n` bytes (fewer only at the end).
async fn read_part<R: tokio::io::AsyncRead + Unpin>(r: &mut R, n: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    let mut filled = 0;
    while filled < n {
        let k = r.read(&mut buf[filled..]).await?;
        if k == 0 {
            break;
        }
        filled += k;
    }
    buf.truncate(filled);
    Ok(buf)
}

/// Reading the object store or writing the target failed.
#[derive(Debug, thiserror::Error)]
enum UploadError {
    #[error("reading the object: {0}")]
    Read(#[from] std::io::Error),
    #[error(transparent)]
    S3(#[from] cim_archive::S3Error),
    #[error("a part upload did not finish: {0}")]
    Task(String),
}

/// Parts of one object uploaded at the same time while the next is read from the object
/// store: with one, the upload waits on each part's round trip; two keep the target busy
/// while a part is read (memory: this many parts plus the one being read).
pub const PARTS_IN_FLIGHT: usize = 2;

async fn upload_parts<R: tokio::io::AsyncRead + Unpin>(
    s3: &S3Client,
    key: &str,
    r: &mut R,
    part: usize,
) -> Result<(), UploadError> {
    let first = read_part(r, part).await?;
    if first.len() < part {
        return Ok(s3.put(key, Bytes::from(first)).await?);
    }
    let id = s3.multipart_start(key).await?;
    // Up to PARTS_IN_FLIGHT parts upload (each on its own task, so their hashing and sending
    // run beside the read) while the next one is read from the object store.
    let mut uploading: VecDeque<JoinHandle<Result<cim_archive::s3::Part, cim_archive::S3Error>>> = VecDeque::new();
    let result = async {
        let mut etags = Vec::new();
        let mut current = first;
        loop {
            let number = (etags.len() + uploading.len()) as u32 + 1;
            let full = current.len() == part;
            let (s3c, keyc, idc) = (s3.clone(), key.to_string(), id.clone());
            uploading.push_back(tokio::spawn(async move {
                s3c.multipart_part(&keyc, &idc, number, Bytes::from(current)).await
            }));
            if !full {
                break;
            }
            let next = if uploading.len() >= PARTS_IN_FLIGHT {
                // Read the next part while waiting for the oldest upload to finish.
                let oldest = uploading.pop_front().expect("non-empty");
                let (done, next) = tokio::join!(joined(oldest), read_part(r, part));
                etags.push(done?);
                next?
            } else {
                read_part(r, part).await?
            };
            if next.is_empty() {
                break;
            }
            current = next;
        }
        while let Some(u) = uploading.pop_front() {
            etags.push(joined(u).await?);
        }
        Ok::<(), UploadError>(s3.multipart_complete(key, &id, &etags).await?)
    }
    .await;
    if result.is_err() {
        for u in uploading.drain(..) {
            u.abort();
        }
        let _ = s3.multipart_abort(key, &id).await;
    }
    result
}

/// A part's upload task, its panic or cancellation as an upload error.
async fn joined(
    h: JoinHandle<Result<cim_archive::s3::Part, cim_archive::S3Error>>,
) -> Result<cim_archive::s3::Part, UploadError> {
    match h.await {
        Ok(r) => Ok(r?),
        Err(e) => Err(UploadError::Task(e.to_string())),
    }
}
