//! Names of the pipeline-engine contract (aggregates, actions, endpoints, consumers, buckets)
//! and the JSON bodies of its commands and queries. Events are protobuf
//! (`proto/cim/pipeline/v1/pipeline.proto`); definitions are documented in `docs/pipelines.md`.
//!
//! ```text
//! cim.evt.pipeline.pipeline.<name>.<applied|removed>      definitions, versioned
//! cim.evt.pipeline.run.<run-id>.<action>                  a run's history (requested … completed)
//! cim.cmd.pipeline.<apply|remove|start|cancel|retry>      JSON request → JSON reply
//! cim.qry.pipeline.<list|get|runs|run>                    JSON request → JSON reply
//! cim.dlq.pipeline.<triggers|runs>                        poison events and failed runs, with the reason
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Component, ContractError, subject};

const C: Component = Component::PipelineEngine;

/// Aggregate of definitions; its id is the pipeline name.
pub const PIPELINE: &str = "pipeline";
/// Aggregate of runs; its id is the run id (a UUIDv7).
pub const RUN: &str = "run";

/// Event actions (last subject token).
pub mod action {
    pub const APPLIED: &str = "applied";
    pub const REMOVED: &str = "removed";
    pub const REQUESTED: &str = "requested";
    pub const STARTED: &str = "started";
    pub const STEP_STARTED: &str = "step_started";
    pub const STEP_COMPLETED: &str = "step_completed";
    pub const STEP_FAILED: &str = "step_failed";
    pub const STEP_WAITING: &str = "step_waiting";
    pub const EMITTED: &str = "emitted";
    pub const COMPLETED: &str = "completed";
    pub const FAILED: &str = "failed";
    pub const CANCELLED: &str = "cancelled";
    pub const RETRIED: &str = "retried";
    pub const RUN_ALL: [&str; 11] = [
        REQUESTED,
        STARTED,
        STEP_STARTED,
        STEP_WAITING,
        STEP_COMPLETED,
        STEP_FAILED,
        EMITTED,
        COMPLETED,
        FAILED,
        CANCELLED,
        RETRIED,
    ];
}

/// Command endpoints (`cim.cmd.pipeline.<name>`).
pub mod cmd {
    pub const APPLY: &str = "apply";
    pub const REMOVE: &str = "remove";
    pub const START: &str = "start";
    pub const CANCEL: &str = "cancel";
    pub const RETRY: &str = "retry";
    pub const ALL: [&str; 5] = [APPLY, REMOVE, START, CANCEL, RETRY];
}

/// Query endpoints (`cim.qry.pipeline.<name>`).
pub mod qry {
    pub const LIST: &str = "list";
    pub const GET: &str = "get";
    pub const RUNS: &str = "runs";
    pub const RUN: &str = "run";
    pub const ALL: [&str; 4] = [LIST, GET, RUNS, RUN];
}

/// Dead-letter origins (`cim.dlq.pipeline.<origin>`).
pub const DLQ_TRIGGERS: &str = "triggers";
pub const DLQ_RUNS: &str = "runs";
/// Header of a dead letter that says why.
pub const H_DEAD_LETTER_REASON: &str = "cim-dead-letter-reason";
/// Header of a dead letter naming the subject the message had.
pub const H_ORIGINAL_SUBJECT: &str = "cim-original-subject";

/// KV bucket purpose of concurrency slots (`cim_pipeline_slots`): leases, not state.
pub const KV_SLOTS: &str = "slots";
/// How long a slot lease lives without being renewed (an engine killed mid-run frees it then).
pub const SLOT_TTL: std::time::Duration = std::time::Duration::from_secs(15);

/// Durable consumer of unit events that start runs (shared by every engine instance).
pub fn trigger_consumer() -> String {
    format!("{}-triggers", C.token())
}

/// Durable consumer of run work items (`requested`, `retried`), shared by every instance.
pub fn run_consumer() -> String {
    format!("{}-runs", C.token())
}

/// `cim.evt.pipeline.pipeline.<name>.<action>`.
pub fn pipeline_event(name: &str, action: &str) -> Result<String, ContractError> {
    validate_name(name)?;
    subject::event(C, PIPELINE, name, action)
}

/// `cim.evt.pipeline.pipeline.<name>.*`: one definition's history.
pub fn pipeline_history(name: &str) -> Result<String, ContractError> {
    validate_name(name)?;
    subject::aggregate_filter(C, PIPELINE, name)
}

/// `cim.evt.pipeline.run.<run-id>.<action>`.
/// `Nats-Msg-Id` of the run a manual start with `request_id` requested: JetStream drops a retry
/// within the retry horizon and names the first run's event.
pub fn start_msg_id(request_id: &str) -> Result<String, ContractError> {
    crate::token::validate_token("request id", request_id)?;
    Ok(format!("pipeline-start-{request_id}"))
}

pub fn run_event(run_id: &str, action: &str) -> Result<String, ContractError> {
    subject::event(C, RUN, run_id, action)
}

/// `cim.evt.pipeline.run.<run-id>.*`: one run's history.
pub fn run_history(run_id: &str) -> Result<String, ContractError> {
    subject::aggregate_filter(C, RUN, run_id)
}

/// `cim.evt.pipeline.run.*.<action>`: one kind of run event across all runs.
pub fn run_action(action: &str) -> Result<String, ContractError> {
    subject::action_filter(C, RUN, action)
}

pub fn command(name: &str) -> Result<String, ContractError> {
    subject::command(C, name)
}

pub fn query(name: &str) -> Result<String, ContractError> {
    subject::query(C, name)
}

