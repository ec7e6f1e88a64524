//! The engine at run time: the view of `CIM_PIPELINE_EVENTS` every instance follows, the
//! trigger worker, the run worker with its executor, and the command and query endpoints.
//!
//! Exactly-once in effect: every run event is published with the run's last sequence as
//! `Nats-Expected-Last-Subject-Sequence`, so two instances that both hold a run (a redelivery
//! after a kill) can never both record a step; a step's side effects carry idempotency keys
//! (information-unit request ids `pl-<run>-<step>`, an `emitted` event is written once), so a
//! step repeated after a crash changes nothing twice.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use async_nats::{
    HeaderMap,
    jetstream::{
        self, AckKind,
        consumer::{AckPolicy, DeliverPolicy, pull},
        context::PublishErrorKind,
        kv,
    },
};
use bytes::Bytes;
use cim_events::{
    Component, Envelope, Payload,
    envelope::H_MSG_ID,
    iu,
    pipeline::{
        self as pl, ApplyReply, ApplyRequest, PipelineInfo, PipelineList, PipelineRef, RemoveRequest, RunInfo, RunList,
        RunRef, RunsRequest, StartRequest, action,
    },
    plugin,
    proto::{
        iu::{
            CreateUnit, Link, NewVersion, SetAttributes, TagUnit, Unit, UnitAttributesSet, UnitCreated, UnitLinked,
            UnitTagged, UnitVersioned,
        },
        pipeline::{
            PipelineApplied, PipelineRemoved, RunCancelled, RunCompleted, RunEmitted, RunFailed, RunRequested,
            RunRetried, RunStarted, StepCompleted, StepFailed, StepStarted,
        },
        plugin::{InvokeReply, InvokeRequest, ListPlugins, ListReply, PluginReference, Status},
    },
    resources, subject,
};
use cim_iu_client::{IuClient, header_with_id};
use cim_runtime::{Ctx, Endpoint, Reply, ServiceError};
use futures::StreamExt;
use prost::Message;
use sha2::{Digest, Sha256};
use tokio::sync::{RwLock, Semaphore, watch};

use crate::{
    COMPONENT, EngineArgs,
    definition::{self, Definition, Kind, PluginRef, Step, UnitEventFacts},
    state::{PipelineVersion, Run, RunEvent, View},
};

/// Largest output a step may pass on to later steps (it is stored in its event).
pub const MAX_STEP_OUTPUT: usize = 512 * 1024;

/// What every task of an instance shares.
pub struct Engine {
    ctx: Ctx,
    js: jetstream::Context,
    events_stream: String,
    view: RwLock<View>,
    seen: watch::Sender<u64>,
    iu: IuClient,
    slots: kv::Store,
    args: EngineArgs,
    runs: Arc<Semaphore>,
}

/// Builds the engine, starts its workers, and returns its endpoints.
pub async fn setup(ctx: Ctx, args: EngineArgs) -> anyhow::Result<Vec<Endpoint>> {
    let js = ctx.jetstream().clone();
    let slots = js.get_key_value(resources::kv_bucket(COMPONENT, pl::KV_SLOTS)?).await?;
    let iu = match &ctx.settings().js_domain {
        Some(d) => IuClient::with_domain(ctx.client().clone(), d),
        None => IuClient::new(ctx.client().clone()),
    };
    let engine = Arc::new(Engine {
        ctx: ctx.clone(),
        js,
        events_stream: resources::events_stream(COMPONENT).name,
        view: RwLock::new(View::default()),
        seen: watch::channel(0).0,
        iu,
        slots,
        runs: Arc::new(Semaphore::new(args.max_runs)),
        args,
    });
    ctx.spawn("view", engine.clone().follow());
    ctx.spawn("triggers", engine.clone().triggers());
    ctx.spawn("runs", engine.clone().run_worker());
    Ok(endpoints(engine)?)
}

fn json_reply<T: serde::Serialize>(v: &T) -> Reply {
    Reply { headers: HeaderMap::new(), body: serde_json::to_vec(v).unwrap_or_default().into() }
}

fn parse<T: serde::de::DeserializeOwned>(msg: &async_nats::Message) -> Result<T, ServiceError> {
    serde_json::from_slice(&msg.payload)
        .map_err(|e| ServiceError::bad_request(format!("request is not valid JSON for this endpoint: {e}")))
}

fn endpoints(engine: Arc<Engine>) -> anyhow::Result<Vec<Endpoint>> {
    macro_rules! ep {
        ($name:expr, $subject:expr, $method:ident) => {{
            let e = engine.clone();
            Endpoint::new($name, $subject, move |_ctx, msg| {
                let e = e.clone();
                async move { e.$method(msg).await }
            })
        }};
    }
    Ok(vec![
        ep!(pl::cmd::APPLY, pl::command(pl::cmd::APPLY)?, apply),
        ep!(pl::cmd::REMOVE, pl::command(pl::cmd::REMOVE)?, remove),
        ep!(pl::cmd::START, pl::command(pl::cmd::START)?, start),
        ep!(pl::cmd::CANCEL, pl::command(pl::cmd::CANCEL)?, cancel),
        ep!(pl::cmd::RETRY, pl::command(pl::cmd::RETRY)?, retry),
        ep!(pl::qry::LIST, pl::query(pl::qry::LIST)?, list),
        ep!(pl::qry::GET, pl::query(pl::qry::GET)?, get),
        ep!(pl::qry::RUNS, pl::query(pl::qry::RUNS)?, runs),
        ep!(pl::qry::RUN, pl::query(pl::qry::RUN)?, run),
    ])
}

/// Why a publish did not go through.
enum Publish {
    /// Someone else wrote to the aggregate first (optimistic concurrency).
    Conflict,
    Failed(String),
}

/// How a step failed.
struct StepError {
    message: String,
    /// A retry cannot help (bad input, unknown plugin, a bad template): fail at once.
    permanent: bool,
}

impl StepError {
    fn permanent(m: impl Into<String>) -> StepError {
        StepError { message: m.into(), permanent: true }
    }
    fn transient(m: impl Into<String>) -> StepError {
        StepError { message: m.into(), permanent: false }
    }
}

/// What happened to a run work item.
enum Outcome {
    /// Finished (completed, failed, cancelled, or already done): ack.
    Done,
    /// The run's history moved under us: read it again.
    Reload,
    /// Cannot start now (no concurrency slot): redeliver later.
    Later(Duration),
}

/// The output of one step.
#[derive(Default)]
struct StepOutput {
    output: Vec<u8>,
    metadata: BTreeMap<String, String>,
    units: Vec<String>,
    passed: bool,
    /// Sequence of an event the step itself wrote to the run (emit).
    seq: Option<u64>,
}

impl Engine {
    // ---- the view ----

