//! `envelope`: an event published through the full cim-events envelope vs a raw JetStream
//! publish of the same body, one at a time and pipelined.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_nats::jetstream;
use bytes::Bytes;
use cim_events::{Component, Envelope, Tier, payload::encode, proto::runtime::ServiceStopped, resources, subject};
use futures::{StreamExt, stream::FuturesUnordered};
use prost::Message;

use super::{BenchArgs, Outcome, Row, median, within};

pub(super) async fn run(args: &BenchArgs) -> Result<Outcome> {
    let server = cim_testkit::NatsServer::start().await.context("starting nats-server for the benchmark")?;
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    let component = Component::Registry;
    js.create_stream(resources::events_stream(component).config(Tier::Leaf)).await?;
    // Generous: even 100 msg/s finishes.
    let limit = Duration::from_secs(60) + Duration::from_millis(10) * args.messages as u32;

    let mut rows = Vec::new();
    for (name, window) in [("publish+ack, one at a time", 1), ("publish+ack, pipelined", args.window)] {
        let (mut raw, mut dedupe, mut cim) = (Vec::new(), Vec::new(), Vec::new());
        let rate = |d: Duration| args.messages as f64 / d.as_secs_f64();
        for round in 0..args.rounds {
            let measure_raw = |dedupe| within(limit, "raw publish", publish_raw(&js, component, args, window, dedupe));
            let measure_cim = || within(limit, "envelope publish", publish_cim(&js, component, args, window));
            // Alternate the order so drift on this shared machine hits every variant alike.
            if round.is_multiple_of(2) {
                raw.push(rate(measure_raw(false).await?));
                dedupe.push(rate(measure_raw(true).await?));
                cim.push(rate(measure_cim().await?));
            } else {
                cim.push(rate(measure_cim().await?));
                dedupe.push(rate(measure_raw(true).await?));
                raw.push(rate(measure_raw(false).await?));
            }
        }
        let label = if window == 1 { name.to_string() } else { format!("{name} (window {window})") };
        let raw = median(raw);
        rows.push(Row {
            scenario: format!("envelope — {label}: only a Nats-Msg-Id header (server de-duplication)"),
            baseline: "raw async-nats JetStream publish of the same bytes".into(),
            baseline_value: Some(raw),
            value: median(dedupe),
            unit: "msg/s",
            ratio: true,
            aim: "—",
        });
        rows.push(Row {
            scenario: format!("envelope — {label}: event through the full cim-events envelope"),
            baseline: "raw async-nats JetStream publish of the same bytes".into(),
            baseline_value: Some(raw),
            value: median(cim),
            unit: "msg/s",
            ratio: true,
            aim: "—",
        });
    }
    let note = format!(
        "envelope: {} messages of {} bytes per measurement into {}.",
        args.messages,
        args.payload,
        resources::events_stream(Component::Registry).name
    );
    Ok(Outcome { rows, note })
}

fn payload(size: usize) -> ServiceStopped {
    // Fill the reason until the encoded body is `size` bytes (or as close as the fixed fields allow).
    let mut p = ServiceStopped {
        component: "registry".into(),
        instance_id: "bench".into(),
        reason: String::new(),
        ..Default::default()
    };
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
async fn publish_raw(
    js: &jetstream::Context,
    c: Component,
    args: &BenchArgs,
    window: usize,
    dedupe: bool,
) -> Result<Duration> {
    let body = Bytes::from(payload(args.payload).encode_to_vec());
    let subjects: Vec<String> =
        (0..64).map(|i| subject::event(c, "bench", &format!("a{i}"), "raw")).collect::<Result<_, _>>()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_has_the_requested_size() {
        for size in [64, 256, 1024, 4096] {
            assert_eq!(payload(size).encoded_len(), size);
        }
    }
}
