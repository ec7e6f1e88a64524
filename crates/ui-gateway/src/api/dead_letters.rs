//! Dead letters: the newest messages of a component's dead-letter stream, with the reason and
//! the subject they came from (never their payload), read with an ordered consumer.

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use axum::{
    extract::{Query, State},
    http::StatusCode,
};
use cim_events::{Component, pipeline, resources};
use futures::StreamExt;
use serde_json::{Value, json};

use super::{ApiResult, json_response};
use crate::{AppState, error::ApiError};

/// At most this many dead letters per request.
const MAX_LIMIT: u64 = 500;
/// How long one message may take to arrive before the answer goes out with what came.
const READ_WAIT: Duration = Duration::from_secs(5);

/// `GET /api/v1/dead-letters?component=pipeline&limit=50`: newest first.
pub(super) async fn dead_letters(
    State(s): State<Arc<AppState>>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let token = q.get("component").map(String::as_str).unwrap_or("pipeline");
    let component = Component::parse(token).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let limit = match q.get("limit") {
        Some(l) => l.parse::<u64>().map_err(|_| ApiError::BadRequest(format!("limit {l:?} is not a number")))?,
        None => 50,
    }
    .clamp(1, MAX_LIMIT);
    let name = resources::dead_letter_stream(component).name;
    let mut stream = s.js.get_stream(&name).await.map_err(|e| ApiError::Unavailable(format!("stream {name}: {e}")))?;
    let state = stream.info().await.map_err(|e| ApiError::BadGateway(format!("stream {name}: {e}")))?.state.clone();
    if state.messages == 0 {
        return Ok(json_response(StatusCode::OK, json!({ "dead_letters": [] })));
    }
    let start = state.last_sequence.saturating_sub(limit - 1).max(state.first_sequence);
    let consumer = stream
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: start },
            ..Default::default()
        })
        .await
        .map_err(|e| ApiError::BadGateway(format!("consumer on {name}: {e}")))?;
    let mut messages = consumer.messages().await.map_err(|e| ApiError::BadGateway(format!("reading {name}: {e}")))?;
    let mut out: Vec<Value> = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(READ_WAIT, messages.next()).await {
        let m = m.map_err(|e| ApiError::BadGateway(format!("reading {name}: {e}")))?;
        let info = m.info().map_err(|e| ApiError::BadGateway(format!("reading {name}: {e}")))?;
        let (seq, time_ms) = (info.stream_sequence, (info.published.unix_timestamp_nanos() / 1_000_000) as i64);
        let h = |k: &str| m.headers.as_ref().and_then(|h| h.get(k)).map(|v| v.as_str().to_string()).unwrap_or_default();
        out.push(json!({
            "seq": seq, "time_ms": time_ms, "subject": m.subject.as_str(),
            "original_subject": h(pipeline::H_ORIGINAL_SUBJECT), "reason": h(pipeline::H_DEAD_LETTER_REASON),
            "type": h("ce-type"), "correlation_id": h("ce-correlationid"), "size": m.payload.len(),
        }));
        if seq >= state.last_sequence {
            break;
        }
    }
    out.reverse();
    Ok(json_response(StatusCode::OK, json!({ "dead_letters": out })))
}
