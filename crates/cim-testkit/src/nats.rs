//! One real `nats-server` process (JetStream, loopback, generated config), and how to find
//! a new enough binary.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tempfile::TempDir;

use cim_proc::{HttpResponse, free_port, http_get, nats_server_binary};

use crate::process::Proc;
use crate::wait::{Attempt, poll};

/// How long a start or restart may take before it fails with the server's log.
pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

const LOG_TAIL_LINES: usize = 40;
const START_ATTEMPTS: usize = 3;

/// Client options suited to tests: fast reconnects (at most 250 ms apart) so a restarted
/// server is picked up quickly, and a bounded connect timeout.
pub fn test_connect_options() -> async_nats::ConnectOptions {
    async_nats::ConnectOptions::new()
        .name("cim-testkit")
        .connection_timeout(Duration::from_secs(5))
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis(10u64.saturating_mul(1 << attempts.min(5))).min(Duration::from_millis(250))
        })
}

#[derive(Clone, Debug)]
pub(crate) struct ClusterSpec {
    pub(crate) name: String,
    pub(crate) port: u16,
    pub(crate) routes: Vec<String>,
}

/// Options for [`NatsServer`]; every server gets JetStream, loopback-only listeners and
/// HTTP monitoring on a free port.
#[derive(Clone, Debug)]
pub struct NatsServerBuilder {
    server_name: Option<String>,
    port: Option<u16>,
    jetstream_domain: Option<String>,
    extra_config: String,
    store_dir: Option<PathBuf>,
    leaf_remotes: Vec<String>,
    leaf_listen: Option<Option<u16>>,
    leaf_no_advertise: bool,
    cluster: Option<ClusterSpec>,
    startup_timeout: Duration,
}

impl Default for NatsServerBuilder {
    fn default() -> Self {
        Self {
            server_name: None,
            port: None,
            jetstream_domain: None,
            extra_config: String::new(),
            store_dir: None,
            leaf_remotes: Vec::new(),
            leaf_listen: None,
            leaf_no_advertise: false,
            cluster: None,
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
        }
    }
}

impl NatsServerBuilder {
    /// `server_name` (default `cim-<port>`); must be unique within a cluster.
    pub fn server_name(mut self, name: &str) -> Self {
        self.server_name = Some(name.to_owned());
        self
    }

    /// Client port; default a free random one.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// `jetstream { domain: ... }`.
    pub fn jetstream_domain(mut self, domain: &str) -> Self {
        self.jetstream_domain = Some(domain.to_owned());
        self
    }

    /// Raw nats-server config text appended after the generated config (later keys win for
    /// plain values; do not repeat a block the builder already writes).
    pub fn extra_config(mut self, text: &str) -> Self {
        self.extra_config.push_str(text);
        self.extra_config.push('\n');
        self
    }

    /// Operator mode: trust `operator` and preload its system account and every account it
    /// has made so far (see [`Operator::server_config`](crate::Operator::server_config)).
    /// Clients then need a user's credentials ([`User::connect`](crate::User::connect));
    /// [`NatsServer::connect`] without them is refused.
    pub fn operator(self, operator: &crate::Operator) -> Self {
        self.extra_config(&operator.server_config())
    }

    /// A caller-owned JetStream store dir (kept on drop); default a dir in the server's temp dir.
    pub fn store_dir(mut self, dir: PathBuf) -> Self {
        self.store_dir = Some(dir);
        self
    }

    /// Makes this server a leaf node of the hub at `url` (`nats-leaf://host:leafport`).
    /// Several calls add failover URLs to the same remote.
    pub fn leaf_remote(mut self, url: impl Into<String>) -> Self {
        self.leaf_remotes.push(url.into());
        self
    }

    /// [`leaf_remote`](Self::leaf_remote) for several URLs of the same hub.
    pub fn leaf_remotes<I, S>(mut self, urls: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.leaf_remotes.extend(urls.into_iter().map(Into::into));
        self
    }

    /// Accept leaf node connections (`leafnodes { listen }`) on a free port.
    pub fn leaf_listen(mut self) -> Self {
        self.leaf_listen = Some(None);
        self
    }

