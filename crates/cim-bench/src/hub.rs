//! `cim-bench hub`: the integration hub's cost. Starts its own nats-server, a raw HTTP
//! receiver on loopback and the real `integration-hub` binary (next to cim-bench), then measures in
//! the same run:
//! - outbound deliveries/s of one (ordered) subscription vs a raw HTTP client posting the same
//!   bodies, one at a time, to the same receiver,
//! - inbound signed webhooks → stored events per second vs raw JetStream publishes of the same
//!   bodies, both with `--callers` concurrent senders.

use std::{
    process::{ExitCode, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use async_nats::jetstream;
use cim_events::{Component, Envelope, Tier, hub, proto::hub::SubscriptionCommand, proto::iu::UnitCreated, resources};
use futures::StreamExt;
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(clap::Args, Debug)]
pub struct HubArgs {
    /// Events delivered outbound (and webhooks sent inbound).
    #[arg(long, default_value_t = 2000)]
    events: usize,
    /// Bytes of filler in each event / webhook body.
    #[arg(long, default_value_t = 256)]
    payload: usize,
    /// Concurrent webhook senders (and raw publishers) in the inbound measurement.
    #[arg(long, default_value_t = 8)]
    callers: usize,
}

const SECRET: &str = "whsec_YmVuY2htYXJrLXNlY3JldC0xMjM0NTY3OA==";

/// A keep-alive HTTP/1.1 receiver that answers 200 to every request and counts them.
async fn receiver() -> Result<(std::net::SocketAddr, Arc<AtomicU64>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let c = c.clone();
            tokio::spawn(async move {
                let mut raw = Vec::new();
                let mut buf = vec![0u8; 65536];
                loop {
                    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => raw.extend_from_slice(&buf[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while raw.len() < end + 4 + len {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => raw.extend_from_slice(&buf[..n]),
                        }
                    }
                    raw.drain(..end + 4 + len);
                    c.fetch_add(1, Ordering::SeqCst);
                    if conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok((addr, count))
}

pub async fn run(args: HubArgs) -> Result<ExitCode> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().context("cim-bench has no directory")?.join(Component::IntegrationHub.service_name());
    if !bin.is_file() {
        bail!("{} is missing: build it with `cargo build --release --workspace --bins`", bin.display());
    }
    let nats = cim_testkit::NatsServer::start().await?;
    let client = nats.connect().await;
    let js = jetstream::new(client.clone());
    js.get_or_create_stream(resources::events_stream(Component::InformationUnit).config(Tier::Leaf)).await?;
    let (addr, received) = receiver().await?;
    let url = format!("http://{addr}/hook");

    let filter = cim_events::subject::action_filter(
        Component::InformationUnit,
        cim_events::iu::UNIT,
        cim_events::iu::action::CREATED,
    )?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("hub.json");
    std::fs::write(
        &config,
        serde_json::json!({
            "outbound_allow": ["127.0.0.1"],
            "webhooks": [{ "name": "bench", "secret_env": "CIM_BENCH_SECRET", "content": "any", "max_body_bytes": 1 << 20 }],
            "subscriptions": [{ "name": "bench", "filter": filter, "url": url, "secret_env": "CIM_BENCH_SECRET", "deliver": "new" }],
        })
        .to_string(),
    )?;
    let log = tempfile::Builder::new().prefix("cim-bench-hub-").suffix(".log").tempfile()?;
    let _hub = tokio::process::Command::new(&bin)
        .args([
            "--nats-url",
            &nats.url(),
            "--hub-config",
            config.to_str().unwrap_or_default(),
            "--hub-webhook-listen",
            "127.0.0.1:0",
        ])
        .env("CIM_BENCH_SECRET", SECRET)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.reopen()?)
        .stderr(log.reopen()?)
        .kill_on_drop(true)
        .spawn()?;
    let listing: serde_json::Value =
        cim_testkit::eventually(Duration::from_secs(60), "integration-hub answering", || async {
            let r =
                tokio::time::timeout(Duration::from_secs(1), client.request(hub::query(hub::qry::SOURCES)?, "".into()))
                    .await??;
            Ok(serde_json::from_slice(&r.payload)?)
        })
        .await?;
    let webhook_addr = listing["webhook_addr"].as_str().context("webhook_addr")?.to_string();
    // The subscription's consumer exists once the hub is ready; pause it while events pile up.
    let pause = SubscriptionCommand { subscription: "bench".into(), reason: "bench".into() }.encode_to_vec();
    client.request(hub::command(hub::cmd::PAUSE)?, pause.clone().into()).await?;

    // The same bodies for both sides.
    let bodies: Vec<(async_nats::HeaderMap, bytes::Bytes)> = (0..args.events)
        .map(|n| {
            let env = Envelope::root::<UnitCreated>("bench");
            let payload =
                UnitCreated { unit_id: format!("u{n}"), name: "x".repeat(args.payload), ..Default::default() };
            cim_events::payload::encode(&env, &payload)
        })
        .collect();

    // Baseline: a raw HTTP client, one request at a time (a subscription keeps one in flight).
    let http = reqwest::Client::builder().no_proxy().build()?;
    let before = received.load(Ordering::SeqCst);
    let t = Instant::now();
    for (_, body) in &bodies {
        let r = http.post(&url).body(body.clone()).send().await?;
        if !r.status().is_success() {
            bail!("receiver answered {}", r.status());
        }
    }
    let raw_out = args.events as f64 / t.elapsed().as_secs_f64();
    anyhow::ensure!(received.load(Ordering::SeqCst) - before == args.events as u64);

    // The hub: events are in the stream, the subscription resumes, delivery is timed to the last.
    for (n, (headers, body)) in bodies.iter().enumerate() {
        js.publish_with_headers(
            cim_events::iu::unit_event(&format!("u{n}"), cim_events::iu::action::CREATED)?,
            headers.clone(),
            body.clone(),
        )
        .await?;
    }
    js.publish(cim_events::iu::unit_event("flush", "probe")?, "".into()).await?.await?;
    let before = received.load(Ordering::SeqCst);
    let t = Instant::now();
    client.request(hub::command(hub::cmd::RESUME)?, pause.into()).await?;
    while received.load(Ordering::SeqCst) - before < args.events as u64 {
        if t.elapsed() > Duration::from_secs(600) {
            bail!("the hub delivered {} of {} in 600 s", received.load(Ordering::SeqCst) - before, args.events);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let hub_out = args.events as f64 / t.elapsed().as_secs_f64();

    // Inbound: signed webhooks → events, vs raw JetStream publishes of the same bodies.
    let key = hub::secret_key(SECRET)?;
    let raw_in = rate(args.events, args.callers, |n| {
        let js = js.clone();
        let body = bodies[n].1.clone();
        async move {
            js.publish(hub::webhook_event("raw")?, body).await?.await?;
            Ok(())
        }
    })
    .await?;
    let hub_in = rate(args.events, args.callers, |n| {
        let (http, key, body) = (http.clone(), key.clone(), bodies[n].1.clone());
        let url = format!("http://{webhook_addr}/webhooks/bench");
        async move {
            let id = format!("bench-{n}");
            let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
            let r = http
                .post(url)
                .header(hub::H_WEBHOOK_ID, &id)
                .header(hub::H_WEBHOOK_TIMESTAMP, ts.to_string())
                .header(hub::H_WEBHOOK_SIGNATURE, hub::sign(&key, &id, ts, &body))
                .body(body)
                .send()
                .await?;
            anyhow::ensure!(r.status().as_u16() == 202, "webhook answered {}", r.status());
            Ok(())
        }
    })
    .await?;
    let stored = {
        let stream = js.get_stream(resources::events_stream(Component::IntegrationHub).name).await?;
        let mut info = stream.info_with_subjects(hub::webhook_history("bench")?).await?;
        let mut n = 0;
        while let Some(s) = info.next().await {
            n += s?.1;
        }
        n
    };
    anyhow::ensure!(stored == args.events, "{stored} webhook events stored, expected {}", args.events);

    println!(
        "## integration-hub: {} events of ~{} bytes, {} concurrent webhook senders\n",
        args.events, args.payload, args.callers
    );
    println!("| scenario | hub | raw baseline | hub / raw |");
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| outbound deliveries/s (ordered, signed, logged) vs raw HTTP POSTs one at a time | {hub_out:.0} | {raw_out:.0} | {:.2} |",
        hub_out / raw_out
    );
    println!(
        "| inbound webhooks → events/s (verified, de-duplicated) vs raw JetStream publish | {hub_in:.0} | {raw_in:.0} | {:.2} |",
        hub_in / raw_in
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs `n` operations with `callers` in flight; returns operations per second.
async fn rate<F, Fut>(n: usize, callers: usize, op: F) -> Result<f64>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let t = Instant::now();
    let results: Vec<Result<()>> =
        futures::stream::iter(0..n).map(&op).buffer_unordered(callers.max(1)).collect().await;
    for r in results {
        r?;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}
