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
#[cfg(test)]
mod props;
mod queries;
mod runs;
mod slots;
pub mod state;
mod steps;
mod triggers;
mod view;

use std::{future::Future, time::Duration};

use cim_events::Component;
use cim_runtime::{CommonArgs, CommonSettings, ConfigError, Service, ServiceArgs, ServiceDef, Shutdown};

pub const COMPONENT: Component = Component::PipelineEngine;

/// Command line and environment of `pipeline-engine`.
#[derive(clap::Parser, Debug)]
#[command(name = "pipeline-engine", version, about = "Pipeline engine: event-triggered, durable processing")]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// The engine's own options.
#[derive(clap::Args, Clone, Debug)]
pub struct EngineArgs {
    /// Most runs this instance works on at once (over all pipelines; at least 1).
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

/// The validated configuration of `pipeline-engine`.
#[derive(Clone, Debug)]
pub struct Settings {
    pub common: CommonSettings,
    pub engine: EngineArgs,
}

impl ServiceArgs for Args {
    type Settings = Settings;

    fn validate(self) -> Result<Settings, ConfigError> {
        let common = self.common.settings(COMPONENT)?;
        if self.engine.max_runs == 0 {
            return Err(ConfigError::invalid("--pipeline-max-runs (CIM_PIPELINE_MAX_RUNS) must be at least 1"));
        }
        if self.engine.ack_wait < Duration::from_millis(100) {
            return Err(ConfigError::invalid("--pipeline-ack-wait (CIM_PIPELINE_ACK_WAIT) must be at least 100ms"));
        }
        Ok(Settings { common, engine: self.engine })
    }

    fn common(settings: &Settings) -> &CommonSettings {
        &settings.common
    }

    fn run(settings: Settings, shutdown: Shutdown) -> impl Future<Output = anyhow::Result<()>> {
        run(settings, shutdown)
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

/// Runs the service until `shutdown` completes.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let engine = settings.engine;
    Service::new(definition()).setup(move |ctx| engine::setup(ctx, engine)).run(settings.common, shutdown).await
}

#[cfg(test)]
mod config_tests {
    use super::*;

    fn validate(args: &[&str]) -> Result<Settings, String> {
        Args::validate_args(args)
    }

    #[test]
    fn defaults_are_valid() {
        let s = validate(&[]).unwrap();
        assert_eq!(s.engine.max_runs, 16);
        assert_eq!(s.engine.ack_wait, Duration::from_secs(10));
    }

    #[test]
    fn refusals_name_the_flag() {
        let e = validate(&["--pipeline-max-runs", "0"]).unwrap_err();
        assert!(e.contains("--pipeline-max-runs"), "{e}");
        let e = validate(&["--pipeline-ack-wait", "0s"]).unwrap_err();
        assert!(e.contains("--pipeline-ack-wait"), "{e}");
        assert!(validate(&["--pipeline-max-content", "lots"]).is_err());
    }
}
