//! Names and configurations of every JetStream resource CIM creates: streams, consumers, KV and
//! object buckets, chosen per tier (replicas 1 on a leaf, 3 on the cluster).

use std::{fmt, str::FromStr, time::Duration};

use async_nats::jetstream::{
    kv, object_store,
    stream::{self, DiscardPolicy, RetentionPolicy, StorageType},
};

use crate::{
    ContractError,
    subject::{self, Component},
    token::validate_name,
};

/// Where a service runs; decides replication.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Tier {
    /// One host: nats-server with JetStream and all services. Streams have one replica.
    #[default]
    Leaf,
    /// The 3-node cluster: streams have three replicas (R3).
    Cluster,
}

impl Tier {
    pub const fn replicas(self) -> usize {
        match self {
            Tier::Leaf => 1,
            Tier::Cluster => 3,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Tier::Leaf => "leaf",
            Tier::Cluster => "cluster",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Tier {
    type Err = ContractError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "leaf" => Ok(Tier::Leaf),
            "cluster" => Ok(Tier::Cluster),
            other => Err(ContractError::UnknownTier(other.to_string())),
        }
    }
}

/// The retry horizon: how long a command may be retried with the same request id and be
/// answered with its first result instead of carried out again. It is the duplicate window of
/// every events stream, so the answer comes from the log itself (JetStream rebuilds the window
/// from the stored messages after a restart), not from a cache written after the event.
/// Services take `--retry-horizon` (`CIM_RETRY_HORIZON`) to change it.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// What a stream is for; decides its retention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamRole {
    /// The component's history: kept forever, immutable (no delete, no purge).
    Events,
    /// Messages that could not be processed, with their reason; kept forever, deletable by an
    /// operator once handled.
    DeadLetters,
}

/// A stream a component owns.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamSpec {
    pub component: Component,
    pub role: StreamRole,
    pub name: String,
    pub subjects: Vec<String>,
    pub description: String,
}

impl StreamSpec {
    /// The JetStream configuration for this stream on `tier`.
    pub fn config(&self, tier: Tier) -> stream::Config {
        let (deny_delete, deny_purge) = match self.role {
            StreamRole::Events => (true, true),
            StreamRole::DeadLetters => (false, false),
        };
        stream::Config {
            name: self.name.clone(),
            description: Some(self.description.clone()),
            subjects: self.subjects.clone(),
            retention: RetentionPolicy::Limits,
            // Nothing is dropped by limits: history only leaves JetStream through the storage
            // manager once it is archived and verified.
            max_age: Duration::ZERO,
            max_messages: -1,
            max_bytes: -1,
            discard: DiscardPolicy::New,
            storage: StorageType::File,
            num_replicas: tier.replicas(),
            duplicate_window: DUPLICATE_WINDOW,
            allow_direct: true,
            deny_delete,
            deny_purge,
            ..Default::default()
        }
    }
}

/// An object store bucket a component owns.
#[derive(Clone, Debug, PartialEq)]
pub struct ObjectBucketSpec {
    pub component: Component,
    pub bucket: String,
    pub description: String,
}

impl ObjectBucketSpec {
    pub fn config(&self, tier: Tier) -> object_store::Config {
        object_store::Config {
            bucket: self.bucket.clone(),
            description: Some(self.description.clone()),
            storage: StorageType::File,
            num_replicas: tier.replicas(),
            ..Default::default()
        }
    }

    /// The stream JetStream keeps the bucket in.
    pub fn stream_name(&self) -> String {
        object_stream(&self.bucket)
    }
}

/// `OBJ_<bucket>`: the stream JetStream keeps an object bucket in.
pub fn object_stream(bucket: &str) -> String {
    format!("OBJ_{bucket}")
}

/// A KV bucket a component owns: a projection (rebuildable from events) or a cache.
#[derive(Clone, Debug, PartialEq)]
pub struct KvBucketSpec {
    pub component: Component,
    pub bucket: String,
    pub description: String,
    /// Entries expire after this long (0 = never).
    pub max_age: Duration,
}

impl KvBucketSpec {
    pub fn config(&self, tier: Tier) -> kv::Config {
        kv::Config {
            bucket: self.bucket.clone(),
            description: self.description.clone(),
            history: 1,
            max_age: self.max_age,
            storage: StorageType::File,
            num_replicas: tier.replicas(),
            ..Default::default()
        }
    }

    /// The stream JetStream keeps the bucket in.
    pub fn stream_name(&self) -> String {
        format!("KV_{}", self.bucket)
    }
}

