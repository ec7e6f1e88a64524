//! `cimctl up`: a whole leaf node on this machine — nats-server with JetStream in a data
//! directory and all seven services — supervised until Ctrl-C, then stopped in order
//! (services drain first, NATS last). `cimctl up --nodes 3` starts the 3-node cluster with a
//! leaf attached instead (`up/cluster.rs`), with the same ports, processes and supervision.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use cim_events::Component;
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::process::{Child, Command};

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Directory for NATS data, generated configuration and logs.
    #[arg(long, env = "CIM_DATA_DIR", default_value = ".cim")]
    data_dir: PathBuf,

    /// Client port of the leaf's nats-server. If it is taken, a free port is used instead
    /// (and printed). 0 always picks a free port.
    #[arg(long, env = "CIM_UP_NATS_PORT", default_value_t = 4222)]
    nats_port: u16,

    /// JetStream fsync policy: `always` (every write is on disk before it is acknowledged) or
    /// an interval such as `1s` or `2m` (faster, but a power loss can lose acknowledged writes).
    #[arg(long, env = "CIM_UP_SYNC", default_value = "always")]
    sync: String,

    /// Directory with the service binaries. Default: cimctl's own directory, then PATH.
    #[arg(long, env = "CIM_BIN_DIR")]
    bin_dir: Option<PathBuf>,

    /// How long to wait for NATS and every service to become ready, in seconds.
    #[arg(long, default_value_t = 120)]
    ready_timeout: u64,

    /// 1: a leaf node. 3: a local 3-node cluster (nats-servers n1..n3 clustered, JetStream domain
    /// `hub`, streams R3), a leaf attached to it (domain `leaf`), the nodes enrolled, and two
    /// instances of every service that scales out and one of the others spread over the nodes.
    #[arg(long, default_value_t = 1, value_parser = parse_nodes)]
    nodes: u8,

    /// With --nodes 3: the memory each node is enrolled with.
    #[arg(long, value_parser = cim_placement::parse_size, default_value = "4GiB")]
    node_memory: u64,

    /// With --nodes 3: the memory of each node reserved for the OS and nats-server.
    #[arg(long, value_parser = cim_placement::parse_size, default_value = "1GiB")]
    node_reserved: u64,

    /// With --nodes 3: the CPUs each node is enrolled with.
    #[arg(long, default_value_t = 2.0)]
    node_cpus: f64,
}

fn parse_nodes(s: &str) -> std::result::Result<u8, String> {
    match s {
        "1" => Ok(1),
        "3" => Ok(3),
        _ => Err(format!("{s:?}: 1 (a leaf node) or 3 (a 3-node cluster with a leaf)")),
    }
}

/// Prints a line to stdout, ignoring a closed stdout: `cimctl up | tee up.log` whose `tee` died
/// with the Ctrl-C must still stop every service in order, not end the supervisor mid-way.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

mod cluster;

pub use cluster::node_stop_or_start;

struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    health: Option<String>,
}

