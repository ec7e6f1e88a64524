//! `cimctl` as a user runs it, against real servers: `iu` output that pipes (`--json`),
//! verified downloads, incoming links; `--help` in groups; one-line errors in one style, usage
//! mistakes refused with 64 before anything connects; connection errors that say where CIM
//! is; `status` without the object store's read consumers; and a service's reconnect counter.

use std::{path::Path, process::Output, time::Duration};

use anyhow::{Context, Result};
use cim_events::{Cid, Component, resources};
use cim_testkit::NatsServer;
use serde_json::Value;

use crate::common::{ServiceProc, bin, wait_ready};

/// A unit id that no service knows.
const UNKNOWN_UNIT: &str = "0190f4c2-6a1e-7c3b-9d52-3f4a1b2c3d4e";

/// `cimctl ARGS` in `dir` (when given), with no CIM_* variable from the environment.
async fn run(dir: Option<&Path>, args: &[&str]) -> Result<Output> {
    let mut cmd = tokio::process::Command::new(bin("cimctl"));
    cmd.args(args);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CIM_") {
            cmd.env_remove(k);
        }
    }
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    Ok(tokio::time::timeout(Duration::from_secs(60), cmd.output()).await??)
}

async fn cimctl(nats: &str, args: &[&str]) -> Result<Output> {
    let all: Vec<&str> = ["iu", "--nats-url", nats].iter().chain(args).copied().collect();
    run(None, &all).await
}

