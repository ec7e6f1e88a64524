//! `cim-iu-client`: the Rust client of the CIM information-unit service.
//!
//! - **Content** goes straight to the JetStream object store bucket
//!   [`iu::CONTENT_BUCKET`](cim_events::iu::CONTENT_BUCKET) in fixed-size chunks (memory does not
//!   grow with the size): an upload is written under `upload.<uuidv7>` and then committed by the
//!   service ([`IuClient::put_content`]); a download is checked against the store's recorded
//!   digest, streamed and verified to the last byte by the object store reader, and a mismatch is
//!   reported to the service and returned as [`IuError::Corrupt`].
//! - **Commands** ([`IuClient::execute`] and its shorthands) get a fresh UUIDv7 request id when
//!   the caller leaves it empty, and are retried with that same id on timeout, no responders and
//!   503, so a retry never writes twice.
//! - **Queries** return the protobuf messages of `iu.proto`; [`json`] renders them as JSON.
//!
//! Every subject and bucket name comes from [`cim_events::iu`].

mod error;
pub mod json;
mod media;

use std::{
    io,
    path::Path,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use async_nats::jetstream::{
    self,
    object_store::{GetErrorKind, InfoErrorKind, ObjectMetadata, ObjectStore, PutErrorKind},
};
use bytes::Bytes;
use cim_events::{
    Cid, iu,
    proto::iu::{
        CommandHeader, CommandResult, CommitContent, ContentCommitted, CreateUnit, DeleteUnit, GetHistory, GetLinks,
        GetType, GetUnit, History, LinkUnit, Links, ListUnits, NewVersion, ProjectionStatus, Rebuild, RebuildStarted,
        RegisterType, ReportCorrupt, SetAttributes, TagUnit, Unit, UnitList, UnitType, UnlinkUnit, UntagUnit,
    },
};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

pub use error::IuError;
pub use media::{OCTET_STREAM, guess_media_type};

/// Protobuf types of the information-unit contract, re-exported for callers.
pub use cim_events::proto::iu as proto;

/// Default timeout of one request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default timeout of a commit: the service reads the whole upload to compute its CID.
pub const DEFAULT_COMMIT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default chunk size of uploads (each chunk is one JetStream message).
pub const DEFAULT_CHUNK_SIZE: usize = 128 * 1024;
/// Size of the buffer downloads are read through.
const READ_BUFFER: usize = 128 * 1024;

/// Pauses between attempts of a retried request: 100ms, 200ms, 400ms, 800ms, 1.6s.
pub fn default_retry_delays() -> Vec<Duration> {
    (0..5).map(|i| Duration::from_millis(100 << i)).collect()
}

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

/// A command of the information-unit service: it has an endpoint and a [`CommandHeader`].
pub trait IuCommand: Message + Default + Send + Sync {
    /// The endpoint name (`iu::cmd::*`).
    const ENDPOINT: &'static str;
    fn header_mut(&mut self) -> &mut Option<CommandHeader>;
}

macro_rules! iu_command {
    ($($t:ty => $endpoint:expr),* $(,)?) => {$(
        impl IuCommand for $t {
            const ENDPOINT: &'static str = $endpoint;
            fn header_mut(&mut self) -> &mut Option<CommandHeader> {
                &mut self.header
            }
        }
    )*};
}

iu_command! {
    CreateUnit => iu::cmd::CREATE,
    NewVersion => iu::cmd::NEW_VERSION,
    TagUnit => iu::cmd::TAG,
    UntagUnit => iu::cmd::UNTAG,
    SetAttributes => iu::cmd::SET_ATTRIBUTES,
    LinkUnit => iu::cmd::LINK,
    UnlinkUnit => iu::cmd::UNLINK,
    DeleteUnit => iu::cmd::DELETE,
    RegisterType => iu::cmd::REGISTER_TYPE,
}

/// A command header with an expected version (0 = don't check) and a request id to be filled
/// in by the client.
pub fn header(expected_version: u64) -> Option<CommandHeader> {
    Some(CommandHeader { request_id: String::new(), expected_version })
}

/// A command header with the caller's own request id, for retries across processes.
pub fn header_with_id(request_id: impl Into<String>, expected_version: u64) -> Option<CommandHeader> {
    Some(CommandHeader { request_id: request_id.into(), expected_version })
}

/// Which failures a request may be repeated after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Retry {
    /// Only when the request was certainly not carried out (no responders, 503).
    NotProcessed,
    /// Also after a timeout: the request is idempotent (a query, or a command with a request id).
    Idempotent,
}

