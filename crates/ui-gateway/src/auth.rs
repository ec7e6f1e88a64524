//! Authentication (API tokens from the `cim_gateway_tokens` KV bucket, stored hashed, held in
//! memory and kept current by a watch),
//! authorization (roles per route), per-token rate limits and CORS.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::Instant,
};

use async_nats::jetstream::kv;
use axum::{
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use cim_events::gateway::{self, ApiToken, role};
use prost::Message;

use crate::{AppState, error::ApiError};

/// Who is calling: the token's id, name and role. Put into the request's extensions.
#[derive(Clone, Debug)]
pub struct Caller {
    pub id: String,
    pub name: String,
    pub role: String,
}

impl Caller {
    /// Whether this caller may see the payloads of `component`'s events (gRPC `Events`; the
    /// SSE stream carries metadata only, for everyone). Units and pipeline runs are what a
    /// reader may read anyway; the other components' payloads (registry nodes, webhook bodies,
    /// PostgreSQL rows, archive state) are the admin's, like `/nodes` and `/status`.
    pub fn sees_payloads_of(&self, component: cim_events::Component) -> bool {
        use cim_events::Component::{InformationUnit, PipelineEngine};
        matches!(component, InformationUnit | PipelineEngine)
            || gateway::role_rank(&self.role) >= gateway::role_rank(role::ADMIN)
    }

    /// A request id the caller chose, namespaced by its token (`gw-<token id>-<id>`): request
    /// ids are idempotency keys that every writer of a service shares, so a caller's ids are
    /// its own and can never claim, or be answered with, another caller's or a service's
    /// (`hub-webhook-…`).
    pub fn own_request_id(&self, id: &str) -> String {
        let token: String =
            self.id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
        format!("gw-{token}-{id}")
    }
}

/// The role a request needs, or `None` for public paths (the UI and the OpenAPI document).
pub fn required_role(method: &Method, path: &str) -> Option<&'static str> {
    let rest = path.strip_prefix("/api/")?;
    if rest == "openapi.json" {
        return None;
    }
    if rest.starts_with("v1/status") || rest.starts_with("v1/nodes") {
        return Some(role::ADMIN);
    }
    // Pipeline definitions are configuration: applying and removing one changes what happens
    // to every unit, so it takes an admin; starting, cancelling and retrying runs is writing.
    if (method == Method::POST && rest == "v1/pipelines")
        || (method == Method::DELETE && rest.starts_with("v1/pipelines/"))
    {
        return Some(role::ADMIN);
    }
    if method == Method::GET || method == Method::HEAD { Some(role::READER) } else { Some(role::WRITER) }
}

/// The token of a request: `Authorization: Bearer <token>`, or `?access_token=` (for
/// `EventSource` and download links, which cannot set headers).
fn presented_token(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v.to_str().ok()?;
        return v.strip_prefix("Bearer ").map(|t| t.trim().to_string());
    }
    query?.split('&').find_map(|kv| kv.strip_prefix("access_token=").map(str::to_string))
}

/// The token bucket as the gateway reads it: every token in memory, kept equal to the bucket
/// by a watch (a revoked token is refused as soon as its purge arrives, within milliseconds),
/// so a request costs no KV read. A token the memory does not hold (a new one, or any while
/// the watch is restarting) is read from the bucket itself.
pub struct Tokens {
    kv: kv::Store,
    /// Token id → token; `None` while the watch has not caught up with the bucket.
    cache: RwLock<Option<HashMap<String, ApiToken>>>,
}

impl Tokens {
    pub fn new(kv: kv::Store) -> Arc<Tokens> {
        Arc::new(Tokens { kv, cache: RwLock::new(None) })
    }

    /// The stored token with `id`, if any (not revoked).
    async fn get(&self, id: &str) -> Result<Option<ApiToken>, ApiError> {
        if let Some(t) = self.cache.read().unwrap_or_else(|e| e.into_inner()).as_ref().and_then(|c| c.get(id)) {
            return Ok(Some(t.clone()));
        }
        let key = gateway::token_key(id).map_err(|_| ApiError::Unauthorized(INVALID.to_string()))?;
        let Some(entry) = self.kv.get(&key).await.map_err(|e| ApiError::Unavailable(format!("token store: {e}")))?
        else {
            return Ok(None);
        };
        ApiToken::decode(entry)
            .map(Some)
            .map_err(|e| ApiError::Internal(format!("stored token {id} is undecodable: {e}")))
    }

    fn set_live(&self, cache: Option<HashMap<String, ApiToken>>) {
        *self.cache.write().unwrap_or_else(|e| e.into_inner()) = cache;
    }

