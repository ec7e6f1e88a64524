//! `cim-bench registry`: the registry under load. 1,000 simulated instances announce and
//! beat against a real `registry` process and nats-server; measured are registration time,
//! query latency (beside a raw NATS request/reply baseline in the same run), whether the
//! registry keeps up with the heartbeats (none dropped, none falsely lost), and how long
//! `cimctl status` takes on a 3-node cluster.

use std::{
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use cim_events::{
    Component, Envelope,
    payload::encode,
    proto::{
        registry::{GetOverview, InstanceList, ListInstances, Overview},
        runtime::{ServiceAnnounced, ServiceHeartbeat, ServiceStopped},
    },
    registry as names,
    subject::{self, Lifecycle},
};
use futures::StreamExt;
use tokio::process::{Child, Command};

#[derive(clap::Args, Debug)]
pub struct RegistryArgs {
    /// Simulated instances.
    #[arg(long, default_value_t = 1000)]
    instances: usize,
    /// Heartbeat interval of every simulated instance, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// How long the heartbeat load runs, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Queries per measurement.
    #[arg(long, default_value_t = 200)]
    queries: usize,
    /// Directory with the `registry` and `cimctl` binaries (default: cim-bench's own directory).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Skip the 3-node cluster part (`cimctl status` time).
    #[arg(long)]
    no_cluster: bool,
}

struct Registry(Child);

impl Registry {
    async fn start(bin: &Path, urls: &str, tier: &str) -> Result<Registry> {
        let child = Command::new(bin)
            .args(["--nats-url", urls, "--tier", tier, "--heartbeat-interval", "1s", "--registry-min-ttl", "5s"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Registry(child))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

async fn ask<R: prost::Message + Default>(
    client: &async_nats::Client,
    subject: &str,
    req: &impl prost::Message,
) -> Result<R> {
    let reply =
        tokio::time::timeout(Duration::from_secs(10), client.request(subject.to_string(), req.encode_to_vec().into()))
            .await??;
    if let Some(code) = reply.headers.as_ref().and_then(|h| h.get("Nats-Service-Error-Code")) {
        bail!("{subject}: error {code}");
    }
    Ok(R::decode(reply.payload)?)
}

async fn wait_for<T>(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) | Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Ok(None) => bail!("timed out waiting for {what}"),
            Err(e) => return Err(e.context(format!("waiting for {what}"))),
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn latencies(n: usize, mut f: impl AsyncFnMut() -> Result<()>) -> Result<(Duration, Duration)> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f().await?;
        v.push(t.elapsed());
    }
    v.sort();
    Ok((percentile(&v, 0.5), percentile(&v, 0.99)))
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

struct Sim {
    id: String,
    component: Component,
    incarnation: String,
    node: String,
}

fn sims(n: usize) -> Vec<Sim> {
    (0..n)
        .map(|i| Sim {
            id: format!("sim-{i}"),
            component: Component::ALL[i % Component::ALL.len()],
            incarnation: uuid_like(i),
            node: format!("sim-node-{}", i % 10),
        })
        .collect()
}

fn uuid_like(i: usize) -> String {
    format!("{:032x}", (i as u128) * 0x9e37_79b9_7f4a_7c15 + std::process::id() as u128)
}

fn source(s: &Sim) -> String {
    cim_events::envelope::source(&s.node, s.component.service_name(), &s.id)
}

pub async fn run(args: RegistryArgs) -> Result<ExitCode> {
    let dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?.parent().map(Path::to_path_buf).context("cim-bench's directory")?,
    };
    let bin = dir.join(Component::Registry.service_name());
    if !bin.is_file() {
        bail!("{} not found: build it with `cargo build --workspace --bins`", bin.display());
    }
    let nats = cim_testkit::NatsServer::start().await?;
    let client = nats.connect().await;
    let _registry = Registry::start(&bin, &nats.url(), "leaf").await?;
    let overview_subject = names::query(names::qry::OVERVIEW)?;
    let instances_subject = names::query(names::qry::INSTANCES)?;
    wait_for("the registry to answer", Duration::from_secs(60), async || {
        Ok(Some(ask::<Overview>(&client, &overview_subject, &GetOverview::default()).await?))
    })
    .await?;

    // Baseline: a raw NATS request/reply to a trivial responder, same server, same client.
    let mut echo = client.subscribe("bench.echo").await?;
    let echo_client = client.clone();
    let echo_task = tokio::spawn(async move {
        while let Some(m) = echo.next().await {
            if let Some(r) = m.reply {
                let _ = echo_client.publish(r, m.payload).await;
            }
        }
    });
    client.flush().await?;
    let (raw50, raw99) = latencies(args.queries, async || {
        client.request("bench.echo", bytes::Bytes::from_static(b"x")).await?;
        Ok(())
    })
    .await?;

    // Registration of N instances.
    let sims = sims(args.instances);
    let started = Instant::now();
    for (n, s) in sims.iter().enumerate() {
        let a = ServiceAnnounced {
            component: s.component.token().into(),
            service: s.component.service_name().into(),
            version: "0.1.0".into(),
            instance_id: s.id.clone(),
            node: s.node.clone(),
            contract_version: cim_events::CONTRACT_VERSION,
            capabilities: vec!["sim".into(), format!("cap-{}", n % 7)],
            incarnation: s.incarnation.clone(),
            heartbeat_interval_ms: args.interval_ms,
            ..Default::default()
        };
        let (h, b) = encode(&Envelope::root::<ServiceAnnounced>(source(s)), &a);
        client.publish_with_headers(subject::lifecycle(s.component, &s.id, Lifecycle::Announce)?, h, b).await?;
    }
    client.flush().await?;
    let want = args.instances;
    let find = ListInstances { capability: "sim".into(), ..Default::default() };
    wait_for("every simulated instance registered", Duration::from_secs(300), async || {
        let l: InstanceList = ask(&client, &instances_subject, &find).await?;
        Ok((l.instances.len() >= want).then_some(()))
    })
    .await?;
    let registration = started.elapsed();

    // Heartbeat load, with queries measured while it runs.
    let before: Overview = ask(&client, &overview_subject, &GetOverview::default()).await?;
    let beat_client = client.clone();
    let interval = Duration::from_millis(args.interval_ms);
    let rounds = (args.seconds * 1000 / args.interval_ms.max(1)).max(1);
    let beats = sims.iter().map(|s| (s.component, s.id.clone(), s.incarnation.clone(), source(s))).collect::<Vec<_>>();
    let load = tokio::spawn(async move {
        let mut sent = 0u64;
        let mut tick = tokio::time::interval(interval);
        for _ in 0..rounds {
            tick.tick().await;
            for (c, id, inc, src) in &beats {
                let hb = ServiceHeartbeat {
                    component: c.token().into(),
                    instance_id: id.clone(),
                    uptime_ms: 1,
                    ready: true,
                    incarnation: inc.clone(),
                    ..Default::default()
                };
                let (h, b) = encode(&Envelope::root::<ServiceHeartbeat>(src.clone()), &hb);
                if let Ok(s) = subject::lifecycle(*c, id, Lifecycle::Heartbeat) {
                    let _ = beat_client.publish_with_headers(s, h, b).await;
                    sent += 1;
                }
            }
            let _ = beat_client.flush().await;
        }
        sent
    });
    let cap = ListInstances { capability: "cap-5".into(), ..Default::default() };
    let (find50, find99) = latencies(args.queries, async || {
        let _: InstanceList = ask(&client, &instances_subject, &cap).await?;
        Ok(())
    })
    .await?;
    let all = ListInstances::default();
    let (list50, list99) = latencies(args.queries / 4, async || {
        let _: InstanceList = ask(&client, &instances_subject, &all).await?;
        Ok(())
    })
    .await?;
    let (ov50, ov99) = latencies(args.queries / 4, async || {
        let _: Overview = ask(&client, &overview_subject, &GetOverview::default()).await?;
        Ok(())
    })
    .await?;
    let sent = load.await?;
    let load_end = Instant::now();
    let target = before.heartbeats_seen + sent;
    let caught: Overview = wait_for("the registry to process every heartbeat", Duration::from_secs(60), async || {
        let o: Overview = ask(&client, &overview_subject, &GetOverview::default()).await?;
        Ok((o.heartbeats_seen >= target).then_some(o))
    })
    .await
    .unwrap_or_default();
    let behind = load_end.elapsed();
    let l: InstanceList = ask(&client, &instances_subject, &find).await?;
    let falsely_lost = want.saturating_sub(l.instances.len());
    // Goodbye, so the simulated instances do not linger as lost.
    for s in &sims {
        let g = ServiceStopped {
            component: s.component.token().into(),
            instance_id: s.id.clone(),
            reason: "bench over".into(),
            incarnation: s.incarnation.clone(),
        };
        let (h, b) = encode(&Envelope::root::<ServiceStopped>(source(s)), &g);
        client.publish_with_headers(subject::lifecycle(s.component, &s.id, Lifecycle::Goodbye)?, h, b).await?;
    }
    client.flush().await?;
    echo_task.abort();

    println!(
        "## registry: {} simulated instances, heartbeat every {} ms for {} s\n",
        args.instances, args.interval_ms, args.seconds
    );
    println!("| measurement | value |");
    println!("| --- | ---: |");
    println!(
        "| registration of {} instances (announce → all listed) | {:.2} s |",
        args.instances,
        registration.as_secs_f64()
    );
    println!(
        "| heartbeats sent / processed by the registry (its own included) | {} / {} |",
        sent,
        caught.heartbeats_seen.saturating_sub(before.heartbeats_seen)
    );
    println!("| heartbeat rate | {:.0} /s |", sent as f64 / (args.seconds as f64).max(0.001));
    println!("| registry caught up after the last heartbeat | {} |", ms(behind));
    println!("| instances falsely marked lost | {falsely_lost} |");
    println!();
    println!("| query (under heartbeat load) | p50 | p99 | p50 / raw request p50 |");
    println!("| --- | ---: | ---: | ---: |");
    println!("| raw NATS request/reply (baseline) | {} | {} | 1.00 |", ms(raw50), ms(raw99));
    let ratio = |d: Duration| d.as_secs_f64() / raw50.as_secs_f64().max(1e-9);
    println!(
        "| find by capability ({} matches) | {} | {} | {:.1} |",
        (args.instances + 1) / 7,
        ms(find50),
        ms(find99),
        ratio(find50)
    );
    println!("| list all {} instances | {} | {} | {:.1} |", args.instances, ms(list50), ms(list99), ratio(list50));
    println!("| overview (problems included) | {} | {} | {:.1} |", ms(ov50), ms(ov99), ratio(ov50));

    if !args.no_cluster {
        drop(_registry);
        let cluster = cim_testkit::NatsCluster::start(3).await?;
        let urls = cluster.urls().join(",");
        let _reg = Registry::start(&bin, &urls, "cluster").await?;
        let cclient = cluster.connect().await;
        wait_for("the registry on the cluster", Duration::from_secs(120), async || {
            Ok(Some(ask::<Overview>(&cclient, &overview_subject, &GetOverview::default()).await?))
        })
        .await?;
        // The operator's CLI, built beside the registry.
        let exe = dir.join("cimctl");
        if !exe.is_file() {
            bail!("{} not found: build it with `cargo build --workspace --bins`", exe.display());
        }
        let mut times = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let out = Command::new(&exe).args(["status", "--json", "--nats-url", &urls]).output().await?;
            if !out.status.success() {
                bail!("cimctl status failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            times.push(t.elapsed());
        }
        times.sort();
        println!();
        println!("| measurement | median of 5 |");
        println!("| --- | ---: |");
        println!(
            "| `cimctl status --json` on a 3-node cluster (R3, registry running; process start included) | {} |",
            ms(times[2])
        );
    }
    Ok(ExitCode::SUCCESS)
}
