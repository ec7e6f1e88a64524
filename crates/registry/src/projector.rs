//! The KV projection: the durable consumer `registry-projector` (shared by all instances, one
//! event in flight) writes every event into `cim_registry_instances` / `cim_registry_nodes`.
//! An event that cannot be read (poison) is logged and passed over; one that cannot be
//! written (the store unavailable, replaced, contended) is applied again, never skipped.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{self, consumer::AckPolicy, kv};
use cim_events::{
    Envelope,
    proto::registry::{Instance, Node},
    registry as names,
};
use cim_runtime::metrics::ProjectionLabels;
use futures::StreamExt;
use prost::Message as _;

use crate::{
    app::App,
    state::{self, Event},
};

/// Why an event was not projected.
#[derive(Debug)]
enum NotProjected {
    /// The event itself is unreadable: applying it again cannot help.
    Poison(String),
    /// The store failed: apply it again.
    Store(String),
}

/// Applies one event to a KV value: the new bytes, or None to leave it.
type Step = Box<dyn Fn(Option<bytes::Bytes>) -> Result<Option<Vec<u8>>, String> + Send + Sync>;

impl App {
    /// The durable projector `registry-projector` (shared by all instances, one event in flight)
    /// applies every event to the KV buckets.
    pub async fn run_projector(self: Arc<Self>) {
        let name = names::projector_consumer();
        let labels = ProjectionLabels { projection: "registry-kv".into() };
        while !self.ctx.is_stopping() {
            let consumer = async {
                let stream = self.js.get_stream(&self.events_stream).await?;
                anyhow::Ok(
                    stream
                        .get_or_create_consumer(
                            &name,
                            jetstream::consumer::pull::Config {
                                durable_name: Some(name.clone()),
                                description: Some("applies registry events to the KV projections".into()),
                                ack_policy: AckPolicy::Explicit,
                                max_ack_pending: 1,
                                ack_wait: Duration::from_secs(5),
                                ..Default::default()
                            },
                        )
                        .await?,
                )
            };
            let consumer = match consumer.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "projector unavailable; retrying");
                    if !self.ctx.pause(Duration::from_secs(1)).await {
                        return;
                    }
                    continue;
                }
            };
            loop {
                let batch = consumer.fetch().max_messages(100).expires(Duration::from_millis(500)).messages();
                let mut batch = tokio::select! {
                    b = batch => match b { Ok(b) => b, Err(_) => break },
                    _ = self.ctx.stopping() => return,
                };
                let mut failed = false;
                while let Some(Ok(m)) = batch.next().await {
                    let Ok(info) = m.info() else { continue };
                    let (seq, pending) = (info.stream_sequence, info.pending);
                    match self.project(&m, seq).await {
                        Ok(()) => {}
                        Err(NotProjected::Poison(e)) => {
                            tracing::error!(sequence = seq, error = %e, "event cannot be read; not projected");
                        }
                        Err(NotProjected::Store(e)) => {
                            // One event in flight: the redelivery keeps the order.
                            tracing::warn!(sequence = seq, error = %e, "projection store unavailable; applying the event again");
                            let _ = m.ack_with(jetstream::AckKind::Nak(Some(Duration::from_millis(200)))).await;
                            failed = true;
                            break;
                        }
                    }
                    let _ = m.ack().await;
                    self.ctx.metrics().projection_lag.get_or_create(&labels).set(pending as i64);
                    self.ctx.metrics().projection_checkpoint.get_or_create(&labels).set(seq as i64);
                }
                if failed && !self.ctx.pause(Duration::from_millis(200)).await {
                    return;
                }
            }
        }
    }

    async fn project(&self, m: &jetstream::Message, seq: u64) -> Result<(), NotProjected> {
        let poison = NotProjected::Poison;
        let headers = m.headers.as_ref().ok_or_else(|| poison("event without headers".into()))?;
        let env = Envelope::from_headers(headers).map_err(|e| poison(e.to_string()))?;
        let event = Event::decode(&env.schema.name, &m.payload).map_err(poison)?;
        let (bucket, key, apply): (&kv::Store, String, Step) = if let Some(id) = event.instance_id() {
            let e = event.clone();
            (
                &self.instances_kv,
                names::instance_key(id).map_err(|e| poison(e.to_string()))?,
                Box::new(move |cur| {
                    let cur = cur.map(Instance::decode).transpose().map_err(|e| e.to_string())?;
                    Ok(state::apply_instance(cur, seq, env.time_ms(), &e).map(|i| i.encode_to_vec()))
                }),
            )
        } else if let Some(n) = event.node() {
            let e = event.clone();
            let t = env.time_ms();
            (
                &self.nodes_kv,
                names::node_key(n).map_err(|e| poison(e.to_string()))?,
                Box::new(move |cur| {
                    let cur = cur.map(Node::decode).transpose().map_err(|e| e.to_string())?;
                    Ok(state::apply_node(cur, seq, t, &e).map(|n| n.encode_to_vec()))
                }),
            )
        } else if let Event::Desired(d) = &event {
            let d = d.clone();
            (&self.nodes_kv, names::DESIRED_KEY.to_string(), Box::new(move |_| Ok(Some(d.encode_to_vec()))))
        } else {
            return Ok(());
        };
        for _ in 0..5 {
            let entry = bucket.entry(&key).await.map_err(|e| NotProjected::Store(e.to_string()))?;
            let (cur, rev) = match entry {
                Some(e) if e.operation == kv::Operation::Put => (Some(e.value), Some(e.revision)),
                Some(e) => (None, Some(e.revision)),
                None => (None, None),
            };
            // A stored value that does not decode is the store's fault, not the event's.
            let Some(next) = apply(cur.clone()).map_err(NotProjected::Store)? else { return Ok(()) };
            if cur.as_deref() == Some(next.as_slice()) {
                return Ok(());
            }
            let written = match rev {
                Some(r) => bucket.update(&key, next.into(), r).await.is_ok(),
                None => bucket.create(&key, next.into()).await.is_ok(),
            };
            if written {
                return Ok(());
            }
        }
        Err(NotProjected::Store(format!("could not write {key}: too much contention")))
    }
}
