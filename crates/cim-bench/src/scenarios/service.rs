//! Pieces the information-unit scenarios share: the service as a real child process, generated
//! content that is never held in memory, and resident-memory readings from `/proc`.

use std::{
    path::PathBuf,
    pin::Pin,
    process::Stdio,
    task::{Context as TaskContext, Poll},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use cim_iu_client::IuClient;
use tokio::{
    io::{AsyncRead, ReadBuf},
    process::{Child, Command},
};

/// Name of the service binary, next to `cim-bench`.
const BINARY: &str = "information-unit";
/// How long the service may take to start answering `cim.qry.iu.status`.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// The `information-unit` binary beside this executable.
pub(super) fn binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the cim-bench executable")?;
    let dir = exe.parent().context("the cim-bench executable has no directory")?;
    let path = dir.join(BINARY);
    if !path.is_file() {
        bail!(
            "{} is missing: the information-unit scenarios run the real service binary next to cim-bench; \
             build it with `cargo build --release --workspace --bins` (`cargo xtask bench` does), \
             or run `cim-bench envelope`",
            path.display()
        );
    }
    Ok(path)
}

/// The information-unit service running as a child process; SIGKILLed when dropped.
pub(super) struct IuService {
    child: Child,
    log: tempfile::NamedTempFile,
}

impl IuService {
    /// Starts the service against `nats_url` and waits until `cim.qry.iu.status` answers.
    pub(super) async fn start(nats_url: &str) -> Result<(IuService, IuClient)> {
        let log = tempfile::Builder::new().prefix("cim-bench-iu-").suffix(".log").tempfile()?;
        let child = Command::new(binary()?)
            .args(["--nats-url", nats_url, "--http-listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(log.reopen()?)
            .stderr(log.reopen()?)
            .kill_on_drop(true)
            .spawn()
            .context("starting the information-unit service")?;
        let mut svc = IuService { child, log };
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(nats_url)
            .await
            .with_context(|| format!("connecting to {nats_url}"))?;
        let iu = IuClient::new(client);
        svc.wait_ready(&iu).await?;
        Ok((svc, iu))
    }

    async fn wait_ready(&mut self, iu: &IuClient) -> Result<()> {
        // Single short attempts, so the deadline and an early exit are noticed promptly.
        let probe = iu.clone().timeout(Duration::from_secs(1)).retry_delays(Vec::new());
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the information-unit service exited with {status} while starting; its log:\n{}",
                    self.log_tail()
                );
            }
            match probe.status().await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    bail!(
                        "the information-unit service did not answer within {START_DEADLINE:?} ({e}); its log:\n{}",
                        self.log_tail()
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    pub(super) fn pid(&self) -> Result<i32> {
        self.child.id().map(|p| p as i32).context("the information-unit service has exited")
    }

    /// The last lines of the service's output.
    pub(super) fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log.path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Kills the service and waits for it (also done, without waiting, on drop).
    pub(super) async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// Peak resident set size (`VmHWM`) of process `pid` (`"self"` for this one), in KiB.
pub(super) fn vm_hwm_kib(pid: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{path} has no VmHWM line"))
}

/// Resets this process's peak resident set size to its current size (`clear_refs` 5,
/// Linux ≥ 4.0). False when the kernel refuses; the peak then counts from the process start.
pub(super) fn reset_own_hwm() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// `size` pseudo-random bytes (xorshift64 from `seed`), generated as they are read and never
/// held in memory; different seeds give different content (so different CIDs).
pub(super) struct Generated {
    left: u64,
    state: u64,
}

impl Generated {
    pub(super) fn new(size: u64, seed: u64) -> Generated {
        // Any non-zero state works for xorshift; mix the seed so that nearby seeds differ at once.
        let state = (seed.wrapping_add(1)).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        Generated { left: size, state }
    }
}

impl AsyncRead for Generated {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = (buf.remaining() as u64).min(self.left) as usize;
        let dst = buf.initialize_unfilled_to(n);
        let mut state = self.state;
        for chunk in dst.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        self.state = state;
        buf.advance(n);
        self.left -= n as u64;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn generated_content_has_its_size_and_depends_on_the_seed() {
        let mut a = Vec::new();
        Generated::new(100_003, 1).read_to_end(&mut a).await.unwrap();
        let mut b = Vec::new();
        Generated::new(100_003, 2).read_to_end(&mut b).await.unwrap();
        let mut a2 = Vec::new();
        Generated::new(100_003, 1).read_to_end(&mut a2).await.unwrap();
        assert_eq!(a.len(), 100_003);
        assert_eq!(a, a2);
        assert_ne!(a, b);
        assert!(a.iter().filter(|&&x| x == 0).count() < 2_000, "not mostly zeros");
    }

    #[test]
    fn own_peak_memory_is_readable() {
        assert!(vm_hwm_kib("self").unwrap() > 0);
    }
}
