//! The per-service HTTP endpoint: `/livez`, `/readyz` and `/metrics`.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use tokio::{net::TcpListener, sync::Notify};

use crate::metrics::Metrics;

/// Readiness as the HTTP endpoint reports it.
#[derive(Clone, Debug)]
pub struct Health {
    ready: Arc<AtomicBool>,
    /// Ready, but degraded: why (still 200 on `/readyz`: the service takes work).
    degraded: Arc<Mutex<Option<String>>>,
    metrics: Metrics,
}

impl Health {
    pub fn new(metrics: Metrics) -> Health {
        Health { ready: Arc::new(AtomicBool::new(false)), degraded: Arc::default(), metrics }
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
        self.metrics.ready.set(i64::from(ready));
    }

    pub fn set_degraded(&self, why: Option<String>) {
        self.metrics.degraded.set(i64::from(why.is_some()));
        *self.degraded.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }
}

/// How long a port still held by the instance this one replaces is waited for: an instance
/// asked to stop keeps its ports for its shutdown grace (30 s by default) while in-flight work
/// finishes, and a supervisor restarting it at once must not fail on "address in use".
pub const PORT_WAIT: Duration = Duration::from_secs(60);
/// How often a taken port is tried again.
const PORT_RETRY: Duration = Duration::from_millis(100);

/// Binds `addr`; while it is in use (the instance being replaced still holds it), tries again
/// every 100 ms for up to `within`, saying once that it waits. Any other error, or a port
/// still taken after `within`, is returned with the address in it.
pub async fn bind_waiting(addr: SocketAddr, what: &str, within: Duration) -> anyhow::Result<TcpListener> {
    let started = Instant::now();
    let mut said = false;
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => {
                if said {
                    tracing::info!(%addr, what, waited = ?started.elapsed(), "port free again; listening");
                }
                return Ok(l);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && started.elapsed() < within => {
                if !said {
                    tracing::warn!(%addr, what, within = ?within, "port in use (the instance this one replaces may still be stopping); waiting for it");
                    said = true;
                }
                tokio::time::sleep(PORT_RETRY).await;
            }
            Err(e) => anyhow::bail!("cannot listen on {addr} for {what}: {e}"),
        }
    }
}

pub async fn serve(listener: TcpListener, health: Health, stop: Arc<Notify>) {
    let app = Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health);
    let shutdown = async move { stop.notified().await };
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
        tracing::error!(error = %e, "health endpoint failed");
    }
}

async fn readyz(State(h): State<Health>) -> impl IntoResponse {
    if h.ready.load(Ordering::SeqCst) {
        // Degraded is still ready: the service takes work; the body says what is wrong.
        match h.degraded.lock().unwrap_or_else(|e| e.into_inner()).as_deref() {
            Some(why) => (StatusCode::OK, format!("ready, degraded: {why}\n")),
            None => (StatusCode::OK, "ready\n".to_string()),
        }
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: NATS or owned streams unavailable\n".to_string())
    }
}

async fn metrics(State(h): State<Health>) -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        h.metrics.encode(),
    )
}
