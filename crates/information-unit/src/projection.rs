//! Projections of the unit stream: the KV state of every unit and type and the index of
//! commands by request id (applied by the shared durable consumer `iu-projector` in batches,
//! one batch at a time across instances, from the checkpoint), and the in-memory index fed by
//! a KV watch. Both can be thrown away and rebuilt by replay.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

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
/// How long the projector consumer waits for a batch's ack before giving it to another instance.
const PROJECTOR_ACK_WAIT: Duration = Duration::from_secs(5);
/// Events applied per batch (and the most the consumer has unacknowledged); 1,024 measured a
/// little faster than 256 (18.4k against 17.2k events/s in `cim-bench iu-rebuild`).
const BATCH: usize = 1024;
/// Writes of a batch in flight at once.
const WRITES_IN_FLIGHT: usize = 256;
/// Unit states the projector keeps between batches before it forgets them all.
const STATES_KEPT: usize = 100_000;

/// Where the projection stands. The checkpoint entry is `<generation>:<sequence>`; a
/// generation starts whenever the projection starts from nothing (first run, KV deleted,
/// rebuild). Writes are compare-and-set, and a projector that finds another generation in
/// the bucket repositions instead of writing its stale checkpoint into the new projection.
#[derive(Clone, Debug, PartialEq)]
struct Position {
    checkpoint: u64,
    revision: Option<u64>,
    generation: String,
    /// The states are of [`STATE_FORMAT`] (false: written by an older version).
    current_format: bool,
}

/// One stored event, decoded for the projections.
enum Decoded {
    Unit {
        unit_id: String,
        event: Box<UnitEvent>,
        meta: EventMeta,
        request: Option<String>,
    },
    Type {
        key: String,
        value: UnitType,
        request: Option<String>,
    },
    /// Changes no projection (content events).
    Other,
}

/// Decodes a stored event; an error names why it can never be applied (poison).
fn decode(msg: &jetstream::Message) -> Result<Decoded, String> {
    let headers = msg.headers.as_ref().ok_or("event without headers")?;
    let env = Envelope::from_headers(headers).map_err(|e| e.to_string())?;
    let seq = msg.info().map_err(|e| e.to_string())?.stream_sequence;
    let subject = cim_events::subject::parse_event(&msg.subject).map_err(|e| e.to_string())?;
    // A command's request id is the message id of its event.
    let request = headers.get(cim_events::envelope::H_MSG_ID).map(|v| v.to_string());
    match subject.aggregate.as_str() {
        iu::UNIT => {
            let event = UnitEvent::decode(&env.schema.name, &msg.payload)?;
            let meta = EventMeta { sequence: seq, provenance: provenance(&env) };
            Ok(Decoded::Unit { unit_id: subject.id, event: Box::new(event), meta, request })
        }
        iu::TYPE if env.schema.name == UnitTypeRegistered::TYPE => {
            let r = UnitTypeRegistered::decode(msg.payload.clone()).map_err(|e| e.to_string())?;
            let key = iu::type_key(&r.name).map_err(|e| e.to_string())?;
            Ok(Decoded::Type {
                key,
                value: UnitType { name: r.name, schema_json: r.schema_json, version: seq },
                request,
            })
        }
        _ => Ok(Decoded::Other),
    }
}

/// The format of the unit states this version writes, the checkpoint's third part (2: a
/// unit's own version and its stream sequence). A projection of another format (or none, as
/// before per-unit versions) is rebuilt from the stream at start.
const STATE_FORMAT: &str = "2";

/// `<generation>:<sequence>[:<format>]` → (generation, sequence, of the current format).
fn parse_checkpoint(v: &[u8]) -> Option<(String, u64, bool)> {
    let mut parts = std::str::from_utf8(v).ok()?.split(':');
    let generation = parts.next()?.to_string();
    let sequence = parts.next()?.parse().ok()?;
    Some((generation, sequence, parts.next() == Some(STATE_FORMAT)))
}

impl App {
    pub async fn checkpoint(&self) -> u64 {
        self.position().await.checkpoint
    }

