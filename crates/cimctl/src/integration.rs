//! `cimctl integration`: the integration hub's webhook sources and outbound subscriptions —
//! list them, add one to the declarative configuration file, pause, resume, and read a
//! subscription's delivery log.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use cim_events::{
    hub,
    proto::hub::{SubscriptionCommand, SubscriptionStateChanged},
};
use prost::Message as _;
use serde_json::{Value, json};

#[derive(clap::Args, Debug)]
pub struct IntegrationArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(long, global = true, env = "CIM_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// NATS credentials file (JWT + NKey seed).
    #[arg(long, global = true, env = "CIM_NATS_CREDS")]
    nats_creds: Option<PathBuf>,
    /// Timeout of each request, in seconds.
    #[arg(long, global = true, default_value_t = 10.0)]
    timeout: f64,
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: IntegrationCommand,
}

#[derive(clap::Subcommand, Debug)]
enum IntegrationCommand {
    /// Webhook sources and outbound subscriptions of the running hub, with their state.
    #[command(alias = "ls")]
    List,
    /// Add a webhook source or a subscription to the hub's configuration file (validated
    /// first; the hub applies it when restarted).
    Add {
        /// The hub's configuration file (created when missing).
        #[arg(long, env = "CIM_HUB_CONFIG")]
        config: PathBuf,
        #[command(subcommand)]
        what: AddWhat,
    },
    /// Pause a subscription: events wait in its consumer, nothing is sent.
    Pause {
        /// The subscription's name.
        name: String,
        /// Why, recorded with the pause.
        #[arg(long, default_value = "paused with cimctl")]
        reason: String,
    },
    /// Resume a paused subscription; waiting events are delivered in order.
    Resume {
        /// The subscription's name.
        name: String,
        /// Why, recorded with the resumption.
        #[arg(long, default_value = "resumed with cimctl")]
        reason: String,
    },
    /// The latest entries of a subscription's delivery log.
    Deliveries {
        /// The subscription's name.
        name: String,
        /// At most N entries, newest first.
        #[arg(long, value_name = "N", default_value_t = 20)]
        limit: u64,
    },
}

#[derive(clap::Subcommand, Debug)]
enum AddWhat {
    /// An inbound webhook source, served on POST /webhooks/<name>.
    Webhook {
        /// The source's name (its path is /webhooks/<name>).
        #[arg(long)]
        name: String,
        /// File holding the secret (`whsec_<base64>` or raw text).
        #[arg(long, conflicts_with = "secret_env", required_unless_present = "secret_env")]
        secret_file: Option<PathBuf>,
        /// Environment variable holding the secret, where the hub runs.
        #[arg(long)]
        secret_env: Option<String>,
        /// event (default) or unit.
        #[arg(long, default_value = "event")]
        target: String,
        /// json (default) or any.
        #[arg(long, default_value = "json")]
        content: String,
    },
    /// An outbound subscription: events matching FILTER are POSTed to URL.
    Subscription {
        /// The subscription's name.
        #[arg(long)]
        name: String,
        /// Which events: a subject filter over CIM events (docs/integration-hub.md has examples).
        #[arg(long)]
        filter: String,
        /// Where to POST them.
        #[arg(long)]
        url: String,
        /// File holding the signing secret (`whsec_<base64>` or raw text).
        #[arg(long, conflicts_with = "secret_env", required_unless_present = "secret_env")]
        secret_file: Option<PathBuf>,
        /// Environment variable holding the signing secret, where the hub runs.
        #[arg(long)]
        secret_env: Option<String>,
        /// Attempts per event before it is dead-lettered.
        #[arg(long, default_value_t = 8)]
        max_attempts: u32,
        /// new (default) or all.
        #[arg(long, default_value = "new")]
        deliver: String,
        /// Also allow this address or CIDR block (outbound_allow).
        #[arg(long)]
        allow: Vec<String>,
    },
}