    /// Do not tell leaves the other cluster members' leaf ports (`leafnodes { no_advertise }`):
    /// a leaf then reaches the cluster only through the URLs it was given (a partition test
    /// cuts those).
    pub fn leaf_no_advertise(mut self) -> Self {
        self.leaf_no_advertise = true;
        self
    }

    /// Accept leaf node connections on this port.
    pub fn leaf_listen_port(mut self, port: u16) -> Self {
        self.leaf_listen = Some(Some(port));
        self
    }

    /// Makes the server a cluster member: `cluster { name, listen: 127.0.0.1:port, routes }`.
    /// Route URLs look like `nats-route://127.0.0.1:<cluster port>`; listing the server's own
    /// route is harmless.
    pub fn cluster(mut self, name: &str, port: u16, routes: Vec<String>) -> Self {
        self.cluster = Some(ClusterSpec { name: name.to_owned(), port, routes });
        self
    }

    /// How long start and restart may take (default [`DEFAULT_STARTUP_TIMEOUT`]).
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// Starts the server and waits until it is ready (see [`NatsServer`]).
    ///
    /// Ports the builder picked itself are picked again if the server reports "address
    /// already in use" (another process took a free port first).
    pub async fn start(self) -> Result<NatsServer> {
        let binary = nats_server_binary()?;
        let mut attempt = 1;
        loop {
            let dir = tempfile::Builder::new().prefix("cim-nats-").tempdir().context("creating temp dir")?;
            let server = NatsServer::prepare(self.clone(), binary.clone(), dir)?;
            match server.start_and_wait().await {
                Ok(()) => return Ok(server),
                Err(e) if attempt < START_ATTEMPTS && is_addr_in_use(&e) => attempt += 1,
                Err(e) => return Err(e),
            }
        }
    }
}

pub(crate) fn is_addr_in_use(e: &anyhow::Error) -> bool {
    format!("{e:#}").contains("address already in use")
}

/// A running `nats-server` child process with JetStream, listening on 127.0.0.1 only.
///
/// It is started from a generated config file (`-c`), logs to a file in its temp dir, and
/// is ready when a TCP connect works, `GET /healthz?js-enabled-only=true` on the monitoring
/// port answers 200 and, for a leaf node, `/leafz` shows a leaf connection. Drop kills it
/// (SIGKILL) and removes the temp dir; it also dies if the thread that started it exits
/// (`PR_SET_PDEATHSIG`), so do not start servers from a short-lived thread or share one
/// between tests through a static.
pub struct NatsServer {
    // Declared before `dir` so the process dies before its files are removed.
    proc: Proc,
    opts: NatsServerBuilder,
    name: String,
    port: u16,
    monitor_port: u16,
    leaf_port: Option<u16>,
    store_dir: PathBuf,
    config_path: PathBuf,
    _dir: TempDir,
}

impl fmt::Debug for NatsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsServer")
            .field("name", &self.name)
            .field("url", &self.url())
            .field("monitor_port", &self.monitor_port)
            .field("leaf_port", &self.leaf_port)
            .field("store_dir", &self.store_dir)
            .field("pid", &self.pid())
            .finish()
    }
}

impl NatsServer {
    /// A single JetStream server on a free port with a temporary store.
    pub async fn start() -> Result<Self> {
        Self::builder().start().await
    }

    pub fn builder() -> NatsServerBuilder {
        NatsServerBuilder::default()
    }

    /// Picks the ports, writes the config file; does not spawn.
    fn prepare(opts: NatsServerBuilder, binary: PathBuf, dir: TempDir) -> Result<Self> {
        let port = opts.port.unwrap_or_else(free_port);
        let monitor_port = free_port();
        let leaf_port = opts.leaf_listen.map(|p| p.unwrap_or_else(free_port));
        let name = opts.server_name.clone().unwrap_or_else(|| format!("cim-{port}"));
        let store_dir = match &opts.store_dir {
            Some(d) => d.clone(),
            None => dir.path().join("store"),
        };
        std::fs::create_dir_all(&store_dir).with_context(|| format!("creating {}", store_dir.display()))?;
        let config_path = dir.path().join("nats-server.conf");
        let config = render_config(&opts, &name, port, monitor_port, leaf_port, &store_dir);
        std::fs::write(&config_path, config).with_context(|| format!("writing {}", config_path.display()))?;
        let proc = Proc::new(
            format!("nats-server {name}"),
            binary,
            vec!["-c".to_owned(), config_path.display().to_string()],
            dir.path().to_owned(),
            dir.path().join("nats-server.log"),
        );
        Ok(Self { proc, opts, name, port, monitor_port, leaf_port, store_dir, config_path, _dir: dir })
    }

