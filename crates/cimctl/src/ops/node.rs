//! `cimctl node enroll|schedule|drain|decommission|ls`: the nodes the registry places services
//! on, and their lifecycle.

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use cim_events::{
    proto::registry::{EnrollNode, ListNodes, Node, NodeCommand, NodeList, NodeReply, NodeState},
    registry as names,
};
use cim_placement::{self as placement, human, names::state_name};
use serde_json::json;

use super::{Conn, Table, node_json, print, request};

/// How long `node drain --wait` waits for the node to be drained.
const DRAIN_WAIT: Duration = Duration::from_secs(300);
/// How often `node drain --wait` asks.
const DRAIN_POLL: Duration = Duration::from_millis(200);

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
        /// The node's name.
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
    Schedule {
        /// The node's name.
        name: String,
    },
    /// Drain a node: its services stop taking new work, finish what they hold, and report drained.
    Drain {
        /// The node's name.
        name: String,
        /// Why, recorded with the node's state.
        #[arg(long)]
        reason: Option<String>,
        /// Wait until the node is drained.
        #[arg(long)]
        wait: bool,
    },
    /// Decommission a drained node (refused while anything stateful remains on it).
    Decommission {
        /// The node's name.
        name: String,
    },
    /// Local cluster (`cimctl up --nodes 3`) only: stop node N's instances, then its
    /// nats-server, as a machine shut down; they stay down until `node start N`.
    Stop {
        /// The node's name (n1, n2 or n3).
        name: String,
        /// The data directory of the `cimctl up --nodes 3` running the cluster.
        #[arg(long, env = "CIM_DATA_DIR", default_value = ".cim")]
        data_dir: std::path::PathBuf,
    },
    /// Local cluster (`cimctl up --nodes 3`) only: start node N's nats-server and instances again.
    Start {
        /// The node's name (n1, n2 or n3).
        name: String,
        /// The data directory of the `cimctl up --nodes 3` running the cluster.
        #[arg(long, env = "CIM_DATA_DIR", default_value = ".cim")]
        data_dir: std::path::PathBuf,
    },
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
    // Local: the registry is not asked (and the node's nats-server may be the one going down).
    if let NodeCommandCli::Stop { name, data_dir } | NodeCommandCli::Start { name, data_dir } = &args.command {
        let stop = matches!(args.command, NodeCommandCli::Stop { .. });
        crate::up::node_stop_or_start(data_dir, name, stop).await?;
        let what = if stop { "stopped (its instances, then its nats-server)" } else { "started again" };
        print(conn.json, json!({"node": name, "stopped": stop}), format!("node {name}: {what}\n"));
        return Ok(ExitCode::SUCCESS);
    }
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
                let deadline = Instant::now() + DRAIN_WAIT;
                loop {
                    let list: NodeList = request(
                        &client,
                        names::query(names::qry::NODES)?,
                        &ListNodes { include_decommissioned: true },
                        t,
                    )
                    .await?;
                    let now = list.nodes.into_iter().find(|x| x.name == name).unwrap_or_default();
                    if now.state() == NodeState::NodeDrained {
                        break now;
                    }
                    if Instant::now() > deadline {
                        bail!(
                            "node {name} is still {} after {DRAIN_WAIT:?}: an instance on it holds work \
                             (see `cimctl status`)",
                            state_name(now.state())
                        );
                    }
                    tokio::time::sleep(DRAIN_POLL).await;
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
        NodeCommandCli::Stop { .. } | NodeCommandCli::Start { .. } => unreachable!("answered above, before connecting"),
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
