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
pub mod mqtt;
pub mod outbound;
pub mod postgres;
pub mod s3import;
pub mod webhook;

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc};

use cim_events::{Component, hub, proto::hub::SubscriptionCommand, resources};
use cim_runtime::{CommonArgs, Endpoint, Reply, Service, ServiceDef, ServiceError, Settings};
use prost::Message;

pub const COMPONENT: Component = Component::IntegrationHub;

/// Command line and environment of `integration-hub`.
#[derive(clap::Parser, Debug)]
#[command(name = "integration-hub", version, about = "Integration hub: webhooks and connectors")]
pub struct Config {
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

impl Default for HubArgs {
    fn default() -> Self {
        HubArgs { config: None, webhook_listen: SocketAddr::from(([127, 0, 0, 1], 8470)) }
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

/// Runs the service with default options until `shutdown` resolves.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    run_with(settings, HubArgs::default(), shutdown).await
}

/// Runs the service until `shutdown` resolves. Invalid configuration fails before anything
/// is served.
pub async fn run_with(settings: Settings, args: HubArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let hub = match &args.config {
        Some(path) => config::load(path)?,
        None => Default::default(),
    };
    Service::new(definition()).setup(move |ctx| setup(ctx, args, hub)).run(settings, shutdown).await
}

async fn setup(ctx: cim_runtime::Ctx, args: HubArgs, hub_config: config::Hub) -> anyhow::Result<Vec<Endpoint>> {
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
    // No sources, no listener: a hub without webhooks opens no port.
    let listener = if sources.is_empty() {
        None
    } else {
        let listen = args.webhook_listen;
        Some(
            tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {listen} for webhooks: {e}"))?,
        )
    };
    let addr = listener.as_ref().and_then(|l| l.local_addr().ok());
    let iu = match &ctx.settings().js_domain {
        Some(d) => cim_iu_client::IuClient::with_domain(ctx.client().clone(), d),
        None => cim_iu_client::IuClient::new(ctx.client().clone()),
    };
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
        let inbound = Arc::new(webhook::Inbound { sources, js, ids, iu, ce_source: ctx.source() });
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

    let json = |v: serde_json::Value| Reply { headers: Default::default(), body: v.to_string().into() };
    let mut endpoints = vec![Endpoint::new(hub::qry::SOURCES, hub::query(hub::qry::SOURCES)?, move |_ctx, _msg| {
        let body = listing.clone();
        async move { Ok(Reply { headers: Default::default(), body: body.into() }) }
    })];
    let o = out.clone();
    endpoints.push(Endpoint::new(hub::qry::SUBSCRIPTIONS, hub::query(hub::qry::SUBSCRIPTIONS)?, move |_ctx, _msg| {
        let o = o.clone();
        async move {
            let mut list = Vec::new();
            for run in o.subs.values() {
                let s = &run.sub;
                let pending = match o.js.get_stream(&s.stream).await {
                    Ok(stream) => match stream.consumer_info(hub::outbound_consumer(&s.name).unwrap_or_default()).await {
                        Ok(i) => serde_json::json!(i.num_pending + i.num_ack_pending as u64),
                        Err(_) => serde_json::Value::Null,
                    },
                    Err(_) => serde_json::Value::Null,
                };
                list.push(serde_json::json!({ "name": s.name, "filter": s.filter, "url": s.url, "paused": *run.paused.borrow(), "pending": pending, "max_attempts": s.max_attempts }));
            }
            Ok(json(serde_json::json!({ "subscriptions": list })))
        }
    }));
    let o = out.clone();
    endpoints.push(Endpoint::new(hub::qry::DELIVERIES, hub::query(hub::qry::DELIVERIES)?, move |_ctx, msg| {
        let o = o.clone();
        async move {
            let req: serde_json::Value = serde_json::from_slice(&msg.payload).map_err(|e| ServiceError::bad_request(format!("request is not JSON: {e}")))?;
            let name = req["subscription"].as_str().ok_or_else(|| ServiceError::bad_request("missing \"subscription\""))?;
            if !o.subs.contains_key(name) {
                return Err(ServiceError::not_found(format!("unknown subscription {name:?}")));
            }
            let limit = req["limit"].as_u64().unwrap_or(20) as usize;
            let log = o.deliveries(name, limit).await.map_err(|e| ServiceError::unavailable(e.to_string()))?;
            let entries: Vec<serde_json::Value> = log
                .iter()
                .map(|d| serde_json::json!({ "event_subject": d.event_subject, "event_sequence": d.event_sequence, "event_id": d.event_id, "attempts": d.attempts, "http_status": d.http_status, "last_error": d.last_error, "delivered": d.last_error.is_empty(), "at_ms": d.at_ms, "duration_ms": d.duration_ms }))
                .collect();
            Ok(json(serde_json::json!({ "subscription": name, "deliveries": entries })))
        }
    }));
    for (name, paused) in [(hub::cmd::PAUSE, true), (hub::cmd::RESUME, false)] {
        let o = out.clone();
        endpoints.push(Endpoint::new(name, hub::command(name)?, move |_ctx, msg| {
            let o = o.clone();
            async move {
                let cmd = SubscriptionCommand::decode(msg.payload)
                    .map_err(|e| ServiceError::bad_request(format!("undecodable SubscriptionCommand: {e}")))?;
                if !o.subs.contains_key(&cmd.subscription) {
                    return Err(ServiceError::not_found(format!("unknown subscription {:?}", cmd.subscription)));
                }
                let change = o
                    .set_paused(&cmd.subscription, paused, &cmd.reason)
                    .await
                    .map_err(|e| ServiceError::unavailable(e.to_string()))?;
                Ok(Reply::proto(&change))
            }
        }));
    }
    Ok(endpoints)
}
