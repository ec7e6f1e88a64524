//! Inbound webhooks: `POST /webhooks/<source>` verifies the Standard Webhooks signature and
//! timestamp, refuses oversized and malformed payloads, drops repeated delivery ids, and turns
//! the payload into a `WebhookReceived` event (or an information unit plus that event).
//!
//! A delivery is one JetStream write: its event, whose `Nats-Msg-Id` is derived from the
//! delivery id, so JetStream drops a repeat within the retry horizon (the events stream's
//! duplicate window) and names the first event. The delivery-id index (`ids`) that answers a
//! repeat after the horizon is kept from the log by [`index`], not written on the request
//! path: no crash between the event and the answer can make a retry a second delivery.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use async_nats::jetstream;
use axum::{
    Router,
    body::Body,
    extract::{ConnectInfo, Path, State},
    http::{HeaderMap as HttpHeaders, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use cim_events::{Envelope, hub, proto::hub::WebhookReceived};
use cim_iu_client::IuClient;
use cim_runtime::NewEvent;
use prost::Message;

use crate::config::{Content, Source, Target};

/// What the webhook endpoints share.
pub struct Inbound {
    pub sources: BTreeMap<String, Source>,
    pub js: jetstream::Context,
    pub ids: jetstream::kv::Store,
    /// How far the delivery-id index has got (see [`IndexPosition`]).
    pub indexed: Arc<IndexPosition>,
    /// The retry horizon: JetStream's duplicate window of the events stream.
    pub horizon: Duration,
    pub iu: IuClient,
    /// `ce-source` of the events this instance writes.
    pub ce_source: String,
}

pub fn router(inbound: Arc<Inbound>) -> Router {
    Router::new().route("/webhooks/{source}", post(receive)).with_state(inbound)
}

/// An outcome as HTTP: status plus a one-line JSON body.
struct Outcome(StatusCode, serde_json::Value);

impl IntoResponse for Outcome {
    fn into_response(self) -> Response {
        (self.0, [(header::CONTENT_TYPE, "application/json")], self.1.to_string()).into_response()
    }
}

fn refuse(status: StatusCode, error: impl std::fmt::Display) -> Outcome {
    Outcome(status, serde_json::json!({ "error": error.to_string() }))
}

async fn receive(
    State(inbound): State<Arc<Inbound>>,
    Path(name): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HttpHeaders,
    body: Body,
) -> Outcome {
    let Some(source) = inbound.sources.get(&name) else {
        return refuse(StatusCode::NOT_FOUND, format!("unknown webhook source {name:?}"));
    };
    let too_large =
        || refuse(StatusCode::PAYLOAD_TOO_LARGE, format!("payload larger than {} bytes", source.max_body_bytes));
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > source.max_body_bytes as u64) {
        return too_large();
    }
    let Ok(body) = axum::body::to_bytes(body, source.max_body_bytes).await else {
        return too_large();
    };
    let text = |h: &str| headers.get(h).and_then(|v| v.to_str().ok());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let sent_at = match hub::verify(
        &source.key,
        text(hub::H_WEBHOOK_ID),
        text(hub::H_WEBHOOK_TIMESTAMP),
        text(hub::H_WEBHOOK_SIGNATURE),
        &body,
        now,
        source.tolerance,
    ) {
        Ok(ts) => ts,
        Err(e) => {
            tracing::warn!(source = %name, peer = %peer, error = %e, "webhook refused");
            return refuse(StatusCode::UNAUTHORIZED, e);
        }
    };
    let delivery_id = text(hub::H_WEBHOOK_ID).unwrap_or_default().to_string();
    if source.content == Content::Json
        && let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&body)
    {
        return refuse(StatusCode::BAD_REQUEST, format!("payload is not valid JSON: {e}"));
    }
    match inbound.accept(source, &delivery_id, sent_at, text(header::CONTENT_TYPE.as_str()), body, peer).await {
        Ok(accepted) => accepted,
        // information-unit refused the unit (e.g. invalid metadata): a retry would not help.
        Err(e) if e.downcast_ref::<cim_iu_client::IuError>().is_some_and(|e| e.is_bad_request()) => {
            tracing::warn!(source = %name, delivery_id = %delivery_id, error = %e, "webhook payload refused as a unit");
            refuse(StatusCode::UNPROCESSABLE_ENTITY, e)
        }
        Err(e) => {
            tracing::warn!(source = %name, delivery_id = %delivery_id, error = %e, "webhook not stored; the sender should retry");
            refuse(StatusCode::SERVICE_UNAVAILABLE, e)
        }
    }
}

