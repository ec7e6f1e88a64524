//! The registry service's state and how it writes events. The work is split by concern over
//! sibling modules, each adding to `impl App`: `lifecycle` (every instance's lifecycle
//! messages turned into events), `watchdog` (losses, duplicates, strangers, drains), `view`
//! (the fold of the events every registry instance follows), `projector` (the KV projection),
//! `nodes` (the node lifecycle and its commands) and `queries` (discovery and overview).

use std::{
    collections::HashMap,
    sync::{Mutex, RwLock, atomic::AtomicU64},
    time::{Duration, Instant},
};

use async_nats::{
    Message,
    jetstream::{self, kv},
};
use cim_events::{Envelope, Schema, Upcasters, registry as names};
use cim_runtime::{Ctx, NewEvent, PublishError, ServiceError};

use crate::state::{Event, NodeRefusal, View};

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
pub(crate) struct Live {
    /// Incarnation → when it last beat.
    pub(crate) beats: HashMap<String, (Instant, i64)>,
    pub(crate) last_incarnation: String,
    pub(crate) ready: bool,
    pub(crate) in_flight: u64,
    pub(crate) draining: bool,
    pub(crate) drained: bool,
    pub(crate) node: String,
    pub(crate) first_seen: Option<Instant>,
    /// Why it says it is degraded (empty when it is not).
    pub(crate) degraded: String,
}

pub struct App {
    pub ctx: Ctx,
    pub js: jetstream::Context,
    pub instances_kv: kv::Store,
    pub nodes_kv: kv::Store,
    pub events_stream: String,
    pub opts: RegistryOptions,
    pub(crate) view: RwLock<View>,
    pub(crate) live: Mutex<HashMap<String, Live>>,
    pub(crate) asked: Mutex<HashMap<String, Instant>>,
    pub(crate) started: Instant,
    pub(crate) heartbeats: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) upcasters: Upcasters,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("registry::App")
    }
}

pub(crate) fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

pub(crate) fn bad(e: impl std::fmt::Display) -> ServiceError {
    ServiceError::bad_request(e.to_string())
}

pub(crate) fn decode<M: prost::Message + Default>(msg: &Message) -> Result<M, ServiceError> {
    M::decode(msg.payload.clone()).map_err(|e| ServiceError::bad_request(format!("request does not decode: {e}")))
}

pub(crate) fn refusal(r: NodeRefusal) -> ServiceError {
    match r {
        NodeRefusal::Unknown(_) => ServiceError::not_found(r.to_string()),
        NodeRefusal::Invalid(_) => ServiceError::bad_request(r.to_string()),
        NodeRefusal::WrongState { .. } | NodeRefusal::Stateful { .. } => ServiceError::conflict(r.to_string()),
    }
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

    pub(crate) fn view(&self) -> std::sync::RwLockReadGuard<'_, View> {
        self.view.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn apply(&self, seq: u64, time_ms: i64, event: &Event) {
        self.view.write().unwrap_or_else(|e| e.into_inner()).apply(seq, time_ms, event);
    }

    // ---- writing events ----

    /// Records one event, then applies it to this instance's view at once (write-through; the
    /// follower applies it again, harmlessly). `expect` is the aggregate's last sequence.
    pub(crate) async fn record(
        &self,
        subject: String,
        event: Event,
        msg_id: Option<String>,
        expect: Option<(String, u64)>,
    ) -> Result<u64, PublishError> {
        let (type_name, body) = event.encode();
        let env = Envelope::new_root(type_name, Schema { name: type_name.to_string(), version: 1 }, self.ctx.source());
        let mut new = NewEvent::new(subject, &env, body);
        if let Some(id) = &msg_id {
            new = new.msg_id(id);
        }
        if let Some((filter, seq)) = &expect {
            new = new.expect(filter, *seq);
        }
        let ack = new.publish(&self.js).await?;
        self.apply(ack.sequence, env.time_ms(), &event);
        Ok(ack.sequence)
    }

    pub(crate) async fn record_instance(&self, instance_id: &str, action: &str, incarnation: &str, event: Event) {
        let Ok(subject) = names::instance_event(instance_id, action) else { return };
        let id = names::instance_msg_id(action, instance_id, incarnation);
        match self.record(subject, event, Some(id), None).await {
            Ok(seq) => tracing::info!(instance = instance_id, action, seq, "recorded"),
            Err(PublishError::Failed(e)) => {
                tracing::warn!(instance = instance_id, action, error = %e, "could not record")
            }
            Err(PublishError::Conflict) => {}
        }
    }
}
