//! The HTTP/JSON API: units (over `cim-iu-client`), components, nodes and status (over the
//! registry's queries), plugins (over the plugin host's), pipelines and runs (over the pipeline
//! engine's JSON commands and queries), live events (SSE) and the OpenAPI document.

use std::{collections::HashMap, convert::Infallible, io, sync::Arc, time::Duration};

use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use axum::{
    Router,
    body::{Body, to_bytes},
    extract::{Path, Query, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response, sse},
    routing::{get, post},
};
use cim_events::{
    Component,
    pipeline::{
        self as pl, ApplyReply, ApplyRequest, PipelineInfo, PipelineList, PipelineRef, RemoveRequest, RunInfo, RunList,
        RunRef, RunsRequest, StartRequest,
    },
    plugin,
    proto::{
        iu::{CreateUnit, GetUnit, Link, LinkUnit, ListUnits, NewVersion, TagUnit},
        plugin::{ListPlugins, ListReply},
        registry::{GetOverview, Instance, InstanceList, ListInstances, ListNodes, Node, NodeList, Overview},
    },
    registry, resources, subject,
};
use cim_iu_client::{NoProgress, json::ToJson};
use futures::{StreamExt, TryStreamExt};
use prost::Message;
use serde_json::{Value, json};
use tokio::io::AsyncRead;

use crate::{AppState, auth, error::ApiError};

static OPENAPI: &str = include_str!("openapi.json");
static INDEX_HTML: &str = include_str!("ui/index.html");

type ApiResult = Result<Response, ApiError>;

/// The whole router, with auth, CORS and limits applied.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(index))
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
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::authorize))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::cors))
        .with_state(state)
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

async fn index() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX_HTML).into_response()
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

// ---- units ----

async fn list_units(State(s): State<Arc<AppState>>, Query(q): Query<HashMap<String, String>>) -> ApiResult {
    let num = |k: &str| -> Result<i64, ApiError> {
        q.get(k).map_or(Ok(0), |v| v.parse().map_err(|_| ApiError::BadRequest(format!("{k} {v:?} is not a number"))))
    };
    let query = ListUnits {
        unit_type: q.get("type").cloned().unwrap_or_default(),
        tag: q.get("tag").cloned().unwrap_or_default(),
        name_prefix: q.get("name_prefix").cloned().unwrap_or_default(),
        since_ms: num("since_ms")?,
        until_ms: num("until_ms")?,
        page_size: num("page_size")?.clamp(0, 1000) as u32,
        page_token: q.get("page_token").cloned().unwrap_or_default(),
        include_deleted: q.get("include_deleted").is_some_and(|v| v == "true"),
    };
    Ok(json_response(StatusCode::OK, s.iu.list(query).await?.to_json()))
}

async fn get_unit(
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let at_version = q
        .get("at_version")
        .map_or(Ok(0), |v| v.parse().map_err(|_| ApiError::BadRequest(format!("at_version {v:?} is not a number"))))?;
    let unit = s.iu.get_unit(GetUnit { unit_id: unit_id(&id)?.to_string(), at_version, ..Default::default() }).await?;
    Ok(json_response(StatusCode::OK, unit.to_json()))
}

async fn history(State(s): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult {
    Ok(json_response(StatusCode::OK, s.iu.history(unit_id(&id)?).await?.to_json()))
}

async fn links(State(s): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult {
    Ok(json_response(StatusCode::OK, s.iu.links(unit_id(&id)?).await?.to_json()))
}

async fn tag(
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    body: Body,
) -> ApiResult {
    let id = unit_id(&id)?.to_string();
    let v = json_body(body, s.limits.max_json).await?;
    let tags = strings(&v, "tags")?;
    for t in &tags {
        check_label("tag", t)?;
    }
    let r = s.iu.tag(TagUnit { header: cim_iu_client::header(expected_version(&q)?), unit_id: id, tags }).await?;
    Ok(json_response(StatusCode::OK, r.to_json()))
}

async fn link(
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    body: Body,
) -> ApiResult {
    let id = unit_id(&id)?.to_string();
    let v = json_body(body, s.limits.max_json).await?;
    let (kind, target) = (string(&v, "kind")?, string(&v, "target")?);
    check_label("link kind", &kind)?;
    unit_id(&target)?;
    let r =
        s.iu.link(LinkUnit {
            header: cim_iu_client::header(expected_version(&q)?),
            unit_id: id,
            link: Some(Link { kind, target }),
        })
        .await?;
    Ok(json_response(StatusCode::OK, r.to_json()))
}

/// Reads the request body as a stream, failing once more than `limit` bytes arrived.
struct Limited<R> {
    inner: R,
    read: u64,
    limit: u64,
    exceeded: Arc<std::sync::atomic::AtomicBool>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Limited<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = r {
            self.read += (buf.filled().len() - before) as u64;
            if self.read > self.limit {
                self.exceeded.store(true, std::sync::atomic::Ordering::SeqCst);
                return std::task::Poll::Ready(Err(io::Error::other("upload is larger than the limit")));
            }
        }
        r
    }
}

/// Streams the request body into the content bucket and commits it; nothing is buffered
/// beyond one chunk. Returns the CID.
async fn upload_body(s: &AppState, headers: &HeaderMap, body: Body) -> Result<String, ApiError> {
    let limit = s.limits.max_upload;
    let too_large = || ApiError::TooLarge(format!("upload is larger than the limit of {limit} bytes"));
    if let Some(len) =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())
        && len > limit
    {
        return Err(too_large());
    }
    let stream = body.into_data_stream().map_err(io::Error::other);
    let exceeded = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader =
        Limited { inner: tokio_util::io::StreamReader::new(stream), read: 0, limit, exceeded: exceeded.clone() };
    match s.iu.put_content(reader, &mut NoProgress).await {
        Ok(c) => Ok(c.cid),
        Err(_) if exceeded.load(std::sync::atomic::Ordering::SeqCst) => Err(too_large()),
        Err(e) => Err(e.into()),
    }
}

