//! The pipeline engine end to end, as real processes (nats-server, information-unit,
//! plugin-host, one or two pipeline-engines, cimctl): the shipped example, refused definitions,
//! retries then dead letter, removed plugins and retry, poison messages, cancellation, the
//! concurrency limit, SIGKILL of one of two engines mid-run with every run done exactly once in
//! effect, and a 3-node cluster.

use std::{collections::HashMap, path::PathBuf, process::Output, time::Duration};

use anyhow::{Context, Result, ensure};
use async_nats::jetstream;
use cim_events::{
    Component, Envelope,
    pipeline::{self as pl, RunInfo, RunList, RunRef, RunsRequest, StartRequest},
    proto::iu::{CreateUnit, ListUnits},
    resources,
};
use cim_iu_client::IuClient;
use cim_testkit::{eventually, stays_true_for};
use prost::Message as _;
use tokio::process::Command;

use crate::common::{SLEEPY_WAT, ServiceProc, bin, read_all};
use crate::fixture::{CimFixture, CimFixtureBuilder, Svc};

const LONG: Duration = Duration::from_secs(60);

/// The services a pipeline needs (information-unit, plugin-host, pipeline-engines) on one
/// fixture (a server or a cluster).
struct Cim {
    fx: CimFixture,
    iu: IuClient,
}

impl Cim {
    /// information-unit, plugin-host and `engines` pipeline-engines with `engine_args`.
    async fn start(builder: CimFixtureBuilder, engines: usize, engine_args: &[&str]) -> Result<Cim> {
        let mut builder = builder.service(Component::InformationUnit).service(Component::PluginHost);
        for _ in 0..engines {
            builder = builder.service(Svc::new(Component::PipelineEngine).args(engine_args));
        }
        let fx = builder.start().await?;
        Ok(Cim { iu: fx.iu(), fx })
    }

    /// On a single nats-server.
    async fn leaf(engines: usize, engine_args: &[&str]) -> Result<Cim> {
        Cim::start(CimFixture::builder(), engines, engine_args).await
    }

    /// One more pipeline-engine with `engine_args`, ready.
    async fn add_engine(&mut self, engine_args: &[&str]) -> Result<()> {
        self.fx.start(Svc::new(Component::PipelineEngine).args(engine_args)).await?;
        Ok(())
    }

    /// The `i`-th pipeline-engine started.
    fn engine(&mut self, i: usize) -> &mut ServiceProc {
        self.fx
            .services_mut()
            .iter_mut()
            .filter(|s| s.component == Component::PipelineEngine)
            .nth(i)
            .expect("that many engines")
    }

    async fn cimctl(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new(bin("cimctl"))
            .args(args)
            .args(["--nats-url", self.fx.url()])
            .envs(self.fx.admin_env())
            .output()
            .await?)
    }

    async fn cimctl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.cimctl(args).await?;
        ensure!(
            out.status.success(),
            "cimctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// Applies a definition with `cimctl pipeline apply`.
    async fn apply(&self, def: &serde_json::Value) -> Result<Output> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("pipeline.json");
        std::fs::write(&file, def.to_string())?;
        self.cimctl(&["pipeline", "apply", &file.to_string_lossy()]).await
    }

    async fn apply_ok(&self, def: &serde_json::Value) -> Result<()> {
        let out = self.apply(def).await?;
        ensure!(out.status.success(), "apply failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }

    async fn request<T: serde::de::DeserializeOwned>(&self, subject: String, body: serde_json::Value) -> Result<T> {
        let m = tokio::time::timeout(
            Duration::from_secs(20),
            self.fx.client().request(subject.clone(), body.to_string().into()),
        )
        .await??;
        if let Some(code) = m.headers.as_ref().and_then(|h| h.get("Nats-Service-Error-Code")) {
            anyhow::bail!(
                "{subject}: {code} {}",
                m.headers.as_ref().and_then(|h| h.get("Nats-Service-Error")).map(|v| v.to_string()).unwrap_or_default()
            );
        }
        Ok(serde_json::from_slice(&m.payload)?)
    }

    async fn runs(&self, pipeline: &str) -> Result<Vec<RunInfo>> {
        let list: RunList = self
            .request(
                pl::query(pl::qry::RUNS)?,
                serde_json::to_value(RunsRequest { pipeline: pipeline.into(), limit: 1000, ..Default::default() })?,
            )
            .await?;
        Ok(list.runs)
    }

    async fn run(&self, run_id: &str) -> Result<RunInfo> {
        self.request(
            pl::query(pl::qry::RUN)?,
            serde_json::to_value(RunRef { run_id: run_id.into(), reason: String::new() })?,
        )
        .await
    }

    async fn start_run(&self, pipeline: &str, unit: &str, params: &[(&str, &str)]) -> Result<String> {
        let req = StartRequest {
            pipeline: pipeline.into(),
            unit_id: unit.into(),
            params: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            request_id: String::new(),
        };
        let r: RunRef = self.request(pl::command(pl::cmd::START)?, serde_json::to_value(req)?).await?;
        Ok(r.run_id)
    }

    async fn wait_state(&self, run_id: &str, state: &str) -> Result<RunInfo> {
        eventually!(LONG, &format!("run {run_id} {state}"), {
            let r = self.run(run_id).await?;
            ensure!(r.state == state, "run is {} ({})", r.state, r.error);
            Ok(r)
        })
    }

    async fn put(&self, bytes: &[u8], name: &str, media_type: &str) -> Result<String> {
        let c = self.iu.put_bytes(bytes).await?;
        let u = self
            .iu
            .create(CreateUnit { cid: c.cid, name: name.into(), media_type: media_type.into(), ..Default::default() })
            .await?;
        Ok(u.unit_id)
    }

    fn js(&self) -> jetstream::Context {
        self.fx.js()
    }

    /// Every message of the pipeline engine's dead-letter stream on `origin`.
    async fn dead_letters(&self, origin: &str) -> Result<Vec<async_nats::jetstream::Message>> {
        read_all(&self.js(), &resources::dead_letter_stream(Component::PipelineEngine).name, &pl::dead_letter(origin)?)
            .await
    }

    /// Every run event of `action` (all runs).
    async fn run_events(&self, action: &str) -> Result<Vec<async_nats::jetstream::Message>> {
        read_all(&self.js(), &resources::events_stream(Component::PipelineEngine).name, &pl::run_action(action)?).await
    }
}

fn example() -> Result<serde_json::Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/pipelines/text-ingest.json");
    Ok(serde_json::from_str(&std::fs::read_to_string(&path).with_context(|| path.display().to_string())?)?)
}

