//! Content: streamed upload into the content bucket and its commit, verified (ranged)
//! download, corruption reports, files as new units or versions, and progress watching.

use std::{
    io,
    path::Path,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use async_nats::jetstream::{
    self,
    object_store::{GetErrorKind, InfoErrorKind, ObjectInfo, ObjectMetadata, ObjectStore, PutErrorKind},
};
use bytes::Bytes;
use cim_events::{
    Cid, Component, iu,
    proto::iu::{CommandResult, CommitContent, ContentCommitted, CreateUnit, NewVersion, ReportCorrupt},
    resources,
};
use futures::StreamExt;
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::{IuClient, IuError, guess_media_type};

/// The info of content-bucket object `name` as the content stream's leader has it. The object
/// store reads info with a direct get, which any replica may answer, also one that has not
/// applied a write just acknowledged (an upload finished a moment ago): a "not found" from it
/// is asked again here, of the leader.
pub async fn leader_object_info(
    stream: &jetstream::stream::Stream,
    name: &str,
) -> Result<ObjectInfo, jetstream::object_store::InfoError> {
    use jetstream::object_store::InfoError;
    let subject = cim_events::subject::object_meta(iu::CONTENT_BUCKET, name)
        .map_err(|e| InfoError::with_source(InfoErrorKind::InvalidName, e))?;
    match stream.get_last_raw_message_by_subject(&subject).await {
        Ok(m) => serde_json::from_slice(&m.payload).map_err(|e| InfoError::with_source(InfoErrorKind::Other, e)),
        Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
            Err(InfoError::new(InfoErrorKind::NotFound))
        }
        Err(e) => Err(InfoError::with_source(InfoErrorKind::Other, e)),
    }
}

/// Size of the buffer downloads are read through.
const READ_BUFFER: usize = 128 * 1024;
/// How many verified CIDs a client remembers (a few hundred KiB at most).
const VERIFIED_REMEMBERED: usize = 4096;

/// Watches a transfer. `start` is called once with the number of bytes that will flow when it
/// is known, `update` after every chunk with the bytes moved so far, `finish` once at the end
/// of a successful transfer. Closures `FnMut(u64)` are progress watchers that only see updates.
///
/// [`IuClient::put_content`] only calls `update` (it cannot know the total);
/// [`IuClient::put_file`] and [`IuClient::get_content`] call all three.
pub trait Progress: Send {
    fn start(&mut self, _total: Option<u64>) {}
    fn update(&mut self, done: u64);
    fn finish(&mut self) {}
}

impl<F: FnMut(u64) + Send> Progress for F {
    fn update(&mut self, done: u64) {
        self(done)
    }
}

/// A [`Progress`] that ignores everything.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn update(&mut self, _done: u64) {}
}

/// A finished (not yet committed) upload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upload {
    /// Object name in the content bucket: `upload.<uuidv7>`.
    pub name: String,
    pub size: u64,
    /// The CID of the bytes, from the digest the object store computed while storing them.
    pub cid: Option<String>,
}

/// What [`IuClient::get_content`] read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContentRead {
    /// The verified CID.
    pub cid: String,
    /// Size of the whole content (all of it is read to verify it).
    pub size: u64,
    /// Bytes written to the writer (the range's length, or `size`).
    pub written: u64,
}

impl IuClient {
    /// The content bucket (looked up once).
    pub async fn content_store(&self) -> Result<ObjectStore, IuError> {
        self.store
            .get_or_try_init(|| async {
                self.js.get_object_store(iu::CONTENT_BUCKET).await.map_err(|e| {
                    IuError::Unavailable(format!(
                        "content bucket {}: {e} (is the information-unit service provisioned?)",
                        iu::CONTENT_BUCKET
                    ))
                })
            })
            .await
            .cloned()
    }

    /// The stream that holds the content bucket (looked up once).
    async fn content_stream(&self) -> Result<jetstream::stream::Stream, IuError> {
        self.content_stream
            .get_or_try_init(|| async {
                let name = resources::object_buckets(Component::InformationUnit)
                    .into_iter()
                    .find(|b| b.bucket == iu::CONTENT_BUCKET)
                    .map(|b| b.stream_name())
                    .ok_or_else(|| IuError::Internal(format!("no object bucket {}", iu::CONTENT_BUCKET)))?;
                self.js.get_stream(&name).await.map_err(|e| {
                    IuError::Unavailable(format!(
                        "content stream {name}: {e} (is the information-unit service provisioned?)"
                    ))
                })
            })
            .await
            .cloned()
    }

