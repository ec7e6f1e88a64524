//! The chaos suite: faults as they happen in production, under steady load, judged from the
//! streams themselves. A writer creates text units the way a client does (one request id per
//! unit, the same id sent again after any error until it is answered); every unit starts a run
//! of a pipeline that calls a plugin, tags the unit and creates a summary unit linked to it.
//! Meanwhile a fault is injected: each service SIGKILLed in turn and restarted at once on the
//! same ports, nats-server SIGKILLed and restarted, the leader node of a 3-node cluster lost,
//! the S3 server taken away while archiving, a leaf cut from its hub.
//!
//! Every case then checks: every acknowledged create is in the stream once (0 lost), no request
//! id made two units (0 duplicated), every unit has exactly one run, completed once, with one
//! summary (0 runs failed, 0 effects repeated), and every service ready again without a hand
//! restart, within the bounds in docs/operations.md ("Faults"). Each case prints a `chaos:` line
//! with what it measured (run with `--no-capture` to see them).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use async_nats::jetstream;
use cim_archive::S3Client;
use cim_events::{
    Component,
    pipeline::{self as pl, RunInfo, RunList, RunsRequest},
    proto::iu::{CreateUnit, ListUnits},
    resources, subject,
};
use cim_iu_client::{IuClient, header_with_id};
use cim_testkit::{CountingProxy, NatsServer, S3Server, eventually, free_port};
use tokio::{sync::watch, task::JoinHandle};

use crate::common::{ServiceProc, bin, created_by_request, describe, read_all, wait_ready};
use crate::fixture::{CimFixture, CimFixtureBuilder, Svc};
use crate::storage;

/// The pipeline every unit of the load starts: a plugin call, a tag, a summary unit linked to
/// its source (created by the engine with its own request id: a repeated effect would show as
/// a second summary).
const PIPELINE: &str = "chaos";
const SUMMARY_TAG: &str = "chaos-summary";
const DONE_TAG: &str = "chaos-done";

/// Bounds documented in docs/operations.md ("Faults"), generous for a loaded two-core machine
/// (`cargo xtask test --stress`); the measured figures are printed and are far below.
/// A SIGKILLed service started again at once is ready within this long.
const SERVICE_READY_BOUND: Duration = Duration::from_secs(30);
/// After nats-server is back (or a cluster node is lost), every service is ready again and
/// writes are answered within this long.
const NATS_RECOVERY_BOUND: Duration = Duration::from_secs(45);
/// A query to the pipeline engine after a nats-server restart is answered within this long
/// (or refused at once): never a hang on a dead follower.
const QUERY_BOUND: Duration = Duration::from_secs(5);
/// How long the writer keeps sending one request id before it gives up (a client's patience).
const CLIENT_PATIENCE: Duration = Duration::from_secs(120);
/// Between two creates of the writer: steady load, not a flood two cores cannot drain.
const PACE: Duration = Duration::from_millis(100);
/// Between two attempts of one create after an error.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Load before and after each fault: creates answered.
const PROGRESS: u64 = 5;
/// How long everything may take to settle after the load stops (runs of a debug build under
/// load included).
const SETTLE: Duration = Duration::from_secs(180);
/// How long a fault lasts where it is held (S3 down, a partition).
const OUTAGE: Duration = Duration::from_secs(3);

fn definition() -> serde_json::Value {
    serde_json::json!({
        "name": PIPELINE,
        "trigger": {"on": "unit.created", "media_type": "text/*"},
        "concurrency": 8,
        "steps": [
            {"id": "normalize", "plugin": "text-normalize@1.0.0", "input": "unit.content"},
            {"id": "tag", "tag": [DONE_TAG]}
        ],
        "sinks": [{"id": "summary", "create_unit": {
            "content": "normalize.output", "max_bytes": 200, "name": "{unit.name}.summary",
            "media_type": "application/x-chaos-summary", "tags": [SUMMARY_TAG], "link": "summary-of"
        }}]
    })
}

/// A create the writer got an answer for.
#[derive(Clone, Debug)]
struct Acked {
    request_id: String,
    unit_id: String,
}

