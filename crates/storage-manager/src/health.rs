//! What the storage manager knows about each archive target, and what it says about it.
//!
//! Every task that talks to a target (the verifiers, the object copies, the prober) reports the
//! outcome here. The target is *up* while its last request succeeded; `cim_archive_target_up`
//! and `cim_archive_target_last_success_timestamp_seconds` say so, and while it is down the
//! service is degraded (`cimctl status`, heartbeats, `/readyz` body) — it keeps taking work.
//!
//! Idle, nothing talks to a target, so an outage would go unnoticed: [`run_prober`] sends one
//! cheap request (a HEAD) when nothing else reached the target for `probe_interval`, and
//! retries with backoff while it is down.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cim_archive::S3Client;
use cim_archive::format;
use cim_runtime::Degraded;
use cim_runtime::metrics::{Metrics, TargetLabels};
use tokio::sync::watch;

/// Unix time now, in seconds.
pub fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

#[derive(Default)]
struct State {
    /// The last contact's outcome and when it was.
    up: Option<bool>,
    last_contact: Option<Instant>,
    error: Option<String>,
}

/// One target's reachability, shared by every task that talks to it. Cheap to clone.
#[derive(Clone)]
pub struct TargetHealth {
    target: String,
    state: Arc<Mutex<State>>,
    metrics: Metrics,
    degraded: Degraded,
}

impl TargetHealth {
    pub fn new(target: &str, metrics: Metrics, degraded: Degraded) -> TargetHealth {
        TargetHealth { target: target.to_string(), state: Arc::default(), metrics, degraded }
    }

    /// One that reports to nobody (its own metrics and degraded state): for tools and
    /// benchmarks that run a task outside the service.
    pub fn standalone(target: &str) -> TargetHealth {
        TargetHealth::new(target, Metrics::new("storage-manager", "standalone"), Degraded::default())
    }

    pub fn target(&self) -> &str {
        &self.target
    }

    fn key(&self) -> String {
        format!("archive-target/{}", self.target)
    }

    /// The target answered a request.
    pub fn ok(&self) {
        let recovered = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let recovered = s.up == Some(false);
            s.up = Some(true);
            s.last_contact = Some(Instant::now());
            s.error = None;
            recovered
        };
        if recovered {
            tracing::info!(target = %self.target, "archive target reachable again");
        }
        let labels = TargetLabels { target: self.target.clone() };
        self.metrics.archive_target_up.get_or_create(&labels).set(1);
        self.metrics.archive_target_ok_time.get_or_create(&labels).set(unix_now());
        self.degraded.set(&self.key(), None);
    }

    /// A request to the target failed (unreachable, refused credentials, an error status).
    pub fn failed(&self, error: &str) {
        let first = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let first = s.error.as_deref() != Some(error);
            s.up = Some(false);
            s.last_contact = Some(Instant::now());
            s.error = Some(error.to_string());
            first
        };
        if first {
            tracing::warn!(target = %self.target, error = %error, "archive target unreachable");
        }
        let labels = TargetLabels { target: self.target.clone() };
        self.metrics.archive_target_up.get_or_create(&labels).set(0);
        self.degraded.set(&self.key(), Some(format!("archive target {} unreachable: {error}", self.target)));
    }

    /// Records the outcome of an S3 call.
    pub fn report<T>(&self, r: &Result<T, cim_archive::S3Error>) {
        match r {
            Ok(_) => self.ok(),
            Err(e) => self.failed(&e.to_string()),
        }
    }

    /// Whether the last contact succeeded (`None` before any).
    pub fn is_up(&self) -> Option<bool> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).up
    }

    /// How long since anything talked to the target (`None`: never).
    pub fn since_contact(&self) -> Option<Duration> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).last_contact.map(|t| t.elapsed())
    }
}

/// Keeps one target's reachability known while nothing else talks to it: a HEAD of one
/// stream's cursor when the target was not reached for `probe_interval` (or at once, at start),
/// and while it is down every `check` doubling up to `retry_max`.
pub async fn run_prober(
    s3: S3Client,
    health: TargetHealth,
    stream: String,
    check: Duration,
    probe_interval: Duration,
    retry_max: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let key = format::cursor_key(&s3.target().prefix, &stream);
    let mut retry = check;
    loop {
        let due = match (health.is_up(), health.since_contact()) {
            (_, None) => true,
            (Some(false), Some(since)) => since >= retry,
            (_, Some(since)) => since >= probe_interval,
        };
        if due {
            let r = s3.head(&key).await;
            health.report(&r);
            retry = if r.is_ok() { check } else { (retry * 2).min(retry_max.max(check)) };
        }
        tokio::select! {
            _ = tokio::time::sleep(check) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}
