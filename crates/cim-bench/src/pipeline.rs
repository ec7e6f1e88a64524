//! `cim-bench pipeline`: what the pipeline engine costs. Starts its own nats-server and the
//! real `information-unit`, `plugin-host` and `pipeline-engine` binaries (next to cim-bench), applies
//! a 3-step pipeline of trivial plugins (`identity` three times) triggered by unit creation, and
//! measures in the same run:
//! - end-to-end latency, trigger event published → run completed (p50, p99), one run at a time,
//!   against the sum of the raw NATS round trips such a run needs, done back to back by this
//!   process: the JetStream publishes of its events (requested, started, 3 × step started,
//!   3 × step completed, completed), the three plugin requests and the unit query;
//! - runs per second with one and with two engine instances (many units created at once).

use std::{
    collections::HashMap,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use async_nats::jetstream;
use bytes::Bytes;
use cim_events::{
    Envelope, pipeline as pl, plugin,
    proto::{
        iu::{CreateUnit, GetUnit},
        pipeline::RunRequested,
        plugin::{InvokeRequest, ListPlugins, ListReply},
    },
};
use cim_iu_client::IuClient;
use futures::StreamExt;
use prost::Message as _;

use crate::support::{quantile, spawn_sibling, until};

#[derive(clap::Args, Debug)]
pub struct PipelineArgs {
    /// Runs measured one at a time for the latency.
    #[arg(long, default_value_t = 200)]
    runs: usize,
    /// Units created at once for each throughput measurement.
    #[arg(long, default_value_t = 300)]
    burst: usize,
}

/// Waits for `n` completed runs on `completed` (a core subscription to the engine's completions).
async fn completions(completed: &mut async_nats::Subscriber, n: usize) -> Result<()> {
    for i in 0..n {
        tokio::time::timeout(Duration::from_secs(60), completed.next())
            .await
            .with_context(|| format!("only {i} of {n} runs completed within 60s of each other"))?
            .context("subscription ended")?;
    }
    Ok(())
}

pub async fn run(args: PipelineArgs) -> Result<ExitCode> {
    let nats = cim_testkit::NatsServer::start().await?;
    let url = nats.url();
    let client = nats.connect().await;
    let iu = IuClient::new(client.clone());
    let (_iu, _l1) = spawn_sibling(
        "information-unit",
        &["--nats-url", &url, "--max-in-flight", "1024", "--http-listen", "127.0.0.1:0"],
    )?;
    let (_ph, _l2) = spawn_sibling("plugin-host", &["--nats-url", &url, "--http-listen", "127.0.0.1:0"])?;
    let engine_args = ["--nats-url", url.as_str(), "--http-listen", "127.0.0.1:0", "--pipeline-max-runs", "64"];
    let (_e1, _l3) = spawn_sibling("pipeline-engine", &engine_args)?;
    until("information-unit ready", || async { iu.status().await.is_ok() }).await?;
    let list = ListPlugins { name: "identity".into(), capability: String::new() }.encode_to_vec();
    until("plugin-host ready", || async {
        match client.request(plugin::query(plugin::qry::LIST).unwrap_or_default(), list.clone().into()).await {
            Ok(m) => ListReply::decode(m.payload).is_ok_and(|l| l.plugins.iter().any(|p| p.state == "ready")),
            Err(_) => false,
        }
    })
    .await?;
    until("pipeline-engine ready", || async {
        client
            .request(pl::query(pl::qry::LIST).unwrap_or_default(), "{}".into())
            .await
            .is_ok_and(|m| m.headers.as_ref().is_none_or(|h| h.get("Nats-Service-Error-Code").is_none()))
    })
    .await?;

    let definition = serde_json::json!({
        "name": "bench3",
        "trigger": {"on": "unit.created", "tags": ["bench"]},
        "steps": [
            {"id": "one", "plugin": "identity@1.0.0", "input": "unit.content"},
            {"id": "two", "plugin": "identity@1.0.0", "input": "one.output"},
            {"id": "three", "plugin": "identity@1.0.0", "input": "two.output"}
        ]
    });
    let reply = client
        .request(pl::command(pl::cmd::APPLY)?, serde_json::json!({ "definition": definition }).to_string().into())
        .await?;
    if let Some(h) = &reply.headers
        && h.get("Nats-Service-Error-Code").is_some()
    {
        bail!("apply failed: {:?}", h.get("Nats-Service-Error"));
    }
    let content = iu.put_bytes(&[b'x'; 100]).await?;
    let create = |n: usize| CreateUnit {
        cid: content.cid.clone(),
        name: format!("b{n}"),
        media_type: "text/plain".into(),
        tags: vec!["bench".into()],
        ..Default::default()
    };

    // Latency: one run at a time, trigger event seen → completion seen, on core NATS.
    let mut created = client
        .subscribe(cim_events::subject::action_filter(
            cim_events::Component::InformationUnit,
            cim_events::iu::UNIT,
            cim_events::iu::action::CREATED,
        )?)
        .await?;
    let mut completed = client.subscribe(pl::run_action(pl::action::COMPLETED)?).await?;
    client.flush().await?;
    let mut e2e = Vec::with_capacity(args.runs);
    for n in 0..args.runs + 10 {
        iu.create(create(n)).await?;
        tokio::time::timeout(Duration::from_secs(30), created.next()).await?.context("created")?;
        let t = Instant::now();
        completions(&mut completed, 1).await?;
        if n >= 10 {
            e2e.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    drop(created);

    // The raw round trips one run needs, back to back, into a bench stream like the engine's.
    let js = jetstream::new(client.clone());
    let stream = "BENCH_PIPELINE_RAW";
    let _ = js.delete_stream(stream).await;
    js.create_stream(jetstream::stream::Config {
        name: stream.into(),
        subjects: vec!["bench.pipeline.raw.>".into()],
        ..Default::default()
    })
    .await?;
    let identity = plugin::invoke_subject("identity", "1.0.0")?;
    let event = Bytes::from(
        RunRequested { run_id: "r".into(), pipeline: "bench3".into(), ..Default::default() }.encode_to_vec(),
    );
    let invoke = Bytes::from(InvokeRequest { input: vec![b'x'; 100], ..Default::default() }.encode_to_vec());
    let get = Bytes::from(GetUnit { unit_id: "unknown-unit".into(), ..Default::default() }.encode_to_vec());
    let headers = Envelope::root::<RunRequested>("bench").to_headers();
    let mut raw = Vec::with_capacity(args.runs);
    for n in 0..args.runs + 10 {
        let t = Instant::now();
        for i in 0..9 {
            js.publish_with_headers(format!("bench.pipeline.raw.{n}.{i}"), headers.clone(), event.clone())
                .await?
                .await?;
        }
        for _ in 0..3 {
            client.request(identity.clone(), invoke.clone()).await?;
        }
        client.request(cim_events::iu::query(cim_events::iu::qry::GET)?, get.clone()).await?;
        if n >= 10 {
            raw.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    js.delete_stream(stream).await?;

    // Throughput: a burst of units, until every run completed; one engine, then two.
    let mut rates = HashMap::new();
    let mut next = args.runs + 10;
    let mut second = None;
    for engines in [1usize, 2] {
        if engines == 2 {
            second = Some(spawn_sibling("pipeline-engine", &engine_args)?);
            // Wait until the second instance serves (both answer the micro-protocol ping).
            until("second engine serving", || async { count_instances(&client).await >= 2 }).await?;
        }
        let burst: Vec<CreateUnit> = (0..args.burst).map(|i| create(next + i)).collect();
        next += args.burst;
        let t = Instant::now();
        let sends = burst.into_iter().map(|c| {
            let iu = iu.clone();
            async move { iu.create(c).await }
        });
        for r in futures::future::join_all(sends).await {
            r?;
        }
        completions(&mut completed, args.burst).await?;
        rates.insert(engines, args.burst as f64 / t.elapsed().as_secs_f64());
    }
    drop(second);

    let (p50, p99) = (quantile(&mut e2e, 0.5), quantile(&mut e2e, 0.99));
    let (r50, r99) = (quantile(&mut raw, 0.5), quantile(&mut raw, 0.99));
    println!("| scenario | raw baseline | pipeline | ratio |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| 3 identity steps, trigger → completed, p50 ({} runs) | {r50:.2} ms | {p50:.2} ms | {:.2}x |",
        args.runs,
        p50 / r50
    );
    println!("| 3 identity steps, trigger → completed, p99 | {r99:.2} ms | {p99:.2} ms | {:.2}x |", p99 / r99);
    let (one, two) = (rates[&1], rates[&2]);
    println!("| runs/s, 1 engine ({} units at once) | - | {one:.0}/s | - |", args.burst);
    println!("| runs/s, 2 engines | - | {two:.0}/s | {:.2}x of 1 engine |", two / one);
    Ok(ExitCode::SUCCESS)
}

/// Instances of the engine answering `$SRV.PING.cim-pipeline` within 500 ms.
async fn count_instances(client: &async_nats::Client) -> usize {
    let inbox = client.new_inbox();
    let Ok(mut sub) = client.subscribe(inbox.clone()).await else { return 0 };
    let subject =
        cim_events::subject::micro(cim_events::subject::MicroVerb::Ping, cim_events::Component::PipelineEngine);
    if client.publish_with_reply(subject, inbox, Bytes::new()).await.is_err() {
        return 0;
    }
    let mut n = 0;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(500), sub.next()).await {
        n += 1;
    }
    n
}
