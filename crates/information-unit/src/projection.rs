//! Projections of the unit stream: the KV state of every unit and type and the index of
//! commands by request id (applied by the shared durable consumer `iu-projector`, one event at
//! a time, from the checkpoint), and the in-memory index fed by a KV watch. Both can be thrown away and rebuilt by replay.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy, pull},
    kv,
};
use cim_events::{
    Envelope, Payload, iu,
    proto::iu::{CommandResult, ProjectionStatus, RebuildStarted, Unit, UnitType, UnitTypeRegistered},
    resources,
};
use cim_runtime::{Reply, ServiceError, metrics::ProjectionLabels};
use futures::StreamExt;
use prost::Message as _;

use crate::{
    app::{App, internal, store_if_newer},
    domain::{self, EventMeta, UnitEvent},
    events::provenance,
};

/// Name of the projection in metrics.
const PROJECTION: &str = "iu-units";
/// How long the projector consumer waits for an event's ack before giving it to another instance.
const PROJECTOR_ACK_WAIT: Duration = Duration::from_secs(5);
/// Write the checkpoint at least every this many events (and whenever the consumer is idle).
const CHECKPOINT_EVERY: u64 = 200;

/// Where the projection stands. The checkpoint entry is `<generation>:<sequence>`; a
/// generation starts whenever the projection starts from nothing (first run, KV deleted,
/// rebuild). Writes are compare-and-set, and a projector that finds another generation in
/// the bucket repositions instead of writing its stale checkpoint into the new projection.
#[derive(Clone, Debug, PartialEq)]
struct Position {
    checkpoint: u64,
    revision: Option<u64>,
    generation: String,
}

/// Why an event was not applied.
#[derive(Debug)]
enum ProjectError {
    /// The event itself can never be applied (undecodable, malformed subject or headers).
    Poison(String),
    /// The projection store failed or changed underneath; applying again later may succeed.
    Store(String),
}

fn parse_checkpoint(v: &[u8]) -> Option<(String, u64)> {
    let s = std::str::from_utf8(v).ok()?;
    let (g, n) = s.split_once(':')?;
    Some((g.to_string(), n.parse().ok()?))
}

impl App {
    pub async fn checkpoint(&self) -> u64 {
        self.position().await.checkpoint
    }

