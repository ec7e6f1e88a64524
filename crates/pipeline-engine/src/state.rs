//! Run state folded from a run's events, and the engine's view of every pipeline and run.
//! Pure: the same events always give the same state, so any instance can rebuild it.

use std::collections::{BTreeMap, HashMap};

use cim_events::{
    pipeline::{RunCounts, RunInfo, StepInfo, action},
    proto::pipeline::{
        PipelineApplied, PipelineRemoved, RunCancelled, RunCompleted, RunFailed, RunRequested, RunRetried, RunStarted,
        StepCompleted, StepFailed, StepStarted, StepWaiting,
    },
};
use prost::Message;

use crate::definition::Definition;

/// A run event, decoded.
#[derive(Clone, Debug)]
pub enum RunEvent {
    Requested(RunRequested),
    Started(RunStarted),
    StepStarted(StepStarted),
    StepWaiting(StepWaiting),
    StepCompleted(StepCompleted),
    StepFailed(StepFailed),
    Emitted,
    Completed(RunCompleted),
    Failed(RunFailed),
    Cancelled(RunCancelled),
    Retried(RunRetried),
}

/// Why a run event could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum RunEventError {
    /// The body is not the message its action names: the event is broken.
    #[error("{action} event does not decode: {source}")]
    Undecodable { action: String, source: prost::DecodeError },
    /// An action this engine does not know (a newer engine may).
    #[error("unknown run event {0:?}")]
    Unknown(String),
}

impl RunEvent {
    /// Decodes by the subject's action.
    pub fn decode(action: &str, body: &[u8]) -> Result<RunEvent, RunEventError> {
        let e = |source: prost::DecodeError| RunEventError::Undecodable { action: action.to_string(), source };
        Ok(match action {
            action::REQUESTED => RunEvent::Requested(RunRequested::decode(body).map_err(e)?),
            action::STARTED => RunEvent::Started(RunStarted::decode(body).map_err(e)?),
            action::STEP_STARTED => RunEvent::StepStarted(StepStarted::decode(body).map_err(e)?),
            action::STEP_WAITING => RunEvent::StepWaiting(StepWaiting::decode(body).map_err(e)?),
            action::STEP_COMPLETED => RunEvent::StepCompleted(StepCompleted::decode(body).map_err(e)?),
            action::STEP_FAILED => RunEvent::StepFailed(StepFailed::decode(body).map_err(e)?),
            action::EMITTED => RunEvent::Emitted,
            action::COMPLETED => RunEvent::Completed(RunCompleted::decode(body).map_err(e)?),
            action::FAILED => RunEvent::Failed(RunFailed::decode(body).map_err(e)?),
            action::CANCELLED => RunEvent::Cancelled(RunCancelled::decode(body).map_err(e)?),
            action::RETRIED => RunEvent::Retried(RunRetried::decode(body).map_err(e)?),
            other => return Err(RunEventError::Unknown(other.to_string())),
        })
    }
}

/// A run as its events tell it, with what the executor needs beyond [`RunInfo`]: the request,
/// each completed step's output, and the failures of each step since the last retry.
#[derive(Clone, Debug, Default)]
pub struct Run {
    pub info: RunInfo,
    pub request: RunRequested,
    pub outputs: HashMap<String, StepCompleted>,
    pub failures: HashMap<String, u32>,
    /// The instance of the last `started` event since the last request or retry (empty: none).
    /// An instance that takes over a run (after a crash) records its own `started`.
    pub started_by: String,
}

