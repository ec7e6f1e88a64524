//! The per-service HTTP endpoint: `/livez`, `/readyz` and `/metrics`.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
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
