//! What one step does: plugin calls (one or for each item), filters, maps, and the sinks that
//! write units and events, each failure classified as permanent or worth a retry.

use std::{collections::BTreeMap, time::Duration};

use bytes::Bytes;
use cim_events::{
    Envelope,
    envelope::H_MSG_ID,
    pipeline::{self as pl, action},
    plugin,
    proto::{
        iu::{CreateUnit, Link, NewVersion, SetAttributes, TagUnit, Unit},
        pipeline::RunEmitted,
        plugin::{InvokeReply, InvokeRequest, Status},
    },
};
use cim_iu_client::header_with_id;
use prost::Message;

/// How soon a plugin nobody serves is asked again, doubling up to the maximum.
const PROVIDER_POLL: Duration = Duration::from_millis(100);
const PROVIDER_POLL_MAX: Duration = Duration::from_secs(1);

use crate::{
    definition::{self, Kind, PluginRef, Step},
    engine::{Engine, Publish},
    state::Run,
};

/// Largest output a step may pass on to later steps (it is stored in its event).
pub const MAX_STEP_OUTPUT: usize = 512 * 1024;

/// How a step failed.
pub(crate) struct StepError {
    pub(crate) message: String,
    /// A retry cannot help (bad input, unknown plugin, a bad template): fail at once.
    pub(crate) permanent: bool,
    /// Not the step failing but what it needs being away (the information-unit service or
    /// JetStream not answering: a restart, a leader election): waited for without spending
    /// the step's retries (see `runs.rs`).
    pub(crate) unavailable: bool,
}

impl StepError {
    pub(crate) fn permanent(m: impl Into<String>) -> StepError {
        StepError { message: m.into(), permanent: true, unavailable: false }
    }
    pub(crate) fn transient(m: impl Into<String>) -> StepError {
        StepError { message: m.into(), permanent: false, unavailable: false }
    }
    pub(crate) fn unavailable(m: impl Into<String>) -> StepError {
        StepError { message: m.into(), permanent: false, unavailable: true }
    }
}

/// The output of one step.
#[derive(Default)]
pub(crate) struct StepOutput {
    pub(crate) output: Vec<u8>,
    pub(crate) metadata: BTreeMap<String, String>,
    pub(crate) units: Vec<String>,
    pub(crate) passed: bool,
    /// Sequence of an event the step itself wrote to the run (emit).
    pub(crate) seq: Option<u64>,
}

/// Where a step says what it waits for while it waits (the run worker records it).
pub(crate) type Waiting = tokio::sync::watch::Sender<String>;