const TRAP: &str = r#"(module (memory (export "memory") 1) (func (export "cim_invoke") (result i32) unreachable))"#;

async fn push(cim: &Cim, wat: &str, name: &str, version: &str, capability: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join(format!("{name}.wat"));
    std::fs::write(&file, wat)?;
    let mut args = vec!["plugin", "push", file.to_str().unwrap_or_default(), "--name", name, "--version", version];
    if !capability.is_empty() {
        args.extend(["--capability", capability]);
    }
    cim.cimctl_ok(&args).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shipped_example_normalizes_classifies_tags_and_summarizes() -> Result<()> {
    let cim = Cim::leaf(1, &[]).await?;
    let out = cim
        .cimctl_ok(&[
            "pipeline",
            "apply",
            &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/pipelines/text-ingest.json").to_string_lossy(),
        ])
        .await?;
    assert!(out.contains("applied as version 1"), "{out}");
    // Applying the same definition again writes nothing.
    let again = cim.apply(&example()?).await?;
    assert!(String::from_utf8_lossy(&again.stdout).contains("unchanged (version 1)"));

    let text = "Hello   CIM\r\n\r\n\r\n  second   line  \r\n";
    let unit = cim.put(text.as_bytes(), "notes.txt", "text/plain").await?;
    let image = cim.put(b"\x89PNG\r\n\x1a\n....", "pic.png", "image/png").await?;

    let run = eventually!(LONG, "the text unit's run completes", {
        let runs = cim.runs("text-ingest").await?;
        let r = runs.iter().find(|r| r.unit_id == unit).context("no run yet")?;
        ensure!(r.state == "completed", "run is {} {}", r.state, r.error);
        Ok(r.clone())
    })?;
    assert_eq!(run.outcome, "completed");
    assert_eq!(
        run.steps.iter().map(|s| (s.step.as_str(), s.state.as_str())).collect::<Vec<_>>(),
        vec![
            ("normalize", "completed"),
            ("classify", "completed"),
            ("tag", "completed"),
            ("label", "completed"),
            ("summary", "completed")
        ]
    );
    let u = cim.iu.unit(&unit).await?;
    assert!(u.tags.contains(&"normalized".to_string()), "{:?}", u.tags);
    assert_eq!(u.attributes.get("class").map(String::as_str), Some("text/plain"));
    assert_eq!(u.attributes.get("lines").map(String::as_str), Some("3"));

    // The summary: a new unit linked to the source, holding the normalized text.
    let summary_id =
        run.steps.iter().find(|s| s.step == "summary").and_then(|s| s.units.first()).context("summary unit")?.clone();
    let summary = cim.iu.unit(&summary_id).await?;
    assert_eq!(summary.name, "notes.txt.summary.txt");
    assert!(summary.tags.contains(&"summary".to_string()));
    assert_eq!(summary.links.len(), 1);
    assert_eq!((summary.links[0].kind.as_str(), summary.links[0].target.as_str()), ("summary-of", unit.as_str()));
    assert_eq!(cim.iu.get_bytes(&summary.cid, None).await?, b"Hello CIM\n\nsecond line\n");
    let incoming = cim.iu.links(&unit).await?.incoming;
    assert!(incoming.iter().any(|l| l.source == summary_id && l.kind == "summary-of"));

    // Provenance: the summary and the run share the correlation id of the upload.
    let created = u.created_by.clone().context("provenance")?;
    assert_eq!(run.correlation_id, created.correlation_id);
    assert_eq!(summary.created_by.context("summary provenance")?.correlation_id, created.correlation_id);
    let requested = cim.run_events(pl::action::REQUESTED).await?;
    let env = Envelope::from_headers(requested[0].headers.as_ref().context("headers")?)?;
    assert_eq!(env.correlation_id().to_string(), created.correlation_id);

    // The summary (text/plain, written by the pipeline) does not trigger the pipeline again,
    // and the image never matched.
    stays_true_for(Duration::from_millis(500), "one run of text-ingest, not on the image or the summary", || async {
        let runs = cim.runs("text-ingest").await?;
        ensure!(runs.len() == 1, "{runs:?}");
        ensure!(!runs.iter().any(|r| r.unit_id == image || r.unit_id == summary_id), "{runs:?}");
        Ok(())
    })
    .await?;

    // The CLI shows it.
    let ls = cim.cimctl_ok(&["run", "ls", "--pipeline", "text-ingest"]).await?;
    assert!(ls.contains(&run.run_id) && ls.contains("completed") && ls.contains("5/5"), "{ls}");
    let show = cim.cimctl_ok(&["run", "show", &run.run_id]).await?;
    assert!(show.contains("summary") && show.contains(&summary_id), "{show}");
    let pls = cim.cimctl_ok(&["pipeline", "ls"]).await?;
    assert!(pls.contains("text-ingest") && pls.contains("active"), "{pls}");
    let json: serde_json::Value =
        serde_json::from_str(&cim.cimctl_ok(&["pipeline", "show", "text-ingest", "--json"]).await?)?;
    assert_eq!(json["runs"]["completed"], 1);

    // A pinned plugin version cannot be removed while the pipeline exists.
    let rm = cim.cimctl(&["plugin", "rm", "text-normalize@1.0.0"]).await?;
    assert!(!rm.status.success());
    assert!(String::from_utf8_lossy(&rm.stderr).contains("pipeline"), "{}", String::from_utf8_lossy(&rm.stderr));

    // The run's state rebuilds from its events: another engine instance answers the same.
    let mut cim = cim;
    cim.engine(0).terminate(Duration::from_secs(10)).await?;
    cim.add_engine(&[]).await?;
    let again = cim.run(&run.run_id).await?;
    assert_eq!(again.state, "completed");
    assert_eq!(again.units, run.units);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_definitions_are_refused_before_anything_runs() -> Result<()> {
    let cim = Cim::leaf(1, &[]).await?;
    let base = serde_json::json!({
        "name": "bad", "trigger": {"on": "unit.created"},
        "steps": [{"id": "a", "plugin": "text-normalize@1.0.0"}, {"id": "b", "tag": ["x"]}]
    });
    let cases: Vec<(serde_json::Value, &str)> = vec![
        (
            serde_json::json!({"name": "bad", "trigger": {"on": "unit.created"}, "steps": [{"id": "a", "plugin": "no-such@9.9.9"}]}),
            "unknown plugin no-such@9.9.9",
        ),
        (
            serde_json::json!({"name": "bad", "trigger": {"on": "unit.created"}, "steps": [{"id": "a", "capability": "no.such"}]}),
            "unknown plugin capability no.such",
        ),
        (
            serde_json::json!({"name": "bad", "trigger": {"on": "unit.created"}, "steps": [{"id": "a", "plugin": "text-normalize@1.0.0", "input": "b.output"}, {"id": "b", "plugin": "crc32@1.0.0", "input": "a.output"}]}),
            "a cycle",
        ),
        (
            serde_json::json!({"name": "bad", "trigger": {"on": "unit.created"}, "steps": [{"id": "a", "plugin": "text-normalize@1.0.0", "input": "ghost.output"}]}),
            "missing input",
        ),
        (
            serde_json::json!({"name": "bad", "trigger": {"on": "unit.created"}, "steps": [{"id": "a", "filter": {"field": "unit.media_type"}}]}),
            "exactly one of equals",
        ),
        (
            serde_json::json!({"name": "bad", "trigger": {"on": "unit.exploded"}, "steps": [{"id": "a", "tag": ["x"]}]}),
            "matches no event",
        ),
        (
            serde_json::json!({"name": "bad", "trigger": {"on": "unit.created", "media_type": "not a type"}, "steps": [{"id": "a", "tag": ["x"]}]}),
            "media_type",
        ),
        (
            serde_json::json!({"name": "Bad Name", "trigger": {"on": "manual"}, "steps": [{"id": "a", "tag": ["x"]}]}),
            "pipeline name",
        ),
        (serde_json::json!({"name": "bad", "trigger": {"on": "manual"}, "steps": []}), "at least one step"),
    ];
    for (def, needle) in cases {
        let out = cim.apply(&def).await?;
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success() && err.contains(needle), "{def}: {err}");
    }
    // Not JSON at all, and a raw request that is not JSON.
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("p.json");
    std::fs::write(&file, "{ nope")?;
    let out = cim.cimctl(&["pipeline", "apply", &file.to_string_lossy()]).await?;
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not JSON"));
    let raw = cim.fx.client().request(pl::command(pl::cmd::APPLY)?, "garbage".into()).await?;
    assert_eq!(
        raw.headers.as_ref().and_then(|h| h.get("Nats-Service-Error-Code")).map(|v| v.to_string()).as_deref(),
        Some("400")
    );
    // Nothing was written, and a good definition still applies.
    let list: pl::PipelineList = cim.request(pl::query(pl::qry::LIST)?, serde_json::json!({})).await?;
    assert!(list.pipelines.is_empty(), "{list:?}");
    cim.apply_ok(&base).await?;
    let out = cim.cimctl(&["pipeline", "show", "nope"]).await?;
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("404"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_steps_retry_with_backoff_then_dead_letter_and_can_be_retried() -> Result<()> {
    let cim = Cim::leaf(1, &[]).await?;
    push(&cim, TRAP, "boom", "1.0.0", "test.flaky").await?;
    cim.apply_ok(&serde_json::json!({
        "name": "flaky", "trigger": {"on": "manual"},
        "steps": [
            {"id": "work", "capability": "test.flaky", "input": "unit.content", "retries": 2, "backoff_ms": 50},
            {"id": "done", "tag": ["worked"]}
        ]
    }))
    .await?;
    let unit = cim.put(b"input", "in.txt", "text/plain").await?;
    let run_id = cim.start_run("flaky", &unit, &[]).await?;
    let run = cim.wait_state(&run_id, "failed").await?;
    let work = &run.steps[0];
    assert_eq!((work.state.as_str(), work.attempts), ("failed", 3), "{run:?}");
    assert!(run.error.contains("trapped") && run.error.contains("after 3 attempts"), "{}", run.error);
    assert_eq!(run.steps[1].state, "pending");
    let failed = cim.run_events(pl::action::STEP_FAILED).await?;
    assert_eq!(failed.len(), 3);
    // The work item is dead-lettered with the reason.
    let dlq = eventually!(LONG, "dead letter", {
        let d = cim.dead_letters(pl::DLQ_RUNS).await?;
        ensure!(d.len() == 1, "{} dead letters", d.len());
        Ok(d)
    })?;
    let reason = dlq[0]
        .headers
        .as_ref()
        .and_then(|h| h.get(pl::H_DEAD_LETTER_REASON))
        .map(|v| v.to_string())
        .unwrap_or_default();
    assert!(reason.contains(&run_id) && reason.contains("trapped"), "{reason}");

    // The plugin goes away (nothing pins a capability): the retried run fails at once, clearly.
    cim.cimctl_ok(&["plugin", "rm", "boom@1.0.0"]).await?;
    cim.cimctl_ok(&["run", "retry", &run_id]).await?;
    let run = cim.wait_state(&run_id, "failed").await?;
    assert!(run.error.contains("not_found") && run.error.contains("test.flaky"), "{}", run.error);
    assert_eq!(run.steps[0].attempts, 1, "a missing plugin is not retried: {run:?}");

    // A fixed plugin with the capability: retry finishes the run from its failed step.
    push(
        &cim,
        r#"(module (memory (export "memory") 1) (func (export "cim_invoke") (result i32) (i32.const 0)))"#,
        "fixed",
        "1.0.0",
        "test.flaky",
    )
    .await?;
    let out = cim.cimctl(&["run", "retry", &run_id, "--watch"]).await?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let run = cim.run(&run_id).await?;
    assert_eq!(run.state, "completed");
    assert!(cim.iu.unit(&unit).await?.tags.contains(&"worked".to_string()));
    // Retrying a completed run is refused.
    let out = cim.cimctl(&["run", "retry", &run_id]).await?;
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("409"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_messages_are_dead_lettered_and_the_engine_keeps_running() -> Result<()> {
    let cim = Cim::leaf(1, &[]).await?;
    cim.apply_ok(&serde_json::json!({
        "name": "tagger", "trigger": {"on": "unit.created"},
        "steps": [{"id": "tag", "tag": ["seen"]}]
    }))
    .await?;
    let js = cim.js();
    // An event with no envelope and a body that is not a UnitCreated.
    js.publish(cim_events::iu::unit_event("poison1", cim_events::iu::action::CREATED)?, "\u{ff}garbage".into())
        .await?
        .await?;
    // A run work item that is not a RunRequested.
    js.publish(pl::run_event("poison2", pl::action::REQUESTED)?, "garbage".into()).await?.await?;
    let d = eventually!(LONG, "poison trigger dead-lettered", {
        let d = cim.dead_letters(pl::DLQ_TRIGGERS).await?;
        ensure!(d.len() == 1, "{} dead letters", d.len());
        Ok(d)
    })?;
    let h = d[0].headers.as_ref().context("headers")?;
    assert!(h.get(pl::H_DEAD_LETTER_REASON).map(|v| v.to_string()).unwrap_or_default().contains("envelope"));
    assert_eq!(
        h.get(pl::H_ORIGINAL_SUBJECT).map(|v| v.to_string()).as_deref(),
        Some(cim_events::iu::unit_event("poison1", cim_events::iu::action::CREATED)?.as_str())
    );
    assert_eq!(d[0].payload.as_ref(), "\u{ff}garbage".as_bytes());
    eventually!(LONG, "poison run dead-lettered", {
        let d = cim.dead_letters(pl::DLQ_RUNS).await?;
        ensure!(
            d.len() == 1,
            "{} dead letters; engine log: {}",
            d.len(),
            cim.fx.service(Component::PipelineEngine).log()
        );
        let reason = d[0]
            .headers
            .as_ref()
            .and_then(|h| h.get(pl::H_DEAD_LETTER_REASON))
            .map(|v| v.to_string())
            .unwrap_or_default();
        ensure!(reason.contains("envelope"), "{reason}");
        Ok(())
    })?;
    // A real unit still triggers the pipeline.
    let unit = cim.put(b"ok", "ok.txt", "text/plain").await?;
    eventually!(LONG, "unit tagged", {
        ensure!(cim.iu.unit(&unit).await?.tags.contains(&"seen".to_string()));
        Ok(())
    })?;
    // Unknown runs and bad requests get clear errors.
    let err = cim.cimctl(&["run", "show", "no-such-run"]).await?;
    assert!(!err.status.success() && String::from_utf8_lossy(&err.stderr).contains("404"));
    let err = cim.cimctl(&["run", "cancel", "a.b"]).await?;
    assert!(!err.status.success() && String::from_utf8_lossy(&err.stderr).contains("400"));
    let err = cim.cimctl(&["pipeline", "start", "tagger", "--unit", "no-such-unit"]).await?;
    assert!(!err.status.success() && String::from_utf8_lossy(&err.stderr).contains("400"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_run_can_be_cancelled() -> Result<()> {
    let cim = Cim::leaf(1, &[]).await?;
    push(&cim, SLEEPY_WAT, "sleepy", "1.0.0", "").await?;
    cim.apply_ok(&serde_json::json!({
        "name": "slow", "trigger": {"on": "manual"},
        "steps": [
            {"id": "wait", "plugin": "sleepy@1.0.0", "input": "unit.content", "options": {"ms": "{param.ms}"}, "timeout_ms": 60000},
            {"id": "after", "tag": ["after-cancel"]}
        ]
    }))
    .await?;
    let unit = cim.put(b"x", "x.txt", "text/plain").await?;
    let run_id = cim.start_run("slow", &unit, &[("ms", "8000")]).await?;
    eventually!(LONG, "step running", {
        let r = cim.run(&run_id).await?;
        ensure!(r.steps[0].state == "running", "{:?}", r.steps[0]);
        Ok(())
    })?;
    let out = cim.cimctl_ok(&["run", "cancel", &run_id, "--reason", "changed my mind"]).await?;
    assert!(out.contains("cancelled"), "{out}");
    let run = cim.wait_state(&run_id, "cancelled").await?;
    assert!(run.error.contains("changed my mind"));
    // The engine lets go of it: no later step, no completion.
    stays_true_for(Duration::from_secs(1), "the run stays cancelled with its later step pending", || async {
        let run = cim.run(&run_id).await?;
        ensure!(run.state == "cancelled", "run is {}", run.state);
        ensure!(run.steps[1].state == "pending", "{:?}", run.steps[1]);
        ensure!(
            !cim.iu.unit(&unit).await?.tags.contains(&"after-cancel".to_string()),
            "the later step tagged the unit"
        );
        Ok(())
    })
    .await?;
    let again = cim.cimctl(&["run", "cancel", &run_id]).await?;
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("it is cancelled"));
    // The engine is free for other work.
    let quick = cim.start_run("slow", &unit, &[("ms", "1")]).await?;
    cim.wait_state(&quick, "completed").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_concurrency_limit_holds_across_two_engines() -> Result<()> {
    let cim = Cim::leaf(2, &[]).await?;
    push(&cim, SLEEPY_WAT, "sleepy", "1.0.0", "").await?;
    cim.apply_ok(&serde_json::json!({
        "name": "one-at-a-time", "trigger": {"on": "manual"}, "concurrency": 1,
        "steps": [{"id": "wait", "plugin": "sleepy@1.0.0", "options": {"ms": "300"}, "input": "unit.content"}]
    }))
    .await?;
    let unit = cim.put(b"x", "x.txt", "text/plain").await?;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(cim.start_run("one-at-a-time", &unit, &[]).await?);
    }
    let max_running = std::sync::atomic::AtomicUsize::new(0);
    let max_running = &max_running;
    eventually!(LONG, "all runs complete", {
        let runs = cim.runs("one-at-a-time").await?;
        let running = runs.iter().filter(|r| r.steps.first().is_some_and(|s| s.state == "running")).count();
        max_running.fetch_max(running, std::sync::atomic::Ordering::SeqCst);
        let done = runs.iter().filter(|r| r.state == "completed").count();
        ensure!(done == ids.len(), "{done} of {} done", ids.len());
        Ok(())
    })?;
    let max_running = max_running.load(std::sync::atomic::Ordering::SeqCst);
    assert!(max_running <= 1, "{max_running} runs ran at once");
    // Each run's step ran once: one step_started per run.
    let started = cim.run_events(pl::action::STEP_STARTED).await?;
    assert_eq!(started.len(), ids.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_one_of_two_engines_mid_run_loses_no_run_and_repeats_no_effect() -> Result<()> {
    let mut cim = Cim::leaf(0, &[]).await?;
    for id in ["engine-a", "engine-b"] {
        cim.add_engine(&["--pipeline-ack-wait", "2s", "--instance-id", id]).await?;
    }
    push(&cim, SLEEPY_WAT, "sleepy", "1.0.0", "").await?;
    cim.apply_ok(&serde_json::json!({
        "name": "derive", "trigger": {"on": "unit.created", "media_type": "text/*"},
        "steps": [
            {"id": "slow", "plugin": "sleepy@1.0.0", "options": {"ms": "700"}, "input": "unit.content"},
            {"id": "tag", "tag": ["derived"]}
        ],
        "sinks": [{"id": "copy", "create_unit": {"content": "slow.output", "name": "{unit.name}.copy", "media_type": "application/octet-stream", "tags": ["copy"]}}]
    }))
    .await?;
    const N: usize = 6;
    let mut units = Vec::new();
    for i in 0..N {
        units.push(cim.put(format!("document {i}").as_bytes(), &format!("d{i}.txt"), "text/plain").await?);
    }
    // Kill engine-a while it holds a run that has not completed.
    let victim = eventually!(LONG, "engine-a holding a run", {
        let started = cim.run_events(pl::action::STARTED).await?;
        for m in started {
            let s = cim_events::proto::pipeline::RunStarted::decode(m.payload.clone())?;
            if s.instance_id == "engine-a" && cim.run(&s.run_id).await?.state == "running" {
                return Ok(s.run_id);
            }
        }
        anyhow::bail!("engine-a holds no running run")
    })?;
    cim.engine(0).signal(nix::sys::signal::Signal::SIGKILL);
    cim.engine(0).wait(Duration::from_secs(10)).await?;
    let runs = eventually!(Duration::from_secs(120), "every run completes", {
        let runs = cim.runs("derive").await?;
        let done = runs.iter().filter(|r| r.state == "completed").count();
        ensure!(runs.len() == N && done == N, "{done} of {} runs completed ({N} expected)", runs.len());
        Ok(runs)
    })?;
    // engine-b took the victim's run over and finished it.
    let takeovers: Vec<String> = cim
        .run_events(pl::action::STARTED)
        .await?
        .iter()
        .filter_map(|m| cim_events::proto::pipeline::RunStarted::decode(m.payload.clone()).ok())
        .filter(|s| s.run_id == victim)
        .map(|s| s.instance_id)
        .collect();
    assert_eq!(takeovers, vec!["engine-a".to_string(), "engine-b".to_string()]);
    // Exactly once in effect: one run per unit, one completion per run, one copy per unit.
    let mut per_unit: HashMap<String, usize> = HashMap::new();
    for r in &runs {
        *per_unit.entry(r.unit_id.clone()).or_default() += 1;
    }
    assert!(units.iter().all(|u| per_unit.get(u) == Some(&1)), "{per_unit:?}");
    let completed = cim.run_events(pl::action::COMPLETED).await?;
    assert_eq!(completed.len(), N);
    let copies = cim.iu.list_all(ListUnits { tag: "copy".into(), ..Default::default() }).await?;
    assert_eq!(copies.len(), N, "{:?}", copies.iter().map(|u| &u.name).collect::<Vec<_>>());
    for u in &units {
        let unit = cim.iu.unit(u).await?;
        assert!(unit.tags.contains(&"derived".to_string()));
        let incoming = cim.iu.links(u).await?.incoming;
        assert_eq!(incoming.len(), 1, "{u}: {incoming:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelines_run_on_a_three_node_cluster() -> Result<()> {
    let cim = Cim::start(CimFixture::builder().cluster(3), 1, &[]).await?;
    let js = cim.js();
    for name in [
        resources::events_stream(Component::PipelineEngine).name,
        resources::dead_letter_stream(Component::PipelineEngine).name,
        resources::kv_buckets(Component::PipelineEngine)[0].stream_name(),
    ] {
        assert_eq!(js.get_stream(&name).await?.info().await?.config.num_replicas, 3, "{name}");
    }
    cim.apply_ok(&example()?).await?;
    let unit = cim.put(b"clustered   text\r\n", "c.txt", "text/plain").await?;
    eventually!(LONG, "run completes on the cluster", {
        let runs = cim.runs("text-ingest").await?;
        ensure!(runs.iter().any(|r| r.unit_id == unit && r.state == "completed"), "{runs:?}");
        Ok(())
    })?;
    assert!(cim.iu.unit(&unit).await?.tags.contains(&"normalized".to_string()));
    Ok(())
}

/// The engine, the plugin host (invocation by version, routing, announcements), the information
/// unit, the registry and the storage manager each with its own NATS identity, whose
/// permissions are the generated ones in `nixos-modules/nats-permissions.json`: the shipped
/// example runs end to end and none of them hits a permissions violation.
#[tokio::test(flavor = "multi_thread")]
async fn the_core_services_run_with_their_generated_nats_permissions() -> Result<()> {
    let own = [
        Component::InformationUnit,
        Component::Registry,
        Component::StorageManager,
        Component::PluginHost,
        Component::PipelineEngine,
    ];
    let mut builder = CimFixture::builder().generated_permissions();
    for c in own {
        builder = builder.service(Svc::new(c).own_identity());
    }
    let fx = builder.start().await?;
    let mut cim = Cim { iu: fx.iu(), fx };
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/pipelines/text-ingest.json");
    let out = cim.cimctl(&["pipeline", "apply", &path.to_string_lossy()]).await?;
    let engine = cim.fx.service(Component::PipelineEngine);
    ensure!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), engine.log());
    let unit = cim.put(b"permitted   text\n", "p.txt", "text/plain").await?;
    let run = eventually!(LONG, "the run completes", {
        let runs = cim.runs("text-ingest").await?;
        let r = runs.iter().find(|r| r.unit_id == unit).context("no run yet")?;
        let logs = own.iter().map(|c| cim.fx.service(*c).log()).collect::<Vec<_>>().join("\n");
        ensure!(r.state == "completed", "run is {} {}\n{logs}", r.state, r.error);
        Ok(r.clone())
    })?;
    assert_eq!(run.units.len(), 2, "{run:?}");
    for c in own {
        let svc = cim.fx.service_mut(c);
        let status = svc.terminate(Duration::from_secs(30)).await?;
        let log = svc.log();
        assert!(status.success(), "{c} exited {status}:\n{log}");
        assert!(!log.to_lowercase().contains("permissions violation"), "{c} hit its permissions:\n{log}");
    }
    Ok(())
}

/// A plugin host restarting is not a failure of the runs that need it: a step whose plugin
/// nobody serves waits for a provider (within its timeout) without spending its retries.
#[tokio::test(flavor = "multi_thread")]
async fn runs_wait_for_a_restarting_plugin_host_instead_of_failing() -> Result<()> {
    let mut cim = Cim::leaf(1, &[]).await?;
    cim.apply_ok(&example()?).await?;
    let host = cim.fx.services_mut().iter_mut().find(|s| s.component == Component::PluginHost).context("host")?;
    host.signal(nix::sys::signal::Signal::SIGKILL);
    host.wait(Duration::from_secs(30)).await?;
    let mut units = Vec::new();
    for i in 0..8 {
        units.push(cim.put(format!("line {i}\r\n\r\n  more  ").as_bytes(), &format!("n{i}.txt"), "text/plain").await?);
    }
    // The runs say what they wait for, in the view and in `cimctl run show`.
    let waiting = eventually!(LONG, "a run says it waits for a provider", {
        let runs = cim.runs("text-ingest").await?;
        let r = runs
            .iter()
            .find(|r| r.steps.iter().any(|s| s.state == "waiting" && s.waiting_for.contains("a provider of")))
            .with_context(|| format!("no run says it waits: {runs:?}"))?;
        Ok(r.run_id.clone())
    })?;
    let shown = cim.cimctl_ok(&["run", "show", &waiting]).await?;
    ensure!(shown.contains("waiting for a provider of text-normalize"), "{shown}");
    // Down for longer than the default retry budget (2 retries, 200/400 ms) lasts.
    stays_true_for(Duration::from_secs(3), "no run fails while the host is down", || async {
        let runs = cim.runs("text-ingest").await?;
        ensure!(runs.iter().all(|r| r.state != "failed"), "{runs:?}");
        Ok(())
    })
    .await?;
    let host = cim.fx.services_mut().iter_mut().find(|s| s.component == Component::PluginHost).context("host")?;
    host.restart().await?;
    eventually!(LONG, "every run completes", {
        let runs = cim.runs("text-ingest").await?;
        let done = runs.iter().filter(|r| units.contains(&r.unit_id) && r.state == "completed").count();
        ensure!(runs.iter().all(|r| r.state != "failed"), "{runs:?}");
        ensure!(done == units.len(), "{done} of {} completed", units.len());
        Ok(())
    })?;
    ensure!(cim.dead_letters(pl::DLQ_RUNS).await?.is_empty(), "runs were dead-lettered");
    let failed = cim.run_events(pl::action::STEP_FAILED).await?;
    ensure!(failed.is_empty(), "{} step failures recorded", failed.len());
    // Each wait was recorded once, and is over: no step of a completed run still waits.
    let notes = cim.run_events(pl::action::STEP_WAITING).await?;
    ensure!(
        !notes.is_empty() && notes.len() <= 2 * units.len(),
        "{} step_waiting events for {} runs",
        notes.len(),
        units.len()
    );
    let runs = cim.runs("text-ingest").await?;
    ensure!(runs.iter().all(|r| r.steps.iter().all(|s| s.waiting_for.is_empty())), "{runs:?}");
    Ok(())
}

/// A trigger event held by an engine that died is taken over after the engine's short ack
/// wait (10 s by default), not a fixed 30 s, and starts one run.
#[tokio::test(flavor = "multi_thread")]
async fn a_trigger_held_by_a_killed_engine_is_taken_over_within_the_ack_wait() -> Result<()> {
    let mut cim = Cim::start(CimFixture::builder(), 0, &[]).await?;
    cim.fx.start(Svc::new(Component::PipelineEngine).env(cim_runtime::crash::ENV, "pipeline.trigger.received")).await?;
    let definition = serde_json::json!({
        "name": "taken-over", "trigger": {"on": "unit.created"}, "steps": [{"id": "mark", "tag": ["taken-over"]}]
    });
    cim.apply_ok(&definition).await?;
    let unit = cim.put(b"hold me", "held.txt", "text/plain").await?;
    // The armed engine receives the trigger and dies holding it.
    cim.engine(0).wait(LONG).await?;
    let died = std::time::Instant::now();
    cim.add_engine(&[]).await?;
    let run = eventually!(LONG, "the run of the held trigger completes", {
        let runs = cim.runs("taken-over").await?;
        let r = runs.iter().find(|r| r.unit_id == unit).context("no run yet")?;
        ensure!(r.state == "completed", "run is {} {}", r.state, r.error);
        Ok(runs)
    })?;
    let took = died.elapsed();
    ensure!(run.len() == 1, "{} runs: {run:?}", run.len());
    ensure!(took < Duration::from_secs(20), "taken over {took:?} after the engine died");
    Ok(())
}
