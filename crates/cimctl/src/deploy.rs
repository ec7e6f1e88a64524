//! `cimctl deploy`: what a deployment derives from the contract in `cim-events`.
//!
//! `cimctl deploy nats-permissions --json` prints, for every service, the NATS publish and
//! subscribe permissions of its own identity, built from the subjects, streams and buckets
//! `cim-events` assigns to that service (never spelled here). The NixOS modules read the
//! committed copy in `nixos-modules/nats-permissions.json`; an integration test fails when
//! that copy is stale (`CIM_BLESS=1` rewrites it).
//!
//! A service may:
//! - publish its own events, lifecycle messages and dead letters (`cim.evt|svc|dlq.<token>.>`);
//! - receive its own commands and queries (`cim.cmd|qry.<token>.>`), the micro services
//!   protocol's discovery requests (`$SRV.<verb>`, `$SRV.<verb>.cim-<token>[.<id>]`) and
//!   control messages (`cim.ctl.all.*`, `cim.ctl.node.*.*`, `cim.ctl.instance.*.*`);
//! - answer any request it received (`allow_responses`), and receive replies to its own
//!   requests below its own inbox prefix only (`_INBOX.cim-<token>.>`, set by cim-runtime), so
//!   no service reads the replies another one gets;
//! - use the JetStream API on its own streams and buckets only, with or without a JetStream
//!   domain (`$JS.API.…` and `$JS.<domain>.API.…`): its event stream can be created, read and
//!   consumed but not updated, deleted or purged (history is immutable: no identity of a
//!   service can shorten its limits; a changed configuration is applied by the operator with
//!   `cimctl deploy provision`); its dead letters, KV and object buckets fully; and read its
//!   account's JetStream information;
//! - in another component's bucket it writes into (unit content, plugin references), publish
//!   entries and read them, never purge, delete, reconfigure or delete single messages;
//! - plus, for the registry, what it does with the others: listen to every lifecycle message
//!   (`cim.svc.>`), ask any component's instances to describe themselves
//!   (`cim.qry.<token>.describe`), and send control messages (`cim.ctl.>`);
//! - plus, for the gateway, the pipeline engine, the storage manager and the integration hub,
//!   what each does with the others (see `permissions`).

use std::process::ExitCode;

use anyhow::Result;
use cim_events::{
    Component,
    resources::{self, StreamRole},
    subject::{self, ControlAction, Lifecycle, MicroVerb},
};
use serde_json::{Value, json};

/// The command that writes `nixos-modules/nats-permissions.json`.
pub const GENERATED_BY: &str = "cimctl deploy nats-permissions --json";

#[derive(clap::Args, Debug)]
pub struct DeployArgs {
    #[command(subcommand)]
    command: DeployCommand,
}

#[derive(clap::Subcommand, Debug)]
enum DeployCommand {
    /// Per-service NATS permissions (publish/subscribe allow lists), from cim-events.
    NatsPermissions {
        /// Print JSON (what nixos-modules/nats-permissions.json holds) instead of a listing.
        #[arg(long)]
        json: bool,
    },
    /// Create or update a service's streams and buckets as the operator: what a service's own
    /// identity may not do, such as applying a changed configuration to its event stream.
    Provision(ProvisionArgs),
}

#[derive(clap::Args, Debug)]
struct ProvisionArgs {
    /// The service (e.g. `information-unit`); every service when absent.
    #[arg(long)]
    service: Vec<String>,
    /// The tier the streams are for (`leaf` or `cluster`: replicas).
    #[arg(long, default_value = "leaf")]
    tier: cim_events::Tier,
    /// The duplicate window of the event streams (the services' `--retry-horizon`).
    #[arg(long, default_value = "24h", value_parser = cim_runtime::config::parse_duration)]
    retry_horizon: std::time::Duration,
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "CIM_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// NATS credentials file of an identity that may manage the streams (the operator's).
    #[arg(long, env = "CIM_NATS_CREDS")]
    nats_creds: Option<std::path::PathBuf>,
    /// JetStream domain (a leaf node's own domain, or the hub's).
    #[arg(long, env = "CIM_JS_DOMAIN")]
    js_domain: Option<String>,
}

