//! `cim-bench plugin`: the cost of running a plugin. Starts its own nats-server and the real
//! `plugin-host` binary (next to cim-bench), then measures in the same run:
//! - the round trip of a trivial WebAssembly plugin (`identity`) vs a raw NATS request/reply of
//!   the same bytes answered by an echo responder (the ratio is the plugin overhead),
//! - the in-process instantiate+call time the host reports per invocation (`duration_us`),
//! - invocations per second with the host's parallelism at 1 and at 2, for the trivial plugin
//!   and a CPU-bound one (`crc32` over 256 KiB).

use std::{
    process::{ExitCode, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use cim_events::{
    plugin,
    proto::plugin::{InvokeReply, InvokeRequest, ListPlugins, ListReply, Status},
};
use futures::StreamExt;
use prost::Message as _;
use tokio::process::{Child, Command};

#[derive(clap::Args, Debug)]
pub struct PluginArgs {
    /// Sequential requests per latency measurement.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Input size of the latency measurement, in bytes.
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Seconds of each throughput measurement.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Concurrent callers in the throughput measurements.
    #[arg(long, default_value_t = 16)]
    callers: usize,
}

struct Host {
    child: Child,
    _log: tempfile::NamedTempFile,
}

impl Host {
    async fn start(nats_url: &str, parallelism: u32, client: &async_nats::Client) -> Result<Host> {
        let exe = std::env::current_exe()?;
        let bin = exe.parent().context("cim-bench has no directory")?.join("plugin-host");
        if !bin.is_file() {
            bail!("{} is missing: build it with `cargo build --release --workspace --bins`", bin.display());
        }
        let log = tempfile::Builder::new().prefix("cim-bench-plugin-").suffix(".log").tempfile()?;
        let child = Command::new(bin)
            .args(["--nats-url", nats_url, "--plugin-parallelism", &parallelism.to_string(), "--plugin-queue", "4096"])
            .args(["--max-in-flight", "4096"])
            .stdin(Stdio::null())
            .stdout(log.reopen()?)
            .stderr(log.reopen()?)
            .kill_on_drop(true)
            .spawn()
            .context("starting plugin-host")?;
        let host = Host { child, _log: log };
        let deadline = Instant::now() + Duration::from_secs(60);
        let q = ListPlugins { name: "identity".into(), capability: String::new() }.encode_to_vec();
        loop {
            let ready = async {
                let m = tokio::time::timeout(
                    Duration::from_secs(1),
                    client.request(plugin::query(plugin::qry::LIST)?, q.clone().into()),
                )
                .await??;
                anyhow::Ok(ListReply::decode(m.payload)?.plugins.iter().any(|p| p.state == "ready"))
            };
            if ready.await.unwrap_or(false) {
                return Ok(host);
            }
            if Instant::now() > deadline {
                bail!("plugin-host did not become ready within 60s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

async fn sequential(
    client: &async_nats::Client,
    subject: &str,
    body: &Bytes,
    n: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut rtt = Vec::with_capacity(n);
    let mut inside = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let m = client.request(subject.to_string(), body.clone()).await?;
        rtt.push(t.elapsed().as_secs_f64() * 1e6);
        if let Ok(r) = InvokeReply::decode(m.payload.clone())
            && r.status == Status::Ok as i32
        {
            inside.push(r.duration_us as f64);
        }
    }
    Ok((rtt, inside))
}

async fn throughput(
    client: &async_nats::Client,
    subject: &str,
    body: Bytes,
    callers: usize,
    seconds: f64,
) -> Result<f64> {
    let stop = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let (c, s, b) = (client.clone(), subject.to_string(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut ok = 0u64;
            while Instant::now() < stop {
                let m = c.request(s.clone(), b.clone()).await?;
                let r = InvokeReply::decode(m.payload)?;
                if r.status != Status::Ok as i32 {
                    bail!("invocation failed: {:?}", r.error);
                }
                ok += 1;
            }
            anyhow::Ok(ok)
        }));
    }
    let started = Instant::now();
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub async fn run(args: PluginArgs) -> Result<ExitCode> {
    let nats = cim_testkit::NatsServer::start().await?;
    let client = nats.connect().await;
    let identity = plugin::invoke_subject("identity", "1.0.0")?;
    let crc = plugin::invoke_subject("crc32", "1.0.0")?;
    let small = Bytes::from(InvokeRequest { input: vec![b'x'; args.payload], ..Default::default() }.encode_to_vec());
    let big = Bytes::from(InvokeRequest { input: vec![7u8; 256 * 1024], ..Default::default() }.encode_to_vec());

    // A raw responder that answers with the request bytes, in this process.
    let raw_subject = "bench.raw.echo".to_string();
    let mut sub = client.subscribe(raw_subject.clone()).await?;
    let echo = client.clone();
    let responder = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Some(r) = m.reply {
                let _ = echo.publish(r, m.payload).await;
            }
        }
    });
    client.flush().await?;

    let mut rows = Vec::new();
    let mut per_parallelism = Vec::new();
    for parallelism in [1u32, 2] {
        let host = Host::start(&nats.url(), parallelism, &client).await?;
        if parallelism == 1 {
            // Warm up both paths, then alternate rounds so drift hits both alike.
            sequential(&client, &raw_subject, &small, 200).await?;
            sequential(&client, &identity, &small, 200).await?;
            let (mut raw, mut wasm, mut inside) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..4 {
                raw.extend(sequential(&client, &raw_subject, &small, args.requests / 4).await?.0);
                let (r, i) = sequential(&client, &identity, &small, args.requests / 4).await?;
                wasm.extend(r);
                inside.extend(i);
            }
            let (raw, wasm, inside) = (median(raw), median(wasm), median(inside));
            rows.push(format!("| identity plugin round trip ({} B) vs raw NATS request/reply | {raw:.0} µs | {wasm:.0} µs | {:.2}x | ≤ 1.5x |", args.payload, wasm / raw));
            rows.push(format!(
                "| in-process instantiate + call (identity, host-reported) | - | {inside:.0} µs | - | tens of µs |"
            ));
            let (_, crc_inside) = sequential(&client, &crc, &big, 50).await?;
            rows.push(format!(
                "| in-process instantiate + call (crc32 of 256 KiB) | - | {:.0} µs | - | - |",
                median(crc_inside)
            ));
        }
        let trivial = throughput(&client, &identity, small.clone(), args.callers, args.seconds).await?;
        let heavy = throughput(&client, &crc, big.clone(), args.callers, args.seconds).await?;
        per_parallelism.push((parallelism, trivial, heavy));
        host.stop().await;
    }
    let raw_rate = {
        // The same callers against the raw echo: the ceiling of this machine's NATS round trips.
        let stop = Instant::now() + Duration::from_secs_f64(args.seconds);
        let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..args.callers {
            let (c, s, b, n) = (client.clone(), raw_subject.clone(), small.clone(), count.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < stop {
                    if c.request(s.clone(), b.clone()).await.is_ok() {
                        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }));
        }
        let started = Instant::now();
        for t in tasks {
            let _ = t.await;
        }
        count.load(std::sync::atomic::Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
    };
    for (p, trivial, heavy) in &per_parallelism {
        rows.push(format!("| invocations/s, parallelism {p}, identity ({} callers) vs raw echo | {raw_rate:.0}/s | {trivial:.0}/s | {:.2}x | - |", args.callers, raw_rate / trivial));
        rows.push(format!("| invocations/s, parallelism {p}, crc32 of 256 KiB | - | {heavy:.0}/s | - | - |"));
    }
    if let [(_, _, h1), (_, _, h2)] = per_parallelism.as_slice() {
        rows.push(format!(
            "| crc32 speed-up from parallelism 1 to 2 | - | {:.2}x | - | ~2x on 2 free cores |",
            h2 / h1
        ));
    }
    responder.abort();
    println!("| scenario | raw baseline | plugin | ratio | aim |");
    println!("| --- | --- | --- | --- | --- |");
    for r in rows {
        println!("{r}");
    }
    Ok(ExitCode::SUCCESS)
}