impl Engine {
    pub(crate) async fn execute(
        &self,
        step: &Step,
        run: &Run,
        unit: &mut Option<Unit>,
        parent: &Envelope,
        waiting: &Waiting,
    ) -> Result<StepOutput, StepError> {
        let kind = step.kind().map_err(|e| StepError::permanent(e.0))?;
        let run_id = &run.info.run_id;
        // Unit facts are read once per run and only if a step needs them.
        let needs_unit = !run.info.unit_id.is_empty();
        if unit.is_none() && needs_unit {
            *unit = Some(self.iu.unit(&run.info.unit_id).await.map_err(|e| {
                if e.is_not_found() {
                    StepError::permanent(format!("unit {}: {e}", run.info.unit_id))
                } else if e.is_transient() {
                    StepError::unavailable(format!("unit {}: {e}", run.info.unit_id))
                } else {
                    StepError::transient(format!("unit {}: {e}", run.info.unit_id))
                }
            })?);
        }
        let unit_ref = unit.as_ref();
        let lookup = |field: &str| lookup(field, run, unit_ref);
        let render = |t: &str| {
            definition::render(t, &lookup).map_err(|e| StepError::permanent(format!("step {}: {e}", step.id)))
        };
        let request_id = format!("pl-{run_id}-{}", step.id);
        match kind {
            Kind::Plugin(p) => {
                let input = self.content(step.input.as_deref().unwrap_or(&default_input(run)), run, unit_ref).await?;
                let mut meta = BTreeMap::new();
                if let Some(u) = unit_ref {
                    meta.insert("unit-id".to_string(), u.unit_id.clone());
                    meta.insert("name".to_string(), u.name.clone());
                    meta.insert("content-type".to_string(), u.media_type.clone());
                }
                for (k, v) in &step.options {
                    meta.insert(k.clone(), render(v)?);
                }
                let reply = self.invoke(&p, input, meta, step.timeout_ms(), waiting).await?;
                let mut metadata: BTreeMap<String, String> = reply.metadata.into_iter().collect();
                metadata.insert("plugin".into(), plugin::reference(&reply.plugin, &reply.version));
                Ok(StepOutput { output: reply.output.to_vec(), metadata, passed: true, ..Default::default() })
            }
            Kind::ForEach(f, p) => {
                let items = self.content(&f.items, run, unit_ref).await?;
                let items = split_items(&items, &f.split).map_err(StepError::permanent)?;
                let max = f.max_items.unwrap_or(1000) as usize;
                if items.len() > max {
                    return Err(StepError::permanent(format!("{} items, more than max_items {max}", items.len())));
                }
                let mut outputs = Vec::with_capacity(items.len());
                for item in items {
                    let reply = self.invoke(&p, item, BTreeMap::new(), step.timeout_ms(), waiting).await?;
                    outputs.push(serde_json::Value::String(String::from_utf8_lossy(&reply.output).into_owned()));
                }
                let count = outputs.len();
                Ok(StepOutput {
                    output: serde_json::to_vec(&outputs).unwrap_or_default(),
                    metadata: [("count".to_string(), count.to_string())].into(),
                    passed: true,
                    ..Default::default()
                })
            }
            Kind::Filter(c) => {
                let passed = definition::holds(c, lookup(&c.field).as_deref());
                Ok(StepOutput {
                    metadata: [("passed".to_string(), passed.to_string())].into(),
                    passed,
                    ..Default::default()
                })
            }
            Kind::Map(values) => {
                let mut metadata = BTreeMap::new();
                for (k, v) in values {
                    metadata.insert(k.clone(), render(v)?);
                }
                Ok(StepOutput { metadata, passed: true, ..Default::default() })
            }
            Kind::Tag(tags) => {
                let unit_id = required_unit(run, step)?;
                let tags = tags.iter().map(|t| render(t)).collect::<Result<Vec<_>, _>>()?;
                let cmd =
                    TagUnit { header: header_with_id(request_id, 0), unit_id: unit_id.clone(), tags: tags.clone() };
                self.iu.execute_caused_by(cmd, parent).await.map_err(iu_error)?;
                Ok(StepOutput {
                    metadata: [("tags".to_string(), tags.join(","))].into(),
                    units: vec![unit_id],
                    passed: true,
                    ..Default::default()
                })
            }
            Kind::SetAttributes(attrs) => {
                let unit_id = required_unit(run, step)?;
                let mut set = BTreeMap::new();
                for (k, v) in attrs {
                    set.insert(k.clone(), render(v)?);
                }
                let cmd = SetAttributes {
                    header: header_with_id(request_id, 0),
                    unit_id: unit_id.clone(),
                    set: set.clone().into_iter().collect(),
                    remove: Vec::new(),
                };
                self.iu.execute_caused_by(cmd, parent).await.map_err(iu_error)?;
                Ok(StepOutput { metadata: set, units: vec![unit_id], passed: true, ..Default::default() })
            }
            Kind::CreateUnit(spec) => {
                let source = required_unit(run, step)?;
                let bytes = self.content(&spec.content, run, unit_ref).await?;
                let bytes = match spec.max_bytes {
                    Some(max) => definition::head(&bytes, max as usize).to_vec(),
                    None => bytes.to_vec(),
                };
                let media_type = if !spec.media_type.is_empty() {
                    spec.media_type.clone()
                } else if std::str::from_utf8(&bytes).is_ok() {
                    "text/plain; charset=utf-8".to_string()
                } else {
                    "application/octet-stream".to_string()
                };
                let committed = self.iu.put_bytes(&bytes).await.map_err(iu_error)?;
                let mut attributes = BTreeMap::new();
                for (k, v) in &spec.attributes {
                    attributes.insert(k.clone(), render(v)?);
                }
                let cmd = CreateUnit {
                    header: header_with_id(request_id, 0),
                    cid: committed.cid.clone(),
                    name: render(&spec.name)?,
                    media_type,
                    unit_type: String::new(),
                    tags: spec.tags.iter().map(|t| render(t)).collect::<Result<Vec<_>, _>>()?,
                    attributes: attributes.into_iter().collect(),
                    links: vec![Link {
                        kind: if spec.link.is_empty() { "derived-from".into() } else { spec.link.clone() },
                        target: source,
                    }],
                };
                let created = self.iu.execute_caused_by(cmd, parent).await.map_err(iu_error)?;
                Ok(StepOutput {
                    output: created.unit_id.clone().into_bytes(),
                    metadata: [("unit-id".to_string(), created.unit_id.clone()), ("cid".to_string(), committed.cid)]
                        .into(),
                    units: vec![created.unit_id],
                    passed: true,
                    seq: None,
                })
            }
            Kind::NewVersion(spec) => {
                let unit_id = required_unit(run, step)?;
                let bytes = self.content(&spec.content, run, unit_ref).await?;
                let committed = self.iu.put_bytes(&bytes).await.map_err(iu_error)?;
                let cmd = NewVersion {
                    header: header_with_id(request_id, 0),
                    unit_id: unit_id.clone(),
                    cid: committed.cid.clone(),
                    name: String::new(),
                    media_type: spec.media_type.clone(),
                };
                self.iu.execute_caused_by(cmd, parent).await.map_err(iu_error)?;
                Ok(StepOutput {
                    metadata: [("cid".to_string(), committed.cid)].into(),
                    units: vec![unit_id],
                    passed: true,
                    ..Default::default()
                })
            }
            Kind::Emit(spec) => {
                let mut data = BTreeMap::new();
                for (k, v) in &spec.data {
                    data.insert(k.clone(), render(v)?);
                }
                let event = RunEmitted {
                    run_id: run_id.clone(),
                    step: step.id.clone(),
                    name: spec.name.clone(),
                    data: data.clone().into_iter().collect(),
                };
                let env = Envelope::caused_by::<RunEmitted>(parent, self.ctx.source());
                let mut headers = env.to_headers();
                // Written once however often the step is repeated (within the duplicate window).
                headers.insert(H_MSG_ID, format!("emit-{run_id}-{}", step.id).as_str());
                let subject =
                    pl::run_event(run_id, action::EMITTED).map_err(|e| StepError::permanent(e.to_string()))?;
                let written =
                    self.publish(subject, headers, event.encode_to_vec(), None).await.map_err(|e| match e {
                        Publish::Conflict => StepError::transient("emit conflicted"),
                        Publish::Failed(e) => StepError::transient(e),
                    })?;
                Ok(StepOutput { metadata: data, passed: true, seq: Some(written), ..Default::default() })
            }
        }
    }

