//! Exactly-once commands, tried the way they fail: the information-unit service and the
//! pipeline engine stopped at each step of a command (before its event is written, after it is
//! written and before the answer, after the answer), replaced while a client waits, nats-server
//! restarted, and every command sent again after JetStream's duplicate window has closed.
//! Counted from the streams themselves: one event per request id, and every answer names it.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use cim_events::{Component, iu, pipeline as pl, proto::iu::*, proto::pipeline::RunRequested, resources, subject};
use cim_iu_client::{IuClient, header_with_id};
use cim_testkit::eventually;
use prost::Message as _;

use crate::common::{created_by_request, read_all};
use crate::fixture::{CimFixture, Svc};

const IU: Component = Component::InformationUnit;
/// The retry horizon the services run with here, so a test can outwait it.
const HORIZON: Duration = Duration::from_secs(3);
const HORIZON_ARG: &str = "3s";

/// Waits until JetStream's duplicate window of a message sent at `sent` has certainly closed:
/// what the test is about is a retry later than that.
async fn outwait_the_window(sent: Instant) {
    tokio::time::sleep_until((sent + HORIZON + Duration::from_millis(1500)).into()).await;
}

/// One create, one attempt, no retry: what a client that lost its connection sent.
async fn create_once(client: &async_nats::Client, request_id: &str, cid: &str) -> Option<CommandResult> {
    let cmd = CreateUnit {
        header: header_with_id(request_id, 0),
        cid: cid.into(),
        name: format!("{request_id}.txt"),
        media_type: "text/plain".into(),
        ..Default::default()
    };
    let subject = iu::command(iu::cmd::CREATE).ok()?;
    let request = async_nats::Request::new().payload(cmd.encode_to_vec().into()).timeout(Some(Duration::from_secs(5)));
    let reply = client.send_request(subject, request).await.ok()?;
    if reply.headers.as_ref().is_some_and(|h| h.get("Nats-Service-Error-Code").is_some()) {
        return None;
    }
    CommandResult::decode(reply.payload).ok()
}

