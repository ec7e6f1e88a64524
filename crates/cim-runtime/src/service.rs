//! The life of a service instance: connect, provision, serve endpoints over the NATS micro
//! services protocol, announce and beat, report health, and shut down gracefully.
//!
//! The parts of that life are split over sibling modules: `ctx` (what a running instance
//! shares with its handlers), `serve` (one endpoint served with bounded concurrency, and the
//! `describe` query), `health` (readiness, re-provisioning and heartbeats), `control` (the
//! control listener: re-announce and drain, and stopping intake at drain or shutdown).

use std::{
    collections::HashMap,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use async_nats::{jetstream, service::ServiceExt};
use cim_events::{
    CONTRACT_VERSION, Component,
    proto::runtime::ServiceStopped,
    resources,
    subject::{self, Lifecycle},
};
use futures::StreamExt;
use tokio::sync::{Notify, Semaphore};
use tracing::Instrument;

pub use crate::ctx::Ctx;
use crate::{
    config::CommonSettings,
    control::{on_control, stop_intake, subscribe_control},
    ctx::Shared,
    endpoint::{BoxFuture, Endpoint},
    health::watch_health,
    http,
    metrics::Metrics,
    provision::{self, ProvisionError},
    serve::{describe, serve_endpoint},
    telemetry,
};

/// What a service is: its component, version and capabilities.
#[derive(Clone, Debug)]
pub struct ServiceDef {
    pub component: Component,
    pub version: &'static str,
    pub description: &'static str,
    pub capabilities: Vec<String>,
}

type SetupFn = Box<dyn FnOnce(Ctx) -> BoxFuture<anyhow::Result<Vec<Endpoint>>> + Send>;

/// A service ready to run: its definition, endpoints, and an optional setup step.
pub struct Service {
    def: ServiceDef,
    endpoints: Vec<Endpoint>,
    setup: Option<SetupFn>,
}

impl Service {
    pub fn new(def: ServiceDef) -> Service {
        Service { def, endpoints: Vec::new(), setup: None }
    }

    pub fn endpoint(mut self, e: Endpoint) -> Service {
        self.endpoints.push(e);
        self
    }

    /// Runs once NATS is connected and everything is provisioned, before any endpoint serves:
    /// builds the component's state, starts its background work ([`Ctx::spawn`]) and returns
    /// its endpoints. An error stops the service.
    pub fn setup<F, Fut>(mut self, f: F) -> Service
    where
        F: FnOnce(Ctx) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<Vec<Endpoint>>> + Send + 'static,
    {
        self.setup = Some(Box::new(move |ctx| Box::pin(f(ctx))));
        self
    }

    /// Runs until `shutdown` completes, then stops taking work, lets in-flight requests finish
    /// within the grace period, says goodbye and drains the connection.
    pub async fn run(self, settings: CommonSettings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let component = settings.component;
        let metrics = Metrics::new(component.service_name(), &settings.instance_id);
        let health = http::Health::new(metrics.clone());
        let listener = http::bind_waiting(settings.http_listen, "health and metrics", http::PORT_WAIT).await?;
        let http_addr = listener.local_addr()?;
        let stop_http = Arc::new(Notify::new());
        let http_task = tokio::spawn(http::serve(listener, health.clone(), stop_http.clone()));
        tracing::info!(service = component.service_name(), instance = %settings.instance_id, %http_addr, "starting");

        tokio::pin!(shutdown);
        let reconnected = Arc::new(Notify::new());
        let (connections, connections_rx) = tokio::sync::watch::channel(0u64);
        let client = tokio::select! {
            c = connect(&settings, &metrics, reconnected.clone(), connections) => c?,
            _ = &mut shutdown => {
                tracing::info!("shutdown requested before NATS was reachable");
                stop_http.notify_one();
                let _ = http_task.await;
                return Ok(());
            }
        };
        let js = match &settings.js_domain {
            Some(domain) => jetstream::with_domain(client.clone(), domain),
            None => jetstream::new(client.clone()),
        };
        tokio::select! {
            r = provision_with_retry(&js, &settings) => r?,
            _ = &mut shutdown => {
                stop_http.notify_one();
                let _ = client.drain().await;
                let _ = http_task.await;
                return Ok(());
            }
        }

        let (stopping, _) = tokio::sync::watch::channel(false);
        let ctx = Ctx(Arc::new(Shared {
            def: self.def.clone(),
            settings: settings.clone(),
            client: client.clone(),
            js: js.clone(),
            metrics: metrics.clone(),
            ready: AtomicBool::new(false),
            started: Instant::now(),
            http_addr,
            subjects: std::sync::OnceLock::new(),
            stopping,
            background: std::sync::Mutex::new(Vec::new()),
            incarnation: uuid::Uuid::now_v7().simple().to_string(),
            draining: AtomicBool::new(false),
            drained: AtomicBool::new(false),
            degraded: Default::default(),
            connections: connections_rx,
        }));
        let mut endpoints = self.endpoints;
        if let Some(setup) = self.setup {
            endpoints.extend(setup(ctx.clone()).await?);
        }
        endpoints.push(Endpoint::new("describe", subject::query(component, "describe")?, describe));
        let _ = ctx.0.subjects.set(endpoints.iter().map(|e| e.subject.clone()).collect());

        let metadata = HashMap::from([
            ("instance".to_string(), settings.instance_id.clone()),
            ("node".to_string(), settings.node.clone()),
            ("tier".to_string(), settings.tier.to_string()),
            ("contract_version".to_string(), CONTRACT_VERSION.to_string()),
            ("http".to_string(), http_addr.to_string()),
        ]);
        let micro = client
            .service_builder()
            .description(self.def.description)
            .queue_group(resources::queue_group(component))
            .metadata(metadata)
            .start(component.micro_name(), self.def.version)
            .await
            .map_err(|e| anyhow::anyhow!("starting the micro service: {e}"))?;

        let permits = Arc::new(Semaphore::new(settings.max_in_flight));
        // A watch, not a Notify: an endpoint busy waiting for a permit must still see it later.
        let (stop_serving, _) = tokio::sync::watch::channel(false);
        let mut servers = Vec::new();
        for e in endpoints {
            let nats_endpoint = micro
                .endpoint_builder()
                .name(&e.name)
                .add(&e.subject)
                .await
                .map_err(|err| anyhow::anyhow!("adding endpoint {}: {err}", e.subject))?;
            servers.push(tokio::spawn(serve_endpoint(
                nats_endpoint,
                e,
                ctx.clone(),
                permits.clone(),
                stop_serving.subscribe(),
            )));
        }

        // Readiness, heartbeats and re-provisioning run until shutdown.
        let watch = tokio::spawn(watch_health(ctx.clone(), health.clone(), reconnected));
        let announce = lifecycle_subject(&ctx, Lifecycle::Announce)?;
        let span = tracing::info_span!("announce");
        ctx.publish_root(announce, &ctx.announcement()).instrument(span).await?;
        tracing::info!(subjects = ?ctx.0.subjects.get(), "serving");

        // Control messages (re-announce, drain) until shutdown.
        let mut control = match subscribe_control(&ctx).await {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to control messages; drain and re-announce are unavailable");
                None
            }
        };
        loop {
            let next = async {
                match control.as_mut() {
                    Some(c) => c.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut shutdown => break,
                m = next => match m {
                    Some(m) => {
                        let span = tracing::info_span!("control", subject = %m.subject);
                        telemetry::continue_trace(&span, m.headers.as_ref());
                        on_control(&ctx, &health, &stop_serving, &mut servers, &permits, m).instrument(span).await;
                    }
                    None => control = None,
                },
            }
        }
        tracing::info!(grace = ?settings.shutdown_grace, "shutting down: no new work");
        watch.abort();
        stop_intake(&ctx, &health, &stop_serving, &mut servers, &permits).await;
        let goodbye = ServiceStopped {
            component: component.token().to_string(),
            instance_id: settings.instance_id.clone(),
            reason: "shutdown".to_string(),
            incarnation: ctx.0.incarnation.clone(),
        };
        let said_goodbye = async {
            ctx.publish_root(lifecycle_subject(&ctx, Lifecycle::Goodbye)?, &goodbye).await?;
            ctx.client().flush().await?;
            anyhow::Ok(())
        };
        if let Err(e) = tokio::time::timeout(Duration::from_secs(2), said_goodbye)
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out")))
        {
            tracing::warn!(error = %e, "could not say goodbye");
        }
        let _ = micro.stop().await;
        if tokio::time::timeout(settings.shutdown_grace, client.drain()).await.is_err() {
            tracing::warn!("draining the NATS connection timed out");
        }
        stop_http.notify_one();
        let _ = http_task.await;
        tracing::info!("stopped");
        Ok(())
    }
}

pub(crate) fn lifecycle_subject(ctx: &Ctx, what: Lifecycle) -> Result<String, cim_events::ContractError> {
    subject::lifecycle(ctx.0.settings.component, &ctx.0.settings.instance_id, what)
}

/// The longest pause between two attempts to reach NATS again.
const RECONNECT_MAX_MS: u64 = 1000;

async fn connect(
    settings: &CommonSettings,
    metrics: &Metrics,
    reconnected: Arc<Notify>,
    connections: tokio::sync::watch::Sender<u64>,
) -> anyhow::Result<async_nats::Client> {
    let name = format!("{}/{}", settings.component.service_name(), settings.instance_id);
    let mut opts = async_nats::ConnectOptions::new()
        .name(name)
        // Replies come to the component's own inbox prefix, the only one its identity may read.
        .custom_inbox_prefix(subject::inbox_prefix(settings.component))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| {
            // 50ms, 100ms, 200ms, ... capped at 1s: a restarted server is found again within
            // a second (one connection attempt a second per instance while it is down).
            let ms = 100u64.saturating_mul(1 << attempts.min(6) as u64) / 2;
            Duration::from_millis(ms.min(RECONNECT_MAX_MS))
        });
    if let Some(creds) = &settings.nats_creds {
        opts = opts
            .credentials_file(creds)
            .await
            .map_err(|e| anyhow::anyhow!("reading NATS credentials {}: {e}", creds.display()))?;
    }
    let m = metrics.clone();
    // The first `Connected` is the initial connection, not a reconnect.
    let connected_before = Arc::new(AtomicBool::new(false));
    opts = opts.event_callback(move |event| {
        let m = m.clone();
        let reconnected = reconnected.clone();
        let connected_before = connected_before.clone();
        let connections = connections.clone();
        async move {
            match event {
                async_nats::Event::Connected => {
                    m.nats_connected.set(1);
                    if connected_before.swap(true, Ordering::SeqCst) {
                        m.nats_reconnects.inc();
                    }
                    reconnected.notify_one();
                    connections.send_modify(|n| *n += 1);
                    tracing::info!("connected to NATS");
                }
                async_nats::Event::Disconnected => {
                    m.nats_connected.set(0);
                    reconnected.notify_one();
                    tracing::warn!("disconnected from NATS; reconnecting");
                }
                async_nats::Event::ServerError(e) => {
                    tracing::warn!(error = %e, "NATS server error (e.g. authorization or permission violation)")
                }
                async_nats::Event::ClientError(e) => tracing::warn!(error = %e, "NATS client error"),
                other => tracing::debug!(event = %other, "nats event"),
            }
        }
    });
    let addrs: Vec<async_nats::ServerAddr> = settings.nats_urls.iter().map(|u| u.parse()).collect::<Result<_, _>>()?;
    // async-nats does not log in with a URL's user:password by itself; the deployment passes a
    // service's identity that way (CIM_NATS_URL from an environment file kept out of the store).
    if let Some(addr) = addrs.iter().find(|a| a.has_user_pass())
        && let (Some(user), Some(password)) = (addr.username(), addr.password())
    {
        opts = opts.user_and_password(user.to_string(), password.to_string());
    }
    let client = opts.connect(addrs).await?;
    let mut waited = Duration::ZERO;
    let step = Duration::from_millis(50);
    while client.connection_state() != async_nats::connection::State::Connected {
        tokio::time::sleep(step).await;
        waited += step;
        if waited.as_millis().is_multiple_of(10_000) {
            tracing::warn!(urls = ?settings.redacted_urls(), waited_s = waited.as_secs(), "still waiting for NATS");
        }
    }
    metrics.nats_connected.set(1);
    Ok(client)
}

async fn provision_with_retry(js: &jetstream::Context, settings: &CommonSettings) -> anyhow::Result<()> {
    let mut delay = Duration::from_millis(100);
    loop {
        match provision::provision(js, settings).await {
            Ok(()) => return Ok(()),
            Err(e @ ProvisionError::Destructive { .. }) => return Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "provisioning failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}