async fn provision(args: ProvisionArgs) -> Result<ExitCode> {
    let components = if args.service.is_empty() {
        Component::ALL.to_vec()
    } else {
        let mut list = Vec::new();
        for name in &args.service {
            let c = Component::parse(name).map_err(|e| crate::error::Usage(e.to_string()))?;
            list.push(c);
        }
        list
    };
    let client = crate::conn::connect("cimctl", &args.nats_url, args.nats_creds.as_deref(), None).await?;
    let js = match args.js_domain.as_deref() {
        Some(d) if !d.is_empty() => async_nats::jetstream::with_domain(client, d),
        _ => async_nats::jetstream::new(client),
    };
    for c in components {
        cim_runtime::provision::provision_component(
            &js,
            c,
            args.tier,
            args.retry_horizon,
            cim_runtime::provision::Updates::All,
        )
        .await
        .map_err(|e| anyhow::anyhow!("{}: {e}", c.service_name()))?;
        println!("{}: provisioned", c.service_name());
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn run(args: DeployArgs) -> Result<ExitCode> {
    match args.command {
        DeployCommand::NatsPermissions { json } => {
            let all = all_permissions()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                for c in Component::ALL {
                    let p = permissions(c)?;
                    println!("{} (user {}):", c.service_name(), c.service_name());
                    for (what, list) in [("publish", &p.publish), ("subscribe", &p.subscribe)] {
                        for s in list {
                            println!("  {what:<9} {s}");
                        }
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DeployCommand::Provision(args) => provision(args).await,
    }
}

/// The allow lists of one service's NATS identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// `{"generated_by": …, "services": {"<service>": {"publish": {"allow": […]}, "subscribe":
/// {"allow": […]}, "allow_responses": true}}}`: each service's entry is a nats-server
/// `permissions` block as it is.
pub fn all_permissions() -> Result<Value> {
    let mut services = serde_json::Map::new();
    for c in Component::ALL {
        let p = permissions(c)?;
        services.insert(
            c.service_name().to_string(),
            json!({
                "publish": { "allow": p.publish },
                "subscribe": { "allow": p.subscribe },
                "allow_responses": true,
            }),
        );
    }
    Ok(json!({
        "generated_by": GENERATED_BY,
        "services": services,
        "leaf_mirrors": {
            "service": Component::StorageManager.service_name(),
            "placeholder": LEAF_PLACEHOLDER,
            "publish": leaf_mirror_permissions()?,
        },
        "native_plugins": native_plugin_permissions()?,
        "restore": restore_permissions()?,
    }))
}

/// The NATS user `cimctl restore` runs as (`nats-auth.nix`: `restorePasswordHash`).
pub const RESTORE_USER: &str = "restore";

/// The identity of `cimctl restore`: it may write the archived streams (every component's
/// events, dead letters and object buckets) into a fresh JetStream and nothing else — publish
/// on those streams' subjects; create, read, reconfigure (the duplicate window, deletes while it
/// restores), purge (to start at the first archived sequence) and delete single messages of
/// those streams only; read its account's JetStream information; and receive the replies to its
/// own requests below its inbox prefix. No command, query, control or lifecycle subject, no
/// KV bucket and no other stream: a leaked restore credential cannot act as a service.
pub fn restore_permissions() -> Result<Value> {
    let mut publish = Vec::new();
    let mut streams = Vec::new();
    for c in Component::ALL {
        for s in resources::streams(c) {
            publish.extend(s.subjects.iter().cloned());
            streams.push(s.name);
        }
        for b in resources::object_buckets(c) {
            publish.push(below(&subject::all_object_chunks(&b.bucket)?, 2));
            streams.push(b.stream_name());
        }
    }
    debug_assert_eq!(streams, cim_archive::archived_streams(), "restore writes what is archived");
    for api in JS_API {
        publish.push(format!("{api}.INFO"));
        for stream in &streams {
            for verb in ["INFO", "CREATE", "UPDATE", "PURGE", "MSG.DELETE"] {
                publish.push(format!("{api}.STREAM.{verb}.{stream}"));
            }
        }
    }
    Ok(json!({
        "user": RESTORE_USER,
        "publish": { "allow": publish },
        "subscribe": { "allow": [format!("{}.>", cim_archive::restore::inbox_prefix())] },
        "allow_responses": false,
    }))
}

/// Stands for a plugin's name in `native_plugins`.
pub const PLUGIN_PLACEHOLDER: &str = "PLUGIN_NAME";

/// The identity of a process that serves one native plugin (any language: the Rust example,
/// the Python SDK): it may announce that plugin's versions and receive their invocations, and
/// answer them — nothing else, so only identities the operator lists serve a plugin name.
/// `nats-auth.nix` makes one user `plugin-<name>` per entry of `nativePlugins`, replacing
/// [`PLUGIN_PLACEHOLDER`].
pub fn native_plugin_permissions() -> Result<Value> {
    let (invocations, announcements) = cim_events::plugin::every_version_of(PLUGIN_PLACEHOLDER)?;
    Ok(json!({
        "placeholder": PLUGIN_PLACEHOLDER,
        "user_prefix": "plugin-",
        "publish": { "allow": [announcements] },
        "subscribe": { "allow": [invocations] },
        "allow_responses": true,
    }))
}

/// Stands for a leaf's JetStream domain, upper-cased as in mirror names, in `leaf_mirrors`.
pub const LEAF_PLACEHOLDER: &str = "LEAF_DOMAIN";

/// What the storage manager on the cluster needs beyond its own identity to keep and archive
/// the leaf mirrors (`--source-leaf`): create, update and read each `<STREAM>_FROM_<LEAF>`. Leaf
/// domains are known only to a deployment, so the names carry [`LEAF_PLACEHOLDER`]; the
/// cluster's NATS profile replaces it with each source leaf's upper-cased domain.
pub fn leaf_mirror_permissions() -> Result<Vec<String>> {
    let mut publish = Vec::new();
    for stream in cim_archive::archived_streams() {
        let mirror = resources::leaf_mirror(&stream, LEAF_PLACEHOLDER)?;
        for api in JS_API {
            for verb in ["CREATE", "UPDATE"] {
                publish.push(format!("{api}.STREAM.{verb}.{mirror}"));
            }
        }
        // ...and archives it like its own streams.
        archive_read(&mut publish, &mirror);
    }
    Ok(publish)
}

/// What the storage manager's archiver needs to read `stream`: its configuration (the
/// retention guard), ordered consumers, and single messages and direct gets (objects copied by
/// name, the verifier).
fn archive_read(publish: &mut Vec<String>, stream: &str) {
    for api in JS_API {
        publish.push(format!("{api}.STREAM.INFO.{stream}"));
        publish.push(format!("{api}.STREAM.MSG.GET.{stream}"));
        publish.push(format!("{api}.DIRECT.GET.{stream}"));
        publish.push(format!("{api}.DIRECT.GET.{stream}.>"));
        publish.push(format!("{api}.CONSUMER.CREATE.{stream}"));
        for verb in ["CREATE", "INFO", "DELETE", "MSG.NEXT"] {
            publish.push(format!("{api}.CONSUMER.{verb}.{stream}.>"));
        }
    }
}

/// The first `tokens` tokens of `subject`, then `>`: the wildcard of everything below them.
fn below(subject: &str, tokens: usize) -> String {
    let head: Vec<&str> = subject.split('.').take(tokens).collect();
    format!("{}.>", head.join("."))
}

/// The JetStream API prefixes a client may use: without a domain, and with any domain.
const JS_API: [&str; 2] = ["$JS.API", "$JS.*.API"];

/// Consumer verbs of a reader with durable consumers it never deletes.
const DURABLE_READER: &[&str] = &["CREATE", "DURABLE.CREATE", "INFO", "MSG.NEXT"];

/// Grants reading another component's `stream` through consumers: its info, consumer creation,
/// the consumer `verbs`, and (`ack`) acknowledging what it fetched.
fn read_with_consumers(publish: &mut Vec<String>, stream: &str, verbs: &[&str], ack: bool) {
    for api in JS_API {
        publish.push(format!("{api}.STREAM.INFO.{stream}"));
        publish.push(format!("{api}.CONSUMER.CREATE.{stream}"));
        for verb in verbs {
            publish.push(format!("{api}.CONSUMER.{verb}.{stream}.>"));
        }
    }
    if ack {
        publish.push(format!("$JS.ACK.{stream}.>"));
    }
}

/// What an identity may do with a stream's configuration and messages through the JetStream
/// API (reading it through consumers and direct gets is granted to all three).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    /// Its owner's dead letters and buckets: everything, including purge and delete.
    Owner,
    /// Its owner's event stream: create and read, never update, purge or delete.
    History,
    /// Another component's bucket the identity writes entries into: read only.
    Writer,
}

/// Permissions of `component`'s own identity.
pub fn permissions(component: Component) -> Result<Permissions> {
    let mut publish = vec![
        subject::events_of(component),
        below(&subject::lifecycle(component, "instance", Lifecycle::Announce)?, 3),
        subject::dead_letters_of(component),
    ];
    let mut subscribe =
        vec![below(&subject::command(component, "action")?, 3), below(&subject::query(component, "query")?, 3)];
    for verb in [MicroVerb::Ping, MicroVerb::Info, MicroVerb::Stats] {
        let own = subject::micro(verb, component); // $SRV.PING.cim-<token>
        let all: Vec<&str> = own.split('.').take(2).collect(); // $SRV.PING
        subscribe.push(all.join("."));
        subscribe.push(own.clone());
        subscribe.push(format!("{own}.>"));
    }
    // Control messages for every instance, its node or itself; node and instance ids are only
    // known at run time, so those tokens become wildcards.
    let (node, instance) = ("node-placeholder", "instance-placeholder");
    for filter in subject::control_filters(node, instance)? {
        let tokens: Vec<&str> = filter.split('.').map(|t| if t == node || t == instance { "*" } else { t }).collect();
        subscribe.push(tokens.join("."));
    }
    subscribe.push(format!("{}.>", subject::inbox_prefix(component)));
    // What the registry does with the others: it listens to every lifecycle message, asks any
    // instance to describe itself, and sends control messages (re-announce, drain).
    if component == Component::Registry {
        subscribe.push(subject::all_lifecycle());
        publish.push(below(&subject::control_all(ControlAction::Announce), 2));
        for other in Component::ALL {
            publish.push(subject::query(other, "describe")?);
        }
    }

    // Streams: the event history may not be updated, deleted or purged by the service; its
    // dead letters and buckets (projections, caches, content) it manages fully.
    let mut streams: Vec<(String, Access)> = resources::streams(component)
        .into_iter()
        .map(|s| (s.name, if s.role == StreamRole::Events { Access::History } else { Access::Owner }))
        .collect();
    for kv in resources::kv_buckets(component) {
        // JetStream's KV layout: puts go to `$KV.<bucket>.<key>`; async-nats sends them through
        // the API prefix when a domain is set (`$JS.<domain>.API.$KV.<bucket>.<key>`).
        publish.push(format!("$KV.{}.>", kv.bucket));
        publish.push(format!("{}.$KV.{}.>", JS_API[1], kv.bucket));
        streams.push((kv.stream_name(), Access::Owner));
    }
    for obj in resources::object_buckets(component) {
        publish.push(below(&subject::all_object_chunks(&obj.bucket)?, 2));
        streams.push((obj.stream_name(), Access::Owner));
    }
    // The gateway, the door for people and programs: it sends the information unit's and the
    // pipeline engine's commands and queries and the registry's and plugin host's queries, moves unit content in the
    // content bucket (as cim-iu-client does), and reads every other component's event and
    // dead-letter streams with ordered consumers (live events, dead letters).
    if component == Component::UiGateway {
        for commanded in [Component::InformationUnit, Component::PipelineEngine] {
            publish.push(below(&subject::command(commanded, "action")?, 3));
        }
        for other in [Component::InformationUnit, Component::Registry, Component::PluginHost, Component::PipelineEngine]
        {
            publish.push(below(&subject::query(other, "query")?, 3));
        }
        for obj in resources::object_buckets(Component::InformationUnit) {
            publish.push(below(&subject::all_object_chunks(&obj.bucket)?, 2));
            streams.push((obj.stream_name(), Access::Writer));
        }
        for other in Component::ALL.into_iter().filter(|c| *c != component) {
            for stream in [resources::events_stream(other).name, resources::dead_letter_stream(other).name] {
                read_with_consumers(&mut publish, &stream, &["CREATE", "INFO", "DELETE", "MSG.NEXT"], false);
            }
        }
    }
    // The storage manager archives every component's streams (events, dead letters, object
    // buckets): it reads them with ordered consumers and direct gets (objects copied by name)
    // and reads their configuration (the retention guard). On the cluster it also keeps the leaf
    // mirrors: `leaf_mirror_permissions`, per leaf domain.
    if component == Component::StorageManager {
        for other in Component::ALL.into_iter().filter(|c| *c != component) {
            let mut names: Vec<String> = resources::streams(other).into_iter().map(|s| s.name).collect();
            names.extend(resources::object_buckets(other).into_iter().map(|b| b.stream_name()));
            for stream in names {
                archive_read(&mut publish, &stream);
            }
        }
    }
    // The pipeline engine: it reads unit events with its shared durable trigger consumer,
    // sends the information unit's commands and queries and writes derived content to the
    // content bucket (as cim-iu-client does), invokes plugins (by version or through the
    // host's router), lists them to validate definitions, and writes the references that pin
    // plugin versions; it hears its own runs' cancellations on core NATS.
    if component == Component::PipelineEngine {
        publish.push(below(&subject::command(Component::InformationUnit, "action")?, 3));
        publish.push(below(&subject::query(Component::InformationUnit, "query")?, 3));
        publish.push(cim_events::plugin::command(cim_events::plugin::cmd::INVOKE)?);
        publish.push(cim_events::plugin::query(cim_events::plugin::qry::LIST)?);
        publish.push(cim_events::plugin::all_invocations());
        subscribe.push(subject::events_of(Component::PipelineEngine));
        for obj in resources::object_buckets(Component::InformationUnit) {
            publish.push(below(&subject::all_object_chunks(&obj.bucket)?, 2));
            streams.push((obj.stream_name(), Access::Writer));
        }
        for kv in resources::kv_buckets(Component::PluginHost) {
            publish.push(format!("$KV.{}.>", kv.bucket));
            publish.push(format!("{}.$KV.{}.>", JS_API[1], kv.bucket));
            streams.push((kv.stream_name(), Access::Writer));
        }
        read_with_consumers(
            &mut publish,
            &resources::events_stream(Component::InformationUnit).name,
            DURABLE_READER,
            true,
        );
    }
    // The plugin host: it serves the WebAssembly plugins it holds on their invocation subjects
    // and announces them, hears every plugin's announcements (native plugins served by other
    // processes), and routes invocations by name or capability to whoever serves the version.
    if component == Component::PluginHost {
        for every in [cim_events::plugin::all_invocations(), cim_events::plugin::all_announcements()] {
            publish.push(every.clone());
            subscribe.push(every);
        }
    }
    // The integration hub: webhooks with `target: unit` and the S3 import create units — the
    // information unit's commands and queries, content in its content bucket (as cim-iu-client
    // does); outbound subscriptions and the MQTT and PostgreSQL projections read any
    // component's events (`cim.evt.<component>.…`) with their durable consumers
    // (`hub-out-<name>`, `hub-mqtt-<name>`, `hub-pg-<name>`: created, looked up, fetched from
    // and acknowledged, never deleted); every instance hears pause/resume on core NATS.
    if component == Component::IntegrationHub {
        publish.push(below(&subject::command(Component::InformationUnit, "action")?, 3));
        publish.push(below(&subject::query(Component::InformationUnit, "query")?, 3));
        subscribe.push(cim_events::hub::subscription_states());
        for obj in resources::object_buckets(Component::InformationUnit) {
            publish.push(below(&subject::all_object_chunks(&obj.bucket)?, 2));
            streams.push((obj.stream_name(), Access::Writer));
        }
        for other in Component::ALL.into_iter().filter(|c| *c != component) {
            read_with_consumers(&mut publish, &resources::events_stream(other).name, DURABLE_READER, true);
        }
    }
    // The retention guard: the services that remove messages from an archived stream (unit
    // content, plugin modules) read the storage manager's archive watermarks first.
    if matches!(component, Component::InformationUnit | Component::PluginHost) {
        for kv in resources::kv_buckets(Component::StorageManager) {
            let stream = kv.stream_name();
            for api in JS_API {
                publish.push(format!("{api}.STREAM.INFO.{stream}"));
                publish.push(format!("{api}.STREAM.MSG.GET.{stream}"));
                publish.push(format!("{api}.DIRECT.GET.{stream}"));
                publish.push(format!("{api}.DIRECT.GET.{stream}.>"));
            }
        }
    }
    // Account information (limits and usage; read-only): creating a KV bucket asks for it.
    for api in JS_API {
        publish.push(format!("{api}.INFO"));
    }
    for (stream, access) in &streams {
        for api in JS_API {
            match access {
                Access::Owner => {
                    publish.push(format!("{api}.STREAM.*.{stream}"));
                    publish.push(format!("{api}.STREAM.MSG.*.{stream}"));
                }
                Access::History | Access::Writer => {
                    let verbs: &[&str] = if *access == Access::History { &["INFO", "CREATE"] } else { &["INFO"] };
                    for verb in verbs {
                        publish.push(format!("{api}.STREAM.{verb}.{stream}"));
                    }
                    publish.push(format!("{api}.STREAM.MSG.GET.{stream}"));
                }
            }
            publish.push(format!("{api}.DIRECT.GET.{stream}"));
            publish.push(format!("{api}.DIRECT.GET.{stream}.>"));
            publish.push(format!("{api}.CONSUMER.CREATE.{stream}"));
            for verb in ["CREATE", "DURABLE.CREATE", "INFO", "DELETE", "MSG.NEXT"] {
                publish.push(format!("{api}.CONSUMER.{verb}.{stream}.>"));
            }
            for verb in ["NAMES", "LIST"] {
                publish.push(format!("{api}.CONSUMER.{verb}.{stream}"));
            }
        }
        publish.push(format!("$JS.ACK.{stream}.>"));
        publish.push(format!("$JS.FC.{stream}.>"));
    }
    Ok(Permissions { publish, subscribe })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_mirror_permissions_name_every_mirror_the_storage_manager_creates() {
        let template = leaf_mirror_permissions().unwrap();
        let granted: Vec<String> =
            template.iter().map(|s| s.replace(LEAF_PLACEHOLDER, &"leaf1".to_ascii_uppercase())).collect();
        for stream in cim_archive::archived_streams() {
            let cfg = cim_events::resources::leaf_mirror_config(&stream, "leaf1", cim_events::Tier::Cluster).unwrap();
            for verb in ["STREAM.CREATE", "STREAM.INFO", "CONSUMER.CREATE", "STREAM.MSG.GET"] {
                let needed = format!("$JS.API.{verb}.{}", cfg.name);
                assert!(granted.contains(&needed), "{needed} missing");
            }
            // The archiver's ordered consumers on the mirror.
            assert!(granted.contains(&format!("$JS.API.CONSUMER.MSG.NEXT.{}.>", cfg.name)));
        }
        assert!(granted.iter().all(|s| !s.contains('*') || s.starts_with("$JS.*.API.")), "{granted:?}");
    }

    /// Whether the NATS subject `pattern` (with `*` and `>`) matches `subject`.
    fn matches_subject(pattern: &str, subject: &str) -> bool {
        let (mut p, mut s) = (pattern.split('.'), subject.split('.'));
        loop {
            match (p.next(), s.next()) {
                (Some(">"), Some(_)) => return true,
                (Some(a), Some(b)) if a == "*" || a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    /// `subject` with its last token, which must be `last`, replaced by `>`: the wildcard of
    /// everything beside it.
    fn wildcard_for(subject: &str, last: &str) -> String {
        let head = subject.strip_suffix(last).and_then(|h| h.strip_suffix('.')).expect("subject ends in `last`");
        format!("{head}.>")
    }

    #[test]
    fn the_restore_identity_writes_the_archived_streams_and_nothing_else() {
        let p = restore_permissions().unwrap();
        let publish: Vec<&str> =
            p["publish"]["allow"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        for c in Component::ALL {
            for s in resources::streams(c) {
                for subject in &s.subjects {
                    assert!(publish.contains(&subject.as_str()), "{subject} missing");
                }
                for verb in ["CREATE", "UPDATE", "PURGE", "MSG.DELETE"] {
                    assert!(
                        publish.contains(&format!("$JS.API.STREAM.{verb}.{}", s.name).as_str()),
                        "{verb} {}",
                        s.name
                    );
                }
            }
            // Nothing a service listens to or announces, and no bucket that is not archived.
            let never = [
                subject::command(c, "a").unwrap(),
                subject::query(c, "q").unwrap(),
                subject::lifecycle(c, "i1", Lifecycle::Announce).unwrap(),
                subject::control_all(ControlAction::Announce),
            ];
            for not in never {
                assert!(!publish.iter().any(|p| matches_subject(p, &not)), "{not} allowed");
            }
            for kv in resources::kv_buckets(c) {
                assert!(!publish.iter().any(|p| p.contains(&kv.bucket)), "{} allowed", kv.bucket);
            }
        }
        assert!(!publish.iter().any(|p| p.contains(".STREAM.DELETE.") || p.contains(".STREAM.*.")), "{publish:?}");
        let inbox = format!("{}.>", cim_archive::restore::inbox_prefix());
        assert_eq!(p["subscribe"]["allow"], json!([inbox]));
    }

    #[test]
    fn own_subjects_only() {
        let p = permissions(Component::Registry).unwrap();
        let registry_lifecycle = subject::lifecycle(Component::Registry, "i1", Lifecycle::Announce).unwrap();
        let registry_lifecycle = wildcard_for(&registry_lifecycle, &format!("i1.{}", Lifecycle::Announce.token()));
        assert!(p.publish.contains(&subject::events_of(Component::Registry)));
        assert!(p.publish.contains(&registry_lifecycle));
        assert!(p.publish.contains(&subject::dead_letters_of(Component::Registry)));
        assert!(p.subscribe.contains(&wildcard_for(&subject::query(Component::Registry, "q").unwrap(), "q")));
        assert!(p.subscribe.contains(&subject::all_lifecycle()), "the registry listens to lifecycle");
        assert!(p.subscribe.contains(&subject::micro(MicroVerb::Ping, Component::Registry)));
        for other in Component::ALL.into_iter().filter(|c| *c != Component::Registry) {
            let token = other.token();
            let describe = subject::query(other, "describe").unwrap();
            assert!(p.publish.contains(&describe), "the registry asks {token} to describe itself");
            assert!(
                !p.publish
                    .iter()
                    .chain(&p.subscribe)
                    .filter(|s| **s != describe)
                    .any(|s| s.contains(&format!(".{token}."))
                        || s.contains(&format!("_{}_", token.to_ascii_uppercase()))),
                "registry's permissions mention {token}: {p:?}"
            );
        }
        let iu_events = resources::events_stream(Component::InformationUnit).name;
        let iu_content = format!("$O.{}.>", cim_events::iu::CONTENT_BUCKET);
        let hub = permissions(Component::IntegrationHub).unwrap();
        assert!(
            hub.publish.contains(&wildcard_for(&subject::command(Component::InformationUnit, "a").unwrap(), "a"))
                && hub.publish.contains(&iu_content),
            "{:?}",
            hub.publish
        );
        assert!(hub.publish.contains(&format!("$JS.*.API.CONSUMER.DURABLE.CREATE.{iu_events}.>")));
        assert!(hub.publish.contains(&format!("$JS.ACK.{iu_events}.>")));
        assert!(
            !hub.publish.iter().any(|s| s.contains(&format!("CONSUMER.DELETE.{iu_events}"))
                || s.contains(&format!("STREAM.DELETE.{iu_events}"))
                || *s == format!("$JS.API.STREAM.*.{iu_events}")),
            "others' streams are read only"
        );
        assert!(hub.subscribe.contains(&cim_events::hub::subscription_states()));
        let iu = permissions(Component::InformationUnit).unwrap();
        assert!(!iu.subscribe.contains(&subject::all_lifecycle()));
        assert!(iu.publish.contains(&iu_content), "{:?}", iu.publish);
        let units = resources::kv_bucket(Component::InformationUnit, cim_events::iu::KV_UNITS).unwrap();
        assert!(iu.publish.iter().any(|s| *s == format!("$JS.*.API.STREAM.*.KV_{units}")));
        assert!(!iu.publish.iter().any(|s| *s == format!("$JS.API.STREAM.*.{iu_events}")), "history is not deletable");
        assert!(
            !iu.publish.iter().any(|s| s.contains(&format!("STREAM.UPDATE.{iu_events}"))),
            "a service may not change its own history's limits"
        );
        assert!(iu.publish.contains(&format!("$JS.API.STREAM.CREATE.{iu_events}")));
    }

    #[test]
    fn replies_are_read_only_by_who_asked() {
        for c in Component::ALL {
            let p = permissions(c).unwrap();
            assert!(p.subscribe.contains(&format!("{}.>", subject::inbox_prefix(c))), "{c}: {:?}", p.subscribe);
            // Every inbox it may read is below its own prefix (none is the account's `_INBOX.>`).
            let inboxes = subject::all_inboxes();
            let own = subject::inbox_prefix(c);
            for s in p.subscribe.iter().filter(|s| s.starts_with(inboxes.trim_end_matches('>'))) {
                assert!(s.starts_with(&format!("{own}.")), "{c} may read {s}");
            }
            for other in Component::ALL.into_iter().filter(|o| *o != c) {
                let theirs = subject::inbox_prefix(other);
                assert!(!p.subscribe.iter().any(|s| s.starts_with(&theirs)), "{c} may read {other}'s replies");
            }
        }
    }

    #[test]
    fn uploaders_write_content_but_cannot_purge_delete_or_reconfigure_it() {
        let content = resources::object_buckets(Component::InformationUnit)[0].stream_name();
        for c in [Component::UiGateway, Component::PipelineEngine, Component::IntegrationHub] {
            let p = permissions(c).unwrap();
            assert!(p.publish.contains(&format!("$JS.API.STREAM.INFO.{content}")), "{c}");
            assert!(p.publish.contains(&format!("$JS.API.DIRECT.GET.{content}.>")), "{c}");
            for s in &p.publish {
                for forbidden in ["PURGE", "DELETE", "UPDATE", "SNAPSHOT", "RESTORE", "*"] {
                    assert!(
                        !(s.ends_with(&format!(".{content}")) && s.contains(&format!(".STREAM.{forbidden}."))),
                        "{c} may {forbidden} {content}: {s}"
                    );
                }
                assert!(!s.contains(&format!("STREAM.MSG.DELETE.{content}")), "{c}: {s}");
                assert!(!s.contains(&format!("STREAM.MSG.*.{content}")), "{c}: {s}");
            }
        }
    }
}
