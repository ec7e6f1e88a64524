//! The engine at run time: what every task of an instance shares, how it starts, and how it
//! writes events (run events with per-run optimistic concurrency, dead letters).
//!
//! The work is split by concern over sibling modules, each adding to `impl Engine`: `view`
//! (the view of `CIM_PIPELINE_EVENTS` every instance follows), `triggers` (unit events → run
//! requests), `runs` (run work items → steps → events), `steps` (what one step does),
//! `slots` (per-pipeline concurrency leases), `endpoints`, `commands` and `queries`.
//!
//! Exactly-once in effect: every run event is published with the run's last sequence as
//! `Nats-Expected-Last-Subject-Sequence`, so two instances that both hold a run (a redelivery
//! after a kill) can never both record a step; a step's side effects carry idempotency keys
//! (information-unit request ids `pl-<run>-<step>`, an `emitted` event is written once), so a
//! step repeated after a crash changes nothing twice.

use std::sync::Arc;

use async_nats::{
    HeaderMap,
    jetstream::{self, kv},
};
use cim_events::{Envelope, Payload, envelope::H_MSG_ID, pipeline as pl, resources};
use cim_iu_client::IuClient;
use cim_runtime::{Ctx, Endpoint, NewEvent, PublishError};
use tokio::sync::{RwLock, Semaphore, watch};

use crate::{COMPONENT, EngineArgs, endpoints::endpoints, state::View};

pub use crate::steps::MAX_STEP_OUTPUT;

/// Why a publish did not go through (the runtime's one error type).
pub(crate) type Publish = PublishError;

/// What every task of an instance shares.
pub struct Engine {
    pub(crate) ctx: Ctx,
    pub(crate) js: jetstream::Context,
    pub(crate) events_stream: String,
    pub(crate) view: RwLock<View>,
    pub(crate) seen: watch::Sender<u64>,
    pub(crate) iu: IuClient,
    pub(crate) slots: kv::Store,
    pub(crate) args: EngineArgs,
    pub(crate) runs: Arc<Semaphore>,
}

/// Builds the engine, starts its workers, and returns its endpoints.
pub async fn setup(ctx: Ctx, args: EngineArgs) -> anyhow::Result<Vec<Endpoint>> {
    let js = ctx.jetstream().clone();
    let slots = js.get_key_value(resources::kv_bucket(COMPONENT, pl::KV_SLOTS)?).await?;
    let engine = Arc::new(Engine {
        ctx: ctx.clone(),
        js,
        events_stream: resources::events_stream(COMPONENT).name,
        view: RwLock::new(View::default()),
        seen: watch::channel(0).0,
        iu: ctx.iu_client(),
        slots,
        runs: Arc::new(Semaphore::new(args.max_runs)),
        args,
    });
    ctx.spawn("view", engine.clone().follow());
    ctx.spawn("triggers", engine.clone().triggers());
    ctx.spawn("runs", engine.clone().run_worker());
    endpoints(engine)
}

impl Engine {
    /// Publishes one run event caused by `parent`, expecting the run's last sequence `expect`.
    pub(crate) async fn publish_run<P: Payload>(
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

    pub(crate) async fn publish(
        &self,
        subject: String,
        headers: HeaderMap,
        body: Vec<u8>,
        expect: Option<(String, u64)>,
    ) -> Result<u64, Publish> {
        Ok(self.publish_acked(subject, headers, body, expect).await?.sequence)
    }

    /// [`Engine::publish`], with JetStream's acknowledgement (whether it was a duplicate).
    pub(crate) async fn publish_acked(
        &self,
        subject: String,
        headers: HeaderMap,
        body: Vec<u8>,
        expect: Option<(String, u64)>,
    ) -> Result<async_nats::jetstream::publish::PublishAck, Publish> {
        let mut event = NewEvent::with_headers(subject, headers, body);
        if let Some((filter, seq)) = &expect {
            event = event.expect(filter, *seq);
        }
        event.publish(&self.js).await
    }

    /// Stores a message that could not be processed in `CIM_PIPELINE_DLQ`, as it was, with the
    /// reason and its subject. `run_seq` (the run's last sequence, 0 for poison) makes the dead
    /// letter's `Nats-Msg-Id`, so writing it again after a crash does not store it twice.
    pub(crate) async fn dead_letter(
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
}

pub(crate) fn one_line(s: &str) -> String {
    let line: String = s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    line.chars().take(1000).collect()
}
