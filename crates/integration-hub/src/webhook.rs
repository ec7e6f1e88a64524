//! Inbound webhooks: `POST /webhooks/<source>` verifies the Standard Webhooks signature and
//! timestamp, refuses oversized and malformed payloads, drops repeated delivery ids, and turns
//! the payload into a `WebhookReceived` event (or an information unit plus that event).

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
        let seq = ack.sequence.to_string();
        self.ids.put(&key, seq.clone().into()).await?;
        if ack.duplicate {
            return Ok(duplicate(delivery_id, &bytes::Bytes::from(seq)));
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
