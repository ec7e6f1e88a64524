//! `cim-bench`: the project's benchmarks, each measured beside a raw baseline in the same run
//! on this machine (see docs/benchmarks.md). A developer tool, not shipped: it starts its own
//! nats-server (and S3 server) through `cim-testkit` and runs the real service binaries that
//! sit next to it (`cargo xtask bench [SCENARIO]` builds them in release mode and runs it).
//!
//! `cim-bench` (or `cim-bench all`) runs every scenario with its default parameters;
//! `cim-bench SCENARIO [options]` runs one.

mod gateway;
mod hub;
mod pipeline;
mod plugin;
mod registry;
mod scenarios;
mod storage;
mod support;

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use scenarios::{BenchArgs, Scenario};

#[derive(Parser, Debug)]
#[command(
    name = "cim-bench",
    version,
    about = "CIM benchmarks: each scenario beside its raw baseline, on this machine"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Every scenario below with its default parameters (the default).
    All(AllArgs),
    /// Publishing an event through the cim-events envelope vs a raw JetStream publish.
    Envelope(BenchArgs),
    /// Creating small units through the information-unit service vs a raw publish of the same event.
    IuCreate(BenchArgs),
    /// Content upload and download through cim-iu-client vs the raw object store.
    IuContent(BenchArgs),
    /// Peak resident memory of the information-unit service (and of this client) moving 1 GiB.
    IuMemory(BenchArgs),
    /// Projection rebuild rate vs a raw ordered consumer reading the stream.
    IuRebuild(BenchArgs),
    /// The registry with 1,000 simulated instances, and `cimctl status` on a 3-node cluster.
    Registry(registry::RegistryArgs),
    /// Plugin invocation against a raw NATS round trip.
    Plugin(plugin::PluginArgs),
    /// The integration hub: outbound deliveries and inbound webhooks vs raw baselines.
    Hub(hub::HubArgs),
    /// The S3 archive and restore against raw PutObject and raw JetStream publish.
    Storage(storage::StorageArgs),
    /// The ui-gateway: HTTP vs direct NATS, download vs raw object store, SSE fan-out.
    Gateway(gateway::GatewayArgs),
    /// The pipeline engine: trigger → completed latency vs raw round trips, runs/s with 1 and 2 engines.
    Pipeline(pipeline::PipelineArgs),
}

#[derive(Args, Debug, Default)]
struct AllArgs {
    /// Also write the table of the envelope and information-unit scenarios to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// `A` with every option at its default, as `cim-bench <scenario>` with no options has it.
fn defaults<A: Args>() -> A {
    #[derive(Parser)]
    struct Only<A: Args> {
        #[command(flatten)]
        args: A,
    }
    Only::<A>::parse_from(["cim-bench"]).args
}

/// Runs every scenario in turn; the exit code is the first failure's, if any.
async fn all(args: AllArgs) -> Result<ExitCode> {
    let mut table = defaults::<BenchArgs>();
    table.out = args.out;
    let codes = [
        scenarios::run(&Scenario::EACH, &table).await?,
        registry::run(defaults()).await?,
        plugin::run(defaults()).await?,
        hub::run(defaults()).await?,
        storage::run(defaults()).await?,
        gateway::run(defaults()).await?,
        pipeline::run(defaults()).await?,
    ];
    Ok(codes.into_iter().find(|c| *c != ExitCode::SUCCESS).unwrap_or(ExitCode::SUCCESS))
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            let code = if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) { 0 } else { 64 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cim-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command.unwrap_or(Command::All(AllArgs::default())) {
            Command::All(args) => all(args).await,
            Command::Envelope(args) => scenarios::run(&[Scenario::Envelope], &args).await,
            Command::IuCreate(args) => scenarios::run(&[Scenario::IuCreate], &args).await,
            Command::IuContent(args) => scenarios::run(&[Scenario::IuContent], &args).await,
            Command::IuMemory(args) => scenarios::run(&[Scenario::IuMemory], &args).await,
            Command::IuRebuild(args) => scenarios::run(&[Scenario::IuRebuild], &args).await,
            Command::Registry(args) => registry::run(args).await,
            Command::Plugin(args) => plugin::run(args).await,
            Command::Hub(args) => hub::run(args).await,
            Command::Storage(args) => storage::run(args).await,
            Command::Gateway(args) => gateway::run(args).await,
            Command::Pipeline(args) => pipeline::run(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cim-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let table = defaults::<BenchArgs>();
        assert_eq!((table.rounds, table.messages, table.payload), (3, 20_000, 256));
        assert!(table.out.is_none());
        let parsed = Cli::try_parse_from(["cim-bench", "envelope", "--messages", "10", "--rounds", "1"]).unwrap();
        assert!(matches!(parsed.command, Some(Command::Envelope(a)) if a.messages == 10 && a.rounds == 1));
        assert!(Cli::try_parse_from(["cim-bench", "bogus"]).is_err());
    }
}
