//! The HTTP/JSON API: the router, the OpenAPI document, the web UI (`crate::ui`) and `whoami`,
//! the headers every response carries and the JSON body of every error, the validation of what
//! requests carry, and requests on the services' contracts.
//!
//! The routes are split by resource over submodules: `units` (over `cim-iu-client`, streamed
//! upload and ranged download), `cluster` (components, nodes and status over the registry's
//! queries, plugins over the plugin host's), `pipelines` (pipelines and runs over the pipeline
//! engine's JSON commands and queries), `events` (live events as SSE), `dead_letters` (a
//! component's dead-letter stream).

mod cluster;
mod dead_letters;
mod events;
mod pipelines;
mod units;

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    Router,
    body::{Body, to_bytes},
    extract::Request,
    http::{HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use prost::Message;
use serde_json::{Value, json};

use crate::{AppState, auth, error::ApiError};

pub use self::units::parse_range;
use self::{
    cluster::{components, nodes, plugins, status},
    dead_letters::dead_letters,
    events::events,
    pipelines::{
        apply_pipeline, cancel_run, get_pipeline, get_run, list_pipelines, list_runs, remove_pipeline, retry_run,
        start_run,
    },
    units::{create_unit, download, get_unit, history, link, links, list_units, new_version, tag},
};

static OPENAPI: &str = include_str!("openapi.json");

type ApiResult = Result<Response, ApiError>;

/// The whole router, with auth, CORS and limits applied.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/api/openapi.json", get(openapi))
        .route("/api/v1/whoami", get(whoami))
        .route("/api/v1/units", get(list_units).post(create_unit))
        .route("/api/v1/units/{id}", get(get_unit))
        .route("/api/v1/units/{id}/history", get(history))
        .route("/api/v1/units/{id}/links", get(links).post(link))
        .route("/api/v1/units/{id}/tags", post(tag))
        .route("/api/v1/units/{id}/versions", post(new_version))
        .route("/api/v1/units/{id}/content", get(download))
        .route("/api/v1/components", get(components))
        .route("/api/v1/nodes", get(nodes))
        .route("/api/v1/status", get(status))
        .route("/api/v1/plugins", get(plugins))
        .route("/api/v1/pipelines", get(list_pipelines).post(apply_pipeline))
        .route("/api/v1/pipelines/{name}", get(get_pipeline).delete(remove_pipeline))
        .route("/api/v1/pipelines/{name}/runs", post(start_run))
        .route("/api/v1/runs", get(list_runs))
        .route("/api/v1/runs/{id}", get(get_run))
        .route("/api/v1/runs/{id}/cancel", post(cancel_run))
        .route("/api/v1/runs/{id}/retry", post(retry_run))
        .route("/api/v1/events", get(events))
        .route("/api/v1/dead-letters", get(dead_letters))
        .fallback(ui_or_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Outermost of the per-route layers, so it counts refusals by auth too.
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::authorize))
        .layer(axum::middleware::from_fn_with_state(state.clone(), measure))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::cors))
        .layer(axum::middleware::from_fn(harden))
        .with_state(state)
}

/// Middleware, outermost: every response says `nosniff`, may not be framed, sends no referrer
/// and has a Content-Security-Policy (the app's on the UI's files, nothing allowed on the rest);
/// every error has a JSON body `{"error", "status"}`, also those that axum's extractors or
/// layers produce as plain text or with no body at all.
async fn harden(req: Request, next: Next) -> Response {
    let mut resp = json_error(next.run(req).await).await;
    let h = resp.headers_mut();
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.entry(header::CONTENT_SECURITY_POLICY).or_insert(HeaderValue::from_static(crate::ui::CSP_API));
    resp
}

/// Middleware: HTTP requests on the runtime's metrics, by route (`GET /api/v1/units/{id}`; one
/// label for everything outside the routes, so paths cannot grow the label set): `cim_requests`
/// and `cim_request_duration_seconds` by route, `cim_request_errors` by route and status.
/// `Router::layer` wraps each route, so the matched route is known here.
async fn measure(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let route = req.extensions().get::<axum::extract::MatchedPath>().map(|p| p.as_str().to_string());
    let endpoint = format!("http {} {}", req.method(), route.as_deref().unwrap_or("(other)"));
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    let m = &state.metrics;
    let labels = cim_runtime::metrics::EndpointLabels { endpoint };
    m.requests.get_or_create(&labels).inc();
    m.latency.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
    let status = resp.status();
    if status.is_client_error() || status.is_server_error() {
        let labels =
            cim_runtime::metrics::EndpointLabels { endpoint: format!("{} {}", labels.endpoint, status.as_u16()) };
        m.errors.get_or_create(&labels).inc();
    }
    resp
}

