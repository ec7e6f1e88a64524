//! The registry service: who runs where. Instances announce themselves and beat; the registry
//! records registration, drain, goodbye and loss as events in `CIM_REGISTRY_EVENTS`, keeps the
//! current view as a projection (memory and the KV buckets `cim_registry_instances` /
//! `cim_registry_nodes`), answers discovery by name and capability, runs the node lifecycle
//! (enrolling → schedulable → draining → drained → decommissioned) and explains what is not
//! converging. See docs/registry.md.

mod app;
pub use cim_placement as placement;
pub mod state;

use std::{future::Future, sync::Arc, time::Duration};

use app::{App, RegistryOptions};
use cim_events::{Component, proto::registry::NodeState, registry as names, resources};
use cim_runtime::{CommonArgs, Endpoint, Service, ServiceDef, Settings, config::parse_duration};

pub const COMPONENT: Component = Component::Registry;

/// Command line and environment of `registry`.
#[derive(clap::Parser, Debug)]
#[command(name = "registry", version, about = "Component registry: who runs where, nodes and their lifecycle")]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(clap::Args, Clone, Debug)]
pub struct RegistryArgs {
    /// An instance is marked lost after this many of its heartbeat intervals without a beat.
    #[arg(long = "registry-missed-beats", env = "CIM_REGISTRY_MISSED_BEATS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub missed_beats: u32,
    /// ...but never sooner than this after its last beat.
    #[arg(long = "registry-min-ttl", env = "CIM_REGISTRY_MIN_TTL", default_value = "1s", value_parser = parse_duration)]
    pub min_ttl: Duration,
}

impl Default for RegistryArgs {
    fn default() -> Self {
        RegistryArgs { missed_beats: 3, min_ttl: Duration::from_secs(1) }
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

/// Runs the service with default registry options until `shutdown` resolves.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    run_with(settings, RegistryArgs::default(), shutdown).await
}

pub async fn run_with(
    settings: Settings,
    args: RegistryArgs,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    if args.min_ttl < Duration::from_millis(100) {
        anyhow::bail!("--registry-min-ttl must be at least 100ms");
    }
    Service::new(definition()).setup(move |ctx| setup(ctx, args)).run(settings, shutdown).await
}

async fn setup(ctx: cim_runtime::Ctx, args: RegistryArgs) -> anyhow::Result<Vec<Endpoint>> {
    let js = ctx.jetstream().clone();
    let instances_kv = js.get_key_value(resources::kv_bucket(COMPONENT, names::KV_INSTANCES)?).await?;
    let nodes_kv = js.get_key_value(resources::kv_bucket(COMPONENT, names::KV_NODES)?).await?;
    let opts = RegistryOptions { missed_beats: args.missed_beats, min_ttl: args.min_ttl };
    let app = Arc::new(App::new(ctx.clone(), js, instances_kv, nodes_kv, opts));
    app.clone().follow().await?;
    ctx.spawn("projector", app.clone().run_projector());
    ctx.spawn("lifecycle", app.clone().run_lifecycle());
    ctx.spawn("watchdog", app.clone().run_watchdog());

    macro_rules! endpoint {
        ($kind:ident, $name:expr, |$a:ident, $m:ident| $body:expr) => {{
            let app = app.clone();
            let subject = names::$kind($name)?;
            Endpoint::new($name, subject, move |_ctx, $m| {
                let $a = app.clone();
                async move { $body }
            })
        }};
    }
    use names::{cmd, qry};
    Ok(vec![
        endpoint!(command, cmd::ENROLL, |a, m| a.enroll(m).await),
        endpoint!(command, cmd::SCHEDULE, |a, m| a.node_command(m, NodeState::NodeSchedulable).await),
        endpoint!(command, cmd::DRAIN, |a, m| a.node_command(m, NodeState::NodeDraining).await),
        endpoint!(command, cmd::DECOMMISSION, |a, m| a.node_command(m, NodeState::NodeDecommissioned).await),
        endpoint!(command, cmd::SET_DESIRED, |a, m| a.set_desired(m).await),
        endpoint!(query, qry::INSTANCES, |a, m| a.instances(m).await),
        endpoint!(query, qry::NODES, |a, m| a.nodes(m).await),
        endpoint!(query, qry::OVERVIEW, |a, m| a.overview(m).await),
    ])
}
