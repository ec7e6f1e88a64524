//! The information-unit service's state and its command and query handlers.
//!
//! Commands are decided against the unit's current state and written as events with
//! per-aggregate optimistic concurrency (`Nats-Expected-Last-Subject-Sequence` on the
//! aggregate filter); the new state is then written through to the KV projection. Queries read
//! the projection (KV and the in-memory index) or, for history and time travel, the stream.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use async_nats::{
    Message,
    jetstream::{self, kv, object_store},
};
use bytes::Bytes;
use cim_events::{
    Cid, Envelope, Payload, Schema, iu,
    proto::iu::{
        CommandHeader, CommandResult, ContentCommitted, ContentCorrupted, ContentStored, GetHistory, GetLinks, GetType,
        GetUnit, History, HistoryEntry, IncomingLink, Link, Links, ListUnits, Provenance, Unit, UnitAttributesSet,
        UnitCreated, UnitDeleted, UnitLinked, UnitList, UnitTagged, UnitType, UnitTypeRegistered, UnitUnlinked,
        UnitUntagged, UnitVersioned,
    },
    resources,
};
use cim_runtime::{Ctx, NewEvent, PublishError, Reply, ServiceError};
use prost::Message as _;

use crate::{
    domain::{self, EventMeta, Rejection, UnitEvent},
    index::Index,
    schema::TypeSchema,
};

/// Options of the information-unit service beyond the common ones.
#[derive(Clone, Debug)]
pub struct IuOptions {
    /// Leftover uploads and orphaned chunks younger than this are never collected.
    pub orphan_grace: Duration,
    /// Content no live unit references is kept at least this long.
    pub content_retention: Duration,
    /// How often collection runs.
    pub collect_interval: Duration,
}

pub struct App {
    pub ctx: Ctx,
    pub js: jetstream::Context,
    pub units: kv::Store,
    pub types: kv::Store,
    pub requests: kv::Store,
    pub content: object_store::ObjectStore,
    pub index: Arc<Index>,
    pub opts: IuOptions,
    pub events_stream: String,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("App")
    }
}

pub(crate) fn reject(r: Rejection) -> ServiceError {
    match r {
        Rejection::Invalid(m) => ServiceError::bad_request(m),
        Rejection::NotFound(m) => ServiceError::not_found(m),
        Rejection::Conflict(m) => ServiceError::conflict(m),
    }
}

pub(crate) fn internal(what: &str) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> ServiceError + '_ {
    move |e| ServiceError::unavailable(format!("{what}: {e}"))
}

fn decode<M: prost::Message + Default>(msg: &Message) -> Result<M, ServiceError> {
    M::decode(msg.payload.clone()).map_err(|e| ServiceError::bad_request(format!("request does not decode: {e}")))
}

/// An event read back from the stream.
pub struct StoredEvent {
    pub meta: EventMeta,
    pub type_name: String,
    pub payload: Bytes,
}

impl App {
    // ---- writing events ----

    /// The envelope of a request, if it carries one; a broken one is refused.
    fn parent_envelope(msg: &Message) -> Result<Option<Envelope>, ServiceError> {
        match &msg.headers {
            Some(h) if h.get(cim_events::envelope::H_ID).is_some() => {
                Envelope::from_headers(h).map(Some).map_err(|e| ServiceError::bad_request(e.to_string()))
            }
            _ => Ok(None),
        }
    }

    /// Publishes one event. `filter` is the aggregate's history with its last sequence (0 =
    /// none yet) checked by the server; `msg_id` de-duplicates retries.
    async fn publish(
        &self,
        subject: String,
        filter: Option<(String, u64)>,
        type_name: &str,
        body: Vec<u8>,
        parent: Option<&Envelope>,
        msg_id: Option<&str>,
    ) -> Result<(jetstream::publish::PublishAck, Envelope), PublishError> {
        let schema = Schema { name: type_name.to_string(), version: 1 };
        let env = match parent {
            Some(p) => Envelope::new_caused_by(p, type_name, schema, self.ctx.source()),
            None => Envelope::new_root(type_name, schema, self.ctx.source()),
        };
        let mut event = NewEvent::new(subject, &env, body);
        if let Some(id) = msg_id {
            event = event.msg_id(id);
        }
        if let Some((filter, seq)) = &filter {
            event = event.expect(filter, *seq);
        }
        Ok((event.publish(&self.js).await?, env))
    }

    // ---- reading the stream ----