async fn create_unit(
    State(s): State<Arc<AppState>>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let name = q.get("name").cloned().ok_or_else(|| ApiError::BadRequest("query parameter name is required".into()))?;
    check_name(&name)?;
    let media_type = match q.get("media_type") {
        Some(m) => m.clone(),
        None => headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .unwrap_or_else(|| cim_iu_client::guess_media_type(std::path::Path::new(&name)).to_string()),
    };
    check_label("media type", &media_type)?;
    let tags: Vec<String> =
        q.get("tags").map(|t| t.split(',').filter(|t| !t.is_empty()).map(str::to_string).collect()).unwrap_or_default();
    for t in &tags {
        check_label("tag", t)?;
    }
    let unit_type = q.get("type").cloned().unwrap_or_default();
    let cid = upload_body(&s, &headers, body).await?;
    let r =
        s.iu.create(CreateUnit {
            header: cim_iu_client::header(0),
            cid,
            name,
            media_type,
            unit_type,
            tags,
            ..Default::default()
        })
        .await?;
    Ok(json_response(StatusCode::CREATED, r.to_json()))
}

async fn new_version(
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let id = unit_id(&id)?.to_string();
    let name = q.get("name").cloned().unwrap_or_default();
    if !name.is_empty() {
        check_name(&name)?;
    }
    let expected = expected_version(&q)?;
    let cid = upload_body(&s, &headers, body).await?;
    let r =
        s.iu.new_version(NewVersion {
            header: cim_iu_client::header(expected),
            unit_id: id,
            cid,
            name,
            media_type: q.get("media_type").cloned().unwrap_or_default(),
        })
        .await?;
    Ok(json_response(StatusCode::CREATED, r.to_json()))
}

/// Parses `bytes=a-b`, `bytes=a-` or `bytes=-n` against `size`; `end` exclusive.
pub fn parse_range(v: &str, size: u64) -> Result<(u64, u64), ApiError> {
    let bad = || ApiError::RangeNotSatisfiable(format!("range {v:?} is not satisfiable for {size} bytes"), size);
    let spec = v.trim().strip_prefix("bytes=").ok_or_else(bad)?;
    if spec.contains(',') {
        return Err(ApiError::RangeNotSatisfiable("multiple ranges are not supported".into(), size));
    }
    let (a, b) = spec.split_once('-').ok_or_else(bad)?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().map_err(|_| bad())?;
            (size.saturating_sub(n), size)
        }
        (a, "") => (a.parse().map_err(|_| bad())?, size),
        (a, b) => {
            let (a, b): (u64, u64) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
            if b < a {
                return Err(bad());
            }
            (a, (b + 1).min(size))
        }
    };
    if start >= size || start >= end {
        return Err(bad());
    }
    Ok((start, end))
}

