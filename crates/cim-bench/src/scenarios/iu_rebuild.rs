//! `iu-rebuild`: how fast the information-unit service rebuilds its projections by replaying
//! the events stream (`IuClient::rebuild`, timed until `status` shows the checkpoint at the
//! stream's last sequence and no lag) vs a raw ordered consumer reading the same stream to the
//! end.
//!
//! The fixture: `--rebuild-units` units are created through the service; the rest of the
//! `--rebuild-events` events are `UnitTagged` events for those units, appended straight to
//! `CIM_IU_EVENTS` by this generator with the envelope a service would write (root envelope,
//! `cim.evt.iu.unit.<id>.tagged`), cycling through 8 tags so unit states stay small. They are
//! valid events the projector applies like any other; only writing 100k of them through the
//! command path would take much longer than the measurement.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, pull},
};
use cim_events::{
    Component, Envelope, iu,
    payload::encode,
    proto::iu::{CreateUnit, ProjectionStatus, UnitTagged},
    resources,
};
use cim_iu_client::IuClient;
use futures::{StreamExt, stream::FuturesUnordered};

use super::{BenchArgs, Outcome, Row, alternate, median, service::IuService, within};

/// Appended events awaiting their ack at once.
const APPEND_WINDOW: usize = 256;
/// How often the projection status is polled while waiting.
const POLL: Duration = Duration::from_millis(50);

pub(super) async fn run(args: &BenchArgs) -> Result<Outcome> {
    let server = cim_testkit::NatsServer::start().await.context("starting nats-server")?;
    let (svc, iu) = IuService::start(&server.url()).await?;
    let result = measure(args, &server, &iu).await.map_err(|e| e.context(format!("service log:\n{}", svc.log_tail())));
    svc.stop().await;
    result
}

/// Deadline of anything that goes through all `events` (even 100 events/s finishes).
fn events_limit(events: u64) -> Duration {
    Duration::from_secs(60) + Duration::from_millis(10) * events as u32
}

async fn measure(args: &BenchArgs, server: &cim_testkit::NatsServer, iu: &IuClient) -> Result<Outcome> {
    let js = jetstream::new(server.connect().await);
    let stream_name = resources::events_stream(Component::InformationUnit).name;
    let limit = events_limit(args.rebuild_events);

    let fixture_started = Instant::now();
    let units = within(limit, "creating the fixture's units", create_units(iu, args.rebuild_units)).await?;
    let mut stream = js.get_stream(&stream_name).await?;
    let created_up_to = stream.info().await?.state.last_sequence;
    let tagged = args.rebuild_events.saturating_sub(created_up_to);
    within(limit, "appending the fixture's events", append_tagged(&js, &units, tagged)).await?;
    let last = stream.info().await?.state.last_sequence;
    ensure!(
        last == args.rebuild_events.max(created_up_to),
        "the stream holds {last} events, expected {}",
        args.rebuild_events
    );
    let fixture_time = fixture_started.elapsed();
    let live_started = Instant::now();
    within(limit, "the projection catching up with the fixture", wait_caught_up(iu, last, false)).await?;
    let live_tail = live_started.elapsed();

    let (mut raw, mut cim) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let (r, c) = alternate(
            round,
            || async {
                Ok(last as f64 / within(limit, "ordered consumer", read_all(&stream, last)).await?.as_secs_f64())
            },
            || async { Ok(last as f64 / within(limit, "rebuild", rebuild(iu, last)).await?.as_secs_f64()) },
        )
        .await?;
        raw.push(r);
        cim.push(c);
    }
    let rows = vec![Row {
        scenario: format!(
            "iu-rebuild — projection rebuild (IuClient::rebuild until checkpoint = last sequence, lag 0), {last} events"
        ),
        baseline: "raw async-nats ordered pull consumer reading the whole stream".into(),
        baseline_value: Some(median(raw)),
        value: median(cim),
        unit: "events/s",
        ratio: true,
        aim: "—",
    }];
    let note = format!(
        "iu-rebuild: {} units created through the service (stream at sequence {created_up_to} with the content event), then {tagged} UnitTagged events \
         appended directly with a full envelope (fixture built in {:.0?}; the live projection finished {:.1?} after the last append); \
         status polled every {} ms.",
        units.len(),
        fixture_time,
        live_tail,
        POLL.as_millis()
    );
    Ok(Outcome { rows, note })
}

