//! The integration-hub service: connects CIM to the outside.
//!
//! Inbound webhooks ([`webhook`]): each source in the configuration file ([`config`]) gets
//! `POST /webhooks/<source>` on the webhook listener, its own secret, Standard Webhooks
//! signature and timestamp checks, and delivery-id de-duplication; an accepted payload becomes
//! a `WebhookReceived` event in `CIM_HUB_EVENTS` (or an information unit). The configured
//! sources are answered on `cim.qry.hub.sources`.
//!
//! Outbound subscriptions ([`outbound`]): an event filter delivered to an HTTP endpoint on the
//! allow-list ([`allow`]), signed, retried, ordered, pausable, logged and dead-lettered.
//!
//! Connectors: PostgreSQL ([`postgres`]) — events into tables, table changes into events;
//! MQTT ([`mqtt`]) — topics into events, events onto a topic; S3 import ([`s3import`]) — new
//! objects of a bucket become units.

pub mod allow;
pub use cim_hub_config as config;
mod endpoints;
pub mod mqtt;
pub mod outbound;
pub mod postgres;
pub mod s3import;
pub mod webhook;

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc};

use cim_events::{Component, hub, resources};
use cim_runtime::{CommonArgs, CommonSettings, ConfigError, Endpoint, Service, ServiceArgs, ServiceDef, Shutdown};

pub const COMPONENT: Component = Component::IntegrationHub;

/// Command line and environment of `integration-hub`.
#[derive(clap::Parser, Debug)]
#[command(name = "integration-hub", version, about = "Integration hub: webhooks and connectors")]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub hub: HubArgs,
}

/// Options of the hub itself.
#[derive(clap::Args, Clone, Debug)]
pub struct HubArgs {
    /// The configuration file (JSON, see docs/integration-hub.md). Without it the hub serves
    /// no webhook source.
    #[arg(long = "hub-config", env = "CIM_HUB_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address of the webhook HTTP listener, opened only when webhook sources are configured.
    /// Port 0 picks a free port (see `cimctl integration ls`).
    #[arg(long = "hub-webhook-listen", env = "CIM_HUB_WEBHOOK_LISTEN", default_value = "127.0.0.1:8470")]
    pub webhook_listen: SocketAddr,
}

/// The validated configuration of `integration-hub`.
#[derive(Debug)]
pub struct Settings {
    pub common: CommonSettings,
    /// The configuration file, loaded with its secrets (empty without `--hub-config`).
    pub hub: config::Hub,
    pub webhook_listen: SocketAddr,
}

impl ServiceArgs for Args {
    type Settings = Settings;

    fn validate(self) -> Result<Settings, ConfigError> {
        let common = self.common.settings(COMPONENT)?;
        let hub = match &self.hub.config {
            Some(path) => config::load(path).map_err(|e| ConfigError::invalid(e.to_string()))?,
            None => config::Hub::default(),
        };
        Ok(Settings { common, hub, webhook_listen: self.hub.webhook_listen })
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
        description: "Integration hub: webhooks and connectors",
        capabilities: vec!["webhooks".to_string(), "subscriptions".to_string()],
    }
}

/// Runs the service until `shutdown` completes.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let (hub, listen) = (settings.hub, settings.webhook_listen);
    Service::new(definition()).setup(move |ctx| setup(ctx, listen, hub)).run(settings.common, shutdown).await
}