pub async fn run(args: UpArgs) -> Result<ExitCode> {
    if !valid_sync(&args.sync) {
        let why = format!("invalid --sync {:?}: use `always` or an interval such as 1s, 500ms, 2m", args.sync);
        return Err(crate::error::Usage(why).into());
    }
    if args.nodes == 3 {
        return cluster::run(args).await;
    }
    let nats_bin = cim_proc::nats_server_binary()?;
    let binaries = find_service_binaries(args.bin_dir.as_deref())?;

    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating data directory {}", args.data_dir.display()))?;
    let data_dir = args.data_dir.canonicalize()?;
    let logs = data_dir.join("logs");
    let store = data_dir.join("nats").join("jetstream");
    std::fs::create_dir_all(&logs)?;
    std::fs::create_dir_all(&store)?;

    // Every port is reserved for cimctl's lifetime (cim_proc::reserve_port): two `cimctl up`
    // started at the same instant never pick the same one. `ports` holds the reservations.
    let mut ports = Vec::new();
    let nats_port = pick_port(args.nats_port, &mut ports)?;
    let monitor_port = pick_port(8222, &mut ports)?;
    let conf = data_dir.join("nats").join("nats.conf");
    std::fs::write(&conf, nats_config(nats_port, monitor_port, &store, &args.sync))?;
    check_config(&nats_bin, &conf).await?;
    let nats_url = format!("nats://127.0.0.1:{nats_port}");
    std::fs::write(data_dir.join("nats.url"), &nats_url)?;

    let mut procs = Vec::new();
    let nats_log = logs.join("nats-server.log");
    let child = spawn(Command::new(&nats_bin).arg("-c").arg(&conf), &nats_log, false)
        .with_context(|| format!("starting {}", nats_bin.display()))?;
    procs.push(Proc { name: "nats-server".into(), child, log: nats_log, health: None });

    let deadline = Instant::now() + Duration::from_secs(args.ready_timeout);
    let monitor = format!("127.0.0.1:{monitor_port}");
    if let Err(e) = wait_healthy(&mut procs, &monitor, "/healthz?js-enabled-only=true", deadline).await {
        stop_all(&mut procs).await;
        return Err(e);
    }

    // The gateway's public ports: the usual ones when free, else any (printed below).
    let gateway = format!("127.0.0.1:{}", pick_port(8480, &mut ports)?);
    let gateway_grpc = format!("127.0.0.1:{}", pick_port(8481, &mut ports)?);
    for (component, bin) in &binaries {
        let name = component.service_name();
        let port = pick_port(0, &mut ports)?;
        let log = logs.join(format!("{name}.log"));
        let mut cmd = Command::new(bin);
        cmd.env("CIM_NATS_URL", &nats_url)
            .env("CIM_TIER", "leaf")
            .env("CIM_HTTP_LISTEN", format!("127.0.0.1:{port}"))
            .env_remove("CIM_NATS_CREDS")
            .env_remove("CIM_JS_DOMAIN")
            .env_remove("CIM_INSTANCE_ID");
        if *component == Component::UiGateway {
            cmd.env("CIM_GATEWAY_LISTEN", &gateway).env("CIM_GATEWAY_GRPC_LISTEN", &gateway_grpc);
        }
        let child = spawn(&mut cmd, &log, false).with_context(|| format!("starting {}", bin.display()))?;
        procs.push(Proc { name: name.to_string(), child, log, health: Some(format!("127.0.0.1:{port}")) });
    }
    for i in 1..procs.len() {
        let addr = procs[i].health.clone().unwrap_or_default();
        if let Err(e) = wait_healthy(&mut procs, &addr, "/readyz", deadline).await {
            stop_all(&mut procs).await;
            return Err(e.context(format!("{} did not become ready; see {}", procs[i].name, procs[i].log.display())));
        }
    }

    // Ctrl-C is ours from here on: an operator (or a test) may press it the moment the line
    // below appears.
    let mut stop = match StopSignals::install() {
        Ok(s) => s,
        Err(e) => {
            stop_all(&mut procs).await;
            return Err(e);
        }
    };
    say!("{}", summary(&data_dir, &nats_url, &monitor, &procs));
    say!("  web UI and HTTP API  http://{gateway}/   (gRPC {gateway_grpc})");
    say!("{}", first_token(&nats_url, &gateway));
    say!("Press Ctrl-C to stop.");

    let outcome = supervise(&mut procs, &mut stop).await;
    say!("stopping: services first, then NATS");
    stop_all(&mut procs).await;
    match outcome {
        None => {
            say!("CIM leaf node stopped");
            Ok(ExitCode::SUCCESS)
        }
        Some(msg) => {
            eprintln!("cimctl: {msg}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn valid_sync(s: &str) -> bool {
    if s == "always" {
        return true;
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    n.parse::<u64>().is_ok_and(|n| n > 0) && matches!(unit, "ms" | "s" | "m" | "h")
}

/// The leaf's nats-server configuration, with the durability choice explained where an
/// operator will read it.
fn nats_config(port: u16, monitor_port: u16, store: &Path, sync: &str) -> String {
    let mut c = String::new();
    let _ = writeln!(c, "# Written by `cimctl up` for a CIM leaf node. Regenerated on every start.");
    let _ = writeln!(c, "server_name: cim-leaf");
    let _ = writeln!(c, "listen: 127.0.0.1:{port}");
    let _ = writeln!(c, "http: 127.0.0.1:{monitor_port}");
    let _ = writeln!(c, "jetstream {{");
    let _ = writeln!(c, "  store_dir: {:?}", store.display().to_string());
    let _ = writeln!(c, "  # The leaf's own JetStream domain, so a cluster can source its streams across domains.");
    let _ = writeln!(c, "  domain: leaf");
    let _ = writeln!(c, "  # Durability: nats-server fsyncs its stream files only every 2 minutes by default, and");
    let _ =
        writeln!(c, "  # Jepsen's 2025 analysis of NATS 2.12 showed acknowledged writes lost on power failure under");
    let _ =
        writeln!(c, "  # that default. A leaf is a single node with no replicas to recover from, and CIM's history");
    let _ = writeln!(c, "  # is its source of truth, so a write is acknowledged only once it is on disk. `--sync`");
    let _ = writeln!(c, "  # trades that for throughput; see docs/operations.md.");
    let _ = writeln!(c, "  sync_interval: {sync}");
    let _ = writeln!(c, "}}");
    c
}

async fn check_config(nats_bin: &Path, conf: &Path) -> Result<()> {
    let out = Command::new(nats_bin).arg("-c").arg(conf).arg("-t").output().await?;
    if !out.status.success() {
        bail!(
            "generated NATS configuration {} is invalid: {}{}",
            conf.display(),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `preferred` if it is free and no other `cimctl up` has reserved it (0: any port), else a
/// free one; reserved until `reservations` is dropped, at exit.
fn pick_port(preferred: u16, reservations: &mut Vec<cim_proc::ReservedPort>) -> Result<u16> {
    let reserved = cim_proc::reserve_port(preferred).context("reserving a loopback port")?;
    let port = reserved.port();
    if preferred != 0 && port != preferred {
        say!("note: port {preferred} is in use; using {port}");
    }
    reservations.push(reserved);
    Ok(port)
}

/// How to make the first API token and sign in to the web UI with it.
fn first_token(nats_url: &str, gateway: &str) -> String {
    let cimctl = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "cimctl".into());
    let create = format!("  first token  {cimctl} token create --name me --role admin --nats-url {nats_url}");
    let use_it = format!("               (shown once: paste it into Sign in at http://{gateway}/)");
    format!("{create}\n{use_it}")
}

fn find_service_binaries(bin_dir: Option<&Path>) -> Result<Vec<(Component, PathBuf)>> {
    let own_dir = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf));
    let path_dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    let dirs: Vec<PathBuf> = match bin_dir {
        Some(d) => vec![d.to_path_buf()],
        None => own_dir.into_iter().chain(path_dirs).collect(),
    };
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for c in Component::ALL {
        match dirs.iter().map(|d| d.join(c.service_name())).find(|p| p.is_file()) {
            Some(p) => found.push((c, p)),
            None => missing.push(c.service_name()),
        }
    }
    if !missing.is_empty() {
        let looked = match bin_dir {
            Some(d) => d.display().to_string(),
            None => "next to cimctl and on PATH".to_string(),
        };
        bail!(
            "service binaries not found ({looked}): {}; build them with `cargo build --workspace --bins` \
             (or run `cargo xtask up`, which builds and starts everything)",
            missing.join(", ")
        );
    }
    Ok(found)
}

/// Spawns `cmd` with its output in `log` (appended to with `append`, e.g. for a nats-server
/// started again, else started afresh).
fn spawn(cmd: &mut Command, log: &Path, append: bool) -> Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(log)
        .with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    // No child outlives cimctl: if it dies without stopping them (SIGKILL, a panic), the
    // kernel sends each SIGTERM, and they drain and exit as on Ctrl-C. (The signal follows the
    // spawning thread: cimctl's main thread, which drives `up` through `block_on`.)
    cim_proc::die_with_parent(cmd.as_std_mut(), libc::SIGTERM);
    // Own process group: Ctrl-C reaches cimctl only, which then stops everything in order.
    Ok(cmd.stdin(Stdio::null()).stdout(out).stderr(err).process_group(0).kill_on_drop(true).spawn()?)
}

/// Polls `GET path` on `addr` until 200, failing early if any process has exited.
async fn wait_healthy(procs: &mut [Proc], addr: &str, path: &str, deadline: Instant) -> Result<()> {
    let mut delay = Duration::from_millis(20);
    loop {
        if let Some(msg) = exited(procs) {
            bail!(msg);
        }
        if let Ok(r) = cim_proc::http_get(addr, path).await
            && r.status == 200
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("http://{addr}{path} not ready before the deadline");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

fn exited(procs: &mut [Proc]) -> Option<String> {
    for p in procs.iter_mut() {
        if let Ok(Some(status)) = p.child.try_wait() {
            return Some(format!("{} exited unexpectedly ({status}); see {}", p.name, p.log.display()));
        }
    }
    None
}

/// SIGINT (Ctrl-C) and SIGTERM, caught from [`StopSignals::install`] on: installed before
/// `up` says "Press Ctrl-C to stop", so a Ctrl-C right after that line stops everything in
/// order instead of killing cimctl.
struct StopSignals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> Result<StopSignals> {
        use tokio::signal::unix::{SignalKind, signal};
        let int = signal(SignalKind::interrupt()).context("catching SIGINT")?;
        let term = signal(SignalKind::terminate()).context("catching SIGTERM")?;
        Ok(StopSignals { int, term })
    }

    /// The next SIGINT or SIGTERM.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

/// Waits for Ctrl-C / SIGTERM (returns None) or for a process to die (returns why).
async fn supervise(procs: &mut [Proc], stop: &mut StopSignals) -> Option<String> {
    loop {
        tokio::select! {
            _ = stop.recv() => return None,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if let Some(msg) = exited(procs) {
                    return Some(msg);
                }
            }
        }
    }
}

/// How long a service has to finish its in-flight work and exit after SIGTERM.
const SERVICE_STOP_GRACE: Duration = Duration::from_secs(20);

/// How long a nats-server has to exit after SIGTERM.
const NATS_STOP_GRACE: Duration = Duration::from_secs(10);

/// SIGTERM to every service (they drain), wait; then NATS. Anything still alive after its
/// grace period is killed.
async fn stop_all(procs: &mut [Proc]) {
    let (nats, services) = procs.split_at_mut(1);
    stop_in_order(services, nats).await;
}

/// SIGTERM to every service at once and wait for them; then each nats-server in turn.
async fn stop_in_order(services: &mut [Proc], nats: &mut [Proc]) {
    for p in services.iter_mut() {
        signal(&p.child, Signal::SIGTERM);
    }
    for p in services.iter_mut() {
        stop_one(p, SERVICE_STOP_GRACE).await;
    }
    for p in nats.iter_mut() {
        signal(&p.child, Signal::SIGTERM);
        stop_one(p, NATS_STOP_GRACE).await;
    }
}

fn signal(child: &Child, sig: Signal) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), sig);
    }
}