/// The steady load: one writer creating text units with request ids, retrying each until it is
/// answered, as a client would.
struct Load {
    stop: watch::Sender<bool>,
    acked: Arc<Mutex<Vec<Acked>>>,
    count: Arc<AtomicU64>,
    writer: JoinHandle<Result<()>>,
}

impl Load {
    fn start(iu: IuClient, tag: &str) -> Load {
        let (stop, mut stopped) = watch::channel(false);
        let acked = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicU64::new(0));
        let (tag, out, n_acked) = (tag.to_string(), acked.clone(), count.clone());
        let writer = tokio::spawn(async move {
            for n in 0.. {
                if *stopped.borrow_and_update() {
                    return Ok(());
                }
                let request_id = format!("{tag}-{n}");
                let text = format!("chaos unit {request_id}\r\n\r\n   second   line  \r\n");
                let given_up = Instant::now() + CLIENT_PATIENCE;
                let unit_id = loop {
                    let attempt = async {
                        let content = iu.put_bytes(text.as_bytes()).await?;
                        let create = CreateUnit {
                            header: header_with_id(&request_id, 0),
                            cid: content.cid,
                            name: format!("{request_id}.txt"),
                            media_type: "text/plain".into(),
                            ..Default::default()
                        };
                        anyhow::Ok(iu.create(create).await?.unit_id)
                    };
                    match attempt.await {
                        Ok(id) => break id,
                        // Sent again, with the same request id, whatever went wrong.
                        Err(_) if Instant::now() < given_up => tokio::time::sleep(RETRY_PAUSE).await,
                        Err(e) => bail!("{request_id} not answered within {CLIENT_PATIENCE:?}: {e}"),
                    }
                };
                out.lock().unwrap_or_else(|e| e.into_inner()).push(Acked { request_id, unit_id });
                n_acked.fetch_add(1, Ordering::SeqCst);
                tokio::select! {
                    _ = tokio::time::sleep(PACE) => {}
                    _ = stopped.changed() => {}
                }
            }
            Ok(())
        });
        Load { stop, acked, count, writer }
    }

    /// Waits until `n` more creates are answered; how long that took.
    async fn progress(&self, n: u64, within: Duration) -> Result<Duration> {
        let started = Instant::now();
        let target = self.count.load(Ordering::SeqCst) + n;
        eventually!(within, &format!("{n} more creates answered"), {
            ensure!(!self.writer.is_finished(), "the writer stopped");
            let at = self.count.load(Ordering::SeqCst);
            ensure!(at >= target, "{at} of {target}");
            Ok(())
        })?;
        Ok(started.elapsed())
    }

    /// Stops after the create in progress is answered; every acknowledged create.
    async fn finish(self) -> Result<Vec<Acked>> {
        self.stop.send_replace(true);
        self.writer.await.context("writer panicked")??;
        Ok(std::mem::take(&mut *self.acked.lock().unwrap_or_else(|e| e.into_inner())))
    }
}

/// What a case measured, printed as one `chaos:` line.
#[derive(Debug, Default)]
struct Figures {
    fault: String,
    /// From the fault's end (restart, node back) until every service is ready again.
    ready_after: Duration,
    /// Longest a create waited to be answered across the fault.
    write_outage: Duration,
    acked: usize,
    runs: usize,
}

impl Figures {
    fn print(&self) {
        println!(
            "chaos: {} | ready again after {:.1} s | writes answered again after {:.1} s | {} creates acknowledged, 0 lost, 0 duplicated | {} runs completed once, 0 failed",
            self.fault,
            self.ready_after.as_secs_f64(),
            self.write_outage.as_secs_f64(),
            self.acked,
            self.runs
        );
    }
}

async fn runs(client: &async_nats::Client) -> Result<Vec<RunInfo>> {
    let body = serde_json::to_vec(&RunsRequest { pipeline: PIPELINE.into(), limit: 100_000, ..Default::default() })?;
    let m =
        tokio::time::timeout(Duration::from_secs(20), client.request(pl::query(pl::qry::RUNS)?, body.into())).await??;
    if let Some(code) = m.headers.as_ref().and_then(|h| h.get("Nats-Service-Error-Code")) {
        bail!("runs query: {code}");
    }
    Ok(serde_json::from_slice::<RunList>(&m.payload)?.runs)
}

