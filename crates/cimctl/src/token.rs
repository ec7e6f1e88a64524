//! `cimctl token create|revoke|ls`: API tokens of the ui-gateway. A token is shown once, at
//! creation; the `cim_gateway_tokens` KV bucket keeps only its SHA-256, name and role.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use async_nats::jetstream::{self, kv};
use cim_events::{
    Component, Tier,
    gateway::{self, ApiToken},
    resources,
};
use clap::{Args, Subcommand};
use futures::TryStreamExt;
use prost::Message;

#[derive(Args, Debug)]
pub struct TokenArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(long, global = true, env = "CIM_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// NATS credentials file.
    #[arg(long, global = true, env = "CIM_NATS_CREDS")]
    nats_creds: Option<PathBuf>,
    /// JetStream domain of the gateway's token bucket.
    #[arg(long, global = true, env = "CIM_JS_DOMAIN")]
    js_domain: Option<String>,
    /// Tier, for creating the token bucket when the gateway has not yet run (leaf or cluster).
    #[arg(long, global = true, env = "CIM_TIER", default_value = "leaf")]
    tier: String,
    /// Print JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create a token and print it (the only time it is shown).
    Create {
        /// What the token is for (1 to 128 printable characters).
        #[arg(long)]
        name: String,
        /// reader, writer or admin.
        #[arg(long, default_value = "reader")]
        role: String,
    },
    /// Revoke a token by id: it stops working at once.
    Revoke {
        /// The token's id, as `token ls` lists it.
        id: String,
    },
    /// List tokens (never the tokens themselves).
    Ls,
}

async fn bucket(args: &TokenArgs) -> Result<kv::Store> {
    let client = crate::conn::connect("cimctl", &args.nats_url, args.nats_creds.as_deref(), None).await?;
    let js = match &args.js_domain {
        Some(d) => jetstream::with_domain(client, d),
        None => jetstream::new(client),
    };
    let spec = resources::kv_buckets(Component::UiGateway)
        .into_iter()
        .find(|b| b.bucket.ends_with(gateway::KV_TOKENS))
        .context("cim-events assigns the gateway no token bucket")?;
    if let Ok(store) = js.get_key_value(&spec.bucket).await {
        return Ok(store);
    }
    let tier: Tier = args.tier.parse()?;
    js.create_key_value(spec.config(tier)).await.with_context(|| format!("creating the token bucket {}", spec.bucket))
}

fn random_hex(bytes: usize) -> String {
    let mut s = String::new();
    while s.len() < bytes * 2 {
        s.push_str(&uuid::Uuid::new_v4().simple().to_string());
    }
    s.truncate(bytes * 2);
    s
}

pub async fn run(args: TokenArgs) -> Result<ExitCode> {
    match &args.command {
        TokenCommand::Create { name, role } => {
            if gateway::role_rank(role).is_none() {
                let roles = gateway::role::ALL.join(", ");
                return Err(crate::error::usage(format!("unknown role {role:?}: use one of {roles}")));
            }
            if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
                return Err(crate::error::usage("token name must be 1 to 128 characters without control characters"));
            }
            let store = bucket(&args).await?;
            let id = random_hex(8);
            let token = format!("{}{id}_{}", gateway::TOKEN_PREFIX, random_hex(24));
            let created_ms = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
            let record = ApiToken {
                id: id.clone(),
                name: name.clone(),
                role: role.clone(),
                sha256: gateway::hash_token(&token),
                created_ms,
            };
            store
                .create(gateway::token_key(&id)?, record.encode_to_vec().into())
                .await
                .with_context(|| format!("storing token {id}"))?;
            if args.json {
                println!("{}", serde_json::json!({ "id": id, "name": name, "role": role, "token": token }));
            } else {
                eprintln!("token {id} ({role}) created; it is shown only once:");
                println!("{token}");
            }
        }
        TokenCommand::Revoke { id } => {
            let store = bucket(&args).await?;
            let key = gateway::token_key(id)?;
            if store.get(&key).await.context("reading the token bucket")?.is_none() {
                eprintln!("cimctl: no token {id}");
                return Ok(ExitCode::from(1));
            }
            store.purge(&key).await.with_context(|| format!("revoking token {id}"))?;
            if args.json {
                println!("{}", serde_json::json!({ "revoked": id }));
            } else {
                println!("revoked {id}");
            }
        }
        TokenCommand::Ls => {
            let store = bucket(&args).await?;
            let mut keys: Vec<String> =
                store.keys().await.context("listing tokens")?.try_collect().await.context("listing tokens")?;
            keys.sort();
            let mut rows = Vec::new();
            for key in keys {
                if let Some(v) = store.get(&key).await.context("reading a token")?
                    && let Ok(t) = ApiToken::decode(v)
                {
                    rows.push(t);
                }
            }
            if args.json {
                let list: Vec<_> = rows
                    .iter()
                    .map(|t| serde_json::json!({ "id": t.id, "name": t.name, "role": t.role, "created_ms": t.created_ms }))
                    .collect();
                println!("{}", serde_json::Value::Array(list));
            } else {
                println!("{:<18} {:<8} NAME", "ID", "ROLE");
                for t in rows {
                    println!("{:<18} {:<8} {}", t.id, t.role, t.name);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_tokens_have_the_contract_shape() {
        let id = random_hex(8);
        assert_eq!(id.len(), 16);
        let token = format!("{}{id}_{}", gateway::TOKEN_PREFIX, random_hex(24));
        assert_eq!(gateway::token_id(&token), Some(id.as_str()));
        assert_ne!(random_hex(24), random_hex(24));
    }
}
