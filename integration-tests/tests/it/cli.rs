//! `cimctl iu` as a user runs it, against a real information-unit service: output that pipes
//! (`--json`), verified downloads, and clear errors.

use std::{process::Output, time::Duration};

use anyhow::Result;
use cim_events::{Cid, Component};
use cim_testkit::NatsServer;
use serde_json::Value;

use crate::common::{ServiceProc, bin, wait_ready};

async fn cimctl(nats: &str, args: &[&str]) -> Result<Output> {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(bin("cimctl")).arg("iu").args(["--nats-url", nats]).args(args).output(),
    )
    .await??;
    Ok(out)
}

async fn json(nats: &str, args: &[&str]) -> Result<Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = cimctl(nats, &all).await?;
    anyhow::ensure!(out.status.success(), "cimctl iu {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
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

    json(&url, &["tag", &id, "final"]).await?;
    let history = json(&url, &["history", &id]).await?;
    assert_eq!(history["entries"].as_array().unwrap().len(), 2);

    let out_file = dir.path().join("copy.txt");
    let got = cimctl(&url, &["get", &id, "-o", out_file.to_str().unwrap()]).await?;
    assert!(got.status.success(), "{}", String::from_utf8_lossy(&got.stderr));
    assert_eq!(std::fs::read(&out_file)?, b"some notes\n");
    let stdout = cimctl(&url, &["get", &id, "--range", "5-10"]).await?;
    assert_eq!(stdout.stdout, b"notes");

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
async fn cimctl_iu_says_clearly_when_no_service_answers() -> Result<()> {
    let nats = NatsServer::start().await?;
    let out = cimctl(&nats.url(), &["show", "some-unit"]).await?;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unavailable"), "{err}");
    let usage = cimctl(&nats.url(), &["tag"]).await?;
    assert_eq!(usage.status.code(), Some(64));
    Ok(())
}
