//! The ui-gateway service: the door for people and programs.
//!
//! It runs on the shared runtime (provisioning, announcement, health on the runtime's port) and
//! serves, on its own listener (`--gateway-listen`), the HTTP/JSON API over the services' NATS
//! contracts, live events as Server-Sent Events, the OpenAPI document and the web UI. Callers
//! authenticate with API tokens kept hashed in the `cim_gateway_tokens` KV bucket (created by
//! `cimctl token create`); see docs/ui-gateway.md.

pub mod api;
pub mod auth;
pub mod error;
pub mod grpc;
#[cfg(test)]
mod props;
pub mod ui;

use std::{future::Future, net::SocketAddr, sync::Arc};

use cim_events::{Component, gateway, resources};
use cim_runtime::http::{PORT_WAIT, bind_waiting};
use cim_runtime::{CommonArgs, CommonSettings, ConfigError, Service, ServiceArgs, ServiceDef, Shutdown};

pub const COMPONENT: Component = Component::UiGateway;

/// Command line and environment of `ui-gateway`.
#[derive(clap::Parser, Debug)]
#[command(name = "ui-gateway", version, about = "UI gateway: HTTP, gRPC and the web UI")]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

/// Options of the gateway's API listener.
#[derive(clap::Args, Clone, Debug)]
pub struct GatewayArgs {
    /// Address of the HTTP API and web UI (separate from the health port).
    #[arg(long = "gateway-listen", env = "CIM_GATEWAY_LISTEN", default_value = "127.0.0.1:8480")]
    pub listen: SocketAddr,
    /// Address of the gRPC API (with reflection and health); empty = no gRPC.
    #[arg(long = "gateway-grpc-listen", env = "CIM_GATEWAY_GRPC_LISTEN", default_value = "127.0.0.1:8481", value_parser = parse_optional_addr)]
    pub grpc_listen: OptionalAddr,
    /// Origins allowed by CORS, comma-separated (`*` = any; empty = same origin only).
    #[arg(long = "gateway-cors-origins", env = "CIM_GATEWAY_CORS_ORIGINS", value_delimiter = ',', default_value = "")]
    pub cors_origins: Vec<String>,
    /// Largest JSON request body, in bytes (at least 1).
    #[arg(long = "gateway-max-json", env = "CIM_GATEWAY_MAX_JSON", default_value_t = 64 * 1024)]
    pub max_json: usize,
    /// Largest upload, in bytes (at least 1).
    #[arg(long = "gateway-max-upload", env = "CIM_GATEWAY_MAX_UPLOAD", default_value_t = 4 << 30)]
    pub max_upload: u64,
    /// Requests per second per token (bursts of twice that); 0 = unlimited.
    #[arg(long = "gateway-rate-limit", env = "CIM_GATEWAY_RATE_LIMIT", default_value_t = 100)]
    pub rate_limit: u32,
    /// Event streams (SSE and gRPC `Events`) one token may hold open at once; 0 = unlimited.
    #[arg(long = "gateway-max-streams", env = "CIM_GATEWAY_MAX_STREAMS", default_value_t = 16)]
    pub max_streams: usize,
}

/// A listen address, or none (`off` or empty).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionalAddr(pub Option<SocketAddr>);

/// Parses `host:port`, or `off`/empty for none.
pub fn parse_optional_addr(s: &str) -> Result<OptionalAddr, String> {
    match s.trim() {
        "" | "off" => Ok(OptionalAddr(None)),
        a => a.parse().map(|a| OptionalAddr(Some(a))).map_err(|e| format!("{a:?} is not host:port: {e}")),
    }
}

/// Size limits of requests.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_json: usize,
    pub max_upload: u64,
}

/// What every handler shares.
pub struct AppState {
    pub iu: cim_iu_client::IuClient,
    pub nats: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    pub tokens: Arc<auth::Tokens>,
    pub limiter: auth::RateLimiter,
    /// Open event streams per token.
    pub streams: auth::StreamSlots,
    pub cors_origins: Vec<String>,
    pub limits: Limits,
    /// Turns true when the service stops: open event streams end.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// The runtime's metrics (`/metrics` on the health port): HTTP requests by route.
    pub metrics: cim_runtime::metrics::Metrics,
}

/// The validated configuration of `ui-gateway`.
#[derive(Clone, Debug)]
pub struct Settings {
    pub common: CommonSettings,
    pub gateway: GatewayArgs,
}

impl ServiceArgs for Args {
    type Settings = Settings;

