//! The pipeline-engine service: event-triggered, durable processing (docs/pipelines.md).
//!
//! - [`definition`]: the declarative pipeline document, its validation, triggers, templates.
//! - [`state`]: runs and pipelines folded from `CIM_PIPELINE_EVENTS` (pure).
//! - [`engine`]: what every task of an instance shares, its start, and its event writing; the
//!   rest of `impl Engine` by concern: `view` (the view every instance follows), `triggers`
//!   (unit events → run requests), `runs` (requests → steps → events), `steps` (what one step
//!   does), `slots` (concurrency leases), `endpoints`, `commands`, `queries`.
//!
//! Every instance shares two durable consumers, `pipeline-triggers` (on `CIM_IU_EVENTS`) and
//! `pipeline-runs` (run work items in `CIM_PIPELINE_EVENTS`), so adding an instance adds
//! throughput and a killed instance's runs are redelivered to another, which resumes them from
//! their events.

mod commands;
pub mod definition;
mod endpoints;
pub mod engine;
mod queries;
mod runs;
mod slots;
pub mod state;
mod steps;
mod triggers;
mod view;

use std::{future::Future, time::Duration};

use cim_events::Component;
use cim_runtime::{CommonArgs, Service, ServiceDef, Settings};

pub const COMPONENT: Component = Component::PipelineEngine;

/// Command line and environment of `pipeline-engine`.
#[derive(clap::Parser, Debug)]
#[command(name = "pipeline-engine", version, about = "Pipeline engine: event-triggered, durable processing")]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// The engine's own options.
#[derive(clap::Args, Clone, Debug)]
pub struct EngineArgs {
    /// Most runs this instance works on at once (over all pipelines).
    #[arg(long = "pipeline-max-runs", env = "CIM_PIPELINE_MAX_RUNS", default_value_t = 16)]
    pub max_runs: usize,
    /// Largest unit content a step may read into memory (bytes).
    #[arg(long = "pipeline-max-content", env = "CIM_PIPELINE_MAX_CONTENT", default_value_t = 64 * 1024 * 1024)]
    pub max_content: u64,
    /// How long a run's work item stays with an instance that stopped confirming progress
    /// (a killed instance's runs move to another after this).
    #[arg(long = "pipeline-ack-wait", env = "CIM_PIPELINE_ACK_WAIT", default_value = "10s", value_parser = cim_runtime::config::parse_duration)]
    pub ack_wait: Duration,
}

impl Default for EngineArgs {
    fn default() -> Self {
        EngineArgs { max_runs: 16, max_content: 64 * 1024 * 1024, ack_wait: Duration::from_secs(10) }
    }
}

pub fn definition() -> ServiceDef {
    ServiceDef {
        component: COMPONENT,
        version: env!("CARGO_PKG_VERSION"),
        description: "Pipeline engine: event-triggered, durable processing",
        capabilities: vec!["pipelines".to_string(), "runs".to_string()],
    }
}

/// Runs the service with default engine options until `shutdown` resolves.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    run_with(settings, EngineArgs::default(), shutdown).await
}

/// Runs the service until `shutdown` resolves.
pub async fn run_with(settings: Settings, args: EngineArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    if args.max_runs == 0 {
        anyhow::bail!("--pipeline-max-runs must be at least 1");
    }
    Service::new(definition()).setup(move |ctx| engine::setup(ctx, args)).run(settings, shutdown).await
}