impl Retry {
    fn allows(self, e: &IuError) -> bool {
        match self {
            Retry::NotProcessed => e.is_unavailable(),
            Retry::Idempotent => e.is_unavailable() || e.is_timeout(),
        }
    }
}

/// Client of the information-unit service. Cheap to clone.
#[derive(Clone)]
pub struct IuClient {
    client: async_nats::Client,
    js: jetstream::Context,
    store: tokio::sync::OnceCell<ObjectStore>,
    timeout: Duration,
    commit_timeout: Duration,
    retry_delays: Vec<Duration>,
    chunk_size: usize,
}

impl std::fmt::Debug for IuClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IuClient")
            .field("timeout", &self.timeout)
            .field("commit_timeout", &self.commit_timeout)
            .field("retry_delays", &self.retry_delays)
            .field("chunk_size", &self.chunk_size)
            .finish_non_exhaustive()
    }
}

impl IuClient {
    /// A client whose object store is in the connection's own JetStream domain.
    pub fn new(client: async_nats::Client) -> IuClient {
        let js = jetstream::new(client.clone());
        IuClient::build(client, js)
    }

    /// A client whose object store is in JetStream domain `domain` (e.g. a leaf node's).
    pub fn with_domain(client: async_nats::Client, domain: impl AsRef<str>) -> IuClient {
        let js = jetstream::with_domain(client.clone(), domain);
        IuClient::build(client, js)
    }

    fn build(client: async_nats::Client, js: jetstream::Context) -> IuClient {
        IuClient {
            client,
            js,
            store: tokio::sync::OnceCell::new(),
            timeout: DEFAULT_TIMEOUT,
            commit_timeout: DEFAULT_COMMIT_TIMEOUT,
            retry_delays: default_retry_delays(),
            chunk_size: DEFAULT_CHUNK_SIZE,
        }
    }

    /// Timeout of each request attempt (default 10s).
    pub fn timeout(mut self, timeout: Duration) -> IuClient {
        self.timeout = timeout;
        self
    }

    /// Timeout of a commit (default 60s).
    pub fn commit_timeout(mut self, timeout: Duration) -> IuClient {
        self.commit_timeout = timeout;
        self
    }

    /// Pauses between attempts; empty = never retry. The number of retries is its length.
    pub fn retry_delays(mut self, delays: Vec<Duration>) -> IuClient {
        self.retry_delays = delays;
        self
    }

    /// Chunk size of uploads (default 128 KiB; must stay below the server's max payload).
    pub fn chunk_size(mut self, bytes: usize) -> IuClient {
        self.chunk_size = bytes.max(1);
        self
    }

    /// The NATS connection.
    pub fn nats(&self) -> &async_nats::Client {
        &self.client
    }

    // ---- content ----

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
            Ok(info) => Ok(Upload { name, size: info.size as u64 }),
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

    /// Asks the service to turn a finished upload into content addressed by its CID.
    pub async fn commit(&self, upload: &str) -> Result<ContentCommitted, IuError> {
        let body = CommitContent { upload: upload.to_string() }.encode_to_vec();
        self.call(iu::command(iu::cmd::COMMIT), body.into(), self.commit_timeout, Retry::NotProcessed).await
    }

    /// Uploads the bytes of `reader` and commits them: the reply names their CID and whether
    /// they were already stored. Memory stays bounded whatever the size.
    pub async fn put_content<R: AsyncRead + Unpin + Send>(
        &self,
        reader: R,
        progress: &mut dyn Progress,
    ) -> Result<ContentCommitted, IuError> {
        let upload = self.upload(reader, progress).await?;
        self.commit(&upload.name).await
    }

