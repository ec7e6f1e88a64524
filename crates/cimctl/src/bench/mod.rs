//! `cimctl bench`: each scenario is measured beside its raw baseline in the same run, on a
//! fresh nats-server, in alternating rounds; the table reports medians and the ratio.
//!
//! Scenarios (`--scenario`, default `all`):
//! - `envelope`: publishing an event through the cim-events envelope vs a raw JetStream publish;
//! - `iu-create`: creating small units through the information-unit service vs a raw publish
//!   of the same encoded event;
//! - `iu-content`: content upload and download through `cim-iu-client` vs the raw object store;
//! - `iu-memory`: peak resident memory of the service (and of this client) moving 1 GiB;
//! - `iu-rebuild`: projection rebuild rate vs a raw ordered consumer reading the stream.
//!
//! The information-unit scenarios run the real `information-unit` binary (found next to this
//! executable) as a child process against their own nats-server, and remove everything they
//! created when they end; every wait has a deadline.

mod envelope;
mod iu_content;
mod iu_create;
mod iu_memory;
mod iu_rebuild;
mod service;

use std::{
    fmt::Write as _,
    future::Future,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Scenarios to run (comma-separated or repeated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "all")]
    scenario: Vec<Scenario>,
    /// Rounds; each round measures baseline and CIM once, alternating. Medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// envelope: messages published per measurement.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// envelope: payload size in bytes (the protobuf body; the raw baseline publishes the same bytes).
    #[arg(long, default_value_t = 256)]
    payload: usize,
    /// envelope: publishes awaiting their ack at once in the pipelined scenario.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// iu-create: units created per measurement.
    #[arg(long, default_value_t = 3_000)]
    iu_units: usize,
    /// iu-create: concurrent create requests (and the raw baseline's publish window).
    #[arg(long, default_value_t = 32)]
    iu_concurrency: usize,
    /// iu-content: MiB moved per measurement (upload and download each).
    #[arg(long, default_value_t = 256)]
    content_mib: u64,
    /// iu-memory: MiB uploaded and downloaded while the peak resident memory is watched.
    #[arg(long, default_value_t = 1024)]
    memory_mib: u64,
    /// iu-rebuild: events in the stream the projection is rebuilt from.
    #[arg(long, default_value_t = 100_000)]
    rebuild_events: u64,
    /// iu-rebuild: units created through the service; the other events tag them.
    #[arg(long, default_value_t = 1_000)]
    rebuild_units: usize,
    /// Also write the Markdown table to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    All,
    Envelope,
    IuCreate,
    IuContent,
    IuMemory,
    IuRebuild,
}

impl Scenario {
    const EACH: [Scenario; 5] =
        [Scenario::Envelope, Scenario::IuCreate, Scenario::IuContent, Scenario::IuMemory, Scenario::IuRebuild];

    fn name(self) -> &'static str {
        match self {
            Scenario::All => "all",
            Scenario::Envelope => "envelope",
            Scenario::IuCreate => "iu-create",
            Scenario::IuContent => "iu-content",
            Scenario::IuMemory => "iu-memory",
            Scenario::IuRebuild => "iu-rebuild",
        }
    }
}

/// The scenarios selected, each once, in the canonical order.
fn selected(chosen: &[Scenario]) -> Vec<Scenario> {
    Scenario::EACH.into_iter().filter(|s| chosen.contains(&Scenario::All) || chosen.contains(s)).collect()
}

/// One line of the table.
pub(crate) struct Row {
    pub scenario: String,
    pub baseline: String,
    /// `None`: an absolute figure, no baseline to compare with (memory).
    pub baseline_value: Option<f64>,
    pub value: f64,
    pub unit: &'static str,
    /// Show `value / baseline_value`.
    pub ratio: bool,
    pub aim: &'static str,
}

/// What a scenario reports: its rows and a sentence on how it was measured.
pub(crate) struct Outcome {
    pub rows: Vec<Row>,
    pub note: String,
}

