//! Helpers the benchmarks share: start a service binary that sits next to `cim-bench`, wait
//! for a condition with a deadline, and quantiles of latency samples.

use std::{future::Future, time::Duration};

use anyhow::{Context, Result};

/// Starts the binary `name` that sits next to cim-bench (a release or debug build of the
/// workspace), its output in a temporary log file; killed when the child is dropped.
pub(crate) fn spawn_sibling(name: &str, args: &[&str]) -> Result<(tokio::process::Child, tempfile::NamedTempFile)> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().context("cim-bench has no directory")?.join(name);
    if !bin.is_file() {
        anyhow::bail!("{} is missing: build it with `cargo build --release --workspace --bins`", bin.display());
    }
    let log = tempfile::Builder::new().prefix(&format!("cim-bench-{name}-")).suffix(".log").tempfile()?;
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