    fn apply(&self, key: &str, token: Option<ApiToken>) {
        let Some(id) = key.strip_prefix("t.") else { return };
        if let Some(cache) = self.cache.write().unwrap_or_else(|e| e.into_inner()).as_mut() {
            match token {
                Some(t) => cache.insert(id.to_string(), t),
                None => cache.remove(id),
            };
        }
    }

    /// Keeps the memory equal to the bucket until the service stops; while the watch is
    /// down, requests read the bucket.
    pub async fn follow(self: Arc<Self>, ctx: cim_runtime::Ctx) {
        while !ctx.is_stopping() {
            if let Err(e) = self.follow_once(&ctx).await {
                tracing::warn!(error = %e, "token watch failed; reading tokens from the bucket meanwhile");
            }
            self.set_live(None);
            if !ctx.pause(std::time::Duration::from_millis(500)).await {
                return;
            }
        }
    }

    async fn follow_once(&self, ctx: &cim_runtime::Ctx) -> anyhow::Result<()> {
        use futures::StreamExt;
        let empty = self.kv.status().await?.values() == 0;
        let mut watch = self.kv.watch_with_history(">").await?;
        let mut loading: Option<HashMap<String, ApiToken>> = Some(HashMap::new());
        if empty {
            self.set_live(loading.take());
        }
        let mut connections = ctx.connections();
        connections.borrow_and_update();
        loop {
            let entry = tokio::select! {
                e = watch.next() => e,
                // The server may have restarted without the watch's consumer: start over at
                // once (tokens read from the bucket meanwhile) rather than after its heartbeats.
                _ = connections.changed() => anyhow::bail!("reconnected to NATS"),
                _ = ctx.stopping() => return Ok(()),
            };
            let entry = entry.ok_or_else(|| anyhow::anyhow!("the watch ended"))??;
            let token = match entry.operation {
                kv::Operation::Put => ApiToken::decode(entry.value.clone()).ok(),
                kv::Operation::Delete | kv::Operation::Purge => None,
            };
            match loading.as_mut() {
                Some(map) => {
                    if let Some(id) = entry.key.strip_prefix("t.") {
                        match token {
                            Some(t) => map.insert(id.to_string(), t),
                            None => map.remove(id),
                        };
                    }
                    if entry.delta == 0 {
                        self.set_live(loading.take());
                    }
                }
                None => self.apply(&entry.key, token),
            }
        }
    }
}

const INVALID: &str = "invalid or revoked api token";

/// Looks a presented token up: it must have the right shape, exist (not revoked) and match
/// the stored hash.
pub async fn verify(tokens: &Tokens, presented: &str) -> Result<Caller, ApiError> {
    let invalid = || ApiError::Unauthorized(INVALID.to_string());
    let id = gateway::token_id(presented).ok_or_else(invalid)?;
    // What went wrong inside is for the log, not for a caller nobody has authenticated yet.
    let stored = match tokens.get(id).await {
        Ok(stored) => stored.ok_or_else(invalid)?,
        Err(ApiError::Unauthorized(m)) => return Err(ApiError::Unauthorized(m)),
        Err(e) => {
            tracing::warn!(token = %id, error = %e, "could not check an api token");
            return Err(ApiError::Unavailable("api tokens cannot be checked right now; retry shortly".into()));
        }
    };
    if !gateway::hashes_equal(&stored.sha256, &gateway::hash_token(presented)) {
        return Err(invalid());
    }
    Ok(Caller { id: stored.id, name: stored.name, role: stored.role })
}

/// Per-token token buckets: `rate` requests per second, bursts of `2 × rate`.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(rate: u32) -> RateLimiter {
        RateLimiter { rate: rate as f64, buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes one request from `id`'s bucket; `Err(seconds)` to wait when it is empty.
    pub fn check(&self, id: &str) -> Result<(), u64> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let burst = (self.rate * 2.0).max(1.0);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, last) = buckets.entry(id.to_string()).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / self.rate).ceil().max(1.0) as u64)
        }
    }
}

/// Open event streams (SSE and gRPC `Events`) per token: at most `max` at once, so one token
/// cannot hold the gateway's connections and consumers (0 = unlimited).
#[derive(Debug)]
pub struct StreamSlots {
    max: usize,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

/// One open stream of a token; dropping it (the stream ends or its client leaves) frees it.
#[derive(Debug)]
pub struct StreamSlot {
    id: String,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

impl StreamSlots {
    pub fn new(max: usize) -> StreamSlots {
        StreamSlots { max, open: Default::default() }
    }

