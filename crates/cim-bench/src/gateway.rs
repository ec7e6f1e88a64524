//! `cim-bench gateway`: the cost of the ui-gateway. Starts its own nats-server and the real
//! `information-unit` and `ui-gateway` binaries (next to cim-bench), then measures in the same run:
//! - create (upload 100 bytes + create) and get latency over HTTP vs the same operation as a
//!   direct NATS request with `cim-iu-client` (the ratio is the gateway's overhead),
//! - get throughput with concurrent callers, HTTP vs direct,
//! - download MB/s over HTTP vs the raw object-store read of the same content,
//! - live-event fan-out: 100 SSE clients, each unit created reaches all of them (lag, deliveries/s).

use std::{
    process::ExitCode,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use cim_events::{
    Component,
    gateway::{self, ApiToken},
    resources,
};
use cim_iu_client::{IuClient, proto::CreateUnit};
use prost::Message as _;
use tokio::io::AsyncReadExt;

use crate::support::{quantile, spawn_sibling, until};

#[derive(clap::Args, Debug)]
pub struct GatewayArgs {
    /// Sequential operations per latency measurement.
    #[arg(long, default_value_t = 300)]
    requests: usize,
    /// Seconds of each throughput measurement.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Concurrent callers in the throughput measurements.
    #[arg(long, default_value_t = 16)]
    callers: usize,
    /// Size of the downloaded content, in MiB.
    #[arg(long, default_value_t = 64)]
    download_mib: usize,
    /// SSE clients in the fan-out measurement.
    #[arg(long, default_value_t = 100)]
    sse_clients: usize,
    /// Units created during the fan-out measurement.
    #[arg(long, default_value_t = 50)]
    sse_events: usize,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub async fn run(args: GatewayArgs) -> Result<ExitCode> {
    let nats = cim_testkit::NatsServer::start().await?;
    let url = nats.url();
    let client = nats.connect().await;
    let iu = IuClient::new(client.clone());
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let (_iu_proc, _l1) = spawn_sibling("information-unit", &["--nats-url", &url, "--max-in-flight", "1024"])?;
    let (_gw_proc, _l2) = spawn_sibling(
        "ui-gateway",
        &["--nats-url", &url, "--gateway-listen", &listen, "--gateway-grpc-listen", "off", "--gateway-rate-limit", "0"],
    )?;
    let http = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(256).build()?;
    let base = format!("http://{listen}");
    until("information-unit ready", || async { iu.status().await.is_ok() }).await?;
    until("ui-gateway ready", || async {
        http.get(format!("{base}/api/openapi.json")).send().await.is_ok_and(|r| r.status().is_success())
    })
    .await?;

    // A writer token, stored the way `cimctl token create` stores it.
    let js = async_nats::jetstream::new(client.clone());
    let bucket = resources::kv_buckets(Component::UiGateway)
        .into_iter()
        .find(|b| b.bucket.ends_with(gateway::KV_TOKENS))
        .context("token bucket")?;
    let store = js.get_key_value(&bucket.bucket).await?;
    let token = format!("{}bench_{}", gateway::TOKEN_PREFIX, uuid::Uuid::new_v4().simple());
    let record = ApiToken {
        id: "bench".into(),
        name: "bench".into(),
        role: gateway::role::WRITER.into(),
        sha256: gateway::hash_token(&token),
        created_ms: 0,
    };
    store.put(gateway::token_key("bench")?, record.encode_to_vec().into()).await?;
    let auth = format!("Bearer {token}");

    println!("| scenario | gateway (HTTP) | direct NATS | ratio |");
    println!("| --- | --- | --- | --- |");

    // Create: upload 100 bytes and create a unit.
    let n = args.requests;
    let (mut http_create, mut direct_create) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut ids = Vec::new();
    for i in 0..n {
        let body = format!("{i:0>100}");
        let t = Instant::now();
        let r = http
            .post(format!("{base}/api/v1/units?name=h{i}.txt"))
            .header("authorization", &auth)
            .body(body.clone())
            .send()
            .await?;
        if r.status().as_u16() != 201 {
            bail!("create over http: {} {}", r.status(), r.text().await?);
        }
        let v: serde_json::Value = serde_json::from_slice(&r.bytes().await?)?;
        http_create.push(t.elapsed().as_secs_f64() * 1e3);
        ids.push(v["unit_id"].as_str().unwrap_or_default().to_string());
        let body = format!("d{i:0>99}");
        let t = Instant::now();
        let c = iu.put_bytes(body.as_bytes()).await?;
        iu.create(CreateUnit {
            cid: c.cid,
            name: format!("d{i}.txt"),
            media_type: "text/plain".into(),
            ..Default::default()
        })
        .await?;
        direct_create.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (hp50, dp50) = (quantile(&mut http_create, 0.5), quantile(&mut direct_create, 0.5));
    let (hp99, dp99) = (quantile(&mut http_create, 0.99), quantile(&mut direct_create, 0.99));
    println!("| create 100 B, p50 (n={n}) | {hp50:.2} ms | {dp50:.2} ms | {:.2}× |", hp50 / dp50);
    println!("| create 100 B, p99 | {hp99:.2} ms | {dp99:.2} ms | {:.2}× |", hp99 / dp99);

    // Get.
    let (mut http_get, mut direct_get) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for id in &ids {
        let t = Instant::now();
        let r = http.get(format!("{base}/api/v1/units/{id}")).header("authorization", &auth).send().await?;
        if !r.status().is_success() {
            bail!("get over http: {}", r.status());
        }
        r.bytes().await?;
        http_get.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        iu.unit(id).await?;
        direct_get.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (hp50, dp50) = (quantile(&mut http_get, 0.5), quantile(&mut direct_get, 0.5));
    let (hp99, dp99) = (quantile(&mut http_get, 0.99), quantile(&mut direct_get, 0.99));
    println!("| get, p50 | {hp50:.2} ms | {dp50:.2} ms | {:.2}× |", hp50 / dp50);
    println!("| get, p99 | {hp99:.2} ms | {dp99:.2} ms | {:.2}× |", hp99 / dp99);

    // Get throughput with concurrent callers.
    let ids = Arc::new(ids);
    let stop = Instant::now() + Duration::from_secs_f64(args.seconds);
    let mut tasks = Vec::new();
    for c in 0..args.callers {
        let (http, base, auth, ids) = (http.clone(), base.clone(), auth.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            let mut ok = 0u64;
            while Instant::now() < stop {
                let id = &ids[(ok as usize + c) % ids.len()];
                let r = http.get(format!("{base}/api/v1/units/{id}")).header("authorization", &auth).send().await?;
                r.bytes().await?;
                ok += 1;
            }
            anyhow::Ok(ok)
        }));
    }
    let mut http_ops = 0;
    for t in tasks {
        http_ops += t.await??;
    }
    let stop = Instant::now() + Duration::from_secs_f64(args.seconds);
    let mut tasks = Vec::new();
    for c in 0..args.callers {
        let (iu, ids) = (iu.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            let mut ok = 0u64;
            while Instant::now() < stop {
                iu.unit(&ids[(ok as usize + c) % ids.len()]).await?;
                ok += 1;
            }
            anyhow::Ok(ok)
        }));
    }
    let mut direct_ops = 0;
    for t in tasks {
        direct_ops += t.await??;
    }
    let (h, d) = (http_ops as f64 / args.seconds, direct_ops as f64 / args.seconds);
    println!("| get throughput, {} callers | {h:.0}/s | {d:.0}/s | {:.2}× |", args.callers, d / h);

    // Download vs raw object-store read.
    let size = args.download_mib << 20;
    let content: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let committed = iu.put_bytes(&content).await?;
    drop(content);
    let unit = iu
        .create(CreateUnit {
            cid: committed.cid.clone(),
            name: "big.bin".into(),
            media_type: "application/octet-stream".into(),
            ..Default::default()
        })
        .await?;
    let (mut best_http, mut best_raw) = (0f64, 0f64);
    let bucket = iu.content_store().await?;
    for _ in 0..3 {
        let t = Instant::now();
        let mut r = http
            .get(format!("{base}/api/v1/units/{}/content", unit.unit_id))
            .header("authorization", &auth)
            .send()
            .await?;
        let mut got = 0usize;
        while let Some(c) = r.chunk().await? {
            got += c.len();
        }
        if got != size {
            bail!("downloaded {got} of {size} bytes");
        }
        best_http = best_http.max(size as f64 / t.elapsed().as_secs_f64() / 1e6);
        let t = Instant::now();
        let mut o = bucket.get(&committed.cid).await?;
        let mut buf = vec![0u8; 128 * 1024];
        let mut got = 0usize;
        loop {
            let n = o.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got += n;
        }
        if got != size {
            bail!("read {got} of {size} bytes");
        }
        best_raw = best_raw.max(size as f64 / t.elapsed().as_secs_f64() / 1e6);
    }
    println!(
        "| download {} MiB (best of 3), vs raw object-store read | {best_http:.0} MB/s | {best_raw:.0} MB/s | {:.2}× |",
        args.download_mib,
        best_raw / best_http
    );

    // Live-event fan-out.
    let sent: Arc<Mutex<std::collections::HashMap<u64, Instant>>> = Arc::default();
    let lags: Arc<Mutex<Vec<f64>>> = Arc::default();
    let want = args.sse_events;
    let mut clients = Vec::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(args.sse_clients);
    for _ in 0..args.sse_clients {
        let (http, base, auth, sent, lags, ready) =
            (http.clone(), base.clone(), auth.clone(), sent.clone(), lags.clone(), ready_tx.clone());
        clients.push(tokio::spawn(async move {
            let filter = cim_events::subject::action_filter(
                Component::InformationUnit,
                cim_events::iu::UNIT,
                cim_events::iu::action::CREATED,
            )?;
            let mut r = http
                .get(format!("{base}/api/v1/events?component=iu&filter={filter}"))
                .header("authorization", &auth)
                .send()
                .await?;
            if !r.status().is_success() {
                bail!("events: {}", r.status());
            }
            ready.send(()).await.ok();
            let (mut buf, mut seen) = (String::new(), 0usize);
            while seen < want {
                let Some(c) = r.chunk().await? else { bail!("event stream ended") };
                let now = Instant::now();
                buf.push_str(&String::from_utf8_lossy(&c));
                while let Some(end) = buf.find("\n\n") {
                    let frame: String = buf.drain(..end + 2).collect();
                    if let Some(id) =
                        frame.lines().find_map(|l| l.strip_prefix("id:")).and_then(|v| v.trim().parse::<u64>().ok())
                    {
                        seen += 1;
                        let at = sent.lock().unwrap_or_else(|e| e.into_inner()).get(&id).copied();
                        if let Some(at) = at {
                            lags.lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(now.duration_since(at).as_secs_f64() * 1e3);
                        }
                    }
                }
            }
            anyhow::Ok(())
        }));
    }
    drop(ready_tx);
    for _ in 0..args.sse_clients {
        ready_rx.recv().await.context("an sse client failed to connect")?;
    }
    // The consumer behind a fresh connection is created before its response headers: all
    // clients are subscribed once they all answered.
    let t0 = Instant::now();
    for i in 0..want {
        let c = iu.put_bytes(format!("fan-out {i}").as_bytes()).await?;
        let sent_at = Instant::now();
        let r = iu
            .create(CreateUnit {
                cid: c.cid,
                name: format!("f{i}.txt"),
                media_type: "text/plain".into(),
                ..Default::default()
            })
            .await?;
        sent.lock().unwrap_or_else(|e| e.into_inner()).insert(r.version, sent_at);
    }
    for c in clients {
        tokio::time::timeout(Duration::from_secs(60), c).await.context("fan-out did not finish within 60s")???;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let mut lags = std::mem::take(&mut *lags.lock().unwrap_or_else(|e| e.into_inner()));
    let deliveries = args.sse_clients * want;
    println!(
        "| live events to {} SSE clients ({want} events) | lag p50 {:.1} ms, p99 {:.1} ms; {:.0} deliveries/s | — | — |",
        args.sse_clients,
        quantile(&mut lags, 0.5),
        quantile(&mut lags, 0.99),
        deliveries as f64 / elapsed
    );
    Ok(ExitCode::SUCCESS)
}
