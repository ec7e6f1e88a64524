//! Commands: create, new version, tag/untag, attributes, link/unlink, delete and type
//! registration — decided against the unit's current state, written as events with
//! per-aggregate optimistic concurrency: one JetStream write each, applied to the projection
//! by its projector; a retry with the same request id is answered from the log, not carried
//! out again.

use std::collections::BTreeMap;

use async_nats::{Message, jetstream::object_store};
use cim_events::{
    Cid, Envelope, Payload, iu,
    proto::iu::{
        CommandHeader, CommandResult, Link, Unit, UnitAttributesSet, UnitCreated, UnitDeleted, UnitLinked, UnitTagged,
        UnitType, UnitTypeRegistered, UnitUnlinked, UnitUntagged, UnitVersioned,
    },
};
use cim_runtime::{PublishError, Reply, ServiceError};
use prost::Message as _;

use crate::{
    app::{App, decode, internal, reject, store_if_newer},
    domain::{self, EventMeta, Rejection, UnitEvent},
    events::{Until, provenance},
    schema::TypeSchema,
};

/// The commands that take a request id.
#[derive(Clone, Copy, Debug)]
pub enum Cmd {
    Create,
    NewVersion,
    Tag(bool),
    SetAttributes,
    Link(bool),
    Delete,
    RegisterType,
}

/// The `header` (field 1) every command message starts with; the rest is skipped.
#[derive(Clone, PartialEq, prost::Message)]
struct Headed {
    #[prost(message, optional, tag = "1")]
    header: Option<CommandHeader>,
}

/// A refusal a retry of a command that was carried out may meet (the state moved on).
fn is_refusal(e: &ServiceError) -> bool {
    matches!(e.code, 400 | 404 | 409)
}

impl App {
    // ---- idempotency ----
    //
    // A command's request id is its event's `Nats-Msg-Id`. JetStream drops a repeat within the
    // retry horizon (the events stream's duplicate window, which it rebuilds from the stored
    // messages after a restart) and its acknowledgement names the first event, which answers
    // the retry (`result_of_duplicate`): the answer comes from the log, whatever crashed when.
    // The projector also indexes every event by its request id (the `requests` KV), which
    // answers a retry where no publish happens (the command would now be refused: deleting a
    // deleted unit) and after the horizon. Nothing is remembered on the command path itself.

    /// Runs one command with its idempotency: an earlier result of its request id answers it.
    pub async fn command(&self, msg: Message, cmd: Cmd) -> Result<Reply, ServiceError> {
        let header = Headed::decode(msg.payload.clone()).ok().and_then(|h| h.header).unwrap_or_default();
        if !header.request_id.is_empty() {
            iu::request_key(&header.request_id).map_err(|e| ServiceError::bad_request(e.to_string()))?;
            if !self.within_horizon(&header.request_id) {
                // Beyond what JetStream's window surely covers: the index decides, once it
                // has applied everything the log holds (else it cannot tell, and says so).
                if let Some(r) = self.indexed(&header).await? {
                    return Ok(Reply::proto(&r));
                }
                if !self.index_caught_up().await {
                    return Err(ServiceError::unavailable(
                        "the request index is behind the log, so a repeat of this request id cannot be told yet; retry",
                    ));
                }
                if let Some(r) = self.indexed(&header).await? {
                    return Ok(Reply::proto(&r));
                }
            }
        }
        let result = match cmd {
            Cmd::Create => self.create(msg).await,
            Cmd::NewVersion => self.new_version(msg).await,
            Cmd::Tag(add) => self.tag(msg, add).await,
            Cmd::SetAttributes => self.set_attributes(msg).await,
            Cmd::Link(add) => self.link(msg, add).await,
            Cmd::Delete => self.delete(msg).await,
            Cmd::RegisterType => self.register_type(msg).await,
        };
        match result {
            Err(refusal) if !header.request_id.is_empty() && is_refusal(&refusal) => {
                // Perhaps refused because it was carried out already and its answer was lost.
                self.index_caught_up().await;
                match self.indexed(&header).await {
                    Ok(Some(r)) => Ok(Reply::proto(&r)),
                    _ => Err(refusal),
                }
            }
            other => other,
        }
    }

