//! `cimctl up --nodes 3`: the hub cluster of the design on one machine. Three nats-servers
//! (`cim-n1`..`cim-n3`) clustered in the JetStream domain `hub` (streams R3), a leaf
//! (`cim-leaf`, domain `leaf`) attached to them as in `nixos-modules/hosts/leaf.nix`, the nodes
//! n1..n3 enrolled in the registry with their memory and CPUs, and the services spread over
//! them with `--node` ([`LAYOUT`]); the layout is checked with `cim_placement` against the
//! enrolled nodes and made the registry's desired state, so `cimctl status` compares it with
//! what runs. A process that exits is started again on its ports and store, as systemd does on
//! the NixOS hosts: a node's nats-server rejoins the cluster, a drained instance stopped with
//! `kill` comes back and takes work once its node is scheduled. `cimctl node stop|start N`
//! takes a whole node down (its instances, then its nats-server) and up again, through marker
//! files in `<data>/nodes` that the supervisor watches.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use cim_events::{
    Component,
    proto::registry::{
        Ack, DesiredService, EnrollNode, ListNodes, NodeCommand, NodeList, NodeReply, NodeState, SetDesired,
    },
    registry as names,
};
use cim_placement::{PlacementFile, human};
use nix::sys::signal::Signal;
use tokio::process::Command;

use super::{
    Proc, StopSignals, UpArgs, check_config, exited, find_service_binaries, first_token, pick_port, spawn,
    stop_in_order, wait_healthy,
};

/// The nodes, in order; node `nK`'s nats-server is `cim-nK`.
pub const NODES: [&str; 3] = ["n1", "n2", "n3"];
/// The NATS cluster's name, as in `nixos-modules/nats-cluster-node.nix`.
const CLUSTER_NAME: &str = "cim-hub";
/// The cluster's JetStream domain, as in `nixos-modules/nats-cluster-node.nix`.
const HUB_DOMAIN: &str = "hub";
/// The leaf's JetStream domain, as in `nixos-modules/hosts/leaf.nix`.
const LEAF_DOMAIN: &str = "leaf";
/// The leaf's nats-server name.
const LEAF_SERVER: &str = "cim-leaf";
/// The memory cap of one service instance in the placement: the NixOS modules' `MemoryMax`.
const SERVICE_MEMORY_MAX: &str = "256MiB";
/// The CPU share of one service instance in the placement.
const SERVICE_CPU: f64 = 0.5;
/// How long a process that died stays down before it is started again (the NixOS modules'
/// `RestartSec`): long enough to see the cluster carry on without it.
const RESTART_PAUSE: Duration = Duration::from_secs(2);
/// How often the supervisor looks for processes that died.
const SUPERVISE_POLL: Duration = Duration::from_millis(500);
/// Between two attempts while the cluster forms or the registry is not answering yet.
const RETRY_PAUSE: Duration = Duration::from_millis(250);
/// How long one request to the cluster (probe, registry) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Where each instance runs. Every service that scales out (its instances share the work
/// through their queue group and durable consumers) has two instances on two different nodes,
/// so draining or losing any one node leaves one of each; the storage manager (one archive
/// writer per stream and target) and the integration hub (the one webhook address the outside
/// is configured with) have one. Four instances per node.
pub const LAYOUT: [(Component, &[&str]); 7] = [
    (Component::InformationUnit, &["n1", "n2"]),
    (Component::PipelineEngine, &["n2", "n3"]),
    (Component::Registry, &["n3", "n1"]),
    (Component::PluginHost, &["n1", "n2"]),
    (Component::UiGateway, &["n2", "n3"]),
    (Component::StorageManager, &["n3"]),
    (Component::IntegrationHub, &["n1"]),
];

/// The ports of one nats-server.
struct Ports {
    client: u16,
    monitor: u16,
    /// Route port (cluster nodes only).
    route: u16,
    /// Leaf-node port (cluster nodes only).
    leafnode: u16,
}

impl Ports {
    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client)
    }
}

/// How to start a process (again): a nats-server with its configuration file, or a service
/// with its environment.
struct Recipe {
    program: PathBuf,
    /// For a nats-server: its configuration file (`-c`).
    args: Vec<PathBuf>,
    env: Vec<(&'static str, String)>,
}

impl Recipe {
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        for conf in &self.args {
            cmd.arg("-c").arg(conf);
        }
        // Credentials of whoever runs cimctl are not the instances'.
        cmd.envs(self.env.iter().map(|(k, v)| (*k, v))).env_remove("CIM_NATS_CREDS");
        cmd
    }
}

