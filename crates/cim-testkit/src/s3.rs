//! Real S3 servers for tests, on a free port: the disk-backed `s3s-fs` (Rust, s3s) and, as a
//! second, unrelated implementation, moto's server mode (Python, in memory).

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

/// What to run when moto's server is missing.
pub const MOTO_INSTALL: &str = "pip install 'moto[server]'";

/// Which S3 implementation an [`S3Server`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum S3Kind {
    /// `s3s-fs`: objects are files under [`S3Server::root`]; checks SigV4 signatures.
    S3sFs,
    /// moto's server mode (`moto_server`, or `python3 -m moto.server`): objects in memory
    /// (a restart loses them); accepts any credentials.
    Moto,
}

impl fmt::Display for S3Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            S3Kind::S3sFs => "s3s-fs",
            S3Kind::Moto => "moto",
        })
    }
}

/// How to start moto: `$CIM_MOTO_SERVER` (a program) if set, else `moto_server` on PATH or
/// in `~/.local/bin`, else `python3 -m moto.server` when python3 can import it.
pub fn moto_server_command() -> Result<(PathBuf, Vec<String>)> {
    static FOUND: OnceLock<std::result::Result<(PathBuf, Vec<String>), String>> = OnceLock::new();
    FOUND.get_or_init(|| find_moto().map_err(|e| format!("{e:#}"))).clone().map_err(|e| anyhow!(e))
}

fn find_moto() -> Result<(PathBuf, Vec<String>)> {
    if let Some(path) = std::env::var_os("CIM_MOTO_SERVER") {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("CIM_MOTO_SERVER={} is not a file; install moto with `{MOTO_INSTALL}`", path.display());
        }
        return Ok((path, Vec::new()));
    }
    if let Some(path) = find_on_path("moto_server").into_iter().next() {
        return Ok((path, Vec::new()));
    }
    if let Some(path) =
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/bin/moto_server")).filter(|p| p.is_file())
    {
        return Ok((path, Vec::new()));
    }
    if let Some(python) = find_on_path("python3").into_iter().next() {
        let ok = std::process::Command::new(&python)
            .args(["-c", "import moto.server, flask"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok((python, vec!["-m".into(), "moto.server".into()]));
        }
    }
    bail!(
        "moto's S3 server was not found (CIM_MOTO_SERVER unset, no moto_server on PATH, python3 cannot import moto.server); install it with `{MOTO_INSTALL}`"
    )
}

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

/// A running S3 server (path-style S3 over HTTP on 127.0.0.1): `s3s-fs` storing objects
/// under a temporary root dir (a bucket is a directory), or moto (see [`S3Kind`]). It is
/// ready when `GET /` gets an HTTP answer. Drop kills it and removes the root.
pub struct S3Server {
    kind: S3Kind,
    proc: Proc,
    port: u16,
    root: PathBuf,
    _dir: TempDir,
}

impl fmt::Debug for S3Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Server")
            .field("kind", &self.kind)
            .field("endpoint", &self.endpoint())
            .field("root", &self.root)
            .finish()
    }
}

impl S3Server {
    /// Starts `s3s-fs`.
    pub async fn start() -> Result<Self> {
        Self::start_kind(S3Kind::S3sFs).await
    }

    /// Starts moto's S3 server.
    pub async fn start_moto() -> Result<Self> {
        Self::start_kind(S3Kind::Moto).await
    }

    pub async fn start_kind(kind: S3Kind) -> Result<Self> {
        let (program, pre_args) = match kind {
            S3Kind::S3sFs => (s3s_fs_binary()?, Vec::new()),
            S3Kind::Moto => moto_server_command()?,
        };
        let mut attempt = 1;
        loop {
            let server = Self::prepare(kind, program.clone(), pre_args.clone())?;
            match server.start_and_wait().await {
                Ok(()) => return Ok(server),
                Err(e) if attempt < 3 && format!("{e:#}").to_lowercase().contains("address already in use") => {
                    attempt += 1
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn prepare(kind: S3Kind, program: PathBuf, mut args: Vec<String>) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("cim-s3-").tempdir().context("creating temp dir")?;
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let port = free_port();
        if kind == S3Kind::Moto {
            args.extend(["-H".to_owned(), "127.0.0.1".to_owned(), "-p".to_owned(), port.to_string()]);
            let proc = Proc::new("moto", program, args, dir.path().to_owned(), dir.path().join("moto.log"));
            return Ok(Self { kind, proc, port, root, _dir: dir });
        }
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
        let proc = Proc::new("s3s-fs", program, args, dir.path().to_owned(), dir.path().join("s3s-fs.log"));
        Ok(Self { kind, proc, port, root, _dir: dir })
    }

    async fn start_and_wait(&self) -> Result<()> {
        self.proc.spawn()?;
        let addr = format!("127.0.0.1:{}", self.port);
        let kind = self.kind;
        let ready = poll(STARTUP_TIMEOUT, &format!("{kind} to answer HTTP on {addr}"), || async {
            if let Some(status) = self.proc.exited() {
                return Attempt::Fail(anyhow!("{kind} exited with {status}"));
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
                "{kind} did not become ready: {e:#}\n--- last lines of {} ---\n{}",
                self.proc.log_path().display(),
                self.proc.log_tail(40)
            )
        })
    }

    pub fn kind(&self) -> S3Kind {
        self.kind
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

    /// The data dir of `s3s-fs`: one subdirectory per bucket (moto keeps objects in memory
    /// and leaves it empty).
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

    /// Stops it if running and starts it again on the same port with the same root (moto
    /// starts empty).
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