    fn validate(self) -> Result<Settings, ConfigError> {
        let common = self.common.settings(COMPONENT)?;
        let g = &self.gateway;
        if g.max_json == 0 {
            return Err(ConfigError::invalid("--gateway-max-json (CIM_GATEWAY_MAX_JSON) must be at least 1"));
        }
        if g.max_upload == 0 {
            return Err(ConfigError::invalid("--gateway-max-upload (CIM_GATEWAY_MAX_UPLOAD) must be at least 1"));
        }
        if g.grpc_listen.0 == Some(g.listen) && g.listen.port() != 0 {
            return Err(ConfigError::invalid(format!(
                "--gateway-grpc-listen (CIM_GATEWAY_GRPC_LISTEN) {} is also --gateway-listen",
                g.listen
            )));
        }
        Ok(Settings { common, gateway: self.gateway })
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
        description: "UI gateway: HTTP, gRPC and the web UI",
        capabilities: vec!["http-api".to_string()],
    }
}

/// Runs the service until `shutdown` completes.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let args = settings.gateway;
    // A restarted gateway waits for the ports the instance it replaces still holds.
    let listener = bind_waiting(args.listen, "the gateway api", PORT_WAIT).await?;
    let grpc = match args.grpc_listen.0 {
        Some(addr) => Some(bind_waiting(addr, "the gateway grpc api", PORT_WAIT).await?),
        None => None,
    };
    Service::new(definition()).setup(move |ctx| setup(ctx, args, listener, grpc)).run(settings.common, shutdown).await
}

async fn setup(
    ctx: cim_runtime::Ctx,
    args: GatewayArgs,
    listener: tokio::net::TcpListener,
    grpc: Option<tokio::net::TcpListener>,
) -> anyhow::Result<Vec<cim_runtime::Endpoint>> {
    let bucket = resources::kv_buckets(COMPONENT)
        .into_iter()
        .find(|b| b.bucket.ends_with(gateway::KV_TOKENS))
        .map(|b| b.bucket)
        .ok_or_else(|| anyhow::anyhow!("cim-events assigns the gateway no token bucket"))?;
    let tokens = auth::Tokens::new(
        ctx.jetstream().get_key_value(&bucket).await.map_err(|e| anyhow::anyhow!("token bucket {bucket}: {e}"))?,
    );
    ctx.spawn("gateway-tokens", tokens.clone().follow(ctx.clone()));
    let state = Arc::new(AppState {
        iu: ctx.iu_client(),
        nats: ctx.client().clone(),
        js: ctx.jetstream().clone(),
        tokens,
        limiter: auth::RateLimiter::new(args.rate_limit),
        streams: auth::StreamSlots::new(args.max_streams),
        cors_origins: args.cors_origins.into_iter().map(|o| o.trim().to_string()).filter(|o| !o.is_empty()).collect(),
        limits: Limits { max_json: args.max_json, max_upload: args.max_upload },
        stopping: ctx.stop_receiver(),
        metrics: ctx.metrics().clone(),
    });
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "gateway api listening");
    if let Some(grpc) = grpc {
        tracing::info!(addr = %grpc.local_addr()?, "gateway grpc listening");
        ctx.spawn("gateway-grpc", grpc::serve(state.clone(), grpc, ctx.clone()));
    }
    let app = api::router(state);
    let c = ctx.clone();
    ctx.spawn("gateway-http", async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(async move { c.stopping().await }).await {
            tracing::error!(error = %e, "gateway api server failed");
        }
    });
    Ok(Vec::new())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn config_parses() {
        let c = Args::try_parse_from([
            "ui-gateway",
            "--gateway-listen",
            "0.0.0.0:9000",
            "--gateway-grpc-listen",
            "off",
            "--gateway-cors-origins",
            "http://a,http://b",
        ])
        .unwrap();
        assert_eq!(c.gateway.listen.port(), 9000);
        assert_eq!(c.gateway.grpc_listen, OptionalAddr(None));
        assert_eq!(c.gateway.cors_origins, vec!["http://a", "http://b"]);
        let d = Args::try_parse_from(["ui-gateway"]).unwrap();
        assert_eq!(d.gateway.grpc_listen.0.map(|a| a.port()), Some(8481));
        assert!(Args::try_parse_from(["ui-gateway", "--gateway-grpc-listen", "nope"]).is_err());
    }

    fn validate(args: &[&str]) -> Result<Settings, String> {
        Args::validate_args(args)
    }

    #[test]
    fn refusals_name_the_flag() {
        assert!(validate(&[]).is_ok());
        for flag in ["--gateway-max-json", "--gateway-max-upload"] {
            let e = validate(&[flag, "0"]).unwrap_err();
            assert!(e.contains(flag), "{flag}: {e}");
        }
        let e =
            validate(&["--gateway-listen", "127.0.0.1:9000", "--gateway-grpc-listen", "127.0.0.1:9000"]).unwrap_err();
        assert!(e.contains("--gateway-grpc-listen"), "{e}");
    }
}