    /// How many chunk messages the content stream holds for the object with `nuid`.
    async fn stored_chunks(&self, cid: &Cid, nuid: &str) -> Result<u64, IuError> {
        let stream = self.content_stream().await?;
        let subject = cim_events::subject::object_chunks(iu::CONTENT_BUCKET, nuid)
            .map_err(|e| IuError::Nats(format!("content {cid}: {e}")))?;
        let looking = |e: &dyn std::fmt::Display| IuError::Nats(format!("counting the chunks of content {cid}: {e}"));
        let mut pages = tokio::time::timeout(self.timeout, stream.info_with_subjects(&subject))
            .await
            .map_err(|_| IuError::Timeout(format!("counting the chunks of content {cid}")))?
            .map_err(|e| looking(&e))?;
        let mut n = 0u64;
        while let Some(page) = tokio::time::timeout(self.timeout, pages.next())
            .await
            .map_err(|_| IuError::Timeout(format!("counting the chunks of content {cid}")))?
        {
            n += page.map_err(|e| looking(&e))?.1 as u64;
        }
        Ok(n)
    }

    /// Streams `reader` into the content bucket under a fresh `upload.<uuidv7>` name, in chunks
    /// of the configured size. Does not commit it (see [`IuClient::commit`]). On failure the
    /// partial upload is deleted (best effort; the service also collects leftovers).
    pub async fn upload<R: AsyncRead + Unpin + Send>(
        &self,
        reader: R,
        progress: &mut dyn Progress,
    ) -> Result<Upload, IuError> {
        let store = self.content_store().await?;
        let name = format!("{}{}", iu::UPLOAD_PREFIX, uuid::Uuid::now_v7());
        let meta = ObjectMetadata { name: name.clone(), chunk_size: Some(self.chunk_size), ..Default::default() };
        let mut counting = Counting { inner: reader, done: 0, progress };
        match store.put(meta, &mut counting).await {
            Ok(info) => Ok(Upload {
                name,
                size: info.size as u64,
                cid: info.digest.as_deref().and_then(|d| Cid::from_object_digest(d).ok()).map(|c| c.to_string()),
            }),
            Err(e) => {
                let _ = store.delete(&name).await;
                Err(match e.kind() {
                    PutErrorKind::ReadChunks => {
                        IuError::Io(io::Error::other(format!("reading the content to upload: {e}")))
                    }
                    PutErrorKind::TimedOut => IuError::Timeout(format!("uploading {name}: {e}")),
                    _ => IuError::Nats(format!("uploading {name}: {e}")),
                })
            }
        }
    }

    /// Asks the service to turn a finished upload into content addressed by its CID (see
    /// [`IuClient::commit_upload`]; the upload's size and digest are read from the bucket).
    pub async fn commit(&self, upload: &str) -> Result<ContentCommitted, IuError> {
        let store = self.content_store().await?;
        let upload = match store.info(upload).await {
            Ok(info) if !info.deleted => Upload {
                name: upload.to_string(),
                size: info.size as u64,
                cid: info.digest.as_deref().and_then(|d| Cid::from_object_digest(d).ok()).map(|c| c.to_string()),
            },
            // Gone (committed already, or never finished): the service says which.
            _ => Upload { name: upload.to_string(), size: 0, cid: None },
        };
        self.commit_upload(&upload).await
    }