    /// Every event on `filter` in order, stopping after `until` (a version or a time).
    pub async fn read_events(&self, filter: &str, until: Until) -> Result<Vec<StoredEvent>, ServiceError> {
        let stream =
            self.js.get_stream(&self.events_stream).await.map_err(|e| internal("events stream")(Box::new(e)))?;
        let mut out = Vec::new();
        let mut seq = 1;
        loop {
            let msg = match stream.raw_message_builder().sequence(seq).next_by_subject(filter).send().await {
                Ok(m) => m,
                Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => break,
                Err(e) => return Err(internal("reading events")(Box::new(e))),
            };
            let env = Envelope::from_headers(&msg.headers)
                .map_err(|e| ServiceError::internal(format!("event {} has {e}", msg.sequence)))?;
            // The envelope's time: the same clock the write-through projection used.
            let time_ms = env.time_ms();
            let stop = match until {
                Until::Now => false,
                Until::Version(v) => msg.sequence > v,
                Until::Time(t) => time_ms > t,
            };
            if stop {
                break;
            }
            seq = msg.sequence + 1;
            out.push(StoredEvent {
                meta: EventMeta {
                    version: msg.sequence,
                    provenance: Provenance {
                        correlation_id: env.correlation_id().to_string(),
                        causation_id: env.causation_id().to_string(),
                        source: env.source.clone(),
                        time_ms,
                    },
                },
                type_name: env.schema.name.clone(),
                payload: msg.payload,
            });
        }
        Ok(out)
    }

    /// A unit's state rebuilt from its events (the source of truth).
    pub async fn replay_unit(&self, unit_id: &str, until: Until) -> Result<Option<Unit>, ServiceError> {
        let filter = iu::unit_history(unit_id).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        let mut state = None;
        for e in self.read_events(&filter, until).await? {
            let event = UnitEvent::decode(&e.type_name, &e.payload).map_err(ServiceError::internal)?;
            state = domain::apply(state, &event, &e.meta);
        }
        Ok(state)
    }

    /// The projected state, falling back to the stream when the projection has none.
    pub async fn load_unit(&self, unit_id: &str) -> Result<Option<Unit>, ServiceError> {
        let key = iu::unit_key(unit_id).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        match self.units.get(&key).await {
            Ok(Some(bytes)) => {
                Ok(Some(Unit::decode(bytes).map_err(|e| ServiceError::internal(format!("state of {unit_id}: {e}")))?))
            }
            _ => self.replay_unit(unit_id, Until::Now).await,
        }
    }

    /// Writes a state into the KV projection unless a newer one is already there.
    pub async fn store_unit(&self, unit: &Unit) -> Result<(), ServiceError> {
        store_if_newer(
            &self.units,
            &iu::unit_key(&unit.unit_id).map_err(|e| ServiceError::internal(e.to_string()))?,
            unit,
        )
        .await
        .map_err(|e| ServiceError::unavailable(format!("writing the projection: {e}")))
    }

    /// Writes the state of a unit just created: nobody can have written its key before, except
    /// the projector racing us with the same state.
    async fn store_new_unit(&self, unit: &Unit) -> Result<(), ServiceError> {
        let key = iu::unit_key(&unit.unit_id).map_err(|e| ServiceError::internal(e.to_string()))?;
        match self.units.create(&key, unit.encode_to_vec().into()).await {
            Ok(_) => Ok(()),
            Err(_) => self.store_unit(unit).await,
        }
    }

    pub async fn load_type(&self, name: &str) -> Result<Option<(TypeSchema, UnitType)>, ServiceError> {
        let key = iu::type_key(name).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        let t = match self.types.get(&key).await {
            Ok(Some(bytes)) => Some(UnitType::decode(bytes).map_err(|e| ServiceError::internal(e.to_string()))?),
            _ => {
                // Not projected (yet): the stream knows.
                let filter = iu::type_history(name).map_err(|e| ServiceError::bad_request(e.to_string()))?;
                self.read_events(&filter, Until::Now).await?.into_iter().last().and_then(|e| {
                    UnitTypeRegistered::decode(e.payload).ok().map(|r| UnitType {
                        name: r.name,
                        schema_json: r.schema_json,
                        version: e.meta.version,
                    })
                })
            }
        };
        match t {
            None => Ok(None),
            Some(t) => {
                let schema = TypeSchema::parse(&t.schema_json).map_err(ServiceError::internal)?;
                Ok(Some((schema, t)))
            }
        }
    }

    // ---- idempotency ----

