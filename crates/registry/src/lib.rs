//! The registry service: who runs where. Instances announce themselves and beat; the registry
//! records registration, drain, goodbye and loss as events in `CIM_REGISTRY_EVENTS`, keeps the
//! current view as a projection (memory and the KV buckets `cim_registry_instances` /
//! `cim_registry_nodes`), answers discovery by name and capability, runs the node lifecycle
//! (enrolling → schedulable → draining → drained → decommissioned) and explains what is not
//! converging. See docs/registry.md.

mod app;
mod lifecycle;
mod nodes;
pub use cim_placement as placement;
mod projector;
#[cfg(test)]
mod props;
mod queries;
pub mod state;
mod view;
mod watchdog;

use std::{future::Future, sync::Arc, time::Duration};

use app::App;
pub use app::RegistryOptions;
use cim_events::{Component, proto::registry::NodeState, registry as names, resources};
use cim_runtime::{
    CommonArgs, CommonSettings, ConfigError, Endpoint, Endpoints, Service, ServiceArgs, ServiceDef, Shutdown,
    config::parse_duration,
};

pub const COMPONENT: Component = Component::Registry;

/// Command line and environment of `registry`.
#[derive(clap::Parser, Debug)]
#[command(name = "registry", version, about = "Component registry: who runs where, nodes and their lifecycle")]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,
    /// An instance is marked lost after this many of its heartbeat intervals without a beat.
    #[arg(long = "registry-missed-beats", env = "CIM_REGISTRY_MISSED_BEATS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub missed_beats: u32,
    /// ...but never sooner than this after its last beat (at least 100ms).
    #[arg(long = "registry-min-ttl", env = "CIM_REGISTRY_MIN_TTL", default_value = "1s", value_parser = parse_duration)]
    pub min_ttl: Duration,
}

/// The validated configuration of `registry`.
#[derive(Clone, Debug)]
pub struct Settings {
    pub common: CommonSettings,
    pub registry: RegistryOptions,
}

impl ServiceArgs for Args {
    type Settings = Settings;

    fn validate(self) -> Result<Settings, ConfigError> {
        let common = self.common.settings(COMPONENT)?;
        if self.min_ttl < Duration::from_millis(100) {
            return Err(ConfigError::invalid("--registry-min-ttl (CIM_REGISTRY_MIN_TTL) must be at least 100ms"));
        }
        Ok(Settings { common, registry: RegistryOptions { missed_beats: self.missed_beats, min_ttl: self.min_ttl } })
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
        description: "Component registry: who runs where, nodes and their lifecycle",
        capabilities: vec!["discovery".into(), "nodes".into(), "placement".into()],
    }
}

/// Runs the service until `shutdown` completes.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let opts = settings.registry;
    Service::new(definition()).setup(move |ctx| setup(ctx, opts)).run(settings.common, shutdown).await
}

async fn setup(ctx: cim_runtime::Ctx, opts: RegistryOptions) -> anyhow::Result<Vec<Endpoint>> {
    let js = ctx.jetstream().clone();
    let instances_kv = js.get_key_value(resources::kv_bucket(COMPONENT, names::KV_INSTANCES)?).await?;
    let nodes_kv = js.get_key_value(resources::kv_bucket(COMPONENT, names::KV_NODES)?).await?;
    let app = Arc::new(App::new(ctx.clone(), js, instances_kv, nodes_kv, opts));
    app.clone().follow().await?;
    ctx.spawn("projector", app.clone().run_projector());
    ctx.spawn("lifecycle", app.clone().run_lifecycle());
    ctx.spawn("watchdog", app.clone().run_watchdog());

    use names::{cmd, command, qry, query};
    Ok(Endpoints::new(app)
        .add(cmd::ENROLL, command(cmd::ENROLL)?, |a, m| async move { a.enroll(m).await })
        .add(cmd::SCHEDULE, command(cmd::SCHEDULE)?, |a, m| async move {
            a.node_command(m, NodeState::NodeSchedulable).await
        })
        .add(cmd::DRAIN, command(cmd::DRAIN)?, |a, m| async move { a.node_command(m, NodeState::NodeDraining).await })
        .add(cmd::DECOMMISSION, command(cmd::DECOMMISSION)?, |a, m| async move {
            a.node_command(m, NodeState::NodeDecommissioned).await
        })
        .add(cmd::SET_DESIRED, command(cmd::SET_DESIRED)?, |a, m| async move { a.set_desired(m).await })
        .add(qry::INSTANCES, query(qry::INSTANCES)?, |a, m| async move { a.instances(m).await })
        .add(qry::NODES, query(qry::NODES)?, |a, m| async move { a.nodes(m).await })
        .add(qry::OVERVIEW, query(qry::OVERVIEW)?, |a, m| async move { a.overview(m).await })
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(args: &[&str]) -> Result<Settings, String> {
        Args::validate_args(args)
    }

    #[test]
    fn defaults_are_valid() {
        let s = validate(&[]).unwrap();
        assert_eq!(s.registry.missed_beats, 3);
        assert_eq!(s.registry.min_ttl, Duration::from_secs(1));
    }

    #[test]
    fn a_min_ttl_below_100ms_is_refused() {
        let e = validate(&["--registry-min-ttl", "50ms"]).unwrap_err();
        assert!(e.contains("--registry-min-ttl") && e.contains("100ms"), "{e}");
        assert!(validate(&["--registry-min-ttl", "100ms"]).is_ok());
    }

    #[test]
    fn missed_beats_out_of_range_are_refused() {
        assert!(validate(&["--registry-missed-beats", "0"]).is_err());
    }
}
