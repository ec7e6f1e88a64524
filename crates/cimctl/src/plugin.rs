//! `cimctl plugin`: push, list, invoke and remove plugins through the plugin host's contract
//! (`cim_events::plugin`).

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use bytes::Bytes;
use cim_events::{
    plugin,
    proto::plugin::{
        InvokeReply, InvokeRequest, Limits, ListPlugins, ListReply, Manifest, PushPlugin, PushReply, RemovePlugin,
        RemoveReply, Status,
    },
};
use prost::Message as _;
use serde_json::json;
use tokio::io::AsyncWriteExt;

#[derive(clap::Args, Debug)]
pub struct PluginArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(long, global = true, env = "CIM_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// NATS credentials file (JWT + NKey seed).
    #[arg(long, global = true, env = "CIM_NATS_CREDS")]
    nats_creds: Option<PathBuf>,
    /// JetStream domain of the artifact bucket (e.g. a leaf node's).
    #[arg(long, global = true, env = "CIM_JS_DOMAIN")]
    js_domain: Option<String>,
    /// Timeout of each request, in seconds.
    #[arg(long, global = true, default_value_t = 30.0)]
    timeout: f64,
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: PluginCommand,
}

#[derive(clap::Subcommand, Debug)]
enum PluginCommand {
    /// Store a WebAssembly module (.wasm, or .wat text) as NAME@VERSION. Versions are immutable.
    Push(PushArgs),
    /// List plugins (WebAssembly versions and live native plugins).
    Ls {
        /// Only this plugin name.
        #[arg(long)]
        name: Option<String>,
        /// Only plugins with this capability.
        #[arg(long)]
        capability: Option<String>,
    },
    /// Invoke NAME[@VERSION] (or --capability) on stdin or --input; output goes to stdout.
    Invoke {
        /// NAME or NAME@VERSION (newest version when omitted).
        plugin: Option<String>,
        /// Pick a plugin by capability instead of name.
        #[arg(long, conflicts_with = "plugin")]
        capability: Option<String>,
        /// Input file (default: stdin).
        #[arg(long)]
        input: Option<PathBuf>,
        /// Metadata KEY=VALUE (repeatable).
        #[arg(long = "meta", value_parser = parse_kv)]
        meta: Vec<(String, String)>,
        /// Deadline in milliseconds (0: the plugin's own).
        #[arg(long, default_value_t = 0)]
        deadline_ms: u32,
    },
    /// Remove NAME@VERSION (refused while a pipeline references it).
    Rm {
        /// NAME@VERSION
        plugin: String,
        /// Why, recorded with the removal.
        #[arg(long, default_value = "removed with cimctl")]
        reason: String,
    },
}

#[derive(clap::Args, Debug)]
struct PushArgs {
    /// The module: WebAssembly binary, or WAT text when it ends in .wat.
    file: PathBuf,
    /// The plugin's name (lower case, digits and `-`).
    #[arg(long)]
    name: String,
    /// The version to store it as, e.g. 1.0.0 (a version, once pushed, never changes).
    #[arg(long = "version")]
    version: String,
    /// A capability it provides, e.g. text.normalize (repeatable).
    #[arg(long = "capability")]
    capabilities: Vec<String>,
    /// What the plugin does, for `plugin ls`.
    #[arg(long, default_value = "")]
    description: String,
    /// Memory limit in bytes (0: the host's maximum).
    #[arg(long, default_value_t = 0)]
    memory: u64,
    /// Fuel limit (0: the host's maximum).
    #[arg(long, default_value_t = 0)]
    fuel: u64,
    /// Deadline in milliseconds (0: the host's maximum).
    #[arg(long, default_value_t = 0)]
    timeout_ms: u32,
    /// A read-only directory the plugin asks for, by name (repeatable; the operator must allow it).
    #[arg(long = "dir")]
    directories: Vec<String>,
    /// Ask for network access (refused for WebAssembly).
    #[arg(long)]
    network: bool,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

const HOST: &str = "plugin-host";

/// A connection to the plugin host.
pub struct PluginClient {
    pub client: async_nats::Client,
    js: async_nats::jetstream::Context,
    timeout: Duration,
}

impl PluginClient {
    pub fn new(client: async_nats::Client, js_domain: Option<&str>, timeout: Duration) -> PluginClient {
        let js = match js_domain {
            Some(d) if !d.is_empty() => async_nats::jetstream::with_domain(client.clone(), d),
            _ => async_nats::jetstream::new(client.clone()),
        };
        PluginClient { client, js, timeout }
    }