impl Run {
    /// Applies one event (stream sequence `seq`, envelope time `time_ms`).
    pub fn apply(&mut self, event: RunEvent, seq: u64, time_ms: i64, correlation_id: &str) {
        let info = &mut self.info;
        info.last_seq = seq;
        info.updated_ms = time_ms;
        match event {
            RunEvent::Requested(r) => {
                info.run_id = r.run_id.clone();
                info.pipeline = r.pipeline.clone();
                info.pipeline_version = r.pipeline_version;
                info.state = "queued".into();
                info.trigger = r.trigger.clone();
                info.trigger_subject = r.trigger_subject.clone();
                info.unit_id = r.unit_id.clone();
                info.correlation_id = correlation_id.to_string();
                info.requested_ms = time_ms;
                info.params = r.params.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                self.request = r;
            }
            RunEvent::Started(s) => {
                info.state = "running".into();
                self.started_by = s.instance_id;
            }
            RunEvent::StepStarted(s) => {
                let step = step_mut(&mut info.steps, &s.step);
                step.state = "running".into();
                step.attempts = step.attempts.max(s.attempt);
                step.waiting_for.clear();
            }
            RunEvent::StepWaiting(w) => {
                let step = step_mut(&mut info.steps, &w.step);
                step.state = "waiting".into();
                step.attempts = step.attempts.max(w.attempt);
                step.waiting_for = w.waiting_for;
            }
            RunEvent::StepCompleted(c) => {
                let step = step_mut(&mut info.steps, &c.step);
                step.state = if c.passed { "completed".into() } else { "stopped".into() };
                step.attempts = step.attempts.max(c.attempt);
                step.error.clear();
                step.waiting_for.clear();
                step.metadata = c.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                step.units = c.units.clone();
                step.duration_us = c.duration_us;
                for u in &c.units {
                    if !info.units.contains(u) {
                        info.units.push(u.clone());
                    }
                }
                self.outputs.insert(c.step.clone(), c);
            }
            RunEvent::StepFailed(f) => {
                let step = step_mut(&mut info.steps, &f.step);
                step.state = if f.will_retry { "retrying".into() } else { "failed".into() };
                step.attempts = step.attempts.max(f.attempt);
                step.error = f.error.clone();
                step.waiting_for.clear();
                *self.failures.entry(f.step).or_default() += 1;
            }
            RunEvent::Emitted => {}
            RunEvent::Completed(c) => {
                info.state = "completed".into();
                info.outcome = c.outcome;
                info.error.clear();
            }
            RunEvent::Failed(f) => {
                info.state = "failed".into();
                info.error = format!("step {}: {}", f.step, f.error);
            }
            RunEvent::Cancelled(c) => {
                info.state = "cancelled".into();
                info.error = if c.reason.is_empty() { "cancelled".into() } else { format!("cancelled: {}", c.reason) };
            }
            RunEvent::Retried(_) => {
                info.state = "queued".into();
                info.error.clear();
                self.failures.clear();
                self.started_by.clear();
                for s in &mut info.steps {
                    if s.state != "completed" {
                        s.state = "pending".into();
                        s.attempts = 0;
                        s.error.clear();
                        s.waiting_for.clear();
                    }
                }
            }
        }
    }

    /// Fills in the steps that have not started yet, in order, from the definition.
    pub fn with_plan(mut self, def: Option<&Definition>) -> Run {
        if let Some(def) = def {
            let mut ordered = Vec::new();
            for s in def.all_steps() {
                let known = self.info.steps.iter().find(|x| x.step == s.id).cloned();
                ordered.push(known.unwrap_or_else(|| StepInfo {
                    step: s.id.clone(),
                    state: "pending".into(),
                    ..Default::default()
                }));
            }
            self.info.steps = ordered;
        }
        self
    }
}

fn step_mut<'a>(steps: &'a mut Vec<StepInfo>, id: &str) -> &'a mut StepInfo {
    match steps.iter().position(|s| s.step == id) {
        Some(i) => &mut steps[i],
        None => {
            steps.push(StepInfo { step: id.to_string(), state: "pending".into(), ..Default::default() });
            steps.last_mut().expect("just pushed")
        }
    }
}

/// One version of a pipeline.
#[derive(Clone, Debug)]
pub struct PipelineVersion {
    pub version: u32,
    pub digest: String,
    pub definition: Definition,
    pub json: serde_json::Value,
    /// When the pipeline's first version was applied: it is triggered by later events only.
    pub first_applied_ms: i64,
}

/// A pipeline's versions and whether it is active.
#[derive(Clone, Debug, Default)]
pub struct PipelineState {
    pub versions: BTreeMap<u32, PipelineVersion>,
    pub active: bool,
    /// Stream sequence of its last event (optimistic concurrency of apply/remove).
    pub last_seq: u64,
}

impl PipelineState {
    pub fn current(&self) -> Option<&PipelineVersion> {
        self.versions.values().next_back()
    }
}

/// Everything an engine instance knows, folded from `CIM_PIPELINE_EVENTS`.
#[derive(Debug, Default)]
pub struct View {
    pub pipelines: BTreeMap<String, PipelineState>,
    pub runs: HashMap<String, Run>,
    /// Last stream sequence applied.
    pub seq: u64,
    /// Events that did not decode (counted, named in the log; never fatal).
    pub undecodable: u64,
    /// Envelope id of every run request → its pipeline: what a run writes is caused by its
    /// request, so a pipeline is never triggered by its own runs' units (no loops).
    pub requests: HashMap<String, String>,
    /// Request id of every manual start → the run it requested: a retry is answered with it.
    pub starts: HashMap<String, String>,
}