pub async fn run(args: IntegrationArgs) -> Result<ExitCode> {
    if let IntegrationCommand::Add { config, what } = args.command {
        return add(&config, what);
    }
    let client = crate::conn::connect("cimctl", &args.nats_url, args.nats_creds.as_deref(), None).await?;
    let timeout = Duration::from_secs_f64(args.timeout);
    let request = |subject: String, body: Vec<u8>| {
        let client = client.clone();
        async move {
            const HUB: &str = "integration-hub";
            let reply = tokio::time::timeout(timeout, client.request(subject.clone(), body.into()))
                .await
                .map_err(|_| crate::conn::no_answer(HUB, &subject, timeout))?
                .map_err(|e| crate::conn::request_failed(HUB, &subject, &e))?;
            if let Some(e) = crate::conn::refused(HUB, reply.headers.as_ref()) {
                return Err(e);
            }
            Ok(reply.payload)
        }
    };
    match args.command {
        IntegrationCommand::Add { .. } => unreachable!("handled above"),
        IntegrationCommand::List => {
            let sources: Value = serde_json::from_slice(&request(hub::query(hub::qry::SOURCES)?, Vec::new()).await?)?;
            let subs: Value =
                serde_json::from_slice(&request(hub::query(hub::qry::SUBSCRIPTIONS)?, Vec::new()).await?)?;
            if args.json {
                println!(
                    "{}",
                    json!({ "webhook_addr": sources["webhook_addr"], "webhooks": sources["webhooks"], "subscriptions": subs["subscriptions"] })
                );
                return Ok(ExitCode::SUCCESS);
            }
            match sources["webhook_addr"].as_str() {
                Some(addr) => println!("webhooks on http://{addr}"),
                None => println!("webhooks: none configured"),
            }
            for w in sources["webhooks"].as_array().into_iter().flatten() {
                println!(
                    "  {:<20} {:<8} {}",
                    w["name"].as_str().unwrap_or(""),
                    w["target"].as_str().unwrap_or(""),
                    w["path"].as_str().unwrap_or("")
                );
            }
            println!("subscriptions");
            for s in subs["subscriptions"].as_array().into_iter().flatten() {
                let state = if s["paused"] == true { "paused" } else { "active" };
                println!(
                    "  {:<20} {:<7} pending {:<6} {} -> {}",
                    s["name"].as_str().unwrap_or(""),
                    state,
                    s["pending"],
                    s["filter"].as_str().unwrap_or(""),
                    s["url"].as_str().unwrap_or("")
                );
            }
        }
        IntegrationCommand::Pause { name, reason } => {
            state(&request, &args.json, hub::cmd::PAUSE, name, reason).await?
        }
        IntegrationCommand::Resume { name, reason } => {
            state(&request, &args.json, hub::cmd::RESUME, name, reason).await?
        }
        IntegrationCommand::Deliveries { name, limit } => {
            let log: Value = serde_json::from_slice(
                &request(
                    hub::query(hub::qry::DELIVERIES)?,
                    json!({ "subscription": name, "limit": limit }).to_string().into_bytes(),
                )
                .await?,
            )?;
            if args.json {
                println!("{log}");
                return Ok(ExitCode::SUCCESS);
            }
            for d in log["deliveries"].as_array().into_iter().flatten() {
                let outcome = if d["delivered"] == true {
                    "delivered".to_string()
                } else {
                    format!("dead-lettered: {}", d["last_error"].as_str().unwrap_or(""))
                };
                println!(
                    "{:>8} {:<40} attempts {:<3} http {:<4} {}",
                    d["event_sequence"],
                    d["event_subject"].as_str().unwrap_or(""),
                    d["attempts"],
                    d["http_status"],
                    outcome
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn state<F, Fut>(request: &F, json_out: &bool, cmd: &str, name: String, reason: String) -> Result<()>
where
    F: Fn(String, Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = Result<bytes::Bytes>>,
{
    let body = SubscriptionCommand { subscription: name, reason }.encode_to_vec();
    let change = SubscriptionStateChanged::decode(request(hub::command(cmd)?, body).await?)?;
    if *json_out {
        println!("{}", json!({ "subscription": change.subscription, "paused": change.paused }));
    } else {
        println!("{} {}", change.subscription, if change.paused { "paused" } else { "resumed" });
    }
    Ok(())
}

/// Appends a source or subscription to the configuration file; the result must validate.
fn add(path: &std::path::Path, what: AddWhat) -> Result<ExitCode> {
    let mut doc: Value = match std::fs::read_to_string(path) {
        Ok(text) => crate::error::parse_json(&text).map_err(|why| anyhow::anyhow!("{}: {why}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => json!({}),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let secret = |file: Option<PathBuf>, env: Option<String>| match (file, env) {
        (Some(f), _) => json!({ "secret_file": f }),
        (None, Some(e)) => json!({ "secret_env": e }),
        (None, None) => json!({}),
    };
    let (list, mut entry, allow) = match what {
        AddWhat::Webhook { name, secret_file, secret_env, target, content } => {
            let mut e = secret(secret_file, secret_env);
            e["name"] = json!(name);
            e["target"] = json!(target);
            e["content"] = json!(content);
            ("webhooks", e, Vec::new())
        }
        AddWhat::Subscription { name, filter, url, secret_file, secret_env, max_attempts, deliver, allow } => {
            let mut e = secret(secret_file, secret_env);
            e["name"] = json!(name);
            e["filter"] = json!(filter);
            e["url"] = json!(url);
            e["max_attempts"] = json!(max_attempts);
            e["deliver"] = json!(deliver);
            ("subscriptions", e, allow)
        }
    };
    let obj = doc.as_object_mut().context("the configuration file must hold a JSON object")?;
    let entries = obj.entry(list).or_insert_with(|| json!([]));
    entries.as_array_mut().context("expected a list")?.push(entry.take());
    let allowed = obj.entry("outbound_allow").or_insert_with(|| json!([]));
    for a in allow {
        allowed.as_array_mut().context("outbound_allow must be a list")?.push(json!(a));
    }
    let text = serde_json::to_string_pretty(&doc)?;
    cim_hub_config::validate(&text).map_err(|e| anyhow::anyhow!("{e}; {} left unchanged", path.display()))?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    eprintln!("added to {}; restart integration-hub to apply", path.display());
    Ok(ExitCode::SUCCESS)
}