    async fn request(&self, subject: String, body: Vec<u8>) -> Result<async_nats::Message> {
        let m = tokio::time::timeout(self.timeout, self.client.request(subject.clone(), Bytes::from(body)))
            .await
            .map_err(|_| crate::conn::no_answer(HOST, &subject, self.timeout))?
            .map_err(|e| crate::conn::request_failed(HOST, &subject, &e))?;
        Ok(m)
    }

    async fn command<R: prost::Message + Default>(&self, subject: String, body: Vec<u8>) -> Result<R> {
        let m = self.request(subject, body).await?;
        if let Some(e) = crate::conn::refused(HOST, m.headers.as_ref()) {
            return Err(e);
        }
        Ok(R::decode(m.payload)?)
    }

    /// Uploads the module, then asks the host to verify and record it.
    pub async fn push(&self, manifest: Manifest, wasm: Vec<u8>) -> Result<PushReply> {
        let bucket = self
            .js
            .get_object_store(plugin::ARTIFACTS_BUCKET)
            .await
            .context("opening the artifact bucket (is plugin-host running?)")?;
        let upload = plugin::upload_object(&uuid_like())?;
        bucket.put(upload.as_str(), &mut wasm.as_slice()).await.context("uploading the module")?;
        let req = PushPlugin { manifest: Some(manifest), upload: upload.clone() };
        let r = self.command(plugin::command(plugin::cmd::PUSH)?, req.encode_to_vec()).await;
        if r.is_err() {
            let _ = bucket.delete(&upload).await;
        }
        r
    }

    pub async fn list(&self, q: ListPlugins) -> Result<ListReply> {
        self.command(plugin::query(plugin::qry::LIST)?, q.encode_to_vec()).await
    }

    pub async fn remove(&self, name: &str, version: &str, reason: &str) -> Result<RemoveReply> {
        let req = RemovePlugin { name: name.into(), version: version.into(), reason: reason.into() };
        self.command(plugin::command(plugin::cmd::REMOVE)?, req.encode_to_vec()).await
    }

    /// Routes through the host (`cim.cmd.plugin.invoke`); the reply carries the status.
    pub async fn invoke(&self, req: &InvokeRequest) -> Result<InvokeReply> {
        let m = self.request(plugin::command(plugin::cmd::INVOKE)?, req.encode_to_vec()).await?;
        Ok(InvokeReply::decode(m.payload)?)
    }
}

fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let n = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{n:x}-{}", std::process::id())
}

