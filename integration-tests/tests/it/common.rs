//! Shared pieces of the integration tests: locating the built binaries and running a CIM
//! service as a real child process.

use std::{
    path::PathBuf,
    process::{ExitStatus, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};
use cim_events::{Component, Envelope, Upcasters, payload::decode, proto::runtime::DescribeReply, subject};
use prost::Message;
use tokio::process::{Child, Command};

pub const READY: Duration = Duration::from_secs(60);

/// `target/<profile>/<name>`: the binaries `cargo build --workspace --bins` produced (the test
/// executable lives in `target/<profile>/deps`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins` (`cargo xtask test` does)",
        path.display()
    );
    path
}

/// A service binary running as a child process, killed on drop if still running.
pub struct ServiceProc {
    pub component: Component,
    child: Child,
    log: tempfile::NamedTempFile,
    nats_url: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl ServiceProc {
    /// Starts the service for `component` against `nats_url` with extra `args`.
    pub fn start(component: Component, nats_url: &str, args: &[&str]) -> Result<ServiceProc> {
        Self::start_with_env(component, nats_url, args, &[])
    }

    pub fn start_with_env(
        component: Component,
        nats_url: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<ServiceProc> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let (child, log) = spawn(component, nats_url, &args, &env)?;
        Ok(ServiceProc { component, child, log, nats_url: nats_url.to_string(), args, env })
    }

    /// Starts the service again with the same command line and environment, with a fresh log
    /// (a still running process is killed first). Does not wait for it to be ready.
    pub async fn restart(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_none() {
            self.child.kill().await?;
        }
        let (child, log) = spawn(self.component, &self.nats_url, &self.args, &self.env)?;
        self.child = child;
        self.log = log;
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.id().map(|p| p as i32).unwrap_or(0)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
        }
    }

    /// SIGTERM, then the exit status (within `within`).
    pub async fn terminate(&mut self, within: Duration) -> Result<ExitStatus> {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait(within).await
    }

    pub async fn wait(&mut self, within: Duration) -> Result<ExitStatus> {
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .with_context(|| format!("{} did not exit within {within:?}; log:\n{}", self.component, self.log()))??;
        Ok(status)
    }
}

/// Spawns `component`'s binary logging into a new temporary file.
fn spawn(
    component: Component,
    nats_url: &str,
    args: &[String],
    env: &[(String, String)],
) -> Result<(Child, tempfile::NamedTempFile)> {
    let log = tempfile::NamedTempFile::new()?;
    // The gateway's public ports default to fixed numbers; tests run side by side.
    let gateway_ports: &[&str] = if component == Component::UiGateway
        && !args.iter().any(|a| a.starts_with("--gateway-listen"))
        && !env.iter().any(|(k, _)| k == "CIM_GATEWAY_LISTEN")
    {
        &["--gateway-listen", "127.0.0.1:0", "--gateway-grpc-listen", "127.0.0.1:0"]
    } else {
        &[]
    };
    let child = Command::new(bin(component.service_name()))
        .args(["--nats-url", nats_url, "--heartbeat-interval", "200ms", "--shutdown-grace", "5s"])
        .args(gateway_ports)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.reopen()?)
        .stderr(log.reopen()?)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawning {}", component.service_name()))?;
    Ok((child, log))
}

/// Asks one instance of `component` to describe itself (`cim.qry.<component>.describe`).
pub async fn describe(client: &async_nats::Client, component: Component) -> Result<DescribeReply> {
    let subject = subject::query(component, "describe")?;
    let reply = tokio::time::timeout(Duration::from_secs(2), client.request(subject, "".into())).await??;
    if let Some(h) = &reply.headers
        && let Some(code) = h.get("Nats-Service-Error-Code")
    {
        anyhow::bail!("describe failed: {code} {:?}", h.get("Nats-Service-Error"));
    }
    Ok(DescribeReply::decode(reply.payload)?)
}

/// Waits until `component` answers describe and its `/readyz` says 200; returns the reply.
pub async fn wait_ready(client: &async_nats::Client, svc: &ServiceProc) -> Result<DescribeReply> {
    let component = svc.component;
    cim_testkit::eventually(READY, &format!("{component} ready"), || async {
        let d = describe(client, component).await?;
        let addr = d.service.as_ref().map(|s| s.http_addr.clone()).unwrap_or_default();
        let r = cim_testkit::http_get(&addr, "/readyz").await?;
        anyhow::ensure!(r.status == 200, "readyz {}", r.status);
        Ok(d)
    })
    .await
    .with_context(|| format!("log of {component}:\n{}", svc.log()))
}