pub async fn run(args: BenchArgs) -> Result<std::process::ExitCode> {
    anyhow::ensure!(
        args.messages > 0 && args.rounds > 0 && args.window > 0 && args.iu_units > 0 && args.iu_concurrency > 0,
        "--messages, --rounds, --window, --iu-units and --iu-concurrency must be positive"
    );
    anyhow::ensure!(args.content_mib > 0 && args.memory_mib > 0, "--content-mib and --memory-mib must be positive");
    anyhow::ensure!(
        args.rebuild_units > 0 && args.rebuild_events > args.rebuild_units as u64,
        "--rebuild-events must exceed --rebuild-units (> 0)"
    );
    let scenarios = selected(&args.scenario);
    // Before anything starts: a missing service binary is an error now, not after minutes.
    if scenarios.iter().any(|s| *s != Scenario::Envelope) {
        service::binary()?;
    }
    let version = cim_testkit::nats_server_version(&cim_testkit::nats_server_binary()?)?;

    let mut outcomes = Vec::new();
    for scenario in scenarios {
        eprintln!("cimctl bench: {} ...", scenario.name());
        let started = Instant::now();
        // Ctrl-C ends the scenario through its destructors: child processes killed, temporary
        // stores removed.
        let outcome = tokio::select! {
            o = run_one(scenario, &args) => o.with_context(|| format!("scenario {}", scenario.name()))?,
            _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
        };
        eprintln!("cimctl bench: {} done in {:.0?}", scenario.name(), started.elapsed());
        outcomes.push(outcome);
    }

    let table = render(&outcomes, &args, version);
    println!("{table}");
    if let Some(out) = &args.out {
        std::fs::write(out, &table).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(std::process::ExitCode::SUCCESS)
}

async fn run_one(scenario: Scenario, args: &BenchArgs) -> Result<Outcome> {
    match scenario {
        Scenario::Envelope => envelope::run(args).await,
        Scenario::IuCreate => iu_create::run(args).await,
        Scenario::IuContent => iu_content::run(args).await,
        Scenario::IuMemory => iu_memory::run(args).await,
        Scenario::IuRebuild => iu_rebuild::run(args).await,
        Scenario::All => unreachable!("expanded by selected()"),
    }
}

/// Runs `f` with a deadline; a measurement that stalls fails the benchmark instead of hanging it.
pub(crate) async fn within<T>(limit: Duration, what: &str, f: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(limit, f).await.map_err(|_| anyhow::anyhow!("{what}: no result within {limit:?}"))?
}

/// Runs `a` and `b` once each, `a` first on even rounds and `b` first on odd ones, so drift on
/// this shared machine hits both alike.
pub(crate) async fn alternate<A, B, FA, FB>(round: usize, a: A, b: B) -> Result<(f64, f64)>
where
    A: FnOnce() -> FA,
    B: FnOnce() -> FB,
    FA: Future<Output = Result<f64>>,
    FB: Future<Output = Result<f64>>,
{
    if round.is_multiple_of(2) {
        let x = a().await?;
        Ok((x, b().await?))
    } else {
        let y = b().await?;
        Ok((a().await?, y))
    }
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Bytes per second in MB/s (10^6 bytes).
pub(crate) fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

/// `1234567.8` → `1,234,568`; below 100, one decimal.
fn number(v: f64) -> String {
    if v.abs() < 100.0 {
        return format!("{v:.1}");
    }
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0.0 { format!("-{out}") } else { out }
}

fn render(outcomes: &[Outcome], args: &BenchArgs, version: (u32, u32, u32)) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "| scenario | baseline | baseline | CIM | CIM / baseline | aim |");
    let _ = writeln!(s, "| --- | --- | ---: | ---: | ---: | --- |");
    for r in outcomes.iter().flat_map(|o| &o.rows) {
        let baseline = r.baseline_value.map(|b| format!("{} {}", number(b), r.unit)).unwrap_or_else(|| "—".into());
        let ratio = match r.baseline_value {
            Some(b) if r.ratio && b > 0.0 => format!("{:.2}", r.value / b),
            _ => "—".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} {} | {} | {} |",
            r.scenario,
            r.baseline,
            baseline,
            number(r.value),
            r.unit,
            ratio,
            r.aim
        );
    }
    let _ = writeln!(
        s,
        "\nMedian of {} alternating rounds; one nats-server {}.{}.{} (file store, default sync) per scenario on this machine.",
        args.rounds, version.0, version.1, version.2
    );
    for o in outcomes {
        let _ = writeln!(s, "- {}", o.note);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0]), 4.0);
    }

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(number(1_234_567.8), "1,234,568");
        assert_eq!(number(123.0), "123");
        assert_eq!(number(12.34), "12.3");
        assert_eq!(number(-4_000.0), "-4,000");
    }

    #[test]
    fn all_selects_every_scenario_once() {
        assert_eq!(selected(&[Scenario::All]).len(), Scenario::EACH.len());
        assert_eq!(
            selected(&[Scenario::IuRebuild, Scenario::Envelope, Scenario::IuRebuild]),
            vec![Scenario::Envelope, Scenario::IuRebuild]
        );
    }

    #[tokio::test]
    async fn alternate_swaps_the_order() {
        let order = std::sync::Mutex::new(Vec::new());
        for round in 0..2 {
            let (a, b) = alternate(
                round,
                || async {
                    order.lock().unwrap().push('a');
                    Ok(1.0)
                },
                || async {
                    order.lock().unwrap().push('b');
                    Ok(2.0)
                },
            )
            .await
            .unwrap();
            assert_eq!((a, b), (1.0, 2.0));
        }
        assert_eq!(*order.lock().unwrap(), vec!['a', 'b', 'b', 'a']);
    }

    #[tokio::test]
    async fn within_fails_instead_of_hanging() {
        let e = within(Duration::from_millis(10), "sleeping", async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(())
        })
        .await
        .unwrap_err();
        assert!(e.to_string().contains("sleeping"), "{e}");
    }
}

/// Starts the binary `name` that sits next to cimctl (a release or debug build of the
/// workspace), its output in a temporary log file; killed when the child is dropped.
pub(crate) fn spawn_sibling(name: &str, args: &[&str]) -> Result<(tokio::process::Child, tempfile::NamedTempFile)> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().context("cimctl has no directory")?.join(name);
    if !bin.is_file() {
        anyhow::bail!("{} is missing: build it with `cargo build --release --workspace --bins`", bin.display());
    }
    let log = tempfile::Builder::new().prefix(&format!("cimctl-bench-{name}-")).suffix(".log").tempfile()?;
    let child = tokio::process::Command::new(bin)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(log.reopen()?)
        .stderr(log.reopen()?)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok((child, log))
}

/// Polls `f` every 50 ms until it holds; an error naming `what` after 60 s.
pub(crate) async fn until<F, Fut>(what: &str, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !f().await {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("{what} within 60s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The `q` quantile (0..=1) of `v` (sorted in place); NaN for no samples.
pub(crate) fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * q).round() as usize]
}
