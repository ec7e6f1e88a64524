//! The registry's view: every event of `CIM_REGISTRY_EVENTS` folded into memory by an ordered
//! consumer per registry instance, replayed at start before the service answers.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream;
use cim_events::Envelope;
use cim_runtime::metrics::ProjectionLabels;
use futures::StreamExt;

use crate::{app::App, state::Event};

impl App {
    // ---- following the stream ----

    /// Replays the event stream into the view and keeps following it (an ordered consumer per
    /// registry instance). Returns once the view has caught up with what was there at start.
    pub async fn follow(self: Arc<Self>) -> anyhow::Result<()> {
        let mut stream = self.js.get_stream(&self.events_stream).await?;
        let target = stream.info().await?.state.last_sequence;
        let (caught_up_tx, mut caught_up) = tokio::sync::watch::channel(target == 0);
        let app = self.clone();
        self.ctx.spawn("follower", async move {
            let mut backoff = Duration::from_millis(100);
            let mut connections = app.ctx.connections();
            while !app.ctx.is_stopping() {
                connections.borrow_and_update();
                let from = app.view().applied + 1;
                let consumer = stream
                    .create_consumer(jetstream::consumer::pull::OrderedConfig {
                        deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence: from },
                        ..Default::default()
                    })
                    .await;
                let mut messages = match consumer {
                    Ok(c) => match c.messages().await {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::warn!(error = %e, "follower cannot consume; retrying");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                            continue;
                        }
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "follower cannot start; retrying");
                        if !app.ctx.pause(backoff).await {
                            return;
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                };
                backoff = Duration::from_millis(100);
                loop {
                    let next = tokio::select! {
                        m = messages.next() => m,
                        // The server may have restarted without the consumer: start over at
                        // once rather than after its missed heartbeats.
                        _ = connections.changed() => {
                            tracing::info!("reconnected to NATS; following the registry events again");
                            break;
                        }
                        _ = app.ctx.stopping() => return,
                    };
                    let Some(Ok(m)) = next else { break };
                    let Ok(info) = m.info() else { continue };
                    let seq = info.stream_sequence;
                    match m.headers.as_ref().map(Envelope::from_headers) {
                        Some(Ok(env)) => match Event::decode(&env.schema.name, &m.payload) {
                            Ok(event) => app.apply(seq, env.time_ms(), &event),
                            Err(e) => tracing::error!(sequence = seq, error = %e, "event skipped"),
                        },
                        _ => tracing::error!(sequence = seq, "event without a valid envelope skipped"),
                    }
                    {
                        let mut v = app.view.write().unwrap_or_else(|e| e.into_inner());
                        v.applied = v.applied.max(seq);
                    }
                    if seq >= target {
                        let _ = caught_up_tx.send(true);
                    }
                    app.ctx
                        .metrics()
                        .projection_lag
                        .get_or_create(&ProjectionLabels { projection: "registry-view".into() })
                        .set(info.pending as i64);
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(60), caught_up.wait_for(|c| *c))
            .await
            .map_err(|_| anyhow::anyhow!("the registry view did not catch up with {} events within 60s", target))??;
        tracing::info!(events = target, "registry view caught up");
        Ok(())
    }
}