    async fn start_and_wait(&self) -> Result<()> {
        self.proc.spawn()?;
        match self.wait_ready(self.opts.startup_timeout).await {
            Ok(()) => Ok(()),
            Err(e) => {
                self.proc.kill();
                Err(e)
            }
        }
    }

    async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let leaf = !self.opts.leaf_remotes.is_empty();
        let what = if leaf {
            format!("nats-server {} to accept clients, report JetStream healthy and connect its leaf remote", self.name)
        } else {
            format!("nats-server {} to accept clients and report JetStream healthy", self.name)
        };
        poll(timeout, &what, || async {
            if let Some(status) = self.proc.exited() {
                return Attempt::Fail(anyhow!("nats-server exited with {status}"));
            }
            if let Err(e) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await {
                return Attempt::Retry(anyhow!("client port {}: {e}", self.port));
            }
            match self.monitor_get("/healthz?js-enabled-only=true").await {
                Ok(r) if r.status == 200 => {}
                Ok(r) => return Attempt::Retry(anyhow!("/healthz answered {}: {}", r.status, r.text())),
                Err(e) => return Attempt::Retry(e),
            }
            if leaf {
                match self.leaf_connections().await {
                    Ok(n) if n > 0 => {}
                    Ok(_) => return Attempt::Retry(anyhow!("/leafz shows no leaf connection yet")),
                    Err(e) => return Attempt::Retry(e),
                }
            }
            Attempt::Done(())
        })
        .await
        .map_err(|e| {
            let tail = self.proc.log_tail(LOG_TAIL_LINES);
            let config = std::fs::read_to_string(&self.config_path).unwrap_or_default();
            anyhow!(
                "nats-server {} did not become ready: {e:#}\n--- last lines of {} ---\n{tail}\n--- {} ---\n{config}",
                self.name,
                self.proc.log_path().display(),
                self.config_path.display(),
            )
        })
    }

    /// `nats://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The HTTP monitoring port (`/varz`, `/jsz`, `/healthz`, `/leafz`, ...).
    pub fn monitor_port(&self) -> u16 {
        self.monitor_port
    }

    /// `http://127.0.0.1:MONITOR_PORT`
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
    }

    /// The port accepting leaf node connections, if [`NatsServerBuilder::leaf_listen`] was set.
    pub fn leaf_port(&self) -> Option<u16> {
        self.leaf_port
    }

    /// `nats-leaf://127.0.0.1:LEAF_PORT`, the form a leaf's `remotes` takes.
    pub fn leaf_url(&self) -> Option<String> {
        self.leaf_port.map(|p| format!("nats-leaf://127.0.0.1:{p}"))
    }

    pub fn server_name(&self) -> &str {
        &self.name
    }

    pub fn jetstream_domain(&self) -> Option<&str> {
        self.opts.jetstream_domain.as_deref()
    }

    /// The JetStream store dir (nats-server keeps its data in `<store_dir>/jetstream`).
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The server's combined stdout/stderr, appended across restarts.
    pub fn log_path(&self) -> &Path {
        self.proc.log_path()
    }

    /// The last `n` lines of the server log.
    pub fn log_tail(&self, n: usize) -> String {
        self.proc.log_tail(n)
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    pub fn is_running(&self) -> bool {
        self.proc.is_running()
    }

    /// Connects a client with [`test_connect_options`]; panics if that fails.
    pub async fn connect(&self) -> async_nats::Client {
        self.try_connect().await.unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub async fn try_connect(&self) -> Result<async_nats::Client> {
        test_connect_options()
            .connect(self.url())
            .await
            .with_context(|| format!("connecting to nats-server {} at {}", self.name, self.url()))
    }

    /// SIGKILL and wait: a crash. The store keeps whatever was flushed.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// SIGTERM and wait (SIGKILL after 15 s): a graceful shutdown. Blocks the thread.
    pub fn stop(&mut self) {
        self.proc.stop();
    }

    /// Stops the server if running (gracefully) and starts it again with the same ports,
    /// config and store; waits until it is ready.
    pub async fn restart(&mut self) -> Result<()> {
        self.proc.stop();
        self.start_and_wait().await
    }

    /// `GET path` on the monitoring port.
    pub async fn monitor_get(&self, path: &str) -> Result<HttpResponse> {
        http_get(&format!("127.0.0.1:{}", self.monitor_port), path).await
    }

    /// `GET path` on the monitoring port, which must answer 200 with JSON.
    pub async fn monitor_json(&self, path: &str) -> Result<serde_json::Value> {
        let r = self.monitor_get(path).await?;
        if r.status != 200 {
            bail!("GET {path} on {} answered {}: {}", self.name, r.status, r.text());
        }
        serde_json::from_slice(&r.body).with_context(|| format!("GET {path} on {}: not JSON", self.name))
    }

    /// How many leaf node connections `/leafz` shows (in either direction).
    pub async fn leaf_connections(&self) -> Result<u64> {
        let v = self.monitor_json("/leafz").await?;
        Ok(v["leafnodes"].as_u64().unwrap_or(0))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.proc.kill();
    }
}

fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}