/// The checks every case ends with, from the streams: each acknowledged create once, no request
/// id twice, one run per unit completed once, one summary per unit, nothing dead-lettered.
/// Returns how many runs completed.
async fn nothing_lost_nothing_repeated(cim: &CimFixture, acked: &[Acked]) -> Result<usize> {
    let js = cim.js();
    ensure!(!acked.is_empty(), "the load made no unit");
    let created = created_by_request(&js).await?;
    for a in acked {
        let units = created.get(&a.request_id).map(Vec::as_slice).unwrap_or_default();
        ensure!(!units.is_empty(), "LOST: {} was acknowledged as {} but is not in the stream", a.request_id, a.unit_id);
        ensure!(units.len() == 1, "DUPLICATED: {} made {} units: {units:?}", a.request_id, units.len());
        ensure!(
            units[0] == a.unit_id,
            "{} acknowledged as {} but the stream says {}",
            a.request_id,
            a.unit_id,
            units[0]
        );
    }
    let twice: Vec<_> = created.iter().filter(|(_, u)| u.len() > 1).collect();
    ensure!(twice.is_empty(), "DUPLICATED: request ids with two units: {twice:?}");

    let sources: HashMap<&str, &str> = acked.iter().map(|a| (a.unit_id.as_str(), a.request_id.as_str())).collect();
    let client = cim.client();
    let done = eventually!(SETTLE, "every unit's run completes", {
        let runs = runs(client).await?;
        // Final: no point waiting on.
        let failed: Vec<_> = runs.iter().filter(|r| r.state == "failed").collect();
        if !failed.is_empty() {
            return Ok(Err(format!("FAILED runs: {failed:?}")));
        }
        let mut per_unit: HashMap<&str, usize> = HashMap::new();
        for r in runs.iter().filter(|r| sources.contains_key(r.unit_id.as_str())) {
            ensure!(r.state == "completed", "run {} of {} is {}", r.run_id, r.unit_id, r.state);
            *per_unit.entry(r.unit_id.as_str()).or_default() += 1;
        }
        let missing = sources.keys().filter(|u| !per_unit.contains_key(*u)).count();
        ensure!(missing == 0, "{missing} of {} units have no run yet", sources.len());
        let repeated: Vec<_> = per_unit.iter().filter(|(_, n)| **n > 1).collect();
        ensure!(repeated.is_empty(), "DUPLICATED runs: {repeated:?}");
        Ok(Ok(runs.len()))
    })?
    .map_err(anyhow::Error::msg)?;
    let completed = read_all(
        &js,
        &resources::events_stream(Component::PipelineEngine).name,
        &pl::run_action(pl::action::COMPLETED)?,
    )
    .await?;
    let mut per_run: HashMap<String, usize> = HashMap::new();
    for m in &completed {
        *per_run.entry(subject::parse_event(&m.subject)?.id).or_default() += 1;
    }
    let twice: Vec<_> = per_run.iter().filter(|(_, n)| **n > 1).collect();
    ensure!(twice.is_empty(), "DUPLICATED: runs completed more than once: {twice:?}");
    ensure!(per_run.len() == done, "{} completion events for {done} runs", per_run.len());

    let iu = cim.iu().latest();
    let summaries = iu.list_all(ListUnits { tag: SUMMARY_TAG.into(), ..Default::default() }).await?;
    if summaries.len() != acked.len() {
        // Which units, and what their runs and the stream say about their summaries.
        let all = runs(client).await?;
        let mut why = Vec::new();
        for a in acked {
            let links = iu.links(&a.unit_id).await?;
            if links.incoming.len() != 1 {
                let run = all.iter().find(|r| r.unit_id == a.unit_id);
                why.push(format!("{}: {} incoming links; run {run:?}", a.unit_id, links.incoming.len()));
            }
        }
        let again = iu.list_all(ListUnits { tag: SUMMARY_TAG.into(), ..Default::default() }).await?.len();
        bail!(
            "{} summaries listed ({again} when asked again) for {} units, {} creates in the stream: {why:#?}",
            summaries.len(),
            acked.len(),
            created_by_request(&js).await?.len()
        );
    }
    let dead = read_all(&js, &resources::dead_letter_stream(Component::PipelineEngine).name, "").await?;
    ensure!(dead.is_empty(), "{} dead letters", dead.len());
    Ok(done)
}

