//! The registry service at work: it listens to every instance's lifecycle messages, turns
//! announcements, drains, goodbyes and silence into events, keeps the view (a fold of those
//! events, followed by every registry instance) and the KV projection, runs the node lifecycle,
//! and answers discovery and overview queries.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_nats::{
    HeaderMap, Message,
    jetstream::{self, consumer::AckPolicy, context::PublishErrorKind, kv},
};
use cim_events::{
    CONTRACT_VERSION, Component, Envelope, Schema, Upcasters,
    envelope::H_MSG_ID,
    payload::decode as decode_payload,
    proto::{
        registry::{
            Ack, ComponentDescription, DesiredSet, EnrollNode, GetOverview, Instance, InstanceDrained,
            InstanceDuplicated, InstanceList, InstanceLost, InstanceRegistered, InstanceState, InstanceStopped,
            ListInstances, ListNodes, Node, NodeCommand, NodeEnrolled, NodeList, NodeReply, NodeState,
            NodeStateChanged, Overview, SetDesired,
        },
        runtime::{DescribeReply, DrainRequested, ServiceAnnounced, ServiceDrained, ServiceHeartbeat, ServiceStopped},
    },
    registry as names,
    subject::{self, ControlAction, Lifecycle},
};
use cim_runtime::{Ctx, Reply, ServiceError, metrics::ProjectionLabels, telemetry};
use futures::StreamExt;
use prost::Message as _;
use tracing::Instrument;

use crate::state::{self, Event, LiveFacts, NodeRefusal, View};

/// Options of the registry beyond the common ones.
#[derive(Clone, Debug)]
pub struct RegistryOptions {
    /// An instance is lost after `missed_beats` heartbeat intervals without a beat…
    pub missed_beats: u32,
    /// …but never sooner than this.
    pub min_ttl: Duration,
}

/// What heartbeats told this registry instance about one instance id (memory only).
#[derive(Clone, Debug, Default)]
struct Live {
    /// Incarnation → when it last beat.
    beats: HashMap<String, (Instant, i64)>,
    last_incarnation: String,
    ready: bool,
    in_flight: u64,
    draining: bool,
    drained: bool,
    node: String,
    first_seen: Option<Instant>,
}

pub struct App {
    pub ctx: Ctx,
    pub js: jetstream::Context,
    pub instances_kv: kv::Store,
    pub nodes_kv: kv::Store,
    pub events_stream: String,
    pub opts: RegistryOptions,
    view: RwLock<View>,
    live: Mutex<HashMap<String, Live>>,
    asked: Mutex<HashMap<String, Instant>>,
    started: Instant,
    heartbeats: AtomicU64,
    rejected: AtomicU64,
    upcasters: Upcasters,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("registry::App")
    }
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

fn bad(e: impl std::fmt::Display) -> ServiceError {
    ServiceError::bad_request(e.to_string())
}

fn decode<M: prost::Message + Default>(msg: &Message) -> Result<M, ServiceError> {
    M::decode(msg.payload.clone()).map_err(|e| ServiceError::bad_request(format!("request does not decode: {e}")))
}

fn refusal(r: NodeRefusal) -> ServiceError {
    match r {
        NodeRefusal::Unknown(_) => ServiceError::not_found(r.to_string()),
        NodeRefusal::Invalid(_) => ServiceError::bad_request(r.to_string()),
        NodeRefusal::WrongState { .. } | NodeRefusal::Stateful { .. } => ServiceError::conflict(r.to_string()),
    }
}

/// Applies one event to a KV value: the new bytes, or None to leave it.
type Step = Box<dyn Fn(Option<bytes::Bytes>) -> Result<Option<Vec<u8>>, String> + Send + Sync>;

enum Failure {
    Conflict,
    Other(String),
}

impl App {
    pub fn new(
        ctx: Ctx,
        js: jetstream::Context,
        instances_kv: kv::Store,
        nodes_kv: kv::Store,
        opts: RegistryOptions,
    ) -> App {
        App {
            ctx,
            js,
            instances_kv,
            nodes_kv,
            events_stream: cim_events::resources::events_stream(crate::COMPONENT).name,
            opts,
            view: RwLock::default(),
            live: Mutex::default(),
            asked: Mutex::default(),
            started: Instant::now(),
            heartbeats: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            upcasters: Upcasters::default(),
        }
    }