/// All KV buckets a component owns and provisions.
pub fn kv_buckets(component: Component) -> Vec<KvBucketSpec> {
    let spec = |purpose: &str, description: &str, max_age: Duration| KvBucketSpec {
        component,
        bucket: format!("cim_{}_{purpose}", component.token()),
        description: description.to_string(),
        max_age,
    };
    match component {
        Component::InformationUnit => vec![
            spec(crate::iu::KV_UNITS, "projection: current state of every unit, and the checkpoint", Duration::ZERO),
            spec(crate::iu::KV_TYPES, "projection: registered unit types and their schemas", Duration::ZERO),
            spec(
                crate::iu::KV_REQUESTS,
                "projection: the result of every command by its request id, for idempotent retries",
                crate::iu::REQUEST_MEMORY,
            ),
        ],
        Component::Registry => vec![
            spec(
                crate::registry::KV_INSTANCES,
                "projection: every service instance, its node and state, and the checkpoint",
                Duration::ZERO,
            ),
            spec(
                crate::registry::KV_NODES,
                "projection: the node inventory and lifecycle, and the desired state",
                Duration::ZERO,
            ),
        ],
        Component::PluginHost => vec![spec(
            crate::plugin::KV_REFERENCES,
            "references to plugin versions (key <name>.<version-token>.<referrer>), written by the pipeline engine; a referenced version cannot be removed",
            Duration::ZERO,
        )],
        Component::IntegrationHub => vec![spec(
            crate::hub::KV_WEBHOOK_IDS,
            "delivery ids of accepted webhooks (key <source>.<hex(id)>) → the event's sequence; an index of the log kept by the consumer hub-webhook-ids, for de-duplication after the retry horizon",
            crate::hub::WEBHOOK_ID_MEMORY,
        )],
        Component::PipelineEngine => vec![spec(
            crate::pipeline::KV_SLOTS,
            "concurrency slots of pipelines (key <pipeline>.<n>): leases held by the engine running a run, renewed while it runs, expiring when it dies",
            crate::pipeline::SLOT_TTL,
        )],
        Component::StorageManager => vec![spec(
            crate::storage::KV_ARCHIVE,
            "archive watermarks (keys target.<stream>.<target> and verified.<stream>): through which sequence each stream is archived and read back verified; nothing above verified.<stream> may be removed",
            Duration::ZERO,
        )],
        Component::UiGateway => vec![spec(
            crate::gateway::KV_TOKENS,
            "API tokens of the gateway (key t.<id>): name, role and SHA-256 of the token, never the token",
            Duration::ZERO,
        )],
    }
}

/// `CIM_<COMPONENT>_EVENTS`.
pub fn events_stream(component: Component) -> StreamSpec {
    StreamSpec {
        component,
        role: StreamRole::Events,
        name: format!("CIM_{}_EVENTS", component.upper()),
        subjects: vec![subject::events_of(component)],
        description: format!("every event of {component}, in order; the source of truth"),
    }
}

/// `CIM_<COMPONENT>_DLQ`.
pub fn dead_letter_stream(component: Component) -> StreamSpec {
    StreamSpec {
        component,
        role: StreamRole::DeadLetters,
        name: format!("CIM_{}_DLQ", component.upper()),
        subjects: vec![subject::dead_letters_of(component)],
        description: format!("messages {component} could not process, with the reason"),
    }
}

/// All streams a component owns and provisions.
pub fn streams(component: Component) -> Vec<StreamSpec> {
    vec![events_stream(component), dead_letter_stream(component)]
}

/// All object buckets a component owns and provisions.
pub fn object_buckets(component: Component) -> Vec<ObjectBucketSpec> {
    match component {
        Component::InformationUnit => vec![ObjectBucketSpec {
            component,
            bucket: crate::iu::CONTENT_BUCKET.to_string(),
            description: "unit content, keyed by CID".to_string(),
        }],
        Component::PluginHost => vec![ObjectBucketSpec {
            component,
            bucket: crate::plugin::ARTIFACTS_BUCKET.to_string(),
            description: "plugin modules, keyed by name@version, with digest".to_string(),
        }],
        _ => Vec::new(),
    }
}

/// `<STREAM>_FROM_<LEAF-DOMAIN>`: the cluster's R3 mirror of a leaf's stream (storage manager).
pub fn leaf_mirror(stream: &str, leaf_domain: &str) -> Result<String, ContractError> {
    let name = format!("{stream}_FROM_{}", leaf_domain.to_ascii_uppercase());
    validate_name("stream", &name)?;
    Ok(name)
}

/// The inverse of [`leaf_mirror`] for a given `stream`: if `name` is a mirror of it, the leaf's
/// domain as the name spells it (upper case).
pub fn leaf_mirror_domain<'a>(name: &'a str, stream: &str) -> Option<&'a str> {
    let leaf = name.strip_prefix(stream)?.strip_prefix("_FROM_")?;
    (!leaf.is_empty()).then_some(leaf)
}

