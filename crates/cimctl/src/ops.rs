//! Operations from one command line: `cimctl status` (desired vs running, routing, consumers
//! and lag, stream health, and why anything is not converging), `cimctl placement check|apply`,
//! `cimctl node enroll|schedule|drain|decommission|ls` and `cimctl registry ls|find`.
//!
//! Every command prints a readable table, or with `--json` one JSON document on stdout. Errors
//! are one line on stderr; a placement file that does not parse or names unknown services exits
//! with 64.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use cim_events::{
    Component,
    proto::registry::{
        DesiredService, EnrollNode, GetOverview, Instance, InstanceList, InstanceState, ListInstances, ListNodes, Node,
        NodeCommand, NodeList, NodeReply, NodeState, Overview, SetDesired,
    },
    registry as names, resources,
};
use cim_placement::{
    self as placement, PlacementFile, human,
    names::{instance_state_name, state_name},
};
use futures::StreamExt;
use serde_json::{Value, json};

const EXIT_USAGE: u8 = 64;

#[derive(clap::Args, Debug, Clone)]
pub struct Conn {
    /// NATS server URL(s), comma-separated.
    #[arg(long, global = true, env = "CIM_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// NATS credentials file (JWT + NKey seed).
    #[arg(long, global = true, env = "CIM_NATS_CREDS")]
    nats_creds: Option<PathBuf>,
    /// JetStream domain (a leaf node's own domain, or the hub's).
    #[arg(long, global = true, env = "CIM_JS_DOMAIN")]
    js_domain: Option<String>,
    /// Timeout of each request, in seconds.
    #[arg(long, global = true, default_value_t = 5.0)]
    timeout: f64,
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
}

impl Conn {
    fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout.max(0.1))
    }

    async fn connect(&self) -> Result<async_nats::Client> {
        let mut opts = async_nats::ConnectOptions::new().name("cimctl").request_timeout(Some(self.timeout()));
        if let Some(creds) = &self.nats_creds {
            opts = opts
                .credentials_file(creds)
                .await
                .with_context(|| format!("reading NATS credentials {}", creds.display()))?;
        }
        let urls: Vec<&str> = self.nats_url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
        let client = tokio::time::timeout(self.timeout().max(Duration::from_secs(5)), opts.connect(urls))
            .await
            .map_err(|_| anyhow::anyhow!("connecting to NATS at {}: timed out", self.nats_url))?
            .with_context(|| format!("connecting to NATS at {}", self.nats_url))?;
        Ok(client)
    }

    fn jetstream(&self, client: &async_nats::Client) -> async_nats::jetstream::Context {
        match &self.js_domain {
            Some(d) if !d.is_empty() => async_nats::jetstream::with_domain(client.clone(), d),
            _ => async_nats::jetstream::new(client.clone()),
        }
    }
}

/// One request to the registry; an error reply becomes an error naming its code.
async fn request<R: prost::Message + Default>(
    client: &async_nats::Client,
    subject: String,
    req: &impl prost::Message,
    timeout: Duration,
) -> Result<R> {
    let reply = tokio::time::timeout(timeout, client.request(subject.clone(), req.encode_to_vec().into()))
        .await
        .map_err(|_| anyhow::anyhow!("no answer from the registry on {subject} within {timeout:?} (is it running?)"))?
        .map_err(|e| match e.kind() {
            async_nats::RequestErrorKind::NoResponders => {
                anyhow::anyhow!("no registry is running (no responders on {subject})")
            }
            _ => anyhow::anyhow!("{subject}: {e}"),
        })?;
    if let Some(h) = &reply.headers
        && let Some(code) = h.get("Nats-Service-Error-Code")
    {
        let msg = h.get("Nats-Service-Error").map(|v| v.to_string()).unwrap_or_default();
        bail!("registry refused ({code}): {msg}");
    }
    R::decode(reply.payload).with_context(|| format!("reply on {subject} does not decode"))
}

fn print(json: bool, value: Value, text: String) {
    if json {
        println!("{value}");
    } else {
        print!("{text}");
    }
}

// ---- tables ----

/// A plain text table: columns padded to their widest cell.
struct Table {
    head: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(head: &[&'static str]) -> Table {
        Table { head: head.to_vec(), rows: Vec::new() }
    }
    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }
    fn render(&self, out: &mut String) {
        let mut w: Vec<usize> = self.head.iter().map(|h| h.len()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                if i < w.len() {
                    w[i] = w[i].max(c.chars().count());
                }
            }
        }
        let line = |cells: Vec<&str>, out: &mut String| {
            let s: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<width$}", width = w[i])).collect();
            let _ = writeln!(out, "  {}", s.join("  ").trim_end());
        };
        line(self.head.clone(), out);
        for r in &self.rows {
            line(r.iter().map(String::as_str).collect(), out);
        }
        if self.rows.is_empty() {
            let _ = writeln!(out, "  (none)");
        }
    }
}