    /// Folds every event of the pipeline stream into the view, from the start, forever.
    async fn follow(self: Arc<Self>) {
        loop {
            if let Err(e) = self.follow_once().await {
                tracing::warn!(error = %e, "following the pipeline events failed; starting over");
            }
            tokio::select! {
                _ = self.ctx.stopping() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    async fn follow_once(&self) -> anyhow::Result<()> {
        let from = *self.seen.borrow() + 1;
        let stream = self.js.get_stream(&self.events_stream).await?;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: from },
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        loop {
            let m = tokio::select! {
                _ = self.ctx.stopping() => return Ok(()),
                m = messages.next() => m,
            };
            let Some(m) = m else { anyhow::bail!("pipeline event stream ended") };
            let m = m?;
            let seq = m.info().map(|i| i.stream_sequence).map_err(|e| anyhow::anyhow!("{e}"))?;
            self.apply_event(&m.subject, m.headers.as_ref(), &m.payload, seq).await;
            self.seen.send_replace(seq);
        }
    }

    async fn apply_event(&self, subject: &str, headers: Option<&HeaderMap>, payload: &[u8], seq: u64) {
        let mut view = self.view.write().await;
        view.seq = seq;
        let Ok(s) = subject::parse_event(subject) else { return };
        let env = headers.and_then(|h| Envelope::from_headers(h).ok());
        let (time_ms, correlation) =
            env.as_ref().map(|e| (e.time_ms(), e.correlation_id().to_string())).unwrap_or_default();
        let result = match s.aggregate.as_str() {
            pl::PIPELINE => match s.action.as_str() {
                action::APPLIED => PipelineApplied::decode(payload)
                    .map_err(|e| e.to_string())
                    .and_then(|e| view.apply_applied(e, seq, time_ms)),
                action::REMOVED => {
                    PipelineRemoved::decode(payload).map(|e| view.apply_removed(e, seq)).map_err(|e| e.to_string())
                }
                other => Err(format!("unknown pipeline event {other}")),
            },
            pl::RUN => RunEvent::decode(&s.action, payload).map(|event| {
                if let (RunEvent::Requested(r), Some(env)) = (&event, &env) {
                    view.requests.insert(env.id().to_string(), r.pipeline.clone());
                }
                let run = view.runs.entry(s.id.clone()).or_default();
                run.apply(event, seq, time_ms, &correlation);
            }),
            _ => Ok(()),
        };
        if let Err(e) = result {
            view.undecodable += 1;
            tracing::warn!(seq, subject, error = %e, "pipeline event skipped by the view");
        }
    }

    /// Waits until the view has every event the stream held when this was called (read your
    /// own writes across instances).
    async fn caught_up(&self) -> Result<(), ServiceError> {
        let mut stream = self
            .js
            .get_stream(&self.events_stream)
            .await
            .map_err(|e| ServiceError::unavailable(format!("pipeline events: {e}")))?;
        let last = stream
            .info()
            .await
            .map_err(|e| ServiceError::unavailable(format!("pipeline events: {e}")))?
            .state
            .last_sequence;
        let mut rx = self.seen.subscribe();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| *s >= last))
            .await
            .map_err(|_| ServiceError::unavailable("the engine's view is behind the pipeline events"))?
            .map_err(|_| ServiceError::unavailable("the engine is stopping"))?;
        Ok(())
    }

    // ---- reading and writing run events ----

    /// A run's state, read from its events (the source of truth), with the envelope of its
    /// request (what every later event is caused by).
    async fn load_run(&self, run_id: &str) -> Result<Option<(Run, Envelope)>, String> {
        let filter = pl::run_history(run_id).map_err(|e| e.to_string())?;
        let stream = self.js.get_stream(&self.events_stream).await.map_err(|e| e.to_string())?;
        let mut run = Run::default();
        let mut request_env = None;
        let mut seq = 1;
        loop {
            let msg = match stream.raw_message_builder().sequence(seq).next_by_subject(filter.clone()).send().await {
                Ok(m) => m,
                Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => break,
                Err(e) => return Err(format!("reading run {run_id}: {e}")),
            };
            seq = msg.sequence + 1;
            let env = Envelope::from_headers(&msg.headers)
                .map_err(|e| format!("run {run_id} event {}: {e}", msg.sequence))?;
            let act = msg.subject.rsplit('.').next().unwrap_or_default().to_string();
            let event = RunEvent::decode(&act, &msg.payload)?;
            if matches!(event, RunEvent::Requested(_)) && request_env.is_none() {
                request_env = Some(env.clone());
            }
            run.apply(event, msg.sequence, env.time_ms(), &env.correlation_id().to_string());
        }
        Ok(request_env.map(|env| (run, env)))
    }

    /// Publishes one run event caused by `parent`, expecting the run's last sequence `expect`.
    async fn publish_run<P: Payload>(
        &self,
        run_id: &str,
        act: &str,
        payload: &P,
        parent: &Envelope,
        expect: u64,
    ) -> Result<u64, Publish> {
        let subject = pl::run_event(run_id, act).map_err(|e| Publish::Failed(e.to_string()))?;
        let filter = pl::run_history(run_id).map_err(|e| Publish::Failed(e.to_string()))?;
        let env = Envelope::caused_by::<P>(parent, self.ctx.source());
        self.publish(subject, env.to_headers(), payload.encode_to_vec(), Some((filter, expect))).await
    }

    async fn publish(
        &self,
        subject: String,
        mut headers: HeaderMap,
        body: Vec<u8>,
        expect: Option<(String, u64)>,
    ) -> Result<u64, Publish> {
        if let Some((filter, seq)) = &expect {
            subject::expect_aggregate_sequence(&mut headers, filter, *seq);
        }
        cim_runtime::telemetry::inject_current(&mut headers);
        let ack = self
            .js
            .publish_with_headers(subject, headers, body.into())
            .await
            .map_err(|e| Publish::Failed(e.to_string()))?
            .await
            .map_err(|e| match e.kind() {
                PublishErrorKind::WrongLastSequence => Publish::Conflict,
                _ => Publish::Failed(e.to_string()),
            })?;
        Ok(ack.sequence)
    }

    /// Stores a message that could not be processed in `CIM_PIPELINE_DLQ`, as it was, with the
    /// reason and its subject. `run_seq` (the run's last sequence, 0 for poison) makes the dead
    /// letter's `Nats-Msg-Id`, so writing it again after a crash does not store it twice.
    async fn dead_letter(
        &self,
        origin: &str,
        m: &jetstream::Message,
        reason: &str,
        run_seq: u64,
    ) -> Result<(), String> {
        let item_seq = m.info().map(|i| i.stream_sequence).unwrap_or_default();
        let mut headers = HeaderMap::new();
        if let Some(original) = &m.headers {
            for (k, vs) in original.iter() {
                let name: &str = k.as_ref();
                if name == H_MSG_ID || name.starts_with("Nats-Expected") {
                    continue;
                }
                for v in vs {
                    headers.append(k.clone(), v.clone());
                }
            }
        }
        headers.insert(H_MSG_ID, format!("dlq-{origin}-{item_seq}-{run_seq}").as_str());
        headers.insert(pl::H_DEAD_LETTER_REASON, one_line(reason).as_str());
        headers.insert(pl::H_ORIGINAL_SUBJECT, m.subject.as_str());
        let subject = pl::dead_letter(origin).map_err(|e| e.to_string())?;
        self.js
            .publish_with_headers(subject, headers, m.payload.clone())
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        tracing::warn!(origin, subject = %m.subject, reason, "dead-lettered");
        Ok(())
    }

    // ---- triggers ----