impl Inbound {
    async fn accept(
        &self,
        source: &Source,
        delivery_id: &str,
        sent_at: i64,
        content_type: Option<&str>,
        body: bytes::Bytes,
        peer: SocketAddr,
    ) -> anyhow::Result<Outcome> {
        let key = hub::webhook_id_key(&source.name, delivery_id)?;
        // A repeat that JetStream's window no longer covers is told by the index, which must
        // have been complete recently enough for that (it is, but for moments after a start).
        if !self.indexed.recent(self.horizon / 2).await {
            anyhow::bail!("the delivery-id index is catching up with the log; retry");
        }
        if let Some(seq) = self.ids.get(&key).await? {
            return Ok(duplicate(delivery_id, &seq));
        }
        let mut event = WebhookReceived {
            source: source.name.clone(),
            delivery_id: delivery_id.to_string(),
            sent_at,
            received_at_ms: now_ms(),
            content_type: content_type.unwrap_or_default().to_string(),
            body: Vec::new(),
            unit_id: String::new(),
            cid: String::new(),
            remote_addr: peer.to_string(),
            size: body.len() as u64,
        };
        match source.target {
            Target::Event => event.body = body.to_vec(),
            Target::Unit => {
                let stored = self.iu.put_bytes(&body).await?;
                let mut attributes = std::collections::HashMap::new();
                attributes.insert("hub_source".to_string(), source.name.clone());
                attributes.insert("hub_delivery_id".to_string(), delivery_id.to_string());
                attributes.insert("hub_sent_at".to_string(), sent_at.to_string());
                let created = self
                    .iu
                    .create(cim_events::proto::iu::CreateUnit {
                        // The delivery id makes a retried creation return the first result.
                        header: cim_iu_client::header_with_id(hub::webhook_msg_id(&source.name, delivery_id), 0),
                        cid: stored.cid.clone(),
                        name: format!("{}-{}", source.name, delivery_id),
                        media_type: content_type.unwrap_or("application/octet-stream").to_string(),
                        unit_type: String::new(),
                        tags: source.tags.clone(),
                        attributes,
                        links: Vec::new(),
                    })
                    .await?;
                event.unit_id = created.unit_id;
                event.cid = stored.cid;
            }
        }
        let subject = hub::webhook_event(&source.name)?;
        let envelope = Envelope::root::<WebhookReceived>(self.ce_source.clone());
        let ack = NewEvent::new(subject.clone(), &envelope, event.encode_to_vec())
            .msg_id(&hub::webhook_msg_id(&source.name, delivery_id))
            .publish(&self.js)
            .await?;
        cim_runtime::crash::at("hub.webhook.published");
        if ack.duplicate {
            return Ok(duplicate(delivery_id, &bytes::Bytes::from(ack.sequence.to_string())));
        }
        tracing::info!(source = %source.name, delivery_id = %delivery_id, sequence = ack.sequence, unit = %event.unit_id, "webhook accepted");
        Ok(Outcome(
            StatusCode::ACCEPTED,
            serde_json::json!({ "status": "accepted", "subject": subject, "sequence": ack.sequence, "unit_id": event.unit_id, "cid": event.cid }),
        ))
    }
}

fn duplicate(delivery_id: &str, seq: &bytes::Bytes) -> Outcome {
    let sequence: u64 = std::str::from_utf8(seq).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    tracing::info!(delivery_id = %delivery_id, sequence, "webhook delivery repeated; ignored");
    Outcome(StatusCode::OK, serde_json::json!({ "status": "duplicate", "sequence": sequence }))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or(Duration::ZERO).as_millis() as i64
}

/// When the delivery-id index last had applied every received event (its consumer had none
/// pending): every delivery written before then is in the index.
#[derive(Debug, Default)]
pub struct IndexPosition {
    caught_up_at: tokio::sync::watch::Sender<Option<tokio::time::Instant>>,
}

impl IndexPosition {
    fn caught_up(&self) {
        self.caught_up_at.send_replace(Some(tokio::time::Instant::now()));
    }

    fn within(&self, age: Duration) -> bool {
        self.caught_up_at.borrow().is_some_and(|t| t.elapsed() <= age)
    }

    /// Whether the index was complete within `age`, waiting a few seconds for it (a start).
    async fn recent(&self, age: Duration) -> bool {
        let mut rx = self.caught_up_at.subscribe();
        let fresh = rx.wait_for(|t| t.is_some_and(|t| t.elapsed() <= age));
        matches!(tokio::time::timeout(INDEX_WAIT, fresh).await, Ok(Ok(_)))
    }
}

