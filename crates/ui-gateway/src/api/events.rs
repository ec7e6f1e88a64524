//! Live events: a component's events as server-sent events, resumable by stream sequence.

use std::{collections::HashMap, convert::Infallible, sync::Arc, time::Duration};

use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use axum::{
    Extension,
    extract::{Query, State},
    http::{HeaderMap, HeaderValue, header},
    response::{IntoResponse, sse},
};
use cim_events::{Component, resources, subject};
use futures::StreamExt;
use serde_json::json;

use super::ApiResult;
use crate::{AppState, error::ApiError};

/// `GET /api/v1/events?component=iu&filter=<subject>`: the component's events as SSE, each
/// with its stream sequence as id. `Last-Event-ID` (or `?after=`) resumes after that sequence;
/// without it the stream starts with the next new event (`?after=0` replays from the start).
pub(super) async fn events(
    State(s): State<Arc<AppState>>,
    Extension(caller): Extension<crate::auth::Caller>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> ApiResult {
    // Held by the stream until it ends or its client leaves.
    let slot = s.streams.take(&caller.id).map_err(|max| {
        ApiError::TooManyRequests(
            format!("token {} already holds {max} open event streams; close one first", caller.id),
            1,
        )
    })?;
    let token = q.get("component").map(String::as_str).unwrap_or("iu");
    let component = Component::parse(token).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let all = subject::events_of(component);
    let filter = q.get("filter").cloned().unwrap_or_else(|| all.clone());
    let prefix = all.trim_end_matches('>');
    if !filter.starts_with(prefix)
        || filter.len() <= prefix.len()
        || filter.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(ApiError::BadRequest(format!("filter {filter:?} must be a subject under {all}")));
    }
    let after = match headers.get("last-event-id").and_then(|v| v.to_str().ok()).or(q.get("after").map(String::as_str))
    {
        Some(v) => Some(
            v.trim()
                .parse::<u64>()
                .map_err(|_| ApiError::BadRequest(format!("event id {v:?} is not a sequence number")))?,
        ),
        None => None,
    };
    let stream_name = resources::events_stream(component).name;
    let stream =
        s.js.get_stream(&stream_name)
            .await
            .map_err(|e| ApiError::Unavailable(format!("events stream {stream_name}: {e}")))?;
    let deliver_policy = match after {
        Some(seq) => DeliverPolicy::ByStartSequence {
            start_sequence: seq
                .checked_add(1)
                .ok_or_else(|| ApiError::BadRequest(format!("event id {seq} is beyond any event")))?,
        },
        None => DeliverPolicy::New,
    };
    let consumer = stream
        .create_consumer(OrderedConfig { filter_subject: filter, deliver_policy, ..Default::default() })
        .await
        .map_err(|e| ApiError::BadGateway(format!("consumer on {stream_name}: {e}")))?;
    let messages =
        consumer.messages().await.map_err(|e| ApiError::BadGateway(format!("reading {stream_name}: {e}")))?;
    let mut stopping = s.stopping.clone();
    let stop = async move {
        let _ = stopping.wait_for(|s| *s).await;
    };
    let events = messages.take_until(stop).map(move |m| -> Result<sse::Event, Infallible> {
        let _held = &slot;
        Ok(match m {
            Ok(m) => {
                let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
                let h = |k: &str| {
                    m.headers.as_ref().and_then(|h| h.get(k)).map(|v| v.as_str().to_string()).unwrap_or_default()
                };
                let data = json!({
                    "seq": seq, "subject": m.subject.as_str(), "type": h("ce-type"), "id": h("ce-id"),
                    "time": h("ce-time"), "source": h("ce-source"), "correlation_id": h("ce-correlationid"),
                    "size": m.payload.len(),
                });
                sse::Event::default().id(seq.to_string()).event("cim").data(data.to_string())
            }
            Err(e) => sse::Event::default().event("error").data(json!({ "error": e.to_string() }).to_string()),
        })
    });
    let mut resp =
        sse::Sse::new(events).keep_alive(sse::KeepAlive::new().interval(Duration::from_secs(15))).into_response();
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(resp)
}