pub async fn run(args: PluginArgs) -> Result<ExitCode> {
    let client = crate::conn::connect("cimctl", &args.nats_url, args.nats_creds.as_deref(), None).await?;
    let pc = PluginClient::new(client.clone(), args.js_domain.as_deref(), Duration::from_secs_f64(args.timeout));
    let code = match args.command {
        PluginCommand::Push(p) => {
            let bytes = tokio::fs::read(&p.file).await.with_context(|| format!("cannot read {}", p.file.display()))?;
            let wasm = if p.file.extension().is_some_and(|e| e == "wat") {
                wat::parse_bytes(&bytes).with_context(|| format!("{} is not valid WAT", p.file.display()))?.into_owned()
            } else {
                bytes
            };
            let manifest = Manifest {
                name: p.name,
                version: p.version,
                capabilities: p.capabilities,
                description: p.description,
                limits: Some(Limits { memory_bytes: p.memory, fuel: p.fuel, timeout_ms: p.timeout_ms }),
                directories: p.directories,
                network: p.network,
            };
            let r = pc.push(manifest, wasm).await?;
            let info = r.plugin.unwrap_or_default();
            if args.json {
                println!(
                    "{}",
                    json!({"name": info.name, "version": info.version, "digest": info.digest, "size": info.size, "state": info.state, "already_present": r.already_present})
                );
            } else {
                let what = if r.already_present { "already present" } else { "pushed" };
                println!(
                    "{what} {} {} ({} bytes, {})",
                    plugin::reference(&info.name, &info.version),
                    info.digest,
                    info.size,
                    info.state
                );
            }
            ExitCode::SUCCESS
        }
        PluginCommand::Ls { name, capability } => {
            let r = pc
                .list(ListPlugins { name: name.unwrap_or_default(), capability: capability.unwrap_or_default() })
                .await?;
            if args.json {
                let items: Vec<_> = r
                    .plugins
                    .iter()
                    .map(|p| json!({"name": p.name, "version": p.version, "runtime": p.runtime, "digest": p.digest, "size": p.size, "capabilities": p.capabilities, "state": p.state, "subject": p.subject, "builtin": p.builtin}))
                    .collect();
                println!("{}", serde_json::Value::Array(items));
            } else {
                println!(
                    "{:<24} {:<12} {:<7} {:<24} {:<20} STATE",
                    "NAME", "VERSION", "RUNTIME", "CAPABILITIES", "DIGEST"
                );
                for p in r.plugins {
                    let short = p.digest.get(..19).unwrap_or(&p.digest);
                    println!(
                        "{:<24} {:<12} {:<7} {:<24} {:<20} {}",
                        p.name,
                        p.version,
                        p.runtime,
                        p.capabilities.join(","),
                        short,
                        p.state
                    );
                }
            }
            ExitCode::SUCCESS
        }
        PluginCommand::Invoke { plugin: target, capability, input, meta, deadline_ms } => {
            let (name, version) = match &target {
                Some(t) => {
                    let (n, v) = plugin::parse_reference(t)?;
                    (n, v.unwrap_or_default())
                }
                None if capability.is_some() => (String::new(), String::new()),
                None => return Err(crate::error::usage("name a plugin (NAME[@VERSION]) or a --capability")),
            };
            let input = match input {
                Some(p) => tokio::fs::read(&p).await.with_context(|| format!("cannot read {}", p.display()))?,
                None => {
                    let mut buf = Vec::new();
                    tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::stdin(), &mut buf).await?;
                    buf
                }
            };
            let req = InvokeRequest {
                plugin: name,
                version,
                capability: capability.unwrap_or_default(),
                input,
                metadata: meta.into_iter().collect(),
                timeout_ms: deadline_ms,
            };
            let r = pc.invoke(&req).await?;
            let status = Status::try_from(r.status).unwrap_or(Status::Unspecified);
            if status != Status::Ok {
                let msg = r.error.map(|e| e.message).unwrap_or_default();
                eprintln!(
                    "cimctl: {} failed: {} {msg}",
                    plugin::reference(&r.plugin, &r.version),
                    status.as_str_name()
                );
                return Ok(ExitCode::from(2));
            }
            let mut out = tokio::io::stdout();
            match async {
                out.write_all(&r.output).await?;
                out.flush().await
            }
            .await
            {
                Ok(()) => {}
                // The reader went away (`cimctl plugin invoke ... | head`): not an error of ours.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(ExitCode::SUCCESS),
                Err(e) => return Err(e.into()),
            }
            for (k, v) in &r.metadata {
                eprintln!("{k}: {v}");
            }
            ExitCode::SUCCESS
        }
        PluginCommand::Rm { plugin: target, reason } => {
            let (name, version) = plugin::parse_reference(&target)?;
            let Some(version) = version else {
                return Err(crate::error::usage("name the version to remove: NAME@VERSION"));
            };
            pc.remove(&name, &version, &reason).await?;
            println!("removed {}", plugin::reference(&name, &version));
            ExitCode::SUCCESS
        }
    };
    client.flush().await?;
    Ok(code)
}
