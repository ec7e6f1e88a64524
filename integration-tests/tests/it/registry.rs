//! The registry and operations against real processes: discovery by capability, lost instances,
//! bad lifecycle input, drain and decommission on a 3-node cluster, placement checks,
//! `cimctl status` on a healthy and a degraded cluster, and one trace across three services.

use std::{
    process::Output,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use async_nats::{HeaderMap, jetstream};
use cim_events::{
    Component, Envelope,
    payload::encode,
    proto::{
        registry::{GetOverview, Instance, InstanceList, InstanceLost, ListInstances, Overview},
        runtime::{ServiceAnnounced, ServiceHeartbeat},
    },
    registry as names, resources,
    subject::{self, Lifecycle},
};
use cim_testkit::{eventually, http_get};
use futures::StreamExt;
use nix::sys::signal::Signal;
use prost::Message;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{bin, describe};
use crate::fixture::{CimFixture, Svc};

const WAIT: Duration = Duration::from_secs(30);

async fn cimctl(args: &[&str]) -> Result<Output> {
    Ok(tokio::time::timeout(Duration::from_secs(120), tokio::process::Command::new(bin("cimctl")).args(args).output())
        .await??)
}

async fn cimctl_json(args: &[&str]) -> Result<Value> {
    let out = cimctl(args).await?;
    anyhow::ensure!(
        out.status.success(),
        "cimctl {args:?} exited {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("cimctl {args:?} printed {}", String::from_utf8_lossy(&out.stdout)))
}

async fn ask<R: Message + Default>(client: &async_nats::Client, subject: String, req: &impl Message) -> Result<R> {
    let reply =
        tokio::time::timeout(Duration::from_secs(10), client.request(subject, req.encode_to_vec().into())).await??;
    if let Some(code) = reply.headers.as_ref().and_then(|h| h.get("Nats-Service-Error-Code")) {
        anyhow::bail!("error {code}: {:?}", reply.headers.as_ref().and_then(|h| h.get("Nats-Service-Error")));
    }
    Ok(R::decode(reply.payload)?)
}

async fn instances(client: &async_nats::Client, q: ListInstances) -> Result<Vec<Instance>> {
    Ok(ask::<InstanceList>(client, names::query(names::qry::INSTANCES)?, &q).await?.instances)
}

async fn overview(client: &async_nats::Client) -> Result<Overview> {
    ask(client, names::query(names::qry::OVERVIEW)?, &GetOverview::default()).await
}

/// Waits until the registry lists `id` as alive.
async fn registered(client: &async_nats::Client, id: &str) -> Result<Instance> {
    eventually(WAIT, &format!("{id} registered"), || async {
        let all = instances(client, ListInstances::default()).await?;
        all.into_iter().find(|i| i.instance_id == id).ok_or_else(|| anyhow::anyhow!("not yet"))
    })
    .await
}

/// Subjects of the events in the registry's stream, in order.
async fn event_subjects(js: &jetstream::Context) -> Result<Vec<String>> {
    let stream = js.get_stream(resources::events_stream(Component::Registry).name).await?;
    let last = stream.get_info().await?.state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        if let Ok(m) = stream.get_raw_message(seq).await {
            out.push(m.subject.to_string());
        }
    }
    Ok(out)
}

fn announcement(id: &str, c: Component, version: &str, contract: u32, incarnation: &str) -> ServiceAnnounced {
    ServiceAnnounced {
        component: c.token().into(),
        service: c.service_name().into(),
        version: version.into(),
        instance_id: id.into(),
        node: "sim".into(),
        contract_version: contract,
        capabilities: vec!["simulated".into()],
        incarnation: incarnation.into(),
        heartbeat_interval_ms: 200,
        ..Default::default()
    }
}

async fn publish<P: cim_events::Payload>(client: &async_nats::Client, subject: String, p: &P) -> Result<()> {
    let (h, b) = encode(&Envelope::root::<P>("/cim/sim/test/x"), p);
    client.publish_with_headers(subject, h, b).await?;
    client.flush().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_discovers_instances_by_name_and_capability_and_projects_them() -> Result<()> {
    let mut cim = CimFixture::builder().start().await?;
    let url = cim.url().to_string();
    let client = cim.client().clone();
    // information-unit starts first: the registry learns of it by asking everyone to announce.
    cim.start(Svc::new(Component::InformationUnit).args(&["--instance-id", "iu-1", "--node", "n1"])).await?;
    cim.start(Svc::new(Component::Registry).args(&["--instance-id", "reg-1", "--node", "n1"])).await?;
    cim.start(Svc::new(Component::StorageManager).args(&["--instance-id", "sm-1", "--node", "n2"])).await?;

    let iu1 = registered(&client, "iu-1").await?;
    assert_eq!(
        (iu1.service.as_str(), iu1.node.as_str(), iu1.contract_version),
        ("information-unit", "n1", cim_events::CONTRACT_VERSION)
    );
    let create = cim_events::iu::command(cim_events::iu::cmd::CREATE)?;
    assert!(iu1.subjects.contains(&create), "{:?}", iu1.subjects);
    registered(&client, "sm-1").await?;

    // by capability, through cimctl
    let found = cimctl_json(&["registry", "--nats-url", &url, "--json", "find", "--capability", "units"]).await?;
    let ids: Vec<&str> =
        found["instances"].as_array().unwrap().iter().map(|i| i["instance_id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["iu-1"]);
    let found = cimctl_json(&["registry", "--nats-url", &url, "--json", "find", "--capability", "discovery"]).await?;
    assert_eq!(found["instances"][0]["instance_id"], "reg-1");
    // by name (service name or token) and by node
    let by_name =
        instances(&client, ListInstances { component: "storage-manager".into(), ..Default::default() }).await?;
    assert_eq!(by_name.len(), 1);
    assert_eq!(by_name[0].instance_id, "sm-1");
    let on_n1 = instances(&client, ListInstances { node: "n1".into(), ..Default::default() }).await?;
    assert_eq!(on_n1.iter().map(|i| i.instance_id.as_str()).collect::<Vec<_>>(), vec!["iu-1", "reg-1"]);
    let err = ask::<InstanceList>(
        &client,
        names::query(names::qry::INSTANCES)?,
        &ListInstances { component: "nope".into(), ..Default::default() },
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("400"), "{err}");
    let ls = cimctl(&["registry", "--nats-url", &url, "ls"]).await?;
    let text = String::from_utf8_lossy(&ls.stdout);
    assert!(text.contains("iu-1") && text.contains("3 instance(s) of 3 service(s)"), "{text}");

    // registration is an event; the KV projection has it
    let js = jetstream::new(client.clone());
    let subjects = event_subjects(&js).await?;
    assert!(subjects.contains(&names::instance_event("iu-1", names::action::REGISTERED)?), "{subjects:?}");
    let kv = js.get_key_value(resources::kv_bucket(Component::Registry, names::KV_INSTANCES)?).await?;
    let projected = eventually(WAIT, "iu-1 in the KV projection", || async {
        let v = kv.get(names::instance_key("iu-1")?).await?.ok_or_else(|| anyhow::anyhow!("not yet"))?;
        Ok(Instance::decode(v)?)
    })
    .await?;
    assert_eq!(projected.incarnation, iu1.incarnation);

    // a graceful stop is an event too, and the instance leaves the list
    let sm = cim.service_mut(Component::StorageManager);
    assert!(sm.terminate(Duration::from_secs(20)).await?.success());
    eventually(WAIT, "sm-1 stopped", || async {
        let all = instances(&client, ListInstances { include_gone: true, ..Default::default() }).await?;
        let sm = all.iter().find(|i| i.instance_id == "sm-1").ok_or_else(|| anyhow::anyhow!("gone"))?;
        anyhow::ensure!(sm.state() == cim_events::proto::registry::InstanceState::InstanceStopped, "{:?}", sm.state());
        Ok(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_instance_is_marked_lost_within_its_ttl_and_work_goes_elsewhere() -> Result<()> {
    let mut cim = CimFixture::builder().start().await?;
    let client = cim.client().clone();
    let js = cim.js();
    cim.start(Svc::new(Component::Registry).args(&["--instance-id", "reg-a", "--node", "n1"])).await?;
    cim.start(Svc::new(Component::Registry).args(&["--instance-id", "reg-b", "--node", "n2"]).no_wait()).await?;
    cim.start(Svc::new(Component::StorageManager).args(&["--instance-id", "sm-1", "--node", "n2"])).await?;
    let sm1 = registered(&client, "sm-1").await?;
    registered(&client, "reg-b").await?;
    // 3 heartbeats of 200ms, but at least the registry's 1s floor
    assert_eq!(sm1.ttl_ms, 1000);

    let mut lost_events =
        client.subscribe(names::instance_event("X", names::action::LOST)?.replace(".X.", ".*.")).await?;
    client.flush().await?;
    let sm = cim.service_mut(Component::StorageManager);
    sm.signal(Signal::SIGKILL);
    sm.wait(Duration::from_secs(10)).await?;
    let killed = Instant::now();
    let m = tokio::time::timeout(WAIT, lost_events.next()).await?.unwrap();
    let took = killed.elapsed();
    let (_, lost): (_, InstanceLost) = crate::common::decode_lifecycle(&m)?;
    assert_eq!(lost.instance_id, "sm-1");
    assert_eq!(lost.ttl_ms, 1000);
    // TTL after the last beat, plus one check period (250ms), plus scheduling on a busy machine
    assert!(took < Duration::from_millis(1000 + 250 + 1500), "lost after {took:?}");
    let now_ms = (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis()) as i64;
    assert!(now_ms - lost.last_seen_ms >= 1000, "not before its ttl");

    // a registry instance vanishes too: the other one marks it lost and serves every query
    let reg_a = &mut cim.services_mut()[0];
    reg_a.signal(Signal::SIGKILL);
    reg_a.wait(Duration::from_secs(10)).await?;
    eventually(WAIT, "reg-a lost, seen by reg-b", || async {
        let all = instances(&client, ListInstances { include_gone: true, ..Default::default() }).await?;
        let a = all.iter().find(|i| i.instance_id == "reg-a").ok_or_else(|| anyhow::anyhow!("unknown"))?;
        anyhow::ensure!(a.state() == cim_events::proto::registry::InstanceState::InstanceLost, "{:?}", a.state());
        Ok(())
    })
    .await?;
    for _ in 0..10 {
        let o = overview(&client).await?;
        assert_eq!(o.registry_instance, "reg-b");
    }
    let subjects = event_subjects(&js).await?;
    let sm1_lost = names::instance_event("sm-1", names::action::LOST)?;
    let lost_once = subjects.iter().filter(|s| **s == sm1_lost).count();
    assert_eq!(lost_once, 1, "two registry instances record one loss: {subjects:?}");
    let o = overview(&client).await?;
    assert!(
        o.problems.iter().any(|p| p.subject == "instance sm-1" && p.reason.starts_with("lost on node n2")),
        "{:?}",
        o.problems
    );
    Ok(())
}

/// The projector tells a store failure from a poison event: an instance registered while its
/// KV bucket is gone is projected once the bucket is back (the service re-provisions it), not
/// passed over.
#[tokio::test(flavor = "multi_thread")]
async fn registry_projection_applies_events_again_after_a_store_failure() -> Result<()> {
    let cim =
        CimFixture::builder().service(Svc::new(Component::Registry).args(&["--instance-id", "reg-1"])).start().await?;
    let client = cim.client().clone();
    let js = cim.js();
    let bucket = resources::kv_bucket(Component::Registry, names::KV_INSTANCES)?;
    let c = Component::PipelineEngine;
    let announce = |id: &str| subject::lifecycle(c, id, Lifecycle::Announce).unwrap();
    js.delete_key_value(&bucket).await?;
    // Registered (an event) while the projection has nowhere to go.
    publish(&client, announce("gap-1"), &announcement("gap-1", c, "0.1.0", 1, "i1")).await?;
    registered(&client, "gap-1").await?;
    let projected = eventually(WAIT, "gap-1 in the re-provisioned KV projection", || async {
        let kv = js.get_key_value(&bucket).await?;
        let v = kv.get(names::instance_key("gap-1")?).await?.ok_or_else(|| anyhow::anyhow!("not yet"))?;
        Ok(Instance::decode(v)?)
    })
    .await?;
    assert_eq!(projected.incarnation, "i1");
    // A poison event is passed over; what follows it is projected.
    client.publish(names::instance_event("poison-1", names::action::REGISTERED)?, "garbage".into()).await?;
    publish(&client, announce("after-1"), &announcement("after-1", c, "0.1.0", 1, "i2")).await?;
    eventually(WAIT, "after-1 projected after the poison event", || async {
        let kv = js.get_key_value(&bucket).await?;
        kv.get(names::instance_key("after-1")?).await?.ok_or_else(|| anyhow::anyhow!("not yet"))?;
        Ok(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_lifecycle_input_gets_a_clear_reason_and_duplicates_and_stale_versions_are_flagged() -> Result<()> {
    let mut cim =
        CimFixture::builder().service(Svc::new(Component::Registry).args(&["--instance-id", "reg-1"])).start().await?;
    let url = cim.url().to_string();
    let client = cim.client().clone();
    let js = cim.js();
    let c = Component::PipelineEngine;
    let announce = |id: &str| subject::lifecycle(c, id, Lifecycle::Announce).unwrap();

    // malformed: garbage body, a foreign subject, no incarnation, a bad version, a future schema
    client.publish(announce("bad-1"), "garbage".into()).await?;
    publish(&client, announce("bad-2"), &announcement("someone-else", c, "0.1.0", 1, "x")).await?;
    publish(&client, announce("bad-3"), &announcement("bad-3", c, "0.1.0", 1, "")).await?;
    publish(&client, announce("bad-4"), &announcement("bad-4", c, "one", 1, "x")).await?;
    let mut h = HeaderMap::new();
    Envelope::new_root(
        <ServiceAnnounced as cim_events::Payload>::TYPE,
        cim_events::Schema { name: <ServiceAnnounced as cim_events::Payload>::TYPE.into(), version: 9 },
        "/x",
    )
    .write_headers(&mut h);
    client
        .publish_with_headers(announce("bad-5"), h, announcement("bad-5", c, "0.1.0", 1, "x").encode_to_vec().into())
        .await?;
    client.flush().await?;
    let dlq = resources::dead_letter_stream(Component::Registry).name;
    let reasons = eventually(WAIT, "five dead letters", || async {
        let stream = js.get_stream(&dlq).await?;
        let n = stream.get_info().await?.state.last_sequence;
        anyhow::ensure!(n >= 5, "{n} dead letters");
        let mut reasons = Vec::new();
        for seq in 1..=n {
            let m = stream.get_raw_message(seq).await?;
            assert_eq!(m.subject.as_str(), names::lifecycle_dead_letter());
            reasons.push(format!(
                "{} <- {}",
                m.headers.get(names::DLQ_REASON).unwrap().as_str(),
                m.headers.get(names::DLQ_SUBJECT).unwrap().as_str()
            ));
        }
        Ok(reasons)
    })
    .await?;
    let want = [
        ("announce: invalid envelope", "bad-1"),
        ("announcement of instance \"someone-else\" published on the subject of \"bad-2\"", "bad-2"),
        ("no incarnation", "bad-3"),
        ("version \"one\" is not MAJOR.MINOR.PATCH", "bad-4"),
        ("schema version 9, newer than the 2 this build knows", "bad-5"),
    ];
    for (reason, id) in want {
        assert!(
            reasons.iter().any(|r| r.contains(reason.trim_start_matches("announce: ")) && r.contains(id)),
            "{reason}: {reasons:#?}"
        );
    }
    assert!(instances(&client, ListInstances::default()).await?.iter().all(|i| !i.instance_id.starts_with("bad-")));
    assert_eq!(overview(&client).await?.rejected, 5);

    // incompatible contract and stale version are registered but flagged
    publish(&client, announce("old-1"), &announcement("old-1", c, "0.0.9", 1, "i1")).await?;
    publish(&client, announce("new-1"), &announcement("new-1", c, "0.2.0", 1, "i2")).await?;
    publish(&client, announce("odd-1"), &announcement("odd-1", c, "0.2.0", 99, "i3")).await?;
    let o = eventually(WAIT, "flags", || async {
        let o = overview(&client).await?;
        let text: Vec<String> = o.problems.iter().map(|p| format!("{}: {}", p.subject, p.reason)).collect();
        anyhow::ensure!(text.iter().any(|t| t == "instance old-1: stale version 0.0.9 while 0.2.0 runs"), "{text:#?}");
        anyhow::ensure!(
            text.iter().any(|t| t == "instance odd-1: incompatible: speaks contract v99, this registry v1"),
            "{text:#?}"
        );
        Ok(o)
    })
    .await?;
    assert!(o.instances.iter().any(|i| i.instance_id == "odd-1" && i.incompatible.contains("v99")));

    // two live processes with one instance id: flagged as a duplicate (an event), named in status
    cim.start(Svc::new(Component::StorageManager).args(&["--instance-id", "dup-1", "--node", "na"])).await?;
    registered(&client, "dup-1").await?;
    cim.start(Svc::new(Component::StorageManager).args(&["--instance-id", "dup-1", "--node", "nb"]).no_wait()).await?;
    let text = eventually(WAIT, "duplicate flagged", || async {
        let s = cimctl_json(&["status", "--nats-url", &url, "--json"]).await?;
        let problems: Vec<String> = s["problems"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| format!("{}: {}", p["subject"].as_str().unwrap(), p["reason"].as_str().unwrap()))
            .collect();
        anyhow::ensure!(
            problems.iter().any(|p| p.starts_with("instance dup-1: duplicate instance id: another process")),
            "{problems:#?}"
        );
        Ok(problems)
    })
    .await?;
    assert!(text.iter().any(|p| p.contains("on node n")), "{text:#?}");
    let duplicated = names::instance_event("dup-1", names::action::DUPLICATED)?;
    assert!(event_subjects(&js).await?.iter().any(|s| s.starts_with(&duplicated)));
    // and heartbeats that lie about who they are are refused too
    let hb = ServiceHeartbeat {
        component: "hub".into(),
        instance_id: "liar".into(),
        incarnation: "x".into(),
        ..Default::default()
    };
    publish(&client, subject::lifecycle(c, "liar", Lifecycle::Heartbeat)?, &hb).await?;
    eventually(WAIT, "lying heartbeat refused", || async {
        anyhow::ensure!(overview(&client).await?.rejected == 6);
        Ok(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn placement_check_says_whether_it_fits_and_exactly_why_not() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_string_lossy().to_string()
    };
    let base = r#"{
      "cpu_overcommit": 4.0, "safety_buffer": "100MiB",
      "nodes": [{"name": "n1", "memory": "2GiB", "reserved": "512MiB", "cpus": 2},
                {"name": "n2", "memory": "1GiB", "reserved": "624MiB", "cpus": 1}],
      "services": [{"name": "ui-gateway", "replicas": 2, "memory_max": "512MiB", "cpu": 0.5},
                   {"name": "registry", "memory_max": "128MiB", "cpu": 0.25}]"#;
    let fits =
        write("fits.json", &format!(r#"{base}, "assignments": {{"n1": ["ui-gateway", "ui-gateway", "registry"]}} }}"#));
    let out = cimctl(&["placement", "check", &fits, "--json"]).await?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(r["fits"], true);
    assert_eq!(r["nodes"][0]["services"][0]["memory_max_bytes"], 512u64 << 20);
    assert_eq!(r["nodes"][0]["services"][0]["cpu_weight"], 50);

    let tight = write(
        "tight.json",
        &format!(r#"{base}, "assignments": {{"n1": ["ui-gateway", "registry"], "n2": ["ui-gateway"]}} }}"#),
    );
    let out = cimctl(&["placement", "check", &tight]).await?;
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Does not fit") && text.contains("ui-gateway needs 512 MiB, n2 has 300 MiB allocatable"),
        "{text}"
    );

    let propose = cimctl(&["placement", "check", &tight, "--propose", "--json"]).await?;
    let r: Value = serde_json::from_slice(&propose.stdout)?;
    assert_eq!((r["fits"].as_bool(), r["proposed"].as_bool()), (Some(true), Some(true)), "{r}");

    let unknown = format!("{} }}", base.replace("ui-gateway", "ui-gatway"));
    for (file, text, want) in [
        ("broken.json", "{ \"nodes\": [".to_string(), "placement file does not parse"),
        ("unknown.json", unknown, "unknown service \"ui-gatway\""),
    ] {
        let p = write(file, &text);
        let out = cimctl(&["placement", "check", &p]).await?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{file}: {err}");
        assert!(err.contains(want) && err.trim().lines().count() == 1, "{file}: {err}");
    }
    let out = cimctl(&["placement", "check", "/nonexistent/p.json"]).await?;
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read placement file"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn drain_stops_intake_and_decommission_waits_for_nothing_stateful_on_a_three_node_cluster() -> Result<()> {
    let mut cim = CimFixture::builder().cluster(3).start().await?;
    let urls = cim.url().to_string();
    let client = cim.client().clone();
    let js = cim.js();
    cim.start(Svc::new(Component::Registry).args(&["--instance-id", "reg-1", "--node", "ops"])).await?;
    cim.start(Svc::new(Component::StorageManager).args(&["--instance-id", "sm-1", "--node", "n2"]).no_wait()).await?;
    cim.start(Svc::new(Component::PipelineEngine).args(&["--instance-id", "pe-1", "--node", "n2"]).no_wait()).await?;
    let sm_http = cim.wait_ready(1).await?.service.unwrap().http_addr;
    cim.wait_ready(2).await?;
    let sm = cim.service(Component::StorageManager);
    registered(&client, "sm-1").await?;
    registered(&client, "pe-1").await?;
    let node = |args: &[&str]| {
        let mut all = vec!["node", "--nats-url", urls.as_str(), "--json"];
        all.extend_from_slice(args);
        all.iter().map(|s| s.to_string()).collect::<Vec<String>>()
    };
    let run = |a: Vec<String>| async move { cimctl(&a.iter().map(String::as_str).collect::<Vec<_>>()).await };

    let n2 = cimctl_json(
        &node(&["enroll", "n2", "--memory", "8GiB", "--reserved", "1GiB", "--cpus", "4", "--label", "zone=a"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )
    .await?;
    assert_eq!((n2["state"].as_str(), n2["memory_bytes"].as_u64()), (Some("schedulable"), Some(8 << 30)));
    let again = run(node(&["enroll", "n2", "--memory", "8GiB", "--cpus", "4"])).await?;
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("(409): node n2 is schedulable: already enrolled"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let early = run(node(&["decommission", "n2"])).await?;
    assert!(!early.status.success());
    assert!(
        String::from_utf8_lossy(&early.stderr).contains("node n2 is schedulable: drain it first"),
        "{}",
        String::from_utf8_lossy(&early.stderr)
    );

    // drain: both services on n2 stop their endpoints and background intake and report drained
    let drained = cimctl_json(
        &node(&["drain", "n2", "--wait", "--reason", "maintenance"]).iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await?;
    assert_eq!(drained["state"], "drained", "{drained}");
    for id in ["sm-1", "pe-1"] {
        let i = registered(&client, id).await?;
        assert_eq!(i.state(), cim_events::proto::registry::InstanceState::InstanceDrained, "{id}");
    }
    // no new work: describe has no responder any more; still alive but not ready; metric says so
    let err = describe(&client, Component::StorageManager).await.unwrap_err();
    assert!(format!("{err:#}").contains("no responders"), "{err:#}");
    assert_eq!(http_get(&sm_http, "/readyz").await?.status, 503);
    assert_eq!(http_get(&sm_http, "/livez").await?.status, 200);
    assert!(
        http_get(&sm_http, "/metrics")
            .await?
            .text()
            .contains("cim_draining{service=\"storage-manager\",instance=\"sm-1\"} 1")
    );
    assert!(sm.log().contains("drained"), "{}", sm.log());

    // a node whose nats-server holds stream replicas cannot be decommissioned
    let server = cim.cluster().node(2).server_name().to_string();
    cimctl_json(
        &node(&["enroll", "n3", "--memory", "8GiB", "--cpus", "4", "--jetstream-server", &server])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )
    .await?;
    cimctl_json(&node(&["drain", "n3", "--wait"]).iter().map(String::as_str).collect::<Vec<_>>()).await?;
    let refused = run(node(&["decommission", "n3"])).await?;
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        err.contains("node n3 still holds replicas of")
            && err.contains(&format!("on nats-server {server}"))
            && err.contains(&resources::events_stream(Component::Registry).name),
        "{err}"
    );

    let gone = cimctl_json(&node(&["decommission", "n2"]).iter().map(String::as_str).collect::<Vec<_>>()).await?;
    assert_eq!(gone["state"], "decommissioned");
    let ls = cimctl_json(&node(&["ls"]).iter().map(String::as_str).collect::<Vec<_>>()).await?;
    assert_eq!(ls["nodes"].as_array().unwrap().len(), 1, "decommissioned nodes are hidden: {ls}");

    let n2_events: Vec<String> = event_subjects(&js)
        .await?
        .into_iter()
        .filter(|s| subject::parse_event(s).is_ok_and(|e| e.aggregate == names::NODE && e.id == "n2"))
        .collect();
    let expected = ["enrolled", "schedulable", "draining", "drained", "decommissioned"]
        .map(|a| names::node_event("n2", a))
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    assert_eq!(n2_events, expected);
    Ok(())
}

fn problems_of(s: &Value) -> Vec<String> {
    s["problems"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| format!("{}: {}", p["subject"].as_str().unwrap_or(""), p["reason"].as_str().unwrap_or("")))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn status_reports_a_healthy_cluster_and_names_the_cause_when_a_node_dies() -> Result<()> {
    let mut cim = CimFixture::builder().cluster(3).start().await?;
    let urls = cim.url().to_string();
    let client = cim.client().clone();
    cim.start(Svc::new(Component::Registry).args(&["--instance-id", "reg-1", "--node", "n1"])).await?;
    cim.start(Svc::new(Component::StorageManager).args(&["--instance-id", "sm-1", "--node", "n2"])).await?;
    registered(&client, "sm-1").await?;
    let dir = tempfile::tempdir()?;
    let plan = dir.path().join("plan.json");
    std::fs::write(
        &plan,
        r#"{"nodes": [{"name": "n1", "memory": "4GiB", "cpus": 2}, {"name": "n2", "memory": "4GiB", "cpus": 2}],
        "services": [{"name": "registry", "memory_max": "256MiB"}, {"name": "storage-manager", "memory_max": "512MiB"}]}"#,
    )?;
    cimctl_json(&["placement", "apply", plan.to_str().unwrap(), "--nats-url", &urls, "--json"]).await?;

    let healthy = eventually(WAIT, "a converged status", || async {
        let s = cimctl_json(&["status", "--nats-url", &urls, "--json"]).await?;
        anyhow::ensure!(s["converging"] == true, "{:#?}", problems_of(&s));
        Ok(s)
    })
    .await?;
    let svc: Vec<(String, u64, u64)> = healthy["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (s["service"].as_str().unwrap().to_string(), s["desired"].as_u64().unwrap(), s["running"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(svc, vec![("registry".to_string(), 1, 1), ("storage-manager".to_string(), 1, 1)]);
    let streams = healthy["streams"].as_array().unwrap();
    let registry_events = resources::events_stream(Component::Registry).name;
    let events = streams.iter().find(|s| s["name"] == registry_events.as_str()).unwrap();
    assert_eq!((events["replicas"].as_u64(), events["current"].as_u64()), (Some(3), Some(3)), "{events}");
    assert!(events["leader"].as_str().unwrap().starts_with(cim.cluster().name()), "{events}");
    assert!(
        healthy["consumers"].as_array().unwrap().iter().any(|c| c["name"] == names::projector_consumer()),
        "consumers and their lag"
    );
    let table = cimctl(&["status", "--nats-url", &urls]).await?;
    let text = String::from_utf8_lossy(&table.stdout);
    for want in [
        "Desired vs running",
        "cim-registry",
        "Streams:",
        registry_events.as_str(),
        "Consumers",
        "registry-projector",
        "Converged",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }

    // one nats node dies: status names it
    let victim = 2;
    let victim_name = cim.cluster().node(victim).server_name().to_string();
    cim.cluster_mut().kill_node(victim);
    let degraded = eventually(Duration::from_secs(60), "status naming the dead node", || async {
        let out = cimctl(&["status", "--nats-url", &urls, "--json", "--check"]).await?;
        anyhow::ensure!(out.status.code() == Some(3), "exit {:?}", out.status.code());
        let s: Value = serde_json::from_slice(&out.stdout)?;
        let problems = problems_of(&s);
        anyhow::ensure!(
            problems.iter().any(|p| p.contains(&format!("replica on {victim_name} is offline"))
                || p.contains(&format!("replica on {victim_name} is not current"))),
            "{problems:#?}"
        );
        Ok(s)
    })
    .await?;
    assert_eq!(degraded["converging"], false);
    let text = String::from_utf8_lossy(&cimctl(&["status", "--nats-url", &urls]).await?.stdout).to_string();
    assert!(text.contains("Not converging:") && text.contains(&victim_name), "{text}");
    Ok(())
}

/// A tiny OTLP/HTTP receiver that keeps each export body (one per process and batch).
struct Collector {
    addr: std::net::SocketAddr,
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    async fn start() -> Result<Collector> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let store = bodies.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let store = store.clone();
                tokio::spawn(async move {
                    loop {
                        let mut head = Vec::new();
                        let mut byte = [0u8; 1];
                        while !head.ends_with(b"\r\n\r\n") {
                            if conn.read(&mut byte).await.unwrap_or(0) == 0 {
                                return;
                            }
                            head.push(byte[0]);
                        }
                        let h = String::from_utf8_lossy(&head).to_ascii_lowercase();
                        let len: usize = h
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        let mut body = vec![0u8; len];
                        if conn.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        store.lock().unwrap().push(body);
                        if conn
                            .write_all(
                                b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n",
                            )
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        Ok(Collector { addr, bodies, task })
    }

    /// Services (by `service.name`) that exported a span of `trace`.
    fn services_with(&self, trace: &[u8], services: &[&str]) -> Vec<String> {
        let bodies = self.bodies.lock().unwrap();
        let has = |b: &[u8], n: &[u8]| b.windows(n.len()).any(|w| w == n);
        services
            .iter()
            .filter(|s| bodies.iter().any(|b| has(b, trace) && has(b, s.as_bytes())))
            .map(|s| s.to_string())
            .collect()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_trace_spans_three_services() -> Result<()> {
    const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
    let collector = Collector::start().await?;
    let endpoint = format!("http://{}", collector.addr);
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")];
    let mut cim = CimFixture::builder().start().await?;
    for c in [Component::Registry, Component::StorageManager, Component::PipelineEngine] {
        cim.start(Svc::new(c).envs(&env)).await?;
    }
    let client = cim.client().clone();
    // caller → registry (overview, deep) → every other component's describe
    let mut headers = HeaderMap::new();
    headers.insert("traceparent", format!("00-{TRACE}-b7ad6b7169203331-01").as_str());
    let req = GetOverview { deep: true };
    let reply =
        client.request_with_headers(names::query(names::qry::OVERVIEW)?, headers, req.encode_to_vec().into()).await?;
    let o = Overview::decode(reply.payload)?;
    let answered: Vec<&str> = o.described.iter().filter(|d| d.error.is_empty()).map(|d| d.component.as_str()).collect();
    assert_eq!(answered, vec!["pipeline", "storage"], "{:?}", o.described);
    assert!(
        o.described
            .iter()
            .any(|d| d.component == "iu" && d.error.contains("no responders") || d.error.contains("no answer")),
        "{:?}",
        o.described
    );

    let trace: Vec<u8> = (0..16).map(|i| u8::from_str_radix(&TRACE[2 * i..2 * i + 2], 16).unwrap()).collect();
    let want = ["registry", "storage-manager", "pipeline-engine"];
    eventually(Duration::from_secs(30), "spans of one trace from three services", || async {
        let got = collector.services_with(&trace, &want);
        anyhow::ensure!(got.len() == 3, "so far {got:?}");
        Ok(())
    })
    .await?;
    drop(cim);
    Ok(())
}