/// Every service of the fixture ready: answering describe, `/readyz` 200.
async fn all_ready(cim: &CimFixture) -> Result<()> {
    for svc in cim.services() {
        let d = describe(cim.client(), svc.component).await?;
        let addr = d.service.as_ref().map(|s| s.http_addr.clone()).unwrap_or_default();
        let r = cim_testkit::http_get(&addr, "/readyz").await?;
        ensure!(r.status == 200, "{} not ready: {}", svc.component, r.status);
    }
    Ok(())
}

/// Applies the load's pipeline with `cimctl pipeline apply`.
async fn apply_pipeline(cim: &CimFixture) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("chaos.json");
    std::fs::write(&file, definition().to_string())?;
    let out = tokio::process::Command::new(bin("cimctl"))
        .args(["pipeline", "apply", &file.to_string_lossy(), "--nats-url", cim.url()])
        .envs(cim.admin_env())
        .output()
        .await?;
    ensure!(out.status.success(), "apply: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// The services the load goes through, and the rest (each restarts on fixed ports here, as
/// under a supervisor: `--http-listen` and the gateway's ports are given).
fn every_service(builder: CimFixtureBuilder) -> CimFixtureBuilder {
    let mut b = builder;
    for c in Component::ALL {
        let mut svc = Svc::new(c).args(&["--http-listen", &format!("127.0.0.1:{}", free_port())]);
        if c == Component::UiGateway {
            svc = svc.args(&[
                "--gateway-listen",
                &format!("127.0.0.1:{}", free_port()),
                "--gateway-grpc-listen",
                &format!("127.0.0.1:{}", free_port()),
            ]);
        }
        b = b.service(svc);
    }
    b
}

/// Each service SIGKILLed in turn under load and started again at once, on the same ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_each_service_killed_under_load_loses_and_repeats_nothing() -> Result<()> {
    let mut cim = every_service(CimFixture::builder()).start().await?;
    apply_pipeline(&cim).await?;
    let load = Load::start(cim.iu().timeout(Duration::from_secs(30)), "svc");
    load.progress(PROGRESS, SERVICE_READY_BOUND).await?;
    let mut worst = Figures { fault: "each service SIGKILLed and restarted at once".into(), ..Default::default() };
    for c in Component::ALL {
        let svc = cim.service_mut(c);
        svc.signal(nix::sys::signal::Signal::SIGKILL);
        svc.wait(SERVICE_READY_BOUND).await?;
        let killed = Instant::now();
        svc.restart().await?;
        let svc = cim.service(c);
        wait_ready(cim.client(), svc).await?;
        let ready = killed.elapsed();
        ensure!(ready < SERVICE_READY_BOUND, "{c} ready {ready:?} after its restart");
        let resumed = load.progress(PROGRESS, SERVICE_READY_BOUND).await?;
        println!("chaos: {c} SIGKILLed: ready again after {:.1} s", ready.as_secs_f64());
        worst.ready_after = worst.ready_after.max(ready);
        worst.write_outage = worst.write_outage.max(resumed);
    }
    let acked = load.finish().await?;
    worst.runs = nothing_lost_nothing_repeated(&cim, &acked).await?;
    worst.acked = acked.len();
    all_ready(&cim).await?;
    worst.print();
    Ok(())
}

/// A restarted instance waits for the port the instance it replaces still holds (stopping, or
/// hung) instead of failing with "address in use".
#[tokio::test(flavor = "multi_thread")]
async fn chaos_a_service_restarted_while_its_predecessor_holds_the_port_waits_for_it() -> Result<()> {
    let port = format!("127.0.0.1:{}", free_port());
    let cim =
        CimFixture::builder().service(Svc::new(Component::PluginHost).args(&["--http-listen", &port])).start().await?;
    let old = cim.service(Component::PluginHost);
    // Hung, still holding its port.
    old.signal(nix::sys::signal::Signal::SIGSTOP);
    let new = ServiceProc::start(Component::PluginHost, cim.url(), &["--http-listen", &port])?;
    eventually!(SERVICE_READY_BOUND, "the new instance waits for the port", {
        ensure!(new.log().contains("port in use"), "{}", new.log());
        Ok(())
    })?;
    old.signal(nix::sys::signal::Signal::SIGKILL);
    let d = wait_ready(cim.client(), &new).await?;
    assert_eq!(d.service.map(|s| s.http_addr).unwrap_or_default(), port);
    Ok(())
}