async fn create_units(iu: &IuClient, n: usize) -> Result<Vec<String>> {
    let content = iu.put_bytes(b"cim-bench: the content of the rebuild fixture").await?;
    let mut ids = Vec::with_capacity(n);
    let mut pending = FuturesUnordered::new();
    for i in 0..n {
        let c = CreateUnit {
            cid: content.cid.clone(),
            name: format!("rebuild-{i:05}.txt"),
            media_type: "text/plain".into(),
            tags: vec!["rebuild".into()],
            ..Default::default()
        };
        pending.push(iu.create(c));
        if pending.len() >= 32
            && let Some(r) = pending.next().await
        {
            ids.push(r?.unit_id);
        }
    }
    while let Some(r) = pending.next().await {
        ids.push(r?.unit_id);
    }
    Ok(ids)
}

/// Appends `n` `UnitTagged` events for `units`, round robin, with a root envelope each.
async fn append_tagged(js: &jetstream::Context, units: &[String], n: u64) -> Result<()> {
    let source = cim_events::envelope::source("bench", "cim-bench", "rebuild-fixture");
    let mut acks = FuturesUnordered::new();
    for i in 0..n as usize {
        let unit = &units[i % units.len()];
        let event = UnitTagged { unit_id: unit.clone(), tags: vec![format!("t{}", (i / units.len()) % 8)] };
        let (headers, body) = encode(&Envelope::root::<UnitTagged>(source.clone()), &event);
        let ack = js.publish_with_headers(iu::unit_event(unit, iu::action::TAGGED)?, headers, body).await?;
        acks.push(ack.into_future());
        if acks.len() >= APPEND_WINDOW {
            acks.next().await.transpose()?;
        }
    }
    while let Some(ack) = acks.next().await {
        ack?;
    }
    Ok(())
}

fn caught_up(s: &ProjectionStatus, last: u64) -> bool {
    s.lag == 0 && s.checkpoint == s.stream_last_sequence && s.checkpoint >= last
}

/// Polls the status until the projection is at `last` with no lag. With `after_reset`, it
/// must first be seen behind (the rebuild dropped it), so a rebuild that did not happen cannot
/// pass for an instant one.
async fn wait_caught_up(iu: &IuClient, last: u64, after_reset: bool) -> Result<ProjectionStatus> {
    let mut seen_behind = !after_reset;
    loop {
        let s = iu.status().await?;
        if caught_up(&s, last) {
            if !seen_behind {
                bail!("the projection reported itself current right after the rebuild request: {s:?}");
            }
            return Ok(s);
        }
        seen_behind = true;
        tokio::time::sleep(POLL).await;
    }
}

async fn rebuild(iu: &IuClient, last: u64) -> Result<Duration> {
    let started = Instant::now();
    let r = iu.rebuild().await?;
    ensure!(r.up_to_sequence == last, "rebuild up to {} (expected {last})", r.up_to_sequence);
    wait_caught_up(iu, last, true).await?;
    Ok(started.elapsed())
}

/// The baseline: an ordered consumer (ephemeral, no acks) reading every event up to `last`.
async fn read_all(stream: &jetstream::stream::Stream, last: u64) -> Result<Duration> {
    let started = Instant::now();
    let consumer = stream
        .create_consumer(pull::OrderedConfig { deliver_policy: DeliverPolicy::All, ..Default::default() })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut read = 0u64;
    while let Some(m) = messages.next().await {
        let m = m?;
        read += 1;
        let seq = m.info().map_err(|e| anyhow::anyhow!("{e}"))?.stream_sequence;
        if seq >= last {
            break;
        }
    }
    let d = started.elapsed();
    ensure!(read == last, "the ordered consumer read {read} of {last} events");
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caught_up_needs_no_lag_and_the_last_sequence() {
        let s = |checkpoint, last, lag| ProjectionStatus {
            stream_last_sequence: last,
            checkpoint,
            lag,
            ..Default::default()
        };
        assert!(caught_up(&s(100, 100, 0), 100));
        assert!(!caught_up(&s(99, 100, 0), 100));
        assert!(!caught_up(&s(100, 100, 1), 100));
        assert!(!caught_up(&s(0, 0, 0), 100));
    }
}
