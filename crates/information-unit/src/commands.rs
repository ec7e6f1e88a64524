//! Commands: create, new version, tag/untag, attributes, link/unlink, delete and type
//! registration — decided against the unit's current state, written as events with
//! per-aggregate optimistic concurrency, written through to the projection, and remembered by
//! request id so a retry is answered, not repeated.

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

impl App {
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
}
