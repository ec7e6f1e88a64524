//! The information-unit service: CIM's core domain. Units are immutable content addressed by
//! a CID (in the JetStream object store) plus metadata, typed links and a version chain; every
//! change is an event in `CIM_IU_EVENTS`, and the current state, indexes and link graph are
//! projections rebuilt from it. See docs/information-units.md.

mod app;
mod content;
pub mod domain;
mod index;
mod projection;
pub mod schema;

use std::{future::Future, sync::Arc, time::Duration};

use app::{App, IuOptions};
use cim_events::{Component, iu, resources};
use cim_runtime::{CommonArgs, Endpoint, Service, ServiceDef, Settings, config::parse_duration};

pub const COMPONENT: Component = Component::InformationUnit;

/// Command line and environment of `information-unit`.
#[derive(clap::Parser, Debug)]
#[command(
    name = "information-unit",
    version,
    about = "Information units: content-addressed, versioned, linked units on JetStream"
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub iu: IuArgs,
}

#[derive(clap::Args, Clone, Debug)]
pub struct IuArgs {
    /// Uploads never committed and chunks of interrupted uploads younger than this are kept.
    #[arg(long = "iu-orphan-grace", env = "CIM_IU_ORPHAN_GRACE", default_value = "1h", value_parser = parse_duration)]
    pub orphan_grace: Duration,
    /// Content that no live unit references is kept at least this long after the last
    /// reference went away.
    #[arg(long = "iu-content-retention", env = "CIM_IU_CONTENT_RETENTION", default_value = "168h", value_parser = parse_duration)]
    pub content_retention: Duration,
    /// How often the collection rules run.
    #[arg(long = "iu-collect-interval", env = "CIM_IU_COLLECT_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub collect_interval: Duration,
}

impl Default for IuArgs {
    fn default() -> Self {
        IuArgs {
            orphan_grace: Duration::from_secs(3600),
            content_retention: Duration::from_secs(168 * 3600),
            collect_interval: Duration::from_secs(300),
        }
    }
}

pub fn definition() -> ServiceDef {
    ServiceDef {
        component: COMPONENT,
        version: env!("CARGO_PKG_VERSION"),
        description: "Information units: content-addressed, versioned, linked units on JetStream",
        capabilities: vec!["units".into(), "content".into(), "unit-types".into()],
    }
}

/// Runs the service with default information-unit options.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    run_with(settings, IuArgs::default(), shutdown).await
}

pub async fn run_with(settings: Settings, args: IuArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    if args.collect_interval.is_zero() {
        anyhow::bail!("--iu-collect-interval must be more than 0");
    }
    Service::new(definition()).setup(move |ctx| setup(ctx, args)).run(settings, shutdown).await
}

async fn setup(ctx: cim_runtime::Ctx, args: IuArgs) -> anyhow::Result<Vec<Endpoint>> {
    let js = ctx.jetstream().clone();
    let kv = |purpose: &'static str| {
        let js = js.clone();
        async move { anyhow::Ok(js.get_key_value(resources::kv_bucket(COMPONENT, purpose)?).await?) }
    };
    let app = Arc::new(App {
        units: kv(iu::KV_UNITS).await?,
        types: kv(iu::KV_TYPES).await?,
        requests: kv(iu::KV_REQUESTS).await?,
        content: js.get_object_store(iu::CONTENT_BUCKET).await?,
        events_stream: resources::events_stream(COMPONENT).name,
        index: Arc::default(),
        opts: IuOptions {
            orphan_grace: args.orphan_grace,
            content_retention: args.content_retention,
            collect_interval: args.collect_interval,
        },
        js,
        ctx: ctx.clone(),
    });
    ctx.spawn("projector", app.clone().run_projector());
    ctx.spawn("index", app.clone().run_index());
    ctx.spawn("collector", app.clone().run_collector());

    macro_rules! endpoint {
        ($kind:ident, $name:expr, |$a:ident, $m:ident| $body:expr) => {{
            let app = app.clone();
            let subject = iu::$kind($name)?;
            Endpoint::new($name, subject, move |_ctx, $m| {
                let $a = app.clone();
                async move { $body }
            })
        }};
    }
    use iu::{cmd, qry};
    Ok(vec![
        endpoint!(command, cmd::COMMIT, |a, m| a.commit(m).await),
        endpoint!(command, cmd::CREATE, |a, m| a.create(m).await),
        endpoint!(command, cmd::NEW_VERSION, |a, m| a.new_version(m).await),
        endpoint!(command, cmd::TAG, |a, m| a.tag(m, true).await),
        endpoint!(command, cmd::UNTAG, |a, m| a.tag(m, false).await),
        endpoint!(command, cmd::SET_ATTRIBUTES, |a, m| a.set_attributes(m).await),
        endpoint!(command, cmd::LINK, |a, m| a.link(m, true).await),
        endpoint!(command, cmd::UNLINK, |a, m| a.link(m, false).await),
        endpoint!(command, cmd::DELETE, |a, m| a.delete(m).await),
        endpoint!(command, cmd::REGISTER_TYPE, |a, m| a.register_type(m).await),
        endpoint!(command, cmd::REBUILD, |a, _m| a.rebuild().await),
        endpoint!(command, cmd::REPORT_CORRUPT, |a, m| a.report_corrupt(m).await),
        endpoint!(query, qry::GET, |a, m| a.get(m).await),
        endpoint!(query, qry::HISTORY, |a, m| a.history(m).await),
        endpoint!(query, qry::LIST, |a, m| a.list(m).await),
        endpoint!(query, qry::LINKS, |a, m| a.links(m).await),
        endpoint!(query, qry::TYPE, |a, m| a.get_type(m).await),
        endpoint!(query, qry::STATUS, |a, _m| a.status().await),
        endpoint!(query, qry::VALIDATE, |a, m| a.validate(m).await),
    ])
}