    /// Uploads a byte slice and commits it.
    pub async fn put_bytes(&self, bytes: &[u8]) -> Result<ContentCommitted, IuError> {
        self.put_content(bytes, &mut NoProgress).await
    }

    /// Size of the stored content `cid`.
    pub async fn content_size(&self, cid: &str) -> Result<u64, IuError> {
        let cid = parse_cid(cid)?;
        let store = self.content_store().await?;
        let info = self.object_info(&store, &cid).await?;
        Ok(info.size as u64)
    }

    async fn object_info(
        &self,
        store: &ObjectStore,
        cid: &Cid,
    ) -> Result<jetstream::object_store::ObjectInfo, IuError> {
        let info = store.info(cid.to_string()).await.map_err(|e| match e.kind() {
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
        progress.start(Some(size));
        let mut object = store.get(cid.to_string()).await.map_err(|e| match e.kind() {
            GetErrorKind::NotFound => IuError::NotFound(format!("content {cid} is not stored")),
            GetErrorKind::TimedOut => IuError::Timeout(format!("reading content {cid}: {e}")),
            _ => IuError::Nats(format!("reading content {cid}: {e}")),
        })?;
        // The bytes are verified once, by the object store reader: it hashes every chunk and
        // fails with InvalidData at the end unless they match the recorded digest, which was
        // checked against the CID above. Hashing them a second time here cost a fifth of the
        // download rate (docs/benchmarks.md).
        let mut buf = vec![0u8; READ_BUFFER];
        let mut pos = 0u64;
        loop {
            let n = match object.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    let detail = format!("its chunks do not match the recorded digest ({e}) after {pos} bytes");
                    return Err(self.corrupt(&cid, detail).await);
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
            return Err(self.corrupt(&cid, detail).await);
        }
        writer.flush().await?;
        progress.finish();
        Ok(ContentRead { cid: cid.to_string(), size, written: end - start })
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

    // ---- commands ----

    /// Sends a command: fills in a fresh UUIDv7 request id when it has none, and retries the
    /// very same request (same id) on timeout, no responders and 503.
    pub async fn execute<C: IuCommand>(&self, command: C) -> Result<CommandResult, IuError> {
        self.execute_with(command, None).await
    }

    /// Like [`IuClient::execute`], on behalf of `parent`: the events the command writes inherit
    /// its correlation id and take its id as causation (provenance of derived work).
    pub async fn execute_caused_by<C: IuCommand>(
        &self,
        command: C,
        parent: &cim_events::Envelope,
    ) -> Result<CommandResult, IuError> {
        self.execute_with(command, Some(parent.to_headers())).await
    }

    async fn execute_with<C: IuCommand>(
        &self,
        mut command: C,
        headers: Option<async_nats::HeaderMap>,
    ) -> Result<CommandResult, IuError> {
        let header = command.header_mut().get_or_insert_with(CommandHeader::default);
        if header.request_id.is_empty() {
            header.request_id = uuid::Uuid::now_v7().to_string();
        }
        let body = command.encode_to_vec();
        let subject = iu::command(C::ENDPOINT).map_err(|e| IuError::Internal(e.to_string()))?;
        let mut attempt = 0;
        loop {
            match self.request_with(&subject, headers.clone(), body.clone().into(), self.timeout).await {
                Ok(msg) => return Ok(CommandResult::decode(msg.payload)?),
                Err(e) if Retry::Idempotent.allows(&e) && attempt < self.retry_delays.len() => {
                    tokio::time::sleep(self.retry_delays[attempt]).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub async fn create(&self, command: CreateUnit) -> Result<CommandResult, IuError> {
        self.execute(command).await
    }
    pub async fn new_version(&self, command: NewVersion) -> Result<CommandResult, IuError> {
        self.execute(command).await
    }
    pub async fn tag(&self, command: TagUnit) -> Result<CommandResult, IuError> {
        self.execute(command).await
    }
    pub async fn untag(&self, command: UntagUnit) -> Result<CommandResult, IuError> {
        self.execute(command).await
    }
    pub async fn set_attributes(&self, command: SetAttributes) -> Result<CommandResult, IuError> {
        self.execute(command).await
    }
    pub async fn link(&self, command: LinkUnit) -> Result<CommandResult, IuError> {
        self.execute(command).await
    }
    pub async fn unlink(&self, command: UnlinkUnit) -> Result<CommandResult, IuError> {
        self.execute(command).await
    }
    pub async fn delete(&self, command: DeleteUnit) -> Result<CommandResult, IuError> {
        self.execute(command).await
    }
    pub async fn register_type(&self, command: RegisterType) -> Result<CommandResult, IuError> {
        self.execute(command).await
    }

    /// Asks the service to drop its projections and rebuild them by replay.
    pub async fn rebuild(&self) -> Result<RebuildStarted, IuError> {
        let body = Rebuild {}.encode_to_vec();
        self.call(iu::command(iu::cmd::REBUILD), body.into(), self.timeout, Retry::NotProcessed).await
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

    // ---- queries ----

    pub async fn get_unit(&self, query: GetUnit) -> Result<Unit, IuError> {
        self.query(iu::qry::GET, &query).await
    }

    /// The current state of a unit.
    pub async fn unit(&self, unit_id: &str) -> Result<Unit, IuError> {
        self.get_unit(GetUnit { unit_id: unit_id.to_string(), ..Default::default() }).await
    }

    pub async fn history(&self, unit_id: &str) -> Result<History, IuError> {
        self.query(iu::qry::HISTORY, &GetHistory { unit_id: unit_id.to_string() }).await
    }

    /// One page of units.
    pub async fn list(&self, query: ListUnits) -> Result<UnitList, IuError> {
        self.query(iu::qry::LIST, &query).await
    }

    /// Pages through `query` (from its `page_token`).
    pub fn pages(&self, query: ListUnits) -> UnitPages<'_> {
        UnitPages { client: self, query, done: false }
    }

    /// Every unit matching `query`, all pages.
    pub async fn list_all(&self, query: ListUnits) -> Result<Vec<Unit>, IuError> {
        let mut pages = self.pages(query);
        let mut all = Vec::new();
        while let Some(mut page) = pages.next_page().await? {
            all.append(&mut page);
        }
        Ok(all)
    }

    pub async fn links(&self, unit_id: &str) -> Result<Links, IuError> {
        self.query(iu::qry::LINKS, &GetLinks { unit_id: unit_id.to_string() }).await
    }

    /// Would `attributes` be accepted for `unit_type`? Writes nothing.
    pub async fn validate(
        &self,
        unit_type: &str,
        attributes: std::collections::HashMap<String, String>,
    ) -> Result<cim_events::proto::iu::Validation, IuError> {
        self.query(
            iu::qry::VALIDATE,
            &cim_events::proto::iu::ValidateAttributes { unit_type: unit_type.to_string(), attributes },
        )
        .await
    }

    pub async fn get_type(&self, name: &str) -> Result<UnitType, IuError> {
        self.query(iu::qry::TYPE, &GetType { name: name.to_string() }).await
    }

    /// The projection's progress (the request has an empty body).
    pub async fn status(&self) -> Result<ProjectionStatus, IuError> {
        self.call(iu::query(iu::qry::STATUS), Bytes::new(), self.timeout, Retry::Idempotent).await
    }

    async fn query<Q: Message, R: Message + Default>(&self, endpoint: &str, query: &Q) -> Result<R, IuError> {
        self.call(iu::query(endpoint), query.encode_to_vec().into(), self.timeout, Retry::Idempotent).await
    }

    // ---- transport ----

    async fn call<R: Message + Default>(
        &self,
        subject: Result<String, cim_events::ContractError>,
        body: Bytes,
        timeout: Duration,
        retry: Retry,
    ) -> Result<R, IuError> {
        let subject = subject.map_err(|e| IuError::Internal(e.to_string()))?;
        let mut attempt = 0;
        loop {
            match self.request_raw(&subject, body.clone(), timeout).await {
                Ok(msg) => return Ok(R::decode(msg.payload)?),
                Err(e) if retry.allows(&e) && attempt < self.retry_delays.len() => {
                    tokio::time::sleep(self.retry_delays[attempt]).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One request; a reply carrying `Nats-Service-Error-Code` becomes the matching error.
    async fn request_raw(&self, subject: &str, body: Bytes, timeout: Duration) -> Result<async_nats::Message, IuError> {
        self.request_with(subject, None, body, timeout).await
    }

    async fn request_with(
        &self,
        subject: &str,
        headers: Option<async_nats::HeaderMap>,
        body: Bytes,
        timeout: Duration,
    ) -> Result<async_nats::Message, IuError> {
        use async_nats::RequestErrorKind;
        let mut request = async_nats::Request::new().payload(body).timeout(Some(timeout));
        if let Some(h) = headers {
            request = request.headers(h);
        }
        let msg = self.client.send_request(subject.to_string(), request).await.map_err(|e| match e.kind() {
            RequestErrorKind::TimedOut => IuError::Timeout(format!("no reply on {subject} within {timeout:?}")),
            RequestErrorKind::NoResponders => {
                IuError::Unavailable(format!("no information-unit service answers on {subject}"))
            }
            _ => IuError::Nats(format!("request on {subject}: {e}")),
        })?;
        if let Some(err) = IuError::from_reply_headers(msg.headers.as_ref()) {
            return Err(err);
        }
        Ok(msg)
    }
}

fn parse_cid(cid: &str) -> Result<Cid, IuError> {
    cid.parse::<Cid>().map_err(|e| IuError::BadRequest(e.to_string()))
}

/// Pages of a unit listing; see [`IuClient::pages`].
#[derive(Debug)]
pub struct UnitPages<'a> {
    client: &'a IuClient,
    query: ListUnits,
    done: bool,
}

impl UnitPages<'_> {
    /// The next page, or `None` after the last one.
    pub async fn next_page(&mut self) -> Result<Option<Vec<Unit>>, IuError> {
        if self.done {
            return Ok(None);
        }
        let page = self.client.list(self.query.clone()).await?;
        if page.next_page_token.is_empty() || page.next_page_token == self.query.page_token {
            self.done = true;
        }
        self.query.page_token = page.next_page_token;
        Ok(Some(page.units))
    }
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

    #[test]
    fn retry_delays_double() {
        let d = default_retry_delays();
        assert_eq!(d.first(), Some(&Duration::from_millis(100)));
        assert_eq!(d.last(), Some(&Duration::from_millis(1600)));
        assert_eq!(d.len(), 5);
    }

    #[test]
    fn retry_policy() {
        let timeout = IuError::Timeout("t".into());
        let unavailable = IuError::Unavailable("u".into());
        let conflict = IuError::Conflict("c".into());
        assert!(Retry::Idempotent.allows(&timeout));
        assert!(Retry::Idempotent.allows(&unavailable));
        assert!(!Retry::Idempotent.allows(&conflict));
        assert!(!Retry::NotProcessed.allows(&timeout));
        assert!(Retry::NotProcessed.allows(&unavailable));
    }

    #[test]
    fn commands_have_endpoints_and_headers() {
        let mut c = TagUnit { header: header(3), unit_id: "u".into(), tags: vec!["t".into()] };
        assert_eq!(<TagUnit as IuCommand>::ENDPOINT, iu::cmd::TAG);
        assert_eq!(c.header_mut().as_ref().unwrap().expected_version, 3);
        assert_eq!(header_with_id("r1", 0).unwrap().request_id, "r1");
        for e in [CreateUnit::ENDPOINT, NewVersion::ENDPOINT, DeleteUnit::ENDPOINT, RegisterType::ENDPOINT] {
            iu::command(e).unwrap();
        }
    }

    /// The client's futures can be spawned.
    #[allow(dead_code, clippy::let_underscore_future)]
    fn futures_are_send(c: &IuClient, mut w: Vec<u8>) {
        fn send<T: Send>(_: T) {}
        let mut p = NoProgress;
        send(c.put_content(&b""[..], &mut p));
        send(c.get_content("x", None, &mut w, &mut NoProgress));
        send(c.put_file("x", CreateUnit::default(), &mut NoProgress));
        send(c.execute(TagUnit::default()));
        send(c.list_all(ListUnits::default()));
        send(c.status());
    }

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