/// nats-server SIGKILLed under load and started again on the same store: the services reconnect
/// and are ready by themselves, the engine answers queries at once, nothing is lost or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_nats_server_killed_under_load_loses_and_repeats_nothing() -> Result<()> {
    let mut cim = every_service(CimFixture::builder()).start().await?;
    apply_pipeline(&cim).await?;
    let load = Load::start(cim.iu().timeout(Duration::from_secs(30)), "nats");
    load.progress(PROGRESS, SERVICE_READY_BOUND).await?;
    cim.server_mut().kill();
    tokio::time::sleep(OUTAGE / 3).await;
    let back = Instant::now();
    cim.server_mut().restart().await?;
    eventually!(NATS_RECOVERY_BOUND, "every service ready again", all_ready(&cim).await)?;
    let ready_after = back.elapsed();
    let write_outage = load.progress(PROGRESS, NATS_RECOVERY_BOUND).await? + ready_after;
    ensure!(ready_after < NATS_RECOVERY_BOUND, "ready {ready_after:?} after nats-server came back");
    // The engine's view follows the restarted server: queries are answered promptly.
    for _ in 0..5 {
        let asked = Instant::now();
        let answered = runs(cim.client()).await;
        let took = asked.elapsed();
        ensure!(took < QUERY_BOUND, "a runs query took {took:?} after the restart ({answered:?})");
        load.progress(1, NATS_RECOVERY_BOUND).await?;
    }
    let acked = load.finish().await?;
    let runs = nothing_lost_nothing_repeated(&cim, &acked).await?;
    Figures { fault: "nats-server SIGKILLed, restarted".into(), ready_after, write_outage, acked: acked.len(), runs }
        .print();
    Ok(())
}

/// The node leading the information-unit stream of a 3-node cluster (R3) SIGKILLed under load,
/// then started again: writes resume on the others, every service stays or becomes ready, the
/// node rejoins, nothing is lost or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_a_cluster_node_lost_under_load_loses_and_repeats_nothing() -> Result<()> {
    let mut cim = CimFixture::builder()
        .cluster(3)
        .services([Component::InformationUnit, Component::PluginHost, Component::PipelineEngine, Component::Registry])
        .start()
        .await?;
    apply_pipeline(&cim).await?;
    let load = Load::start(cim.iu().timeout(Duration::from_secs(30)), "node");
    load.progress(PROGRESS, SERVICE_READY_BOUND).await?;
    let stream = resources::events_stream(Component::InformationUnit).name;
    let info = cim.js().get_stream(&stream).await?.info().await?.clone();
    let leader = info.cluster.and_then(|c| c.leader).context("the stream has no leader")?;
    let i = cim.cluster().node_index(&leader).context("leader is not a node")?;
    let lost = Instant::now();
    cim.cluster_mut().kill_node(i);
    let write_outage = load.progress(PROGRESS, NATS_RECOVERY_BOUND).await?;
    eventually!(NATS_RECOVERY_BOUND, "every service ready on the remaining nodes", all_ready(&cim).await)?;
    let ready_after = lost.elapsed();
    cim.cluster_mut().restart_node(i).await?;
    load.progress(PROGRESS, NATS_RECOVERY_BOUND).await?;
    let acked = load.finish().await?;
    let runs = nothing_lost_nothing_repeated(&cim, &acked).await?;
    // The node rejoined and holds the whole stream again.
    let node = cim.cluster().node(i).connect().await;
    let expected = cim.js().get_stream(&stream).await?.info().await?.state.last_sequence;
    eventually!(NATS_RECOVERY_BOUND, "the restarted node is current", {
        let jsz = cim.cluster().node(i).monitor_json("/jsz?streams=true").await?;
        let last = jsz["account_details"][0]["stream_detail"]
            .as_array()
            .and_then(|s| s.iter().find(|d| d["name"] == stream.as_str()))
            .map(|d| d["state"]["last_seq"].as_u64().unwrap_or(0))
            .unwrap_or(0);
        ensure!(last >= expected, "node {i} at {last} of {expected}");
        Ok(())
    })?;
    drop(node);
    Figures {
        fault: "the stream leader of a 3-node cluster SIGKILLed".into(),
        ready_after,
        write_outage,
        acked: acked.len(),
        runs,
    }
    .print();
    Ok(())
}