pub fn dead_letter(origin: &str) -> Result<String, ContractError> {
    subject::dead_letter(C, origin)
}

/// KV key of slot `n` of pipeline `name`.
pub fn slot_key(name: &str, n: u32) -> Result<String, ContractError> {
    validate_name(name)?;
    Ok(format!("{name}.{n}"))
}

/// Referrer token of a pipeline in the plugin host's references bucket.
pub fn plugin_referrer(name: &str) -> Result<String, ContractError> {
    validate_name(name)?;
    Ok(format!("pipeline-{name}"))
}

/// Checks a pipeline name: `[a-z0-9][a-z0-9-]*`, 1-64 characters.
pub fn validate_name(name: &str) -> Result<(), ContractError> {
    crate::token::validate_slug("pipeline name", name)
}

// ---- JSON bodies of commands and queries ----

/// `apply`: the definition as a JSON value (a YAML/JSON file parsed by the caller).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ApplyRequest {
    pub definition: serde_json::Value,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApplyReply {
    pub name: String,
    pub version: u32,
    /// The same definition was already the current version: nothing was written.
    pub unchanged: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RemoveRequest {
    pub name: String,
    #[serde(default)]
    pub reason: String,
}

/// `start`: a manual run of `pipeline` about `unit_id` (optional) with parameters.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StartRequest {
    pub pipeline: String,
    #[serde(default)]
    pub unit_id: String,
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// Makes a retry of this start idempotent: it is answered with the run the first one
    /// started (clients send a fresh UUIDv7 and repeat it on every attempt).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub request_id: String,
}

/// `cancel`, `retry` and the `run` query name one run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RunRef {
    pub run_id: String,
    #[serde(default)]
    pub reason: String,
}

/// `get` names one pipeline.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PipelineRef {
    pub name: String,
}

/// Every state a run can be in (`RunInfo::state`, the `runs` filter), in the order a run moves
/// through them.
pub const RUN_STATES: [&str; 5] = ["queued", "running", "completed", "failed", "cancelled"];

/// `runs`: filters (all optional) and a limit (default 100, newest first).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RunsRequest {
    #[serde(default)]
    pub pipeline: String,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub unit_id: String,
    #[serde(default)]
    pub limit: u32,
}

/// One pipeline as the engine knows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PipelineInfo {
    pub name: String,
    pub version: u32,
    pub digest: String,
    /// False once removed.
    pub active: bool,
    pub definition: serde_json::Value,
    pub runs: RunCounts,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RunCounts {
    pub queued: u64,
    pub running: u64,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
}

/// One step of a run.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StepInfo {
    pub step: String,
    /// pending, running, waiting, retrying, completed, skipped, failed
    pub state: String,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// While `waiting`: what the attempt waits for (a plugin nobody serves yet, a service or
    /// JetStream that is away); retries are not spent meanwhile.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub waiting_for: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub units: Vec<String>,
    pub duration_us: u64,
}

/// One run, folded from its events.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RunInfo {
    pub run_id: String,
    pub pipeline: String,
    pub pipeline_version: u32,
    /// queued, running, completed, failed, cancelled
    pub state: String,
    pub trigger: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub trigger_subject: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub unit_id: String,
    pub correlation_id: String,
    /// ms since the epoch of the request and of the last event
    pub requested_ms: i64,
    pub updated_ms: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub outcome: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    pub steps: Vec<StepInfo>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub units: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, String>,
    /// Stream sequence of the run's last event.
    pub last_seq: u64,
}

impl RunInfo {
    pub fn is_terminal(&self) -> bool {
        matches!(self.state.as_str(), "completed" | "failed" | "cancelled")
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RunList {
    pub runs: Vec<RunInfo>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PipelineList {
    pub pipelines: Vec<PipelineInfo>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_and_names() {
        assert_eq!(pipeline_event("ingest", action::APPLIED).unwrap(), "cim.evt.pipeline.pipeline.ingest.applied");
        assert_eq!(pipeline_history("ingest").unwrap(), "cim.evt.pipeline.pipeline.ingest.*");
        assert_eq!(run_event("r1", action::STEP_COMPLETED).unwrap(), "cim.evt.pipeline.run.r1.step_completed");
        assert_eq!(run_history("r1").unwrap(), "cim.evt.pipeline.run.r1.*");
        assert_eq!(run_action(action::REQUESTED).unwrap(), "cim.evt.pipeline.run.*.requested");
        assert_eq!(command(cmd::APPLY).unwrap(), "cim.cmd.pipeline.apply");
        assert_eq!(query(qry::RUNS).unwrap(), "cim.qry.pipeline.runs");
        assert_eq!(dead_letter(DLQ_RUNS).unwrap(), "cim.dlq.pipeline.runs");
        assert_eq!(trigger_consumer(), "pipeline-triggers");
        assert_eq!(run_consumer(), "pipeline-runs");
        assert_eq!(slot_key("ingest", 2).unwrap(), "ingest.2");
        assert_eq!(plugin_referrer("ingest").unwrap(), "pipeline-ingest");
        for c in cmd::ALL {
            command(c).unwrap();
        }
        for q in qry::ALL {
            query(q).unwrap();
        }
        for a in action::RUN_ALL {
            run_event("r", a).unwrap();
        }
    }

    #[test]
    fn names_are_checked() {
        validate_name("text-ingest").unwrap();
        for bad in ["", "Upper", "a.b", "-x", "a_b", "a b", "a*", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
            assert!(pipeline_event(bad, action::APPLIED).is_err(), "{bad:?}");
        }
        assert!(run_event("a.b", action::STARTED).is_err());
    }
}
