//! The integration-hub service. Integration hub: webhooks and connectors.
//!
//! Today it runs on the shared runtime: it provisions the streams and buckets `cim-events`
//! assigns to it, announces itself, answers `$SRV.*` and `cim.qry.<component>.describe`, and
//! reports health. Its domain endpoints are added here as they are built.

use std::future::Future;

use cim_events::Component;
use cim_runtime::{CommonArgs, Service, ServiceDef, Settings};

pub const COMPONENT: Component = Component::IntegrationHub;

/// Command line and environment of `integration-hub`.
#[derive(clap::Parser, Debug)]
#[command(name = "integration-hub", version, about = "Integration hub: webhooks and connectors")]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,
}

pub fn definition() -> ServiceDef {
    ServiceDef {
        component: COMPONENT,
        version: env!("CARGO_PKG_VERSION"),
        description: "Integration hub: webhooks and connectors",
        capabilities: Vec::new(),
    }
}

/// Runs the service until `shutdown` resolves.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    Service::new(definition()).run(settings, shutdown).await
}
