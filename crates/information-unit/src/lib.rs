//! The information-unit service: CIM's core domain. Units are immutable content addressed by
//! a CID (in the JetStream object store) plus metadata, typed links and a version chain; every
//! change is an event in `CIM_IU_EVENTS`, and the current state, indexes and link graph are
//! projections rebuilt from it. See docs/information-units.md.

mod app;
mod commands;
mod content;
pub mod domain;
mod events;
mod index;
mod projection;
#[cfg(test)]
mod props;
mod queries;
pub mod schema;

use std::{future::Future, sync::Arc, time::Duration};

use app::App;
pub use app::IuOptions;
use cim_events::{Component, iu, resources};
use cim_runtime::{
    CommonArgs, CommonSettings, ConfigError, Endpoint, Endpoints, Service, ServiceArgs, ServiceDef, Shutdown,
    config::parse_duration,
};
use commands::Cmd;

pub const COMPONENT: Component = Component::InformationUnit;

/// Command line and environment of `information-unit`.
#[derive(clap::Parser, Debug)]
#[command(
    name = "information-unit",
    version,
    about = "Information units: content-addressed, versioned, linked units on JetStream"
)]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,
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

/// The validated configuration of `information-unit`.
#[derive(Clone, Debug)]
pub struct Settings {
    pub common: CommonSettings,
    pub iu: IuOptions,
}

impl ServiceArgs for Args {
    type Settings = Settings;

    fn validate(self) -> Result<Settings, ConfigError> {
        let common = self.common.settings(COMPONENT)?;
        if self.collect_interval.is_zero() {
            return Err(ConfigError::invalid("--iu-collect-interval (CIM_IU_COLLECT_INTERVAL) must be more than 0"));
        }
        let iu = IuOptions {
            orphan_grace: self.orphan_grace,
            content_retention: self.content_retention,
            collect_interval: self.collect_interval,
        };
        Ok(Settings { common, iu })
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
        description: "Information units: content-addressed, versioned, linked units on JetStream",
        capabilities: vec!["units".into(), "content".into(), "unit-types".into()],
    }
}

/// Runs the service until `shutdown` completes.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let opts = settings.iu;
    Service::new(definition()).setup(move |ctx| setup(ctx, opts)).run(settings.common, shutdown).await
}

async fn setup(ctx: cim_runtime::Ctx, opts: IuOptions) -> anyhow::Result<Vec<Endpoint>> {
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
        opts,
        js,
        ctx: ctx.clone(),
    });
    ctx.spawn("projector", app.clone().run_projector());
    ctx.spawn("index", app.clone().run_index());
    ctx.spawn("collector", app.clone().run_collector());

    use iu::{cmd, command, qry, query};
    Ok(Endpoints::new(app)
        .add(cmd::COMMIT, command(cmd::COMMIT)?, |a, m| async move { a.commit(m).await })
        .add(cmd::CREATE, command(cmd::CREATE)?, |a, m| async move { a.command(m, Cmd::Create).await })
        .add(cmd::NEW_VERSION, command(cmd::NEW_VERSION)?, |a, m| async move { a.command(m, Cmd::NewVersion).await })
        .add(cmd::TAG, command(cmd::TAG)?, |a, m| async move { a.command(m, Cmd::Tag(true)).await })
        .add(cmd::UNTAG, command(cmd::UNTAG)?, |a, m| async move { a.command(m, Cmd::Tag(false)).await })
        .add(cmd::SET_ATTRIBUTES, command(cmd::SET_ATTRIBUTES)?, |a, m| async move {
            a.command(m, Cmd::SetAttributes).await
        })
        .add(cmd::LINK, command(cmd::LINK)?, |a, m| async move { a.command(m, Cmd::Link(true)).await })
        .add(cmd::UNLINK, command(cmd::UNLINK)?, |a, m| async move { a.command(m, Cmd::Link(false)).await })
        .add(cmd::DELETE, command(cmd::DELETE)?, |a, m| async move { a.command(m, Cmd::Delete).await })
        .add(
            cmd::REGISTER_TYPE,
            command(cmd::REGISTER_TYPE)?,
            |a, m| async move { a.command(m, Cmd::RegisterType).await },
        )
        .add(cmd::REBUILD, command(cmd::REBUILD)?, |a, _m| async move { a.rebuild().await })
        .add(cmd::REPORT_CORRUPT, command(cmd::REPORT_CORRUPT)?, |a, m| async move { a.report_corrupt(m).await })
        .add(qry::GET, query(qry::GET)?, |a, m| async move { a.get(m).await })
        .add(qry::HISTORY, query(qry::HISTORY)?, |a, m| async move { a.history(m).await })
        .add(qry::LIST, query(qry::LIST)?, |a, m| async move { a.list(m).await })
        .add(qry::LINKS, query(qry::LINKS)?, |a, m| async move { a.links(m).await })
        .add(qry::TYPE, query(qry::TYPE)?, |a, m| async move { a.get_type(m).await })
        .add(qry::STATUS, query(qry::STATUS)?, |a, _m| async move { a.status().await })
        .add(qry::VALIDATE, query(qry::VALIDATE)?, |a, m| async move { a.validate(m).await })
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
        assert_eq!(s.iu.collect_interval, Duration::from_secs(300));
        assert_eq!(s.iu.orphan_grace, Duration::from_secs(3600));
        assert_eq!(s.iu.content_retention, Duration::from_secs(168 * 3600));
    }

    #[test]
    fn a_zero_collect_interval_is_refused() {
        let e = validate(&["--iu-collect-interval", "0s"]).unwrap_err();
        assert!(e.contains("--iu-collect-interval"), "{e}");
    }

    #[test]
    fn common_refusals_are_reported() {
        let e = validate(&["--nats-url", "http://x"]).unwrap_err();
        assert!(e.contains("--nats-url"), "{e}");
    }
}
