//! `cimctl`: the CIM command line. `up` runs a whole leaf node on this machine; `bench` runs
//! the project's benchmarks against a raw baseline measured in the same run.

mod bench;
mod iu;
mod up;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "cimctl", version, about = "The Composable Information Machine command line")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start a leaf node here: nats-server with JetStream and all seven services. Ctrl-C stops it.
    Up(up::UpArgs),
    /// Run the benchmarks and print a Markdown table (each scenario beside its raw baseline).
    Bench(bench::BenchArgs),
    /// Information units: put, get, ls, show, history, tag, untag, link, unlink, rm, type
    Iu(iu::IuArgs),
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
            eprintln!("cimctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Up(args) => up::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Iu(args) => iu::run(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cimctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
