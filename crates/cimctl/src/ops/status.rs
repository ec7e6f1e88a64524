//! `cimctl status`: what is desired, what runs, where work is routed, stream health and
//! consumer lag, the archive's lag, and why anything is not converging.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Result;
use async_nats::jetstream::consumer;
use cim_events::{
    Component,
    proto::registry::{GetOverview, Instance, InstanceState, Overview},
    registry as names, resources,
};
use cim_placement::names::{instance_state_name, state_name};
use futures::StreamExt;
use serde_json::{Value, json};

use super::{Conn, Table, ago, human, instance_json, node_json, print, request};

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    conn: Conn,
    /// Also ask every component to describe itself (through the registry).
    #[arg(long)]
    deep: bool,
    /// A consumer with more pending messages than this is reported as falling behind.
    #[arg(long, default_value_t = 1000)]
    lag_threshold: u64,
    /// Exit with 3 when something is not converging (for scripts and health checks).
    #[arg(long)]
    check: bool,
}

struct StreamRow {
    name: String,
    owner: &'static str,
    replicas: usize,
    current: usize,
    leader: String,
    messages: u64,
    peers: Vec<Value>,
    problem: Option<String>,
}

struct ConsumerRow {
    stream: String,
    name: String,
    pending: u64,
    ack_pending: usize,
    redelivered: usize,
    waiting: usize,
}

/// What kind of stream a CIM stream is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Stream,
    Objects,
    KeyValue,
}

/// Every stream CIM owns, with its owner and kind.
fn cim_streams() -> Vec<(String, Component, Kind)> {
    let mut v = Vec::new();
    for c in Component::ALL {
        for s in resources::streams(c) {
            v.push((s.name, c, Kind::Stream));
        }
        for b in resources::object_buckets(c) {
            v.push((b.stream_name(), c, Kind::Objects));
        }
        for b in resources::kv_buckets(c) {
            v.push((b.stream_name(), c, Kind::KeyValue));
        }
    }
    v
}

/// A consumer the object store makes for one read, list or watch: an ordered consumer
/// (ephemeral, pushed with flow control, no acks, kept in memory) that goes away seconds after
/// its reader. It routes no work and has no lag worth reporting.
fn is_object_read(kind: Kind, c: &consumer::Config) -> bool {
    kind == Kind::Objects
        && c.durable_name.is_none()
        && c.deliver_subject.is_some()
        && c.ack_policy == consumer::AckPolicy::None
        && c.flow_control
        && c.memory_storage
}

/// One stream on one archive target, from the storage manager's watermarks.
struct ArchiveRow {
    stream: String,
    target: String,
    last_seq: u64,
    verified_seq: u64,
    lag: u64,
}

/// The archive lag per stream and target: the stream's last sequence against the sequence
/// through which the storage manager has verified its copy on that target
/// (`cim_storage_archive`, keys `target.<stream>.<target>`).
async fn archive_lag(
    js: &async_nats::jetstream::Context,
    last_seqs: &BTreeMap<String, u64>,
    timeout: Duration,
) -> Vec<ArchiveRow> {
    let mut rows = Vec::new();
    let Ok(bucket) = resources::kv_bucket(Component::StorageManager, cim_events::storage::KV_ARCHIVE) else {
        return rows;
    };
    let Ok(Ok(kv)) = tokio::time::timeout(timeout, js.get_key_value(&bucket)).await else { return rows };
    let Ok(Ok(mut keys)) = tokio::time::timeout(timeout, kv.keys()).await else { return rows };
    while let Ok(Some(Ok(key))) = tokio::time::timeout(timeout, keys.next()).await {
        let Some(rest) = key.strip_prefix("target.") else { continue };
        let Ok(Ok(Some(v))) = tokio::time::timeout(timeout, kv.get(&key)).await else { continue };
        let Ok(w) = serde_json::from_slice::<cim_events::storage::Watermark>(&v) else { continue };
        let target = rest.strip_prefix(&format!("{}.", w.stream)).unwrap_or(rest).to_string();
        let last_seq = last_seqs.get(&w.stream).copied().unwrap_or(w.verified_seq);
        rows.push(ArchiveRow {
            lag: last_seq.saturating_sub(w.verified_seq),
            stream: w.stream,
            target,
            last_seq,
            verified_seq: w.verified_seq,
        });
    }
    rows.sort_by(|a, b| (&a.stream, &a.target).cmp(&(&b.stream, &b.target)));
    rows
}