    async fn position(&self) -> Position {
        match self.units.entry(iu::CHECKPOINT_KEY).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put => match parse_checkpoint(&e.value) {
                Some((generation, checkpoint, current)) => {
                    Position { checkpoint, revision: Some(e.revision), generation, current_format: current }
                }
                None => Position {
                    checkpoint: 0,
                    revision: Some(e.revision),
                    generation: uuid::Uuid::now_v7().to_string(),
                    current_format: false,
                },
            },
            _ => Position {
                checkpoint: 0,
                revision: None,
                generation: uuid::Uuid::now_v7().to_string(),
                current_format: true,
            },
        }
    }

    /// Advances the checkpoint to `seq`; false when the projection was reset underneath and
    /// the projector must reposition.
    async fn advance(&self, pos: &mut Position, seq: u64) -> bool {
        for _ in 0..5 {
            let value = format!("{}:{seq}:{STATE_FORMAT}", pos.generation).into();
            let written = match pos.revision {
                Some(rev) => self.units.update(iu::CHECKPOINT_KEY, value, rev).await.ok(),
                None => self.units.create(iu::CHECKPOINT_KEY, value).await.ok(),
            };
            if let Some(rev) = written {
                *pos = Position {
                    checkpoint: seq,
                    revision: Some(rev),
                    generation: pos.generation.clone(),
                    current_format: true,
                };
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
            // One batch at a time across all instances, acknowledged as a whole once applied:
            // the next batch is delivered only then, so projections are applied in order.
            ack_policy: AckPolicy::All,
            max_ack_pending: BATCH as i64,
            // Applying a batch takes milliseconds; an instance that died holding one delays
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
            let current = info.config.ack_policy == AckPolicy::All
                && info.config.max_ack_pending == BATCH as i64
                && info.config.ack_wait == PROJECTOR_ACK_WAIT;
            if info.ack_floor.stream_sequence <= checkpoint && current {
                return Ok(existing);
            }
            if current {
                tracing::warn!(
                    checkpoint,
                    consumer_at = info.ack_floor.stream_sequence,
                    "projection behind its consumer: replaying from the checkpoint"
                );
            } else {
                tracing::info!(checkpoint, "projector consumer of an older version: recreating it at the checkpoint");
            }
            let _ = stream.delete_consumer(&name).await;
        }
        Ok(stream.get_or_create_consumer(&name, config).await?)
    }

    /// Applies a batch of stored events to the projections, in order: each unit's state is
    /// read once (or taken from `states`, what this projector wrote last), every event of the
    /// batch folded into it in memory, and written once, compare-and-set on the revision it
    /// was read at; the writes of all units, types and request ids are in flight together.
    /// Idempotent. An undecodable event is logged and skipped (it stays in the log); a store
    /// error fails the whole batch, which is then applied again, never skipped.
    async fn apply_batch(
        &self,
        msgs: &[jetstream::Message],
        states: &mut HashMap<String, (Unit, u64)>,
    ) -> Result<(), String> {
        let mut units: BTreeMap<String, Vec<(UnitEvent, EventMeta)>> = BTreeMap::new();
        let mut types = Vec::new();
        let mut requests = Vec::new();
        for m in msgs {
            match decode(m) {
                Ok(Decoded::Unit { unit_id, event, meta, request }) => {
                    if let Some(id) = request {
                        let cid = match &*event {
                            UnitEvent::Created(c) => c.cid.clone(),
                            UnitEvent::Versioned(v) => v.cid.clone(),
                            _ => String::new(),
                        };
                        // The unit's version at that event is told when a retry is answered.
                        let result = CommandResult {
                            unit_id: unit_id.clone(),
                            version: 0,
                            cid,
                            replayed: true,
                            sequence: meta.sequence,
                        };
                        requests.push((id, result));
                    }
                    units.entry(unit_id).or_default().push((*event, meta));
                }
                Ok(Decoded::Type { key, value, request }) => {
                    if let Some(id) = request {
                        let result = CommandResult {
                            unit_id: value.name.clone(),
                            version: value.version,
                            cid: String::new(),
                            replayed: true,
                            sequence: value.version,
                        };
                        requests.push((id, result));
                    }
                    types.push((key, value));
                }
                Ok(Decoded::Other) => {}
                Err(e) => {
                    let seq = m.info().map(|i| i.stream_sequence).unwrap_or_default();
                    tracing::error!(sequence = seq, error = %e, "event could not be projected; skipped");
                }
            }
        }
        let units: Vec<_> = units
            .into_iter()
            .map(|(unit_id, events)| {
                let cached = states.remove(&unit_id);
                (unit_id, events, cached)
            })
            .collect();
        let writes = units.into_iter().map(|(unit_id, events, cached)| async move {
            let written = self.fold_unit(&unit_id, &events, cached).await;
            (unit_id, written)
        });
        let mut failed = None;
        let mut written = futures::stream::iter(writes).buffer_unordered(WRITES_IN_FLIGHT);
        while let Some((unit_id, result)) = written.next().await {
            match result {
                Ok(Some(state)) => {
                    states.insert(unit_id, state);
                }
                Ok(None) => {}
                Err(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        for (key, value) in types {
            store_if_newer(&self.types, &key, &value).await?;
        }
        let indexed = requests.into_iter().map(|(id, result)| self.index_request(id, result));
        let mut indexed = futures::stream::iter(indexed).buffer_unordered(WRITES_IN_FLIGHT);
        while let Some(r) = indexed.next().await {
            r?;
        }
        Ok(())
    }

    /// Folds `events` (in order) into one unit's state and writes it once if it changed. The
    /// state starts from `cached` (what this projector wrote last, with its revision) or the
    /// bucket; a compare-and-set that fails (another instance's projector came between) reads the
    /// bucket again. The state written, with its revision, or the one found when nothing
    /// changed.
    async fn fold_unit(
        &self,
        unit_id: &str,
        events: &[(UnitEvent, EventMeta)],
        cached: Option<(Unit, u64)>,
    ) -> Result<Option<(Unit, u64)>, String> {
        let key = iu::unit_key(unit_id).map_err(|e| e.to_string())?;
        let mut cached = cached;
        for _ in 0..5 {
            let (current, revision) = match cached.take() {
                Some((u, r)) => (Some(u), Some(r)),
                None => match self.units.entry(&key).await.map_err(|e| e.to_string())? {
                    Some(e) if e.operation == kv::Operation::Put => (
                        Some(Unit::decode(e.value).map_err(|e| format!("stored state of {key}: {e}"))?),
                        Some(e.revision),
                    ),
                    Some(e) => (None, Some(e.revision)),
                    None => (None, None),
                },
            };
            let mut state = current.clone();
            for (event, meta) in events {
                if let Some(next) = domain::apply(state.clone(), event, meta) {
                    state = Some(next);
                }
            }
            let Some(next) = state.filter(|n| Some(n) != current.as_ref()) else {
                return Ok(current.zip(revision));
            };
            let bytes = next.encode_to_vec().into();
            let written = match revision {
                Some(r) => self.units.update(&key, bytes, r).await.ok(),
                None => self.units.create(&key, bytes).await.ok(),
            };
            if let Some(rev) = written {
                return Ok(Some((next, rev)));
            }
        }
        Err(format!("could not write {key}: too much contention"))
    }

    /// Indexes an event by its command's request id, so a retry of the command is answered
    /// with `result` whenever it comes. Idempotent.
    async fn index_request(&self, request_id: String, result: CommandResult) -> Result<(), String> {
        // Only request ids are written as the message id of unit events; anything else that
        // is not a valid key (never written by this service) has nothing to answer.
        let Ok(key) = iu::request_key(&request_id) else { return Ok(()) };
        self.requests
            .put(&key, result.encode_to_vec().into())
            .await
            .map(|_| ())
            .map_err(|e| format!("request index {key}: {e}"))
    }

    /// The projector loop: runs until shutdown, repositioning after errors or a rebuild.
    pub async fn run_projector(self: Arc<Self>) {
        let before = self.position().await;
        if before.revision.is_some() && !before.current_format {
            // States of an older format (before per-unit versions): derived again from the log.
            tracing::warn!(
                checkpoint = before.checkpoint,
                "projection of an older format: rebuilding it from the stream"
            );
            if let Err(e) = self.rebuild().await {
                tracing::warn!(error = %e.message, "rebuilding the projection failed; the projector replays into it");
            }
        }
        while !self.ctx.is_stopping() {
            let opened = self
                .ctx
                .retry_until_stopped("the projector consumer", || async {
                    let pos = self.position().await;
                    self.projector(&pos).await.map(|c| (c, pos))
                })
                .await;
            let Some((consumer, mut pos)) = opened else { return };
            // What this projector wrote last, per unit: spares re-reading a state it wrote.
            let mut states: HashMap<String, (Unit, u64)> = HashMap::new();
            loop {
                let batch = consumer.fetch().max_messages(BATCH).expires(Duration::from_millis(500)).messages();
                let mut batch = tokio::select! {
                    b = batch => match b { Ok(b) => b, Err(e) => { tracing::debug!(error = %e, "fetch failed"); break } },
                    _ = self.ctx.stopping() => return,
                };
                let mut msgs = Vec::new();
                while let Some(m) = batch.next().await {
                    match m {
                        Ok(m) => msgs.push(m),
                        Err(_) => break,
                    }
                }
                let Some(last) = msgs.last() else {
                    // Idle: a projection deleted from outside shows as a missing checkpoint.
                    if pos.revision.is_some() && self.position().await.generation != pos.generation {
                        tracing::warn!("projection changed underneath (deleted or rebuilt); repositioning");
                        break;
                    }
                    if pos.revision.is_none() && self.needs_replay().await {
                        break;
                    }
                    continue;
                };
                let Ok((seq, pending)) = last.info().map(|i| (i.stream_sequence, i.pending)) else { break };
                if let Err(e) = self.apply_batch(&msgs, &mut states).await {
                    // The bucket may be missing or replaced for a moment (a rebuild drops and
                    // recreates it) or contended: the batch is never skipped for that, but
                    // applied again after repositioning.
                    tracing::warn!(sequence = seq, error = %e, "projection store unavailable; repositioning");
                    for m in &msgs {
                        let _ = m.ack_with(jetstream::AckKind::Nak(Some(Duration::from_millis(200)))).await;
                    }
                    if !self.ctx.pause(Duration::from_millis(200)).await {
                        return;
                    }
                    break;
                }
                // One acknowledgement for the batch (the consumer acknowledges all before it).
                let _ = last.ack().await;
                self.ctx.metrics().projection_lag.get_or_create(&labels()).set(pending as i64);
                if !self.advance(&mut pos, seq).await {
                    break;
                }
                if states.len() > STATES_KEPT {
                    states.clear();
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
        let mut connections = self.ctx.connections();
        while !self.ctx.is_stopping() {
            connections.borrow_and_update();
            // Every key: the states and the checkpoint that says how far they are complete.
            let watch = match self.units.watch_with_history(">").await {
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
                let entry = tokio::select! {
                    e = watch.next() => e,
                    // The server may have restarted without the watch's consumer: start over
                    // at once rather than after its missed heartbeats.
                    _ = connections.changed() => break,
                    _ = self.ctx.stopping() => return,
                };
                match entry {
                    Some(Ok(e)) => match e.operation {
                        kv::Operation::Put if e.key == iu::CHECKPOINT_KEY => {
                            let applied = parse_checkpoint(&e.value).map(|(_, seq, _)| seq).unwrap_or(0);
                            self.index.set_applied(applied);
                        }
                        kv::Operation::Put => {
                            if e.key.starts_with("u.")
                                && let Ok(u) = Unit::decode(e.value)
                            {
                                self.index.put(u);
                            }
                        }
                        _ if e.key == iu::CHECKPOINT_KEY => self.index.set_applied(0),
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
