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
mod commands;
mod content;
mod error;
pub mod json;
mod media;
mod queries;

use std::time::Duration;

use async_nats::jetstream::{self, object_store::ObjectStore};
use bytes::Bytes;
use prost::Message;

pub use error::IuError;
pub use media::{OCTET_STREAM, guess_media_type};

/// Protobuf types of the information-unit contract, re-exported for callers.
pub use cim_events::proto::iu as proto;
pub use commands::{IuCommand, header, header_with_id};
pub use content::{ContentRead, NoProgress, Progress, Upload, leader_object_info};
pub use queries::UnitPages;

/// Default time a request may take, all its attempts together.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default wait for the answer of the first attempt of a repeatable request (each further
/// attempt waits twice as long, within the request's timeout): a service replaced while it
/// held the request costs this, not the whole timeout.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default timeout of a commit: the service reads the whole upload to compute its CID.
pub const DEFAULT_COMMIT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default chunk size of uploads (each chunk is one JetStream message).
pub const DEFAULT_CHUNK_SIZE: usize = 128 * 1024;
/// Pauses between attempts of a retried request: 100ms, 200ms, 400ms, 800ms, 1.6s.
pub fn default_retry_delays() -> Vec<Duration> {
    (0..5).map(|i| Duration::from_millis(100 << i)).collect()
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
    content_stream: tokio::sync::OnceCell<jetstream::stream::Stream>,
    timeout: Duration,
    attempt_timeout: Duration,
    commit_timeout: Duration,
    retry_delays: Vec<Duration>,
    chunk_size: usize,
    /// The highest stream sequence a command of this client (or a clone) wrote: its queries
    /// ask for at least that much (read your writes while the projection catches up).
    written: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Queries ask for the newest state the log holds (a separate process that wrote before).
    latest: bool,
    /// Content this client (or a clone) has read whole and found to match its CID: a range of
    /// it is then read only as far as the range goes.
    verified: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl std::fmt::Debug for IuClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IuClient")
            .field("timeout", &self.timeout)
            .field("attempt_timeout", &self.attempt_timeout)
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
            content_stream: tokio::sync::OnceCell::new(),
            timeout: DEFAULT_TIMEOUT,
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
            commit_timeout: DEFAULT_COMMIT_TIMEOUT,
            retry_delays: default_retry_delays(),
            chunk_size: DEFAULT_CHUNK_SIZE,
            written: Default::default(),
            latest: false,
            verified: Default::default(),
        }
    }

    /// Queries answer with the newest state the log holds when asked, not what the projection
    /// has applied so far: for a process that cannot know what was written before it (a
    /// command line run after another). Costs a read of the unit's history per get.
    pub fn latest(mut self) -> IuClient {
        self.latest = true;
        self
    }

    /// The stream sequence queries ask the projection to have reached: the newest this client
    /// wrote, or (with [`IuClient::latest`]) everything.
    pub fn min_sequence(&self) -> u64 {
        if self.latest { u64::MAX } else { self.written.load(std::sync::atomic::Ordering::Acquire) }
    }

    /// Makes queries reflect a write with stream sequence `sequence` (one made elsewhere).
    pub fn saw(&self, sequence: u64) {
        self.written.fetch_max(sequence, std::sync::atomic::Ordering::AcqRel);
    }

    /// How long a request may take, all its attempts together (default 10s).
    pub fn timeout(mut self, timeout: Duration) -> IuClient {
        self.timeout = timeout;
        self
    }

    /// How long the first attempt of a repeatable request waits for its answer (default 2s);
    /// each further attempt waits twice as long as the one before, within the timeout.
    pub fn attempt_timeout(mut self, timeout: Duration) -> IuClient {
        self.attempt_timeout = timeout.max(Duration::from_millis(10));
        self
    }

    /// Timeout of a commit (default 60s).
    pub fn commit_timeout(mut self, timeout: Duration) -> IuClient {
        self.commit_timeout = timeout;
        self
    }

    /// Pauses between attempts (the last one repeats while the timeout allows); empty = never
    /// retry.
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

    // ---- transport ----

    /// One request and its retries. A repeatable request (`Retry::Idempotent`: a query, or a
    /// command with a request id) is sent in attempts of growing length within `timeout`, so
    /// a service that died holding it costs one short attempt; any other request waits the
    /// whole `timeout` and is repeated only when it certainly was not carried out.
    async fn call<R: Message + Default>(
        &self,
        subject: Result<String, cim_events::ContractError>,
        body: Bytes,
        timeout: Duration,
        retry: Retry,
    ) -> Result<R, IuError> {
        let subject = subject.map_err(|e| IuError::Internal(e.to_string()))?;
        let msg = self.call_with(&subject, None, body, timeout, retry).await?;
        Ok(R::decode(msg.payload)?)
    }

    /// [`IuClient::call`] with request headers, returning the reply.
    async fn call_with(
        &self,
        subject: &str,
        headers: Option<async_nats::HeaderMap>,
        body: Bytes,
        timeout: Duration,
        retry: Retry,
    ) -> Result<async_nats::Message, IuError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut wait = match retry {
            Retry::Idempotent if !self.retry_delays.is_empty() => self.attempt_timeout.min(timeout),
            _ => timeout,
        };
        let mut attempt = 0;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let this = wait.min(left).max(Duration::from_millis(10));
            match self.request_with(subject, headers.clone(), body.clone(), this).await {
                Ok(msg) => return Ok(msg),
                Err(e) if retry.allows(&e) && !self.retry_delays.is_empty() => {
                    let pause = self.retry_delays[attempt.min(self.retry_delays.len() - 1)];
                    let more = match retry {
                        Retry::Idempotent => deadline.saturating_duration_since(tokio::time::Instant::now()) > pause,
                        Retry::NotProcessed => attempt < self.retry_delays.len(),
                    };
                    if !more {
                        return Err(e);
                    }
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                    wait = wait.saturating_mul(2);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{CreateUnit, ListUnits, TagUnit};

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
}
