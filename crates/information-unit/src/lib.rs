//! The information-unit service. Information units: content-addressed, versioned, linked units on JetStream.
//!
//! Today it runs on the shared runtime: it provisions the streams and buckets `cim-events`
//! assigns to it, announces itself, answers `$SRV.*` and `cim.qry.<component>.describe`, and
//! reports health. Its domain endpoints are added here as they are built.

use std::future::Future;

use cim_events::Component;
use cim_runtime::{CommonArgs, Service, ServiceDef, Settings};

pub const COMPONENT: Component = Component::InformationUnit;

/// Command line and environment of `information-unit`.
#[derive(clap::Parser, Debug)]
#[command(name = "information-unit", version, about = "Information units: content-addressed, versioned, linked units on JetStream")]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,
}

pub fn definition() -> ServiceDef {
    ServiceDef {
        component: COMPONENT,
        version: env!("CARGO_PKG_VERSION"),
        description: "Information units: content-addressed, versioned, linked units on JetStream",
        capabilities: Vec::new(),
    }
}

/// Runs the service until `shutdown` resolves.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    Service::new(definition()).run(settings, shutdown).await
}