    fn view(&self) -> std::sync::RwLockReadGuard<'_, View> {
        self.view.read().unwrap_or_else(|e| e.into_inner())
    }

    fn apply(&self, seq: u64, time_ms: i64, event: &Event) {
        self.view.write().unwrap_or_else(|e| e.into_inner()).apply(seq, time_ms, event);
    }

    // ---- writing events ----

    /// Records one event, then applies it to this instance's view at once (write-through; the
    /// follower applies it again, harmlessly). `expect` is the aggregate's last sequence.
    async fn record(
        &self,
        subject: String,
        event: Event,
        msg_id: Option<String>,
        expect: Option<(String, u64)>,
    ) -> Result<u64, Failure> {
        let (type_name, body) = event.encode();
        let env = Envelope::new_root(type_name, Schema { name: type_name.to_string(), version: 1 }, self.ctx.source());
        let mut headers = HeaderMap::new();
        env.write_headers(&mut headers);
        if let Some(id) = &msg_id {
            headers.insert(H_MSG_ID, id.as_str());
        }
        if let Some((filter, seq)) = &expect {
            cim_events::subject::expect_aggregate_sequence(&mut headers, filter, *seq);
        }
        telemetry::inject_current(&mut headers);
        let ack = self
            .js
            .publish_with_headers(subject, headers, body.into())
            .await
            .map_err(|e| Failure::Other(e.to_string()))?
            .await
            .map_err(|e| match e.kind() {
                PublishErrorKind::WrongLastSequence => Failure::Conflict,
                _ => Failure::Other(e.to_string()),
            })?;
        self.apply(ack.sequence, env.time_ms(), &event);
        Ok(ack.sequence)
    }

    async fn record_instance(&self, instance_id: &str, action: &str, incarnation: &str, event: Event) {
        let Ok(subject) = names::instance_event(instance_id, action) else { return };
        let id = names::instance_msg_id(action, instance_id, incarnation);
        match self.record(subject, event, Some(id), None).await {
            Ok(seq) => tracing::info!(instance = instance_id, action, seq, "recorded"),
            Err(Failure::Other(e)) => tracing::warn!(instance = instance_id, action, error = %e, "could not record"),
            Err(Failure::Conflict) => {}
        }
    }

    /// Sends a refused lifecycle message to the dead-letter stream with the reason.
    async fn dead_letter(&self, msg: &Message, reason: String) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(subject = %msg.subject, %reason, "lifecycle message refused");
        let mut headers = msg.headers.clone().unwrap_or_default();
        headers.insert(names::DLQ_REASON, reason.replace(['\r', '\n'], " ").as_str());
        headers.insert(names::DLQ_SUBJECT, msg.subject.as_str());
        // The refused message's own id must not de-duplicate the dead letter away.
        headers.insert(H_MSG_ID, uuid::Uuid::now_v7().to_string().as_str());
        match self.js.publish_with_headers(names::lifecycle_dead_letter(), headers, msg.payload.clone()).await {
            Ok(ack) => {
                if let Err(e) = ack.await {
                    tracing::warn!(error = %e, "dead letter not stored");
                }
            }
            Err(e) => tracing::warn!(error = %e, "dead letter not stored"),
        }
    }

    // ---- following the stream ----

    /// Replays the event stream into the view and keeps following it (an ordered consumer per
    /// registry instance). Returns once the view has caught up with what was there at start.
    pub async fn follow(self: Arc<Self>) -> anyhow::Result<()> {
        let mut stream = self.js.get_stream(&self.events_stream).await?;
        let target = stream.info().await?.state.last_sequence;
        let (caught_up_tx, mut caught_up) = tokio::sync::watch::channel(target == 0);
        let app = self.clone();
        self.ctx.spawn("follower", async move {
            let mut backoff = Duration::from_millis(100);
            while !app.ctx.is_stopping() {
                let from = app.view().applied + 1;
                let consumer = stream
                    .create_consumer(jetstream::consumer::pull::OrderedConfig {
                        deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence: from },
                        ..Default::default()
                    })
                    .await;
                let mut messages = match consumer {
                    Ok(c) => match c.messages().await {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::warn!(error = %e, "follower cannot consume; retrying");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                            continue;
                        }
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "follower cannot start; retrying");
                        tokio::select! { _ = tokio::time::sleep(backoff) => {}, _ = app.ctx.stopping() => return }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                };
                backoff = Duration::from_millis(100);
                loop {
                    let next = tokio::select! { m = messages.next() => m, _ = app.ctx.stopping() => return };
                    let Some(Ok(m)) = next else { break };
                    let Ok(info) = m.info() else { continue };
                    let seq = info.stream_sequence;
                    match m.headers.as_ref().map(Envelope::from_headers) {
                        Some(Ok(env)) => match Event::decode(&env.schema.name, &m.payload) {
                            Ok(event) => app.apply(seq, env.time_ms(), &event),
                            Err(e) => tracing::error!(sequence = seq, error = %e, "event skipped"),
                        },
                        _ => tracing::error!(sequence = seq, "event without a valid envelope skipped"),
                    }
                    {
                        let mut v = app.view.write().unwrap_or_else(|e| e.into_inner());
                        v.applied = v.applied.max(seq);
                    }
                    if seq >= target {
                        let _ = caught_up_tx.send(true);
                    }
                    app.ctx
                        .metrics()
                        .projection_lag
                        .get_or_create(&ProjectionLabels { projection: "registry-view".into() })
                        .set(info.pending as i64);
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(60), caught_up.wait_for(|c| *c))
            .await
            .map_err(|_| anyhow::anyhow!("the registry view did not catch up with {} events within 60s", target))??;
        tracing::info!(events = target, "registry view caught up");
        Ok(())
    }

    /// The durable projector `registry-projector` (shared by all instances, one event in flight)
    /// applies every event to the KV buckets.
    pub async fn run_projector(self: Arc<Self>) {
        let name = names::projector_consumer();
        let labels = ProjectionLabels { projection: "registry-kv".into() };
        while !self.ctx.is_stopping() {
            let consumer = async {
                let stream = self.js.get_stream(&self.events_stream).await?;
                anyhow::Ok(
                    stream
                        .get_or_create_consumer(
                            &name,
                            jetstream::consumer::pull::Config {
                                durable_name: Some(name.clone()),
                                description: Some("applies registry events to the KV projections".into()),
                                ack_policy: AckPolicy::Explicit,
                                max_ack_pending: 1,
                                ack_wait: Duration::from_secs(30),
                                ..Default::default()
                            },
                        )
                        .await?,
                )
            };
            let consumer = match consumer.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "projector unavailable; retrying");
                    tokio::select! { _ = tokio::time::sleep(Duration::from_secs(1)) => {}, _ = self.ctx.stopping() => return }
                    continue;
                }
            };
            loop {
                let batch = consumer.fetch().max_messages(100).expires(Duration::from_millis(500)).messages();
                let mut batch = tokio::select! {
                    b = batch => match b { Ok(b) => b, Err(_) => break },
                    _ = self.ctx.stopping() => return,
                };
                while let Some(Ok(m)) = batch.next().await {
                    let Ok(info) = m.info() else { continue };
                    let (seq, pending) = (info.stream_sequence, info.pending);
                    if let Err(e) = self.project(&m, seq).await {
                        tracing::error!(sequence = seq, error = %e, "event could not be projected; skipped");
                    }
                    let _ = m.ack().await;
                    self.ctx.metrics().projection_lag.get_or_create(&labels).set(pending as i64);
                    self.ctx.metrics().projection_checkpoint.get_or_create(&labels).set(seq as i64);
                }
            }
        }
    }

    async fn project(&self, m: &jetstream::Message, seq: u64) -> Result<(), String> {
        let env =
            Envelope::from_headers(m.headers.as_ref().ok_or("event without headers")?).map_err(|e| e.to_string())?;
        let event = Event::decode(&env.schema.name, &m.payload)?;
        let (bucket, key, apply): (&kv::Store, String, Step) = if let Some(id) = event.instance_id() {
            let e = event.clone();
            (
                &self.instances_kv,
                names::instance_key(id).map_err(|e| e.to_string())?,
                Box::new(move |cur| {
                    let cur = cur.map(Instance::decode).transpose().map_err(|e| e.to_string())?;
                    Ok(state::apply_instance(cur, seq, env.time_ms(), &e).map(|i| i.encode_to_vec()))
                }),
            )
        } else if let Some(n) = event.node() {
            let e = event.clone();
            let t = env.time_ms();
            (
                &self.nodes_kv,
                names::node_key(n).map_err(|e| e.to_string())?,
                Box::new(move |cur| {
                    let cur = cur.map(Node::decode).transpose().map_err(|e| e.to_string())?;
                    Ok(state::apply_node(cur, seq, t, &e).map(|n| n.encode_to_vec()))
                }),
            )
        } else if let Event::Desired(d) = &event {
            let d = d.clone();
            (&self.nodes_kv, names::DESIRED_KEY.to_string(), Box::new(move |_| Ok(Some(d.encode_to_vec()))))
        } else {
            return Ok(());
        };
        for _ in 0..5 {
            let entry = bucket.entry(&key).await.map_err(|e| e.to_string())?;
            let (cur, rev) = match entry {
                Some(e) if e.operation == kv::Operation::Put => (Some(e.value), Some(e.revision)),
                Some(e) => (None, Some(e.revision)),
                None => (None, None),
            };
            let Some(next) = apply(cur.clone())? else { return Ok(()) };
            if cur.as_deref() == Some(next.as_slice()) {
                return Ok(());
            }
            let written = match rev {
                Some(r) => bucket.update(&key, next.into(), r).await.is_ok(),
                None => bucket.create(&key, next.into()).await.is_ok(),
            };
            if written {
                return Ok(());
            }
        }
        Err(format!("could not write {key}: too much contention"))
    }

    // ---- lifecycle messages ----

    /// Listens to `cim.svc.>`: heartbeats update memory at once; announcements, drains and
    /// goodbyes go in order to a worker that records events (so a slow JetStream write never
    /// delays heartbeats and never causes a false loss).
    pub async fn run_lifecycle(self: Arc<Self>) {
        let mut sub = match self.ctx.client().subscribe(subject::all_lifecycle()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot subscribe to lifecycle messages");
                return;
            }
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Message>();
        let worker = self.clone();
        self.ctx.spawn("lifecycle-writer", async move {
            loop {
                let m = tokio::select! { m = rx.recv() => m, _ = worker.ctx.stopping() => return };
                let Some(m) = m else { return };
                let span = tracing::info_span!("lifecycle", subject = %m.subject);
                telemetry::continue_trace(&span, m.headers.as_ref());
                worker.on_event_message(m).instrument(span).await;
            }
        });
        // Everyone says who they are again: the view then covers instances that started
        // before this registry.
        let _ = self.ctx.client().publish(subject::control_all(ControlAction::Announce), bytes::Bytes::new()).await;
        loop {
            let m = tokio::select! { m = sub.next() => m, _ = self.ctx.stopping() => return };
            let Some(m) = m else { return };
            match subject::parse_lifecycle(&m.subject) {
                Ok(l) if l.what == Lifecycle::Heartbeat => self.on_heartbeat(&m, &l).await,
                Ok(_) => {
                    let _ = tx.send(m);
                }
                Err(e) => self.dead_letter(&m, e.to_string()).await,
            }
        }
    }

    async fn on_heartbeat(&self, m: &Message, l: &subject::LifecycleSubject) {
        self.heartbeats.fetch_add(1, Ordering::Relaxed);
        let beat = match decode_payload::<ServiceHeartbeat>(m.headers.as_ref(), &m.payload, &self.upcasters) {
            Ok((_, b)) => b,
            Err(e) => return self.dead_letter(m, format!("heartbeat: {e}")).await,
        };
        if beat.instance_id != l.instance || beat.component != l.component.token() {
            return self
                .dead_letter(
                    m,
                    format!(
                        "heartbeat of {}/{} published on the subject of {}/{}",
                        beat.component,
                        beat.instance_id,
                        l.component.token(),
                        l.instance
                    ),
                )
                .await;
        }
        let now = Instant::now();
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let e = live.entry(beat.instance_id).or_default();
        e.first_seen.get_or_insert(now);
        e.beats.insert(beat.incarnation.clone(), (now, now_ms()));
        e.last_incarnation = beat.incarnation;
        e.ready = beat.ready;
        e.in_flight = beat.in_flight;
        e.draining = beat.draining;
        e.drained = beat.drained;
        e.node = beat.node;
    }

    async fn on_event_message(&self, m: Message) {
        let Ok(l) = subject::parse_lifecycle(&m.subject) else { return };
        match l.what {
            Lifecycle::Announce => {
                match decode_payload::<ServiceAnnounced>(m.headers.as_ref(), &m.payload, &self.upcasters) {
                    Ok((_, a)) => match self.check_announcement(&l, &a) {
                        Ok(()) => self.on_announce(a).await,
                        Err(reason) => self.dead_letter(&m, reason).await,
                    },
                    Err(e) => self.dead_letter(&m, format!("announcement: {e}")).await,
                }
            }
            Lifecycle::Goodbye => {
                match decode_payload::<ServiceStopped>(m.headers.as_ref(), &m.payload, &self.upcasters) {
                    Ok((_, g)) => {
                        let registered = self.view().instances.get(&l.instance).cloned();
                        if let Some(i) = registered.filter(|i| {
                            state::is_alive(i) && (g.incarnation.is_empty() || g.incarnation == i.incarnation)
                        }) {
                            let ev = Event::Stopped(InstanceStopped {
                                instance_id: i.instance_id.clone(),
                                incarnation: i.incarnation.clone(),
                                reason: g.reason,
                            });
                            self.record_instance(&i.instance_id, names::action::STOPPED, &i.incarnation, ev).await;
                        }
                    }
                    Err(e) => self.dead_letter(&m, format!("goodbye: {e}")).await,
                }
            }
            Lifecycle::Drained => {
                match decode_payload::<ServiceDrained>(m.headers.as_ref(), &m.payload, &self.upcasters) {
                    Ok((_, d)) => self.on_drained(&d.instance_id, &d.incarnation, d.abandoned).await,
                    Err(e) => self.dead_letter(&m, format!("drained: {e}")).await,
                }
            }
            Lifecycle::Heartbeat => {}
        }
    }

    /// Refuses announcements that cannot be registered, with one line saying why.
    fn check_announcement(&self, l: &subject::LifecycleSubject, a: &ServiceAnnounced) -> Result<(), String> {
        if a.instance_id != l.instance {
            return Err(format!(
                "announcement of instance {:?} published on the subject of {:?}",
                a.instance_id, l.instance
            ));
        }
        let c = Component::parse(&a.component).map_err(|e| format!("announcement: {e}"))?;
        if c != l.component {
            return Err(format!(
                "announcement of component {} published on the subject of {}",
                a.component,
                l.component.token()
            ));
        }
        cim_events::token::validate_token("node", &a.node).map_err(|e| format!("announcement: {e}"))?;
        if state::semver(&a.version).is_none() {
            return Err(format!("announcement: version {:?} is not MAJOR.MINOR.PATCH", a.version));
        }
        if a.incarnation.is_empty() {
            return Err(
                "announcement: no incarnation (an instance older than the registry contract; upgrade it)".into()
            );
        }
        Ok(())
    }

    fn ttl(&self, heartbeat_interval_ms: u64) -> Duration {
        let beats = Duration::from_millis(heartbeat_interval_ms.max(100)) * self.opts.missed_beats;
        beats.max(self.opts.min_ttl)
    }

    async fn on_announce(&self, a: ServiceAnnounced) {
        let existing = self.view().instances.get(&a.instance_id).cloned();
        if let Some(e) = &existing
            && state::is_alive(e)
            && e.incarnation == a.incarnation
        {
            return; // a re-announcement of what is registered
        }
        let incompatible = if a.contract_version != CONTRACT_VERSION {
            format!("speaks contract v{}, this registry v{}", a.contract_version, CONTRACT_VERSION)
        } else {
            String::new()
        };
        let ttl = self.ttl(a.heartbeat_interval_ms);
        // A new incarnation starts its TTL now, even before its first heartbeat.
        {
            let now = Instant::now();
            let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            let e = live.entry(a.instance_id.clone()).or_default();
            e.first_seen.get_or_insert(now);
            e.beats.entry(a.incarnation.clone()).or_insert((now, now_ms()));
            e.last_incarnation = a.incarnation.clone();
            e.node = a.node.clone();
        }
        let instance = Instance {
            instance_id: a.instance_id.clone(),
            component: a.component,
            service: a.service,
            version: a.version,
            node: a.node,
            contract_version: a.contract_version,
            capabilities: a.capabilities,
            subjects: a.subjects,
            http_addr: a.http_addr,
            incarnation: a.incarnation.clone(),
            ttl_ms: ttl.as_millis() as u64,
            incompatible,
            ..Default::default()
        };
        let ev = Event::Registered(InstanceRegistered { instance: Some(instance) });
        self.record_instance(&a.instance_id, names::action::REGISTERED, &a.incarnation, ev).await;
    }

    async fn on_drained(&self, instance_id: &str, incarnation: &str, abandoned: u64) {
        let registered = self.view().instances.get(instance_id).cloned();
        let Some(i) = registered else { return };
        if i.state() != InstanceState::InstanceRunning || i.incarnation != incarnation {
            return;
        }
        let ev = Event::Drained(InstanceDrained {
            instance_id: instance_id.to_string(),
            incarnation: incarnation.to_string(),
            abandoned,
        });
        self.record_instance(instance_id, names::action::DRAINED, incarnation, ev).await;
        self.settle_nodes().await;
    }

    // ---- the watchdog: losses, duplicates, strangers, drains ----

    /// Every quarter of the smallest TTL (at most 250 ms): marks silent instances lost,
    /// flags duplicate instance ids, asks strangers to announce, moves drained nodes on.
    pub async fn run_watchdog(self: Arc<Self>) {
        let every = (self.opts.min_ttl / 4).min(Duration::from_millis(250));
        let mut resent: HashMap<String, Instant> = HashMap::new();
        loop {
            tokio::select! { _ = tokio::time::sleep(every) => {}, _ = self.ctx.stopping() => return }
            self.check_instances().await;
            self.settle_nodes().await;
            // Repeat the drain request to instances on draining nodes that still hold work.
            let draining: Vec<String> = self
                .view()
                .nodes
                .values()
                .filter(|n| n.state() == NodeState::NodeDraining)
                .map(|n| n.name.clone())
                .collect();
            for node in draining {
                let due = resent.get(&node).is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
                if due {
                    resent.insert(node.clone(), Instant::now());
                    self.send_drain(&node, "node is draining").await;
                }
            }
        }
    }

    async fn check_instances(&self) {
        let now = Instant::now();
        let alive: Vec<Instance> = self.view().alive().cloned().collect();
        let mut lost = Vec::new();
        let mut dups = Vec::new();
        let mut drained = Vec::new();
        let mut strangers = Vec::new();
        {
            let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            for i in &alive {
                let ttl = Duration::from_millis(i.ttl_ms.max(1));
                let l = live.get(&i.instance_id);
                let last = l.and_then(|l| l.beats.get(&i.incarnation)).map(|(t, ms)| (*t, *ms));
                // Never seen by this registry instance: its TTL starts when this one started.
                let (seen, seen_ms) =
                    last.unwrap_or((self.started, now_ms() - self.started.elapsed().as_millis() as i64));
                if now.duration_since(seen) > ttl {
                    lost.push((i.clone(), seen_ms));
                    continue;
                }
                if let Some(l) = l {
                    for (inc, (t, _)) in &l.beats {
                        if inc != &i.incarnation && now.duration_since(*t) <= ttl && i.duplicate.is_empty() {
                            dups.push((i.clone(), inc.clone(), l.node.clone()));
                        }
                    }
                    if l.drained && l.last_incarnation == i.incarnation && i.state() == InstanceState::InstanceRunning {
                        drained.push(i.clone());
                    }
                }
            }
            for (id, l) in live.iter() {
                let registered = alive.iter().any(|i| &i.instance_id == id && i.incarnation == l.last_incarnation);
                let recent = l
                    .beats
                    .get(&l.last_incarnation)
                    .is_some_and(|(t, _)| now.duration_since(*t) < Duration::from_secs(2));
                let known_for = l.first_seen.map(|f| now.duration_since(f)).unwrap_or_default();
                if !registered && recent && known_for > Duration::from_secs(1) {
                    strangers.push(id.clone());
                }
            }
        }
        for (i, seen_ms) in lost {
            tracing::warn!(instance = %i.instance_id, node = %i.node, ttl_ms = i.ttl_ms, "instance lost: no heartbeat within its ttl");
            let ev = Event::Lost(InstanceLost {
                instance_id: i.instance_id.clone(),
                incarnation: i.incarnation.clone(),
                last_seen_ms: seen_ms,
                ttl_ms: i.ttl_ms,
            });
            self.record_instance(&i.instance_id, names::action::LOST, &i.incarnation, ev).await;
        }
        for (i, other, other_node) in dups {
            tracing::warn!(instance = %i.instance_id, node = %i.node, other_node = %other_node, "two live processes use the same instance id");
            let ev = Event::Duplicated(InstanceDuplicated {
                instance_id: i.instance_id.clone(),
                incarnation: i.incarnation.clone(),
                other_incarnation: other.clone(),
                other_node,
                detail: "both beat within the ttl".into(),
            });
            self.record_instance(&i.instance_id, names::action::DUPLICATED, &other, ev).await;
        }
        for i in drained {
            self.on_drained(&i.instance_id, &i.incarnation, 0).await;
        }
        for id in strangers {
            let due = {
                let mut asked = self.asked.lock().unwrap_or_else(|e| e.into_inner());
                let due = asked.get(&id).is_none_or(|t| t.elapsed() >= Duration::from_secs(2));
                if due {
                    asked.insert(id.clone(), Instant::now());
                }
                due
            };
            if due && let Ok(s) = subject::control_instance(&id, ControlAction::Announce) {
                tracing::info!(instance = %id, "heartbeat from an unregistered instance; asking it to announce");
                let _ = self.ctx.client().publish(s, bytes::Bytes::new()).await;
            }
        }
    }

    /// Draining nodes whose instances all drained (or went away) become drained.
    async fn settle_nodes(&self) {
        let done: Vec<Node> = {
            let v = self.view();
            v.nodes
                .values()
                .filter(|n| n.state() == NodeState::NodeDraining && state::holding_work(&v, &n.name).is_empty())
                .cloned()
                .collect()
        };
        for n in done {
            let _ = self.transition(&n, NodeState::NodeDrained, "every instance on it drained".into()).await;
        }
    }

    async fn send_drain(&self, node: &str, reason: &str) {
        let Ok(s) = subject::control_node(node, ControlAction::Drain) else { return };
        let req = DrainRequested { node: node.to_string(), reason: reason.to_string() };
        let (mut headers, body) =
            cim_events::payload::encode(&Envelope::root::<DrainRequested>(self.ctx.source()), &req);
        telemetry::inject_current(&mut headers);
        if let Err(e) = self.ctx.client().publish_with_headers(s, headers, body).await {
            tracing::warn!(node, error = %e, "could not send the drain request");
        }
    }

    async fn transition(&self, n: &Node, to: NodeState, reason: String) -> Result<Node, ServiceError> {
        let subject = names::node_event(&n.name, state::transition_action(to)).map_err(bad)?;
        let filter = names::node_history(&n.name).map_err(bad)?;
        let ev = Event::NodeChanged(NodeStateChanged { node: n.name.clone(), from: n.state, to: to as i32, reason });
        match self.record(subject, ev, None, Some((filter, n.version_seq))).await {
            Ok(_) => {}
            Err(Failure::Conflict) => {
                return Err(ServiceError::conflict(format!("node {} changed concurrently; retry", n.name)));
            }
            Err(Failure::Other(e)) => return Err(ServiceError::unavailable(format!("recording the node event: {e}"))),
        }
        tracing::info!(node = %n.name, from = state::state_name(n.state()), to = state::state_name(to), "node transition");
        self.view().nodes.get(&n.name).cloned().ok_or_else(|| ServiceError::internal("node vanished"))
    }

    fn node(&self, name: &str) -> Option<Node> {
        self.view().nodes.get(name).cloned()
    }

    // ---- commands ----

    pub async fn enroll(&self, msg: Message) -> Result<Reply, ServiceError> {
        let e: EnrollNode = decode(&msg)?;
        let existing = self.node(&e.name);
        state::check_enroll(existing.as_ref(), &e).map_err(refusal)?;
        let subject = names::node_event(&e.name, names::action::ENROLLED).map_err(bad)?;
        let filter = names::node_history(&e.name).map_err(bad)?;
        let node = Node {
            name: e.name.clone(),
            memory_bytes: e.memory_bytes,
            reserved_bytes: e.reserved_bytes,
            cpus: e.cpus,
            labels: e.labels.clone(),
            jetstream_server: e.jetstream_server.clone(),
            ..Default::default()
        };
        let expect = existing.map(|n| n.version_seq).unwrap_or(0);
        match self
            .record(subject, Event::Enrolled(NodeEnrolled { node: Some(node) }), None, Some((filter, expect)))
            .await
        {
            Ok(_) => {}
            Err(Failure::Conflict) => {
                return Err(ServiceError::conflict(format!("node {} changed concurrently; retry", e.name)));
            }
            Err(Failure::Other(err)) => {
                return Err(ServiceError::unavailable(format!("recording the node event: {err}")));
            }
        }
        let mut node = self.node(&e.name).ok_or_else(|| ServiceError::internal("node vanished"))?;
        if !e.hold {
            node = self.transition(&node, NodeState::NodeSchedulable, "enrolled".into()).await?;
        }
        Ok(Reply::proto(&NodeReply { node: Some(node) }))
    }

    pub async fn node_command(&self, msg: Message, to: NodeState) -> Result<Reply, ServiceError> {
        let c: NodeCommand = decode(&msg)?;
        let node = self.node(&c.name);
        state::check_transition(node.as_ref(), &c.name, to).map_err(refusal)?;
        let node = node.ok_or_else(|| ServiceError::not_found(format!("node {} is not enrolled", c.name)))?;
        if to == NodeState::NodeDecommissioned {
            self.check_stateless(&node).await?;
        }
        let reason = if c.reason.is_empty() { "requested by an operator".to_string() } else { c.reason.clone() };
        let mut node = self.transition(&node, to, reason.clone()).await?;
        if to == NodeState::NodeDraining {
            self.send_drain(&node.name, &reason).await;
            self.settle_nodes().await;
            node = self.node(&node.name).unwrap_or(node);
        }
        Ok(Reply::proto(&NodeReply { node: Some(node) }))
    }

    /// Decommissioning is refused while the node holds anything stateful: instances that have
    /// not drained, or JetStream replicas on its nats-server.
    async fn check_stateless(&self, node: &Node) -> Result<(), ServiceError> {
        let held: Vec<String> = {
            let v = self.view();
            state::holding_work(&v, &node.name).iter().map(|i| i.instance_id.clone()).collect()
        };
        if !held.is_empty() {
            return Err(refusal(NodeRefusal::Stateful {
                node: node.name.clone(),
                what: format!("{} instance(s) that did not drain", held.len()),
                detail: held.join(", "),
            }));
        }
        if node.jetstream_server.is_empty() {
            return Ok(());
        }
        let mut streams = self.js.streams();
        let mut holding = Vec::new();
        while let Some(info) = streams.next().await {
            let info = info.map_err(|e| ServiceError::unavailable(format!("listing streams: {e}")))?;
            let on_node = info.cluster.as_ref().is_some_and(|c| {
                c.leader.as_deref() == Some(node.jetstream_server.as_str())
                    || c.replicas.iter().any(|r| r.name == node.jetstream_server)
            });
            if on_node {
                holding.push(info.config.name.clone());
            }
        }
        if holding.is_empty() {
            return Ok(());
        }
        holding.sort();
        let shown: Vec<&str> = holding.iter().take(5).map(String::as_str).collect();
        let more = if holding.len() > 5 { format!(" and {} more", holding.len() - 5) } else { String::new() };
        Err(refusal(NodeRefusal::Stateful {
            node: node.name.clone(),
            what: format!("replicas of {} stream(s) on nats-server {}", holding.len(), node.jetstream_server),
            detail: format!("{}{more}; move them first (nats stream cluster peer-remove)", shown.join(", ")),
        }))
    }

    pub async fn set_desired(&self, msg: Message) -> Result<Reply, ServiceError> {
        let d: SetDesired = decode(&msg)?;
        let mut seen = std::collections::BTreeSet::new();
        let mut services = Vec::new();
        for mut s in d.services {
            let name = crate::placement::canonical_service(&s.service).map_err(bad)?;
            if !seen.insert(name) {
                return Err(bad(format!("service {name} is listed twice")));
            }
            s.service = name.to_string();
            services.push(s);
        }
        match self.record(names::desired_event(), Event::Desired(DesiredSet { services }), None, None).await {
            Ok(_) => Ok(Reply::proto(&Ack {})),
            Err(Failure::Conflict) => Err(ServiceError::conflict("desired state changed concurrently; retry")),
            Err(Failure::Other(e)) => Err(ServiceError::unavailable(format!("recording the desired state: {e}"))),
        }
    }

    // ---- queries ----

    fn facts(&self, id: &str) -> (LiveFacts, i64, u64) {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        match live.get(id).and_then(|l| l.beats.get(&l.last_incarnation).map(|b| (l, b))) {
            Some((l, (t, ms))) => (
                LiveFacts { ready: l.ready, draining: l.draining, seen_ms_ago: Some(t.elapsed().as_millis() as u64) },
                *ms,
                l.in_flight,
            ),
            None => (LiveFacts::default(), 0, 0),
        }
    }

    fn with_facts(&self, mut i: Instance) -> Instance {
        let (f, ms, in_flight) = self.facts(&i.instance_id);
        i.ready = f.ready;
        i.last_seen_ms = ms;
        i.in_flight = in_flight;
        i
    }

    pub async fn instances(&self, msg: Message) -> Result<Reply, ServiceError> {
        let q: ListInstances = decode(&msg)?;
        let component =
            if q.component.is_empty() { None } else { Some(Component::parse(&q.component).map_err(bad)?.token()) };
        let picked: Vec<Instance> = self
            .view()
            .instances
            .values()
            .filter(|i| q.include_gone || state::is_alive(i))
            .filter(|i| component.is_none_or(|c| i.component == c))
            .filter(|i| q.capability.is_empty() || i.capabilities.iter().any(|c| c == &q.capability))
            .filter(|i| q.node.is_empty() || i.node == q.node)
            .cloned()
            .collect();
        let instances = picked.into_iter().map(|i| self.with_facts(i)).collect();
        Ok(Reply::proto(&InstanceList { instances }))
    }

    pub async fn nodes(&self, msg: Message) -> Result<Reply, ServiceError> {
        let q: ListNodes = decode(&msg)?;
        let nodes = self
            .view()
            .nodes
            .values()
            .filter(|n| q.include_decommissioned || n.state() != NodeState::NodeDecommissioned)
            .cloned()
            .collect();
        Ok(Reply::proto(&NodeList { nodes }))
    }

    pub async fn overview(&self, msg: Message) -> Result<Reply, ServiceError> {
        let q: GetOverview = decode(&msg)?;
        let (instances, nodes, desired, desired_is_default, problems) = {
            let v = self.view();
            let live = |id: &str| self.facts(id).0;
            let problems = state::problems(&v, &live);
            let (desired, default) = v.desired_or_default();
            let instances: Vec<Instance> =
                v.instances.values().filter(|i| i.state() != InstanceState::InstanceStopped).cloned().collect();
            (instances, v.nodes.values().cloned().collect::<Vec<_>>(), desired, default, problems)
        };
        let described = if q.deep { self.describe_all().await } else { Vec::new() };
        Ok(Reply::proto(&Overview {
            instances: instances.into_iter().map(|i| self.with_facts(i)).collect(),
            nodes,
            desired,
            desired_is_default,
            problems,
            described,
            registry_instance: self.ctx.settings().instance_id.clone(),
            heartbeats_seen: self.heartbeats.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
        }))
    }

    /// Asks one instance of every other component to describe itself, concurrently, carrying
    /// the trace context (so one overview is one trace across the services).
    async fn describe_all(&self) -> Vec<ComponentDescription> {
        let calls = Component::ALL.into_iter().filter(|c| *c != crate::COMPONENT).map(|c| {
            let client = self.ctx.client().clone();
            let span = tracing::info_span!("describe", component = c.token());
            async move {
                let mut d = ComponentDescription { component: c.token().to_string(), ..Default::default() };
                let mut headers = HeaderMap::new();
                telemetry::inject_current(&mut headers);
                let Ok(subject) = subject::query(c, "describe") else { return d };
                match tokio::time::timeout(
                    Duration::from_secs(2),
                    client.request_with_headers(subject, headers, bytes::Bytes::new()),
                )
                .await
                {
                    Ok(Ok(reply)) => {
                        if let Some(code) = reply.headers.as_ref().and_then(|h| h.get("Nats-Service-Error-Code")) {
                            d.error = format!("error {code}");
                        } else {
                            match DescribeReply::decode(reply.payload) {
                                Ok(r) => {
                                    d.ready = r.ready;
                                    d.instance_id = r.service.map(|s| s.instance_id).unwrap_or_default();
                                }
                                Err(e) => d.error = format!("reply does not decode: {e}"),
                            }
                        }
                    }
                    Ok(Err(e)) => d.error = e.to_string(),
                    Err(_) => d.error = "no answer within 2s".into(),
                }
                d
            }
            .instrument(span)
        });
        futures::future::join_all(calls).await
    }
}