impl View {
    pub fn apply_applied(&mut self, e: PipelineApplied, seq: u64, time_ms: i64) -> Result<(), String> {
        let json: serde_json::Value = serde_json::from_str(&e.definition_json)
            .map_err(|err| format!("pipeline {} v{}: {err}", e.name, e.version))?;
        let definition =
            Definition::parse(&json).map_err(|err| format!("pipeline {} v{}: {err}", e.name, e.version))?;
        let p = self.pipelines.entry(e.name.clone()).or_default();
        let first_applied_ms = p.versions.values().next().map(|v| v.first_applied_ms).unwrap_or(time_ms);
        p.versions.insert(
            e.version,
            PipelineVersion { version: e.version, digest: e.digest, definition, json, first_applied_ms },
        );
        p.active = true;
        p.last_seq = seq;
        Ok(())
    }

    pub fn apply_removed(&mut self, e: PipelineRemoved, seq: u64) {
        let p = self.pipelines.entry(e.name).or_default();
        p.active = false;
        p.last_seq = seq;
    }

    pub fn definition(&self, name: &str, version: u32) -> Option<&Definition> {
        self.pipelines.get(name).and_then(|p| p.versions.get(&version)).map(|v| &v.definition)
    }

    pub fn counts(&self, pipeline: &str) -> RunCounts {
        let mut c = RunCounts::default();
        for r in self.runs.values().filter(|r| r.info.pipeline == pipeline) {
            match r.info.state.as_str() {
                "queued" => c.queued += 1,
                "running" => c.running += 1,
                "completed" => c.completed += 1,
                "failed" => c.failed += 1,
                "cancelled" => c.cancelled += 1,
                _ => {}
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_folds_from_its_events() {
        let mut run = Run::default();
        let req = RunRequested {
            run_id: "r1".into(),
            pipeline: "p".into(),
            pipeline_version: 2,
            trigger: "event".into(),
            unit_id: "u1".into(),
            ..Default::default()
        };
        run.apply(RunEvent::Requested(req), 1, 10, "c1");
        assert_eq!(run.info.state, "queued");
        run.apply(RunEvent::Started(RunStarted { run_id: "r1".into(), instance_id: "i".into() }), 2, 11, "c1");
        run.apply(
            RunEvent::StepStarted(StepStarted {
                run_id: "r1".into(),
                step: "a".into(),
                attempt: 1,
                ..Default::default()
            }),
            3,
            12,
            "c1",
        );
        run.apply(
            RunEvent::StepFailed(StepFailed {
                run_id: "r1".into(),
                step: "a".into(),
                attempt: 1,
                error: "boom".into(),
                will_retry: true,
                retry_in_ms: 10,
            }),
            4,
            13,
            "c1",
        );
        assert_eq!(run.failures["a"], 1);
        assert_eq!(run.info.steps[0].state, "retrying");
        run.apply(
            RunEvent::StepFailed(StepFailed {
                run_id: "r1".into(),
                step: "a".into(),
                attempt: 2,
                error: "boom".into(),
                will_retry: false,
                retry_in_ms: 0,
            }),
            5,
            14,
            "c1",
        );
        run.apply(
            RunEvent::Failed(RunFailed { run_id: "r1".into(), step: "a".into(), error: "boom".into() }),
            6,
            15,
            "c1",
        );
        assert!(run.info.is_terminal());
        assert_eq!(run.info.error, "step a: boom");
        run.apply(RunEvent::Retried(RunRetried { run_id: "r1".into(), reason: "fixed".into() }), 7, 16, "c1");
        assert_eq!(run.info.state, "queued");
        assert!(run.failures.is_empty() && run.started_by.is_empty());
        run.apply(
            RunEvent::StepCompleted(StepCompleted {
                run_id: "r1".into(),
                step: "a".into(),
                attempt: 3,
                passed: true,
                units: vec!["u2".into()],
                ..Default::default()
            }),
            8,
            17,
            "c1",
        );
        run.apply(
            RunEvent::Completed(RunCompleted {
                run_id: "r1".into(),
                units: vec!["u2".into()],
                outcome: "completed".into(),
            }),
            9,
            18,
            "c1",
        );
        assert_eq!(run.info.state, "completed");
        assert_eq!(run.info.units, vec!["u2".to_string()]);
        assert_eq!(run.info.steps[0].attempts, 3);
        assert_eq!((run.info.last_seq, run.info.requested_ms, run.info.updated_ms), (9, 10, 18));
        assert!(matches!(RunEvent::decode("exploded", b""), Err(RunEventError::Unknown(_))));
        assert!(matches!(RunEvent::decode(action::REQUESTED, b"\xff\xff"), Err(RunEventError::Undecodable { .. })));
    }
}
