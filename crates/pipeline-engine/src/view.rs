//! The view every instance follows: every event of `CIM_PIPELINE_EVENTS` folded, from the
//! start, into pipelines and runs (`state::View`), and the wait that gives read-your-writes
//! across instances.

use std::{sync::Arc, time::Duration};

use async_nats::{
    HeaderMap,
    jetstream::consumer::{DeliverPolicy, pull},
};
use cim_events::{
    Envelope,
    pipeline::{self as pl, action},
    proto::pipeline::{PipelineApplied, PipelineRemoved},
    subject,
};
use cim_runtime::ServiceError;
use futures::StreamExt;
use prost::Message;

use crate::{
    definition::Definition,
    engine::Engine,
    state::{Run, RunEvent, View},
};

/// How soon the follower starts over after an error or a reconnect.
const FOLLOW_RETRY: Duration = Duration::from_millis(200);

impl Engine {
    /// Folds every event of the pipeline stream into the view, from the start, forever.
    pub(crate) async fn follow(self: Arc<Self>) {
        let mut connections = self.ctx.connections();
        loop {
            connections.borrow_and_update();
            match self.follow_once(&mut connections).await {
                // Reconnected: the server may have restarted without the consumer; start over
                // at once rather than after the consumer's missed heartbeats.
                Ok(true) => tracing::info!("reconnected to NATS; following the pipeline events again"),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "following the pipeline events failed; starting over"),
            }
            if !self.ctx.pause(FOLLOW_RETRY).await {
                return;
            }
        }
    }

    /// Follows until stopped (false) or reconnected (true).
    async fn follow_once(&self, connections: &mut tokio::sync::watch::Receiver<u64>) -> anyhow::Result<bool> {
        let from = *self.seen.borrow() + 1;
        let stream = self.js.get_stream(&self.events_stream).await?;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: from },
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        loop {
            let m = tokio::select! {
                _ = self.ctx.stopping() => return Ok(false),
                _ = connections.changed() => return Ok(true),
                m = messages.next() => m,
            };
            let Some(m) = m else { anyhow::bail!("pipeline event stream ended") };
            let m = m?;
            let seq = m.info().map(|i| i.stream_sequence).map_err(|e| anyhow::anyhow!("{e}"))?;
            self.apply_event(&m.subject, m.headers.as_ref(), &m.payload, seq).await;
            self.seen.send_replace(seq);
        }
    }

    async fn apply_event(&self, subject: &str, headers: Option<&HeaderMap>, payload: &[u8], seq: u64) {
        let mut view = self.view.write().await;
        view.seq = seq;
        let Ok(s) = subject::parse_event(subject) else { return };
        let env = headers.and_then(|h| Envelope::from_headers(h).ok());
        let (time_ms, correlation) =
            env.as_ref().map(|e| (e.time_ms(), e.correlation_id().to_string())).unwrap_or_default();
        let result = match s.aggregate.as_str() {
            pl::PIPELINE => match s.action.as_str() {
                action::APPLIED => PipelineApplied::decode(payload)
                    .map_err(|e| e.to_string())
                    .and_then(|e| view.apply_applied(e, seq, time_ms)),
                action::REMOVED => {
                    PipelineRemoved::decode(payload).map(|e| view.apply_removed(e, seq)).map_err(|e| e.to_string())
                }
                other => Err(format!("unknown pipeline event {other}")),
            },
            pl::RUN => RunEvent::decode(&s.action, payload)
                .map(|event| {
                    if let (RunEvent::Requested(r), Some(env)) = (&event, &env) {
                        view.requests.insert(env.id().to_string(), r.pipeline.clone());
                    }
                    if let RunEvent::Requested(r) = &event
                        && !r.request_id.is_empty()
                    {
                        view.starts.insert(r.request_id.clone(), r.run_id.clone());
                    }
                    let run = view.runs.entry(s.id.clone()).or_default();
                    run.apply(event, seq, time_ms, &correlation);
                })
                .map_err(|e| e.to_string()),
            _ => Ok(()),
        };
        if let Err(e) = result {
            view.undecodable += 1;
            tracing::warn!(seq, subject, error = %e, "pipeline event skipped by the view");
        }
    }

    /// Waits until the view has every event the stream held when this was called (read your
    /// own writes across instances).
    pub(crate) async fn caught_up(&self) -> Result<(), ServiceError> {
        let mut stream = self
            .js
            .get_stream(&self.events_stream)
            .await
            .map_err(|e| ServiceError::unavailable(format!("pipeline events: {e}")))?;
        let last = stream
            .info()
            .await
            .map_err(|e| ServiceError::unavailable(format!("pipeline events: {e}")))?
            .state
            .last_sequence;
        let mut rx = self.seen.subscribe();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| *s >= last))
            .await
            .map_err(|_| ServiceError::unavailable("the engine's view is behind the pipeline events"))?
            .map_err(|_| ServiceError::unavailable("the engine is stopping"))?;
        Ok(())
    }

    pub(crate) async fn definition_of(&self, run: &Run) -> Option<Definition> {
        let find = |view: &View| view.definition(&run.info.pipeline, run.info.pipeline_version).cloned();
        if let Some(d) = find(&*self.view.read().await) {
            return Some(d);
        }
        self.caught_up().await.ok()?;
        find(&*self.view.read().await)
    }
}
