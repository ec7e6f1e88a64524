//! What a running instance shares with its handlers: the connection, its settings and
//! metrics, readiness, stopping and draining, background tasks, and publishing with a root
//! envelope.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use async_nats::jetstream;
use cim_events::{
    CONTRACT_VERSION, Envelope, Payload, envelope::source, payload::encode, proto::runtime::ServiceAnnounced,
};

use crate::{config::CommonSettings, metrics::Metrics, service::ServiceDef, telemetry};

/// What a running instance shares with its handlers.
#[derive(Clone)]
pub struct Ctx(pub(crate) Arc<Shared>);

pub(crate) struct Shared {
    pub(crate) def: ServiceDef,
    pub(crate) settings: CommonSettings,
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
    pub(crate) metrics: Metrics,
    pub(crate) ready: AtomicBool,
    pub(crate) started: Instant,
    pub(crate) http_addr: SocketAddr,
    pub(crate) subjects: std::sync::OnceLock<Vec<String>>,
    pub(crate) stopping: tokio::sync::watch::Sender<bool>,
    pub(crate) background: std::sync::Mutex<Vec<(String, tokio::task::JoinHandle<()>)>>,
    /// Fresh per process start, so the registry tells a restart from a duplicate instance id.
    pub(crate) incarnation: String,
    /// Told to drain (takes no new work); `drained` once nothing is held any more.
    pub(crate) draining: AtomicBool,
    pub(crate) drained: AtomicBool,
    /// Why the service is degraded (ready, but something it looks after is not right).
    pub(crate) degraded: crate::health::Degraded,
    /// Counts connections to NATS (the first and every reconnect).
    pub(crate) connections: tokio::sync::watch::Receiver<u64>,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx").field("instance", &self.0.settings.instance_id).finish()
    }
}

impl Ctx {
    pub fn client(&self) -> &async_nats::Client {
        &self.0.client
    }
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.0.js
    }
    pub fn settings(&self) -> &CommonSettings {
        &self.0.settings
    }
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }
    pub fn is_ready(&self) -> bool {
        self.0.ready.load(Ordering::SeqCst)
    }
    /// `ce-source` of messages this instance produces.
    pub fn source(&self) -> String {
        let s = &self.0.settings;
        source(&s.node, s.component.service_name(), &s.instance_id)
    }

    /// Resolves once the service stops taking work — at shutdown, or when its node is drained
    /// — so background loops that select on it stop their intake and return.
    pub async fn stopping(&self) {
        let mut rx = self.0.stopping.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// The stop signal as a watch (`true` once stopping), for library code that runs without
    /// a `Ctx` (the storage manager's archive loops).
    pub fn stop_receiver(&self) -> tokio::sync::watch::Receiver<bool> {
        self.0.stopping.subscribe()
    }

    pub fn is_stopping(&self) -> bool {
        *self.0.stopping.borrow()
    }

    /// Where the service says it is degraded: ready for work, but something it looks after is
    /// not as it should be. Shown by heartbeats, `/readyz`, `cim_degraded`, `cimctl status`.
    pub fn degraded(&self) -> &crate::health::Degraded {
        &self.0.degraded
    }

    /// Changes on every connection to NATS (the first, then each reconnect). A follower of a
    /// stream (an ordered consumer, a KV watch) waits on it to start over at once after a
    /// server restart instead of waiting for its heartbeats to say the consumer is gone.
    pub fn connections(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.connections.clone()
    }

    /// True once the instance was told to drain (its node is being drained).
    pub fn is_draining(&self) -> bool {
        self.0.draining.load(Ordering::SeqCst)
    }

    /// True once a drain finished: no endpoints, no background intake, nothing in flight.
    pub fn is_drained(&self) -> bool {
        self.0.drained.load(Ordering::SeqCst)
    }

    /// Waits `d`, or less if the service stops taking work meanwhile: `true` when the wait ran
    /// out, `false` when the caller should stop (the one pause every background loop uses).
    pub async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.stopping() => false,
            _ = tokio::time::sleep(d) => !self.is_stopping(),
        }
    }

    /// Runs `attempt` until it succeeds, logging each failure as `what` and backing off from
    /// 100 ms to 5 s; `None` once the service stops. Opening a durable consumer, a bucket or a
    /// connection that may not be there yet (NATS restarting, a stream re-provisioned).
    pub async fn retry_until_stopped<T, E, F, Fut>(&self, what: &str, mut attempt: F) -> Option<T>
    where
        E: std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.is_stopping() {
                return None;
            }
            match attempt().await {
                Ok(v) => return Some(v),
                Err(e) => tracing::warn!(error = %e, retry_in = ?backoff, "cannot open {what}; retrying"),
            }
            if !self.pause(backoff).await {
                return None;
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// A client of the information-unit service in this instance's JetStream domain.
    pub fn iu_client(&self) -> cim_iu_client::IuClient {
        match &self.0.settings.js_domain {
            Some(d) => cim_iu_client::IuClient::with_domain(self.0.client.clone(), d),
            None => cim_iu_client::IuClient::new(self.0.client.clone()),
        }
    }

    /// This process's incarnation id (see [`ServiceAnnounced::incarnation`]).
    pub fn incarnation(&self) -> &str {
        &self.0.incarnation
    }

    /// Runs `fut` until shutdown; at shutdown it gets the grace period to notice
    /// [`Ctx::stopping`] and return, then it is aborted.
    pub fn spawn(&self, name: &str, fut: impl Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(fut);
        self.0.background.lock().unwrap_or_else(|e| e.into_inner()).push((name.to_string(), handle));
    }

    pub(crate) fn announcement(&self) -> ServiceAnnounced {
        let s = &self.0.settings;
        ServiceAnnounced {
            component: s.component.token().to_string(),
            service: s.component.service_name().to_string(),
            version: self.0.def.version.to_string(),
            instance_id: s.instance_id.clone(),
            node: s.node.clone(),
            contract_version: CONTRACT_VERSION,
            capabilities: self.0.def.capabilities.clone(),
            subjects: self.0.subjects.get().cloned().unwrap_or_default(),
            http_addr: self.0.http_addr.to_string(),
            incarnation: self.0.incarnation.clone(),
            heartbeat_interval_ms: s.heartbeat_interval.as_millis() as u64,
        }
    }

    /// Publishes a payload with a fresh root envelope and the current trace context.
    pub async fn publish_root<P: Payload>(&self, subject: String, payload: &P) -> Result<(), async_nats::PublishError> {
        let (mut headers, body) = encode(&Envelope::root::<P>(self.source()), payload);
        telemetry::inject_current(&mut headers);
        self.0.client.publish_with_headers(subject, headers, body).await
    }
}
