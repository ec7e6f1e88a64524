//! The archive's signals against real processes: nats-server, `s3s-fs` behind a counting
//! proxy ([`CountingProxy`]), the information-unit, registry and storage-manager binaries and
//! `cimctl`. Idle means no PUT and next to no request; during an S3 outage or with refused
//! credentials the lag grows and is exported, the target is reported down, the storage
//! manager says it is degraded (and stays ready), `cimctl archive status` fails naming the
//! target; a closed stdout ends cimctl quietly.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use async_nats::jetstream;
use cim_archive::{Credentials, S3Client, Target};
use cim_events::proto::iu::CreateUnit;
use cim_events::{Component, Tier, resources};
use cim_testkit::{CountingProxy, NatsServer, S3Server, eventually, stays_true_for};

use crate::common::{ServiceProc, bin, describe, wait_ready};
use crate::fixture::{CimFixture, Svc};

const BUCKET: &str = "cim-archive";
const WAIT: Duration = Duration::from_secs(90);
/// How long the archive must write nothing before the idle watch begins.
const SETTLE: Duration = Duration::from_secs(2);
const PREFIX: &str = "site";

/// The target as the storage manager sees it: through the proxy.
fn spec(endpoint: &str, s3: &S3Server) -> String {
    format!(
        "name=nas,endpoint={endpoint},region={},bucket={BUCKET},path-style=true,prefix={PREFIX},credentials-env=NAS",
        s3.region()
    )
}

fn env(s3: &S3Server) -> [(&'static str, String); 2] {
    [("NAS_ACCESS_KEY_ID", s3.access_key().to_string()), ("NAS_SECRET_ACCESS_KEY", s3.secret_key().to_string())]
}

/// A client straight to the S3 server (not through the proxy, not counted).
fn direct(s3: &S3Server) -> Result<S3Client> {
    Ok(S3Client::new(Target {
        name: "nas".into(),
        endpoint: s3.endpoint(),
        region: s3.region().to_string(),
        bucket: BUCKET.to_string(),
        prefix: PREFIX.to_string(),
        path_style: true,
        credentials: Credentials::new(s3.access_key(), s3.secret_key()),
        signing_key_file: None,
    })?)
}

fn events_stream() -> String {
    resources::events_stream(Component::InformationUnit).name
}

/// The value of the metric line `name{...}` whose labels include every one of `labels`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<i64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix('{')?;
        let (set, value) = rest.split_once("} ")?;
        labels.iter().all(|(k, v)| set.contains(&format!("{k}=\"{v}\""))).then(|| value.trim().parse().ok())?
    })
}

