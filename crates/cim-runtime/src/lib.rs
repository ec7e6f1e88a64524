//! `cim-runtime`: the plumbing every CIM service shares and no component logic.
//!
//! A service binary is `main` → [`service_main`] → the service library's `run(settings,
//! shutdown)`, which builds a [`Service`] (its [`ServiceDef`] and [`Endpoint`]s) and runs it.

pub mod archive_guard;
pub mod config;
pub mod http;
pub mod metrics;
pub mod provision;
pub mod service;
pub mod telemetry;

use std::{future::Future, process::ExitCode};

use cim_events::Component;
pub use config::{CommonArgs, EXIT_CONFIG, Settings, parse_or_exit};
pub use service::{Ctx, Endpoint, Reply, Service, ServiceDef, ServiceError};

/// Resolves when SIGINT or SIGTERM arrives.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        // Without signal handlers we can only wait for Ctrl-C through tokio's portable path.
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutdown requested"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "shutdown requested"),
    }
}

/// The whole of a service's `main`: validate configuration (exit 64 with one line on error),
/// start telemetry, run the service until a signal, and map the outcome to an exit code.
pub fn service_main<F, Fut>(component: Component, common: &CommonArgs, run: F) -> ExitCode
where
    F: FnOnce(Settings, std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let settings = match common.settings(component) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{}: {e}", component.service_name());
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{}: cannot start the async runtime: {e}", component.service_name());
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let _telemetry = telemetry::init(component.service_name(), &settings.instance_id);
        match run(settings, Box::pin(shutdown_signal())).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "service failed");
                ExitCode::FAILURE
            }
        }
    })
}
