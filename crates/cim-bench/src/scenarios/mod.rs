//! The table scenarios (`cim-bench envelope|iu-create|iu-content|iu-memory|iu-rebuild`, all of
//! them in `cim-bench all`): each is measured beside its raw baseline in the same run, on a
//! fresh nats-server, in alternating rounds; the Markdown table reports medians and the ratio.
//!
//! Scenarios:
//! - `envelope`: publishing an event through the cim-events envelope vs a raw JetStream publish;
//! - `iu-create`: creating small units through the information-unit service vs a raw publish
//!   of the same encoded event;
//! - `iu-content`: content upload and download through `cim-iu-client` vs the raw object store;
//! - `iu-memory`: peak resident memory of the service (and of this client) moving 1 GiB;
//! - `iu-rebuild`: projection rebuild rate vs a raw ordered consumer reading the stream.
//!
//! The information-unit scenarios run the real `information-unit` binary (found next to
//! `cim-bench`) as a child process against their own nats-server, and remove everything they
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

/// Options of the table scenarios; each scenario reads those named after it.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Rounds; each round measures baseline and CIM once, alternating. Medians are reported.
    #[arg(long, default_value_t = 3)]
    pub(crate) rounds: usize,
    /// envelope: messages published per measurement.
    #[arg(long, default_value_t = 20_000)]
    pub(crate) messages: usize,
    /// envelope: payload size in bytes (the protobuf body; the raw baseline publishes the same bytes).
    #[arg(long, default_value_t = 256)]
    pub(crate) payload: usize,
    /// envelope: publishes awaiting their ack at once in the pipelined scenario.
    #[arg(long, default_value_t = 256)]
    pub(crate) window: usize,
    /// iu-create: units created per measurement.
    #[arg(long, default_value_t = 3_000)]
    pub(crate) iu_units: usize,
    /// iu-create: concurrent create requests (and the raw baseline's publish window).
    #[arg(long, default_value_t = 32)]
    pub(crate) iu_concurrency: usize,
    /// iu-content: MiB moved per measurement (upload and download each).
    #[arg(long, default_value_t = 256)]
    pub(crate) content_mib: u64,
    /// iu-memory: MiB uploaded and downloaded while the peak resident memory is watched.
    #[arg(long, default_value_t = 1024)]
    pub(crate) memory_mib: u64,
    /// iu-rebuild: events in the stream the projection is rebuilt from.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) rebuild_events: u64,
    /// iu-rebuild: units created through the service; the other events tag them.
    #[arg(long, default_value_t = 1_000)]
    pub(crate) rebuild_units: usize,
    /// Also write the Markdown table to this file.
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    Envelope,
    IuCreate,
    IuContent,
    IuMemory,
    IuRebuild,
}

impl Scenario {
    pub const EACH: [Scenario; 5] =
        [Scenario::Envelope, Scenario::IuCreate, Scenario::IuContent, Scenario::IuMemory, Scenario::IuRebuild];

    fn name(self) -> &'static str {
        match self {
            Scenario::Envelope => "envelope",
            Scenario::IuCreate => "iu-create",
            Scenario::IuContent => "iu-content",
            Scenario::IuMemory => "iu-memory",
            Scenario::IuRebuild => "iu-rebuild",
        }
    }
}

/// The scenarios chosen, each once, in the canonical order.
fn selected(chosen: &[Scenario]) -> Vec<Scenario> {
    Scenario::EACH.into_iter().filter(|s| chosen.contains(s)).collect()
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

/// Runs the `chosen` scenarios and prints their table (also to `--out`).
pub async fn run(chosen: &[Scenario], args: &BenchArgs) -> Result<std::process::ExitCode> {
    anyhow::ensure!(
        args.messages > 0 && args.rounds > 0 && args.window > 0 && args.iu_units > 0 && args.iu_concurrency > 0,
        "--messages, --rounds, --window, --iu-units and --iu-concurrency must be positive"
    );
    anyhow::ensure!(args.content_mib > 0 && args.memory_mib > 0, "--content-mib and --memory-mib must be positive");
    anyhow::ensure!(
        args.rebuild_units > 0 && args.rebuild_events > args.rebuild_units as u64,
        "--rebuild-events must exceed --rebuild-units (> 0)"
    );
    let scenarios = selected(chosen);
    // Before anything starts: a missing service binary is an error now, not after minutes.
    if scenarios.iter().any(|s| *s != Scenario::Envelope) {
        service::binary()?;
    }
    let version = cim_testkit::nats_server_version(&cim_testkit::nats_server_binary()?)?;

    let mut outcomes = Vec::new();
    for scenario in scenarios {
        eprintln!("cim-bench: {} ...", scenario.name());
        let started = Instant::now();
        // Ctrl-C ends the scenario through its destructors: child processes killed, temporary
        // stores removed.
        let outcome = tokio::select! {
            o = run_one(scenario, args) => o.with_context(|| format!("scenario {}", scenario.name()))?,
            _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
        };
        eprintln!("cim-bench: {} done in {:.0?}", scenario.name(), started.elapsed());
        outcomes.push(outcome);
    }

    let table = render(&outcomes, args, version);
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
    fn chosen_scenarios_run_once_in_order() {
        assert_eq!(selected(&Scenario::EACH).len(), Scenario::EACH.len());
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