fn render_config(
    opts: &NatsServerBuilder,
    name: &str,
    port: u16,
    monitor_port: u16,
    leaf_port: Option<u16>,
    store_dir: &Path,
) -> String {
    let mut c = String::from("# Generated by cim-testkit.\n");
    c += &format!("server_name: {}\n", quote(name));
    c += &format!("listen: \"127.0.0.1:{port}\"\n");
    c += &format!("http: \"127.0.0.1:{monitor_port}\"\n");
    c += "jetstream {\n";
    c += &format!("  store_dir: {}\n", quote(&store_dir.display().to_string()));
    if let Some(domain) = &opts.jetstream_domain {
        c += &format!("  domain: {}\n", quote(domain));
    }
    c += "}\n";
    if let Some(cluster) = &opts.cluster {
        let routes: Vec<String> = cluster.routes.iter().map(|r| quote(r)).collect();
        c += "cluster {\n";
        c += &format!("  name: {}\n", quote(&cluster.name));
        c += &format!("  listen: \"127.0.0.1:{}\"\n", cluster.port);
        c += &format!("  routes: [{}]\n", routes.join(", "));
        c += "}\n";
    }
    if leaf_port.is_some() || !opts.leaf_remotes.is_empty() {
        c += "leafnodes {\n";
        if let Some(p) = leaf_port {
            c += &format!("  listen: \"127.0.0.1:{p}\"\n");
            if opts.leaf_no_advertise {
                c += "  no_advertise: true\n";
            }
        }
        if !opts.leaf_remotes.is_empty() {
            let urls: Vec<String> = opts.leaf_remotes.iter().map(|u| quote(u)).collect();
            // Retry the hub quickly: tests restart hubs and wait for the leaf to come back.
            c += "  reconnect: \"250ms\"\n";
            c += &format!("  remotes: [ {{ urls: [{}] }} ]\n", urls.join(", "));
        }
        c += "}\n";
    }
    if !opts.extra_config.is_empty() {
        c += "# extra_config\n";
        c += &opts.extra_config;
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_leaf_and_cluster_blocks() {
        let opts = NatsServerBuilder::default()
            .jetstream_domain("hub")
            .cluster("c", 7000, vec!["nats-route://127.0.0.1:7000".into()])
            .leaf_remote("nats-leaf://127.0.0.1:7100");
        let c = render_config(&opts, "n1", 4222, 8222, Some(7200), Path::new("/tmp/s"));
        assert!(c.contains("domain: \"hub\""), "{c}");
        assert!(c.contains("routes: [\"nats-route://127.0.0.1:7000\"]"), "{c}");
        assert!(c.contains("listen: \"127.0.0.1:7200\""), "{c}");
        assert!(c.contains("remotes: [ { urls: [\"nats-leaf://127.0.0.1:7100\"] } ]"), "{c}");
    }
}