    /// Bytes a step reads: `unit.content` or `<step>.output`.
    pub(crate) async fn content(&self, field: &str, run: &Run, unit: Option<&Unit>) -> Result<Bytes, StepError> {
        if field == "unit.content" {
            let u = unit.ok_or_else(|| StepError::permanent("the run has no unit, so there is no unit.content"))?;
            if u.size > self.args.max_content {
                return Err(StepError::permanent(format!(
                    "unit content is {} bytes, more than --pipeline-max-content {}",
                    u.size, self.args.max_content
                )));
            }
            return self.iu.get_bytes(&u.cid, None).await.map(Bytes::from).map_err(iu_error);
        }
        let step = field.strip_suffix(".output").unwrap_or(field);
        run.outputs
            .get(step)
            .map(|c| Bytes::from(c.output.clone()))
            .ok_or_else(|| StepError::permanent(format!("{field} has no value (step {step} has not completed)")))
    }

    /// Calls a plugin through its contract and classifies failures.
    async fn invoke(
        &self,
        p: &PluginRef,
        input: Bytes,
        metadata: BTreeMap<String, String>,
        timeout_ms: u32,
        waiting: &Waiting,
    ) -> Result<InvokeReply, StepError> {
        let (subject, mut request) = match p {
            PluginRef::Version { name, version } => (plugin::invoke_subject(name, version), InvokeRequest::default()),
            PluginRef::Capability(c) => {
                (plugin::command(plugin::cmd::INVOKE), InvokeRequest { capability: c.clone(), ..Default::default() })
            }
        };
        let subject = subject.map_err(|e| StepError::permanent(e.to_string()))?;
        request.input = input.to_vec();
        request.metadata = metadata.into_iter().collect();
        request.timeout_ms = timeout_ms;
        let payload: Bytes = request.encode_to_vec().into();
        // Nobody serving the plugin (its host restarting) is not a failure of the step: the
        // request reached no one, so it is sent again as providers come back, within most of
        // the step's time, without spending the step's retries.
        let started = tokio::time::Instant::now();
        let patience = Duration::from_millis(u64::from(timeout_ms)).mul_f64(0.9);
        let mut pause = PROVIDER_POLL;
        let msg = loop {
            let req = async_nats::Request::new()
                .payload(payload.clone())
                .timeout(Some(Duration::from_millis(u64::from(timeout_ms)) + Duration::from_secs(1)));
            match self.ctx.client().send_request(subject.clone(), req).await {
                Ok(msg) => break msg,
                Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                    if started.elapsed() + pause >= patience {
                        return Err(StepError::transient(format!(
                            "nothing serves {p} (plugin host or native plugin down, or the version was removed; waited {} ms for a provider)",
                            started.elapsed().as_millis()
                        )));
                    }
                    if started.elapsed() < pause {
                        tracing::info!(plugin = %p, "nothing serves the plugin yet; waiting for a provider");
                        waiting.send_replace(format!(
                            "a provider of {p} (nothing serves it: plugin host or native plugin restarting, or the version was removed)"
                        ));
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(PROVIDER_POLL_MAX);
                }
                Err(e) if e.kind() == async_nats::RequestErrorKind::TimedOut => {
                    return Err(StepError::transient(format!("{p} did not answer in time")));
                }
                Err(e) => return Err(StepError::transient(format!("invoking {p}: {e}"))),
            }
        };
        let reply = InvokeReply::decode(msg.payload).map_err(|e| {
            StepError::transient(format!("{p} answered with something that is not an InvokeReply: {e}"))
        })?;
        let status = Status::try_from(reply.status).unwrap_or(Status::Unspecified);
        if status == Status::Ok {
            return Ok(reply);
        }
        let message = reply.error.as_ref().map(|e| e.message.clone()).unwrap_or_default();
        let text =
            format!("{p}: {} {message}", status.as_str_name().trim_start_matches("STATUS_").to_ascii_lowercase());
        Err(match status {
            Status::BadRequest | Status::NotFound | Status::InvalidInput => StepError::permanent(text),
            _ => StepError::transient(text),
        })
    }
}