/// Every `cim_archive_lag` value of the target.
fn lags(text: &str) -> Vec<(String, i64)> {
    text.lines()
        .filter(|l| l.starts_with("cim_archive_lag{") && l.contains("target=\"nas\""))
        .filter_map(|l| {
            let (set, value) = l.split_once("} ")?;
            Some((set.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

async fn metrics(http: &str) -> Result<String> {
    Ok(cim_testkit::http_get(http, "/metrics").await?.text())
}

/// `cimctl` with the target spec and credentials in its environment: (exit code, stdout+stderr).
async fn cimctl(args: &[&str], nats_url: &str, spec: &str, env: &[(&str, String)]) -> Result<(i32, String)> {
    let out = tokio::process::Command::new(bin("cimctl"))
        .args(args)
        .env("CIM_NATS_URL", nats_url)
        .env("CIM_ARCHIVE_TARGETS", spec)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .await?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.code().unwrap_or(-1), text))
}

/// S3 behind a counting proxy, and a CIM with the information unit, the registry and a storage
/// manager archiving through the proxy (`extra` arguments appended).
struct Setup {
    s3: S3Server,
    proxy: CountingProxy,
    cim: CimFixture,
    spec: String,
    sm_http: String,
}

async fn setup(extra: &[&str]) -> Result<Setup> {
    let s3 = S3Server::start().await?;
    direct(&s3)?.ensure_bucket().await?;
    let proxy = CountingProxy::start(&s3.endpoint()).await?;
    let spec = spec(&proxy.endpoint(), &s3);
    let env = env(&s3);
    let mut args = vec![
        "--archive-target",
        spec.as_str(),
        "--archive-linger",
        "50ms",
        "--archive-object-poll",
        "200ms",
        "--archive-verify-interval",
        "200ms",
        "--archive-retry-max",
        "1s",
    ];
    args.extend_from_slice(extra);
    let sm = Svc::new(Component::StorageManager)
        .args(&args)
        .envs(&[(env[0].0, env[0].1.as_str()), (env[1].0, env[1].1.as_str())]);
    let cim = CimFixture::builder()
        .service(Component::Registry)
        .service(Component::InformationUnit)
        .service(sm)
        .start()
        .await?;
    let sm_http =
        describe(cim.client(), Component::StorageManager).await?.service.context("describe without service")?.http_addr;
    Ok(Setup { s3, proxy, cim, spec, sm_http })
}

/// Creates `n` units (content and a unit each) through the information-unit service.
async fn create_units(cim: &CimFixture, from: usize, n: usize) -> Result<()> {
    let iu = cim.iu();
    for i in from..from + n {
        let body = format!("unit {i} {}", "x".repeat(1000 + i)).into_bytes();
        let cid = iu.put_bytes(&body).await?.cid;
        iu.create(CreateUnit {
            cid,
            name: format!("unit-{i}.txt"),
            media_type: "text/plain".into(),
            ..Default::default()
        })
        .await?;
    }
    Ok(())
}

/// The `stream` label of a metric line's label set.
fn stream_label(set: &str) -> Option<&str> {
    set.split("stream=\"").nth(1)?.split('"').next()
}

/// Waits until every stream the storage manager exports a lag for is verified on nas through
/// the stream's last sequence as JetStream tells it now (not as the last round saw it), the
/// information unit's events among them; returns how many streams that is.
async fn wait_all_verified(s: &Setup) -> Result<usize> {
    let js = s.cim.js();
    eventually(WAIT, "every stream archived and verified on nas", || async {
        let text = metrics(&s.sm_http).await?;
        let lags = lags(&text);
        ensure!(
            lags.iter().any(|(l, _)| stream_label(l) == Some(events_stream().as_str())),
            "no lag exported for the events yet"
        );
        for (set, lag) in &lags {
            let stream = stream_label(set).context("no stream label")?;
            // (A stream that is not there has nothing to verify.)
            let Ok(mut handle) = js.get_stream(stream).await else { continue };
            let last = handle.info().await?.state.last_sequence;
            let verified = metric(&text, "cim_archive_verified_sequence", &[("stream", stream), ("target", "nas")]);
            ensure!(
                *lag == 0 && verified.is_some_and(|v| v as u64 >= last),
                "{stream}: lag {lag}, verified {verified:?}, last {last}"
            );
        }
        Ok(lags.len())
    })
    .await
    .with_context(|| s.cim.service(Component::StorageManager).log())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn archive_signals_idle_storage_manager_sends_no_put_and_almost_no_request() -> Result<()> {
    // Object copies and verification polled every 200 ms: 150 polls in the idle half minute.
    let s = setup(&[]).await?;
    create_units(&s.cim, 0, 5).await?;
    let streams = wait_all_verified(&s).await?;
    // Every unit's content is on the target by its CID.
    let direct = direct(&s.s3)?;
    let objects = cim_archive::format::object_key(&direct.target().prefix, cim_events::iu::CONTENT_BUCKET, "");
    eventually(WAIT, "the 5 contents copied by name", || async {
        let n = direct.list(&objects, None).await?.len();
        ensure!(n >= 5, "{n} copies");
        Ok(())
    })
    .await?;
    // The commits' aftermath is archived too before idle begins: each commit removed its
    // upload's metadata, and those deletions are recorded on the target shortly after. A
    // storage manager that never stops writing never settles, and fails here.
    eventually(WAIT, "the archive to settle", || async {
        let before = s.proxy.count("PUT");
        tokio::time::sleep(SETTLE).await;
        ensure!(s.proxy.count("PUT") == before, "still writing: {:?}", s.proxy.counts());
        Ok(())
    })
    .await?;
    let busy = s.proxy.counts();
    s.proxy.reset();

    // Idle: no PUT (no object copied again, nothing re-archived) and at most a probe or two.
    const IDLE: Duration = Duration::from_secs(30);
    stays_true_for(IDLE, "the idle storage manager to leave S3 alone", || async {
        let c = s.proxy.counts();
        ensure!(s.proxy.count("PUT") == 0 && s.proxy.count("POST") == 0, "writes while idle: {c:?}");
        ensure!(s.proxy.total() <= 3, "requests while idle: {c:?}");
        Ok(())
    })
    .await
    .with_context(|| s.cim.service(Component::StorageManager).log())?;
    eprintln!(
        "archive idle requests: {:?} in {IDLE:?} over {streams} streams (while archiving 5 units: {busy:?})",
        s.proxy.counts()
    );

    // A new unit is archived and verified at once (idle did not mean asleep); then quiet again.
    create_units(&s.cim, 5, 1).await?;
    wait_all_verified(&s).await?;
    ensure!(s.proxy.count("PUT") > 0, "a new unit was not archived: {:?}", s.proxy.counts());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn archive_signals_outage_grows_the_lag_and_degrades_then_recovers() -> Result<()> {
    let s = setup(&[]).await?;
    let url = s.cim.url().to_string();
    let env = env(&s.s3);
    let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (*k, v.clone())).collect();
    create_units(&s.cim, 0, 3).await?;
    wait_all_verified(&s).await?;
    let text = metrics(&s.sm_http).await?;
    assert_eq!(metric(&text, "cim_archive_target_up", &[("target", "nas")]), Some(1), "{text}");
    assert!(
        metric(&text, "cim_archive_last_verified_timestamp_seconds", &[("stream", &events_stream())])
            .is_some_and(|t| t > 1_700_000_000),
        "{text}"
    );
    let (code, out) = cimctl(&["archive", "status"], &url, &s.spec, &env).await?;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("archive status: ok"), "{out}");

    // S3 down: new units are taken (NATS work goes on), the lag grows and is exported, the
    // target is reported down and the service degraded, but still ready.
    s.proxy.set_up(false);
    create_units(&s.cim, 3, 3).await?;
    eventually(WAIT, "lag > 0 and the target down in /metrics", || async {
        let text = metrics(&s.sm_http).await?;
        let lag = metric(&text, "cim_archive_lag", &[("stream", &events_stream()), ("target", "nas")]);
        ensure!(lag.is_some_and(|l| l > 0), "lag {lag:?}");
        let up = metric(&text, "cim_archive_target_up", &[("target", "nas")]);
        ensure!(up == Some(0), "up {up:?}");
        ensure!(metric(&text, "cim_degraded", &[]) == Some(1), "not degraded");
        Ok(())
    })
    .await?;
    let ready = cim_testkit::http_get(&s.sm_http, "/readyz").await?;
    assert_eq!(ready.status, 200, "degraded must stay ready");
    assert!(ready.text().contains("degraded: archive target nas unreachable"), "{}", ready.text());

    let (code, out) = cimctl(&["archive", "status"], &url, &s.spec, &env).await?;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("PROBLEM: target nas unreachable"), "{out}");

    eventually(WAIT, "cimctl status to show the storage manager degraded", || async {
        let (_, out) = cimctl(&["status", "--timeout", "2"], &url, "", &[]).await?;
        ensure!(out.contains("degraded: archive target nas unreachable"), "{out}");
        // The instance's row: READY says degraded (it is running and takes work).
        let row = out
            .lines()
            .find(|l| l.contains(" storage-manager ") && l.contains(" running "))
            .context("no storage-manager instance row")?;
        ensure!(row.contains(" degraded "), "{row}");
        let (code, _) = cimctl(&["status", "--timeout", "2", "--check"], &url, "", &[]).await?;
        ensure!(code == 3, "status --check exited {code}");
        Ok(())
    })
    .await?;

    // S3 back: archived, verified, lag 0, the target up; status clean again.
    s.proxy.set_up(true);
    wait_all_verified(&s).await?;
    eventually(WAIT, "the target up and the service no longer degraded", || async {
        let text = metrics(&s.sm_http).await?;
        ensure!(metric(&text, "cim_archive_target_up", &[("target", "nas")]) == Some(1), "still down");
        ensure!(metric(&text, "cim_degraded", &[]) == Some(0), "still degraded");
        let (_, out) = cimctl(&["status", "--timeout", "2"], &url, "", &[]).await?;
        ensure!(!out.contains("degraded"), "{out}");
        Ok(())
    })
    .await?;
    let (code, out) = cimctl(&["archive", "status"], &url, &s.spec, &env).await?;
    assert_eq!(code, 0, "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn archive_signals_refused_credentials_export_a_growing_lag() -> Result<()> {
    let (nats, s3) = tokio::try_join!(NatsServer::start(), S3Server::start())?;
    let client = nats.connect().await;
    let js = jetstream::new(client.clone());
    js.get_or_create_stream(resources::events_stream(Component::InformationUnit).config(Tier::Leaf)).await?;
    direct(&s3)?.ensure_bucket().await?;
    let spec = spec(&s3.endpoint(), &s3);
    const WRONG: &str = "wrong-secret-0e5f1c";
    let bad = [("NAS_ACCESS_KEY_ID", s3.access_key().to_string()), ("NAS_SECRET_ACCESS_KEY", WRONG.to_string())];
    let bad_env: Vec<(&str, &str)> = bad.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let args = ["--archive-target", spec.as_str(), "--archive-verify-interval", "200ms", "--archive-retry-max", "1s"];
    let sm = ServiceProc::start_with_env(Component::StorageManager, &nats.url(), &args, &bad_env)?;
    let http = wait_ready(&client, &sm).await?.service.context("describe without service")?.http_addr;

    let publish = |from: usize, to: usize| {
        let js = js.clone();
        async move {
            for i in from..to {
                let subject = cim_events::subject::event(Component::InformationUnit, "unit", "u1", "tagged")?;
                js.publish(subject, format!("event {i}").into()).await?.await?;
            }
            anyhow::Ok(())
        }
    };
    let lag = || async {
        let text = metrics(&http).await?;
        Ok::<_, anyhow::Error>((
            metric(&text, "cim_archive_lag", &[("stream", &events_stream()), ("target", "nas")]),
            metric(&text, "cim_archive_target_up", &[("target", "nas")]),
            metric(&text, "cim_archive_verified_sequence", &[("stream", &events_stream()), ("target", "nas")]),
        ))
    };
    publish(0, 10).await?;
    eventually(WAIT, "a lag of 10 exported with the target down", || async {
        let (l, up, verified) = lag().await?;
        ensure!(l == Some(10) && up == Some(0) && verified == Some(0), "lag {l:?}, up {up:?}, verified {verified:?}");
        Ok(())
    })
    .await
    .with_context(|| sm.log())?;
    publish(10, 25).await?;
    eventually(WAIT, "the lag growing to 25", || async {
        let (l, _, _) = lag().await?;
        ensure!(l == Some(25), "lag {l:?}");
        Ok(())
    })
    .await?;
    let text = metrics(&http).await?;
    assert_eq!(metric(&text, "cim_degraded", &[]), Some(1), "{text}");
    assert!(!sm.log().contains(WRONG) && !text.contains(WRONG), "the secret in the log or metrics");
    let ready = cim_testkit::http_get(&http, "/readyz").await?;
    assert_eq!(ready.status, 200);
    assert!(
        ready.text().contains("archive target nas unreachable") && !ready.text().contains(WRONG),
        "{}",
        ready.text()
    );

    // cimctl with the same refused credentials: exit 1, the target named.
    let (code, out) = cimctl(&["archive", "status"], &nats.url(), &spec, &bad).await?;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("PROBLEM: target nas unreachable") && out.contains("403"), "{out}");
    assert!(!out.contains(WRONG), "{out}");
    // A target that is not configured right: exit 64 and why.
    for (bad_spec, why) in [
        ("name=nas", "endpoint"),
        ("name=nas,endpoint=http://127.0.0.1:1,bucket=b,credentials-env=NAS,bogus=1", "bogus"),
    ] {
        let (code, out) = cimctl(&["archive", "status"], &nats.url(), bad_spec, &bad).await?;
        assert_eq!(code, 64, "{bad_spec}: {out}");
        assert!(out.contains(why) && !out.contains("panicked"), "{bad_spec}: {out}");
    }
    let (code, out) = cimctl(&["archive", "status", "--archive-required", "wasabi"], &nats.url(), &spec, &bad).await?;
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("wasabi"), "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn archive_signals_cimctl_ends_quietly_on_a_closed_stdout() -> Result<()> {
    let (nats, s3) = tokio::try_join!(NatsServer::start(), S3Server::start())?;
    let js = jetstream::new(nats.connect().await);
    js.get_or_create_stream(resources::events_stream(Component::InformationUnit).config(Tier::Leaf)).await?;
    direct(&s3)?.ensure_bucket().await?;
    let spec = spec(&s3.endpoint(), &s3);
    let env = env(&s3);
    // The reader is gone before cimctl writes anything: its first line meets a closed pipe.
    for args in [&["archive", "status"][..], &["status", "--timeout", "1"], &["archive", "verify"]] {
        let mut child = tokio::process::Command::new(bin("cimctl"))
            .args(args)
            .env("CIM_NATS_URL", nats.url())
            .env("CIM_ARCHIVE_TARGETS", &spec)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        drop(child.stdout.take());
        let out = tokio::time::timeout(WAIT, child.wait_with_output()).await??;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "{args:?}: {stderr}");
        assert!(matches!(out.status.code(), Some(0 | 141)), "{args:?}: {:?} {stderr}", out.status);
    }
    // As an operator types it: `cimctl archive status | head -1` through a shell pipe.
    let cimctl = bin("cimctl");
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!("'{}' archive status | head -1", cimctl.display()))
        .env("CIM_NATS_URL", nats.url())
        .env("CIM_ARCHIVE_TARGETS", &spec)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .await?;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("STREAM") && stdout.lines().count() == 1, "{stdout}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    Ok(())
}