/// The largest non-JSON error body that is carried over into the JSON one.
const ERROR_TEXT_LIMIT: usize = 16 * 1024;

async fn json_error(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = to_bytes(body, ERROR_TEXT_LIMIT).await.map(|b| String::from_utf8_lossy(&b).trim().to_string());
    let message = match text {
        Ok(t) if !t.is_empty() => t,
        _ => status.canonical_reason().unwrap_or("error").to_lowercase(),
    };
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    parts.headers.remove(header::CONTENT_LENGTH);
    let body = json!({ "error": message, "status": status.as_u16() }).to_string();
    Response::from_parts(parts, Body::from(body))
}

/// The UI's files for paths outside `/api/`, else 404.
async fn ui_or_not_found(req: Request) -> Response {
    let path = req.uri().path();
    if !path.starts_with("/api/")
        && let Some(r) = crate::ui::serve(req.method(), path)
    {
        return r;
    }
    not_found(req).await.into_response()
}

fn json_response(status: StatusCode, v: Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

async fn not_found(req: Request) -> ApiError {
    ApiError::NotFound(format!("no route {} {}", req.method(), req.uri().path()))
}

async fn method_not_allowed(req: Request) -> Response {
    let body =
        json!({ "error": format!("method {} is not allowed on {}", req.method(), req.uri().path()), "status": 405 });
    json_response(StatusCode::METHOD_NOT_ALLOWED, body)
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn whoami(req: Request) -> ApiResult {
    let caller =
        req.extensions().get::<auth::Caller>().cloned().ok_or_else(|| ApiError::Internal("no caller".into()))?;
    Ok(json_response(StatusCode::OK, json!({ "id": caller.id, "name": caller.name, "role": caller.role })))
}

// ---- validation ----

/// A unit id from a path: one subject token, printable ASCII.
fn unit_id(id: &str) -> Result<&str, ApiError> {
    cim_events::token::validate_token("unit id", id).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    Ok(id)
}

/// A unit name: no path separators, no `.`/`..`, no control characters, at most 255 bytes.
pub fn check_name(name: &str) -> Result<(), ApiError> {
    let bad = |why: &str| Err(ApiError::BadRequest(format!("name {:?} {why}", name.escape_debug().to_string())));
    if name.is_empty() {
        return bad("is empty");
    }
    if name.len() > 255 {
        return bad("is longer than 255 bytes");
    }
    if name.chars().any(char::is_control) {
        return bad("contains a control character");
    }
    if name.contains('/') || name.contains('\\') {
        return bad("contains a path separator");
    }
    if name == "." || name == ".." {
        return bad("is a path traversal");
    }
    Ok(())
}

fn check_label(what: &str, v: &str) -> Result<(), ApiError> {
    if v.is_empty() || v.len() > 255 || v.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(format!(
            "{what} {:?} must be 1 to 255 bytes without control characters",
            v.escape_debug().to_string()
        )));
    }
    Ok(())
}

/// Reads a JSON body of at most `limit` bytes.
async fn json_body(body: Body, limit: usize) -> Result<Value, ApiError> {
    let bytes = to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::TooLarge(format!("request body is larger than {limit} bytes")))?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::BadRequest(format!("malformed json: {e}")))
}

fn strings(v: &Value, field: &str) -> Result<Vec<String>, ApiError> {
    let err = || ApiError::BadRequest(format!("field {field:?} must be an array of strings"));
    let arr = v.get(field).and_then(Value::as_array).ok_or_else(err)?;
    arr.iter().map(|s| s.as_str().map(str::to_string).ok_or_else(err)).collect()
}

fn string(v: &Value, field: &str) -> Result<String, ApiError> {
    v.get(field)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| ApiError::BadRequest(format!("field {field:?} must be a string")))
}

fn expected_version(q: &HashMap<String, String>) -> Result<u64, ApiError> {
    q.get("expected_version").map_or(Ok(0), |v| {
        v.parse().map_err(|_| ApiError::BadRequest(format!("expected_version {v:?} is not a number")))
    })
}

// ---- requests on service contracts ----

