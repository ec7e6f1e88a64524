//! `cimctl`: the CIM command line. `up` runs a whole leaf node on this machine; the other
//! commands operate one (the benchmarks are `cim-bench`, `cargo xtask bench`).

mod archive;
mod conn;
mod deploy;
mod error;
mod help;
mod integration;
mod iu;
mod ops;
mod pipeline;
mod plugin;
mod token;
mod up;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "cimctl", version, about = "The Composable Information Machine command line")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Rebuild a fresh JetStream from an S3 archive target (`--from NAME [--until SEQ|TIME] [--dry-run]`).
    Restore(archive::RestoreArgs),
    /// The S3 archive: `verify` every checksum, `status` (lag per stream and target).
    Archive(archive::ArchiveArgs),
    /// Start a leaf node here: nats-server with JetStream and all seven services. Ctrl-C stops it.
    Up(up::UpArgs),
    /// Information units: put, get, ls, show, history, tag, untag, link, unlink, rm, type
    Iu(iu::IuArgs),
    /// Plugins: push, ls, invoke, rm
    Plugin(plugin::PluginArgs),
    /// Pipelines: apply FILE, ls, show, rm, start [--watch]
    Pipeline(pipeline::PipelineArgs),
    /// Pipeline runs: ls, show [--watch], cancel, retry
    Run(pipeline::RunArgs),
    /// Deployment artefacts derived from the contract, e.g. `deploy nats-permissions --json`.
    Deploy(deploy::DeployArgs),
    /// What is desired, what runs, where work is routed, stream health, and why anything is not converging.
    Status(ops::StatusArgs),
    /// Capacity: does a placement fit (`check FILE [--propose]`), make it the desired state (`apply FILE`).
    Placement(ops::PlacementArgs),
    /// Nodes: enroll, schedule, drain, decommission, ls; stop, start (the local `up --nodes 3` cluster).
    Node(ops::NodeArgs),
    /// The component registry: ls, find --capability X.
    Registry(ops::RegistryArgs),
    /// API tokens of the ui-gateway: create, revoke, ls.
    Token(token::TokenArgs),
    /// Integration hub: list, add, pause, resume, deliveries.
    Integration(integration::IntegrationArgs),
}

/// Exit status when stdout was closed under us: 128 + SIGPIPE, what a shell reports for a tool
/// that SIGPIPE ended.
const EXIT_CLOSED_STDOUT: i32 = 141;

/// A closed stdout (`cimctl archive status | head -1`) ends cimctl quietly, as SIGPIPE ends
/// other tools: Rust ignores SIGPIPE, so `println!` panics on the broken pipe; that panic
/// exits with 141 and no message. Every other panic is reported as usual. (SIGPIPE itself
/// stays ignored: a NATS or S3 connection closed by its peer must be an error, not death.)
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let p = info.payload();
        let msg = p.downcast_ref::<String>().map(String::as_str).or_else(|| p.downcast_ref::<&str>().copied());
        let msg = msg.map(str::to_string).unwrap_or_else(|| info.to_string());
        if msg.contains("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(EXIT_CLOSED_STDOUT);
        }
        default(info)
    }));
}

fn main() -> ExitCode {
    quiet_on_closed_stdout();
    let parsed = help::grouped(Cli::command()).try_get_matches().and_then(|m| Cli::from_arg_matches(&m));
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) => return ExitCode::from(error::report_clap(&e)),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cimctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Restore(args) => archive::restore(args).await,
            Command::Archive(args) => archive::run(args).await,
            Command::Up(args) => up::run(args).await,
            Command::Iu(args) => iu::run(args).await,
            Command::Plugin(args) => plugin::run(args).await,
            Command::Pipeline(args) => pipeline::pipeline(args).await,
            Command::Run(args) => pipeline::run(args).await,
            Command::Deploy(args) => deploy::run(args).await,
            Command::Status(args) => ops::status(args).await,
            Command::Placement(args) => ops::placement(args).await,
            Command::Node(args) => ops::node(args).await,
            Command::Registry(args) => ops::registry(args).await,
            Command::Token(args) => token::run(args).await,
            Command::Integration(args) => integration::run(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cimctl: {}", error::one_line(&e));
            ExitCode::from(error::exit_code(&e))
        }
    }
}