/// How long a delivery waits for the index to catch up.
const INDEX_WAIT: Duration = Duration::from_secs(5);
/// How often, at most, a busy index asks its consumer whether it is complete (an idle one
/// asks at every empty fetch).
const SETTLED_EVERY: Duration = Duration::from_secs(1);

/// How many received events the index applies per batch (written in flight together).
const INDEX_BATCH: usize = 256;
/// How many index writes are in flight at once.
const INDEX_WRITES: usize = 64;

/// Keeps the delivery-id index equal to the log: every `WebhookReceived` event's delivery id
/// → its sequence, through the durable consumer `hub-webhook-ids` (shared by all instances,
/// one batch outstanding, one ack per batch). A store error applies the batch again; nothing
/// is skipped.
pub async fn index(
    ctx: cim_runtime::Ctx,
    js: jetstream::Context,
    ids: jetstream::kv::Store,
    position: Arc<IndexPosition>,
) {
    use futures::StreamExt;
    use jetstream::consumer::{AckPolicy, pull};
    let stream_name = cim_events::resources::events_stream(cim_events::Component::IntegrationHub).name;
    let config = pull::Config {
        durable_name: Some(hub::webhook_ids_consumer()),
        filter_subject: hub::webhooks_received(),
        ack_policy: AckPolicy::All,
        max_ack_pending: INDEX_BATCH as i64,
        ack_wait: Duration::from_secs(5),
        ..Default::default()
    };
    while !ctx.is_stopping() {
        let opened = ctx
            .retry_until_stopped("the webhook id index consumer", || {
                cim_runtime::consumer::durable(&js, &stream_name, config.clone())
            })
            .await;
        let Some(mut consumer) = opened else { return };
        loop {
            let fetched = consumer.fetch().max_messages(INDEX_BATCH).expires(Duration::from_millis(500)).messages();
            let mut batch = tokio::select! {
                b = fetched => match b { Ok(b) => b, Err(e) => { tracing::debug!(error = %e, "index fetch failed"); break } },
                _ = ctx.stopping() => return,
            };
            let mut msgs = Vec::new();
            while let Some(Ok(m)) = batch.next().await {
                msgs.push(m);
            }
            let Some(last) = msgs.last() else {
                // Nothing more delivered: complete unless another instance holds a batch (or
                // held one when it died: redelivered after the ack wait).
                if settled(&mut consumer).await {
                    position.caught_up();
                }
                continue;
            };
            let pending = last.info().map(|i| i.pending).unwrap_or(u64::MAX);
            let keys: Vec<(String, u64)> = msgs.iter().filter_map(index_key).collect();
            let writes = futures::stream::iter(keys)
                .map(|(key, seq)| {
                    let ids = ids.clone();
                    async move { ids.put(&key, seq.to_string().into()).await.map(drop) }
                })
                .buffer_unordered(INDEX_WRITES)
                .collect::<Vec<_>>()
                .await;
            if let Some(Err(e)) = writes.into_iter().find(Result::is_err) {
                tracing::warn!(error = %e, "webhook id index not written; applying the batch again");
                for m in &msgs {
                    let _ = m.ack_with(jetstream::AckKind::Nak(Some(Duration::from_millis(200)))).await;
                }
                if !ctx.pause(Duration::from_millis(200)).await {
                    return;
                }
                break;
            }
            if last.ack().await.is_ok()
                && pending == 0
                && !position.within(SETTLED_EVERY)
                && settled(&mut consumer).await
            {
                position.caught_up();
            }
        }
    }
}

/// Whether the index consumer has nothing pending and nothing delivered unacknowledged.
async fn settled(consumer: &mut jetstream::consumer::PullConsumer) -> bool {
    consumer.info().await.is_ok_and(|i| i.num_pending == 0 && i.num_ack_pending == 0)
}

/// The index entry of one received event: its delivery key and sequence (none, and a warning,
/// for an event that does not decode).
fn index_key(m: &jetstream::Message) -> Option<(String, u64)> {
    let seq = m.info().ok()?.stream_sequence;
    let event = WebhookReceived::decode(m.payload.clone())
        .map_err(|e| tracing::warn!(sequence = seq, error = %e, "webhook event does not decode; not indexed"))
        .ok()?;
    let key = hub::webhook_id_key(&event.source, &event.delivery_id)
        .map_err(
            |e| tracing::warn!(sequence = seq, error = %e, "webhook event names no valid delivery key; not indexed"),
        )
        .ok()?;
    Some((key, seq))
}