    /// The indexed result of the command's request id, if the projector has seen its event.
    async fn indexed(&self, header: &CommandHeader) -> Result<Option<CommandResult>, ServiceError> {
        let key = iu::request_key(&header.request_id).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        match self.requests.get(&key).await {
            Ok(Some(bytes)) => {
                let mut r = CommandResult::decode(bytes).map_err(|e| ServiceError::internal(e.to_string()))?;
                r.replayed = true;
                if r.version == 0 {
                    r.version = self.version_at(&r.unit_id, r.sequence).await?;
                }
                Ok(Some(r))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(internal("request index")(Box::new(e))),
        }
    }

    /// Whether JetStream's duplicate window alone surely covers a repeat of `request_id`: a
    /// UUIDv7 (what the clients generate) younger than half the horizon, allowing for clocks
    /// that disagree. Any other id is first looked up in the request index.
    fn within_horizon(&self, request_id: &str) -> bool {
        let Ok(id) = uuid::Uuid::parse_str(request_id) else { return false };
        let Some(ts) = id.get_timestamp().filter(|_| id.get_version_num() == 7) else { return false };
        let (secs, nanos) = ts.to_unix();
        let issued = std::time::UNIX_EPOCH + std::time::Duration::new(secs, nanos);
        match std::time::SystemTime::now().duration_since(issued) {
            Ok(age) => age < self.ctx.settings().retry_horizon / 2,
            Err(ahead) => ahead.duration() < std::time::Duration::from_secs(60),
        }
    }

    /// Waits (briefly) until the projector has applied every event the stream holds now;
    /// false when it has not within a few seconds.
    async fn index_caught_up(&self) -> bool {
        let Ok(mut stream) = self.js.get_stream(&self.events_stream).await else { return false };
        let Ok(info) = stream.info().await else { return false };
        let last = info.state.last_sequence;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            if self.checkpoint().await >= last {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
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
        let version = self.version_at(&unit_id, seq).await?;
        Ok(CommandResult { unit_id, version, cid: cid_of(&event), replayed: true, sequence: seq })
    }

    /// The unit's own version at the event with stream sequence `seq`.
    async fn version_at(&self, unit_id: &str, seq: u64) -> Result<u64, ServiceError> {
        let filter = iu::unit_history(unit_id).map_err(|e| ServiceError::internal(e.to_string()))?;
        Ok(self.read_events(&filter, Until::Sequence(seq)).await?.len() as u64)
    }

    // ---- the command pipeline ----

    /// Runs a command against one unit: expected version, decision, publish with optimistic
    /// concurrency. The projection may lag the log (the projector applies events after the
    /// reply), so a state read from it only decides what it allows: a refusal, an expected
    /// version that does not match or a concurrent write is decided again on the state the log
    /// holds (`replay_unit`) before it is answered.
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
        for attempt in 0..4 {
            // The first attempt decides on the projection; the others on the log.
            let from_log = attempt > 0;
            let state =
                if from_log { self.replay_unit(unit_id, Until::Now).await? } else { self.load_unit(unit_id).await? };
            // (The projection has no state for a unit only if the log has none either:
            // `load_unit` falls back to it.)
            let state = state.ok_or_else(|| ServiceError::not_found(format!("unit {unit_id} does not exist")))?;
            if header.expected_version != 0 && header.expected_version != state.version {
                if !from_log {
                    continue;
                }
                return Err(ServiceError::conflict(format!(
                    "unit {unit_id} is at version {}, not the expected {}",
                    state.version, header.expected_version
                )));
            }
            let event = match decide(&state) {
                Ok(event) => event,
                Err(_) if !from_log => continue,
                Err(refusal) => return Err(reject(refusal)),
            };
            domain::check_metadata_size(&event).map_err(reject)?;
            let subject = iu::unit_event(unit_id, event.action()).map_err(|e| ServiceError::internal(e.to_string()))?;
            let msg_id = (!header.request_id.is_empty()).then_some(header.request_id.as_str());
            match self
                .publish(
                    subject,
                    Some((filter.clone(), state.sequence)),
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
                    let meta = EventMeta { sequence: ack.sequence, provenance: provenance(&env) };
                    let new_state = domain::apply(Some(state), &event, &meta).unwrap_or_default();
                    // The one write of the command: the projector applies it from the log.
                    return Ok(Reply::proto(&CommandResult {
                        unit_id: unit_id.to_string(),
                        version: new_state.version,
                        cid: new_state.cid,
                        replayed: false,
                        sequence: ack.sequence,
                    }));
                }
                // A stale projection, or a concurrent writer: decide again on the log.
                Err(PublishError::Conflict) if !from_log || (header.expected_version == 0 && attempt < 3) => continue,
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
        match self.object_info(&cid.to_string()).await {
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

    pub(crate) async fn check_type(
        &self,
        unit_type: &str,
        attrs: &BTreeMap<String, String>,
    ) -> Result<(), ServiceError> {
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

    pub(crate) async fn create(&self, msg: Message) -> Result<Reply, ServiceError> {
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
        let (typed, size, targets) = tokio::join!(
            self.check_type(&c.unit_type, &attrs),
            self.content_exists(&cid),
            self.require_targets(&c.links),
        );
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
        cim_runtime::crash::at("iu.create.publishing");
        let (ack, env) = self
            .publish(subject, Some((filter, 0)), event.type_name(), event.encode(), parent.as_ref(), msg_id)
            .await
            .map_err(|f| match f {
                PublishError::Conflict => ServiceError::conflict(format!("unit id {unit_id} already taken")),
                PublishError::Failed(e) => ServiceError::unavailable(format!("writing the event: {e}")),
            })?;
        cim_runtime::crash::at("iu.create.published");
        if ack.duplicate {
            let r = self.result_of_duplicate(ack.sequence, |e| match e {
                UnitEvent::Created(c) => c.cid.clone(),
                _ => String::new(),
            });
            return Ok(Reply::proto(&r.await?));
        }
        let state = domain::apply(None, &event, &EventMeta { sequence: ack.sequence, provenance: provenance(&env) })
            .unwrap_or_default();
        // The one write of the command: the projector applies it from the log.
        Ok(Reply::proto(&CommandResult {
            unit_id,
            version: state.version,
            cid: cid.to_string(),
            replayed: false,
            sequence: ack.sequence,
        }))
    }

    pub(crate) async fn new_version(&self, msg: Message) -> Result<Reply, ServiceError> {
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

    pub(crate) async fn tag(&self, msg: Message, add: bool) -> Result<Reply, ServiceError> {
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

    pub(crate) async fn set_attributes(&self, msg: Message) -> Result<Reply, ServiceError> {
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

    pub(crate) async fn link(&self, msg: Message, add: bool) -> Result<Reply, ServiceError> {
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

    pub(crate) async fn delete(&self, msg: Message) -> Result<Reply, ServiceError> {
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

    pub(crate) async fn register_type(&self, msg: Message) -> Result<Reply, ServiceError> {
        let c: cim_events::proto::iu::RegisterType = decode(&msg)?;
        let header = c.header.clone().unwrap_or_default();
        cim_events::token::validate_name("unit type", &c.name).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        TypeSchema::parse(&c.schema_json).map_err(ServiceError::bad_request)?;
        let filter = iu::type_history(&c.name).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        let current = self.read_events(&filter, Until::Now).await?.last().map(|e| e.meta.sequence).unwrap_or(0);
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
        let result = CommandResult {
            unit_id: c.name,
            version: ack.sequence,
            cid: String::new(),
            replayed: ack.duplicate,
            sequence: ack.sequence,
        };
        Ok(Reply::proto(&result))
    }
}
