//! Operations from one command line: `cimctl status` (desired vs running, routing, consumers
//! and lag, stream health, and why anything is not converging), `cimctl placement check|apply`,
//! `cimctl node enroll|schedule|drain|decommission|ls` and `cimctl registry ls|find`.
//!
//! Every command prints a readable table, or with `--json` one JSON document on stdout. Errors
//! are one line on stderr; a placement file that does not parse or names unknown services exits
//! with 64. Here: the connection, the registry request and the table all of them share; each
//! command in its own module.

mod instances;
mod node;
mod placement;
mod status;

pub use instances::{RegistryArgs, registry};
pub use node::{NodeArgs, node};
pub use placement::{PlacementArgs, placement};
pub use status::{StatusArgs, status};

use std::{fmt::Write as _, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use cim_events::proto::registry::{Instance, Node};
use cim_placement::{
    human,
    names::{instance_state_name, state_name},
};
use serde_json::{Value, json};

#[derive(clap::Args, Debug, Clone)]
pub struct Conn {
    /// NATS server URL(s), comma-separated.
    #[arg(long, global = true, env = "CIM_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// NATS credentials file (JWT + NKey seed).
    #[arg(long, global = true, env = "CIM_NATS_CREDS")]
    nats_creds: Option<PathBuf>,
    /// JetStream domain (a leaf node's own domain, or the hub's).
    #[arg(long, global = true, env = "CIM_JS_DOMAIN")]
    js_domain: Option<String>,
    /// Timeout of each request, in seconds.
    #[arg(long, global = true, default_value_t = 5.0)]
    timeout: f64,
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
}

impl Conn {
    fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout.max(0.1))
    }

    async fn connect(&self) -> Result<async_nats::Client> {
        crate::conn::connect("cimctl", &self.nats_url, self.nats_creds.as_deref(), Some(self.timeout())).await
    }

    fn jetstream(&self, client: &async_nats::Client) -> async_nats::jetstream::Context {
        match &self.js_domain {
            Some(d) if !d.is_empty() => async_nats::jetstream::with_domain(client.clone(), d),
            _ => async_nats::jetstream::new(client.clone()),
        }
    }
}

/// One request to the registry; an error reply becomes an error naming its code.
pub(crate) async fn request<R: prost::Message + Default>(
    client: &async_nats::Client,
    subject: String,
    req: &impl prost::Message,
    timeout: Duration,
) -> Result<R> {
    let reply = tokio::time::timeout(timeout, client.request(subject.clone(), req.encode_to_vec().into()))
        .await
        .map_err(|_| crate::conn::no_answer("registry", &subject, timeout))?
        .map_err(|e| crate::conn::request_failed("registry", &subject, &e))?;
    if let Some(e) = crate::conn::refused("registry", reply.headers.as_ref()) {
        return Err(e);
    }
    R::decode(reply.payload).with_context(|| format!("reply on {subject} does not decode"))
}

fn print(json: bool, value: Value, text: String) {
    if json {
        println!("{value}");
    } else {
        print!("{text}");
    }
}

// ---- tables ----

/// A plain text table: columns padded to their widest cell.
struct Table {
    head: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(head: &[&'static str]) -> Table {
        Table { head: head.to_vec(), rows: Vec::new() }
    }
    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }
    fn render(&self, out: &mut String) {
        let mut w: Vec<usize> = self.head.iter().map(|h| h.len()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                if i < w.len() {
                    w[i] = w[i].max(c.chars().count());
                }
            }
        }
        let line = |cells: Vec<&str>, out: &mut String| {
            let s: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<width$}", width = w[i])).collect();
            let _ = writeln!(out, "  {}", s.join("  ").trim_end());
        };
        line(self.head.clone(), out);
        for r in &self.rows {
            line(r.iter().map(String::as_str).collect(), out);
        }
        if self.rows.is_empty() {
            let _ = writeln!(out, "  (none)");
        }
    }
}

fn ago(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let now = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
    let d = (now - ms).max(0);
    if d < 1000 { format!("{d}ms ago") } else { format!("{:.1}s ago", d as f64 / 1000.0) }
}

fn node_json(n: &Node) -> Value {
    json!({
        "name": n.name, "state": state_name(n.state()), "memory_bytes": n.memory_bytes, "reserved_bytes": n.reserved_bytes,
        "cpus": n.cpus, "labels": n.labels, "jetstream_server": n.jetstream_server, "reason": n.reason, "changed_ms": n.changed_ms,
    })
}

fn instance_json(i: &Instance) -> Value {
    json!({
        "instance_id": i.instance_id, "component": i.component, "service": i.service, "version": i.version, "node": i.node,
        "contract_version": i.contract_version, "capabilities": i.capabilities, "subjects": i.subjects, "http_addr": i.http_addr,
        "state": instance_state_name(i.state()), "ready": i.ready, "in_flight": i.in_flight, "last_seen_ms": i.last_seen_ms,
        "ttl_ms": i.ttl_ms, "incompatible": i.incompatible, "duplicate": i.duplicate, "reason": i.reason,
        "degraded": i.degraded,
    })
}