/// The configuration of [`leaf_mirror`]: on the cluster (`tier`), a mirror of `stream` on leaf
/// `domain` across the leaf node connection, kept as the leaf keeps it (limits retention, no
/// delete, no purge), so the storage manager archives a leaf's data from the cluster.
pub fn leaf_mirror_config(stream: &str, domain: &str, tier: Tier) -> Result<stream::Config, ContractError> {
    Ok(stream::Config {
        name: leaf_mirror(stream, domain)?,
        description: Some(format!("mirror of {stream} on leaf domain {domain}")),
        mirror: Some(stream::Source {
            name: stream.to_string(),
            // The server takes a domain as the external API prefix of that domain.
            external: Some(stream::External { api_prefix: domain_api_prefix(domain), delivery_prefix: None }),
            ..Default::default()
        }),
        storage: StorageType::File,
        num_replicas: tier.replicas(),
        retention: RetentionPolicy::Limits,
        allow_direct: true,
        mirror_direct: false,
        deny_delete: true,
        deny_purge: true,
        ..Default::default()
    })
}

/// `$JS.<domain>.API`: the JetStream API of another domain (a leaf's, across the leaf node
/// connection), as a mirror's or source's external API prefix.
pub fn domain_api_prefix(domain: &str) -> String {
    format!("$JS.{domain}.API")
}

/// Durable consumer name `<component>-<purpose>`, shared by all instances of a service.
pub fn consumer(component: Component, purpose: &str) -> Result<String, ContractError> {
    let name = format!("{}-{purpose}", component.token());
    validate_name("consumer", &name)?;
    Ok(name)
}

/// KV bucket name `cim_<component>_<purpose>`.
pub fn kv_bucket(component: Component, purpose: &str) -> Result<String, ContractError> {
    let name = format!("cim_{}_{purpose}", component.token());
    validate_name("kv bucket", &name)?;
    Ok(name)
}

/// Queue group of a component's request/reply endpoints: every instance joins it.
pub fn queue_group(component: Component) -> String {
    format!("cim-{}", component.token())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_follow_the_tier() {
        let spec = events_stream(Component::InformationUnit);
        assert_eq!(spec.config(Tier::Leaf).num_replicas, 1);
        assert_eq!(spec.config(Tier::Cluster).num_replicas, 3);
        for b in object_buckets(Component::InformationUnit) {
            assert_eq!(b.config(Tier::Leaf).num_replicas, 1);
            assert_eq!(b.config(Tier::Cluster).num_replicas, 3);
        }
        assert_eq!("cluster".parse::<Tier>().unwrap(), Tier::Cluster);
        assert!("edge".parse::<Tier>().is_err());
    }

    #[test]
    fn event_streams_keep_everything_and_are_immutable() {
        let c = events_stream(Component::Registry).config(Tier::Leaf);
        assert_eq!(c.name, "CIM_REGISTRY_EVENTS");
        assert_eq!(c.subjects, vec!["cim.evt.registry.>".to_string()]);
        assert_eq!(c.retention, RetentionPolicy::Limits);
        assert_eq!(c.max_age, Duration::ZERO);
        assert_eq!((c.max_messages, c.max_bytes), (-1, -1));
        assert_eq!(c.storage, StorageType::File);
        assert_eq!(c.duplicate_window, DUPLICATE_WINDOW);
        assert!(c.deny_delete && c.deny_purge);
        let d = dead_letter_stream(Component::Registry).config(Tier::Leaf);
        assert!(!d.deny_delete);
        assert_eq!(d.subjects, vec!["cim.dlq.registry.>".to_string()]);
    }

    #[test]
    fn every_name_is_valid_and_unique() {
        let mut names = std::collections::HashSet::new();
        for c in Component::ALL {
            for s in streams(c) {
                validate_name("stream", &s.name).unwrap();
                assert!(names.insert(s.name.clone()), "duplicate {}", s.name);
            }
            for b in object_buckets(c) {
                validate_name("bucket", &b.bucket).unwrap();
                assert!(names.insert(b.stream_name()));
            }
            for b in kv_buckets(c) {
                validate_name("bucket", &b.bucket).unwrap();
                assert!(names.insert(b.stream_name()));
                assert_eq!(b.config(Tier::Cluster).num_replicas, 3);
            }
        }
        assert_eq!(consumer(Component::PipelineEngine, "steps").unwrap(), "pipeline-steps");
        assert!(consumer(Component::PipelineEngine, "a.b").is_err());
        assert_eq!(kv_bucket(Component::InformationUnit, "units").unwrap(), "cim_iu_units");
        assert!(kv_bucket(Component::InformationUnit, "a b").is_err());
    }

    #[test]
    fn stream_subjects_do_not_overlap() {
        let all: Vec<String> = Component::ALL.into_iter().flat_map(streams).flat_map(|s| s.subjects).collect();
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                let pa = a.trim_end_matches('>');
                let pb = b.trim_end_matches('>');
                assert!(!pa.starts_with(pb) && !pb.starts_with(pa), "{a} overlaps {b}");
            }
        }
    }
}