async fn stop_one(p: &mut Proc, grace: Duration) {
    match tokio::time::timeout(grace, p.child.wait()).await {
        Ok(Ok(status)) if status.success() => say!("  {:<18} stopped", p.name),
        Ok(Ok(status)) => say!("  {:<18} stopped ({status})", p.name),
        Ok(Err(e)) => say!("  {:<18} could not be awaited: {e}", p.name),
        Err(_) => {
            let _ = p.child.kill().await;
            say!("  {:<18} killed after {grace:?}", p.name);
        }
    }
}

fn summary(data_dir: &Path, nats_url: &str, monitor: &str, procs: &[Proc]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "CIM leaf node is up");
    let _ = writeln!(s, "  data        {}", data_dir.display());
    let _ = writeln!(s, "  nats        {nats_url}  (monitoring http://{monitor}, JetStream domain leaf)");
    let _ = writeln!(s, "  use it      export CIM_NATS_URL={nats_url}");
    let _ = writeln!(s);
    let _ = writeln!(s, "  {:<18} {:>7}  {:<36} log", "process", "pid", "health");
    for p in procs {
        let health = p
            .health
            .as_ref()
            .map(|h| format!("http://{h}/readyz"))
            .unwrap_or_else(|| format!("http://{monitor}/healthz"));
        let _ = writeln!(s, "  {:<18} {:>7}  {:<36} {}", p.name, p.child.id().unwrap_or(0), health, p.log.display());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_values() {
        for ok in ["always", "1s", "500ms", "2m"] {
            assert!(valid_sync(ok), "{ok}");
        }
        for bad in ["", "never", "0s", "1x", "s"] {
            assert!(!valid_sync(bad), "{bad}");
        }
    }

    #[test]
    fn config_states_its_durability_choice() {
        let c = nats_config(4222, 8222, Path::new("/data/js"), "always");
        assert!(c.contains("sync_interval: always"));
        assert!(c.contains("Jepsen"));
        assert!(c.contains("store_dir: \"/data/js\""));
    }
}
