//! Events: writing one (envelope caused by the request's, optimistic concurrency on the
//! aggregate, de-duplication), and reading a history back from the stream (up to a version or
//! a time) to rebuild a unit's state.

use async_nats::{Message, jetstream};
use bytes::Bytes;
use cim_events::{
    Envelope, Schema, iu,
    proto::iu::{Provenance, Unit},
};
use cim_runtime::{NewEvent, PublishError, ServiceError};

use crate::{
    app::{App, internal},
    domain::{self, EventMeta, UnitEvent},
};

/// An event read back from the stream.
pub struct StoredEvent {
    pub meta: EventMeta,
    pub type_name: String,
    pub payload: Bytes,
}

impl App {
    // ---- writing events ----

    /// The envelope of a request, if it carries one; a broken one is refused.
    pub(crate) fn parent_envelope(msg: &Message) -> Result<Option<Envelope>, ServiceError> {
        match &msg.headers {
            Some(h) if h.get(cim_events::envelope::H_ID).is_some() => {
                Envelope::from_headers(h).map(Some).map_err(|e| ServiceError::bad_request(e.to_string()))
            }
            _ => Ok(None),
        }
    }

    /// Publishes one event. `filter` is the aggregate's history with its last sequence (0 =
    /// none yet) checked by the server; `msg_id` de-duplicates retries.
    pub(crate) async fn publish(
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
                Until::Version(v) => out.len() as u64 >= v,
                Until::Sequence(s) => msg.sequence > s,
                Until::Time(t) => time_ms > t,
            };
            if stop {
                break;
            }
            seq = msg.sequence + 1;
            out.push(StoredEvent {
                meta: EventMeta {
                    sequence: msg.sequence,
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
}

/// How far to read a history.
#[derive(Clone, Copy, Debug)]
pub enum Until {
    Now,
    /// The first N events of the history: an aggregate's own version N.
    Version(u64),
    /// Up to a stream sequence.
    Sequence(u64),
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
