//! Objects by name (the content bucket's names are CIDs): besides the bucket's stream, every
//! live object is copied to `<prefix>objects/<bucket>/<name>` as a plain S3 object, so the
//! content is readable with any S3 tool. Streamed from the object store in parts (multipart
//! upload above one part; a part uploads while the next is read), so memory stays at two
//! parts whatever the size. Idempotent: an object already there with the same size is
//! skipped, so a restart resumes where it was.

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use cim_archive::S3Client;
use cim_archive::format::object_key;

/// S3's smallest part (except the last).
pub const MIN_PART_BYTES: usize = 5 << 20;

/// Copies new objects of `bucket` to the target every `poll`, until `stop`.
pub async fn run_bucket(
    js: jetstream::Context,
    s3: S3Client,
    bucket: String,
    part_bytes: usize,
    poll: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        match sync_once(&js, &s3, &bucket, part_bytes, &stop).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(bucket = %bucket, target = %s3.target().name, objects = n, "objects archived by name")
            }
            Err(e) => {
                tracing::warn!(bucket = %bucket, target = %s3.target().name, error = %e, "object archive failed; retrying")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = stop.changed() => return,
        }
    }
}

/// One pass: every live object not yet on the target. Returns how many were copied.
pub async fn sync_once(
    js: &jetstream::Context,
    s3: &S3Client,
    bucket: &str,
    part_bytes: usize,
    stop: &watch::Receiver<bool>,
) -> Result<usize, String> {
    let Ok(store) = js.get_object_store(bucket).await else { return Ok(0) };
    let mut list = store.list().await.map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    while let Some(info) = list.next().await {
        let info = info.map_err(|e| e.to_string())?;
        if !info.deleted {
            names.push((info.name, info.size as u64));
        }
    }
    let mut copied = 0;
    for (name, size) in names {
        if *stop.borrow() {
            break;
        }
        let key = object_key(&s3.target().prefix, bucket, &name);
        if s3.head(&key).await.map_err(|e| e.to_string())? == Some(size) {
            continue;
        }
        let mut obj = store.get(&name).await.map_err(|e| format!("{name}: {e}"))?;
        upload(s3, &key, &mut obj, part_bytes.max(MIN_PART_BYTES)).await.map_err(|e| format!("{name}: {e}"))?;
        copied += 1;
    }
    Ok(copied)
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

async fn upload<R: tokio::io::AsyncRead + Unpin>(
    s3: &S3Client,
    key: &str,
    r: &mut R,
    part: usize,
) -> Result<(), String> {
    let first = read_part(r, part).await.map_err(|e| e.to_string())?;
    if first.len() < part {
        return s3.put(key, Bytes::from(first)).await.map_err(|e| e.to_string());
    }
    let id = s3.multipart_start(key).await.map_err(|e| e.to_string())?;
    let result = async {
        // Each part is uploaded while the next is read from the object store: two parts in
        // memory at most.
        let mut etags = Vec::new();
        let mut current = first;
        loop {
            let number = etags.len() as u32 + 1;
            let full = current.len() == part;
            let (etag, next) = if full {
                let (etag, next) =
                    tokio::join!(s3.multipart_part(key, &id, number, Bytes::from(current)), read_part(r, part));
                (etag, next.map_err(|e| e.to_string())?)
            } else {
                (s3.multipart_part(key, &id, number, Bytes::from(current)).await, Vec::new())
            };
            etags.push(etag.map_err(|e| e.to_string())?);
            if next.is_empty() {
                break;
            }
            current = next;
        }
        s3.multipart_complete(key, &id, &etags).await.map_err(|e| e.to_string())
    }
    .await;
    if result.is_err() {
        let _ = s3.multipart_abort(key, &id).await;
    }
    result
}