    async fn position(&self) -> Position {
        match self.units.entry(iu::CHECKPOINT_KEY).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put => match parse_checkpoint(&e.value) {
                Some((generation, checkpoint)) => Position { checkpoint, revision: Some(e.revision), generation },
                None => {
                    Position { checkpoint: 0, revision: Some(e.revision), generation: uuid::Uuid::now_v7().to_string() }
                }
            },
            _ => Position { checkpoint: 0, revision: None, generation: uuid::Uuid::now_v7().to_string() },
        }
    }

    /// Advances the checkpoint to `seq`; false when the projection was reset underneath and
    /// the projector must reposition.
    async fn advance(&self, pos: &mut Position, seq: u64) -> bool {
        for _ in 0..5 {
            let value = format!("{}:{seq}", pos.generation).into();
            let written = match pos.revision {
                Some(rev) => self.units.update(iu::CHECKPOINT_KEY, value, rev).await.ok(),
                None => self.units.create(iu::CHECKPOINT_KEY, value).await.ok(),
            };
            if let Some(rev) = written {
                *pos = Position { checkpoint: seq, revision: Some(rev), generation: pos.generation.clone() };
                self.ctx.metrics().projection_checkpoint.get_or_create(&labels()).set(seq as i64);
                return true;
            }
            // Someone else wrote: another instance of this generation, or a new generation.
            let now = self.position().await;
            if now.revision.is_none() || now.generation != pos.generation {
                tracing::warn!("projection was reset (deleted or rebuilt); repositioning");
                return false;
            }
            if now.checkpoint >= seq {
                *pos = now;
                return true;
            }
            pos.revision = now.revision;
        }
        false
    }

    /// The durable projector consumer, positioned just after the checkpoint. If the consumer
    /// is ahead of the checkpoint (the KV was deleted or rebuilt), it is recreated so the
    /// projection is rebuilt by replay; re-applying a few events is harmless.
    async fn projector(&self, pos: &Position) -> anyhow::Result<jetstream::consumer::Consumer<pull::Config>> {
        let stream = self.js.get_stream(&self.events_stream).await?;
        let checkpoint = pos.checkpoint;
        let name = iu::projector_consumer();
        let config = pull::Config {
            durable_name: Some(name.clone()),
            description: Some("applies unit events to the KV projections".into()),
            ack_policy: AckPolicy::Explicit,
            // One event at a time across all instances: projections are applied in order.
            max_ack_pending: 1,
            // Applying one event takes milliseconds; an instance that died holding one delays
            // the projection (and the request index) by this much, not more. A redelivery to
            // another instance while the first is still applying is harmless (idempotent).
            ack_wait: PROJECTOR_ACK_WAIT,
            deliver_policy: if checkpoint == 0 {
                DeliverPolicy::All
            } else {
                DeliverPolicy::ByStartSequence { start_sequence: checkpoint + 1 }
            },
            ..Default::default()
        };
        if let Ok(mut existing) = stream.get_consumer::<pull::Config>(&name).await {
            let info = existing.info().await?;
            if info.ack_floor.stream_sequence <= checkpoint {
                if info.config.ack_wait != PROJECTOR_ACK_WAIT {
                    // Made by an older version with a longer wait.
                    let config = pull::Config { deliver_policy: info.config.deliver_policy, ..config };
                    return Ok(stream.update_consumer(config).await?);
                }
                return Ok(existing);
            }
            tracing::warn!(
                checkpoint,
                consumer_at = info.ack_floor.stream_sequence,
                "projection behind its consumer: replaying from the checkpoint"
            );
            let _ = stream.delete_consumer(&name).await;
        }
        Ok(stream.get_or_create_consumer(&name, config).await?)
    }

    /// Applies one stored event to the projections. Idempotent.
    async fn project(&self, msg: &jetstream::Message) -> Result<(), ProjectError> {
        use ProjectError::{Poison, Store};
        let headers = msg.headers.as_ref().ok_or_else(|| Poison("event without headers".into()))?;
        let env = Envelope::from_headers(headers).map_err(|e| Poison(e.to_string()))?;
        let seq = msg.info().map_err(|e| Poison(e.to_string()))?.stream_sequence;
        let meta = EventMeta { version: seq, provenance: provenance(&env) };
        let subject = cim_events::subject::parse_event(&msg.subject).map_err(|e| Poison(e.to_string()))?;
        match subject.aggregate.as_str() {
            iu::UNIT => {
                let event = UnitEvent::decode(&env.schema.name, &msg.payload).map_err(Poison)?;
                self.project_unit(&subject.id, &event, &meta).await?;
                let cid = match &event {
                    UnitEvent::Created(c) => c.cid.clone(),
                    UnitEvent::Versioned(v) => v.cid.clone(),
                    _ => String::new(),
                };
                let result = CommandResult { unit_id: subject.id.clone(), version: seq, cid, replayed: true };
                self.index_request(headers, &result).await?;
            }
            iu::TYPE if env.schema.name == UnitTypeRegistered::TYPE => {
                let r = UnitTypeRegistered::decode(msg.payload.clone()).map_err(|e| Poison(e.to_string()))?;
                let key = iu::type_key(&r.name).map_err(|e| Poison(e.to_string()))?;
                let result =
                    CommandResult { unit_id: r.name.clone(), version: seq, cid: String::new(), replayed: true };
                store_if_newer(&self.types, &key, &UnitType { name: r.name, schema_json: r.schema_json, version: seq })
                    .await
                    .map_err(Store)?;
                self.index_request(headers, &result).await?;
            }
            _ => {} // content events change no projection
        }
        Ok(())
    }

    /// Applies a unit event to the unit's KV state: read once, apply, compare-and-set; a
    /// concurrent write-through wins the race and the next round sees it (and usually finds
    /// the event already applied).
    async fn project_unit(&self, unit_id: &str, event: &UnitEvent, meta: &EventMeta) -> Result<(), ProjectError> {
        use ProjectError::{Poison, Store};
        let seq = meta.version;
        let key = iu::unit_key(unit_id).map_err(|e| Poison(e.to_string()))?;
        for _ in 0..5 {
            let (current, revision) = match self.units.entry(&key).await.map_err(|e| Store(e.to_string()))? {
                Some(e) if e.operation == kv::Operation::Put => (
                    Some(Unit::decode(e.value).map_err(|e| Store(format!("stored state of {key}: {e}")))?),
                    Some(e.revision),
                ),
                Some(e) => (None, Some(e.revision)),
                None => (None, None),
            };
            if current.as_ref().is_some_and(|c| c.version >= seq) {
                return Ok(());
            }
            let Some(next) = domain::apply(current, event, meta) else { return Ok(()) };
            let bytes = next.encode_to_vec().into();
            let written = match revision {
                Some(r) => self.units.update(&key, bytes, r).await.is_ok(),
                None => self.units.create(&key, bytes).await.is_ok(),
            };
            if written {
                return Ok(());
            }
        }
        Err(Store(format!("could not write {key}: too much contention")))
    }

    /// Indexes the event by its command's request id (its `Nats-Msg-Id`), so a retry of the
    /// command is answered with `result` whenever it comes. Idempotent.
    async fn index_request(&self, headers: &async_nats::HeaderMap, result: &CommandResult) -> Result<(), ProjectError> {
        let Some(id) = headers.get(cim_events::envelope::H_MSG_ID) else { return Ok(()) };
        // Only request ids are written as the message id of unit events; anything else that
        // is not a valid key (never written by this service) has nothing to answer.
        let Ok(key) = iu::request_key(id.as_str()) else { return Ok(()) };
        self.requests
            .put(&key, result.encode_to_vec().into())
            .await
            .map(|_| ())
            .map_err(|e| ProjectError::Store(format!("request index {key}: {e}")))
    }

    /// The projector loop: runs until shutdown, repositioning after errors or a rebuild.
    pub async fn run_projector(self: Arc<Self>) {
        while !self.ctx.is_stopping() {
            let opened = self
                .ctx
                .retry_until_stopped("the projector consumer", || async {
                    let pos = self.position().await;
                    self.projector(&pos).await.map(|c| (c, pos))
                })
                .await;
            let Some((consumer, mut pos)) = opened else { return };
            let mut unsaved = 0u64;
            let mut last = pos.checkpoint;
            'consume: loop {
                let batch = consumer.fetch().max_messages(100).expires(Duration::from_millis(500)).messages();
                let mut batch = tokio::select! {
                    b = batch => match b { Ok(b) => b, Err(e) => { tracing::debug!(error = %e, "fetch failed"); break } },
                    _ = self.ctx.stopping() => return,
                };
                let mut got = 0;
                while let Some(m) = batch.next().await {
                    let Ok(m) = m else { break };
                    got += 1;
                    let Ok((seq, pending)) = m.info().map(|i| (i.stream_sequence, i.pending)) else { continue };
                    match self.project(&m).await {
                        Ok(()) => {}
                        // The bucket may be missing or replaced for a moment (a rebuild drops
                        // and recreates it) or contended: the event is never skipped for that,
                        // but read again after repositioning.
                        Err(ProjectError::Store(e)) => {
                            tracing::warn!(sequence = seq, error = %e, "projection store unavailable; repositioning");
                            let _ = m.ack_with(jetstream::AckKind::Nak(Some(Duration::from_millis(200)))).await;
                            if !self.ctx.pause(Duration::from_millis(200)).await {
                                return;
                            }
                            break 'consume;
                        }
                        // A poison event (one that can never be decoded or applied) must not
                        // stop the projection: it is skipped and the reason is logged with its
                        // sequence (the event itself stays in the log).
                        Err(ProjectError::Poison(e)) => {
                            tracing::error!(sequence = seq, error = %e, "event could not be projected; skipped")
                        }
                    }
                    let _ = m.ack().await;
                    last = seq;
                    unsaved += 1;
                    self.ctx.metrics().projection_lag.get_or_create(&labels()).set(pending as i64);
                    if (unsaved >= CHECKPOINT_EVERY || pending == 0) && !self.advance(&mut pos, last).await {
                        break 'consume;
                    }
                    if unsaved >= CHECKPOINT_EVERY || pending == 0 {
                        unsaved = 0;
                    }
                }
                if got == 0 {
                    if unsaved > 0 {
                        if !self.advance(&mut pos, last).await {
                            break;
                        }
                        unsaved = 0;
                    }
                    // Idle: a projection deleted from outside shows as a missing checkpoint.
                    if pos.revision.is_some() && self.position().await.generation != pos.generation {
                        tracing::warn!("projection changed underneath (deleted or rebuilt); repositioning");
                        break;
                    }
                    if pos.revision.is_none() && self.needs_replay().await {
                        break;
                    }
                }
            }
        }
    }

    /// True when the consumer has acknowledged events the KV does not reflect.
    async fn needs_replay(&self) -> bool {
        let Ok(stream) = self.js.get_stream(&self.events_stream).await else { return false };
        match stream.consumer_info(iu::projector_consumer()).await {
            Ok(info) => info.ack_floor.stream_sequence > 0 && self.checkpoint().await < info.ack_floor.stream_sequence,
            Err(_) => true,
        }
    }

    /// Keeps the in-memory index equal to the KV projection.
    pub async fn run_index(self: Arc<Self>) {
        while !self.ctx.is_stopping() {
            let watch = match self.units.watch_with_history(iu::UNIT_KEYS).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::debug!(error = %e, "index watch unavailable; retrying");
                    if !self.ctx.pause(Duration::from_millis(500)).await {
                        return;
                    }
                    continue;
                }
            };
            self.index.clear();
            let mut watch = watch;
            loop {
                let entry = tokio::select! { e = watch.next() => e, _ = self.ctx.stopping() => return };
                match entry {
                    Some(Ok(e)) => match e.operation {
                        kv::Operation::Put => {
                            if let Ok(u) = Unit::decode(e.value) {
                                self.index.put(u);
                            }
                        }
                        _ => {
                            if let Some(id) = e.key.strip_prefix("u.") {
                                self.index.remove(id);
                            }
                        }
                    },
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "index watch failed; restarting");
                        break;
                    }
                    None => break,
                }
            }
        }
    }

    /// `cim.cmd.iu.rebuild`: drop the projections and replay the whole stream.
    pub async fn rebuild(&self) -> Result<Reply, ServiceError> {
        let stream =
            self.js.get_stream(&self.events_stream).await.map_err(|e| internal("events stream")(Box::new(e)))?;
        let mut stream = stream;
        let last = stream.info().await.map_err(|e| internal("events stream")(Box::new(e)))?.state.last_sequence;
        let _ = stream.delete_consumer(&iu::projector_consumer()).await;
        // The request index too: it is rebuilt from the events' request ids, and meanwhile
        // JetStream's duplicate window answers retries within the horizon.
        for spec in resources::kv_buckets(cim_events::Component::InformationUnit) {
            let _ = self.js.delete_key_value(&spec.bucket).await;
            cim_runtime::provision::ensure_kv_bucket(&self.js, &spec, self.ctx.settings().tier)
                .await
                .map_err(|e| ServiceError::unavailable(e.to_string()))?;
        }
        tracing::info!(up_to = last, "projections dropped; replaying the stream");
        Ok(Reply::proto(&RebuildStarted { up_to_sequence: last }))
    }

    /// `cim.qry.iu.status`.
    pub async fn status(&self) -> Result<Reply, ServiceError> {
        let mut stream =
            self.js.get_stream(&self.events_stream).await.map_err(|e| internal("events stream")(Box::new(e)))?;
        let last = stream.info().await.map_err(|e| internal("events stream")(Box::new(e)))?.state.last_sequence;
        let checkpoint = self.checkpoint().await;
        let (lag, rebuilding) = match stream.consumer_info(iu::projector_consumer()).await {
            Ok(i) => (i.num_pending + i.num_ack_pending as u64, checkpoint < i.ack_floor.stream_sequence),
            Err(_) => (last.saturating_sub(checkpoint), true),
        };
        Ok(Reply::proto(&ProjectionStatus {
            stream_last_sequence: last,
            checkpoint,
            lag,
            rebuilding,
            units: self.index.len() as u64,
        }))
    }
}

fn labels() -> ProjectionLabels {
    ProjectionLabels { projection: PROJECTION.to_string() }
}