/// Sends one request on a service's contract; no responders → 503, no answer in time → 504,
/// and the micro protocol's error headers (`Nats-Service-Error-Code` 400/404/409/503) → the
/// same HTTP status with the service's message.
async fn send(
    s: &AppState,
    subject: Result<String, cim_events::ContractError>,
    payload: bytes::Bytes,
    who: &str,
) -> Result<bytes::Bytes, ApiError> {
    let subject = subject.map_err(|e| ApiError::Internal(e.to_string()))?;
    let req = async_nats::Request::new().payload(payload).timeout(Some(Duration::from_secs(10)));
    let msg = s.nats.send_request(subject.clone(), req).await.map_err(|e| match e.kind() {
        async_nats::RequestErrorKind::NoResponders => ApiError::Unavailable(format!("no {who} answers on {subject}")),
        async_nats::RequestErrorKind::TimedOut => {
            ApiError::Timeout(format!("{who} did not answer on {subject} in time"))
        }
        _ => ApiError::BadGateway(format!("request on {subject}: {e}")),
    })?;
    if let Some(e) = cim_iu_client::IuError::from_reply_headers(msg.headers.as_ref()) {
        return Err(e.into());
    }
    Ok(msg.payload)
}

async fn request<Q: Message, R: Message + Default>(
    s: &AppState,
    subject: Result<String, cim_events::ContractError>,
    q: &Q,
    who: &str,
) -> Result<R, ApiError> {
    let payload = send(s, subject, q.encode_to_vec().into(), who).await?;
    R::decode(payload).map_err(|e| ApiError::BadGateway(format!("undecodable reply of {who}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    /// Every route is in the OpenAPI document, with the role `auth::required_role` enforces.
    #[test]
    fn openapi_documents_every_route_with_its_role() {
        let doc: Value = serde_json::from_str(OPENAPI).unwrap();
        let routes = [
            ("get", "/api/v1/whoami", "/api/v1/whoami"),
            ("get", "/api/v1/units", "/api/v1/units"),
            ("post", "/api/v1/units", "/api/v1/units"),
            ("get", "/api/v1/units/{id}", "/api/v1/units/u"),
            ("get", "/api/v1/units/{id}/history", "/api/v1/units/u/history"),
            ("get", "/api/v1/units/{id}/links", "/api/v1/units/u/links"),
            ("post", "/api/v1/units/{id}/links", "/api/v1/units/u/links"),
            ("post", "/api/v1/units/{id}/tags", "/api/v1/units/u/tags"),
            ("post", "/api/v1/units/{id}/versions", "/api/v1/units/u/versions"),
            ("get", "/api/v1/units/{id}/content", "/api/v1/units/u/content"),
            ("get", "/api/v1/components", "/api/v1/components"),
            ("get", "/api/v1/nodes", "/api/v1/nodes"),
            ("get", "/api/v1/status", "/api/v1/status"),
            ("get", "/api/v1/plugins", "/api/v1/plugins"),
            ("get", "/api/v1/pipelines", "/api/v1/pipelines"),
            ("post", "/api/v1/pipelines", "/api/v1/pipelines"),
            ("get", "/api/v1/pipelines/{name}", "/api/v1/pipelines/p"),
            ("delete", "/api/v1/pipelines/{name}", "/api/v1/pipelines/p"),
            ("post", "/api/v1/pipelines/{name}/runs", "/api/v1/pipelines/p/runs"),
            ("get", "/api/v1/runs", "/api/v1/runs"),
            ("get", "/api/v1/runs/{id}", "/api/v1/runs/r"),
            ("post", "/api/v1/runs/{id}/cancel", "/api/v1/runs/r/cancel"),
            ("post", "/api/v1/runs/{id}/retry", "/api/v1/runs/r/retry"),
            ("get", "/api/v1/events", "/api/v1/events"),
            ("get", "/api/v1/dead-letters", "/api/v1/dead-letters"),
        ];
        for (method, template, concrete) in routes {
            let op = &doc["paths"][template][method];
            assert!(op.is_object(), "{method} {template} is not documented");
            let m: axum::http::Method = method.to_uppercase().parse().unwrap();
            assert_eq!(op["x-cim-role"].as_str(), auth::required_role(&m, concrete), "{method} {template}");
        }
        let documented: usize = doc["paths"].as_object().unwrap().values().map(|p| p.as_object().unwrap().len()).sum();
        assert_eq!(documented, routes.len(), "the document has operations the router does not");
    }

    #[test]
    fn names() {
        assert!(check_name("report.pdf").is_ok());
        assert!(check_name("..").is_err());
        assert!(check_name("../etc/passwd").is_err());
        assert!(check_name("a\\b").is_err());
        assert!(check_name("a\nb").is_err());
        assert!(check_name("").is_err());
        assert!(unit_id("a.b").is_err());
    }
}