/// Streams a unit's content (`?version=` for an older one); honours `Range`.
async fn download(
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> ApiResult {
    let at_version = q
        .get("version")
        .map_or(Ok(0), |v| v.parse().map_err(|_| ApiError::BadRequest(format!("version {v:?} is not a number"))))?;
    let unit = s.iu.get_unit(GetUnit { unit_id: unit_id(&id)?.to_string(), at_version, ..Default::default() }).await?;
    if unit.cid.is_empty() {
        return Err(ApiError::NotFound(format!("unit {id} has no content")));
    }
    let size = s.iu.content_size(&unit.cid).await?;
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(r) => Some(parse_range(r, size)?),
        None => None,
    };
    let (reader, writer) = tokio::io::duplex(256 * 1024);
    let iu = s.iu.clone();
    let cid = unit.cid.clone();
    tokio::spawn(async move {
        let mut writer = writer;
        if let Err(e) = iu.get_content(&cid, range, &mut writer, &mut NoProgress).await {
            tracing::warn!(cid = %cid, error = %e, "download failed midway");
            // Dropping the writer early ends the body short of its length: the client sees an error.
        }
    });
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(reader, 128 * 1024));
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    let media = if unit.media_type.is_empty() { cim_iu_client::OCTET_STREAM } else { &unit.media_type };
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(media).unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", unit.cid)) {
        h.insert(header::ETAG, v);
    }
    let disposition = format!("attachment; filename=\"{}\"", unit.name.replace(['"', '\\'], "_"));
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    match range {
        Some((a, b)) => {
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            let h = resp.headers_mut();
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(b - a));
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {a}-{}/{size}", b - 1)) {
                h.insert(header::CONTENT_RANGE, v);
            }
        }
        None => {
            resp.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        }
    }
    Ok(resp)
}

// ---- registry and plugins ----

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

fn instance_json(i: &Instance) -> Value {
    json!({
        "instance_id": i.instance_id, "component": i.component, "service": i.service, "version": i.version,
        "node": i.node, "capabilities": i.capabilities, "subjects": i.subjects, "http_addr": i.http_addr,
        "state": i.state().as_str_name(), "incompatible": i.incompatible,
        "registered_ms": i.registered_ms, "changed_ms": i.changed_ms,
    })
}

fn node_json(n: &Node) -> Value {
    json!({
        "name": n.name, "memory_bytes": n.memory_bytes, "reserved_bytes": n.reserved_bytes, "cpus": n.cpus,
        "labels": n.labels.iter().collect::<std::collections::BTreeMap<_, _>>(), "state": n.state().as_str_name(),
        "jetstream_server": n.jetstream_server, "changed_ms": n.changed_ms, "reason": n.reason,
    })
}

async fn components(State(s): State<Arc<AppState>>, Query(q): Query<HashMap<String, String>>) -> ApiResult {
    let query = ListInstances {
        component: q.get("component").cloned().unwrap_or_default(),
        capability: q.get("capability").cloned().unwrap_or_default(),
        node: q.get("node").cloned().unwrap_or_default(),
        include_gone: q.get("include_gone").is_some_and(|v| v == "true"),
    };
    let r: InstanceList = request(&s, registry::query(registry::qry::INSTANCES), &query, "registry").await?;
    Ok(json_response(StatusCode::OK, json!({ "instances": r.instances.iter().map(instance_json).collect::<Vec<_>>() })))
}

async fn nodes(State(s): State<Arc<AppState>>, Query(q): Query<HashMap<String, String>>) -> ApiResult {
    let query = ListNodes { include_decommissioned: q.get("include_decommissioned").is_some_and(|v| v == "true") };
    let r: NodeList = request(&s, registry::query(registry::qry::NODES), &query, "registry").await?;
    Ok(json_response(StatusCode::OK, json!({ "nodes": r.nodes.iter().map(node_json).collect::<Vec<_>>() })))
}

async fn status(State(s): State<Arc<AppState>>) -> ApiResult {
    let r: Overview =
        request(&s, registry::query(registry::qry::OVERVIEW), &GetOverview { deep: false }, "registry").await?;
    Ok(json_response(
        StatusCode::OK,
        json!({
            "instances": r.instances.iter().map(instance_json).collect::<Vec<_>>(),
            "nodes": r.nodes.iter().map(node_json).collect::<Vec<_>>(),
            "desired": r.desired.iter().map(|d| json!({ "service": d.service, "replicas": d.replicas })).collect::<Vec<_>>(),
            "desired_is_default": r.desired_is_default,
            "problems": r.problems.iter().map(|p| json!({ "subject": p.subject, "reason": p.reason })).collect::<Vec<_>>(),
            "converged": r.problems.is_empty(),
            "registry_instance": r.registry_instance,
        }),
    ))
}

