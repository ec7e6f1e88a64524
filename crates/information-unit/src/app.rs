//! The information-unit service's state: what its handlers share, the error mapping of its
//! requests, and the current state of units and types read from the KV projection (which the
//! projector keeps), falling back to the stream.
//!
//! The handlers are split by concern over sibling modules, each adding to `impl App`: `events`
//! (writing events, reading the stream, replaying a unit), `commands` (create, version, tag,
//! attributes, link, delete, types; idempotency and optimistic concurrency), `content`
//! (commit, corruption, collection), `queries` (get, history, list, links, validate, types),
//! `projection` (the KV projections and their replay).

use std::{sync::Arc, time::Duration};

use async_nats::{
    Message,
    jetstream::{self, kv, object_store},
};
use bytes::Bytes;
use cim_events::{
    iu,
    proto::iu::{Unit, UnitType, UnitTypeRegistered},
};
use cim_runtime::{Ctx, ServiceError};
use prost::Message as _;

use crate::{domain::Rejection, events::Until, index::Index, schema::TypeSchema};

/// How long a query waits for the projection to reach the sequence it asks for.
const PROJECTION_WAIT: Duration = Duration::from_secs(5);

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

pub(crate) fn decode<M: prost::Message + Default>(msg: &Message) -> Result<M, ServiceError> {
    M::decode(msg.payload.clone()).map_err(|e| ServiceError::bad_request(format!("request does not decode: {e}")))
}

impl App {
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

    /// The state of a unit reflecting at least every event up to stream sequence
    /// `min_sequence` (read your writes): this instance's index when it is complete that far
    /// (it is fed by the projection's watch, so no lagging replica can answer for it), the
    /// projection's state when that is the unit's own newer state, else the log's.
    pub async fn load_unit_since(&self, unit_id: &str, min_sequence: u64) -> Result<Option<Unit>, ServiceError> {
        if min_sequence > 0
            && min_sequence <= self.index.applied()
            && let Some(unit) = self.index.get(unit_id)
        {
            return Ok(Some(unit));
        }
        match self.load_unit(unit_id).await? {
            Some(u) if min_sequence > u.sequence && min_sequence > self.index.applied() => {
                self.replay_unit(unit_id, Until::Now).await
            }
            other => Ok(other),
        }
    }

    /// Waits until the projection and the index are complete up to `min_sequence` (capped at
    /// the stream's last sequence); unavailable when they do not get there within seconds.
    pub async fn projected_through(&self, min_sequence: u64) -> Result<(), ServiceError> {
        if min_sequence <= self.index.applied() {
            return Ok(());
        }
        let stream =
            self.js.get_stream(&self.events_stream).await.map_err(|e| internal("events stream")(Box::new(e)))?;
        let target = min_sequence.min(stream.cached_info().state.last_sequence);
        if self.index.applied_through(target, PROJECTION_WAIT).await {
            return Ok(());
        }
        Err(ServiceError::unavailable(format!(
            "the projection has not reached sequence {target} yet (it is at {}); retry",
            self.index.applied()
        )))
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
                        version: e.meta.sequence,
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
}

/// A message with a stream sequence that only moves forward.
pub trait Versioned: prost::Message + Default {
    fn sequence(&self) -> u64;
}

impl Versioned for Unit {
    fn sequence(&self) -> u64 {
        self.sequence
    }
}

impl Versioned for UnitType {
    /// A type's version is the stream sequence of its registration.
    fn sequence(&self) -> u64 {
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
                if M::decode(e.value.clone()).map(|cur| cur.sequence() >= value.sequence()).unwrap_or(false) {
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
