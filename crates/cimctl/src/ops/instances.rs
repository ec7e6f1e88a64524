//! `cimctl registry ls|find`: the running instances the registry knows, by service, node or
//! capability.

use std::{collections::BTreeSet, fmt::Write as _, process::ExitCode};

use anyhow::Result;
use cim_events::{
    proto::registry::{InstanceList, ListInstances},
    registry as names,
};
use cim_placement::names::instance_state_name;
use serde_json::json;

use super::{Conn, Table, ago, instance_json, print, request};

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
        /// The capability, e.g. units.
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
