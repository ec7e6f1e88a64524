//! `cim-runtime`: the plumbing every CIM service shares and no component logic.
//!
//! A service crate's `lib.rs` holds its `Args` (clap), `Args::validate` (pure: every refusal of
//! bad configuration), `definition()` and `run(settings, shutdown)`; its `main.rs` is
//! `cim_runtime::service_main::<Args>()`. `run` builds a [`Service`] (its [`ServiceDef`] and
//! [`Endpoints`]) and runs it; events are recorded with [`NewEvent`].

pub mod archive_guard;
pub mod config;
pub mod consumer;
mod control;
pub mod crash;
mod ctx;
pub mod endpoint;
mod health;
pub mod http;
pub mod metrics;
pub mod provision;
pub mod publish;
mod serve;
pub mod service;
pub mod telemetry;

use std::{future::Future, pin::Pin, process::ExitCode};

pub use config::{CommonArgs, CommonSettings, ConfigError, EXIT_CONFIG, parse_or_exit};
pub use endpoint::{Endpoint, Endpoints, Reply, ServiceError, json_request};
pub use health::Degraded;
pub use publish::{NewEvent, PublishError};
pub use service::{Ctx, Service, ServiceDef};

/// The shutdown signal `run` receives: resolves when the service should stop.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A service's command line, as [`service_main`] needs it: parsed by clap, validated purely
/// (nothing connects before every refusal), then run until shutdown.
pub trait ServiceArgs: clap::Parser {
    /// The validated configuration `run` takes.
    type Settings: Send + 'static;

    /// Every refusal of bad configuration; pure apart from reading files the flags name.
    fn validate(self) -> Result<Self::Settings, ConfigError>;

    /// The part of the settings every service shares (telemetry needs the instance id).
    fn common(settings: &Self::Settings) -> &CommonSettings;

    /// The service's `run(settings, shutdown)`.
    fn run(settings: Self::Settings, shutdown: Shutdown) -> impl Future<Output = anyhow::Result<()>>;

    /// Parses `args` (flags only, no program name) as the command line and validates them:
    /// what a test of each refusal calls. The error is the line `service_main` would print.
    fn validate_args(args: &[&str]) -> Result<Self::Settings, String> {
        let name = Self::command().get_name().to_string();
        let parsed = Self::try_parse_from(std::iter::once(name.as_str()).chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        parsed.validate().map_err(|e| e.to_string())
    }
}

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

/// The whole of a service's `main`: parse and validate the configuration (one line and exit 64
/// on any refusal, before anything connects), start telemetry, run the service until a signal,
/// and map the outcome to an exit code.
pub fn service_main<A: ServiceArgs>() -> ExitCode {
    let name = A::command().get_name().to_string();
    let settings = match parse_or_exit::<A>().validate() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let common = A::common(&settings);
        let _telemetry = telemetry::init(common.component.service_name(), &common.instance_id);
        match A::run(settings, Box::pin(shutdown_signal())).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "service failed");
                ExitCode::FAILURE
            }
        }
    })
}
