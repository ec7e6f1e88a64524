//! NATS decentralized auth (operator mode, JWT + NKey): a service given `--nats-creds` of a
//! user the server trusts provisions and serves; one given unknown credentials stays alive,
//! unready and says why; a user's publish permissions are enforced on a service.

use std::time::Duration;

use anyhow::Result;
use async_nats::jetstream;
use cim_events::{Component, resources, subject};
use cim_testkit::{NatsServer, Operator, Permissions, eventually, free_port, http_get};
use futures::{FutureExt as _, StreamExt as _};

use crate::common::{ServiceProc, wait_ready};

/// A server in operator mode with one JetStream account `APP`.
async fn operator_mode() -> Result<(NatsServer, Operator, cim_testkit::Account)> {
    let mut op = Operator::new();
    let app = op.account_with_jetstream("APP");
    let nats = NatsServer::builder().operator(&op).start().await?;
    Ok((nats, op, app))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_with_trusted_creds_provisions_and_answers() -> Result<()> {
    let (nats, _op, app) = operator_mode().await?;
    let dir = tempfile::tempdir()?;
    let service_user = app.user("registry", Permissions::all());
    let creds = service_user.write_creds(dir.path())?;

    // Anonymous clients are refused: the server really is in operator mode.
    assert!(nats.try_connect().await.is_err(), "an anonymous client connected");

    let client = app.user("tester", Permissions::all()).connect(&nats.url()).await?;
    let mut lifecycle = client.subscribe(subject::all_lifecycle()).await?;
    client.flush().await?;

    let svc = ServiceProc::start(
        Component::Registry,
        &nats.url(),
        &["--nats-creds", creds.to_str().unwrap(), "--instance-id", "registry-auth"],
    )?;
    let d = wait_ready(&client, &svc).await?;
    assert_eq!(d.service.unwrap().instance_id, "registry-auth");

    // Its streams exist in the APP account (seen through another user of that account).
    let js = jetstream::new(client.clone());
    for s in resources::streams(Component::Registry) {
        js.get_stream(&s.name).await?;
    }
    // It announced itself to the account.
    let announce = subject::lifecycle(Component::Registry, "registry-auth", subject::Lifecycle::Announce)?;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), lifecycle.next()).await?.expect("subscription open");
        if m.subject.as_str() == announce {
            break;
        }
    }
    // The server authenticated it as the service user of APP.
    let connz = nats.monitor_json("/connz?auth=true").await?;
    let conns = connz["connections"].as_array().cloned().unwrap_or_default();
    let conn = conns
        .iter()
        .find(|c| c["name"].as_str().is_some_and(|n| n.starts_with("registry/")))
        .unwrap_or_else(|| panic!("no registry connection in {connz}"));
    assert_eq!(conn["authorized_user"], service_user.public_key(), "{conn}");
    assert_eq!(conn["account"], app.public_key(), "{conn}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_with_unknown_creds_stays_alive_unready_and_logs_why() -> Result<()> {
    let (nats, _op, app) = operator_mode().await?;
    let dir = tempfile::tempdir()?;
    // A well-formed user of an account (and operator) this server has never heard of.
    let stranger = Operator::new().account_with_jetstream("APP").user("registry", Permissions::all());
    let creds = stranger.write_creds(dir.path())?;
    let http = format!("127.0.0.1:{}", free_port());

    let mut svc = ServiceProc::start(
        Component::Registry,
        &nats.url(),
        &["--nats-creds", creds.to_str().unwrap(), "--http-listen", &http],
    )?;
    // The server refuses it, repeatedly: the service keeps retrying.
    eventually(Duration::from_secs(20), "the server to refuse the unknown user twice", || async {
        let log = std::fs::read_to_string(nats.log_path())?;
        let refusals = log.lines().filter(|l| l.contains("authentication error")).count();
        anyhow::ensure!(refusals >= 2, "{refusals} refusals so far");
        Ok(())
    })
    .await?;
    // The service says why in its own log.
    eventually(Duration::from_secs(20), "the service to log the authorization error", || async {
        let log = svc.log().to_lowercase();
        anyhow::ensure!(log.contains("authorization violation"), "log so far:\n{log}");
        Ok(())
    })
    .await?;
    // Alive but never ready.
    let live = http_get(&http, "/livez").await?;
    assert_eq!(live.status, 200, "{}", svc.log());
    let ready = http_get(&http, "/readyz").await?;
    assert_ne!(ready.status, 200, "{}", svc.log());
    let trusted = app.user("tester", Permissions::all()).connect(&nats.url()).await?;
    assert!(
        crate::common::describe(&trusted, Component::Registry).await.is_err(),
        "an unauthenticated registry answered"
    );
    // It has not crashed, and stops cleanly.
    let status = svc.terminate(Duration::from_secs(20)).await?;
    assert!(status.success(), "exited with {status}; log:\n{}", svc.log());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_denied_its_lifecycle_subjects_cannot_announce() -> Result<()> {
    let (nats, _op, app) = operator_mode().await?;
    let dir = tempfile::tempdir()?;
    let service_user = app.user("registry", Permissions::all().deny_publish(subject::all_lifecycle()));
    // `cim.svc.registry.registry-muted.`: the start of every lifecycle subject of that instance.
    let announce = subject::lifecycle(Component::Registry, "registry-muted", subject::Lifecycle::Announce)?;
    let muted = announce.trim_end_matches(subject::Lifecycle::Announce.token()).to_string();
    let creds = service_user.write_creds(dir.path())?;
    let client = app.user("tester", Permissions::all()).connect(&nats.url()).await?;
    let mut lifecycle = client.subscribe(subject::all_lifecycle()).await?;
    client.flush().await?;

    let svc = ServiceProc::start(
        Component::Registry,
        &nats.url(),
        &["--nats-creds", creds.to_str().unwrap(), "--instance-id", "registry-muted"],
    )?;
    // Everything else is allowed: it provisions and answers.
    wait_ready(&client, &svc).await?;
    // The server drops its announce and heartbeats as publish violations of that user.
    eventually(Duration::from_secs(20), &format!("publish violations on {muted}"), || async {
        let log = std::fs::read_to_string(nats.log_path())?;
        let n = log
            .lines()
            .filter(|l| l.contains(&service_user.public_key()) && l.contains("Publish Violation") && l.contains(&muted))
            .count();
        anyhow::ensure!(n >= 2, "{n} violations logged");
        Ok(())
    })
    .await?;
    client.flush().await?;
    while let Some(Some(m)) = lifecycle.next().now_or_never() {
        assert!(!m.subject.starts_with(&muted), "a denied lifecycle message got through: {}", m.subject);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_logs_in_with_the_user_and_password_in_its_url_and_never_logs_the_password() -> Result<()> {
    let nats = NatsServer::builder()
        .extra_config("authorization { users = [ { user: \"registry\", password: \"s3cret-pw\" }, { user: \"probe\", password: \"probe-pw\" } ] }")
        .start()
        .await?;
    let url = |user: &str, pw: &str| format!("nats://{user}:{pw}@127.0.0.1:{}", nats.port());
    let probe = async_nats::ConnectOptions::with_user_and_password("probe".into(), "probe-pw".into())
        .connect(format!("127.0.0.1:{}", nats.port()))
        .await?;
    let svc = ServiceProc::start(Component::Registry, &url("registry", "s3cret-pw"), &[])?;
    wait_ready(&probe, &svc).await?;

    // A wrong password: alive, never ready, and the log says why without the password.
    let wrong =
        ServiceProc::start(Component::Registry, &url("registry", "not-the-pw"), &["--instance-id", "registry-wrong"])?;
    eventually(Duration::from_secs(20), "an authorization error in the log", || async {
        let log = wrong.log();
        anyhow::ensure!(log.to_lowercase().contains("authorization"), "{log}");
        Ok(())
    })
    .await?;
    for log in [svc.log(), wrong.log()] {
        assert!(!log.contains("s3cret-pw") && !log.contains("not-the-pw"), "a password reached the log:\n{log}");
    }
    Ok(())
}