fn ago(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let now = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
    let d = (now - ms).max(0);
    if d < 1000 { format!("{d}ms ago") } else { format!("{:.1}s ago", d as f64 / 1000.0) }
}

fn node_json(n: &Node) -> Value {
    json!({
        "name": n.name, "state": state_name(n.state()), "memory_bytes": n.memory_bytes, "reserved_bytes": n.reserved_bytes,
        "cpus": n.cpus, "labels": n.labels, "jetstream_server": n.jetstream_server, "reason": n.reason, "changed_ms": n.changed_ms,
    })
}

fn instance_json(i: &Instance) -> Value {
    json!({
        "instance_id": i.instance_id, "component": i.component, "service": i.service, "version": i.version, "node": i.node,
        "contract_version": i.contract_version, "capabilities": i.capabilities, "subjects": i.subjects, "http_addr": i.http_addr,
        "state": instance_state_name(i.state()), "ready": i.ready, "in_flight": i.in_flight, "last_seen_ms": i.last_seen_ms,
        "ttl_ms": i.ttl_ms, "incompatible": i.incompatible, "duplicate": i.duplicate, "reason": i.reason,
    })
}

// ---- status ----

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

/// Every stream CIM owns, with its owner.
fn cim_streams() -> Vec<(String, Component)> {
    let mut v = Vec::new();
    for c in Component::ALL {
        for s in resources::streams(c) {
            v.push((s.name, c));
        }
        for b in resources::object_buckets(c) {
            v.push((b.stream_name(), c));
        }
        for b in resources::kv_buckets(c) {
            v.push((b.stream_name(), c));
        }
    }
    v
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
    let checks = owned.iter().map(|(name, owner)| {
        let js = js.clone();
        async move {
            let info = tokio::time::timeout(timeout, async {
                js.get_stream(name).await?.info().await.cloned().map_err(anyhow::Error::from)
            })
            .await;
            (name.clone(), *owner, info)
        }
    });
    let results = futures::future::join_all(checks).await;
    let mut streams = Vec::new();
    let mut consumers = Vec::new();
    let mut last_seqs: BTreeMap<String, u64> = BTreeMap::new();
    for (name, owner, info) in results {
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
                if i.ready { "yes" } else { "no" }.into(),
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

// ---- placement ----

#[derive(clap::Args, Debug)]
pub struct PlacementArgs {
    #[command(subcommand)]
    command: PlacementCommand,
}

#[derive(clap::Subcommand, Debug)]
enum PlacementCommand {
    /// Does the desired set of services fit on the nodes? Exit 0 if it fits, 1 if not, 64 if the
    /// file is invalid. The JSON report is what the NixOS deployment consumes.
    Check {
        /// Placement file (JSON): nodes, services and optionally assignments.
        file: PathBuf,
        /// Propose a placement (even when the file has assignments).
        #[arg(long)]
        propose: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check the file and, if it fits, make its services the registry's desired state.
    Apply {
        file: PathBuf,
        #[command(flatten)]
        conn: Conn,
    },
}

fn read_placement(file: &PathBuf) -> std::result::Result<PlacementFile, String> {
    let text =
        std::fs::read_to_string(file).map_err(|e| format!("cannot read placement file {}: {e}", file.display()))?;
    PlacementFile::parse(&text).map_err(|e| format!("{}: {e}", file.display()))
}

fn placement_text(r: &placement::Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} (CPU overcommit {}, safety buffer {} per node){}",
        if r.fits { "Fits" } else { "Does not fit" },
        r.cpu_overcommit,
        human(r.safety_buffer_bytes),
        if r.proposed { ", proposed placement:" } else { ":" }
    );
    let mut t = Table::new(&["NODE", "ALLOCATABLE", "MEMORY USED", "CPU USED", "CPU LIMIT", "SERVICES"]);
    for n in &r.nodes {
        let svcs: Vec<String> =
            n.services.iter().map(|p| format!("{} ({})", p.service, human(p.memory_max_bytes))).collect();
        t.row(vec![
            n.name.clone(),
            human(n.allocatable_bytes),
            human(n.memory_used_bytes),
            format!("{:.2}", n.cpu_used),
            format!("{:.2}", n.cpu_limit),
            svcs.join(", "),
        ]);
    }
    t.render(&mut out);
    for p in &r.problems {
        let _ = writeln!(out, "  - {p}");
    }
    out
}

pub async fn placement(args: PlacementArgs) -> Result<ExitCode> {
    match args.command {
        PlacementCommand::Check { file, propose, json } => {
            let f = match read_placement(&file) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("cimctl placement: {e}");
                    return Ok(ExitCode::from(EXIT_USAGE));
                }
            };
            let r = placement::check(&f, propose);
            print(json, serde_json::to_value(&r)?, placement_text(&r));
            Ok(if r.fits { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        PlacementCommand::Apply { file, conn } => {
            let f = match read_placement(&file) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("cimctl placement: {e}");
                    return Ok(ExitCode::from(EXIT_USAGE));
                }
            };
            let r = placement::check(&f, false);
            if !r.fits {
                eprint!("{}", placement_text(&r));
                bail!("the placement does not fit; nothing applied");
            }
            let client = conn.connect().await?;
            let services = f
                .services
                .iter()
                .map(|s| DesiredService {
                    service: s.name.clone(),
                    replicas: s.replicas,
                    memory_max_bytes: s.memory_max.0,
                    cpu: s.cpu,
                })
                .collect();
            let _: cim_events::proto::registry::Ack =
                request(&client, names::command(names::cmd::SET_DESIRED)?, &SetDesired { services }, conn.timeout())
                    .await?;
            print(
                conn.json,
                json!({"applied": true, "report": serde_json::to_value(&r)?}),
                "Applied: the registry's desired state is this placement's services.\n".into(),
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

// ---- nodes ----

#[derive(clap::Args, Debug)]
pub struct NodeArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    command: NodeCommandCli,
}

#[derive(clap::Subcommand, Debug)]
enum NodeCommandCli {
    /// Enroll a node with its capacity; it becomes schedulable unless --hold.
    Enroll {
        name: String,
        /// Physical memory, e.g. 8GiB.
        #[arg(long, value_parser = placement::parse_size)]
        memory: u64,
        /// Memory reserved for the OS and nats-server, e.g. 1GiB.
        #[arg(long, value_parser = placement::parse_size, default_value = "0")]
        reserved: u64,
        /// CPUs (cores).
        #[arg(long)]
        cpus: f64,
        /// A label k=v (repeatable).
        #[arg(long = "label", value_name = "K=V", value_parser = parse_kv)]
        labels: Vec<(String, String)>,
        /// Name of the nats-server on this node that holds JetStream replicas.
        #[arg(long)]
        jetstream_server: Option<String>,
        /// Stay enrolling (not schedulable) until `cimctl node schedule`.
        #[arg(long)]
        hold: bool,
    },
    /// Make an enrolling or drained node schedulable.
    Schedule { name: String },
    /// Drain a node: its services stop taking new work, finish what they hold, and report drained.
    Drain {
        name: String,
        #[arg(long)]
        reason: Option<String>,
        /// Wait until the node is drained.
        #[arg(long)]
        wait: bool,
    },
    /// Decommission a drained node (refused while anything stateful remains on it).
    Decommission { name: String },
    /// List the nodes.
    Ls {
        /// Include decommissioned nodes.
        #[arg(long)]
        all: bool,
    },
}

fn parse_kv(s: &str) -> std::result::Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?} is not K=V"))?;
    Ok((k.to_string(), v.to_string()))
}

fn node_text(n: &Node) -> String {
    format!(
        "node {}: {} ({} memory, {} reserved, {} cpus){}\n",
        n.name,
        state_name(n.state()),
        human(n.memory_bytes),
        human(n.reserved_bytes),
        n.cpus,
        if n.reason.is_empty() { String::new() } else { format!(": {}", n.reason) }
    )
}

pub async fn node(args: NodeArgs) -> Result<ExitCode> {
    let conn = args.conn;
    let client = conn.connect().await?;
    let t = conn.timeout();
    let cmd = |name: &str| names::command(name);
    let reply: Node = match args.command {
        NodeCommandCli::Enroll { name, memory, reserved, cpus, labels, jetstream_server, hold } => {
            let req = EnrollNode {
                name,
                memory_bytes: memory,
                reserved_bytes: reserved,
                cpus,
                labels: labels.into_iter().collect(),
                jetstream_server: jetstream_server.unwrap_or_default(),
                hold,
            };
            request::<NodeReply>(&client, cmd(names::cmd::ENROLL)?, &req, t).await?.node.unwrap_or_default()
        }
        NodeCommandCli::Schedule { name } => {
            request::<NodeReply>(&client, cmd(names::cmd::SCHEDULE)?, &NodeCommand { name, reason: String::new() }, t)
                .await?
                .node
                .unwrap_or_default()
        }
        NodeCommandCli::Drain { name, reason, wait } => {
            let n = request::<NodeReply>(
                &client,
                cmd(names::cmd::DRAIN)?,
                &NodeCommand { name: name.clone(), reason: reason.unwrap_or_default() },
                t,
            )
            .await?
            .node
            .unwrap_or_default();
            if wait && n.state() != NodeState::NodeDrained {
                let deadline = Instant::now() + Duration::from_secs(300);
                loop {
                    let list: NodeList = request(
                        &client,
                        names::query(names::qry::NODES)?,
                        &ListNodes { include_decommissioned: true },
                        t,
                    )
                    .await?;
                    let now = list.nodes.into_iter().find(|x| x.name == name).unwrap_or_default();
                    if now.state() == NodeState::NodeDrained || Instant::now() > deadline {
                        break now;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            } else {
                n
            }
        }
        NodeCommandCli::Decommission { name } => request::<NodeReply>(
            &client,
            cmd(names::cmd::DECOMMISSION)?,
            &NodeCommand { name, reason: String::new() },
            t,
        )
        .await?
        .node
        .unwrap_or_default(),
        NodeCommandCli::Ls { all } => {
            let list: NodeList =
                request(&client, names::query(names::qry::NODES)?, &ListNodes { include_decommissioned: all }, t)
                    .await?;
            let mut out = String::new();
            let mut tab = Table::new(&["NODE", "STATE", "MEMORY", "RESERVED", "CPUS", "LABELS"]);
            for n in &list.nodes {
                let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                tab.row(vec![
                    n.name.clone(),
                    state_name(n.state()).into(),
                    human(n.memory_bytes),
                    human(n.reserved_bytes),
                    n.cpus.to_string(),
                    labels.join(","),
                ]);
            }
            tab.render(&mut out);
            print(conn.json, json!({"nodes": list.nodes.iter().map(node_json).collect::<Vec<_>>()}), out);
            return Ok(ExitCode::SUCCESS);
        }
    };
    print(conn.json, node_json(&reply), node_text(&reply));
    Ok(ExitCode::SUCCESS)
}

// ---- registry ----

#[derive(clap::Args, Debug)]
pub struct RegistryArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    command: RegistryCommand,
}

#[derive(clap::Subcommand, Debug)]
enum RegistryCommand {
    /// List the running instances.
    Ls {
        /// Only this service (name or token).
        #[arg(long)]
        component: Option<String>,
        /// Only instances on this node.
        #[arg(long)]
        node: Option<String>,
        /// Also stopped and lost instances.
        #[arg(long)]
        all: bool,
    },
    /// Find the instances that offer a capability.
    Find {
        #[arg(long)]
        capability: String,
    },
}

pub async fn registry(args: RegistryArgs) -> Result<ExitCode> {
    let conn = args.conn;
    let client = conn.connect().await?;
    let q = match args.command {
        RegistryCommand::Ls { component, node, all } => ListInstances {
            component: component.unwrap_or_default(),
            node: node.unwrap_or_default(),
            include_gone: all,
            ..Default::default()
        },
        RegistryCommand::Find { capability } => ListInstances { capability, ..Default::default() },
    };
    let list: InstanceList = request(&client, names::query(names::qry::INSTANCES)?, &q, conn.timeout()).await?;
    let mut out = String::new();
    let mut t = Table::new(&["INSTANCE", "SERVICE", "VERSION", "NODE", "STATE", "READY", "CAPABILITIES", "LAST BEAT"]);
    for i in &list.instances {
        t.row(vec![
            i.instance_id.clone(),
            i.service.clone(),
            i.version.clone(),
            i.node.clone(),
            instance_state_name(i.state()).into(),
            if i.ready { "yes" } else { "no" }.into(),
            i.capabilities.join(","),
            ago(i.last_seen_ms),
        ]);
    }
    t.render(&mut out);
    let services: BTreeSet<&str> = list.instances.iter().map(|i| i.service.as_str()).collect();
    let _ = writeln!(out, "{} instance(s) of {} service(s)", list.instances.len(), services.len());
    print(conn.json, json!({"instances": list.instances.iter().map(instance_json).collect::<Vec<_>>()}), out);
    Ok(ExitCode::SUCCESS)
}
