//! `plugin-native-example`: a native CIM plugin. Any process that answers `InvokeRequest` with
//! `InvokeReply` on `cim.plg.<name>.<version-token>.invoke` and announces itself is a plugin;
//! this one computes SHA-256 digests (capability `checksum.sha256`). Copy it to write your own.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use cim_events::{
    Envelope,
    payload::encode,
    plugin::{self, RUNTIME_NATIVE},
    proto::plugin::{InvokeError, InvokeReply, InvokeRequest, PluginAnnounced, Status},
};
use clap::Parser;
use futures::StreamExt;
use prost::Message as _;
use sha2::{Digest, Sha256};

const CAPABILITY: &str = "checksum.sha256";

#[derive(Parser, Debug)]
#[command(name = "plugin-native-example", version, about = "Example native CIM plugin: SHA-256 digests")]
struct Args {
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "CIM_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// NATS credentials file.
    #[arg(long, env = "CIM_NATS_CREDS")]
    nats_creds: Option<std::path::PathBuf>,
    /// Plugin name.
    #[arg(long, env = "CIM_PLUGIN_NAME", default_value = "sha256")]
    name: String,
    /// Plugin version.
    #[arg(long = "plugin-version", env = "CIM_PLUGIN_VERSION", default_value = "1.0.0")]
    plugin_version: String,
    /// How often to announce (milliseconds).
    #[arg(long, env = "CIM_PLUGIN_ANNOUNCE_MS", default_value_t = 5000)]
    announce_ms: u32,
}

/// The plugin's work: pure, so it is easy to test.
fn handle(req: InvokeRequest) -> InvokeReply {
    let started = Instant::now();
    if req.metadata.get("encoding").is_some_and(|e| e != "hex") {
        let status = Status::InvalidInput;
        return InvokeReply {
            status: status as i32,
            error: Some(InvokeError { status: status as i32, message: "only encoding=hex is supported".into() }),
            ..Default::default()
        };
    }
    let hex: String = Sha256::digest(&req.input).iter().map(|b| format!("{b:02x}")).collect();
    let mut reply = InvokeReply { status: Status::Ok as i32, output: hex.clone().into_bytes(), ..Default::default() };
    reply.metadata.insert("sha256".into(), hex);
    reply.metadata.insert("size".into(), req.input.len().to_string());
    reply.duration_us = started.elapsed().as_micros() as u64;
    reply
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let invoke = plugin::invoke_subject(&args.name, &args.plugin_version)?;
    let announce = plugin::announce_subject(&args.name, &args.plugin_version)?;
    let mut opts = async_nats::ConnectOptions::new()
        .name(format!("plugin/{}", plugin::reference(&args.name, &args.plugin_version)))
        .retry_on_initial_connect();
    if let Some(creds) = &args.nats_creds {
        opts = opts.credentials_file(creds).await?;
    }
    let urls: Vec<async_nats::ServerAddr> =
        args.nats_url.split(',').map(|u| u.trim().parse()).collect::<Result<_, _>>()?;
    let client = opts.connect(urls).await?;
    let instance = format!("{}-{}", args.name, uuid::Uuid::now_v7().simple());
    // The digest of a native plugin is the digest of its executable.
    let digest = std::env::current_exe()
        .and_then(std::fs::read)
        .map(|b| format!("sha256:{}", Sha256::digest(&b).iter().map(|x| format!("{x:02x}")).collect::<String>()))
        .unwrap_or_default();
    let me = Arc::new(PluginAnnounced {
        name: args.name.clone(),
        version: args.plugin_version.clone(),
        digest,
        capabilities: vec![CAPABILITY.to_string()],
        runtime: RUNTIME_NATIVE.to_string(),
        subject: invoke.clone(),
        instance_id: instance.clone(),
        description: "sha-256 digest of the input, as hex".to_string(),
        every_ms: args.announce_ms,
    });

    let mut requests =
        client.queue_subscribe(invoke.clone(), plugin::queue_group(&args.name, &args.plugin_version)?).await?;
    let c = client.clone();
    let announcer = tokio::spawn(async move {
        loop {
            let (headers, body) =
                encode(&Envelope::root::<PluginAnnounced>(format!("/native/{instance}")), me.as_ref());
            let _ = c.publish_with_headers(announce.clone(), headers, body).await;
            tokio::time::sleep(Duration::from_millis(u64::from(me.every_ms.max(100)))).await;
        }
    });
    tracing::info!(subject = %invoke, "serving");
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    };
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            m = requests.next() => {
                let Some(m) = m else { break };
                let reply = match InvokeRequest::decode(m.payload.clone()) {
                    Ok(req) => handle(req),
                    Err(e) => {
                        let s = Status::BadRequest;
                        InvokeReply { status: s as i32, error: Some(InvokeError { status: s as i32, message: format!("undecodable invoke request: {e}") }), ..Default::default() }
                    }
                };
                if let Some(to) = m.reply {
                    let mut headers = async_nats::HeaderMap::new();
                    if let Some(e) = &reply.error {
                        headers.insert("Nats-Service-Error-Code", "400");
                        headers.insert("Nats-Service-Error", e.message.as_str());
                    }
                    let _ = client.publish_with_headers(to, headers, Bytes::from(reply.encode_to_vec())).await;
                }
            }
            _ = &mut shutdown => break,
        }
    }
    announcer.abort();
    let _ = requests.unsubscribe().await;
    client.drain().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }

    #[test]
    fn digests_and_refuses_unknown_encodings() {
        let r = handle(InvokeRequest { input: b"abc".to_vec(), ..Default::default() });
        assert_eq!(r.status, Status::Ok as i32);
        assert_eq!(
            String::from_utf8(r.output).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut req = InvokeRequest::default();
        req.metadata.insert("encoding".into(), "base64".into());
        assert_eq!(handle(req).status, Status::InvalidInput as i32);
    }
}
