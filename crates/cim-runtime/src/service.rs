//! The life of a service instance: connect, provision, serve endpoints over the NATS micro
//! services protocol, announce and beat, report health, and shut down gracefully.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use async_nats::{HeaderMap, Message, jetstream, service::ServiceExt};
use cim_events::{
    CONTRACT_VERSION, Component, Envelope, Payload,
    envelope::source,
    payload::encode,
    proto::runtime::{
        DescribeReply, DrainRequested, ServiceAnnounced, ServiceDrained, ServiceHeartbeat, ServiceStopped, StreamState,
    },
    resources,
    subject::{self, ControlAction, Lifecycle},
};
use futures::StreamExt;
use tokio::sync::{Notify, Semaphore};
use tracing::Instrument;

use crate::{
    config::CommonSettings,
    endpoint::{BoxFuture, Endpoint, Reply, ServiceError},
    http,
    metrics::{EndpointLabels, Metrics},
    provision::{self, ProvisionError},
    telemetry,
};

/// What a running instance shares with its handlers.
#[derive(Clone)]
pub struct Ctx(Arc<Shared>);

struct Shared {
    def: ServiceDef,
    settings: CommonSettings,
    client: async_nats::Client,
    js: jetstream::Context,
    metrics: Metrics,
    ready: AtomicBool,
    started: Instant,
    http_addr: SocketAddr,
    subjects: std::sync::OnceLock<Vec<String>>,
    stopping: tokio::sync::watch::Sender<bool>,
    background: std::sync::Mutex<Vec<(String, tokio::task::JoinHandle<()>)>>,
    /// Fresh per process start, so the registry tells a restart from a duplicate instance id.
    incarnation: String,
    /// Told to drain (takes no new work); `drained` once nothing is held any more.
    draining: AtomicBool,
    drained: AtomicBool,
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

