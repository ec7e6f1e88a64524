//! A real S3 server for tests: the disk-backed `s3s-fs` binary on a free port.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use cim_proc::{find_on_path, free_port, http_get};
use tempfile::TempDir;

use crate::process::Proc;
use crate::wait::{Attempt, poll};

/// What to run when `s3s-fs` is missing (later versions need a newer rustc).
pub const S3S_FS_INSTALL: &str = "cargo install s3s-fs --version 0.14.1 --features binary";

/// Credentials every [`S3Server`] accepts (SigV4; any region is accepted).
pub const TEST_ACCESS_KEY: &str = "cimtestaccesskey";
pub const TEST_SECRET_KEY: &str = "cimtestsecretkey0123456789";
pub const TEST_REGION: &str = "us-east-1";

const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// The s3s-fs to run: `$CIM_S3S_FS` if set, else `s3s-fs` on PATH, else
/// `$CARGO_HOME/bin/s3s-fs` (or `~/.cargo/bin`), where `cargo install` puts it.
pub fn s3s_fs_binary() -> Result<PathBuf> {
    static FOUND: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    FOUND.get_or_init(|| find_s3s_fs().map_err(|e| format!("{e:#}"))).clone().map_err(|e| anyhow!(e))
}

fn find_s3s_fs() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("CIM_S3S_FS") {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("CIM_S3S_FS={} is not a file; install s3s-fs with `{S3S_FS_INSTALL}`", path.display());
        }
        return Ok(path);
    }
    if let Some(path) = find_on_path("s3s-fs").into_iter().next() {
        return Ok(path);
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(path) = cargo_home.map(|h| h.join("bin/s3s-fs")).filter(|p| p.is_file()) {
        return Ok(path);
    }
    bail!(
        "s3s-fs was not found (CIM_S3S_FS unset, not on PATH, not in ~/.cargo/bin); install it with `{S3S_FS_INSTALL}`"
    )
}

/// A running `s3s-fs` (path-style S3 over HTTP on 127.0.0.1) storing objects under a
/// temporary root dir (a bucket is a directory). It is ready when `GET /` gets an HTTP
/// answer (403 without a signature). Drop kills it and removes the root.
pub struct S3Server {
    proc: Proc,
    port: u16,
    root: PathBuf,
    _dir: TempDir,
}

impl fmt::Debug for S3Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Server").field("endpoint", &self.endpoint()).field("root", &self.root).finish()
    }
}

impl S3Server {
    pub async fn start() -> Result<Self> {
        let binary = s3s_fs_binary()?;
        let mut attempt = 1;
        loop {
            let server = Self::prepare(binary.clone())?;
            match server.start_and_wait().await {
                Ok(()) => return Ok(server),
                Err(e) if attempt < 3 && format!("{e:#}").to_lowercase().contains("address already in use") => {
                    attempt += 1
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn prepare(binary: PathBuf) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("cim-s3-").tempdir().context("creating temp dir")?;
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let port = free_port();
        let args = vec![
            "--host".to_owned(),
            "127.0.0.1".to_owned(),
            "--port".to_owned(),
            port.to_string(),
            "--access-key".to_owned(),
            TEST_ACCESS_KEY.to_owned(),
            "--secret-key".to_owned(),
            TEST_SECRET_KEY.to_owned(),
            root.display().to_string(),
        ];
        let proc = Proc::new("s3s-fs", binary, args, dir.path().to_owned(), dir.path().join("s3s-fs.log"));
        Ok(Self { proc, port, root, _dir: dir })
    }

    async fn start_and_wait(&self) -> Result<()> {
        self.proc.spawn()?;
        let addr = format!("127.0.0.1:{}", self.port);
        let ready = poll(STARTUP_TIMEOUT, &format!("s3s-fs to answer HTTP on {addr}"), || async {
            if let Some(status) = self.proc.exited() {
                return Attempt::Fail(anyhow!("s3s-fs exited with {status}"));
            }
            match http_get(&addr, "/").await {
                Ok(_) => Attempt::Done(()),
                Err(e) => Attempt::Retry(e),
            }
        })
        .await;
        ready.map_err(|e| {
            self.proc.kill();
            anyhow!(
                "s3s-fs did not become ready: {e:#}\n--- last lines of {} ---\n{}",
                self.proc.log_path().display(),
                self.proc.log_tail(40)
            )
        })
    }

    /// `http://127.0.0.1:PORT`; use path-style addressing.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn access_key(&self) -> &str {
        TEST_ACCESS_KEY
    }

    pub fn secret_key(&self) -> &str {
        TEST_SECRET_KEY
    }

    pub fn region(&self) -> &str {
        TEST_REGION
    }

    /// The data dir: one subdirectory per bucket.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn log_path(&self) -> &Path {
        self.proc.log_path()
    }

    pub fn log_tail(&self, n: usize) -> String {
        self.proc.log_tail(n)
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    pub fn is_running(&self) -> bool {
        self.proc.is_running()
    }

    /// SIGKILL and wait.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// SIGTERM and wait (SIGKILL after 15 s).
    pub fn stop(&mut self) {
        self.proc.stop();
    }

    /// Stops it if running and starts it again on the same port with the same root.
    pub async fn restart(&mut self) -> Result<()> {
        self.proc.stop();
        self.start_and_wait().await
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.proc.kill();
    }
}