    async fn remembered(&self, header: &CommandHeader) -> Result<Option<CommandResult>, ServiceError> {
        if header.request_id.is_empty() {
            return Ok(None);
        }
        let key = iu::request_key(&header.request_id).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        match self.requests.get(&key).await {
            Ok(Some(bytes)) => {
                let mut r = CommandResult::decode(bytes).map_err(|e| ServiceError::internal(e.to_string()))?;
                r.replayed = true;
                Ok(Some(r))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(internal("request memory")(Box::new(e))),
        }
    }

    async fn remember(&self, header: &CommandHeader, result: &CommandResult) {
        if header.request_id.is_empty() {
            return;
        }
        if let Ok(key) = iu::request_key(&header.request_id)
            && let Err(e) = self.requests.put(&key, result.encode_to_vec().into()).await
        {
            tracing::warn!(error = %e, "could not remember a command result; a retry may be answered from the log");
        }
    }

    /// The result of a command whose event the server reported as a duplicate (a concurrent
    /// retry with the same request id): read the first event back.
    async fn result_of_duplicate(
        &self,
        seq: u64,
        cid_of: impl Fn(&UnitEvent) -> String,
    ) -> Result<CommandResult, ServiceError> {
        let stream =
            self.js.get_stream(&self.events_stream).await.map_err(|e| internal("events stream")(Box::new(e)))?;
        let msg = stream.get_raw_message(seq).await.map_err(|e| internal("reading a duplicate")(Box::new(e)))?;
        let env = Envelope::from_headers(&msg.headers).map_err(|e| ServiceError::internal(e.to_string()))?;
        let event = UnitEvent::decode(&env.schema.name, &msg.payload).map_err(ServiceError::internal)?;
        let unit_id = cim_events::subject::parse_event(&msg.subject).map(|s| s.id).unwrap_or_default();
        Ok(CommandResult { unit_id, version: seq, cid: cid_of(&event), replayed: true })
    }

    // ---- the command pipeline ----

    /// Runs a command against one unit: idempotency, expected version, decision, publish with
    /// optimistic concurrency (retrying once on a stale projection), write-through, memory.
    async fn unit_command<F>(
        &self,
        msg: &Message,
        header: Option<CommandHeader>,
        unit_id: &str,
        decide: F,
    ) -> Result<Reply, ServiceError>
    where
        F: Fn(&Unit) -> Result<UnitEvent, Rejection>,
    {
        let header = header.unwrap_or_default();
        let parent = Self::parent_envelope(msg)?;
        let filter = iu::unit_history(unit_id).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        let (remembered, first) = tokio::join!(self.remembered(&header), self.load_unit(unit_id));
        if let Some(r) = remembered? {
            return Ok(Reply::proto(&r));
        }
        let mut first = Some(first);
        for attempt in 0..3 {
            let state = match first.take() {
                Some(loaded) => loaded?,
                None => self.replay_unit(unit_id, Until::Now).await?,
            };
            let state = state.ok_or_else(|| ServiceError::not_found(format!("unit {unit_id} does not exist")))?;
            if header.expected_version != 0 && header.expected_version != state.version {
                return Err(ServiceError::conflict(format!(
                    "unit {unit_id} is at version {}, not the expected {}",
                    state.version, header.expected_version
                )));
            }
            let event = decide(&state).map_err(reject)?;
            domain::check_metadata_size(&event).map_err(reject)?;
            let subject = iu::unit_event(unit_id, event.action()).map_err(|e| ServiceError::internal(e.to_string()))?;
            let msg_id = (!header.request_id.is_empty()).then_some(header.request_id.as_str());
            match self
                .publish(
                    subject,
                    Some((filter.clone(), state.version)),
                    event.type_name(),
                    event.encode(),
                    parent.as_ref(),
                    msg_id,
                )
                .await
            {
                Ok((ack, env)) => {
                    let cid_of = |e: &UnitEvent| match e {
                        UnitEvent::Versioned(v) => v.cid.clone(),
                        _ => String::new(),
                    };
                    if ack.duplicate {
                        return Ok(Reply::proto(&self.result_of_duplicate(ack.sequence, cid_of).await?));
                    }
                    let meta = EventMeta { version: ack.sequence, provenance: provenance(&env) };
                    let new_state = domain::apply(Some(state), &event, &meta).unwrap_or_default();
                    let result = CommandResult {
                        unit_id: unit_id.to_string(),
                        version: ack.sequence,
                        cid: new_state.cid.clone(),
                        replayed: false,
                    };
                    let (stored, ()) = tokio::join!(self.store_unit(&new_state), self.remember(&header, &result));
                    stored?;
                    return Ok(Reply::proto(&result));
                }
                Err(PublishError::Conflict) if header.expected_version == 0 && attempt < 2 => continue,
                Err(PublishError::Conflict) => {
                    return Err(ServiceError::conflict(format!(
                        "unit {unit_id} changed concurrently; read it again and retry"
                    )));
                }
                Err(PublishError::Failed(e)) => {
                    return Err(ServiceError::unavailable(format!("writing the event: {e}")));
                }
            }
        }
        Err(ServiceError::conflict(format!("unit {unit_id} keeps changing; retry")))
    }

    async fn content_exists(&self, cid: &Cid) -> Result<u64, ServiceError> {
        match self.content.info(cid.to_string()).await {
            Ok(info) if info.deleted => {
                Err(ServiceError::not_found(format!("content {cid} is not stored (removed); upload it again")))
            }
            Ok(info) if info.digest.as_deref() == Some(cid.to_object_digest().as_str()) => Ok(info.size as u64),
            Ok(_) => {
                Err(ServiceError::bad_request(format!("content {cid} is stored with a different digest; re-upload it")))
            }
            Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => {
                Err(ServiceError::not_found(format!("content {cid} is not stored; upload and commit it first")))
            }
            Err(e) => Err(internal("content info")(Box::new(e))),
        }
    }

    async fn require_targets(&self, links: &[Link]) -> Result<(), ServiceError> {
        for l in links {
            domain::validate_link(l).map_err(reject)?;
            match self.load_unit(&l.target).await? {
                Some(t) if !t.deleted => {}
                Some(_) => return Err(ServiceError::not_found(format!("link target {} is deleted", l.target))),
                None => return Err(ServiceError::not_found(format!("link target {} does not exist", l.target))),
            }
        }
        Ok(())
    }

    async fn check_type(&self, unit_type: &str, attrs: &BTreeMap<String, String>) -> Result<(), ServiceError> {
        if unit_type.is_empty() {
            return Ok(());
        }
        cim_events::token::validate_name("unit type", unit_type)
            .map_err(|e| ServiceError::bad_request(e.to_string()))?;
        let (schema, _) = self
            .load_type(unit_type)
            .await?
            .ok_or_else(|| ServiceError::not_found(format!("unit type {unit_type} is not registered")))?;
        domain::check_schema(Some(&schema), attrs).map_err(reject)
    }

    // ---- command handlers ----

    pub async fn create(&self, msg: Message) -> Result<Reply, ServiceError> {
        let c: cim_events::proto::iu::CreateUnit = decode(&msg)?;
        let header = c.header.clone().unwrap_or_default();
        if header.expected_version != 0 {
            return Err(ServiceError::bad_request("a new unit has no version to expect"));
        }
        let cid = domain::validate_cid(&c.cid).map_err(reject)?;
        domain::validate_display_name(&c.name).map_err(reject)?;
        domain::validate_media_type(&c.media_type).map_err(reject)?;
        domain::validate_tags(&c.tags).map_err(reject)?;
        let attrs: BTreeMap<String, String> = c.attributes.clone().into_iter().collect();
        domain::validate_attributes(&attrs).map_err(reject)?;
        if c.links.len() > domain::MAX_LINKS {
            return Err(ServiceError::bad_request(format!("more than {} links", domain::MAX_LINKS)));
        }
        // The lookups are independent: one round trip's latency, not four.
        let (remembered, typed, size, targets) = tokio::join!(
            self.remembered(&header),
            self.check_type(&c.unit_type, &attrs),
            self.content_exists(&cid),
            self.require_targets(&c.links),
        );
        if let Some(r) = remembered? {
            return Ok(Reply::proto(&r));
        }
        typed?;
        let size = size?;
        targets?;
        let unit_id = cim_events::envelope::new_id().to_string();
        let event = UnitEvent::Created(UnitCreated {
            unit_id: unit_id.clone(),
            cid: cid.to_string(),
            size,
            name: c.name,
            media_type: c.media_type,
            unit_type: c.unit_type,
            tags: c.tags,
            attributes: c.attributes,
            links: c.links,
        });
        domain::check_metadata_size(&event).map_err(reject)?;
        let parent = Self::parent_envelope(&msg)?;
        let filter = iu::unit_history(&unit_id).map_err(|e| ServiceError::internal(e.to_string()))?;
        let subject = iu::unit_event(&unit_id, event.action()).map_err(|e| ServiceError::internal(e.to_string()))?;
        let msg_id = (!header.request_id.is_empty()).then_some(header.request_id.as_str());
        let (ack, env) = self
            .publish(subject, Some((filter, 0)), event.type_name(), event.encode(), parent.as_ref(), msg_id)
            .await
            .map_err(|f| match f {
                PublishError::Conflict => ServiceError::conflict(format!("unit id {unit_id} already taken")),
                PublishError::Failed(e) => ServiceError::unavailable(format!("writing the event: {e}")),
            })?;
        if ack.duplicate {
            let r = self.result_of_duplicate(ack.sequence, |e| match e {
                UnitEvent::Created(c) => c.cid.clone(),
                _ => String::new(),
            });
            return Ok(Reply::proto(&r.await?));
        }
        let state = domain::apply(None, &event, &EventMeta { version: ack.sequence, provenance: provenance(&env) })
            .unwrap_or_default();
        let result = CommandResult { unit_id, version: ack.sequence, cid: cid.to_string(), replayed: false };
        let (stored, ()) = tokio::join!(self.store_new_unit(&state), self.remember(&header, &result));
        stored?;
        Ok(Reply::proto(&result))
    }

    pub async fn new_version(&self, msg: Message) -> Result<Reply, ServiceError> {
        let c: cim_events::proto::iu::NewVersion = decode(&msg)?;
        let cid = domain::validate_cid(&c.cid).map_err(reject)?;
        if !c.name.is_empty() {
            domain::validate_display_name(&c.name).map_err(reject)?;
        }
        if !c.media_type.is_empty() {
            domain::validate_media_type(&c.media_type).map_err(reject)?;
        }
        let size = self.content_exists(&cid).await?;
        self.unit_command(&msg, c.header.clone(), &c.unit_id, |s| {
            domain::require_live(s)?;
            if s.cid == c.cid {
                return Err(Rejection::Invalid(format!("unit {} already has content {}", s.unit_id, c.cid)));
            }
            Ok(UnitEvent::Versioned(UnitVersioned {
                unit_id: s.unit_id.clone(),
                cid: cid.to_string(),
                size,
                previous_cid: s.cid.clone(),
                name: c.name.clone(),
                media_type: c.media_type.clone(),
            }))
        })
        .await
    }

    pub async fn tag(&self, msg: Message, add: bool) -> Result<Reply, ServiceError> {
        let c: cim_events::proto::iu::TagUnit = decode(&msg)?;
        if c.tags.is_empty() {
            return Err(ServiceError::bad_request("no tags given"));
        }
        domain::validate_tags(&c.tags).map_err(reject)?;
        self.unit_command(&msg, c.header.clone(), &c.unit_id, |s| {
            domain::require_live(s)?;
            let tags = c.tags.clone();
            if add {
                domain::validate_tags(
                    &s.tags
                        .iter()
                        .chain(&tags)
                        .cloned()
                        .collect::<std::collections::BTreeSet<_>>()
                        .into_iter()
                        .collect::<Vec<_>>(),
                )?;
                Ok(UnitEvent::Tagged(UnitTagged { unit_id: s.unit_id.clone(), tags }))
            } else {
                Ok(UnitEvent::Untagged(UnitUntagged { unit_id: s.unit_id.clone(), tags }))
            }
        })
        .await
    }

    pub async fn set_attributes(&self, msg: Message) -> Result<Reply, ServiceError> {
        let c: cim_events::proto::iu::SetAttributes = decode(&msg)?;
        if c.set.is_empty() && c.remove.is_empty() {
            return Err(ServiceError::bad_request("nothing to set or remove"));
        }
        let set: BTreeMap<String, String> = c.set.clone().into_iter().collect();
        domain::validate_attributes(&set).map_err(reject)?;
        // The schema check needs the resulting attributes: load the type first.
        let current = self
            .load_unit(&c.unit_id)
            .await?
            .ok_or_else(|| ServiceError::not_found(format!("unit {} does not exist", c.unit_id)))?;
        let schema =
            if current.unit_type.is_empty() { None } else { self.load_type(&current.unit_type).await?.map(|(s, _)| s) };
        self.unit_command(&msg, c.header.clone(), &c.unit_id, |s| {
            domain::require_live(s)?;
            let mut after: BTreeMap<String, String> = s.attributes.clone().into_iter().collect();
            for k in &c.remove {
                after.remove(k);
            }
            after.extend(set.clone());
            domain::validate_attributes(&after)?;
            domain::check_schema(schema.as_ref(), &after)?;
            Ok(UnitEvent::AttributesSet(UnitAttributesSet {
                unit_id: s.unit_id.clone(),
                set: c.set.clone(),
                removed: c.remove.clone(),
            }))
        })
        .await
    }

    pub async fn link(&self, msg: Message, add: bool) -> Result<Reply, ServiceError> {
        let c: cim_events::proto::iu::LinkUnit = decode(&msg)?;
        let link = c.link.clone().ok_or_else(|| ServiceError::bad_request("no link given"))?;
        domain::validate_link(&link).map_err(reject)?;
        if add {
            self.require_targets(std::slice::from_ref(&link)).await?;
        }
        self.unit_command(&msg, c.header.clone(), &c.unit_id, |s| {
            domain::require_live(s)?;
            if add {
                if s.links.len() >= domain::MAX_LINKS {
                    return Err(Rejection::Invalid(format!(
                        "unit {} has {} links already",
                        s.unit_id,
                        domain::MAX_LINKS
                    )));
                }
                Ok(UnitEvent::Linked(UnitLinked { unit_id: s.unit_id.clone(), link: Some(link.clone()) }))
            } else {
                if !s.links.contains(&link) {
                    return Err(Rejection::NotFound(format!(
                        "unit {} has no link {} -> {}",
                        s.unit_id, link.kind, link.target
                    )));
                }
                Ok(UnitEvent::Unlinked(UnitUnlinked { unit_id: s.unit_id.clone(), link: Some(link.clone()) }))
            }
        })
        .await
    }

    pub async fn delete(&self, msg: Message) -> Result<Reply, ServiceError> {
        let c: cim_events::proto::iu::DeleteUnit = decode(&msg)?;
        if c.reason.len() > 1024 {
            return Err(ServiceError::bad_request("reason is longer than 1024 bytes"));
        }
        self.unit_command(&msg, c.header.clone(), &c.unit_id, |s| {
            domain::require_live(s)?;
            Ok(UnitEvent::Deleted(UnitDeleted { unit_id: s.unit_id.clone(), reason: c.reason.clone() }))
        })
        .await
    }

    pub async fn register_type(&self, msg: Message) -> Result<Reply, ServiceError> {
        let c: cim_events::proto::iu::RegisterType = decode(&msg)?;
        let header = c.header.clone().unwrap_or_default();
        if let Some(r) = self.remembered(&header).await? {
            return Ok(Reply::proto(&r));
        }
        cim_events::token::validate_name("unit type", &c.name).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        TypeSchema::parse(&c.schema_json).map_err(ServiceError::bad_request)?;
        let filter = iu::type_history(&c.name).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        let current = self.read_events(&filter, Until::Now).await?.last().map(|e| e.meta.version).unwrap_or(0);
        if header.expected_version != 0 && header.expected_version != current {
            return Err(ServiceError::conflict(format!(
                "type {} is at version {current}, not {}",
                c.name, header.expected_version
            )));
        }
        let event = UnitTypeRegistered { name: c.name.clone(), schema_json: c.schema_json.clone() };
        let parent = Self::parent_envelope(&msg)?;
        let subject =
            iu::type_event(&c.name, iu::action::REGISTERED).map_err(|e| ServiceError::internal(e.to_string()))?;
        let msg_id = (!header.request_id.is_empty()).then_some(header.request_id.as_str());
        let (ack, _) = self
            .publish(
                subject,
                Some((filter, current)),
                UnitTypeRegistered::TYPE,
                event.encode_to_vec(),
                parent.as_ref(),
                msg_id,
            )
            .await
            .map_err(|f| match f {
                PublishError::Conflict => ServiceError::conflict(format!("type {} changed concurrently", c.name)),
                PublishError::Failed(e) => ServiceError::unavailable(e),
            })?;
        let t = UnitType { name: c.name.clone(), schema_json: c.schema_json, version: ack.sequence };
        if let Ok(key) = iu::type_key(&c.name) {
            let _ = store_if_newer(&self.types, &key, &t).await;
        }
        let result =
            CommandResult { unit_id: c.name, version: ack.sequence, cid: String::new(), replayed: ack.duplicate };
        self.remember(&header, &result).await;
        Ok(Reply::proto(&result))
    }

    // ---- content ----

    /// Turns a finished upload into content named by its CID (or drops it as a duplicate).
    pub async fn commit(&self, msg: Message) -> Result<Reply, ServiceError> {
        let c: cim_events::proto::iu::CommitContent = decode(&msg)?;
        let id = c.upload.strip_prefix(iu::UPLOAD_PREFIX).unwrap_or("");
        if uuid::Uuid::parse_str(id).is_err() {
            return Err(ServiceError::bad_request(format!(
                "{:?} is not an upload name ({}<uuid>)",
                c.upload,
                iu::UPLOAD_PREFIX
            )));
        }
        let info = match self.content.info(&c.upload).await {
            Ok(i) if !i.deleted => i,
            Ok(_) => return Err(ServiceError::not_found(format!("upload {} was removed", c.upload))),
            Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => {
                return Err(ServiceError::not_found(format!(
                    "upload {} does not exist (unfinished, or already committed)",
                    c.upload
                )));
            }
            Err(e) => return Err(internal("upload info")(Box::new(e))),
        };
        let cid = Cid::from_object_digest(info.digest.as_deref().unwrap_or(""))
            .map_err(|e| ServiceError::bad_request(format!("upload {}: {e}", c.upload)))?;
        let size = info.size as u64;
        let name = cid.to_string();
        let deduplicated = loop {
            match self.content.info(&name).await {
                Ok(existing) if existing.deleted => {
                    // Only a tombstone of earlier (quarantined or collected) bytes: clear it.
                    self.purge_object_meta(&name).await?;
                }
                Ok(existing) if existing.digest == info.digest => break true,
                Ok(_) => {
                    // A different object under this CID: never serve it; keep the honest bytes.
                    self.quarantine(&cid, "stored object's digest does not match its CID").await?;
                }
                Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => {
                    let meta = object_store::UpdateMetadata { name: name.clone(), ..Default::default() };
                    match self.content.update_metadata(&c.upload, meta).await {
                        Ok(_) => break false,
                        // A concurrent commit of the same bytes won.
                        Err(e) if e.kind() == object_store::UpdateMetadataErrorKind::NameAlreadyInUse => continue,
                        Err(e) => return Err(internal("renaming the upload")(Box::new(e))),
                    }
                }
                Err(e) => return Err(internal("content info")(Box::new(e))),
            }
        };
        if deduplicated {
            if let Err(e) = self.remove_object(&c.upload).await {
                tracing::warn!(upload = %c.upload, error = %e.message, "could not drop a duplicate upload; collection will");
            }
        } else {
            let event = ContentStored { cid: name.clone(), size };
            let subject =
                iu::content_event(&name, iu::action::STORED).map_err(|e| ServiceError::internal(e.to_string()))?;
            let parent = Self::parent_envelope(&msg)?;
            let msg_id = format!("stored-{name}-{}", info.nuid);
            if let Err(e) = self
                .publish(subject, None, ContentStored::TYPE, event.encode_to_vec(), parent.as_ref(), Some(&msg_id))
                .await
            {
                tracing::warn!(cid = %name, error = ?e, "content stored but its event could not be written");
            }
        }
        Ok(Reply::proto(&ContentCommitted { cid: name, size, deduplicated }))
    }

    /// Removes an object whose bytes do not match its CID, and records why.
    pub async fn quarantine(&self, cid: &Cid, detail: &str) -> Result<(), ServiceError> {
        tracing::warn!(%cid, detail, "content does not match its CID; removing it");
        let event = ContentCorrupted { cid: cid.to_string(), detail: detail.to_string() };
        let subject = iu::content_event(&cid.to_string(), iu::action::CORRUPTED)
            .map_err(|e| ServiceError::internal(e.to_string()))?;
        self.publish(subject, None, ContentCorrupted::TYPE, event.encode_to_vec(), None, None)
            .await
            .map_err(|e| ServiceError::unavailable(format!("recording corruption: {e:?}")))?;
        self.remove_object(&cid.to_string()).await
    }

    /// Deletes an object completely: its chunks and its metadata (no tombstone is left).
    pub async fn remove_object(&self, name: &str) -> Result<(), ServiceError> {
        match self.content.delete(name).await {
            Ok(()) => {}
            Err(e) if e.kind() == object_store::DeleteErrorKind::NotFound => {}
            Err(e) => return Err(internal("removing an object")(Box::new(e))),
        }
        self.purge_object_meta(name).await
    }

    async fn purge_object_meta(&self, name: &str) -> Result<(), ServiceError> {
        let subject = cim_events::subject::object_meta(iu::CONTENT_BUCKET, name)
            .map_err(|e| ServiceError::internal(e.to_string()))?;
        let stream = self.content_stream().await?;
        stream.purge().filter(subject).await.map_err(|e| internal("purging object metadata")(Box::new(e)))?;
        Ok(())
    }

    pub async fn content_stream(&self) -> Result<jetstream::stream::Stream, ServiceError> {
        let name = resources::object_buckets(cim_events::Component::InformationUnit)
            .first()
            .map(|b| b.stream_name())
            .unwrap_or_default();
        self.js.get_stream(&name).await.map_err(|e| internal("content stream")(Box::new(e)))
    }

    /// A reader says the bytes of a CID are wrong: check them; if so, record and remove them.
    pub async fn report_corrupt(&self, msg: Message) -> Result<Reply, ServiceError> {
        let c: cim_events::proto::iu::ReportCorrupt = decode(&msg)?;
        let cid = domain::validate_cid(&c.cid).map_err(reject)?;
        match crate::content::verify(&self.content, &cid).await {
            Ok(()) => Err(ServiceError::conflict(format!("content {cid} was read back and matches its CID"))),
            Err(crate::content::VerifyError::Missing) => {
                Err(ServiceError::not_found(format!("content {cid} is not stored")))
            }
            Err(crate::content::VerifyError::Mismatch(detail)) => {
                let detail = if c.detail.is_empty() { detail } else { format!("{detail} (reported: {})", c.detail) };
                self.quarantine(&cid, &detail).await?;
                Ok(Reply::default())
            }
            Err(crate::content::VerifyError::Other(e)) => Err(ServiceError::unavailable(e)),
        }
    }

    // ---- queries ----

    pub async fn get(&self, msg: Message) -> Result<Reply, ServiceError> {
        let q: GetUnit = decode(&msg)?;
        cim_events::token::validate_token("unit id", &q.unit_id)
            .map_err(|e| ServiceError::bad_request(e.to_string()))?;
        let state = match (q.at_version, q.at_time_ms) {
            (0, 0) => self.load_unit(&q.unit_id).await?,
            (0, t) => self.replay_unit(&q.unit_id, Until::Time(t)).await?,
            (v, _) => self.replay_unit(&q.unit_id, Until::Version(v)).await?,
        };
        let unit = state
            .ok_or_else(|| ServiceError::not_found(format!("unit {} does not exist (at that point)", q.unit_id)))?;
        Ok(Reply::proto(&unit))
    }

    pub async fn history(&self, msg: Message) -> Result<Reply, ServiceError> {
        let q: GetHistory = decode(&msg)?;
        let filter = iu::unit_history(&q.unit_id).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        let events = self.read_events(&filter, Until::Now).await?;
        if events.is_empty() {
            return Err(ServiceError::not_found(format!("unit {} does not exist", q.unit_id)));
        }
        let entries = events
            .into_iter()
            .map(|e| {
                let summary =
                    UnitEvent::decode(&e.type_name, &e.payload).map(|ev| ev.summary()).unwrap_or_else(|err| err);
                HistoryEntry {
                    version: e.meta.version,
                    event_type: e.type_name,
                    provenance: Some(e.meta.provenance),
                    summary,
                }
            })
            .collect();
        Ok(Reply::proto(&History { entries }))
    }

    pub async fn list(&self, msg: Message) -> Result<Reply, ServiceError> {
        let q: ListUnits = decode(&msg)?;
        let page: UnitList = self.index.list(&q).map_err(ServiceError::bad_request)?;
        Ok(Reply::proto(&page))
    }

    pub async fn links(&self, msg: Message) -> Result<Reply, ServiceError> {
        let q: GetLinks = decode(&msg)?;
        let unit = self
            .load_unit(&q.unit_id)
            .await?
            .ok_or_else(|| ServiceError::not_found(format!("unit {} does not exist", q.unit_id)))?;
        let incoming =
            self.index.incoming(&q.unit_id).into_iter().map(|(kind, source)| IncomingLink { kind, source }).collect();
        Ok(Reply::proto(&Links { outgoing: unit.links, incoming }))
    }

    /// `cim.qry.iu.validate`: checks attributes against a unit type without writing anything.
    pub async fn validate(&self, msg: Message) -> Result<Reply, ServiceError> {
        let q: cim_events::proto::iu::ValidateAttributes = decode(&msg)?;
        let attrs: BTreeMap<String, String> = q.attributes.into_iter().collect();
        let mut problems = Vec::new();
        if let Err(e) = domain::validate_attributes(&attrs) {
            problems.push(e.to_string());
        }
        match self.check_type(&q.unit_type, &attrs).await {
            Ok(()) => {}
            Err(e) if e.code == 400 => problems.push(e.message),
            Err(e) => return Err(e),
        }
        Ok(Reply::proto(&cim_events::proto::iu::Validation { valid: problems.is_empty(), problems }))
    }

    pub async fn get_type(&self, msg: Message) -> Result<Reply, ServiceError> {
        let q: GetType = decode(&msg)?;
        let (_, t) = self
            .load_type(&q.name)
            .await?
            .ok_or_else(|| ServiceError::not_found(format!("unit type {} is not registered", q.name)))?;
        Ok(Reply::proto(&t))
    }
}

/// How far to read a history.
#[derive(Clone, Copy, Debug)]
pub enum Until {
    Now,
    Version(u64),
    Time(i64),
}

pub fn provenance(env: &Envelope) -> Provenance {
    Provenance {
        correlation_id: env.correlation_id().to_string(),
        causation_id: env.causation_id().to_string(),
        source: env.source.clone(),
        time_ms: env.time_ms(),
    }
}

/// A message with a `version` that only moves forward.
pub trait Versioned: prost::Message + Default {
    fn version(&self) -> u64;
}

impl Versioned for Unit {
    fn version(&self) -> u64 {
        self.version
    }
}

impl Versioned for UnitType {
    fn version(&self) -> u64 {
        self.version
    }
}

/// Compare-and-set write that never replaces a newer value with an older one.
pub async fn store_if_newer<M: Versioned>(kv: &kv::Store, key: &str, value: &M) -> Result<(), String> {
    for _ in 0..5 {
        let entry = kv.entry(key).await.map_err(|e| e.to_string())?;
        let bytes: Bytes = value.encode_to_vec().into();
        let result = match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                if M::decode(e.value.clone()).map(|cur| cur.version() >= value.version()).unwrap_or(false) {
                    return Ok(());
                }
                kv.update(key, bytes, e.revision).await.map(|_| ())
            }
            Some(e) => kv.update(key, bytes, e.revision).await.map(|_| ()),
            None => kv.create(key, bytes).await.map(|_| ()).map_err(|e| {
                // map create's error into update's type via its message
                async_nats::jetstream::kv::UpdateError::with_source(
                    async_nats::jetstream::kv::UpdateErrorKind::Other,
                    e,
                )
            }),
        };
        match result {
            Ok(()) => return Ok(()),
            Err(_) => continue, // someone wrote in between: read again
        }
    }
    Err(format!("could not write {key}: too much contention"))
}
