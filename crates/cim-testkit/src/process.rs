//! Child processes that log to a file, die with the test, and are killed on drop.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// How long `stop()` waits after SIGTERM before it falls back to SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// One server process, restartable with the same command line.
///
/// stdout and stderr go to `log_path` (appended across restarts, with a marker line per
/// start), so a failed start can show what the server said.
pub(crate) struct Proc {
    label: String,
    program: PathBuf,
    args: Vec<String>,
    cwd: PathBuf,
    log_path: PathBuf,
    child: Mutex<Option<Child>>,
}

impl Proc {
    pub(crate) fn new(
        label: impl Into<String>,
        program: PathBuf,
        args: Vec<String>,
        cwd: PathBuf,
        log_path: PathBuf,
    ) -> Self {
        Self { label: label.into(), program, args, cwd, log_path, child: Mutex::new(None) }
    }

    pub(crate) fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Starts the process; an already running one is killed first.
    pub(crate) fn spawn(&self) -> Result<()> {
        self.kill();
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening log file {}", self.log_path.display()))?;
        writeln!(log, "--- cim-testkit: starting {} {} ---", self.program.display(), self.args.join(" "))?;
        let stderr: File = log.try_clone()?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .current_dir(&self.cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr));
        die_with_parent(&mut cmd);
        let child = cmd.spawn().with_context(|| format!("spawning {} ({})", self.label, self.program.display()))?;
        *self.lock() = Some(child);
        Ok(())
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.lock().as_ref().map(Child::id)
    }

    /// The exit status if the process was started and has exited since (it is reaped).
    pub(crate) fn exited(&self) -> Option<ExitStatus> {
        let mut guard = self.lock();
        let child = guard.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                *guard = None;
                Some(status)
            }
            Ok(None) => None,
            Err(_) => None,
        }
    }

    pub(crate) fn is_running(&self) -> bool {
        let mut guard = self.lock();
        match guard.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                *guard = None;
                false
            }
            None => false,
        }
    }

    /// SIGKILL and reap. A no-op when not running.
    pub(crate) fn kill(&self) {
        if let Some(mut child) = self.lock().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, wait up to [`STOP_GRACE`] for the exit, then SIGKILL. Blocks the thread.
    pub(crate) fn stop(&self) {
        let Some(mut child) = self.lock().take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        // Not yet reaped, so the pid still names our child.
        if sigterm(child.id()).is_err() {
            let _ = child.kill();
            let _ = child.wait();
            return;
        }
        let deadline = Instant::now() + STOP_GRACE;
        let mut pause = Duration::from_millis(5);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
            }
        }
    }

    /// The last `n` lines of the log, for error messages.
    pub(crate) fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log_path, n)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(crate) fn log_tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(cannot read log {}: {e})", path.display()),
    }
}

/// The kernel SIGKILLs the child when the spawning thread exits, so a killed or panicking
/// test leaves no servers behind.
fn die_with_parent(cmd: &mut Command) {
    cim_proc::die_with_parent(cmd, libc::SIGKILL);
}

#[allow(unsafe_code)]
fn sigterm(pid: u32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: kill(2) has no memory-safety preconditions. The caller passes the pid of a
    // child it has not reaped yet, so the pid cannot have been reused by another process.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}
