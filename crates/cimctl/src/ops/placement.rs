//! `cimctl placement check|apply`: does a placement file's set of services fit on its nodes,
//! and make it the registry's desired state.

use std::{fmt::Write as _, path::PathBuf, process::ExitCode};

use anyhow::{Result, bail};
use cim_events::{
    proto::registry::{DesiredService, SetDesired},
    registry as names,
};
use cim_placement::{self as placement, PlacementFile, human};
use serde_json::json;

use super::{Conn, Table, print, request};
use crate::error::Usage;

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
        /// Placement file (JSON): nodes and services.
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
            let f = read_placement(&file).map_err(Usage)?;
            let r = placement::check(&f, propose);
            print(json, serde_json::to_value(&r)?, placement_text(&r));
            Ok(if r.fits { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        PlacementCommand::Apply { file, conn } => {
            let f = read_placement(&file).map_err(Usage)?;
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