    /// Commits an upload this client made, surviving a service replaced mid-commit: the commit
    /// is sent in attempts long enough to read the upload, and repeated on no answer. An
    /// attempt that finds the upload gone is answered by the content itself, stored under the
    /// upload's CID: an earlier attempt did commit it, although its answer was lost or was an
    /// error (the service replaced, or a cluster node lost, after the commit was written).
    pub async fn commit_upload(&self, upload: &Upload) -> Result<ContentCommitted, IuError> {
        let body: Bytes = CommitContent { upload: upload.name.clone() }.encode_to_vec().into();
        let subject = iu::command(iu::cmd::COMMIT).map_err(|e| IuError::Internal(e.to_string()))?;
        // Reading the upload back at (at least) 32 MiB/s, plus the first attempt's wait.
        let attempt = self.attempt_timeout + Duration::from_secs(upload.size / (32 << 20));
        let deadline = tokio::time::Instant::now() + self.commit_timeout.max(attempt);
        let mut pause = Duration::from_millis(100);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let result = match self.request_raw(&subject, body.clone(), attempt.min(left)).await {
                Ok(msg) => ContentCommitted::decode(msg.payload).map_err(IuError::from),
                Err(e) => Err(e),
            };
            match result {
                Err(IuError::NotFound(why)) => {
                    let Some(cid) = upload.cid.as_deref() else { return Err(IuError::NotFound(why)) };
                    let size = self.content_size(cid).await.map_err(|_| IuError::NotFound(why))?;
                    return Ok(ContentCommitted { cid: cid.to_string(), size, deduplicated: false });
                }
                Err(e) if e.is_timeout() || e.is_unavailable() => {
                    // Committed, and the answer lost or an error: the next attempt tells.
                    if deadline.saturating_duration_since(tokio::time::Instant::now()) <= pause {
                        return Err(e);
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                other => return other,
            }
        }
    }

    /// Uploads the bytes of `reader` and commits them: the reply names their CID and whether
    /// they were already stored. Memory stays bounded whatever the size.
    pub async fn put_content<R: AsyncRead + Unpin + Send>(
        &self,
        reader: R,
        progress: &mut dyn Progress,
    ) -> Result<ContentCommitted, IuError> {
        let upload = self.upload(reader, progress).await?;
        self.commit_upload(&upload).await
    }

    /// Uploads a byte slice and commits it. The bytes are at hand, so an upload that fails on
    /// the way (a nats-server restarting, a cluster electing a leader) is sent again, with a
    /// growing pause, until the client's timeout; the content's CID makes that harmless.
    pub async fn put_bytes(&self, bytes: &[u8]) -> Result<ContentCommitted, IuError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut pause = Duration::from_millis(100);
        loop {
            match self.put_content(bytes, &mut NoProgress).await {
                Err(e) if e.is_transient() && tokio::time::Instant::now() + pause < deadline => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                other => return other,
            }
        }
    }

    /// Size of the stored content `cid`.
    pub async fn content_size(&self, cid: &str) -> Result<u64, IuError> {
        let cid = parse_cid(cid)?;
        let store = self.content_store().await?;
        let info = self.object_info(&store, &cid).await?;
        Ok(info.size as u64)
    }

    async fn object_info(&self, store: &ObjectStore, cid: &Cid) -> Result<ObjectInfo, IuError> {
        let info = match store.info(cid.to_string()).await {
            Err(e) if e.kind() == InfoErrorKind::NotFound => {
                leader_object_info(&self.content_stream().await?, &cid.to_string()).await
            }
            other => other,
        }
        .map_err(|e| match e.kind() {
            InfoErrorKind::NotFound => IuError::NotFound(format!("content {cid} is not stored")),
            InfoErrorKind::TimedOut => IuError::Timeout(format!("looking up content {cid}: {e}")),
            _ => IuError::Nats(format!("looking up content {cid}: {e}")),
        })?;
        if info.deleted {
            return Err(IuError::NotFound(format!("content {cid} is not stored (collected)")));
        }
        Ok(info)
    }