/// The S3 server killed while the storage manager archives under load, then started again: the
/// archive catches up with no gap, verifies clean, and the storage manager never stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_the_s3_server_lost_while_archiving_loses_nothing() -> Result<()> {
    let mut s3 = S3Server::start().await?;
    let client = S3Client::new(storage::target(&s3, "nas", "leaf"))?;
    client.ensure_bucket().await?;
    let spec = storage::spec(&s3, "nas", "leaf", "NAS");
    let env = [("NAS_ACCESS_KEY_ID", s3.access_key()), ("NAS_SECRET_ACCESS_KEY", s3.secret_key())];
    let cim = CimFixture::builder()
        .service(Component::InformationUnit)
        .service(
            Svc::new(Component::StorageManager)
                .args(&["--archive-target", &spec, "--archive-linger", "100ms"])
                .envs(&env),
        )
        .start()
        .await?;
    let load = Load::start(cim.iu().timeout(Duration::from_secs(30)), "s3");
    load.progress(PROGRESS, SERVICE_READY_BOUND).await?;
    s3.kill();
    load.progress(PROGRESS, SERVICE_READY_BOUND).await?;
    tokio::time::sleep(OUTAGE).await;
    let back = Instant::now();
    s3.restart().await?;
    load.progress(PROGRESS, SERVICE_READY_BOUND).await?;
    let acked = load.finish().await?;
    let stream = storage::events_stream();
    let last = storage::last_seq(&cim.js(), &stream).await?;
    storage::wait_archived(&client, &stream, last).await?;
    let caught_up = back.elapsed();
    let report = storage::verify(&client, &stream).await;
    ensure!(report.problems.is_empty(), "verify after the outage: {:?}", report.problems);
    ensure!(report.last_seq == last, "verified up to {} of {last}", report.last_seq);
    let created = created_by_request(&cim.js()).await?;
    for a in &acked {
        ensure!(created.get(&a.request_id).map(Vec::len) == Some(1), "{} not once in the stream", a.request_id);
    }
    all_ready(&cim).await?;
    println!(
        "chaos: S3 server SIGKILLed for {:.0} s while archiving | archive caught up {:.1} s after it came back | {} creates acknowledged, 0 lost, 0 duplicated | verified 1..{last}",
        OUTAGE.as_secs_f64(),
        caught_up.as_secs_f64(),
        acked.len()
    );
    Ok(())
}