pub async fn run(args: UpArgs) -> Result<ExitCode> {
    let nats_bin = cim_proc::nats_server_binary()?;
    let binaries = find_service_binaries(args.bin_dir.as_deref())?;
    let (placement, placement_text) = placement_file(&args)?;
    let report = cim_placement::check(&placement, false);
    if !report.fits {
        bail!("the cluster's layout does not fit the nodes' figures: {}", report.problems.join("; "));
    }

    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating data directory {}", args.data_dir.display()))?;
    let data_dir = args.data_dir.canonicalize()?;
    let logs = data_dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    // A fresh start brings every node up: no `cimctl node stop` from an earlier run holds.
    let _ = std::fs::remove_dir_all(data_dir.join("nodes"));
    std::fs::create_dir_all(data_dir.join("nodes"))?;
    let placement_path = data_dir.join("placement.json");
    std::fs::write(&placement_path, placement_text + "\n")?;

    // The usual ports when free (4222.. for clients, 6222.. routes, 7422.. leaf nodes, 8222..
    // monitoring), else free ones; reserved while cimctl runs.
    let mut reserved = Vec::new();
    let mut port = |preferred: u16, offset: u16| {
        let p = if preferred == 0 { 0 } else { preferred.saturating_add(offset) };
        pick_port(p, &mut reserved)
    };
    let mut servers = Vec::new();
    for i in 0..=NODES.len() as u16 {
        let leaf = i as usize == NODES.len();
        servers.push(Ports {
            client: port(args.nats_port, i)?,
            monitor: port(8222, i)?,
            route: if leaf { 0 } else { port(6222, i)? },
            leafnode: if leaf { 0 } else { port(7422, i)? },
        });
    }
    let (nodes, leaf) = servers.split_at(NODES.len());
    let leaf = &leaf[0];
    let cluster_urls: Vec<String> = nodes.iter().map(Ports::url).collect();
    let cluster_url = cluster_urls.join(",");
    std::fs::write(data_dir.join("nats.url"), &cluster_url)?;
    std::fs::write(data_dir.join("leaf.url"), leaf.url())?;

    let mut confs = Vec::new();
    for (i, node) in NODES.iter().enumerate() {
        let dir = data_dir.join("nats").join(node);
        std::fs::create_dir_all(dir.join("jetstream"))?;
        let conf = dir.join("nats.conf");
        std::fs::write(&conf, node_config(i, nodes, &dir.join("jetstream"), &args.sync))?;
        confs.push(conf);
    }
    let leaf_dir = data_dir.join("nats").join(LEAF_DOMAIN);
    std::fs::create_dir_all(leaf_dir.join("jetstream"))?;
    let leaf_conf = leaf_dir.join("nats.conf");
    std::fs::write(&leaf_conf, leaf_config(leaf, nodes, &leaf_dir.join("jetstream"), &args.sync))?;
    confs.push(leaf_conf);
    for conf in &confs {
        check_config(&nats_bin, conf).await?;
    }

    // procs[..4]: the nats-servers of n1..n3 and the leaf's; then the services. recipes[i]
    // starts procs[i] again.
    let mut procs = Vec::new();
    let mut recipes = Vec::new();
    for (i, conf) in confs.iter().enumerate() {
        let name = NODES.get(i).map_or(LEAF_SERVER.to_string(), |n| format!("nats-server@{n}"));
        let log = logs.join(format!("{name}.log"));
        let recipe = Recipe { program: nats_bin.clone(), args: vec![conf.clone()], env: Vec::new() };
        let child =
            spawn(&mut recipe.command(), &log, false).with_context(|| format!("starting {}", nats_bin.display()))?;
        procs.push(Proc { name, child, log, health: None });
        recipes.push(recipe);
    }
    let deadline = Instant::now() + Duration::from_secs(args.ready_timeout);
    if let Err(e) = start_nats(&mut procs, &servers, &cluster_urls, deadline).await {
        stop_in_order(&mut [], &mut procs).await;
        return Err(e);
    }
    let nats_count = procs.len();

    let mut gateway = None;
    for (component, on) in LAYOUT {
        let bin = binaries.iter().find(|(c, _)| *c == component).map(|(_, b)| b.clone()).context("binary")?;
        for node in on {
            let name = component.service_name();
            let health = format!("127.0.0.1:{}", pick_port(0, &mut reserved)?);
            let log = logs.join(format!("{name}@{node}.log"));
            let i = NODES.iter().position(|n| n == node).unwrap_or(0);
            // The node's own nats-server first, the others to fail over to.
            let mut urls = vec![cluster_urls[i].clone()];
            urls.extend(cluster_urls.iter().filter(|u| **u != cluster_urls[i]).cloned());
            let mut env = vec![
                ("CIM_NATS_URL", urls.join(",")),
                ("CIM_TIER", "cluster".to_string()),
                ("CIM_NODE", node.to_string()),
                ("CIM_INSTANCE_ID", format!("{name}-{node}")),
                ("CIM_HTTP_LISTEN", health.clone()),
                // As `nixos-modules/hosts/cluster-node.nix` sets `jetstreamDomain`.
                ("CIM_JS_DOMAIN", HUB_DOMAIN.to_string()),
            ];
            match component {
                Component::UiGateway => {
                    // The first gateway on the usual ports when free, the second on any.
                    let (http, grpc) = if gateway.is_none() { (8480, 8481) } else { (0, 0) };
                    let http = format!("127.0.0.1:{}", pick_port(http, &mut reserved)?);
                    let grpc = format!("127.0.0.1:{}", pick_port(grpc, &mut reserved)?);
                    env.push(("CIM_GATEWAY_LISTEN", http.clone()));
                    env.push(("CIM_GATEWAY_GRPC_LISTEN", grpc.clone()));
                    if gateway.is_none() {
                        gateway = Some((http, grpc));
                    }
                }
                Component::IntegrationHub => {
                    env.push(("CIM_HUB_WEBHOOK_LISTEN", format!("127.0.0.1:{}", pick_port(8470, &mut reserved)?)));
                }
                _ => {}
            }
            let recipe = Recipe { program: bin.clone(), args: Vec::new(), env };
            let child =
                spawn(&mut recipe.command(), &log, false).with_context(|| format!("starting {}", bin.display()))?;
            procs.push(Proc { name: format!("{name}@{node}"), child, log, health: Some(health) });
            recipes.push(recipe);
        }
    }
    for i in nats_count..procs.len() {
        let addr = procs[i].health.clone().unwrap_or_default();
        if let Err(e) = wait_healthy(&mut procs, &addr, "/readyz", deadline).await {
            let (nats, services) = procs.split_at_mut(nats_count);
            stop_in_order(services, nats).await;
            return Err(e.context(format!("an instance did not become ready; see the logs in {}", logs.display())));
        }
    }
    if let Err(e) = enroll_and_place(&cluster_url, &args, &placement, deadline).await {
        let (nats, services) = procs.split_at_mut(nats_count);
        stop_in_order(services, nats).await;
        return Err(e.context("enrolling the nodes and setting the desired state"));
    }

    let (gw_http, gw_grpc) = gateway.unwrap_or_default();
    let mut stop = match StopSignals::install() {
        Ok(s) => s,
        Err(e) => {
            let (nats, services) = procs.split_at_mut(nats_count);
            stop_in_order(services, nats).await;
            return Err(e);
        }
    };
    say!("{}", summary(&data_dir, &cluster_url, &leaf.url(), &args, &placement_path, &procs));
    say!("  web UI and HTTP API  http://{gw_http}/   (gRPC {gw_grpc})");
    say!("{}", first_token(&cluster_url, &gw_http));
    say!("Press Ctrl-C to stop.");

    let outcome = supervise(&mut procs, &recipes, &data_dir, &mut stop).await;
    say!("stopping: services first, then NATS");
    let (nats, services) = procs.split_at_mut(nats_count);
    stop_in_order(services, nats).await;
    match outcome {
        None => {
            say!("CIM cluster stopped");
            Ok(ExitCode::SUCCESS)
        }
        Some(msg) => {
            eprintln!("cimctl: {msg}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// A size as a placement file spells it: `4GiB` when that is exact, else bytes.
fn size(bytes: u64) -> serde_json::Value {
    let text = human(bytes).replace(' ', "");
    if cim_placement::parse_size(&text) == Ok(bytes) { text.into() } else { bytes.into() }
}

/// The placement the cluster runs, and its text (written to `<data>/placement.json` for
/// `cimctl placement check`): the three nodes with the figures of `args`, one entry per service
/// with its instance count, and [`LAYOUT`] as the assignments.
fn placement_file(args: &UpArgs) -> Result<(PlacementFile, String)> {
    let nodes: Vec<serde_json::Value> = NODES
        .iter()
        .map(|n| {
            serde_json::json!({"name": n, "memory": size(args.node_memory),
                "reserved": size(args.node_reserved), "cpus": args.node_cpus})
        })
        .collect();
    let services: Vec<serde_json::Value> = LAYOUT
        .iter()
        .map(|(c, on)| {
            serde_json::json!({"name": c.service_name(), "replicas": on.len(),
                "memory_max": SERVICE_MEMORY_MAX, "cpu": SERVICE_CPU})
        })
        .collect();
    let mut assignments = serde_json::Map::new();
    for node in NODES {
        let here: Vec<&str> =
            LAYOUT.iter().filter(|(_, on)| on.contains(&node)).map(|(c, _)| c.service_name()).collect();
        assignments.insert(node.to_string(), serde_json::json!(here));
    }
    let text = serde_json::to_string_pretty(
        &serde_json::json!({"nodes": nodes, "services": services, "assignments": assignments}),
    )?;
    let file = PlacementFile::parse(&text).map_err(|e| crate::error::Usage(format!("the cluster's placement: {e}")))?;
    Ok((file, text))
}

/// nats-server configuration of node `i`: routes to the other nodes, a leaf-node port, the
/// hub's JetStream domain (`nixos-modules/nats-cluster-node.nix` on loopback).
fn node_config(i: usize, nodes: &[Ports], store: &Path, sync: &str) -> String {
    let me = &nodes[i];
    let routes: Vec<String> = nodes
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != i)
        .map(|(_, p)| format!("\"nats-route://127.0.0.1:{}\"", p.route))
        .collect();
    let mut c = String::new();
    let _ = writeln!(c, "# Written by `cimctl up --nodes 3` for node {}. Regenerated on every start.", NODES[i]);
    let _ = writeln!(c, "server_name: cim-{}", NODES[i]);
    let _ = writeln!(c, "listen: 127.0.0.1:{}", me.client);
    let _ = writeln!(c, "http: 127.0.0.1:{}", me.monitor);
    let _ = writeln!(c, "jetstream {{");
    let _ = writeln!(c, "  store_dir: {:?}", store.display().to_string());
    let _ = writeln!(c, "  domain: {HUB_DOMAIN}");
    let _ = writeln!(c, "  # Every write on disk before it is acknowledged (see the leaf's configuration and");
    let _ = writeln!(c, "  # docs/operations.md): R3 survives one node's loss, not three losing power together.");
    let _ = writeln!(c, "  sync_interval: {sync}");
    let _ = writeln!(c, "}}");
    let _ = writeln!(c, "cluster {{");
    let _ = writeln!(c, "  name: {CLUSTER_NAME}");
    let _ = writeln!(c, "  listen: 127.0.0.1:{}", me.route);
    let _ = writeln!(c, "  routes: [{}]", routes.join(", "));
    let _ = writeln!(c, "}}");
    let _ = writeln!(c, "leafnodes {{");
    let _ = writeln!(c, "  listen: 127.0.0.1:{}", me.leafnode);
    let _ = writeln!(c, "}}");
    c
}

/// nats-server configuration of the leaf: its own JetStream domain, one remote listing every
/// node's leaf-node port (`nixos-modules/nats-leaf.nix` on loopback).
fn leaf_config(leaf: &Ports, nodes: &[Ports], store: &Path, sync: &str) -> String {
    let remotes: Vec<String> = nodes.iter().map(|p| format!("\"nats-leaf://127.0.0.1:{}\"", p.leafnode)).collect();
    let mut c = String::new();
    let _ = writeln!(c, "# Written by `cimctl up --nodes 3` for the leaf attached to the cluster.");
    let _ = writeln!(c, "server_name: {LEAF_SERVER}");
    let _ = writeln!(c, "listen: 127.0.0.1:{}", leaf.client);
    let _ = writeln!(c, "http: 127.0.0.1:{}", leaf.monitor);
    let _ = writeln!(c, "jetstream {{");
    let _ = writeln!(c, "  store_dir: {:?}", store.display().to_string());
    let _ = writeln!(c, "  domain: {LEAF_DOMAIN}");
    let _ = writeln!(c, "  sync_interval: {sync}");
    let _ = writeln!(c, "}}");
    let _ = writeln!(c, "leafnodes {{");
    let _ = writeln!(c, "  remotes: [ {{ urls: [{}] }} ]", remotes.join(", "));
    let _ = writeln!(c, "}}");
    c
}

/// Waits until every nats-server reports JetStream healthy, the cluster can place an R3
/// stream, and the leaf is connected to it.
async fn start_nats(procs: &mut [Proc], servers: &[Ports], cluster_urls: &[String], deadline: Instant) -> Result<()> {
    for p in servers {
        wait_healthy(procs, &format!("127.0.0.1:{}", p.monitor), "/healthz?js-enabled-only=true", deadline).await?;
    }
    loop {
        if let Some(msg) = exited(procs) {
            bail!(msg);
        }
        let last = match r3_probe(cluster_urls).await {
            Ok(()) => break,
            Err(e) => e,
        };
        if Instant::now() > deadline {
            return Err(last.context("the cluster did not form (no R3 stream could be placed) before the deadline"));
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
    let leaf_monitor = format!("127.0.0.1:{}", servers[NODES.len()].monitor);
    loop {
        if let Some(msg) = exited(procs) {
            bail!(msg);
        }
        if let Ok(r) = cim_proc::http_get(&leaf_monitor, "/leafz").await
            && serde_json::from_str::<serde_json::Value>(&r.text()).is_ok_and(|v| v["leafnodes"].as_u64() > Some(0))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the leaf did not connect to the cluster before the deadline");
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

/// Creates and deletes a replicated memory stream: the meta group has a leader and sees all
/// three peers, so the services' R3 streams can be placed.
async fn r3_probe(cluster_urls: &[String]) -> Result<()> {
    let client = crate::conn::connect("cimctl-up", &cluster_urls.join(","), None, Some(REQUEST_TIMEOUT)).await?;
    let js = async_nats::jetstream::new(client);
    let name = format!("CIMCTL_UP_PROBE_{}", std::process::id());
    let config = async_nats::jetstream::stream::Config {
        name: name.clone(),
        num_replicas: NODES.len(),
        storage: async_nats::jetstream::stream::StorageType::Memory,
        ..Default::default()
    };
    js.create_stream(config).await.context("placing an R3 probe stream")?;
    js.delete_stream(&name).await.context("deleting the probe stream")?;
    Ok(())
}

/// Enrolls n1..n3 with the figures of `args` (a node already enrolled by an earlier start is
/// made schedulable again if it was drained: its instances are new), and makes `placement`'s
/// services the registry's desired state (`cimctl placement apply`).
async fn enroll_and_place(urls: &str, args: &UpArgs, placement: &PlacementFile, deadline: Instant) -> Result<()> {
    let client = crate::conn::connect("cimctl-up", urls, None, Some(REQUEST_TIMEOUT)).await?;
    for (i, node) in NODES.iter().enumerate() {
        let enroll = EnrollNode {
            name: node.to_string(),
            memory_bytes: args.node_memory,
            reserved_bytes: args.node_reserved,
            cpus: args.node_cpus,
            labels: Default::default(),
            jetstream_server: format!("cim-{}", NODES[i]),
            hold: false,
        };
        let enrolled: Result<NodeReply> = retry(deadline, || async {
            crate::ops::request(&client, names::command(names::cmd::ENROLL)?, &enroll, REQUEST_TIMEOUT).await
        })
        .await;
        match enrolled {
            Ok(_) => {}
            Err(e) if format!("{e:#}").contains("already enrolled") => {
                let list: NodeList = retry(deadline, || async {
                    let ls = ListNodes { include_decommissioned: false };
                    crate::ops::request(&client, names::query(names::qry::NODES)?, &ls, REQUEST_TIMEOUT).await
                })
                .await?;
                let state = list.nodes.iter().find(|n| n.name == *node).map(|n| n.state());
                if matches!(state, Some(NodeState::NodeDraining | NodeState::NodeDrained | NodeState::NodeEnrolling)) {
                    let schedule = NodeCommand { name: node.to_string(), reason: String::new() };
                    let _: NodeReply = retry(deadline, || async {
                        let subject = names::command(names::cmd::SCHEDULE)?;
                        crate::ops::request(&client, subject, &schedule, REQUEST_TIMEOUT).await
                    })
                    .await?;
                    say!("note: node {node} was not schedulable from an earlier start; scheduled again");
                }
            }
            Err(e) => return Err(e),
        }
    }
    let services = placement
        .services
        .iter()
        .map(|s| DesiredService {
            service: s.name.clone(),
            replicas: s.replicas,
            memory_max_bytes: s.memory_max.0,
            cpu: s.cpu,
        })
        .collect();
    let desired = SetDesired { services };
    let _: Ack = retry(deadline, || async {
        crate::ops::request(&client, names::command(names::cmd::SET_DESIRED)?, &desired, REQUEST_TIMEOUT).await
    })
    .await?;
    Ok(())
}

/// `f` until it answers (a refusal is an answer) or `deadline`; a request nobody answered yet
/// (the registry's instances still subscribing) is tried again.
async fn retry<T, F, Fut>(deadline: Instant, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if crate::conn::is_retryable(&e) && Instant::now() < deadline => {
                tokio::time::sleep(RETRY_PAUSE).await
            }
            Err(e) => return Err(e),
        }
    }
}

/// The file that asks the supervisor to stop `node` (`cimctl node stop`) while it exists.
fn down_marker(data_dir: &Path, node: &str) -> PathBuf {
    data_dir.join("nodes").join(format!("{node}.down"))
}

/// The file the supervisor writes once everything of `node` has stopped.
fn stopped_marker(data_dir: &Path, node: &str) -> PathBuf {
    data_dir.join("nodes").join(format!("{node}.stopped"))
}

/// The node a process belongs to (`information-unit@n2`: n2); none for the leaf.
fn node_of(p: &Proc) -> Option<&str> {
    p.name.rsplit_once('@').map(|(_, n)| n)
}

/// A node `cimctl node stop` holds down: its instances are stopping, then its nats-server,
/// then it is stopped.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Hold {
    Instances,
    Nats,
    Stopped,
}

/// Waits for Ctrl-C / SIGTERM (None) or for a process with invalid configuration (why). Any
/// other process that exits — a nats-server or an instance killed, crashed, or stopped with
/// SIGTERM after a drain — is started again after [`RESTART_PAUSE`] with the same ports,
/// store and instance id, as systemd does for the NixOS modules (`RestartSec=2s`; there only
/// on failure, and `systemctl restart` is the way to restart a drained instance). Exit 64
/// cannot be fixed by a restart and stops everything. A node that `cimctl node stop` asks
/// for ([`down_marker`]) goes down like a machine shut down — its instances (SIGTERM), then
/// its nats-server — and stays down until `cimctl node start`.
async fn supervise(procs: &mut [Proc], recipes: &[Recipe], data_dir: &Path, stop: &mut StopSignals) -> Option<String> {
    let mut restart_at: Vec<Option<Instant>> = vec![None; procs.len()];
    let mut held: std::collections::BTreeMap<&str, Hold> = Default::default();
    loop {
        tokio::select! {
            _ = stop.recv() => return None,
            _ = tokio::time::sleep(SUPERVISE_POLL) => {
                for node in NODES {
                    let down = down_marker(data_dir, node).exists();
                    match (down, held.get(node).copied()) {
                        (true, None) => {
                            say!("node {node}: stopping, as a machine shut down: its instances, then its nats-server");
                            held.insert(node, Hold::Instances);
                            for p in procs.iter().filter(|p| node_of(p) == Some(node) && p.health.is_some()) {
                                super::signal(&p.child, Signal::SIGTERM);
                            }
                        }
                        (true, Some(Hold::Instances)) => {
                            let mut instances = procs.iter_mut().filter(|p| node_of(p) == Some(node) && p.health.is_some());
                            if instances.all(|p| !matches!(p.child.try_wait(), Ok(None))) {
                                for p in procs.iter().filter(|p| node_of(p) == Some(node) && p.health.is_none()) {
                                    super::signal(&p.child, Signal::SIGTERM);
                                }
                                held.insert(node, Hold::Nats);
                            }
                        }
                        (true, Some(Hold::Nats)) => {
                            let mut all = procs.iter_mut().filter(|p| node_of(p) == Some(node));
                            if all.all(|p| !matches!(p.child.try_wait(), Ok(None))) {
                                if let Err(e) = std::fs::write(stopped_marker(data_dir, node), "") {
                                    return Some(format!("cannot write {}: {e}", stopped_marker(data_dir, node).display()));
                                }
                                say!("node {node} stopped; `cimctl node start {node}` starts it again");
                                held.insert(node, Hold::Stopped);
                            }
                        }
                        (false, Some(_)) => {
                            say!("node {node}: starting again");
                            held.remove(node);
                            // Its nats-server first (procs[..4]), then its instances.
                            for (i, p) in procs.iter_mut().enumerate().filter(|(_, p)| node_of(p) == Some(node)) {
                                if matches!(p.child.try_wait(), Ok(None)) {
                                    continue;
                                }
                                match spawn(&mut recipes[i].command(), &p.log, true) {
                                    Ok(child) => {
                                        p.child = child;
                                        restart_at[i] = None;
                                        say!("{} started again (pid {})", p.name, p.child.id().unwrap_or(0));
                                    }
                                    Err(e) => return Some(format!("cannot start {} again: {e:#}", p.name)),
                                }
                            }
                            let _ = std::fs::remove_file(stopped_marker(data_dir, node));
                        }
                        (true, Some(Hold::Stopped)) | (false, None) => {}
                    }
                }
                for (i, p) in procs.iter_mut().enumerate() {
                    if node_of(p).is_some_and(|n| held.contains_key(n)) {
                        continue;
                    }
                    match restart_at[i] {
                        None => {
                            let Ok(Some(status)) = p.child.try_wait() else { continue };
                            if status.code() == Some(crate::error::EXIT_USAGE.into()) {
                                return Some(format!("{} exited: invalid configuration; see {}", p.name, p.log.display()));
                            }
                            say!("{} exited ({status}); starting it again in {RESTART_PAUSE:?}", p.name);
                            restart_at[i] = Some(Instant::now() + RESTART_PAUSE);
                        }
                        Some(at) if Instant::now() >= at => match spawn(&mut recipes[i].command(), &p.log, true) {
                            Ok(child) => {
                                p.child = child;
                                restart_at[i] = None;
                                say!("{} started again (pid {})", p.name, p.child.id().unwrap_or(0));
                            }
                            Err(e) => return Some(format!("cannot start {} again: {e:#}", p.name)),
                        },
                        Some(_) => {}
                    }
                }
            }
        }
    }
}

/// How long `cimctl node stop|start` waits for `cimctl up --nodes 3` to have done it.
const NODE_STOP_WAIT: Duration = Duration::from_secs(120);
/// How often `cimctl node stop|start` looks.
const NODE_STOP_POLL: Duration = Duration::from_millis(200);

/// `cimctl node stop N` on a local cluster: asks the `cimctl up --nodes 3` running in
/// `data_dir` to stop node N's instances and then its nats-server, as a machine shut down, and
/// waits until it has. `start` undoes it and waits until they have been started again.
pub async fn node_stop_or_start(data_dir: &Path, node: &str, stop: bool) -> Result<()> {
    if !NODES.contains(&node) || !data_dir.join("nats").join(node).join("nats.conf").is_file() {
        return Err(crate::error::Usage(format!(
            "no local cluster node {node} in {}: `node stop|start` works on the cluster `cimctl up --nodes 3` runs \
             there (nodes {}); on real machines, shut the machine down",
            data_dir.display(),
            NODES.join(", ")
        ))
        .into());
    }
    let (down, stopped) = (down_marker(data_dir, node), stopped_marker(data_dir, node));
    if stop {
        std::fs::write(&down, "").with_context(|| format!("writing {}", down.display()))?;
    } else {
        let _ = std::fs::remove_file(&down);
    }
    let deadline = Instant::now() + NODE_STOP_WAIT;
    while stopped.exists() != stop {
        if Instant::now() > deadline {
            bail!(
                "node {node} not {} within {NODE_STOP_WAIT:?}: is `cimctl up --nodes 3 --data-dir {}` running?",
                if stop { "stopped" } else { "started again" },
                data_dir.display()
            );
        }
        tokio::time::sleep(NODE_STOP_POLL).await;
    }
    Ok(())
}

fn summary(
    data_dir: &Path,
    cluster_url: &str,
    leaf_url: &str,
    args: &UpArgs,
    placement: &Path,
    procs: &[Proc],
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "CIM 3-node cluster is up (every node a set of processes on this machine)");
    let _ = writeln!(s, "  data        {}  (logs in {})", data_dir.display(), data_dir.join("logs").display());
    let _ = writeln!(s, "  cluster     {cluster_url}  ({CLUSTER_NAME}, JetStream domain {HUB_DOMAIN}, streams R3)");
    let _ = writeln!(s, "  leaf        {leaf_url}  (JetStream domain {LEAF_DOMAIN}, a leaf node of the cluster)");
    let _ = writeln!(s, "  use it      export CIM_NATS_URL={cluster_url}");
    let _ = writeln!(
        s,
        "  nodes       {} enrolled, each {} memory ({} reserved), {} cpus; placement {}",
        NODES.join(", "),
        human(args.node_memory),
        human(args.node_reserved),
        args.node_cpus,
        placement.display()
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "  {:<4} {:<22} {:>7}  {:<36} log", "node", "process", "pid", "health");
    for p in procs {
        let node = p.name.rsplit_once('@').map_or("-", |(_, n)| n);
        let health = p.health.as_ref().map(|h| format!("http://{h}/readyz")).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            s,
            "  {:<4} {:<22} {:>7}  {:<36} {}",
            node,
            p.name,
            p.child.id().unwrap_or(0),
            health,
            p.log.display()
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "  try         cimctl status");
    let _ = writeln!(s, "              cimctl node drain n2 --wait");
    let _ = writeln!(
        s,
        "              cimctl node schedule n2; kill <pids of n2's instances>   (they start again and take work)"
    );
    let _ = writeln!(s, "              cimctl placement check {}", placement.display());
    let _ =
        writeln!(s, "              kill -9 <pid of nats-server@n2>   (started again after {RESTART_PAUSE:?}, rejoins)");
    let _ = writeln!(
        s,
        "              cimctl node stop n2; cimctl node start n2   (n2 down like a machine shut down, and up)"
    );
    let _ = writeln!(s, "  every process that exits is started again after {RESTART_PAUSE:?}; Ctrl-C stops them all");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ports(base: u16) -> Vec<Ports> {
        (0..4)
            .map(|i| Ports { client: base + i, monitor: base + 10 + i, route: base + 20 + i, leafnode: base + 30 + i })
            .collect()
    }

    #[test]
    fn every_service_runs_scaled_out_services_twice_on_distinct_nodes_and_each_node_holds_four() {
        for c in Component::ALL {
            let (_, on) = LAYOUT.iter().find(|(x, _)| *x == c).expect("every service is laid out");
            let want = if matches!(c, Component::StorageManager | Component::IntegrationHub) { 1 } else { 2 };
            assert_eq!(on.len(), want, "{c}");
            assert!(on.len() < 2 || on[0] != on[1], "{c} twice on one node");
        }
        for node in NODES {
            assert_eq!(LAYOUT.iter().filter(|(_, on)| on.contains(&node)).count(), 4, "{node}");
        }
    }

    #[test]
    fn node_and_leaf_configs_name_routes_domains_and_remotes() {
        let p = ports(4000);
        let n2 = node_config(1, &p[..3], Path::new("/d/js"), "always");
        assert!(n2.contains("server_name: cim-n2") && n2.contains("domain: hub"), "{n2}");
        assert!(n2.contains("routes: [\"nats-route://127.0.0.1:4020\", \"nats-route://127.0.0.1:4022\"]"), "{n2}");
        assert!(n2.contains("listen: 127.0.0.1:4031") && n2.contains("sync_interval: always"), "{n2}");
        let leaf = leaf_config(&p[3], &p[..3], Path::new("/d/leaf"), "1s");
        assert!(leaf.contains("domain: leaf") && leaf.contains("nats-leaf://127.0.0.1:4032"), "{leaf}");
    }
}
