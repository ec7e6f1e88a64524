//! `iu-create`: small units created through the information-unit service (`IuClient::create`)
//! vs a raw JetStream publish+ack of the same encoded `UnitCreated` event, one at a time and
//! with many requests in flight.
//!
//! Per create the service validates the command, checks the content exists, publishes the event
//! with the envelope and per-unit optimistic concurrency, writes the new state through to the KV
//! projection and remembers the result under the request id; the baseline only stores the
//! bytes.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use async_nats::jetstream;
use bytes::Bytes;
use cim_events::{
    Component, Tier,
    proto::iu::{CreateUnit, UnitCreated},
    resources,
};
use cim_iu_client::IuClient;
use futures::{StreamExt, stream::FuturesUnordered};
use prost::Message;

use super::{BenchArgs, Outcome, Row, alternate, median, service::IuService, within};

const RAW_STREAM: &str = "BENCH_RAW_UNITS";
const RAW_SUBJECTS: &str = "bench.raw.units.>";

pub(super) async fn run(args: &BenchArgs) -> Result<Outcome> {
    let server = cim_testkit::NatsServer::start().await.context("starting nats-server")?;
    let (svc, iu) = IuService::start(&server.url()).await?;
    let result = measure(args, &server, &iu).await.map_err(|e| e.context(format!("service log:\n{}", svc.log_tail())));
    svc.stop().await;
    result
}

async fn measure(args: &BenchArgs, server: &cim_testkit::NatsServer, iu: &IuClient) -> Result<Outcome> {
    let js = jetstream::new(server.connect().await);
    // The baseline's stream is configured exactly like the service's events stream.
    let mut config = resources::events_stream(Component::InformationUnit).config(Tier::Leaf);
    config.name = RAW_STREAM.into();
    config.subjects = vec![RAW_SUBJECTS.into()];
    config.deny_delete = false;
    config.deny_purge = false;
    js.create_stream(config).await?;

    let content = iu.put_bytes(b"cim-bench: the content every small unit refers to").await?;
    let template = template(&content.cid);
    let body = Bytes::from(created_event(&template, content.size).encode_to_vec());
    let n = args.iu_units;
    let limit = Duration::from_secs(60) + Duration::from_millis(20) * n as u32;
    let mut rows = Vec::new();
    for window in [1, args.iu_concurrency] {
        let (mut raw, mut cim) = (Vec::new(), Vec::new());
        let rate = |d: Duration| n as f64 / d.as_secs_f64();
        for round in 0..args.rounds {
            let (r, c) = alternate(
                round,
                || async { Ok(rate(within(limit, "raw publish", publish_raw(&js, &body, n, window)).await?)) },
                || async { Ok(rate(within(limit, "IuClient::create", create_cim(iu, &template, n, window)).await?)) },
            )
            .await?;
            raw.push(r);
            cim.push(c);
        }
        let (how, raw_how) = if window == 1 {
            ("one at a time".to_string(), "one at a time".to_string())
        } else {
            (format!("{window} concurrent requests"), format!("pipelined, window {window}"))
        };
        rows.push(Row {
            scenario: format!("iu-create — small unit through IuClient::create, {how}"),
            baseline: format!("raw JetStream publish+ack of the same encoded UnitCreated, {raw_how}"),
            baseline_value: Some(median(raw)),
            value: median(cim),
            unit: "units/s",
            ratio: true,
            aim: "≥ 0.5",
        });
    }
    let _ = js.delete_stream(RAW_STREAM).await;
    let note = format!(
        "iu-create: {n} units per measurement; metadata of {} bytes (the encoded UnitCreated: name, media type, 3 tags, 10 attributes); \
         content committed once up front; the raw stream has the events stream's configuration, 64 subjects.",
        body.len()
    );
    Ok(Outcome { rows, note })
}

/// A small unit: a name, a media type, 3 tags and 10 attributes (≤ 1 KiB of metadata).
fn template(cid: &str) -> CreateUnit {
    let attributes: HashMap<String, String> =
        (0..10).map(|i| (format!("attr{i:02}"), format!("value {i} of a small unit, some forty bytes"))).collect();
    CreateUnit {
        header: None,
        cid: cid.to_string(),
        name: "bench-unit-000000.txt".into(),
        media_type: "text/plain".into(),
        unit_type: String::new(),
        tags: vec!["bench".into(), "small".into(), "create".into()],
        attributes,
        links: Vec::new(),
    }
}

/// The event the service writes for `c` (with a fresh unit id), for the baseline to publish.
fn created_event(c: &CreateUnit, size: u64) -> UnitCreated {
    UnitCreated {
        unit_id: cim_events::envelope::new_id().to_string(),
        cid: c.cid.clone(),
        size,
        name: c.name.clone(),
        media_type: c.media_type.clone(),
        unit_type: c.unit_type.clone(),
        tags: c.tags.clone(),
        attributes: c.attributes.clone(),
        links: c.links.clone(),
    }
}

async fn create_cim(iu: &IuClient, template: &CreateUnit, n: usize, window: usize) -> Result<Duration> {
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    for i in 0..n {
        let mut c = template.clone();
        c.name = format!("bench-unit-{i:06}.txt");
        pending.push(iu.create(c));
        if pending.len() >= window {
            pending.next().await.transpose()?;
        }
    }
    while let Some(r) = pending.next().await {
        r?;
    }
    Ok(started.elapsed())
}

async fn publish_raw(js: &jetstream::Context, body: &Bytes, n: usize, window: usize) -> Result<Duration> {
    let subjects: Vec<String> = (0..64).map(|i| format!("bench.raw.units.s{i}")).collect();
    let started = Instant::now();
    let mut acks = FuturesUnordered::new();
    for i in 0..n {
        let ack = js.publish(subjects[i % subjects.len()].clone(), body.clone()).await?;
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
    fn the_small_unit_has_at_most_a_kib_of_metadata() {
        let cid = cim_events::Cid::of(b"x").to_string();
        let t = template(&cid);
        let event = created_event(&t, 1).encoded_len();
        assert!(event <= 1024, "UnitCreated is {event} bytes");
        assert!(event >= 512, "UnitCreated is only {event} bytes");
        assert_eq!((t.tags.len(), t.attributes.len()), (3, 10));
    }
}
