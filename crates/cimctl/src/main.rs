//! `cimctl`: the CIM command line. `up` runs a whole leaf node on this machine; `bench` runs
//! the project's benchmarks against a raw baseline measured in the same run.

mod archive;
mod bench;
mod bench_gateway;
mod bench_hub;
mod bench_pipeline;
mod bench_plugin;
mod bench_registry;
mod bench_storage;
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
    /// Benchmark the S3 archive and restore against raw PutObject and raw JetStream publish (own servers).
    BenchStorage(bench_storage::BenchStorageArgs),
    /// Start a leaf node here: nats-server with JetStream and all seven services. Ctrl-C stops it.
    Up(up::UpArgs),
    /// Run the benchmarks and print a Markdown table (each scenario beside its raw baseline).
    Bench(bench::BenchArgs),
    /// Information units: put, get, ls, show, history, tag, untag, link, unlink, rm, type
    Iu(iu::IuArgs),
    /// Plugins: push, ls, invoke, rm
    Plugin(plugin::PluginArgs),
    /// Pipelines: apply FILE, ls, show, rm, start [--watch]
    Pipeline(pipeline::PipelineArgs),
    /// Pipeline runs: ls, show [--watch], cancel, retry
    Run(pipeline::RunArgs),
    /// Benchmark the pipeline engine: trigger → completed latency vs raw round trips, runs/s with 1 and 2 engines.
    BenchPipeline(bench_pipeline::BenchPipelineArgs),
    /// Benchmark plugin invocation against a raw NATS round trip (starts its own nats-server and plugin-host).
    BenchPlugin(bench_plugin::BenchPluginArgs),
    /// Deployment artefacts derived from the contract, e.g. `deploy nats-permissions --json`.
    Deploy(deploy::DeployArgs),
    /// What is desired, what runs, where work is routed, stream health, and why anything is not converging.
    Status(ops::StatusArgs),
    /// Capacity: does a placement fit (`check FILE [--propose]`), make it the desired state (`apply FILE`).
    Placement(ops::PlacementArgs),
    /// Nodes: enroll, schedule, drain, decommission, ls.
    Node(ops::NodeArgs),
    /// The component registry: ls, find --capability X.
    Registry(ops::RegistryArgs),
    /// Benchmark the registry with 1,000 simulated instances, and `status` on a 3-node cluster.
    BenchRegistry(bench_registry::BenchRegistryArgs),
    /// Benchmark the ui-gateway: HTTP vs direct NATS, download vs raw object store, SSE fan-out.
    BenchGateway(bench_gateway::BenchGatewayArgs),
    /// API tokens of the ui-gateway: create, revoke, ls.
    Token(token::TokenArgs),
    /// Integration hub: list, add, pause, resume, deliveries.
    Integration(integration::IntegrationArgs),
    /// Benchmark the integration hub: outbound deliveries and inbound webhooks vs raw baselines.
    BenchHub(bench_hub::BenchHubArgs),
}

fn main() -> ExitCode {
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
            Command::BenchStorage(args) => bench_storage::run(args).await,
            Command::Up(args) => up::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Iu(args) => iu::run(args).await,
            Command::Plugin(args) => plugin::run(args).await,
            Command::Pipeline(args) => pipeline::pipeline(args).await,
            Command::Run(args) => pipeline::run(args).await,
            Command::BenchPlugin(args) => bench_plugin::run(args).await,
            Command::BenchPipeline(args) => bench_pipeline::run(args).await,
            Command::Deploy(args) => deploy::run(args).await,
            Command::Status(args) => ops::status(args).await,
            Command::Placement(args) => ops::placement(args).await,
            Command::Node(args) => ops::node(args).await,
            Command::Registry(args) => ops::registry(args).await,
            Command::BenchRegistry(args) => bench_registry::run(args).await,
            Command::Token(args) => token::run(args).await,
            Command::Integration(args) => integration::run(args).await,
            Command::BenchHub(args) => bench_hub::run(args).await,
            Command::BenchGateway(args) => bench_gateway::run(args).await,
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
