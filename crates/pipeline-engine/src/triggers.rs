//! The trigger worker: unit events from the shared durable consumer `pipeline-triggers` (on
//! `CIM_IU_EVENTS`) become run requests for every active pipeline whose trigger matches;
//! undecodable events are dead-lettered.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, DeliverPolicy, pull},
};
use cim_events::{
    Component, Envelope,
    envelope::H_MSG_ID,
    iu,
    pipeline::{self as pl, action},
    proto::{
        iu::{UnitAttributesSet, UnitCreated, UnitLinked, UnitTagged, UnitVersioned},
        pipeline::RunRequested,
    },
    resources, subject,
};
use futures::StreamExt;
use prost::Message;

use crate::{
    definition::{self, UnitEventFacts},
    engine::{Engine, Publish},
};

impl Engine {
    /// Unit events → run requests, from the shared durable consumer `pipeline-triggers`.
    pub(crate) async fn triggers(self: Arc<Self>) {
        let Some(consumer) = self.ctx.retry_until_stopped("the trigger consumer", || self.trigger_consumer()).await
        else {
            return;
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
                    if !self.ctx.pause(Duration::from_millis(500)).await {
                        return;
                    }
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
                let _ = m.ack_with(AckKind::Progress).await;
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
            // A trigger is short work: an event held by an instance that died goes to another
            // after the engine's ack wait (each event's wait restarts as its turn comes).
            ack_wait: self.args.ack_wait,
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        };
        // Created, or updated in place (an older engine made it with a 30 s ack wait).
        match stream.create_consumer(config.clone()).await {
            Ok(c) => Ok(c),
            Err(e) => {
                tracing::warn!(error = %e, "trigger consumer not updated; using it as it is");
                Ok(stream.get_or_create_consumer(&name, config).await?)
            }
        }
    }

    /// One unit event: a run request for every pipeline whose trigger matches. Undecodable
    /// events are dead-lettered (Ok: the event is handled); NATS failures are Err (redeliver).
    pub(crate) async fn trigger(&self, m: &jetstream::Message) -> Result<(), String> {
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
        cim_runtime::crash::at("pipeline.trigger.received");
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
                request_id: String::new(),
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
        // The unit reads this event leads to (here and in the runs it starts) reflect it,
        // however far the information-unit projection has got.
        if let Ok(info) = m.info() {
            self.iu.saw(info.stream_sequence);
        }
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
}