    /// Unit events → run requests, from the shared durable consumer `pipeline-triggers`.
    async fn triggers(self: Arc<Self>) {
        let consumer = loop {
            match self.trigger_consumer().await {
                Ok(c) => break c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open the trigger consumer; retrying");
                    tokio::select! { _ = self.ctx.stopping() => return, _ = tokio::time::sleep(Duration::from_secs(1)) => {} }
                }
            }
        };
        loop {
            if self.ctx.is_stopping() {
                return;
            }
            let batch = tokio::select! {
                _ = self.ctx.stopping() => return,
                b = consumer.fetch().max_messages(64).expires(Duration::from_secs(1)).messages() => b,
            };
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "trigger fetch failed; retrying");
                    tokio::select! { _ = self.ctx.stopping() => return, _ = tokio::time::sleep(Duration::from_millis(500)) => {} }
                    continue;
                }
            };
            let mut first = true;
            while let Some(m) = batch.next().await {
                let Ok(m) = m else { continue };
                // Pipelines applied up to now must be known before an event is matched.
                if first && self.caught_up().await.is_err() {
                    let _ = m.ack_with(AckKind::Nak(Some(Duration::from_millis(500)))).await;
                    continue;
                }
                first = false;
                match self.trigger(&m).await {
                    Ok(()) => {
                        let _ = m.double_ack().await;
                    }
                    Err(e) => {
                        tracing::warn!(subject = %m.subject, error = %e, "trigger failed; redelivering");
                        let _ = m.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                    }
                }
            }
        }
    }

    async fn trigger_consumer(&self) -> anyhow::Result<jetstream::consumer::Consumer<pull::Config>> {
        let stream = self.js.get_stream(resources::events_stream(Component::InformationUnit).name).await?;
        let filter_subjects = definition::TRIGGER_EVENTS
            .iter()
            .map(|(_, a)| subject::action_filter(Component::InformationUnit, iu::UNIT, a))
            .collect::<Result<Vec<_>, _>>()?;
        let name = pl::trigger_consumer();
        let config = pull::Config {
            durable_name: Some(name.clone()),
            description: Some("unit events that may start pipeline runs (every pipeline-engine instance)".into()),
            filter_subjects,
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        };
        Ok(stream.get_or_create_consumer(&name, config).await?)
    }

    /// One unit event: a run request for every pipeline whose trigger matches. Undecodable
    /// events are dead-lettered (Ok: the event is handled); NATS failures are Err (redeliver).
    async fn trigger(&self, m: &jetstream::Message) -> Result<(), String> {
        // Only events some active pipeline could want are looked into (the consumer starts at
        // the beginning of the unit history, so a pipeline never misses an event that happened
        // after it was applied, however late the consumer was created).
        let action = m.subject.rsplit('.').next().unwrap_or_default();
        let time_ms = m.info().map(|i| i.published.unix_timestamp_nanos() / 1_000_000).unwrap_or(i128::MAX) as i64;
        let wanted = {
            let view = self.view.read().await;
            view.pipelines
                .values()
                .filter(|p| p.active)
                .filter_map(|p| p.current())
                .any(|v| v.definition.trigger.action() == Some(action) && time_ms + 1000 >= v.first_applied_ms)
        };
        if !wanted {
            return Ok(());
        }
        let facts = match self.facts(m).await {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(()),
            Err(reason) => {
                return self.dead_letter(pl::DLQ_TRIGGERS, m, &reason, 0).await;
            }
        };
        let env = Envelope::from_headers(m.headers.as_ref().ok_or("no headers")?).map_err(|e| e.to_string())?;
        let matching: Vec<(String, u32)> = {
            let view = self.view.read().await;
            let caused_by_run_of = view.requests.get(&env.causation_id().to_string());
            view.pipelines
                .iter()
                .filter(|(_, p)| p.active)
                .filter(|(name, _)| caused_by_run_of != Some(*name))
                .filter_map(|(name, p)| p.current().map(|v| (name, v)))
                // A pipeline sees the events that happen after it was first applied.
                .filter(|(_, v)| v.definition.trigger.matches(&facts) && env.time_ms() >= v.first_applied_ms)
                .map(|(name, v)| (name.clone(), v.version))
                .collect()
        };
        for (pipeline, version) in matching {
            let request = RunRequested {
                run_id: uuid::Uuid::now_v7().to_string(),
                pipeline: pipeline.clone(),
                pipeline_version: version,
                trigger: "event".into(),
                trigger_subject: m.subject.to_string(),
                trigger_event_id: env.id().to_string(),
                unit_id: facts.unit_id.clone(),
                params: Default::default(),
            };
            let run_env = Envelope::caused_by::<RunRequested>(&env, self.ctx.source());
            let mut headers = run_env.to_headers();
            // A redelivered trigger event asks for the same run again: de-duplicated.
            headers.insert(H_MSG_ID, format!("trigger-{pipeline}-{}", env.id()).as_str());
            let subject = pl::run_event(&request.run_id, action::REQUESTED).map_err(|e| e.to_string())?;
            match self.publish(subject, headers, request.encode_to_vec(), None).await {
                Ok(_) => tracing::debug!(pipeline, run = %request.run_id, unit = %facts.unit_id, "run requested"),
                Err(Publish::Conflict) => {}
                Err(Publish::Failed(e)) => return Err(e),
            }
        }
        Ok(())
    }

    /// What a trigger looks at; Err = the event is poison (with the reason).
    async fn facts(&self, m: &jetstream::Message) -> Result<Option<UnitEventFacts>, String> {
        let s = subject::parse_event(&m.subject).map_err(|e| e.to_string())?;
        let headers = m.headers.as_ref().ok_or("the event has no headers (no envelope)")?;
        Envelope::from_headers(headers).map_err(|e| format!("the event's envelope is invalid: {e}"))?;
        let bad = |e: prost::DecodeError| format!("{} event does not decode: {e}", s.action);
        let mut f = UnitEventFacts { action: s.action.clone(), unit_id: s.id.clone(), ..Default::default() };
        match s.action.as_str() {
            iu::action::CREATED => {
                let e = UnitCreated::decode(m.payload.clone()).map_err(bad)?;
                if e.unit_id != s.id {
                    return Err(format!("created event names unit {:?} on the subject of {:?}", e.unit_id, s.id));
                }
                f.media_type = e.media_type;
                f.unit_type = e.unit_type;
                f.name = e.name;
                f.tags = e.tags;
            }
            iu::action::VERSIONED => {
                let e = UnitVersioned::decode(m.payload.clone()).map_err(bad)?;
                f.media_type = e.media_type;
                if f.media_type.is_empty() {
                    // unchanged: the unit's current media type
                    if let Ok(u) = self.iu.unit(&s.id).await {
                        f.media_type = u.media_type;
                    }
                }
            }
            iu::action::TAGGED => f.tags = UnitTagged::decode(m.payload.clone()).map_err(bad)?.tags,
            iu::action::ATTRIBUTES_SET => {
                UnitAttributesSet::decode(m.payload.clone()).map_err(bad)?;
            }
            iu::action::LINKED => {
                UnitLinked::decode(m.payload.clone()).map_err(bad)?;
            }
            _ => return Ok(None),
        }
        Ok(Some(f))
    }

    // ---- runs ----

    /// Run work items (`requested`, `retried`) from the shared durable consumer `pipeline-runs`.
    async fn run_worker(self: Arc<Self>) {
        let consumer = loop {
            match self.run_consumer().await {
                Ok(c) => break c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open the run consumer; retrying");
                    tokio::select! { _ = self.ctx.stopping() => return, _ = tokio::time::sleep(Duration::from_secs(1)) => {} }
                }
            }
        };
        loop {
            // Take only as much work as there are free run permits.
            let permit = tokio::select! {
                _ = self.ctx.stopping() => return self.idle().await,
                p = self.runs.acquire() => match p { Ok(p) => p, Err(_) => return },
            };
            drop(permit);
            let free = self.runs.available_permits().max(1);
            let batch = tokio::select! {
                _ = self.ctx.stopping() => return self.idle().await,
                b = consumer.fetch().max_messages(free).expires(Duration::from_secs(1)).messages() => b,
            };
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "run fetch failed; retrying");
                    tokio::select! { _ = self.ctx.stopping() => return, _ = tokio::time::sleep(Duration::from_millis(500)) => {} }
                    continue;
                }
            };
            while let Some(m) = batch.next().await {
                let Ok(m) = m else { continue };
                let Ok(permit) = self.runs.clone().acquire_owned().await else { return };
                let engine = self.clone();
                tokio::spawn(async move {
                    engine.work(m).await;
                    drop(permit);
                });
            }
        }
    }

    /// Waits until no run is in flight (a drained instance holds no work).
    async fn idle(&self) {
        let _ = self.runs.acquire_many(self.args.max_runs as u32).await;
    }

    async fn run_consumer(&self) -> anyhow::Result<jetstream::consumer::Consumer<pull::Config>> {
        let stream = self.js.get_stream(&self.events_stream).await?;
        let name = pl::run_consumer();
        let config = pull::Config {
            durable_name: Some(name.clone()),
            description: Some("pipeline run work items (every pipeline-engine instance)".into()),
            filter_subjects: vec![pl::run_action(action::REQUESTED)?, pl::run_action(action::RETRIED)?],
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.args.ack_wait,
            max_ack_pending: 10_000,
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        };
        Ok(stream.get_or_create_consumer(&name, config).await?)
    }

    /// Works on one run until it is done, keeping its work item alive meanwhile.
    async fn work(self: Arc<Self>, m: jetstream::Message) {
        let m = Arc::new(m);
        let keepalive = {
            let m = m.clone();
            let every = self.args.ack_wait / 3;
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let _ = m.ack_with(AckKind::Progress).await;
                }
            })
        };
        let outcome = self.work_on(&m).await;
        keepalive.abort();
        match outcome {
            Ok(Duration::ZERO) => {
                let _ = m.double_ack().await;
            }
            Ok(later) => {
                let _ = m.ack_with(AckKind::Nak(Some(later))).await;
            }
            Err(e) => {
                tracing::warn!(subject = %m.subject, error = %e, "run work failed; redelivering");
                let _ = m.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
            }
        }
    }

    /// Ok(ZERO) = done (ack), Ok(d) = try again after d, Err = redeliver soon.
    async fn work_on(&self, m: &jetstream::Message) -> Result<Duration, String> {
        let run_id = match subject::parse_event(&m.subject) {
            Ok(s) => s.id,
            Err(e) => {
                self.dead_letter(pl::DLQ_RUNS, m, &e.to_string(), 0).await?;
                return Ok(Duration::ZERO);
            }
        };
        for _ in 0..50 {
            let (run, request_env) = match self.load_run(&run_id).await {
                Ok(Some(r)) => r,
                Ok(None) => {
                    let reason = format!("run {run_id} has no requested event");
                    self.dead_letter(pl::DLQ_RUNS, m, &reason, 0).await?;
                    return Ok(Duration::ZERO);
                }
                Err(e) if e.contains("does not decode") || e.contains("envelope") => {
                    self.dead_letter(pl::DLQ_RUNS, m, &e, 0).await?;
                    return Ok(Duration::ZERO);
                }
                Err(e) => return Err(e),
            };
            if run.info.is_terminal() {
                return Ok(Duration::ZERO);
            }
            let def = self.definition_of(&run).await;
            let Some(def) = def else {
                let error =
                    format!("pipeline {} version {} is not known", run.info.pipeline, run.info.pipeline_version);
                match self.fail(&run, &request_env, "-", &error, m).await {
                    Ok(()) => return Ok(Duration::ZERO),
                    Err(Publish::Conflict) => continue,
                    Err(Publish::Failed(e)) => return Err(e),
                }
            };
            let Some(_slot) = self.acquire_slot(&def, &run_id).await? else {
                return Ok(Duration::from_millis(250));
            };
            match self.drive(run, &request_env, &def, m).await? {
                Outcome::Done => return Ok(Duration::ZERO),
                Outcome::Reload => continue,
                Outcome::Later(d) => return Ok(d),
            }
        }
        Err(format!("run {run_id} keeps changing under this instance"))
    }

    async fn definition_of(&self, run: &Run) -> Option<Definition> {
        let find = |view: &View| view.definition(&run.info.pipeline, run.info.pipeline_version).cloned();
        if let Some(d) = find(&*self.view.read().await) {
            return Some(d);
        }
        self.caught_up().await.ok()?;
        find(&*self.view.read().await)
    }

    /// Runs the run's remaining steps in order, recording each as events.
    #[allow(unused_assignments)] // the last event's sequence is not needed
    async fn drive(
        &self,
        mut run: Run,
        parent: &Envelope,
        def: &Definition,
        m: &jetstream::Message,
    ) -> Result<Outcome, String> {
        let run_id = run.info.run_id.clone();
        let mut seq = run.info.last_seq;
        macro_rules! record {
            ($act:expr, $payload:expr) => {
                match self.publish_run(&run_id, $act, &$payload, parent, seq).await {
                    Ok(s) => seq = s,
                    Err(Publish::Conflict) => return Ok(Outcome::Reload),
                    Err(Publish::Failed(e)) => return Err(e),
                }
            };
        }
        // Cancellation reaches a step in flight through the cancelled event itself.
        let mut cancelled = self
            .ctx
            .client()
            .subscribe(pl::run_event(&run_id, action::CANCELLED).map_err(|e| e.to_string())?)
            .await
            .map_err(|e| e.to_string())?;
        if run.started_by != self.ctx.settings().instance_id {
            record!(
                action::STARTED,
                RunStarted { run_id: run_id.clone(), instance_id: self.ctx.settings().instance_id.clone() }
            );
        }
        let mut unit: Option<Unit> = None;
        for step in def.all_steps() {
            if let Some(done) = run.outputs.get(&step.id) {
                if !done.passed {
                    record!(
                        action::COMPLETED,
                        RunCompleted {
                            run_id: run_id.clone(),
                            units: run.info.units.clone(),
                            outcome: format!("filtered: {}", step.id)
                        }
                    );
                    return Ok(Outcome::Done);
                }
                continue;
            }
            loop {
                let failures = run.failures.get(&step.id).copied().unwrap_or(0);
                let attempt = failures + 1;
                record!(
                    action::STEP_STARTED,
                    StepStarted {
                        run_id: run_id.clone(),
                        step: step.id.clone(),
                        attempt,
                        instance_id: self.ctx.settings().instance_id.clone()
                    }
                );
                let started = Instant::now();
                let timeout = Duration::from_millis(u64::from(step.timeout_ms()));
                let result = tokio::select! {
                    r = tokio::time::timeout(timeout, self.execute(step, &run, &mut unit, parent)) => match r {
                        Ok(r) => r,
                        Err(_) => Err(StepError::transient(format!("step timed out after {}ms", step.timeout_ms()))),
                    },
                    _ = cancelled.next() => return Ok(Outcome::Reload),
                };
                match result {
                    Ok(out) => {
                        if let Some(s) = out.seq {
                            seq = seq.max(s);
                        }
                        if out.output.len() > MAX_STEP_OUTPUT {
                            let e = format!(
                                "output of {} bytes is more than the {MAX_STEP_OUTPUT} a step may pass on",
                                out.output.len()
                            );
                            record!(
                                action::STEP_FAILED,
                                StepFailed {
                                    run_id: run_id.clone(),
                                    step: step.id.clone(),
                                    attempt,
                                    error: e.clone(),
                                    will_retry: false,
                                    retry_in_ms: 0
                                }
                            );
                            return match self.fail_at(&run_id, seq, parent, &step.id, &e, m).await {
                                Ok(()) => Ok(Outcome::Done),
                                Err(Publish::Conflict) => Ok(Outcome::Reload),
                                Err(Publish::Failed(e)) => Err(e),
                            };
                        }
                        let completed = StepCompleted {
                            run_id: run_id.clone(),
                            step: step.id.clone(),
                            attempt,
                            output: out.output,
                            metadata: out.metadata.into_iter().collect(),
                            units: out.units,
                            passed: out.passed,
                            duration_us: started.elapsed().as_micros() as u64,
                        };
                        record!(action::STEP_COMPLETED, completed);
                        run.apply(RunEvent::StepCompleted(completed), seq, 0, "");
                        if !run.outputs[&step.id].passed {
                            record!(
                                action::COMPLETED,
                                RunCompleted {
                                    run_id: run_id.clone(),
                                    units: run.info.units.clone(),
                                    outcome: format!("filtered: {}", step.id)
                                }
                            );
                            return Ok(Outcome::Done);
                        }
                        break;
                    }
                    Err(e) => {
                        let will_retry = !e.permanent && failures < step.retries();
                        let pause = step.backoff(attempt);
                        let failed = StepFailed {
                            run_id: run_id.clone(),
                            step: step.id.clone(),
                            attempt,
                            error: one_line(&e.message),
                            will_retry,
                            retry_in_ms: if will_retry { pause.as_millis() as u32 } else { 0 },
                        };
                        record!(action::STEP_FAILED, failed.clone());
                        run.apply(RunEvent::StepFailed(failed), seq, 0, "");
                        if !will_retry {
                            let why = if e.permanent {
                                e.message.clone()
                            } else {
                                format!("{} (after {attempt} attempts)", e.message)
                            };
                            return match self.fail_at(&run_id, seq, parent, &step.id, &why, m).await {
                                Ok(()) => Ok(Outcome::Done),
                                Err(Publish::Conflict) => Ok(Outcome::Reload),
                                Err(Publish::Failed(e)) => Err(e),
                            };
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(pause) => {}
                            _ = cancelled.next() => return Ok(Outcome::Reload),
                            _ = self.ctx.stopping() => return Ok(Outcome::Later(Duration::from_millis(100))),
                        }
                    }
                }
            }
        }
        record!(
            action::COMPLETED,
            RunCompleted { run_id: run_id.clone(), units: run.info.units.clone(), outcome: "completed".into() }
        );
        Ok(Outcome::Done)
    }

    async fn fail(
        &self,
        run: &Run,
        parent: &Envelope,
        step: &str,
        error: &str,
        m: &jetstream::Message,
    ) -> Result<(), Publish> {
        self.fail_at(&run.info.run_id, run.info.last_seq, parent, step, error, m).await
    }

    /// The run failed: dead-letter its work item with the reason, then record the failure (in
    /// this order, so a crash between the two repeats the dead letter, de-duplicated, rather
    /// than lose it).
    async fn fail_at(
        &self,
        run_id: &str,
        seq: u64,
        parent: &Envelope,
        step: &str,
        error: &str,
        m: &jetstream::Message,
    ) -> Result<(), Publish> {
        let reason = format!("run {run_id} failed at step {step}: {error}");
        self.dead_letter(pl::DLQ_RUNS, m, &reason, seq).await.map_err(Publish::Failed)?;
        self.publish_run(
            run_id,
            action::FAILED,
            &RunFailed { run_id: run_id.into(), step: step.into(), error: one_line(error) },
            parent,
            seq,
        )
        .await?;
        Ok(())
    }

    // ---- concurrency slots ----

    /// A slot of the pipeline's concurrency limit, held while the run works (None: all taken).
    async fn acquire_slot(&self, def: &Definition, run_id: &str) -> Result<Option<Option<Slot>>, String> {
        if def.concurrency == 0 {
            return Ok(Some(None));
        }
        for n in 0..def.concurrency {
            let key = pl::slot_key(&def.name, n).map_err(|e| e.to_string())?;
            let revision = match self.slots.create(&key, Bytes::from(run_id.to_string())).await {
                Ok(r) => r,
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    // Ours from before (this run, redelivered)? Take it over.
                    match self.slots.entry(&key).await {
                        Ok(Some(entry))
                            if entry.value.as_ref() == run_id.as_bytes() && entry.operation == kv::Operation::Put =>
                        {
                            match self.slots.update(&key, Bytes::from(run_id.to_string()), entry.revision).await {
                                Ok(r) => r,
                                Err(_) => continue,
                            }
                        }
                        _ => continue,
                    }
                }
                Err(e) => return Err(format!("concurrency slot {key}: {e}")),
            };
            let (stop, mut stopped) = watch::channel(false);
            let slots = self.slots.clone();
            let value = run_id.to_string();
            let renew_key = key.clone();
            let renewer = tokio::spawn(async move {
                let mut revision = revision;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(pl::SLOT_TTL / 3) => {}
                        _ = stopped.changed() => break,
                    }
                    match slots.update(&renew_key, Bytes::from(value.clone()), revision).await {
                        Ok(r) => revision = r,
                        Err(e) => {
                            tracing::warn!(slot = %renew_key, error = %e, "lost a concurrency slot");
                            return;
                        }
                    }
                }
                let _ = slots.delete_expect_revision(&renew_key, Some(revision)).await;
            });
            return Ok(Some(Some(Slot { stop, renewer: Some(renewer) })));
        }
        Ok(None)
    }

    // ---- steps ----

    async fn execute(
        &self,
        step: &Step,
        run: &Run,
        unit: &mut Option<Unit>,
        parent: &Envelope,
    ) -> Result<StepOutput, StepError> {
        let kind = step.kind().map_err(|e| StepError::permanent(e.0))?;
        let run_id = &run.info.run_id;
        // Unit facts are read once per run and only if a step needs them.
        let needs_unit = !run.info.unit_id.is_empty();
        if unit.is_none() && needs_unit {
            *unit = Some(self.iu.unit(&run.info.unit_id).await.map_err(|e| {
                if e.to_string().contains("does not exist") {
                    StepError::permanent(format!("unit {}: {e}", run.info.unit_id))
                } else {
                    StepError::transient(format!("unit {}: {e}", run.info.unit_id))
                }
            })?);
        }
        let unit_ref = unit.as_ref();
        let lookup = |field: &str| lookup(field, run, unit_ref);
        let render = |t: &str| {
            definition::render(t, &lookup).map_err(|e| StepError::permanent(format!("step {}: {e}", step.id)))
        };
        let request_id = format!("pl-{run_id}-{}", step.id);
        match kind {
            Kind::Plugin(p) => {
                let input = self.content(step.input.as_deref().unwrap_or(&default_input(run)), run, unit_ref).await?;
                let mut meta = BTreeMap::new();
                if let Some(u) = unit_ref {
                    meta.insert("unit-id".to_string(), u.unit_id.clone());
                    meta.insert("name".to_string(), u.name.clone());
                    meta.insert("content-type".to_string(), u.media_type.clone());
                }
                for (k, v) in &step.options {
                    meta.insert(k.clone(), render(v)?);
                }
                let reply = self.invoke(&p, input, meta, step.timeout_ms()).await?;
                let mut metadata: BTreeMap<String, String> = reply.metadata.into_iter().collect();
                metadata.insert("plugin".into(), plugin::reference(&reply.plugin, &reply.version));
                Ok(StepOutput { output: reply.output.to_vec(), metadata, passed: true, ..Default::default() })
            }
            Kind::ForEach(f, p) => {
                let items = self.content(&f.items, run, unit_ref).await?;
                let items = split_items(&items, &f.split).map_err(StepError::permanent)?;
                let max = f.max_items.unwrap_or(1000) as usize;
                if items.len() > max {
                    return Err(StepError::permanent(format!("{} items, more than max_items {max}", items.len())));
                }
                let mut outputs = Vec::with_capacity(items.len());
                for item in items {
                    let reply = self.invoke(&p, item, BTreeMap::new(), step.timeout_ms()).await?;
                    outputs.push(serde_json::Value::String(String::from_utf8_lossy(&reply.output).into_owned()));
                }
                let count = outputs.len();
                Ok(StepOutput {
                    output: serde_json::to_vec(&outputs).unwrap_or_default(),
                    metadata: [("count".to_string(), count.to_string())].into(),
                    passed: true,
                    ..Default::default()
                })
            }
            Kind::Filter(c) => {
                let passed = definition::holds(c, lookup(&c.field).as_deref());
                Ok(StepOutput {
                    metadata: [("passed".to_string(), passed.to_string())].into(),
                    passed,
                    ..Default::default()
                })
            }
            Kind::Map(values) => {
                let mut metadata = BTreeMap::new();
                for (k, v) in values {
                    metadata.insert(k.clone(), render(v)?);
                }
                Ok(StepOutput { metadata, passed: true, ..Default::default() })
            }
            Kind::Tag(tags) => {
                let unit_id = required_unit(run, step)?;
                let tags = tags.iter().map(|t| render(t)).collect::<Result<Vec<_>, _>>()?;
                let cmd =
                    TagUnit { header: header_with_id(request_id, 0), unit_id: unit_id.clone(), tags: tags.clone() };
                self.iu.execute_caused_by(cmd, parent).await.map_err(iu_error)?;
                Ok(StepOutput {
                    metadata: [("tags".to_string(), tags.join(","))].into(),
                    units: vec![unit_id],
                    passed: true,
                    ..Default::default()
                })
            }
            Kind::SetAttributes(attrs) => {
                let unit_id = required_unit(run, step)?;
                let mut set = BTreeMap::new();
                for (k, v) in attrs {
                    set.insert(k.clone(), render(v)?);
                }
                let cmd = SetAttributes {
                    header: header_with_id(request_id, 0),
                    unit_id: unit_id.clone(),
                    set: set.clone().into_iter().collect(),
                    remove: Vec::new(),
                };
                self.iu.execute_caused_by(cmd, parent).await.map_err(iu_error)?;
                Ok(StepOutput { metadata: set, units: vec![unit_id], passed: true, ..Default::default() })
            }
            Kind::CreateUnit(spec) => {
                let source = required_unit(run, step)?;
                let bytes = self.content(&spec.content, run, unit_ref).await?;
                let bytes = match spec.max_bytes {
                    Some(max) => definition::head(&bytes, max as usize).to_vec(),
                    None => bytes.to_vec(),
                };
                let media_type = if !spec.media_type.is_empty() {
                    spec.media_type.clone()
                } else if std::str::from_utf8(&bytes).is_ok() {
                    "text/plain; charset=utf-8".to_string()
                } else {
                    "application/octet-stream".to_string()
                };
                let committed = self.iu.put_bytes(&bytes).await.map_err(iu_error)?;
                let mut attributes = BTreeMap::new();
                for (k, v) in &spec.attributes {
                    attributes.insert(k.clone(), render(v)?);
                }
                let cmd = CreateUnit {
                    header: header_with_id(request_id, 0),
                    cid: committed.cid.clone(),
                    name: render(&spec.name)?,
                    media_type,
                    unit_type: String::new(),
                    tags: spec.tags.iter().map(|t| render(t)).collect::<Result<Vec<_>, _>>()?,
                    attributes: attributes.into_iter().collect(),
                    links: vec![Link {
                        kind: if spec.link.is_empty() { "derived-from".into() } else { spec.link.clone() },
                        target: source,
                    }],
                };
                let created = self.iu.execute_caused_by(cmd, parent).await.map_err(iu_error)?;
                Ok(StepOutput {
                    output: created.unit_id.clone().into_bytes(),
                    metadata: [("unit-id".to_string(), created.unit_id.clone()), ("cid".to_string(), committed.cid)]
                        .into(),
                    units: vec![created.unit_id],
                    passed: true,
                    seq: None,
                })
            }
            Kind::NewVersion(spec) => {
                let unit_id = required_unit(run, step)?;
                let bytes = self.content(&spec.content, run, unit_ref).await?;
                let committed = self.iu.put_bytes(&bytes).await.map_err(iu_error)?;
                let cmd = NewVersion {
                    header: header_with_id(request_id, 0),
                    unit_id: unit_id.clone(),
                    cid: committed.cid.clone(),
                    name: String::new(),
                    media_type: spec.media_type.clone(),
                };
                self.iu.execute_caused_by(cmd, parent).await.map_err(iu_error)?;
                Ok(StepOutput {
                    metadata: [("cid".to_string(), committed.cid)].into(),
                    units: vec![unit_id],
                    passed: true,
                    ..Default::default()
                })
            }
            Kind::Emit(spec) => {
                let mut data = BTreeMap::new();
                for (k, v) in &spec.data {
                    data.insert(k.clone(), render(v)?);
                }
                let event = RunEmitted {
                    run_id: run_id.clone(),
                    step: step.id.clone(),
                    name: spec.name.clone(),
                    data: data.clone().into_iter().collect(),
                };
                let env = Envelope::caused_by::<RunEmitted>(parent, self.ctx.source());
                let mut headers = env.to_headers();
                // Written once however often the step is repeated (within the duplicate window).
                headers.insert(H_MSG_ID, format!("emit-{run_id}-{}", step.id).as_str());
                let subject =
                    pl::run_event(run_id, action::EMITTED).map_err(|e| StepError::permanent(e.to_string()))?;
                let written =
                    self.publish(subject, headers, event.encode_to_vec(), None).await.map_err(|e| match e {
                        Publish::Conflict => StepError::transient("emit conflicted"),
                        Publish::Failed(e) => StepError::transient(e),
                    })?;
                Ok(StepOutput { metadata: data, passed: true, seq: Some(written), ..Default::default() })
            }
        }
    }

    /// Bytes a step reads: `unit.content` or `<step>.output`.
    async fn content(&self, field: &str, run: &Run, unit: Option<&Unit>) -> Result<Bytes, StepError> {
        if field == "unit.content" {
            let u = unit.ok_or_else(|| StepError::permanent("the run has no unit, so there is no unit.content"))?;
            if u.size > self.args.max_content {
                return Err(StepError::permanent(format!(
                    "unit content is {} bytes, more than --pipeline-max-content {}",
                    u.size, self.args.max_content
                )));
            }
            return self.iu.get_bytes(&u.cid, None).await.map(Bytes::from).map_err(iu_error);
        }
        let step = field.strip_suffix(".output").unwrap_or(field);
        run.outputs
            .get(step)
            .map(|c| Bytes::from(c.output.clone()))
            .ok_or_else(|| StepError::permanent(format!("{field} has no value (step {step} has not completed)")))
    }

    /// Calls a plugin through its contract and classifies failures.
    async fn invoke(
        &self,
        p: &PluginRef,
        input: Bytes,
        metadata: BTreeMap<String, String>,
        timeout_ms: u32,
    ) -> Result<InvokeReply, StepError> {
        let (subject, mut request) = match p {
            PluginRef::Version { name, version } => (plugin::invoke_subject(name, version), InvokeRequest::default()),
            PluginRef::Capability(c) => {
                (plugin::command(plugin::cmd::INVOKE), InvokeRequest { capability: c.clone(), ..Default::default() })
            }
        };
        let subject = subject.map_err(|e| StepError::permanent(e.to_string()))?;
        request.input = input.to_vec();
        request.metadata = metadata.into_iter().collect();
        request.timeout_ms = timeout_ms;
        let req = async_nats::Request::new()
            .payload(request.encode_to_vec().into())
            .timeout(Some(Duration::from_millis(u64::from(timeout_ms)) + Duration::from_secs(1)));
        let msg = self.ctx.client().send_request(subject, req).await.map_err(|e| match e.kind() {
            async_nats::RequestErrorKind::NoResponders => StepError::transient(format!(
                "nothing serves {p} (plugin host or native plugin down, or the version was removed)"
            )),
            async_nats::RequestErrorKind::TimedOut => StepError::transient(format!("{p} did not answer in time")),
            _ => StepError::transient(format!("invoking {p}: {e}")),
        })?;
        let reply = InvokeReply::decode(msg.payload).map_err(|e| {
            StepError::transient(format!("{p} answered with something that is not an InvokeReply: {e}"))
        })?;
        let status = Status::try_from(reply.status).unwrap_or(Status::Unspecified);
        if status == Status::Ok {
            return Ok(reply);
        }
        let message = reply.error.as_ref().map(|e| e.message.clone()).unwrap_or_default();
        let text =
            format!("{p}: {} {message}", status.as_str_name().trim_start_matches("STATUS_").to_ascii_lowercase());
        Err(match status {
            Status::BadRequest | Status::NotFound | Status::InvalidInput => StepError::permanent(text),
            _ => StepError::transient(text),
        })
    }

    // ---- commands ----

    async fn apply(&self, msg: async_nats::Message) -> Result<Reply, ServiceError> {
        let req: ApplyRequest = parse(&msg)?;
        let def = Definition::parse(&req.definition).map_err(|e| ServiceError::bad_request(e.0))?;
        self.check_plugins(&def).await?;
        let normalized = definition::normalized(&def);
        let digest = format!("sha256:{}", hex(&Sha256::digest(normalized.as_bytes())));
        self.caught_up().await?;
        let (last_seq, current) = {
            let view = self.view.read().await;
            match view.pipelines.get(&def.name) {
                Some(p) => (
                    p.last_seq,
                    p.current().map(|v| (v.version, v.digest.clone(), p.active, v.definition.pinned_plugins())),
                ),
                None => (0, None),
            }
        };
        if let Some((version, d, true, _)) = &current
            && *d == digest
        {
            return Ok(json_reply(&ApplyReply { name: def.name, version: *version, unchanged: true }));
        }
        // References first, then the event: a concurrent removal of a pinned version is refused.
        let pinned = def.pinned_plugins();
        self.write_references(&def.name, &pinned).await?;
        let version = current.as_ref().map(|c| c.0 + 1).unwrap_or(1);
        let event = PipelineApplied { name: def.name.clone(), version, definition_json: normalized, digest };
        let env = Envelope::root::<PipelineApplied>(self.ctx.source());
        let subject =
            pl::pipeline_event(&def.name, action::APPLIED).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        let filter = pl::pipeline_history(&def.name).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        match self.publish(subject, env.to_headers(), event.encode_to_vec(), Some((filter, last_seq))).await {
            Ok(_) => {}
            Err(Publish::Conflict) => {
                return Err(ServiceError::conflict(format!("pipeline {} changed meanwhile; apply again", def.name)));
            }
            Err(Publish::Failed(e)) => return Err(ServiceError::unavailable(e)),
        }
        if let Some((_, _, _, old)) = current {
            let stale: Vec<(String, String)> = old.into_iter().filter(|p| !pinned.contains(p)).collect();
            self.delete_references(&def.name, &stale).await;
        }
        tracing::info!(pipeline = %def.name, version, "pipeline applied");
        Ok(json_reply(&ApplyReply { name: def.name, version, unchanged: false }))
    }

    /// Every plugin a definition calls must exist now (unknown plugins are refused at apply).
    async fn check_plugins(&self, def: &Definition) -> Result<(), ServiceError> {
        let refs = def.plugin_refs();
        if refs.is_empty() {
            return Ok(());
        }
        let subject = plugin::query(plugin::qry::LIST).map_err(|e| ServiceError::internal(e.to_string()))?;
        let req = async_nats::Request::new()
            .payload(ListPlugins::default().encode_to_vec().into())
            .timeout(Some(Duration::from_secs(5)));
        let reply =
            self.ctx.client().send_request(subject, req).await.map_err(|e| {
                ServiceError::unavailable(format!("cannot check plugins: no plugin host answers ({e})"))
            })?;
        let list = ListReply::decode(reply.payload)
            .map_err(|e| ServiceError::internal(format!("plugin list does not decode: {e}")))?;
        for (step, p) in refs {
            let ok = match &p {
                PluginRef::Version { name, version } => {
                    list.plugins.iter().any(|x| &x.name == name && &x.version == version && x.state == "ready")
                }
                PluginRef::Capability(c) => {
                    list.plugins.iter().any(|x| x.capabilities.contains(c) && x.state == "ready")
                }
            };
            if !ok {
                return Err(ServiceError::bad_request(format!(
                    "step {step}: unknown plugin {p} (see cimctl plugin ls)"
                )));
            }
        }
        Ok(())
    }

    async fn references(&self) -> Result<kv::Store, ServiceError> {
        let bucket = resources::kv_bucket(Component::PluginHost, plugin::KV_REFERENCES)
            .map_err(|e| ServiceError::internal(e.to_string()))?;
        self.js
            .get_key_value(bucket)
            .await
            .map_err(|e| ServiceError::unavailable(format!("plugin references bucket: {e}")))
    }

    async fn write_references(&self, pipeline: &str, pinned: &[(String, String)]) -> Result<(), ServiceError> {
        if pinned.is_empty() {
            return Ok(());
        }
        let refs = self.references().await?;
        let referrer = pl::plugin_referrer(pipeline).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        for (name, version) in pinned {
            let key = plugin::reference_key(name, version, &referrer)
                .map_err(|e| ServiceError::bad_request(e.to_string()))?;
            let value = PluginReference {
                plugin: name.clone(),
                version: version.clone(),
                referrer: format!("pipeline:{pipeline}"),
                detail: format!("pipeline {pipeline}"),
            };
            refs.put(key, value.encode_to_vec().into())
                .await
                .map_err(|e| ServiceError::unavailable(format!("writing plugin reference: {e}")))?;
        }
        Ok(())
    }

    async fn delete_references(&self, pipeline: &str, stale: &[(String, String)]) {
        if stale.is_empty() {
            return;
        }
        let Ok(refs) = self.references().await else { return };
        let Ok(referrer) = pl::plugin_referrer(pipeline) else { return };
        for (name, version) in stale {
            if let Ok(key) = plugin::reference_key(name, version, &referrer)
                && let Err(e) = refs.delete(&key).await
            {
                tracing::warn!(key, error = %e, "cannot delete a plugin reference");
            }
        }
    }

    async fn remove(&self, msg: async_nats::Message) -> Result<Reply, ServiceError> {
        let req: RemoveRequest = parse(&msg)?;
        pl::validate_name(&req.name).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        self.caught_up().await?;
        let (last_seq, version, pinned) = {
            let view = self.view.read().await;
            let p = view
                .pipelines
                .get(&req.name)
                .filter(|p| p.active)
                .ok_or_else(|| ServiceError::not_found(format!("no pipeline {}", req.name)))?;
            let v = p.current().ok_or_else(|| ServiceError::not_found(format!("no pipeline {}", req.name)))?;
            (p.last_seq, v.version, v.definition.pinned_plugins())
        };
        let event = PipelineRemoved { name: req.name.clone(), version, reason: req.reason };
        let env = Envelope::root::<PipelineRemoved>(self.ctx.source());
        let subject =
            pl::pipeline_event(&req.name, action::REMOVED).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        let filter = pl::pipeline_history(&req.name).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        match self.publish(subject, env.to_headers(), event.encode_to_vec(), Some((filter, last_seq))).await {
            Ok(_) => {}
            Err(Publish::Conflict) => {
                return Err(ServiceError::conflict(format!("pipeline {} changed meanwhile", req.name)));
            }
            Err(Publish::Failed(e)) => return Err(ServiceError::unavailable(e)),
        }
        self.delete_references(&req.name, &pinned).await;
        Ok(json_reply(&ApplyReply { name: req.name, version, unchanged: false }))
    }

    async fn start(&self, msg: async_nats::Message) -> Result<Reply, ServiceError> {
        let req: StartRequest = parse(&msg)?;
        pl::validate_name(&req.pipeline).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        if !req.unit_id.is_empty() {
            cim_events::token::validate_token("unit id", &req.unit_id)
                .map_err(|e| ServiceError::bad_request(e.to_string()))?;
            self.iu
                .unit(&req.unit_id)
                .await
                .map_err(|e| ServiceError::bad_request(format!("unit {}: {e}", req.unit_id)))?;
        }
        self.caught_up().await?;
        let version = {
            let view = self.view.read().await;
            let p = view
                .pipelines
                .get(&req.pipeline)
                .filter(|p| p.active)
                .ok_or_else(|| ServiceError::not_found(format!("no pipeline {}", req.pipeline)))?;
            p.current()
                .map(|v| v.version)
                .ok_or_else(|| ServiceError::not_found(format!("no pipeline {}", req.pipeline)))?
        };
        let run_id = uuid::Uuid::now_v7().to_string();
        let request = RunRequested {
            run_id: run_id.clone(),
            pipeline: req.pipeline.clone(),
            pipeline_version: version,
            trigger: "manual".into(),
            unit_id: req.unit_id,
            params: req.params.into_iter().collect(),
            ..Default::default()
        };
        // The caller's envelope, if it sent one, is the cause.
        let env = match msg.headers.as_ref().and_then(|h| Envelope::from_headers(h).ok()) {
            Some(parent) => Envelope::caused_by::<RunRequested>(&parent, self.ctx.source()),
            None => Envelope::root::<RunRequested>(self.ctx.source()),
        };
        let subject = pl::run_event(&run_id, action::REQUESTED).map_err(|e| ServiceError::internal(e.to_string()))?;
        let filter = pl::run_history(&run_id).map_err(|e| ServiceError::internal(e.to_string()))?;
        self.publish(subject, env.to_headers(), request.encode_to_vec(), Some((filter, 0))).await.map_err(
            |e| match e {
                Publish::Conflict => ServiceError::conflict("run id collision"),
                Publish::Failed(e) => ServiceError::unavailable(e),
            },
        )?;
        Ok(json_reply(&RunRef { run_id, reason: String::new() }))
    }

    async fn cancel(&self, msg: async_nats::Message) -> Result<Reply, ServiceError> {
        let req: RunRef = parse(&msg)?;
        self.change_run(
            &req,
            "cancel",
            |info| !info.is_terminal(),
            |run_id, reason| (action::CANCELLED, RunCancelled { run_id, reason }.encode_to_vec(), RunCancelled::TYPE),
        )
        .await
    }

    async fn retry(&self, msg: async_nats::Message) -> Result<Reply, ServiceError> {
        let req: RunRef = parse(&msg)?;
        self.change_run(
            &req,
            "retry",
            |info| info.state == "failed" || info.state == "cancelled",
            |run_id, reason| (action::RETRIED, RunRetried { run_id, reason }.encode_to_vec(), RunRetried::TYPE),
        )
        .await
    }

    /// Writes a cancel or retry event if the run's state allows it, retrying on conflicts.
    async fn change_run(
        &self,
        req: &RunRef,
        what: &str,
        allowed: impl Fn(&RunInfo) -> bool,
        event: impl Fn(String, String) -> (&'static str, Vec<u8>, &'static str),
    ) -> Result<Reply, ServiceError> {
        cim_events::token::validate_token("run id", &req.run_id)
            .map_err(|e| ServiceError::bad_request(e.to_string()))?;
        for _ in 0..10 {
            let (run, parent) = self
                .load_run(&req.run_id)
                .await
                .map_err(ServiceError::unavailable)?
                .ok_or_else(|| ServiceError::not_found(format!("no run {}", req.run_id)))?;
            if !allowed(&run.info) {
                return Err(ServiceError::conflict(format!(
                    "cannot {what} run {}: it is {}",
                    req.run_id, run.info.state
                )));
            }
            let (act, body, type_name) = event(req.run_id.clone(), req.reason.clone());
            let schema = cim_events::Schema { name: type_name.to_string(), version: 1 };
            let env = Envelope::new_caused_by(&parent, type_name, schema, self.ctx.source());
            let subject = pl::run_event(&req.run_id, act).map_err(|e| ServiceError::bad_request(e.to_string()))?;
            let filter = pl::run_history(&req.run_id).map_err(|e| ServiceError::bad_request(e.to_string()))?;
            match self.publish(subject, env.to_headers(), body, Some((filter, run.info.last_seq))).await {
                Ok(_) => {
                    let (run, _) = self
                        .load_run(&req.run_id)
                        .await
                        .map_err(ServiceError::unavailable)?
                        .ok_or_else(|| ServiceError::not_found("run vanished"))?;
                    let def = self.definition_of(&run).await;
                    return Ok(json_reply(&run.with_plan(def.as_ref()).info));
                }
                Err(Publish::Conflict) => continue,
                Err(Publish::Failed(e)) => return Err(ServiceError::unavailable(e)),
            }
        }
        Err(ServiceError::conflict(format!("run {} keeps changing; try again", req.run_id)))
    }

    // ---- queries ----

    async fn list(&self, _msg: async_nats::Message) -> Result<Reply, ServiceError> {
        self.caught_up().await?;
        let view = self.view.read().await;
        let pipelines =
            view.pipelines.iter().filter_map(|(name, p)| p.current().map(|v| info(&view, name, p.active, v))).collect();
        Ok(json_reply(&PipelineList { pipelines }))
    }

    async fn get(&self, msg: async_nats::Message) -> Result<Reply, ServiceError> {
        let req: PipelineRef = parse(&msg)?;
        self.caught_up().await?;
        let view = self.view.read().await;
        let p = view
            .pipelines
            .get(&req.name)
            .ok_or_else(|| ServiceError::not_found(format!("no pipeline {}", req.name)))?;
        let v = p.current().ok_or_else(|| ServiceError::not_found(format!("no pipeline {}", req.name)))?;
        Ok(json_reply(&info(&view, &req.name, p.active, v)))
    }

    async fn runs(&self, msg: async_nats::Message) -> Result<Reply, ServiceError> {
        let req: RunsRequest = if msg.payload.is_empty() { RunsRequest::default() } else { parse(&msg)? };
        self.caught_up().await?;
        let view = self.view.read().await;
        let mut runs: Vec<RunInfo> = view
            .runs
            .values()
            .filter(|r| !r.info.run_id.is_empty())
            .filter(|r| req.pipeline.is_empty() || r.info.pipeline == req.pipeline)
            .filter(|r| req.state.is_empty() || r.info.state == req.state)
            .filter(|r| req.unit_id.is_empty() || r.info.unit_id == req.unit_id)
            .map(|r| r.clone().with_plan(view.definition(&r.info.pipeline, r.info.pipeline_version)).info)
            .collect();
        // UUIDv7 ids sort by time: newest first.
        runs.sort_by(|a, b| b.run_id.cmp(&a.run_id));
        runs.truncate(if req.limit == 0 { 100 } else { req.limit as usize });
        Ok(json_reply(&RunList { runs }))
    }

    async fn run(&self, msg: async_nats::Message) -> Result<Reply, ServiceError> {
        let req: RunRef = parse(&msg)?;
        cim_events::token::validate_token("run id", &req.run_id)
            .map_err(|e| ServiceError::bad_request(e.to_string()))?;
        let (run, _) = self
            .load_run(&req.run_id)
            .await
            .map_err(ServiceError::unavailable)?
            .ok_or_else(|| ServiceError::not_found(format!("no run {}", req.run_id)))?;
        let def = self.definition_of(&run).await;
        Ok(json_reply(&run.with_plan(def.as_ref()).info))
    }
}