async fn plugins(State(s): State<Arc<AppState>>, Query(q): Query<HashMap<String, String>>) -> ApiResult {
    let query = ListPlugins {
        name: q.get("name").cloned().unwrap_or_default(),
        capability: q.get("capability").cloned().unwrap_or_default(),
    };
    let r: ListReply = request(&s, plugin::query(plugin::qry::LIST), &query, "plugin host").await?;
    let list: Vec<Value> = r
        .plugins
        .iter()
        .map(|p| {
            json!({
                "name": p.name, "version": p.version, "digest": p.digest, "size": p.size, "capabilities": p.capabilities,
                "runtime": p.runtime, "subject": p.subject, "state": p.state, "description": p.description,
            })
        })
        .collect();
    Ok(json_response(StatusCode::OK, json!({ "plugins": list })))
}

// ---- pipelines and runs ----

const ENGINE: &str = "pipeline engine";

/// A JSON request on the pipeline engine's contract (`cim_events::pipeline`); the reply is
/// checked against its contract type, so what the API returns is what the contract says.
macro_rules! engine_call {
    ($s:expr, $subject:expr, $body:expr, $reply:ty) => {{
        let body = serde_json::to_vec(&$body).map_err(|e| ApiError::Internal(e.to_string()))?;
        let payload = send(&$s, $subject, body.into(), ENGINE).await?;
        serde_json::from_slice::<$reply>(&payload)
            .map_err(|e| ApiError::BadGateway(format!("undecodable reply of the {ENGINE}: {e}")))?
    }};
}

/// A contract type as the JSON response.
macro_rules! contract_json {
    ($status:expr, $v:expr) => {
        json_response($status, serde_json::to_value($v).map_err(|e| ApiError::Internal(e.to_string()))?)
    };
}

fn pipeline_name(name: &str) -> Result<&str, ApiError> {
    pl::validate_name(name).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    Ok(name)
}

fn run_id(id: &str) -> Result<&str, ApiError> {
    cim_events::token::validate_token("run id", id).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    Ok(id)
}

/// An optional JSON object body (empty = `{}`) with only the `allowed` fields.
async fn optional_object(
    body: Body,
    limit: usize,
    allowed: &[&str],
) -> Result<serde_json::Map<String, Value>, ApiError> {
    let bytes = to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::TooLarge(format!("request body is larger than {limit} bytes")))?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Map::new());
    }
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| ApiError::BadRequest(format!("malformed json: {e}")))?;
    let Value::Object(m) = v else { return Err(ApiError::BadRequest("the body must be a json object".into())) };
    if let Some(k) = m.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ApiError::BadRequest(format!("unknown field {k:?} (allowed: {})", allowed.join(", "))));
    }
    Ok(m)
}

fn optional_string(m: &serde_json::Map<String, Value>, field: &str) -> Result<String, ApiError> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(ApiError::BadRequest(format!("field {field:?} must be a string"))),
    }
}

async fn list_pipelines(State(s): State<Arc<AppState>>) -> ApiResult {
    let r = engine_call!(s, pl::query(pl::qry::LIST), json!({}), PipelineList);
    Ok(contract_json!(StatusCode::OK, r))
}

async fn get_pipeline(State(s): State<Arc<AppState>>, Path(name): Path<String>) -> ApiResult {
    let req = PipelineRef { name: pipeline_name(&name)?.to_string() };
    let r = engine_call!(s, pl::query(pl::qry::GET), req, PipelineInfo);
    Ok(contract_json!(StatusCode::OK, r))
}

/// `POST /api/v1/pipelines` (body: the definition): validated and recorded by the engine;
/// 201 when a new version was written, 200 when it was unchanged.
async fn apply_pipeline(State(s): State<Arc<AppState>>, body: Body) -> ApiResult {
    let definition = json_body(body, s.limits.max_json).await?;
    if !definition.is_object() {
        return Err(ApiError::BadRequest("the body must be a pipeline definition (a json object)".into()));
    }
    let r = engine_call!(s, pl::command(pl::cmd::APPLY), ApplyRequest { definition }, ApplyReply);
    let status = if r.unchanged { StatusCode::OK } else { StatusCode::CREATED };
    Ok(json_response(status, json!({ "name": r.name, "version": r.version, "unchanged": r.unchanged })))
}

async fn remove_pipeline(
    State(s): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let req =
        RemoveRequest { name: pipeline_name(&name)?.to_string(), reason: q.get("reason").cloned().unwrap_or_default() };
    let r = engine_call!(s, pl::command(pl::cmd::REMOVE), req, ApplyReply);
    Ok(json_response(StatusCode::OK, json!({ "name": r.name, "version": r.version, "unchanged": r.unchanged })))
}