/// The value of a context field for templates and filters.
fn lookup(field: &str, run: &Run, unit: Option<&Unit>) -> Option<String> {
    let (root, rest) = field.split_once('.')?;
    match root {
        "unit" => {
            let u = unit?;
            match rest {
                "id" => Some(u.unit_id.clone()),
                "name" => Some(u.name.clone()),
                "media_type" => Some(u.media_type.clone()),
                "unit_type" => Some(u.unit_type.clone()),
                "cid" => Some(u.cid.clone()),
                "size" => Some(u.size.to_string()),
                _ => rest.strip_prefix("attr.").and_then(|k| u.attributes.get(k).cloned()),
            }
        }
        "param" => run.info.params.get(rest).cloned(),
        "run" if rest == "id" => Some(run.info.run_id.clone()),
        "pipeline" if rest == "name" => Some(run.info.pipeline.clone()),
        step => {
            let done = run.outputs.get(step)?;
            if rest == "output" {
                return Some(String::from_utf8_lossy(&done.output).into_owned());
            }
            done.metadata.get(rest).cloned()
        }
    }
}

/// A plugin step without `input` reads the nearest earlier plugin step's output, else the unit.
fn default_input(run: &Run) -> String {
    // The executor runs steps in order, so the latest completed plugin output is the nearest.
    run.info
        .steps
        .iter()
        .rev()
        .filter(|s| s.state == "completed" && s.metadata.contains_key("plugin"))
        .map(|s| format!("{}.output", s.step))
        .next()
        .unwrap_or_else(|| "unit.content".to_string())
}

pub(crate) fn required_unit(run: &Run, step: &Step) -> Result<String, StepError> {
    if run.info.unit_id.is_empty() {
        return Err(StepError::permanent(format!("step {} needs a unit, and this run has none", step.id)));
    }
    Ok(run.info.unit_id.clone())
}

fn iu_error(e: cim_iu_client::IuError) -> StepError {
    let text = format!("information-unit: {e}");
    if e.is_transient() { StepError::unavailable(text) } else { StepError::permanent(text) }
}

fn split_items(bytes: &[u8], split: &str) -> Result<Vec<Bytes>, String> {
    match split {
        "json" => {
            let v: Vec<serde_json::Value> =
                serde_json::from_slice(bytes).map_err(|e| format!("items are not a JSON array: {e}"))?;
            Ok(v.into_iter()
                .map(|x| match x {
                    serde_json::Value::String(s) => Bytes::from(s),
                    other => Bytes::from(other.to_string()),
                })
                .collect())
        }
        _ => Ok(String::from_utf8_lossy(bytes)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| Bytes::from(l.to_string()))
            .collect()),
    }
}