/// A held concurrency slot: renewed until dropped, then released.
struct Slot {
    stop: watch::Sender<bool>,
    renewer: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        // The renewer deletes the slot itself once told to stop.
        drop(self.renewer.take());
    }
}

fn info(view: &View, name: &str, active: bool, v: &PipelineVersion) -> PipelineInfo {
    PipelineInfo {
        name: name.to_string(),
        version: v.version,
        digest: v.digest.clone(),
        active,
        definition: v.json.clone(),
        runs: view.counts(name),
    }
}

/// The value of a context field for templates and filters.
fn lookup(field: &str, run: &Run, unit: Option<&Unit>) -> Option<String> {
    let (root, rest) = field.split_once('.')?;
    match root {
        "unit" => {
            let u = unit?;
            match rest {
                "id" => Some(u.unit_id.clone()),
                "name" => Some(u.name.clone()),
                "media_type" => Some(u.media_type.clone()),
                "unit_type" => Some(u.unit_type.clone()),
                "cid" => Some(u.cid.clone()),
                "size" => Some(u.size.to_string()),
                _ => rest.strip_prefix("attr.").and_then(|k| u.attributes.get(k).cloned()),
            }
        }
        "param" => run.info.params.get(rest).cloned(),
        "run" if rest == "id" => Some(run.info.run_id.clone()),
        "pipeline" if rest == "name" => Some(run.info.pipeline.clone()),
        step => {
            let done = run.outputs.get(step)?;
            if rest == "output" {
                return Some(String::from_utf8_lossy(&done.output).into_owned());
            }
            done.metadata.get(rest).cloned()
        }
    }
}