    /// Streams the content `cid` to `writer`: all of it, or the bytes `start..end` (end
    /// exclusive) of `range`. The whole content is always read and verified against the CID;
    /// on a mismatch the corruption is reported to the service and [`IuError::Corrupt`] is
    /// returned (bytes already written to `writer` must then be discarded by the caller).
    pub async fn get_content<W: AsyncWrite + Unpin + Send>(
        &self,
        cid: &str,
        range: Option<(u64, u64)>,
        mut writer: W,
        progress: &mut dyn Progress,
    ) -> Result<ContentRead, IuError> {
        let cid = parse_cid(cid)?;
        let store = self.content_store().await?;
        let info = self.object_info(&store, &cid).await?;
        let recorded = info.digest.as_deref().map(Cid::from_object_digest);
        match recorded {
            Some(Ok(d)) if d == cid => {}
            _ => {
                let detail =
                    format!("the object store records digest {} for it", info.digest.as_deref().unwrap_or("(none)"));
                return Err(self.corrupt(&cid, detail).await);
            }
        }
        let size = info.size as u64;
        let (start, end) = match range {
            None => (0, size),
            Some((s, e)) if s <= e && e <= size => (s, e),
            Some((s, e)) => {
                return Err(IuError::BadRequest(format!(
                    "byte range {s}..{e} is not within content {cid} of {size} bytes"
                )));
            }
        };
        // Chunks that are gone (purged or lost) would leave the reader waiting for ever.
        if info.chunks > 0 {
            let stored = self.stored_chunks(&cid, &info.nuid).await?;
            if stored < info.chunks as u64 {
                let detail =
                    format!("{stored} of its {} chunks are stored (the others were purged or lost)", info.chunks);
                return Err(self.corrupt(&cid, detail).await);
            }
        }
        progress.start(Some(size));
        let ranged = start > 0 || end < size;
        if ranged && !self.is_verified(&cid) {
            // No byte of a part is sent before the whole is known to match its CID: the
            // digest covers the whole object, so it is read once, hashing only.
            self.copy_object(&store, &cid, size, (0, 0), &mut tokio::io::sink(), &mut NoProgress, false).await?;
        }
        // A range of verified content is read only as far as it goes.
        let verified = ranged && self.is_verified(&cid);
        self.copy_object(&store, &cid, size, (start, end), &mut writer, progress, verified).await?;
        writer.flush().await?;
        progress.finish();
        Ok(ContentRead { cid: cid.to_string(), size, written: end - start })
    }

    fn is_verified(&self, cid: &Cid) -> bool {
        self.verified.lock().is_ok_and(|v| v.contains(&cid.to_string()))
    }