async fn json(nats: &str, args: &[&str]) -> Result<Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = cimctl(nats, &all).await?;
    anyhow::ensure!(out.status.success(), "cimctl iu {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The one line a failed command printed, checked for the house style.
fn one_error_line(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let first = err.lines().next().unwrap_or_default().to_string();
    assert!(first.starts_with("cimctl: "), "{err}");
    first
}

#[tokio::test(flavor = "multi_thread")]
async fn cimctl_iu_puts_lists_shows_tags_and_gets_verified_content() -> Result<()> {
    let nats = NatsServer::start().await?;
    let url = nats.url();
    let svc = ServiceProc::start(Component::InformationUnit, &url, &[])?;
    wait_ready(&nats.connect().await, &svc).await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, b"some notes\n")?;

    let put = json(&url, &["put", file.to_str().unwrap(), "--tag", "draft", "--attr", "lang=en"]).await?;
    let id = put["result"]["unit_id"].as_str().unwrap().to_string();
    assert_eq!(put["content"]["cid"], Cid::of(b"some notes\n").to_string());

    let show = json(&url, &["show", &id]).await?;
    assert_eq!(show["name"], "notes.txt");
    assert_eq!(show["media_type"], "text/plain");
    assert_eq!(show["tags"], serde_json::json!(["draft"]));
    assert_eq!(show["attributes"]["lang"], "en");

    assert_eq!(show["version"], 1, "a new unit is version 1");
    json(&url, &["tag", &id, "final"]).await?;
    let history = json(&url, &["history", &id]).await?;
    assert_eq!(history["entries"].as_array().unwrap().len(), 2);
    assert_eq!(history["entries"][1]["version"], 2, "{history}");
    assert_eq!(json(&url, &["show", &id]).await?["version"], 2);

    let out_file = dir.path().join("copy.txt");
    let got = cimctl(&url, &["get", &id, "-o", out_file.to_str().unwrap()]).await?;
    assert!(got.status.success(), "{}", String::from_utf8_lossy(&got.stderr));
    assert_eq!(std::fs::read(&out_file)?, b"some notes\n");
    let stdout = cimctl(&url, &["get", &id, "--range", "5-10"]).await?;
    assert_eq!(stdout.stdout, b"notes");
    // "at this version" is spelled the same for show and get; get's old --version still works
    let v1 = cimctl(&url, &["get", &id, "--at-version", &show["version"].to_string()]).await?;
    assert_eq!(v1.stdout, b"some notes\n", "{}", String::from_utf8_lossy(&v1.stderr));
    let v1 = cimctl(&url, &["get", &id, "--version", &show["version"].to_string()]).await?;
    assert_eq!(v1.stdout, b"some notes\n", "{}", String::from_utf8_lossy(&v1.stderr));
    let past = json(&url, &["show", &id, "--at-version", &show["version"].to_string()]).await?;
    assert_eq!(past["tags"], serde_json::json!(["draft"]));

    let list = cim_testkit::eventually(Duration::from_secs(10), "unit listed", || async {
        let l = json(&url, &["ls", "--tag", "final"]).await?;
        anyhow::ensure!(l.as_array().is_some_and(|a| !a.is_empty()), "{l}");
        Ok(l)
    })
    .await?;
    assert!(list.to_string().contains(&id), "{list}");

    // a stale --expect is a conflict with a clear one-line error
    let stale = cimctl(&url, &["tag", &id, "x", "--expect", "1"]).await?;
    assert_eq!(stale.status.code(), Some(1));
    let err = String::from_utf8_lossy(&stale.stderr);
    assert!(err.contains("conflict") && err.trim().lines().count() == 1, "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cimctl_iu_show_lists_the_links_to_a_unit_too() -> Result<()> {
    let nats = NatsServer::start().await?;
    let url = nats.url();
    let svc = ServiceProc::start(Component::InformationUnit, &url, &[])?;
    wait_ready(&nats.connect().await, &svc).await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("a.txt");
    std::fs::write(&file, b"a")?;
    let source = json(&url, &["put", file.to_str().unwrap()]).await?["result"]["unit_id"].as_str().unwrap().to_string();
    let target = json(&url, &["put", file.to_str().unwrap(), "--name", "b"]).await?["result"]["unit_id"]
        .as_str()
        .unwrap()
        .to_string();
    json(&url, &["link", &source, "cites", &target]).await?;

    let shown = cim_testkit::eventually(Duration::from_secs(10), "incoming link shown", || async {
        let v = json(&url, &["show", &target]).await?;
        anyhow::ensure!(v["incoming_links"].as_array().is_some_and(|a| !a.is_empty()), "{v}");
        Ok(v)
    })
    .await?;
    assert_eq!(shown["incoming_links"], serde_json::json!([{ "kind": "cites", "source": source }]));
    let text = cimctl(&url, &["show", &target]).await?;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(&format!("  cites <- {source}\n")), "{text}");
    let text = cimctl(&url, &["show", &source]).await?;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(&format!("  cites -> {target}\n")) && !text.contains("<-"), "{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cimctl_iu_says_clearly_when_no_service_answers() -> Result<()> {
    let nats = NatsServer::start().await?;
    let out = cimctl(&nats.url(), &["show", UNKNOWN_UNIT]).await?;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unavailable"), "{err}");
    let usage = cimctl(&nats.url(), &["tag"]).await?;
    assert_eq!(usage.status.code(), Some(64));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cimctl_help_shows_the_commands_in_groups() -> Result<()> {
    let out = run(None, &["--help"]).await?;
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for group in
        ["Information units:", "Pipelines:", "Plugins:", "Status, nodes and placement:", "Archive and restore:"]
    {
        assert!(help.contains(group), "{group} in:\n{help}");
    }
    assert!(help.contains("Start a leaf node on this machine:\n  up "), "{help}");
    assert!(!help.contains("Commands:"), "{help}");
    // A command without its subcommand shows what it has, as a usage mistake.
    let out = run(None, &["iu"]).await?;
    assert_eq!(out.status.code(), Some(64));
    let help = String::from_utf8_lossy(&out.stderr);
    assert!(help.contains("Usage: cimctl iu [OPTIONS] <COMMAND>\n\nCommands:\n  put "), "{help}");
    let out = run(None, &["iu", "get", "--help"]).await?;
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--at-version <V>") && help.contains("<ID_OR_CID>  A unit id"), "{help}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cimctl_refuses_malformed_values_as_usage_before_connecting() -> Result<()> {
    // Nothing listens at this URL: a usage mistake is found before connecting.
    let nowhere = format!("nats://127.0.0.1:{}", cim_testkit::free_port());
    let out = run(None, &["iu", "--nats-url", &nowhere, "show", "some-unit"]).await?;
    assert_eq!(out.status.code(), Some(64), "{}", String::from_utf8_lossy(&out.stderr));
    let line = one_error_line(&out);
    assert!(line.contains("'some-unit'") && line.contains("a unit id is a UUID such as"), "{line}");
    assert!(!line.contains("not found"), "{line}");

    let out = run(None, &["run", "--nats-url", &nowhere, "ls", "--state", "bogus"]).await?;
    assert_eq!(out.status.code(), Some(64));
    let line = one_error_line(&out);
    assert!(line.contains("'bogus'") && line.contains("queued, running, completed, failed, cancelled"), "{line}");

    let out = run(None, &["iu", "--nats-url", &nowhere, "get", "nope"]).await?;
    assert_eq!(out.status.code(), Some(64));
    assert!(one_error_line(&out).contains("neither a unit id"));

    let out = run(None, &["token", "--nats-url", &nowhere, "create", "--name", "x", "--role", "root"]).await?;
    assert_eq!(out.status.code(), Some(64));
    assert!(one_error_line(&out).starts_with("cimctl: unknown role \"root\": use one of "));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cimctl_errors_are_one_line_in_one_style_without_repeats_or_serde_words() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("missing.txt");
    let missing = missing.to_str().unwrap();
    let nowhere = format!("nats://127.0.0.1:{}", cim_testkit::free_port());

    // A file that is not there: said once, before connecting, without the OS error number.
    let out = run(None, &["iu", "--nats-url", &nowhere, "put", missing]).await?;
    assert_eq!(out.status.code(), Some(1));
    let line = one_error_line(&out);
    assert_eq!(line, format!("cimctl: cannot read {missing}: No such file or directory"));
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);

    // Definitions of the wrong shape, in words.
    let file = dir.path().join("p.json");
    let file_s = file.to_str().unwrap();
    for (text, says) in [(" \n", "empty document"), ("[]", "expected an object, found an empty list")] {
        std::fs::write(&file, text)?;
        let out = run(None, &["pipeline", "--nats-url", &nowhere, "apply", file_s]).await?;
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(one_error_line(&out), format!("cimctl: pipeline definition {file_s}: {says}"));
    }

    // What the engine refuses reads the same way.
    let nats = NatsServer::start().await?;
    let engine = ServiceProc::start(Component::PipelineEngine, &nats.url(), &[])?;
    wait_ready(&nats.connect().await, &engine).await?;
    for (definition, says) in [
        (r#"{"name": "p", "trigger": {"on": "manual"}}"#, "missing field `steps`"),
        (r#"{"name": "p", "trigger": {"on": "manual"}, "steps": {}}"#, "expected a list, found an object"),
    ] {
        std::fs::write(&file, definition)?;
        let out = run(None, &["pipeline", "--nats-url", &nats.url(), "apply", file_s]).await?;
        assert_eq!(out.status.code(), Some(1));
        let line = one_error_line(&out);
        assert!(line.starts_with("cimctl: pipeline-engine refused (400): pipeline definition: "), "{line}");
        assert!(line.contains(says), "{line}");
        assert!(
            !line.contains("invalid type") && !line.contains("expected struct") && !line.contains("sequence"),
            "{line}"
        );
    }
    let out = run(None, &["run", "--nats-url", &nats.url(), "show", "no-such-run"]).await?;
    let line = one_error_line(&out);
    assert!(line.starts_with("cimctl: pipeline-engine refused (404): "), "{line}");
    // A service that is not running is named.
    let out = run(None, &["plugin", "--nats-url", &nats.url(), "ls"]).await?;
    let line = one_error_line(&out);
    assert!(line.starts_with("cimctl: no plugin-host is running (nothing answers on "), "{line}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cimctl_says_which_url_it_tried_and_where_cim_up_wrote_its_own() -> Result<()> {
    let port = cim_testkit::free_port();
    let nowhere = format!("nats://127.0.0.1:{port}");
    let dir = tempfile::tempdir()?;
    for args in [vec!["iu", "--nats-url", &nowhere, "ls"], vec!["status", "--nats-url", &nowhere]] {
        let out = run(Some(dir.path()), &args).await?;
        assert_eq!(out.status.code(), Some(1));
        let line = one_error_line(&out);
        assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
        assert!(line.starts_with(&format!("cimctl: nothing answers at {nowhere} (")), "{line}");
        assert!(
            line.contains("CIM_NATS_URL") && line.contains("cimctl up") && line.contains(".cim/nats.url"),
            "{line}"
        );
    }
    // With a leaf's URL in .cim/nats.url (what `cimctl up` writes), the hint names it.
    std::fs::create_dir(dir.path().join(".cim"))?;
    std::fs::write(dir.path().join(".cim/nats.url"), "nats://127.0.0.1:4999")?;
    let out = run(Some(dir.path()), &["token", "--nats-url", &nowhere, "ls"]).await?;
    let line = one_error_line(&out);
    assert!(line.contains("export CIM_NATS_URL=nats://127.0.0.1:4999"), "{line}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cimctl_status_leaves_out_the_object_stores_read_consumers() -> Result<()> {
    let nats = NatsServer::start().await?;
    let url = nats.url();
    let client = nats.connect().await;
    let svc = ServiceProc::start(Component::InformationUnit, &url, &[])?;
    wait_ready(&client, &svc).await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("a.bin");
    std::fs::write(&file, vec![7u8; 300_000])?;
    let put = json(&url, &["put", file.to_str().unwrap()]).await?;
    let cid = put["content"]["cid"].as_str().context("cid")?.to_string();

    // A read of the content in progress: the object store made a consumer for it.
    let spec = resources::object_buckets(Component::InformationUnit).into_iter().next().context("content bucket")?;
    let js = async_nats::jetstream::new(client.clone());
    let store = js.get_object_store(&spec.bucket).await?;
    let mut reading = store.get(&cid).await?;
    let mut first = [0u8; 1024];
    tokio::io::AsyncReadExt::read(&mut reading, &mut first).await?; // the first read makes the consumer
    let mut stream = js.get_stream(spec.stream_name()).await?;
    assert!(stream.info().await?.state.consumer_count >= 1, "the read made a consumer");

    let out = run(None, &["status", "--nats-url", &url, "--json"]).await?;
    let status: Value =
        serde_json::from_slice(&out.stdout).with_context(|| String::from_utf8_lossy(&out.stderr).to_string())?;
    let consumers = status["consumers"].as_array().context("consumers")?;
    assert!(consumers.iter().all(|c| c["stream"] != spec.stream_name().as_str()), "{consumers:#?}");
    assert!(
        consumers.iter().any(|c| c["name"] == cim_events::iu::projector_consumer().as_str()),
        "the work-routing consumers stay: {consumers:#?}"
    );
    drop(reading);
    Ok(())
}

/// The value of `name` (one series) in a Prometheus text exposition.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split(['{', ' ']).next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_nats_reconnects_total_counts_reconnects_only() -> Result<()> {
    let mut nats = NatsServer::start().await?;
    let svc = ServiceProc::start(Component::InformationUnit, &nats.url(), &[])?;
    let http = wait_ready(&nats.connect().await, &svc).await?.service.context("service")?.http_addr;
    let reconnects = || async {
        let text = cim_testkit::http_get(&http, "/metrics").await?.text();
        metric(&text, "cim_nats_reconnects_total").with_context(|| format!("no cim_nats_reconnects_total in:\n{text}"))
    };
    assert_eq!(reconnects().await?, 0.0, "a fresh start has not reconnected");

    nats.restart().await?; // the same port and store
    wait_ready(&nats.connect().await, &svc).await?;
    cim_testkit::eventually(Duration::from_secs(30), "one reconnect counted", || async {
        let n = reconnects().await?;
        anyhow::ensure!(n == 1.0, "cim_nats_reconnects_total {n}");
        Ok(())
    })
    .await?;
    Ok(())
}