pub async fn status(args: StatusArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let timeout = args.conn.timeout();
    let client = args.conn.connect().await?;
    let js = args.conn.jetstream(&client);
    let mut problems: Vec<(String, String)> = Vec::new();

    let overview_subject = names::query(names::qry::OVERVIEW)?;
    let overview: Option<Overview> =
        match request(&client, overview_subject, &GetOverview { deep: args.deep }, timeout).await {
            Ok(o) => Some(o),
            Err(e) => {
                problems.push(("registry".into(), format!("{e:#}")));
                None
            }
        };

    // Streams and their consumers, concurrently (a degraded cluster answers slowly).
    let owned = cim_streams();
    let checks = owned.iter().map(|(name, owner, kind)| {
        let js = js.clone();
        async move {
            let info = tokio::time::timeout(timeout, async {
                js.get_stream(name).await?.info().await.cloned().map_err(anyhow::Error::from)
            })
            .await;
            (name.clone(), *owner, *kind, info)
        }
    });
    let results = futures::future::join_all(checks).await;
    let mut streams = Vec::new();
    let mut consumers = Vec::new();
    let mut last_seqs: BTreeMap<String, u64> = BTreeMap::new();
    for (name, owner, kind, info) in results {
        let info = match info {
            Err(_) => {
                let p = format!("no answer within {timeout:?} (no leader: quorum lost or an election under way?)");
                problems.push((format!("stream {name}"), p.clone()));
                streams.push(StreamRow {
                    name,
                    owner: owner.service_name(),
                    replicas: 0,
                    current: 0,
                    leader: "-".into(),
                    messages: 0,
                    peers: vec![],
                    problem: Some(p),
                });
                continue;
            }
            Ok(Err(e)) => {
                let text = format!("{e:#}");
                if text.contains("not found") {
                    // Not provisioned: its owner has not run here yet.
                    streams.push(StreamRow {
                        name,
                        owner: owner.service_name(),
                        replicas: 0,
                        current: 0,
                        leader: "-".into(),
                        messages: 0,
                        peers: vec![],
                        problem: Some("missing (owner never ran)".into()),
                    });
                } else {
                    problems.push((format!("stream {name}"), text.clone()));
                    streams.push(StreamRow {
                        name,
                        owner: owner.service_name(),
                        replicas: 0,
                        current: 0,
                        leader: "-".into(),
                        messages: 0,
                        peers: vec![],
                        problem: Some(text),
                    });
                }
                continue;
            }
            Ok(Ok(i)) => i,
        };
        last_seqs.insert(name.clone(), info.state.last_sequence);
        let replicas = info.config.num_replicas;
        let (leader, mut current, mut peers, mut why) = match &info.cluster {
            Some(c) => (c.leader.clone().unwrap_or_default(), usize::from(c.leader.is_some()), Vec::new(), Vec::new()),
            None => (String::new(), 1, Vec::new(), Vec::new()),
        };
        if let Some(c) = &info.cluster {
            if c.leader.is_none() && replicas > 1 {
                why.push("has no leader".to_string());
            }
            for p in &c.replicas {
                peers.push(json!({"name": p.name, "current": p.current, "offline": p.offline, "active_ms": p.active.as_millis() as u64, "lag": p.lag}));
                if p.offline {
                    why.push(format!("replica on {} is offline", p.name));
                } else if !p.current {
                    why.push(format!("replica on {} is not current (lag {})", p.name, p.lag.unwrap_or(0)));
                } else {
                    current += 1;
                }
            }
        }
        if replicas > 1 && current < replicas && why.is_empty() {
            why.push(format!("{current} of {replicas} replicas current"));
        }
        let problem = if why.is_empty() { None } else { Some(why.join("; ")) };
        if let Some(p) = &problem {
            problems.push((format!("stream {name}"), p.clone()));
        }
        streams.push(StreamRow {
            name: name.clone(),
            owner: owner.service_name(),
            replicas,
            current,
            leader: if leader.is_empty() { "-".into() } else { leader },
            messages: info.state.messages,
            peers,
            problem,
        });
        if let Ok(Ok(stream)) = tokio::time::timeout(timeout, js.get_stream(&name)).await {
            let mut list = stream.consumers();
            while let Ok(Some(Ok(c))) = tokio::time::timeout(timeout, list.next()).await {
                if is_object_read(kind, &c.config) {
                    continue;
                }
                if c.num_pending > args.lag_threshold {
                    problems.push((
                        format!("consumer {}", c.name),
                        format!("{} events behind on {name} (threshold {})", c.num_pending, args.lag_threshold),
                    ));
                }
                consumers.push(ConsumerRow {
                    stream: name.clone(),
                    name: c.name,
                    pending: c.num_pending,
                    ack_pending: c.num_ack_pending,
                    redelivered: c.num_redelivered,
                    waiting: c.num_waiting,
                });
            }
        }
    }
    let archive = archive_lag(&js, &last_seqs, timeout).await;
    for a in &archive {
        if a.lag > args.lag_threshold {
            problems.push((
                format!("archive of {} on {}", a.stream, a.target),
                format!("{} messages not yet archived and verified (threshold {})", a.lag, args.lag_threshold),
            ));
        }
    }
    if let Some(o) = &overview {
        for p in &o.problems {
            problems.push((p.subject.clone(), p.reason.clone()));
        }
        // Ready for work but saying something it looks after is wrong (e.g. the storage
        // manager cannot reach an archive target).
        for i in o.instances.iter().filter(|i| !i.degraded.is_empty() && i.state() == InstanceState::InstanceRunning) {
            problems.push((format!("{} {}", i.service, i.instance_id), format!("degraded: {}", i.degraded)));
        }
        for d in o.described.iter().filter(|d| !d.error.is_empty()) {
            problems.push((d.component.clone(), format!("describe: {}", d.error)));
        }
    }
    let elapsed = started.elapsed();

    // desired vs running, and routing (every instance of a service joins its queue group)
    let mut services: BTreeMap<String, (u32, Vec<&Instance>)> = BTreeMap::new();
    if let Some(o) = &overview {
        for d in &o.desired {
            services.entry(d.service.clone()).or_default().0 = d.replicas;
        }
        for i in o
            .instances
            .iter()
            .filter(|i| matches!(i.state(), InstanceState::InstanceRunning | InstanceState::InstanceDrained))
        {
            services.entry(i.service.clone()).or_default().1.push(i);
        }
    }
    let converging = problems.is_empty();
    let value = json!({
        "converging": converging,
        "elapsed_ms": elapsed.as_millis() as u64,
        "registry": overview.as_ref().map(|o| json!({"instance": o.registry_instance, "heartbeats_seen": o.heartbeats_seen, "rejected": o.rejected})),
        "desired_is_default": overview.as_ref().map(|o| o.desired_is_default),
        "services": services.iter().map(|(s, (want, have))| {
            let queue_group = Component::parse(s).map(resources::queue_group).unwrap_or_default();
            json!({
                "service": s, "desired": want,
                "running": have.iter().filter(|i| i.state() == InstanceState::InstanceRunning).count(),
                "queue_group": queue_group,
                "instances": have.iter().map(|i| i.instance_id.clone()).collect::<Vec<_>>(),
            })
        }).collect::<Vec<_>>(),
        "instances": overview.as_ref().map(|o| o.instances.iter().map(instance_json).collect::<Vec<_>>()).unwrap_or_default(),
        "nodes": overview.as_ref().map(|o| o.nodes.iter().map(node_json).collect::<Vec<_>>()).unwrap_or_default(),
        "streams": streams.iter().map(|s| json!({
            "name": s.name, "owner": s.owner, "replicas": s.replicas, "current": s.current, "leader": s.leader,
            "messages": s.messages, "peers": s.peers, "problem": s.problem,
        })).collect::<Vec<_>>(),
        "consumers": consumers.iter().map(|c| json!({
            "stream": c.stream, "name": c.name, "pending": c.pending, "ack_pending": c.ack_pending,
            "redelivered": c.redelivered, "waiting": c.waiting,
        })).collect::<Vec<_>>(),
        "described": overview.as_ref().map(|o| o.described.iter().map(|d| json!({"component": d.component, "instance": d.instance_id, "ready": d.ready, "error": d.error})).collect::<Vec<_>>()).unwrap_or_default(),
        "archive": archive.iter().map(|a| json!({
            "stream": a.stream, "target": a.target, "last_seq": a.last_seq, "verified_seq": a.verified_seq, "lag": a.lag,
        })).collect::<Vec<_>>(),
        "problems": problems.iter().map(|(s, r)| json!({"subject": s, "reason": r})).collect::<Vec<_>>(),
    });

    let mut out = String::new();
    let _ = writeln!(out, "CIM status at {} ({} ms)\n", args.conn.nats_url, elapsed.as_millis());
    let _ = writeln!(
        out,
        "Desired vs running{}:",
        if overview.as_ref().is_some_and(|o| o.desired_is_default) {
            " (nothing set: one of each service)"
        } else {
            ""
        }
    );
    let mut t = Table::new(&["SERVICE", "DESIRED", "RUNNING", "QUEUE GROUP", "INSTANCES"]);
    for (s, (want, have)) in &services {
        let running = have.iter().filter(|i| i.state() == InstanceState::InstanceRunning).count();
        let list: Vec<String> = have.iter().map(|i| format!("{}@{}", i.instance_id, i.node)).collect();
        let qg = Component::parse(s).map(resources::queue_group).unwrap_or_else(|_| "-".into());
        t.row(vec![s.clone(), want.to_string(), running.to_string(), qg, list.join(", ")]);
    }
    t.render(&mut out);
    if let Some(o) = &overview {
        let _ = writeln!(out, "\nInstances:");
        let mut t = Table::new(&["INSTANCE", "SERVICE", "VERSION", "NODE", "STATE", "READY", "IN FLIGHT", "LAST BEAT"]);
        for i in &o.instances {
            t.row(vec![
                i.instance_id.clone(),
                i.service.clone(),
                i.version.clone(),
                i.node.clone(),
                instance_state_name(i.state()).into(),
                match (i.ready, i.degraded.is_empty()) {
                    (false, _) => "no",
                    (true, true) => "yes",
                    (true, false) => "degraded",
                }
                .into(),
                i.in_flight.to_string(),
                ago(i.last_seen_ms),
            ]);
        }
        t.render(&mut out);
        let _ = writeln!(out, "\nNodes:");
        let mut t = Table::new(&["NODE", "STATE", "MEMORY", "RESERVED", "CPUS", "JETSTREAM"]);
        for n in &o.nodes {
            t.row(vec![
                n.name.clone(),
                state_name(n.state()).into(),
                human(n.memory_bytes),
                human(n.reserved_bytes),
                format!("{}", n.cpus),
                if n.jetstream_server.is_empty() { "-".into() } else { n.jetstream_server.clone() },
            ]);
        }
        t.render(&mut out);
    }
    let _ = writeln!(out, "\nStreams:");
    let mut t = Table::new(&["STREAM", "OWNER", "REPLICAS", "CURRENT", "LEADER", "MESSAGES", "PROBLEM"]);
    for s in streams.iter().filter(|s| s.replicas > 0 || s.problem.as_deref() != Some("missing (owner never ran)")) {
        t.row(vec![
            s.name.clone(),
            s.owner.into(),
            s.replicas.to_string(),
            s.current.to_string(),
            s.leader.clone(),
            s.messages.to_string(),
            s.problem.clone().unwrap_or_default(),
        ]);
    }
    t.render(&mut out);
    let _ = writeln!(out, "\nConsumers (work routing and lag):");
    let mut t = Table::new(&["STREAM", "CONSUMER", "PENDING", "ACK PENDING", "REDELIVERED", "WAITING PULLS"]);
    for c in &consumers {
        t.row(vec![
            c.stream.clone(),
            c.name.clone(),
            c.pending.to_string(),
            c.ack_pending.to_string(),
            c.redelivered.to_string(),
            c.waiting.to_string(),
        ]);
    }
    t.render(&mut out);
    if archive.is_empty() {
        let _ = writeln!(
            out,
            "\nArchive: no watermarks (no storage manager with archive targets has verified anything here)"
        );
    } else {
        let _ = writeln!(out, "\nArchive (verified copies per target):");
        let mut t = Table::new(&["STREAM", "TARGET", "LAST SEQ", "VERIFIED", "LAG"]);
        for a in &archive {
            t.row(vec![
                a.stream.clone(),
                a.target.clone(),
                a.last_seq.to_string(),
                a.verified_seq.to_string(),
                a.lag.to_string(),
            ]);
        }
        t.render(&mut out);
    }
    if problems.is_empty() {
        let _ = writeln!(out, "\nConverged: nothing to report.");
    } else {
        let _ = writeln!(out, "\nNot converging:");
        for (s, r) in &problems {
            let _ = writeln!(out, "  - {s}: {r}");
        }
    }
    print(args.conn.json, value, out);
    Ok(if args.check && !converging { ExitCode::from(3) } else { ExitCode::SUCCESS })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use async_nats::jetstream::consumer::IntoConsumerConfig as _;
    use async_nats::jetstream::consumer::{self, push::OrderedConfig};

    use super::*;

    #[test]
    fn object_reads_are_told_from_the_consumers_that_route_work() {
        // What async-nats asks JetStream for when it reads an object.
        let read = OrderedConfig { deliver_subject: "_INBOX.x".into(), ..Default::default() }.into_consumer_config();
        assert!(is_object_read(Kind::Objects, &read));
        // The same on a KV bucket or an event stream is somebody's watch: shown.
        assert!(!is_object_read(Kind::KeyValue, &read));
        assert!(!is_object_read(Kind::Stream, &read));
        // A service's durable pull consumer is work routing: shown.
        let durable = consumer::pull::Config {
            durable_name: Some(cim_events::iu::projector_consumer()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            ..Default::default()
        }
        .into_consumer_config();
        assert!(!is_object_read(Kind::Objects, &durable));
    }
}