/// Whether `subject` is an event of `component`'s `aggregate` type (any id, any action).
pub fn is_event_of(subject: &str, component: Component, aggregate: &str) -> bool {
    subject::parse_event(subject).is_ok_and(|e| e.component == component && e.aggregate == aggregate)
}

/// Decodes a lifecycle message with its envelope checked.
pub fn decode_lifecycle<P: cim_events::Payload>(msg: &async_nats::Message) -> Result<(Envelope, P)> {
    Ok(decode::<P>(msg.headers.as_ref(), &msg.payload, &Upcasters::default())?)
}

/// The permissions `component`'s own identity has in the committed, generated
/// `nixos-modules/nats-permissions.json` (what a deployment gives it).
pub fn generated_permissions(component: Component) -> Result<cim_testkit::Permissions> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../nixos-modules/nats-permissions.json");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let p = serde_json::from_str::<serde_json::Value>(&text)?["services"][component.service_name()].clone();
    let mut perms = cim_testkit::Permissions::all().allow_responses();
    for s in p["publish"]["allow"].as_array().context("publish")? {
        perms = perms.allow_publish(s.as_str().context("publish entry")?);
    }
    for s in p["subscribe"]["allow"].as_array().context("subscribe")? {
        perms = perms.allow_subscribe(s.as_str().context("subscribe entry")?);
    }
    Ok(perms)
}

/// A WebAssembly plugin (WAT) that busy-waits on the WASI clock for the milliseconds in its
/// metadata "ms" (1-9 digits), then returns.
pub const SLEEPY_WAT: &str = r#"(module
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
  (import "cim" "meta_get" (func $meta (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "ms")
  (func $now (result i64) (drop (call $clock (i32.const 1) (i64.const 0) (i32.const 64))) (i64.load (i32.const 64)))
  (func (export "cim_invoke") (result i32)
    (local $n i32) (local $i i32) (local $ms i64) (local $until i64)
    (local.set $n (call $meta (i32.const 0) (i32.const 2) (i32.const 16) (i32.const 9)))
    (block $done (loop $digits
      (br_if $done (i32.ge_s (local.get $i) (local.get $n)))
      (local.set $ms (i64.add (i64.mul (local.get $ms) (i64.const 10))
        (i64.extend_i32_u (i32.sub (i32.load8_u (i32.add (i32.const 16) (local.get $i))) (i32.const 48)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $digits)))
    (local.set $until (i64.add (call $now) (i64.mul (local.get $ms) (i64.const 1000000))))
    (loop $wait (br_if $wait (i64.lt_u (call $now) (local.get $until))))
    (i32.const 0)))"#;

/// Every message of `stream` (only those on `filter`, or all when it is empty), in order.
pub async fn read_all(
    js: &async_nats::jetstream::Context,
    stream: &str,
    filter: &str,
) -> Result<Vec<async_nats::jetstream::Message>> {
    use futures::StreamExt;
    let stream = js.get_stream(stream).await?;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: filter.to_string(),
            ..Default::default()
        })
        .await?;
    let pending = consumer.cached_info().num_pending as usize;
    let mut out = Vec::with_capacity(pending);
    if pending == 0 {
        return Ok(out);
    }
    let mut messages = consumer.messages().await?;
    while out.len() < pending {
        let m = tokio::time::timeout(Duration::from_secs(10), messages.next()).await?.context("stream ended")??;
        out.push(m);
    }
    Ok(out)
}

/// Request id → the units whose `created` event carries it (its `Nats-Msg-Id`), from the
/// information-unit stream.
pub async fn created_by_request(
    js: &async_nats::jetstream::Context,
) -> Result<std::collections::BTreeMap<String, Vec<String>>> {
    use cim_events::{envelope::H_MSG_ID, iu, resources};
    let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for m in read_all(js, &resources::events_stream(Component::InformationUnit).name, "").await? {
        let Ok(s) = subject::parse_event(&m.subject) else { continue };
        if s.aggregate != iu::UNIT || s.action != iu::action::CREATED {
            continue;
        }
        let id = m.headers.as_ref().and_then(|h| h.get(H_MSG_ID)).map(|v| v.to_string()).unwrap_or_default();
        out.entry(id).or_default().push(s.id);
    }
    Ok(out)
}