/// `POST /api/v1/pipelines/{name}/runs` (body optional: `{"unit_id", "params": {k: v}}`): a manual run.
async fn start_run(State(s): State<Arc<AppState>>, Path(name): Path<String>, body: Body) -> ApiResult {
    let pipeline = pipeline_name(&name)?.to_string();
    let m = optional_object(body, s.limits.max_json, &["unit_id", "params"]).await?;
    let unit = optional_string(&m, "unit_id")?;
    if !unit.is_empty() {
        unit_id(&unit)?;
    }
    let mut params = std::collections::BTreeMap::new();
    match m.get("params") {
        None | Some(Value::Null) => {}
        Some(Value::Object(p)) => {
            for (k, v) in p {
                check_label("param name", k)?;
                let v = v.as_str().ok_or_else(|| ApiError::BadRequest(format!("param {k:?} must be a string")))?;
                params.insert(k.clone(), v.to_string());
            }
        }
        Some(_) => return Err(ApiError::BadRequest("field \"params\" must be an object of strings".into())),
    }
    let r = engine_call!(s, pl::command(pl::cmd::START), StartRequest { pipeline, unit_id: unit, params }, RunRef);
    Ok(json_response(StatusCode::CREATED, json!({ "run_id": r.run_id })))
}

async fn list_runs(State(s): State<Arc<AppState>>, Query(q): Query<HashMap<String, String>>) -> ApiResult {
    let mut req = RunsRequest::default();
    if let Some(p) = q.get("pipeline").filter(|p| !p.is_empty()) {
        req.pipeline = pipeline_name(p)?.to_string();
    }
    if let Some(st) = q.get("state").filter(|st| !st.is_empty()) {
        if !pl::RUN_STATES.contains(&st.as_str()) {
            return Err(ApiError::BadRequest(format!("state {st:?} is not one of {}", pl::RUN_STATES.join(", "))));
        }
        req.state = st.clone();
    }
    if let Some(u) = q.get("unit_id").filter(|u| !u.is_empty()) {
        req.unit_id = unit_id(u)?.to_string();
    }
    if let Some(l) = q.get("limit") {
        req.limit =
            l.parse::<u32>().map_err(|_| ApiError::BadRequest(format!("limit {l:?} is not a number")))?.min(1000);
    }
    let r = engine_call!(s, pl::query(pl::qry::RUNS), req, RunList);
    Ok(contract_json!(StatusCode::OK, r))
}

async fn get_run(State(s): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult {
    let req = RunRef { run_id: run_id(&id)?.to_string(), reason: String::new() };
    let r = engine_call!(s, pl::query(pl::qry::RUN), req, RunInfo);
    Ok(contract_json!(StatusCode::OK, r))
}

/// Cancel or retry (body optional: `{"reason"}`); the engine refuses with 409 what the run's
/// state does not allow (cancel of an ended run, retry of one that neither failed nor was cancelled).
async fn change_run(s: &AppState, id: &str, body: Body, command: &str) -> ApiResult {
    let run_id = run_id(id)?.to_string();
    let m = optional_object(body, s.limits.max_json, &["reason"]).await?;
    let reason = optional_string(&m, "reason")?;
    let r = engine_call!(s, pl::command(command), RunRef { run_id, reason }, RunInfo);
    Ok(contract_json!(StatusCode::OK, r))
}

async fn cancel_run(State(s): State<Arc<AppState>>, Path(id): Path<String>, body: Body) -> ApiResult {
    change_run(&s, &id, body, pl::cmd::CANCEL).await
}

async fn retry_run(State(s): State<Arc<AppState>>, Path(id): Path<String>, body: Body) -> ApiResult {
    change_run(&s, &id, body, pl::cmd::RETRY).await
}

// ---- live events ----

/// `GET /api/v1/events?component=iu&filter=<subject>`: the component's events as SSE, each
/// with its stream sequence as id. `Last-Event-ID` (or `?after=`) resumes after that sequence;
/// without it the stream starts with the next new event (`?after=0` replays from the start).
async fn events(
    State(s): State<Arc<AppState>>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> ApiResult {
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
        Some(seq) => DeliverPolicy::ByStartSequence { start_sequence: seq + 1 },
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
    let events = messages.take_until(stop).map(|m| -> Result<sse::Event, Infallible> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100).unwrap(), (0, 10));
        assert_eq!(parse_range("bytes=90-", 100).unwrap(), (90, 100));
        assert_eq!(parse_range("bytes=-10", 100).unwrap(), (90, 100));
        assert_eq!(parse_range("bytes=50-500", 100).unwrap(), (50, 100));
        assert!(parse_range("bytes=100-", 100).is_err());
        assert!(parse_range("bytes=5-1", 100).is_err());
        assert!(parse_range("items=0-1", 100).is_err());
        assert!(parse_range("bytes=0-1,3-4", 100).is_err());
    }

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