async fn setup(
    ctx: cim_runtime::Ctx,
    webhook_listen: SocketAddr,
    hub_config: config::Hub,
) -> anyhow::Result<Vec<Endpoint>> {
    let config::Hub { sources, allow, subscriptions, postgres, mqtt, s3_import } = hub_config;
    for m in mqtt {
        ctx.spawn(&format!("mqtt-{}", m.name), mqtt::run(ctx.clone(), ctx.jetstream().clone(), ctx.source(), m));
    }
    for pg in postgres {
        ctx.spawn(
            &format!("postgres-{}-project", pg.name),
            postgres::project(ctx.clone(), ctx.jetstream().clone(), pg.clone()),
        );
        ctx.spawn(
            &format!("postgres-{}-capture", pg.name),
            postgres::capture(ctx.clone(), ctx.jetstream().clone(), ctx.source(), pg),
        );
    }
    let js = ctx.jetstream().clone();
    let ids = js.get_key_value(resources::kv_bucket(COMPONENT, hub::KV_WEBHOOK_IDS)?).await?;
    let indexed = Arc::new(webhook::IndexPosition::default());
    ctx.spawn("webhook-ids", webhook::index(ctx.clone(), js.clone(), ids.clone(), indexed.clone()));
    // No sources, no listener: a hub without webhooks opens no port.
    let listener = if sources.is_empty() {
        None
    } else {
        let listen = webhook_listen;
        Some(cim_runtime::http::bind_waiting(listen, "webhooks", cim_runtime::http::PORT_WAIT).await?)
    };
    let addr = listener.as_ref().and_then(|l| l.local_addr().ok());
    let iu = ctx.iu_client();
    let names: Vec<serde_json::Value> = sources
        .values()
        .map(|s| serde_json::json!({ "name": s.name, "path": format!("/webhooks/{}", s.name), "target": format!("{:?}", s.target).to_lowercase(), "tolerance_secs": s.tolerance.as_secs(), "max_body_bytes": s.max_body_bytes }))
        .collect();
    if let Some(addr) = addr {
        tracing::info!(addr = %addr, sources = names.len(), "serving webhooks");
    }
    for s3 in s3_import {
        ctx.spawn(
            &format!("s3-import-{}", s3.name),
            s3import::run(ctx.clone(), ctx.jetstream().clone(), iu.clone(), ctx.source(), s3),
        );
    }
    if let Some(listener) = listener {
        let inbound = Arc::new(webhook::Inbound {
            sources,
            js,
            ids,
            indexed,
            horizon: ctx.settings().retry_horizon,
            iu,
            ce_source: ctx.source(),
        });
        let app = webhook::router(inbound).into_make_service_with_connect_info::<SocketAddr>();
        let stop = ctx.clone();
        ctx.spawn("webhooks", async move {
            let served = axum::serve(listener, app).with_graceful_shutdown(async move { stop.stopping().await }).await;
            if let Err(e) = served {
                tracing::error!(error = %e, "webhook listener failed");
            }
        });
    }
    let listing = serde_json::json!({ "webhook_addr": addr.map(|a| a.to_string()), "webhooks": names }).to_string();

    let out = Arc::new(outbound::Outbound {
        js: ctx.jetstream().clone(),
        http: allow::client(allow)?,
        ce_source: ctx.source(),
        subs: subscriptions
            .into_iter()
            .map(|(name, sub)| {
                (name, Arc::new(outbound::Running { sub, paused: tokio::sync::watch::channel(false).0 }))
            })
            .collect(),
    });
    out.load_states().await?;
    ctx.spawn("subscription-states", out.clone().follow_states(ctx.clone()));
    for run in out.subs.values() {
        ctx.spawn(&format!("subscription-{}", run.sub.name), out.clone().run(ctx.clone(), run.clone()));
    }

    let queries = Arc::new(endpoints::Queries { out, listing });
    endpoints::endpoints(queries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(args: &[&str]) -> Result<Settings, String> {
        Args::validate_args(args)
    }

    #[test]
    fn no_configuration_file_serves_nothing() {
        let s = validate(&[]).unwrap();
        assert!(s.hub.sources.is_empty() && s.hub.subscriptions.is_empty());
    }

    #[test]
    fn a_configuration_file_that_does_not_load_is_refused() {
        let e = validate(&["--hub-config", "/no/such/hub.json"]).unwrap_err();
        assert!(e.contains("/no/such/hub.json"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("hub.json");
        std::fs::write(&bad, "{ not json").unwrap();
        assert!(validate(&["--hub-config", bad.to_str().unwrap()]).is_err());
    }
}