/// A plugin step without `input` reads the nearest earlier plugin step's output, else the unit.
fn default_input(run: &Run) -> String {
    // The executor runs steps in order, so the latest completed plugin output is the nearest.
    run.info
        .steps
        .iter()
        .rev()
        .filter(|s| s.state == "completed" && s.metadata.contains_key("plugin"))
        .map(|s| format!("{}.output", s.step))
        .next()
        .unwrap_or_else(|| "unit.content".to_string())
}

fn required_unit(run: &Run, step: &Step) -> Result<String, StepError> {
    if run.info.unit_id.is_empty() {
        return Err(StepError::permanent(format!("step {} needs a unit, and this run has none", step.id)));
    }
    Ok(run.info.unit_id.clone())
}

fn iu_error(e: cim_iu_client::IuError) -> StepError {
    let text = format!("information-unit: {e}");
    if e.is_unavailable() || e.is_timeout() { StepError::transient(text) } else { StepError::permanent(text) }
}

fn split_items(bytes: &[u8], split: &str) -> Result<Vec<Bytes>, String> {
    match split {
        "json" => {
            let v: Vec<serde_json::Value> =
                serde_json::from_slice(bytes).map_err(|e| format!("items are not a JSON array: {e}"))?;
            Ok(v.into_iter()
                .map(|x| match x {
                    serde_json::Value::String(s) => Bytes::from(s),
                    other => Bytes::from(other.to_string()),
                })
                .collect())
        }
        _ => Ok(String::from_utf8_lossy(bytes)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| Bytes::from(l.to_string()))
            .collect()),
    }
}

fn one_line(s: &str) -> String {
    let line: String = s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    line.chars().take(1000).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
