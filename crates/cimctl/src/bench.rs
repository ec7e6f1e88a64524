//! `cimctl bench`: each scenario is measured beside its raw baseline in the same run, on a
//! fresh nats-server, in alternating rounds; the table reports medians and the ratio.

use std::{
    fmt::Write as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use async_nats::jetstream;
use bytes::Bytes;
use cim_events::{
    Component, Envelope, Tier, payload::encode, proto::runtime::ServiceStopped, resources, subject,
};
use futures::{StreamExt, stream::FuturesUnordered};
use prost::Message;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Messages published per measurement.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Payload size in bytes (the protobuf body; the raw baseline publishes the same bytes).
    #[arg(long, default_value_t = 256)]
    payload: usize,
    /// Rounds; each round measures baseline and CIM once, alternating. Medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Publishes awaiting their ack at once in the pipelined scenario.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Also write the Markdown table to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One scenario's outcome.
struct Row {
    scenario: String,
    baseline: String,
    baseline_rate: f64,
    cim_rate: f64,
    unit: &'static str,
}

pub async fn run(args: BenchArgs) -> Result<std::process::ExitCode> {
    anyhow::ensure!(args.messages > 0 && args.rounds > 0 && args.window > 0, "--messages, --rounds and --window must be positive");
    let server = cim_testkit::NatsServer::start().await.context("starting nats-server for the benchmark")?;
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    let component = Component::Registry;
    js.create_stream(resources::events_stream(component).config(Tier::Leaf)).await?;

    let version = cim_testkit::nats_server_version(&cim_testkit::nats_server_binary()?)?;
    let mut rows = Vec::new();
    for (name, window) in [("publish+ack, one at a time", 1), ("publish+ack, pipelined", args.window)] {
        let (mut raw, mut dedupe, mut cim) = (Vec::new(), Vec::new(), Vec::new());
        let rate = |d: Duration| args.messages as f64 / d.as_secs_f64();
        for round in 0..args.rounds {
            // Alternate the order so drift on this shared machine hits every variant alike.
            if round % 2 == 0 {
                raw.push(rate(publish_raw(&js, component, &args, window, false).await?));
                dedupe.push(rate(publish_raw(&js, component, &args, window, true).await?));
                cim.push(rate(publish_cim(&js, component, &args, window).await?));
            } else {
                cim.push(rate(publish_cim(&js, component, &args, window).await?));
                dedupe.push(rate(publish_raw(&js, component, &args, window, true).await?));
                raw.push(rate(publish_raw(&js, component, &args, window, false).await?));
            }
        }
        let label = if window == 1 { name.to_string() } else { format!("{name} (window {window})") };
        let raw = median(raw);
        rows.push(Row {
            scenario: format!("{label}: only a Nats-Msg-Id header (server de-duplication)"),
            baseline: "raw async-nats JetStream publish of the same bytes".into(),
            baseline_rate: raw,
            cim_rate: median(dedupe),
            unit: "msg/s",
        });
        rows.push(Row {
            scenario: format!("{label}: event through the full cim-events envelope"),
            baseline: "raw async-nats JetStream publish of the same bytes".into(),
            baseline_rate: raw,
            cim_rate: median(cim),
            unit: "msg/s",
        });
    }

    let table = render(&rows, &args, version);
    println!("{table}");
    if let Some(out) = &args.out {
        std::fs::write(out, &table).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn payload(size: usize) -> ServiceStopped {
    // Fill the reason until the encoded body is `size` bytes (or as close as the fixed fields allow).
    let mut p = ServiceStopped { component: "registry".into(), instance_id: "bench".into(), reason: String::new() };
    while p.encoded_len() < size {
        p.reason.push('x');
        if p.encoded_len() > size {
            p.reason.pop();
            break;
        }
    }
    p
}

/// The baseline: the same body, no envelope. With `dedupe`, only a `Nats-Msg-Id` header is
/// added, which isolates the server's de-duplication cost from the rest of the envelope.
async fn publish_raw(js: &jetstream::Context, c: Component, args: &BenchArgs, window: usize, dedupe: bool) -> Result<Duration> {
    let body = Bytes::from(payload(args.payload).encode_to_vec());
    let subjects: Vec<String> = (0..64).map(|i| subject::event(c, "bench", &format!("a{i}"), "raw")).collect::<Result<_, _>>()?;
    let started = Instant::now();
    let mut acks = FuturesUnordered::new();
    for i in 0..args.messages {
        let subject = subjects[i % subjects.len()].clone();
        let ack = if dedupe {
            let mut h = async_nats::HeaderMap::new();
            h.insert(cim_events::envelope::H_MSG_ID, cim_events::envelope::new_id().to_string().as_str());
            js.publish_with_headers(subject, h, body.clone()).await?
        } else {
            js.publish(subject, body.clone()).await?
        };
        acks.push(ack.into_future());
        if acks.len() >= window {
            acks.next().await.transpose()?;
        }
    }
    while let Some(ack) = acks.next().await {
        ack?;
    }
    Ok(started.elapsed())
}

async fn publish_cim(js: &jetstream::Context, c: Component, args: &BenchArgs, window: usize) -> Result<Duration> {
    let p = payload(args.payload);
    let source = cim_events::envelope::source("bench", c.service_name(), "bench");
    let started = Instant::now();
    let mut acks = FuturesUnordered::new();
    for i in 0..args.messages {
        // Everything a service does per event: subject built and validated, a fresh envelope
        // (UUIDv7, time), protobuf encoding, and de-duplication by Nats-Msg-Id on the server.
        let subject = subject::event(c, "bench", &format!("a{}", i % 64), "cim")?;
        let (headers, body) = encode(&Envelope::root::<ServiceStopped>(source.clone()), &p);
        let ack = js.publish_with_headers(subject, headers, body).await?;
        acks.push(ack.into_future());
        if acks.len() >= window {
            acks.next().await.transpose()?;
        }
    }
    while let Some(ack) = acks.next().await {
        ack?;
    }
    Ok(started.elapsed())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn render(rows: &[Row], args: &BenchArgs, version: (u32, u32, u32)) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "| scenario | baseline | baseline | CIM | CIM / baseline |");
    let _ = writeln!(s, "| --- | --- | ---: | ---: | ---: |");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} {} | {:.0} {} | {:.2} |",
            r.scenario, r.baseline, r.baseline_rate, r.unit, r.cim_rate, r.unit, r.cim_rate / r.baseline_rate
        );
    }
    let _ = writeln!(
        s,
        "\n{} messages of {} bytes per measurement, median of {} alternating rounds, one nats-server {}.{}.{} (file store, default sync) on this machine.",
        args.messages, args.payload, args.rounds, version.0, version.1, version.2
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_has_the_requested_size() {
        for size in [64, 256, 1024, 4096] {
            assert_eq!(payload(size).encoded_len(), size);
        }
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0]), 4.0);
    }
}