    /// A slot for one more stream of token `id`, or `Err(max)` when it holds them all.
    pub fn take(&self, id: &str) -> Result<StreamSlot, usize> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(id.to_string()).or_insert(0);
        if self.max > 0 && *n >= self.max {
            return Err(self.max);
        }
        *n += 1;
        Ok(StreamSlot { id: id.to_string(), open: self.open.clone() })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.id);
            }
        }
    }
}

/// Middleware: authenticate, authorize by role, rate limit.
pub async fn authorize(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let Some(needed) = required_role(req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    let Some(presented) = presented_token(req.headers(), req.uri().query()) else {
        return ApiError::Unauthorized("missing api token: send `Authorization: Bearer <token>`".to_string())
            .into_response();
    };
    let caller = match verify(&state.tokens, &presented).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let (have, need) = (gateway::role_rank(&caller.role).unwrap_or(0), gateway::role_rank(needed).unwrap_or(u8::MAX));
    if have < need {
        return ApiError::Forbidden(format!(
            "token {} has role {}; {} {} needs {needed}",
            caller.id,
            caller.role,
            req.method(),
            req.uri().path()
        ))
        .into_response();
    }
    if let Err(wait) = state.limiter.check(&caller.id) {
        return ApiError::TooManyRequests(
            format!("rate limit of token {} exceeded; retry in {wait}s", caller.id),
            wait,
        )
        .into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// Middleware: CORS for the configured origins (`*` = any). Preflights are answered here.
pub async fn cors(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let origin = req.headers().get(header::ORIGIN).cloned();
    let allowed = origin.as_ref().and_then(|o| {
        let o = o.to_str().ok()?;
        state.cors_origins.iter().any(|a| a == "*" || a == o).then(|| HeaderValue::from_str(o).ok()).flatten()
    });
    let preflight =
        req.method() == Method::OPTIONS && req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut resp = if preflight {
        if allowed.is_none() {
            return ApiError::Forbidden("origin is not allowed by the gateway's cors configuration".to_string())
                .into_response();
        }
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(req).await
    };
    if let Some(origin) = allowed {
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, HEAD, POST, DELETE, OPTIONS"));
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type, range, last-event-id"),
        );
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("content-range, content-length, accept-ranges, etag"),
        );
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_slots_are_counted_per_token_and_freed_on_drop() {
        let slots = StreamSlots::new(2);
        let a1 = slots.take("a").unwrap();
        let _a2 = slots.take("a").unwrap();
        assert_eq!(slots.take("a").unwrap_err(), 2);
        let _b = slots.take("b").unwrap();
        drop(a1);
        let _a3 = slots.take("a").unwrap();
        let unlimited = StreamSlots::new(0);
        let many: Vec<_> = (0..100).map(|_| unlimited.take("a").unwrap()).collect();
        assert_eq!(many.len(), 100);
    }

    #[test]
    fn roles_per_route() {
        assert_eq!(required_role(&Method::GET, "/"), None);
        assert_eq!(required_role(&Method::GET, "/api/openapi.json"), None);
        assert_eq!(required_role(&Method::GET, "/api/v1/units"), Some(role::READER));
        assert_eq!(required_role(&Method::POST, "/api/v1/units"), Some(role::WRITER));
        assert_eq!(required_role(&Method::GET, "/api/v1/status"), Some(role::ADMIN));
        assert_eq!(required_role(&Method::GET, "/api/v1/nodes"), Some(role::ADMIN));
        assert_eq!(required_role(&Method::GET, "/api/nope"), Some(role::READER));
        assert_eq!(required_role(&Method::GET, "/api/v1/pipelines"), Some(role::READER));
        assert_eq!(required_role(&Method::POST, "/api/v1/pipelines"), Some(role::ADMIN));
        assert_eq!(required_role(&Method::DELETE, "/api/v1/pipelines/x"), Some(role::ADMIN));
        assert_eq!(required_role(&Method::POST, "/api/v1/pipelines/x/runs"), Some(role::WRITER));
        assert_eq!(required_role(&Method::GET, "/api/v1/runs/r"), Some(role::READER));
        assert_eq!(required_role(&Method::POST, "/api/v1/runs/r/cancel"), Some(role::WRITER));
    }

    #[test]
    fn tokens_from_header_or_query() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_token(&h, Some("a=1&access_token=cimt_a_b")), Some("cimt_a_b".into()));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer cimt_x_y"));
        assert_eq!(presented_token(&h, None), Some("cimt_x_y".into()));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(presented_token(&h, None), None);
    }

    #[test]
    fn rate_limit_refills() {
        let l = RateLimiter::new(1);
        assert!(l.check("a").is_ok());
        assert!(l.check("a").is_ok());
        assert!(l.check("a").is_err());
        assert!(l.check("b").is_ok());
        assert!(RateLimiter::new(0).check("a").is_ok());
    }
}