    fn announcement(&self) -> ServiceAnnounced {
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
        let listener = tokio::net::TcpListener::bind(settings.http_listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {} for health and metrics: {e}", settings.http_listen))?;
        let http_addr = listener.local_addr()?;
        let stop_http = Arc::new(Notify::new());
        let http_task = tokio::spawn(http::serve(listener, health.clone(), stop_http.clone()));
        tracing::info!(service = component.service_name(), instance = %settings.instance_id, %http_addr, "starting");

        tokio::pin!(shutdown);
        let reconnected = Arc::new(Notify::new());
        let client = tokio::select! {
            c = connect(&settings, &metrics, reconnected.clone()) => c?,
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
            r = provision_with_retry(&js, component, &settings) => r?,
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

fn lifecycle_subject(ctx: &Ctx, what: Lifecycle) -> Result<String, cim_events::ContractError> {
    subject::lifecycle(ctx.0.settings.component, &ctx.0.settings.instance_id, what)
}

async fn connect(
    settings: &CommonSettings,
    metrics: &Metrics,
    reconnected: Arc<Notify>,
) -> anyhow::Result<async_nats::Client> {
    let name = format!("{}/{}", settings.component.service_name(), settings.instance_id);
    let mut opts = async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| {
            // 0, 100ms, 200ms, 400ms, ... capped at 5s
            let ms = 100u64.saturating_mul(1 << attempts.min(6) as u64) / 2;
            Duration::from_millis(ms.min(5000))
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
        async move {
            match event {
                async_nats::Event::Connected => {
                    m.nats_connected.set(1);
                    if connected_before.swap(true, Ordering::SeqCst) {
                        m.nats_reconnects.inc();
                    }
                    reconnected.notify_one();
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

async fn provision_with_retry(
    js: &jetstream::Context,
    component: Component,
    settings: &CommonSettings,
) -> anyhow::Result<()> {
    let mut delay = Duration::from_millis(100);
    loop {
        match provision::provision(js, component, settings.tier).await {
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

async fn serve_endpoint(
    mut nats_endpoint: async_nats::service::endpoint::Endpoint,
    e: Endpoint,
    ctx: Ctx,
    permits: Arc<Semaphore>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let labels = EndpointLabels { endpoint: e.name.clone() };
    loop {
        if *stop.borrow() {
            break;
        }
        let request = tokio::select! {
            r = nats_endpoint.next() => match r { Some(r) => r, None => break },
            _ = stop.wait_for(|s| *s) => break,
        };
        // Back-pressure: wait for a slot before taking the next request off the subscription.
        let Ok(permit) = permits.clone().acquire_owned().await else { break };
        let (ctx, handler, labels) = (ctx.clone(), e.handler.clone(), labels.clone());
        tokio::spawn(async move {
            let m = ctx.metrics().clone();
            m.in_flight.inc();
            let started = Instant::now();
            let span = tracing::info_span!("request", endpoint = %labels.endpoint, subject = %request.message.subject);
            telemetry::continue_trace(&span, request.message.headers.as_ref());
            let result = handler(ctx.clone(), request.message.clone()).instrument(span.clone()).await;
            let mut headers = HeaderMap::new();
            span.in_scope(|| telemetry::inject_current(&mut headers));
            let outcome = match result {
                Ok(reply) => {
                    for (k, vs) in reply.headers.iter() {
                        for v in vs {
                            headers.append(k.clone(), v.clone());
                        }
                    }
                    request.respond_with_headers(Ok(reply.body), headers).await
                }
                Err(err) => {
                    m.errors.get_or_create(&labels).inc();
                    tracing::debug!(parent: &span, code = err.code, error = %err.message, "request failed");
                    let micro_err = async_nats::service::error::Error { status: err.message, code: err.code as usize };
                    request.respond_with_headers(Err(micro_err), headers).await
                }
            };
            if let Err(e) = outcome {
                tracing::warn!(error = %e, "could not send reply");
            }
            m.requests.get_or_create(&labels).inc();
            m.latency.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
            m.in_flight.dec();
            drop(permit);
        });
    }
    let _ = nats_endpoint.stop().await;
}

/// Keeps the readiness flag true only while NATS is connected and every owned stream answers;
/// re-provisions a stream that disappeared; publishes heartbeats.
async fn watch_health(ctx: Ctx, health: http::Health, reconnected: Arc<Notify>) {
    let settings = ctx.settings().clone();
    let heartbeat = lifecycle_subject(&ctx, Lifecycle::Heartbeat).ok();
    let owned = provision::owned_stream_names(settings.component);
    loop {
        // A draining instance is alive but takes no work: not ready.
        let ready = check_ready(&ctx, &owned).await && !ctx.is_draining();
        ctx.0.ready.store(ready, Ordering::SeqCst);
        health.set_ready(ready);
        if let Some(subject) = &heartbeat
            && ctx.client().connection_state() == async_nats::connection::State::Connected
        {
            let beat = ServiceHeartbeat {
                component: settings.component.token().to_string(),
                instance_id: settings.instance_id.clone(),
                uptime_ms: ctx.0.started.elapsed().as_millis() as u64,
                ready,
                in_flight: ctx.metrics().in_flight.get().max(0) as u64,
                incarnation: ctx.0.incarnation.clone(),
                draining: ctx.is_draining(),
                drained: ctx.is_drained(),
                node: settings.node.clone(),
            };
            let _ = ctx.publish_root(subject.clone(), &beat).instrument(tracing::info_span!("heartbeat")).await;
        }
        // Check again soon after a (re)connect, else on the heartbeat interval.
        let interval = if ready {
            settings.heartbeat_interval
        } else {
            settings.heartbeat_interval.min(Duration::from_millis(500))
        };
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = reconnected.notified() => {}
        }
    }
}

async fn check_ready(ctx: &Ctx, owned: &[String]) -> bool {
    if ctx.client().connection_state() != async_nats::connection::State::Connected {
        return false;
    }
    for name in owned {
        let ok = tokio::time::timeout(Duration::from_secs(2), ctx.jetstream().get_stream(name)).await;
        match ok {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(stream = %name, error = %e, "owned stream not usable; re-provisioning");
                if let Err(e) =
                    provision::provision(ctx.jetstream(), ctx.settings().component, ctx.settings().tier).await
                {
                    tracing::warn!(error = %e, "re-provisioning failed");
                }
                return false;
            }
            Err(_) => return false,
        }
    }
    true
}

/// `cim.qry.<component>.describe`: the instance, what it owns and the state of those streams.
async fn describe(ctx: Ctx, msg: Message) -> Result<Reply, ServiceError> {
    if !msg.payload.is_empty() {
        return Err(ServiceError::bad_request("describe takes an empty request body"));
    }
    let mut streams = Vec::new();
    for name in provision::owned_stream_names(ctx.settings().component) {
        let mut stream = ctx
            .jetstream()
            .get_stream(&name)
            .await
            .map_err(|e| ServiceError::unavailable(format!("stream {name}: {e}")))?;
        let info = stream.info().await.map_err(|e| ServiceError::unavailable(format!("stream {name}: {e}")))?;
        streams.push(StreamState {
            name,
            messages: info.state.messages,
            bytes: info.state.bytes,
            first_sequence: info.state.first_sequence,
            last_sequence: info.state.last_sequence,
            replicas: info.config.num_replicas as u32,
            leader: info.cluster.as_ref().and_then(|c| c.leader.clone()).unwrap_or_default(),
        });
    }
    Ok(Reply::proto(&DescribeReply { service: Some(ctx.announcement()), streams, ready: ctx.is_ready() }))
}

/// Subscribes to the control messages addressed to every instance, this node and this instance.
async fn subscribe_control(ctx: &Ctx) -> anyhow::Result<futures::stream::SelectAll<async_nats::Subscriber>> {
    let s = ctx.settings();
    let mut all = futures::stream::SelectAll::new();
    for filter in subject::control_filters(&s.node, &s.instance_id)? {
        all.push(ctx.client().subscribe(filter).await?);
    }
    ctx.client().flush().await?;
    Ok(all)
}

/// Acts on one control message: re-announce, or drain (once; a repeated drain request repeats
/// the `drained` report, in case the first was missed).
async fn on_control(
    ctx: &Ctx,
    health: &http::Health,
    stop_serving: &tokio::sync::watch::Sender<bool>,
    servers: &mut Vec<tokio::task::JoinHandle<()>>,
    permits: &Arc<Semaphore>,
    m: Message,
) {
    let action = m.subject.rsplit('.').next().and_then(ControlAction::parse);
    match action {
        Some(ControlAction::Announce) => {
            if let Ok(subject) = lifecycle_subject(ctx, Lifecycle::Announce)
                && let Err(e) = ctx.publish_root(subject, &ctx.announcement()).await
            {
                tracing::warn!(error = %e, "could not re-announce");
            }
        }
        Some(ControlAction::Drain) => {
            let reason = cim_events::payload::decode::<DrainRequested>(
                m.headers.as_ref(),
                &m.payload,
                &cim_events::Upcasters::default(),
            )
            .map(|(_, d)| d.reason)
            .unwrap_or_default();
            let abandoned = if ctx.0.draining.swap(true, Ordering::SeqCst) {
                0
            } else {
                tracing::info!(%reason, "draining: no new work");
                ctx.metrics().draining.set(1);
                let abandoned = stop_intake(ctx, health, stop_serving, servers, permits).await;
                ctx.0.drained.store(true, Ordering::SeqCst);
                tracing::info!(abandoned, "drained");
                abandoned
            };
            if !ctx.is_drained() {
                return;
            }
            let s = ctx.settings();
            let drained = ServiceDrained {
                component: s.component.token().to_string(),
                instance_id: s.instance_id.clone(),
                incarnation: ctx.0.incarnation.clone(),
                node: s.node.clone(),
                abandoned,
            };
            if let Ok(subject) = lifecycle_subject(ctx, Lifecycle::Drained)
                && let Err(e) = ctx.publish_root(subject, &drained).await
            {
                tracing::warn!(error = %e, "could not report drained");
            }
        }
        None => tracing::debug!(subject = %m.subject, "unknown control message ignored"),
    }
}

/// Stops taking work: readiness false, endpoints unsubscribed, in-flight requests finished
/// within the grace period, background loops told to stop and awaited. Returns how many
/// requests were abandoned. Safe to call again (after a drain, at shutdown).
async fn stop_intake(
    ctx: &Ctx,
    health: &http::Health,
    stop_serving: &tokio::sync::watch::Sender<bool>,
    servers: &mut Vec<tokio::task::JoinHandle<()>>,
    permits: &Arc<Semaphore>,
) -> u64 {
    let settings = ctx.settings();
    ctx.0.ready.store(false, Ordering::SeqCst);
    health.set_ready(false);
    let _ = stop_serving.send(true);
    for s in servers.drain(..) {
        let _ = s.await;
    }
    let all = settings.max_in_flight as u32;
    let abandoned = match tokio::time::timeout(settings.shutdown_grace, permits.acquire_many(all)).await {
        Ok(_) => {
            tracing::info!("in-flight work finished");
            0
        }
        Err(_) => {
            let left = all as usize - permits.available_permits();
            tracing::warn!(left, "grace period over; abandoning in-flight work (it will be redelivered)");
            left as u64
        }
    };
    let _ = ctx.0.stopping.send(true);
    let background = std::mem::take(&mut *ctx.0.background.lock().unwrap_or_else(|e| e.into_inner()));
    for (name, mut handle) in background {
        if tokio::time::timeout(settings.shutdown_grace, &mut handle).await.is_err() {
            tracing::warn!(task = %name, "background task did not stop within the grace period; aborting");
            handle.abort();
        }
    }
    abandoned
}
