//! The seven services as real processes against real nats-servers: start, provision, answer,
//! report health, survive a NATS restart, run on a 3-node cluster, refuse bad configuration,
//! carry trace context, and stop cleanly.

use std::{collections::BTreeSet, time::Duration};

use anyhow::Result;
use async_nats::{HeaderMap, jetstream};
use cim_events::{
    Component,
    proto::runtime::{ServiceAnnounced, ServiceStopped},
    resources,
    subject::{self, MicroVerb},
};
use cim_testkit::{eventually, http_get};
use futures::StreamExt;
use nix::sys::signal::Signal;

use crate::common::{READY, bin, decode_lifecycle, describe, wait_ready};
use crate::fixture::{CimFixture, Svc};

fn owned_streams(c: Component) -> Vec<(String, bool)> {
    resources::streams(c)
        .into_iter()
        .map(|s| (s.name, false))
        .chain(resources::object_buckets(c).iter().map(|b| (b.stream_name(), true)))
        .chain(resources::kv_buckets(c).iter().map(|b| (b.stream_name(), true)))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn all_seven_start_provision_answer_and_stop_on_sigterm() -> Result<()> {
    let mut cim = CimFixture::builder().start().await?;
    let client = cim.client().clone();
    let mut lifecycle = client.subscribe(subject::all_lifecycle()).await?;
    client.flush().await?;

    for c in Component::ALL {
        cim.start(Svc::new(c).no_wait()).await?;
    }
    let js = cim.js();
    for p in cim.services() {
        let d = wait_ready(&client, p).await?;
        let svc = d.service.clone().unwrap();
        assert_eq!(svc.component, p.component.token());
        assert_eq!(svc.contract_version, cim_events::CONTRACT_VERSION);
        // every owned stream and bucket exists, with the leaf's one replica
        for (name, _) in owned_streams(p.component) {
            let info = js.get_stream(&name).await?.info().await?.config.clone();
            assert_eq!(info.num_replicas, 1, "{name}");
        }
        assert_eq!(d.streams.len(), owned_streams(p.component).len());
        // $SRV.PING reaches it through the micro services protocol
        let ping = client.request(subject::micro(MicroVerb::Ping, p.component), "".into()).await?;
        let ping: serde_json::Value = serde_json::from_slice(&ping.payload)?;
        assert_eq!(ping["name"], p.component.micro_name());
        // metrics on the HTTP endpoint
        let metrics = http_get(&svc.http_addr, "/metrics").await?.text();
        assert!(metrics.contains("cim_ready{"), "{metrics}");
        assert!(http_get(&svc.http_addr, "/livez").await?.status == 200);
    }
    let stats = client.request(subject::micro(MicroVerb::Stats, Component::Registry), "".into()).await?;
    let stats: serde_json::Value = serde_json::from_slice(&stats.payload)?;
    let describe =
        stats["endpoints"].as_array().unwrap().iter().find(|e| e["name"] == "describe").expect("describe endpoint");
    assert!(describe["num_requests"].as_u64().unwrap() >= 1, "{stats}");

    // each announced itself with a valid envelope
    let mut announced = BTreeSet::new();
    while announced.len() < 7 {
        let m = tokio::time::timeout(READY, lifecycle.next()).await?.expect("subscription open");
        if m.subject.ends_with(".announce") {
            let (env, a): (_, ServiceAnnounced) = decode_lifecycle(&m)?;
            assert!(env.is_root());
            announced.insert(a.component);
        }
    }

    for p in cim.services_mut() {
        let status = p.terminate(Duration::from_secs(20)).await?;
        assert!(status.success(), "{} exited with {status}; log:\n{}", p.component, p.log());
        assert!(p.log().contains("stopped"), "{}", p.log());
    }
    let mut goodbyes = BTreeSet::new();
    while goodbyes.len() < 7 {
        let m = tokio::time::timeout(Duration::from_secs(10), lifecycle.next())
            .await
            .map_err(|_| anyhow::anyhow!("goodbyes so far: {goodbyes:?}"))?
            .unwrap();
        if m.subject.ends_with(".goodbye") {
            let (_, g): (_, ServiceStopped) = decode_lifecycle(&m)?;
            goodbyes.insert(g.component);
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn all_seven_reconnect_after_nats_restarts() -> Result<()> {
    let mut cim = CimFixture::with(Component::ALL).await?;
    let mut health = Vec::new();
    for i in 0..cim.services().len() {
        health.push(cim.wait_ready(i).await?.service.unwrap().http_addr);
    }

    cim.server_mut().stop();
    for http in &health {
        eventually(READY, "readyz 503 while NATS is down", || async {
            let r = http_get(http, "/readyz").await?;
            anyhow::ensure!(r.status == 503, "readyz {}", r.status);
            Ok(())
        })
        .await?;
        assert!(http_get(http, "/livez").await?.status == 200, "alive while NATS is down");
    }

    cim.server_mut().restart().await?;
    let client = cim.connect().await?;
    for (p, http) in cim.services().iter().zip(&health) {
        wait_ready(&client, p).await?;
        let metrics = http_get(http, "/metrics").await?.text();
        assert!(metrics.contains("cim_nats_reconnects_total"), "{metrics}");
    }
    for p in cim.services_mut() {
        assert!(p.terminate(Duration::from_secs(20)).await?.success(), "{}", p.log());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn all_seven_run_on_a_three_node_cluster_with_r3_streams() -> Result<()> {
    let mut cim = CimFixture::builder().cluster(3).services(Component::ALL).start().await?;
    let client = cim.client().clone();
    let js = cim.js();
    for p in cim.services() {
        let d = wait_ready(&client, p).await?;
        for s in &d.streams {
            assert_eq!(s.replicas, 3, "{}", s.name);
            assert!(!s.leader.is_empty(), "{} has a leader", s.name);
        }
        for (name, _) in owned_streams(p.component) {
            let info = js.get_stream(&name).await?.info().await?.clone();
            assert_eq!(info.config.num_replicas, 3, "{name}");
            assert_eq!(info.cluster.unwrap().replicas.len(), 2, "{name} has two followers");
        }
    }
    for p in cim.services_mut() {
        assert!(p.terminate(Duration::from_secs(20)).await?.success(), "{}", p.log());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_configuration_exits_64_with_one_clear_line() -> Result<()> {
    // (service, arguments, environment, what the refusal names)
    type Case = (Component, &'static [&'static str], &'static [(&'static str, &'static str)], &'static str);
    let cases: [Case; 7] = [
        (Component::InformationUnit, &["--tier", "edge"], &[], "edge"),
        (Component::Registry, &["--nats-url", "http://127.0.0.1:1"], &[], "unsupported scheme"),
        (Component::PipelineEngine, &[], &[("CIM_INSTANCE_ID", "a.b")], "instance id"),
        (Component::PluginHost, &["--shutdown-grace", "0s"], &[], "shutdown-grace"),
        (Component::StorageManager, &["--nats-creds", "/nonexistent/svc.creds"], &[], "nats-creds"),
        (Component::UiGateway, &["--http-listen", "not-an-address"], &[], "http-listen"),
        (Component::IntegrationHub, &["--frobnicate"], &[], "frobnicate"),
    ];
    for (c, args, env, want) in cases {
        let out =
            tokio::process::Command::new(bin(c.service_name())).args(args).envs(env.iter().copied()).output().await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{c} {args:?}: {stderr}");
        assert!(stderr.contains(want), "{c} {args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
    // --help documents every option with its environment variable, and exits 0
    let out = tokio::process::Command::new(bin("registry")).arg("--help").output().await?;
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for env in [
        "CIM_NATS_URL",
        "CIM_NATS_CREDS",
        "CIM_JS_DOMAIN",
        "CIM_TIER",
        "CIM_HTTP_LISTEN",
        "CIM_INSTANCE_ID",
        "CIM_NODE",
        "CIM_SHUTDOWN_GRACE",
        "CIM_HEARTBEAT_INTERVAL",
        "CIM_MAX_IN_FLIGHT",
    ] {
        assert!(help.contains(env), "--help lacks {env}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_destructive_change_to_an_owned_stream_is_refused() -> Result<()> {
    let mut cim = CimFixture::builder().start().await?;
    let js = cim.js();
    // An operator (or an old version) left the events stream with a work-queue retention.
    let mut cfg = resources::events_stream(Component::Registry).config(cim_events::Tier::Leaf);
    cfg.retention = jetstream::stream::RetentionPolicy::WorkQueue;
    cfg.deny_delete = false;
    cfg.deny_purge = false;
    js.create_stream(cfg.clone()).await?;
    let svc = cim.start(Svc::new(Component::Registry).no_wait()).await?;
    let status = svc.wait(Duration::from_secs(30)).await?;
    assert_eq!(status.code(), Some(1), "{}", svc.log());
    let log = svc.log();
    assert!(log.contains(&format!("refusing to change stream {}", cfg.name)), "{log}");
    assert!(log.contains("retention"), "{log}");
    // nothing was changed
    let now = js.get_stream(&cfg.name).await?.info().await?.config.clone();
    assert_eq!(now.retention, jetstream::stream::RetentionPolicy::WorkQueue);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_a_clear_error_and_the_service_keeps_serving() -> Result<()> {
    let cim = CimFixture::with([Component::StorageManager]).await?;
    let client = cim.client().clone();
    let reply = client.request(subject::query(Component::StorageManager, "describe")?, "garbage".into()).await?;
    let h = reply.headers.expect("error headers");
    assert_eq!(h.get("Nats-Service-Error-Code").unwrap().as_str(), "400");
    assert!(h.get("Nats-Service-Error").unwrap().as_str().contains("empty request body"));
    describe(&client, Component::StorageManager).await?;
    Ok(())
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread")]
async fn trace_context_is_continued_across_nats_and_exported_over_otlp() -> Result<()> {
    let collector = crate::otlp::Collector::start().await?;
    let endpoint = collector.endpoint();
    let cim = CimFixture::builder()
        .service(
            Svc::new(Component::Registry)
                .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
                .env("OTEL_BSP_SCHEDULE_DELAY", "100"),
        )
        .start()
        .await?;
    let client = cim.client().clone();

    // caller → service: our traceparent is continued by the service's span
    let mut headers = HeaderMap::new();
    headers.insert("traceparent", format!("00-{TRACE_ID}-{PARENT_SPAN}-01").as_str());
    let reply =
        client.request_with_headers(subject::query(Component::Registry, "describe")?, headers, "".into()).await?;
    let tp = reply.headers.as_ref().and_then(|h| h.get("traceparent")).expect("reply carries traceparent").to_string();
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts[1], TRACE_ID, "same trace: {tp}");
    assert_ne!(parts[2], PARENT_SPAN, "a new span of the service: {tp}");

    // service → others: what it publishes carries its own trace context
    let mut lifecycle = client.subscribe(subject::all_lifecycle()).await?;
    let beat = loop {
        let m = tokio::time::timeout(Duration::from_secs(10), lifecycle.next()).await?.unwrap();
        if m.subject.ends_with(".heartbeat") {
            break m;
        }
    };
    let beat_tp = beat.headers.as_ref().and_then(|h| h.get("traceparent")).map(|v| v.to_string());
    assert!(beat_tp.is_some_and(|t| t.len() == 55), "heartbeat carries traceparent");

    // the service's span was exported over OTLP/HTTP with our trace id
    let trace_bytes: Vec<u8> = (0..16).map(|i| u8::from_str_radix(&TRACE_ID[2 * i..2 * i + 2], 16).unwrap()).collect();
    eventually(Duration::from_secs(20), "a span of our trace at the OTLP collector", || async {
        anyhow::ensure!(collector.received_containing(&trace_bytes), "{} exports so far", collector.count());
        Ok(())
    })
    .await?;
    drop(cim);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_service_leaves_consistent_state_and_a_restart_serves_again() -> Result<()> {
    let mut cim = CimFixture::builder()
        .service(Svc::new(Component::InformationUnit).args(&["--instance-id", "iu-1"]))
        .start()
        .await?;
    let svc = cim.service_mut(Component::InformationUnit);
    svc.signal(Signal::SIGKILL);
    svc.wait(Duration::from_secs(10)).await?;
    svc.restart().await?;
    let d = cim.wait_ready(0).await?;
    let svc = cim.service(Component::InformationUnit);
    assert_eq!(d.service.unwrap().instance_id, "iu-1");
    assert!(!svc.log().contains("created"), "the restart found everything provisioned:\n{}", svc.log());
    Ok(())
}