fn create_with_id(request_id: &str, cid: &str) -> CreateUnit {
    CreateUnit {
        header: header_with_id(request_id, 0),
        cid: cid.into(),
        name: format!("{request_id}.txt"),
        media_type: "text/plain".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_create_retried_across_crashes_restarts_and_the_window_makes_one_unit() -> Result<()> {
    let mut cim = CimFixture::builder().start().await?;
    let horizon = ["--retry-horizon", HORIZON_ARG];
    let armed = |point: &str| Svc::new(IU).args(&horizon).env(cim_runtime::crash::ENV, point);
    let mut answered: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut last_sent = Instant::now();

    // 1. Replaced while a client waits: the instance dies right after writing the event; the
    // client's next attempt reaches the replacement and is answered with the unit written.
    cim.start(armed("iu.create.published")).await?;
    let iu: IuClient = cim.iu().attempt_timeout(Duration::from_secs(1)).timeout(Duration::from_secs(40));
    let content = iu.put_bytes(b"exactly once").await?;
    let replaced = uuid::Uuid::now_v7().to_string();
    let waiting = tokio::spawn({
        let (iu, cmd) = (iu.clone(), create_with_id(&replaced, &content.cid));
        async move { iu.create(cmd).await }
    });
    cim.services_mut().last_mut().context("armed instance")?.wait(Duration::from_secs(30)).await?;
    cim.start(Svc::new(IU).args(&horizon)).await?;
    let r = waiting.await?.context("a create whose service was replaced mid-request")?;
    ensure!(r.replayed, "answered from the event the dead instance wrote, not written again: {r:?}");
    answered.insert(replaced, Some(r.unit_id));

    // 2. Every other crash point, one create each, sent once by a client that then goes away.
    for point in ["iu.create.publishing", "iu.create.published", "create.replied"] {
        cim.services_mut().last_mut().context("instance")?.terminate(Duration::from_secs(30)).await?;
        cim.start(armed(point)).await?;
        let id = uuid::Uuid::now_v7().to_string();
        last_sent = Instant::now();
        let r = create_once(cim.client(), &id, &content.cid).await;
        ensure!(r.is_some() == (point == "create.replied"), "{point}: answered {r:?}");
        answered.insert(id, r.map(|r| r.unit_id));
        cim.services_mut().last_mut().context("armed instance")?.wait(Duration::from_secs(30)).await?;
        cim.start(Svc::new(IU).args(&horizon)).await?;
    }
    // A caller's own request id (not a UUIDv7), answered normally.
    let own = "nightly-import-0001".to_string();
    answered.insert(own.clone(), Some(iu.create(create_with_id(&own, &content.cid)).await?.unit_id));

    // 3. nats-server restarts: the duplicate window is rebuilt from the stored messages.
    cim.server_mut().restart().await?;
    let last = cim.services().len() - 1;
    cim.wait_ready(last).await?;

    // 4. Retries within the window, then after it has closed: the same unit every time.
    let mut units: BTreeMap<String, String> = BTreeMap::new();
    for id in answered.keys() {
        let r = iu.create(create_with_id(id, &content.cid)).await?;
        units.insert(id.clone(), r.unit_id);
    }
    outwait_the_window(last_sent).await;
    for id in answered.keys() {
        let r = iu.create(create_with_id(id, &content.cid)).await?;
        ensure!(r.replayed, "{id}: a retry after the window was carried out again: {r:?}");
        ensure!(units[id] == r.unit_id, "{id}: {} then {}", units[id], r.unit_id);
    }
    for (id, first) in &answered {
        if let Some(first) = first {
            ensure!(first == &units[id], "{id}: first answered {first}, retries {}", units[id]);
        }
    }

    // From the stream: exactly one unit per request id, and it is the one every answer named.
    let created = eventually!(Duration::from_secs(30), "every create written", {
        let c = created_by_request(&cim.js()).await?;
        ensure!(answered.keys().all(|id| c.contains_key(id)), "{c:?}");
        Ok(c)
    })?;
    for (id, unit) in &units {
        ensure!(created[id] == vec![unit.clone()], "{id}: units {:?} in the stream, answered {unit}", created[id]);
    }
    ensure!(created.len() == answered.len(), "unexpected creates: {created:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pipeline_start_retried_after_an_engine_crash_and_the_window_starts_one_run() -> Result<()> {
    let horizon = ["--retry-horizon", HORIZON_ARG];
    let mut cim = CimFixture::builder().service(IU).start().await?;
    cim.start(
        Svc::new(Component::PipelineEngine).args(&horizon).env(cim_runtime::crash::ENV, "pipeline.start.published"),
    )
    .await?;
    let client = cim.client().clone();
    let call = |subject: String, body: serde_json::Value, wait: Duration| {
        let client = client.clone();
        async move {
            let request = async_nats::Request::new().payload(body.to_string().into()).timeout(Some(wait));
            let m = client.send_request(subject.clone(), request).await?;
            if let Some(code) = m.headers.as_ref().and_then(|h| h.get("Nats-Service-Error-Code")) {
                anyhow::bail!("{subject}: {code}");
            }
            Ok(serde_json::from_slice::<serde_json::Value>(&m.payload)?)
        }
    };
    let definition = serde_json::json!({
        "name": "once", "trigger": {"on": "manual"}, "steps": [{"id": "mark", "tag": ["started-once"]}]
    });
    call(pl::command(pl::cmd::APPLY)?, serde_json::json!({ "definition": definition }), Duration::from_secs(20))
        .await?;
    let iu = cim.iu();
    let content = iu.put_bytes(b"run me once").await?;
    let unit = iu.create(create_with_id("pipeline-unit", &content.cid)).await?.unit_id;
    let request_id = uuid::Uuid::now_v7().to_string();
    let start = serde_json::json!({ "pipeline": "once", "unit_id": unit, "request_id": request_id });

    // The engine writes the run request and dies before answering.
    let sent = Instant::now();
    let lost = call(pl::command(pl::cmd::START)?, start.clone(), Duration::from_secs(5)).await;
    ensure!(lost.is_err(), "the armed engine answered: {lost:?}");
    cim.services_mut().last_mut().context("armed engine")?.wait(Duration::from_secs(30)).await?;
    cim.start(Svc::new(Component::PipelineEngine).args(&horizon)).await?;

    let start_again = || async {
        eventually!(Duration::from_secs(60), "the start answered", {
            let r = call(pl::command(pl::cmd::START)?, start.clone(), Duration::from_secs(5)).await?;
            Ok(r["run_id"].as_str().unwrap_or_default().to_string())
        })
    };
    let first = start_again().await?;
    outwait_the_window(sent).await;
    let later = start_again().await?;
    ensure!(first == later && !first.is_empty(), "{first} then {later}");

    let requested: Vec<RunRequested> =
        read_all(&cim.js(), &resources::events_stream(Component::PipelineEngine).name, "")
            .await?
            .into_iter()
            .filter(|m| subject::parse_event(&m.subject).is_ok_and(|s| s.action == pl::action::REQUESTED))
            .map(|m| RunRequested::decode(m.payload.clone()))
            .collect::<Result<_, _>>()?;
    ensure!(requested.len() == 1, "{} runs requested: {requested:?}", requested.len());
    ensure!(requested[0].run_id == first && requested[0].request_id == request_id, "{requested:?}");
    Ok(())
}