/// A leaf's leaf node connection to its hub cut (a partition, not a restart) while the leaf
/// takes writes, then healed: the hub's mirror equals the leaf's stream, message by message.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_a_leaf_cut_from_its_hub_then_healed_mirrors_every_message() -> Result<()> {
    // The leaf reaches the hub only through the link (no other node's leaf port advertised).
    let (cluster, nas) =
        tokio::try_join!(cim_testkit::NatsCluster::builder().leaf_no_advertise().start(), S3Server::start())?;
    let hub_leaf = cluster.leaf_urls().into_iter().next().context("the hub takes no leaf connections")?;
    let link = CountingProxy::plain(&hub_leaf).await?;
    let store = tempfile::tempdir()?;
    let leaf = NatsServer::builder()
        .server_name("leaf-leaf1")
        .jetstream_domain("leaf1")
        .store_dir(store.path().to_path_buf())
        .leaf_remote(format!("nats-leaf://{}", link.addr()))
        .start()
        .await?;
    let ljs = jetstream::new(leaf.connect().await);
    storage::provision(&ljs).await?;

    let nas_c = S3Client::new(storage::target(&nas, "nas", "hub"))?;
    nas_c.ensure_bucket().await?;
    let spec = storage::spec(&nas, "nas", "hub", "NAS");
    let env = [("NAS_ACCESS_KEY_ID", nas.access_key()), ("NAS_SECRET_ACCESS_KEY", nas.secret_key())];
    let args = ["--tier", "cluster", "--source-leaf", "leaf1", "--archive-target", spec.as_str()];
    let svc = ServiceProc::start_with_env(Component::StorageManager, &cluster.urls().join(","), &args, &env)?;
    let cclient = cluster.connect().await;
    wait_ready(&cclient, &svc).await?;
    let cjs = jetstream::new(cclient.clone());
    let mirror = resources::leaf_mirror(&storage::events_stream(), "leaf1")?;
    let stream = storage::events_stream();

    // Writes go on through the whole partition, in batches.
    const BATCH: u64 = 25;
    const BATCHES: u64 = 60;
    let writes = {
        let ljs = ljs.clone();
        tokio::spawn(async move {
            for b in 0..BATCHES {
                storage::publish_events(&ljs, b * BATCH, (b + 1) * BATCH).await?;
                tokio::time::sleep(PACE).await;
            }
            anyhow::Ok(())
        })
    };
    eventually!(NATS_RECOVERY_BOUND, "the mirror follows the leaf", {
        let n = storage::last_seq(&cjs, &mirror).await?;
        ensure!(n >= BATCH, "mirror at {n}");
        Ok(())
    })?;
    link.set_up(false);
    let cut = Instant::now();
    let leaf_links = async || -> Result<u64> {
        let mut n = 0;
        for node in cluster.nodes() {
            n += node.leaf_connections().await?;
        }
        Ok(n)
    };
    eventually!(NATS_RECOVERY_BOUND, "the hub sees the leaf gone", {
        ensure!(leaf_links().await? == 0, "still connected");
        Ok(())
    })?;
    let during = storage::last_seq(&ljs, &stream).await?;
    let mirrored = storage::last_seq(&cjs, &mirror).await?;
    tokio::time::sleep(OUTAGE).await;
    let later = storage::last_seq(&ljs, &stream).await?;
    ensure!(later > during, "the leaf took no writes while cut off ({during} then {later})");
    ensure!(leaf_links().await? == 0, "the leaf found another way to the hub");
    ensure!(storage::last_seq(&cjs, &mirror).await? == mirrored, "the mirror moved while the leaf was cut off");
    link.set_up(true);
    let healed = Instant::now();
    writes.await??;
    let written = Instant::now();
    let total = BATCH * BATCHES;
    eventually!(NATS_RECOVERY_BOUND, "the mirror catches up with the leaf", {
        let n = storage::last_seq(&cjs, &mirror).await?;
        ensure!(n == total, "mirror at {n} of {total}");
        Ok(())
    })?;
    let caught_up = written.elapsed();
    let (sl, sc) = (ljs.get_stream(&stream).await?, cjs.get_stream(&mirror).await?);
    ensure!(sc.clone().info().await?.state.messages == total, "the mirror holds another count");
    for seq in 1..=total {
        let (a, b) = (sl.get_raw_message(seq).await?, sc.get_raw_message(seq).await?);
        ensure!(a.subject == b.subject && a.payload == b.payload, "seq {seq} differs");
        ensure!(storage::headers_of(&a.headers) == storage::headers_of(&b.headers), "seq {seq}: headers differ");
    }
    // The hub's storage manager mirrors every stream a leaf may have; this leaf has one. The
    // others are said once to have no source, never to be "behind" (that is for the cut one).
    let log = svc.log();
    let noise: Vec<&str> =
        log.lines().filter(|l| l.contains("leaf mirror is behind") && !l.contains(mirror.as_str())).collect();
    ensure!(noise.is_empty(), "mirrors of streams the leaf does not have reported behind: {noise:#?}");
    ensure!(log.contains("the leaf has no such stream"), "no mirror said its leaf lacks the stream:\n{log}");
    println!(
        "chaos: leaf cut from its hub for {:.1} s during writes | mirror equal {:.1} s after the last write ({:.1} s after the link healed) | {total} messages, 0 lost, 0 duplicated",
        (healed - cut).as_secs_f64(),
        caught_up.as_secs_f64(),
        (written - healed).as_secs_f64() + caught_up.as_secs_f64()
    );
    Ok(())
}