    /// Streams the object `cid` of `size` bytes, writing the bytes in `start..end`. Unless
    /// `stop_at_end` (content already verified), it reads to the end so the object store
    /// reader checks the recorded digest, and then remembers the content as verified.
    #[allow(clippy::too_many_arguments)]
    async fn copy_object<W: AsyncWrite + Unpin + Send>(
        &self,
        store: &ObjectStore,
        cid: &Cid,
        size: u64,
        (start, end): (u64, u64),
        writer: &mut W,
        progress: &mut dyn Progress,
        stop_at_end: bool,
    ) -> Result<(), IuError> {
        let mut object = store.get(cid.to_string()).await.map_err(|e| match e.kind() {
            GetErrorKind::NotFound => IuError::NotFound(format!("content {cid} is not stored")),
            GetErrorKind::TimedOut => IuError::Timeout(format!("reading content {cid}: {e}")),
            _ => IuError::Nats(format!("reading content {cid}: {e}")),
        })?;
        // The bytes are verified once, by the object store reader: it hashes every chunk and
        // fails with InvalidData at the end unless they match the recorded digest, which was
        // checked against the CID before. Hashing them a second time here cost a fifth of the
        // download rate (docs/benchmarks.md).
        let mut buf = vec![0u8; READ_BUFFER];
        let mut pos = 0u64;
        loop {
            if stop_at_end && pos >= end {
                return Ok(());
            }
            // A chunk that never comes (removed while this read was under way) is an error
            // within the timeout, not a wait for ever.
            let read = tokio::time::timeout(self.timeout, object.read(&mut buf)).await.map_err(|_| {
                IuError::Timeout(format!(
                    "reading content {cid}: no chunk arrived within {:?} after {pos} of {size} bytes",
                    self.timeout
                ))
            })?;
            let n = match read {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    let detail = format!("its chunks do not match the recorded digest ({e}) after {pos} bytes");
                    return Err(self.corrupt(cid, detail).await);
                }
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    return Err(IuError::Timeout(format!("reading content {cid}: {e}")));
                }
                Err(e) => return Err(IuError::Nats(format!("reading content {cid}: {e}"))),
            };
            let chunk = &buf[..n];
            let (lo, hi) = (pos.max(start), (pos + n as u64).min(end));
            if lo < hi {
                writer.write_all(&chunk[(lo - pos) as usize..(hi - pos) as usize]).await?;
            }
            pos += n as u64;
            progress.update(pos);
        }
        if pos != size {
            let detail = format!("read {pos} bytes, the object records {size}");
            return Err(self.corrupt(cid, detail).await);
        }
        if let Ok(mut v) = self.verified.lock() {
            // Bounded: forgetting means verifying again, never trusting more.
            if v.len() >= VERIFIED_REMEMBERED {
                v.clear();
            }
            v.insert(cid.to_string());
        }
        Ok(())
    }

    /// Reads the content `cid` (or a range of it) into memory, verified. For small content
    /// and tests; use [`IuClient::get_content`] for anything large.
    pub async fn get_bytes(&self, cid: &str, range: Option<(u64, u64)>) -> Result<Vec<u8>, IuError> {
        let mut out = Vec::new();
        self.get_content(cid, range, &mut out, &mut NoProgress).await?;
        Ok(out)
    }

    async fn corrupt(&self, cid: &Cid, detail: String) -> IuError {
        let _ = self.report_corrupt(&cid.to_string(), &detail).await;
        IuError::Corrupt { cid: cid.to_string(), detail }
    }

    /// Tells the service that bytes read for `cid` do not match it (it records the event).
    pub async fn report_corrupt(&self, cid: &str, detail: &str) -> Result<(), IuError> {
        let body = ReportCorrupt { cid: cid.to_string(), detail: detail.to_string() }.encode_to_vec();
        let subject = iu::command(iu::cmd::REPORT_CORRUPT).map_err(|e| IuError::Internal(e.to_string()))?;
        self.request_raw(&subject, body.into(), self.timeout).await.map(|_| ())
    }

    /// Uploads the file at `path` and creates a unit of it from `template` (its `cid` is set;
    /// an empty name becomes the file name, an empty media type a guess from the extension).
    pub async fn put_file(
        &self,
        path: impl AsRef<Path>,
        template: CreateUnit,
        progress: &mut dyn Progress,
    ) -> Result<(ContentCommitted, CommandResult), IuError> {
        let path = path.as_ref();
        let committed = self.put_path(path, progress).await?;
        let mut command = template;
        command.cid = committed.cid.clone();
        if command.name.is_empty() {
            command.name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        }
        if command.media_type.is_empty() {
            command.media_type = guess_media_type(path).to_string();
        }
        let result = self.create(command).await?;
        Ok((committed, result))
    }

    /// Uploads the file at `path` and makes it the new version of `template.unit_id` (its
    /// `cid` is set; empty name and media type stay unchanged).
    pub async fn new_version_from_file(
        &self,
        path: impl AsRef<Path>,
        template: NewVersion,
        progress: &mut dyn Progress,
    ) -> Result<(ContentCommitted, CommandResult), IuError> {
        let committed = self.put_path(path.as_ref(), progress).await?;
        let mut command = template;
        command.cid = committed.cid.clone();
        let result = self.new_version(command).await?;
        Ok((committed, result))
    }

    async fn put_path(&self, path: &Path, progress: &mut dyn Progress) -> Result<ContentCommitted, IuError> {
        let with_path = |e: io::Error| IuError::Io(io::Error::new(e.kind(), format!("{}: {e}", path.display())));
        let file = tokio::fs::File::open(path).await.map_err(with_path)?;
        let meta = file.metadata().await.map_err(with_path)?;
        if !meta.is_file() {
            return Err(IuError::BadRequest(format!("{} is not a regular file", path.display())));
        }
        progress.start(Some(meta.len()));
        let committed = self.put_content(file, progress).await?;
        progress.finish();
        Ok(committed)
    }
}

fn parse_cid(cid: &str) -> Result<Cid, IuError> {
    cid.parse::<Cid>().map_err(|e| IuError::BadRequest(e.to_string()))
}

/// Counts the bytes an upload reads and reports them.
struct Counting<'a, R> {
    inner: R,
    done: u64,
    progress: &'a mut dyn Progress,
}

impl<R: AsyncRead + Unpin> AsyncRead for Counting<'_, R> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            let n = buf.filled().len() - before;
            if n > 0 {
                this.done += n as u64;
                this.progress.update(this.done);
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counting_reader_reports_progress() {
        let data = vec![7u8; 10_000];
        let mut seen = Vec::new();
        let mut progress = |n: u64| seen.push(n);
        let mut r = Counting { inner: &data[..], done: 0, progress: &mut progress };
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, data);
        assert_eq!(seen.last(), Some(&10_000));
        assert!(seen.windows(2).all(|w| w[0] < w[1]));
    }
}
