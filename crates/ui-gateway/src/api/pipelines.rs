//! Pipelines and runs over the pipeline engine's JSON commands and queries; replies are
//! checked against their contract types.

use std::{collections::HashMap, sync::Arc};

use axum::{
    Extension,
    body::{Body, to_bytes},
    extract::{Path, Query, State},
    http::StatusCode,
};
use cim_events::pipeline::{
    self as pl, ApplyReply, ApplyRequest, PipelineInfo, PipelineList, PipelineRef, RemoveRequest, RunInfo, RunList,
    RunRef, RunsRequest, StartRequest,
};
use serde_json::{Value, json};

use super::{ApiResult, check_label, json_body, json_response, send, unit_id};
use crate::{AppState, error::ApiError};

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

pub(super) async fn list_pipelines(State(s): State<Arc<AppState>>) -> ApiResult {
    let r = engine_call!(s, pl::query(pl::qry::LIST), json!({}), PipelineList);
    Ok(contract_json!(StatusCode::OK, r))
}

pub(super) async fn get_pipeline(State(s): State<Arc<AppState>>, Path(name): Path<String>) -> ApiResult {
    let req = PipelineRef { name: pipeline_name(&name)?.to_string() };
    let r = engine_call!(s, pl::query(pl::qry::GET), req, PipelineInfo);
    Ok(contract_json!(StatusCode::OK, r))
}

/// `POST /api/v1/pipelines` (body: the definition): validated and recorded by the engine;
/// 201 when a new version was written, 200 when it was unchanged.
pub(super) async fn apply_pipeline(State(s): State<Arc<AppState>>, body: Body) -> ApiResult {
    let definition = json_body(body, s.limits.max_json).await?;
    if !definition.is_object() {
        return Err(ApiError::BadRequest("the body must be a pipeline definition (a json object)".into()));
    }
    let r = engine_call!(s, pl::command(pl::cmd::APPLY), ApplyRequest { definition }, ApplyReply);
    let status = if r.unchanged { StatusCode::OK } else { StatusCode::CREATED };
    Ok(json_response(status, json!({ "name": r.name, "version": r.version, "unchanged": r.unchanged })))
}

pub(super) async fn remove_pipeline(
    State(s): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let req =
        RemoveRequest { name: pipeline_name(&name)?.to_string(), reason: q.get("reason").cloned().unwrap_or_default() };
    let r = engine_call!(s, pl::command(pl::cmd::REMOVE), req, ApplyReply);
    Ok(json_response(StatusCode::OK, json!({ "name": r.name, "version": r.version, "unchanged": r.unchanged })))
}

/// `POST /api/v1/pipelines/{name}/runs` (body optional: `{"unit_id", "params": {k: v},
/// "request_id"}`): a manual run. A retry with the same `request_id` is answered with the run
/// the first one started.
pub(super) async fn start_run(
    State(s): State<Arc<AppState>>,
    Extension(caller): Extension<crate::auth::Caller>,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult {
    let pipeline = pipeline_name(&name)?.to_string();
    let m = optional_object(body, s.limits.max_json, &["unit_id", "params", "request_id"]).await?;
    let unit = optional_string(&m, "unit_id")?;
    let request_id = match optional_string(&m, "request_id")? {
        id if id.is_empty() => uuid::Uuid::now_v7().to_string(),
        id => {
            pl::start_msg_id(&id).map_err(|e| ApiError::BadRequest(e.to_string()))?;
            caller.own_request_id(&id)
        }
    };
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
    let r = engine_call!(
        s,
        pl::command(pl::cmd::START),
        StartRequest { pipeline, unit_id: unit, params, request_id },
        RunRef
    );
    Ok(json_response(StatusCode::CREATED, json!({ "run_id": r.run_id })))
}

pub(super) async fn list_runs(State(s): State<Arc<AppState>>, Query(q): Query<HashMap<String, String>>) -> ApiResult {
    let mut req = RunsRequest::default();
    if let Some(p) = q.get("pipeline").filter(|p| !p.is_empty()) {
        req.pipeline = pipeline_name(p)?.to_string();
    }
    if let Some(st) = q.get("state").filter(|st| !st.is_empty()) {
        if !cim_events::pipeline::RUN_STATES.contains(&st.as_str()) {
            return Err(ApiError::BadRequest(format!(
                "state {st:?} is not one of {}",
                cim_events::pipeline::RUN_STATES.join(", ")
            )));
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

pub(super) async fn get_run(State(s): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult {
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

pub(super) async fn cancel_run(State(s): State<Arc<AppState>>, Path(id): Path<String>, body: Body) -> ApiResult {
    change_run(&s, &id, body, pl::cmd::CANCEL).await
}

pub(super) async fn retry_run(State(s): State<Arc<AppState>>, Path(id): Path<String>, body: Body) -> ApiResult {
    change_run(&s, &id, body, pl::cmd::RETRY).await
}
