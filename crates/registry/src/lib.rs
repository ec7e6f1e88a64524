//! The registry service. Component registry: who runs where, nodes and their lifecycle.
//!
//! Today it runs on the shared runtime: it provisions the streams and buckets `cim-events`
//! assigns to it, announces itself, answers `$SRV.*` and `cim.qry.<component>.describe`, and
//! reports health. Its domain endpoints are added here as they are built.

use std::future::Future;

use cim_events::Component;
use cim_runtime::{CommonArgs, Service, ServiceDef, Settings};

pub const COMPONENT: Component = Component::Registry;

/// Command line and environment of `registry`.
#[derive(clap::Parser, Debug)]
#[command(name = "registry", version, about = "Component registry: who runs where, nodes and their lifecycle")]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,
}

pub fn definition() -> ServiceDef {
    ServiceDef {
        component: COMPONENT,
        version: env!("CARGO_PKG_VERSION"),
        description: "Component registry: who runs where, nodes and their lifecycle",
        capabilities: Vec::new(),
    }
}

/// Runs the service until `shutdown` resolves.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    Service::new(definition()).run(settings, shutdown).await
}
