//! Idempotent JetStream provisioning of what a service owns: create what is missing, update
//! what may safely change, and refuse changes that would lose data or weaken guarantees.

use crate::config::CommonSettings;
use async_nats::jetstream::{self, stream};
use cim_events::{
    Component, Tier,
    resources::{self, KvBucketSpec, ObjectBucketSpec, StreamSpec},
};

/// What provisioning did to one resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Updated(Vec<String>),
    Unchanged,
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("refusing to change {resource}: {}", changes.join("; "))]
    Destructive { resource: String, changes: Vec<String> },
    #[error("jetstream {action} {resource}: {source}")]
    JetStream {
        action: &'static str,
        resource: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn js_err(
    action: &'static str,
    resource: &str,
) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> ProvisionError {
    let resource = resource.to_string();
    move |source| ProvisionError::JetStream { action, resource, source }
}

/// Compares an existing stream configuration with the desired one. Returns the list of
/// harmless differences to apply, or every destructive difference as an error.
///
/// Destructive: removing subjects, changing retention or storage, tightening any limit (age,
/// messages, bytes, per-subject, message size), lowering replicas, lifting delete/purge
/// protection. Harmless: description, duplicate window, added subjects, looser limits, more
/// replicas, direct get.
pub fn diff_stream(existing: &stream::Config, desired: &stream::Config) -> Result<Vec<String>, Vec<String>> {
    let mut harmless = Vec::new();
    let mut destructive = Vec::new();
    let removed: Vec<&String> = existing.subjects.iter().filter(|s| !desired.subjects.contains(s)).collect();
    if !removed.is_empty() {
        destructive.push(format!("would remove subjects {removed:?}"));
    }
    if desired.subjects.iter().any(|s| !existing.subjects.contains(s)) {
        harmless.push(format!("subjects {:?} -> {:?}", existing.subjects, desired.subjects));
    }
    if existing.retention != desired.retention {
        destructive.push(format!("retention {:?} -> {:?}", existing.retention, desired.retention));
    }
    if existing.storage != desired.storage {
        destructive.push(format!("storage {:?} -> {:?}", existing.storage, desired.storage));
    }
    // 0 / -1 mean unlimited; a change is tightening when the new limit is set and smaller.
    let limit = |name: &str, old: i128, new: i128, unlimited: i128, h: &mut Vec<String>, d: &mut Vec<String>| {
        let norm = |v: i128| if v <= unlimited { i128::MAX } else { v };
        match norm(new).cmp(&norm(old)) {
            std::cmp::Ordering::Less => d.push(format!("{name} {old} -> {new} would discard data")),
            std::cmp::Ordering::Greater => h.push(format!("{name} {old} -> {new}")),
            std::cmp::Ordering::Equal => {}
        }
    };
    limit(
        "max_age_ms",
        existing.max_age.as_millis() as i128,
        desired.max_age.as_millis() as i128,
        0,
        &mut harmless,
        &mut destructive,
    );
    limit(
        "max_messages",
        existing.max_messages.into(),
        desired.max_messages.into(),
        0,
        &mut harmless,
        &mut destructive,
    );
    limit("max_bytes", existing.max_bytes.into(), desired.max_bytes.into(), 0, &mut harmless, &mut destructive);
    limit(
        "max_messages_per_subject",
        existing.max_messages_per_subject.into(),
        desired.max_messages_per_subject.into(),
        0,
        &mut harmless,
        &mut destructive,
    );
    limit(
        "max_message_size",
        existing.max_message_size.into(),
        desired.max_message_size.into(),
        0,
        &mut harmless,
        &mut destructive,
    );
    if desired.num_replicas < existing.num_replicas {
        destructive
            .push(format!("replicas {} -> {} would lower redundancy", existing.num_replicas, desired.num_replicas));
    } else if desired.num_replicas > existing.num_replicas {
        harmless.push(format!("replicas {} -> {}", existing.num_replicas, desired.num_replicas));
    }
    if existing.deny_delete && !desired.deny_delete {
        destructive.push("would allow deleting messages".into());
    } else if existing.deny_delete != desired.deny_delete {
        harmless.push("deny_delete on".into());
    }
    if existing.deny_purge && !desired.deny_purge {
        destructive.push("would allow purging".into());
    } else if existing.deny_purge != desired.deny_purge {
        harmless.push("deny_purge on".into());
    }
    if existing.duplicate_window != desired.duplicate_window {
        harmless.push(format!("duplicate_window {:?} -> {:?}", existing.duplicate_window, desired.duplicate_window));
    }
    if existing.allow_direct != desired.allow_direct {
        harmless.push(format!("allow_direct -> {}", desired.allow_direct));
    }
    if existing.description != desired.description {
        harmless.push("description".into());
    }
    if destructive.is_empty() { Ok(harmless) } else { Err(destructive) }
}

/// Creates or updates one stream.
pub async fn ensure_stream(js: &jetstream::Context, desired: stream::Config) -> Result<Outcome, ProvisionError> {
    let name = desired.name.clone();
    match js.get_stream(&name).await {
        Ok(mut existing) => {
            let info = existing.info().await.map_err(|e| js_err("info", &name)(Box::new(e)))?;
            match diff_stream(&info.config, &desired) {
                Err(changes) => Err(ProvisionError::Destructive { resource: format!("stream {name}"), changes }),
                Ok(changes) if changes.is_empty() => Ok(Outcome::Unchanged),
                Ok(changes) => {
                    // Carry over what we do not manage (e.g. sources set by an operator).
                    let merged = stream::Config {
                        sources: info.config.sources.clone(),
                        mirror: info.config.mirror.clone(),
                        ..desired
                    };
                    js.update_stream(merged).await.map_err(|e| js_err("update", &name)(Box::new(e)))?;
                    Ok(Outcome::Updated(changes))
                }
            }
        }
        Err(e) if is_not_found(&e) => {
            js.create_stream(desired).await.map_err(|e| js_err("create", &name)(Box::new(e)))?;
            Ok(Outcome::Created)
        }
        Err(e) => Err(js_err("get", &name)(Box::new(e))),
    }
}

/// Creates a bucket (object or KV) through `create`, or checks the existing bucket's stream like
/// any other stream: replicas follow the tier, nothing destructive is changed.
async fn ensure_bucket<F, Fut, E>(
    js: &jetstream::Context,
    label: String,
    stream_name: String,
    tier: Tier,
    loosened_max_age: Option<std::time::Duration>,
    create: F,
) -> Result<Outcome, ProvisionError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    match js.get_stream(&stream_name).await {
        Ok(mut existing) => {
            let info = existing.info().await.map_err(|e| js_err("info", &stream_name)(Box::new(e)))?;
            let mut desired = info.config.clone();
            desired.num_replicas = tier.replicas();
            // A limit the spec loosened (e.g. entries that no longer expire) is applied.
            if let Some(max_age) = loosened_max_age
                && !info.config.max_age.is_zero()
                && (max_age.is_zero() || max_age > info.config.max_age)
            {
                desired.max_age = max_age;
            }
            match diff_stream(&info.config, &desired) {
                Err(changes) => Err(ProvisionError::Destructive { resource: label, changes }),
                Ok(c) if c.is_empty() => Ok(Outcome::Unchanged),
                Ok(c) => {
                    js.update_stream(desired).await.map_err(|e| js_err("update", &stream_name)(Box::new(e)))?;
                    Ok(Outcome::Updated(c))
                }
            }
        }
        Err(e) if is_not_found(&e) => {
            create().await.map_err(|e| js_err("create", &label)(Box::new(e)))?;
            Ok(Outcome::Created)
        }
        Err(e) => Err(js_err("get", &stream_name)(Box::new(e))),
    }
}

pub async fn ensure_object_bucket(
    js: &jetstream::Context,
    spec: &ObjectBucketSpec,
    tier: Tier,
) -> Result<Outcome, ProvisionError> {
    ensure_bucket(js, format!("object bucket {}", spec.bucket), spec.stream_name(), tier, None, || async {
        js.create_object_store(spec.config(tier)).await.map(|_| ())
    })
    .await
}

pub async fn ensure_kv_bucket(
    js: &jetstream::Context,
    spec: &KvBucketSpec,
    tier: Tier,
) -> Result<Outcome, ProvisionError> {
    ensure_bucket(js, format!("kv bucket {}", spec.bucket), spec.stream_name(), tier, Some(spec.max_age), || async {
        js.create_key_value(spec.config(tier)).await.map(|_| ())
    })
    .await
}

fn is_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(
        e.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(js)
            if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

/// Streams (by name) a component owns, including the streams behind its object buckets.
pub fn owned_stream_names(component: Component) -> Vec<String> {
    resources::streams(component)
        .into_iter()
        .map(|s| s.name)
        .chain(resources::object_buckets(component).iter().map(ObjectBucketSpec::stream_name))
        .chain(resources::kv_buckets(component).iter().map(KvBucketSpec::stream_name))
        .collect()
}

/// Provisions everything the service of `settings` owns on its tier, with its retry horizon as
/// the duplicate window of its streams; logs each outcome. A change to its event stream that
/// the service's identity may not make (history streams are not updatable by their service) is
/// logged with what the operator runs, and the service goes on with the stream as it is.
pub async fn provision(js: &jetstream::Context, settings: &CommonSettings) -> Result<(), ProvisionError> {
    provision_component(js, settings.component, settings.tier, settings.retry_horizon, Updates::OperatorOnHistory).await
}

/// Who applies a harmless change to a component's event stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Updates {
    /// The service itself: a refused update of its history is logged, not fatal.
    OperatorOnHistory,
    /// The operator (`cimctl deploy provision`): every update is applied or is an error.
    All,
}

/// Provisions everything `component` owns on `tier`, with `retry_horizon` as the duplicate
/// window of its streams.
pub async fn provision_component(
    js: &jetstream::Context,
    component: Component,
    tier: Tier,
    retry_horizon: std::time::Duration,
    updates: Updates,
) -> Result<(), ProvisionError> {
    for spec in resources::streams(component) {
        let StreamSpec { name, role, .. } = &spec;
        let config = stream::Config { duplicate_window: retry_horizon, ..spec.config(tier) };
        match ensure_stream(js, config).await {
            Ok(outcome) => log_outcome("stream", name, &outcome),
            Err(ProvisionError::JetStream { action: "update", source, .. })
                if updates == Updates::OperatorOnHistory && *role == resources::StreamRole::Events =>
            {
                tracing::warn!(
                    stream = %name,
                    error = %source,
                    "the stream differs from the contract and this service may not change its history stream; \
                     the operator applies it with `cimctl deploy provision --service {}`",
                    component.service_name()
                );
            }
            Err(e) => return Err(e),
        }
    }
    for spec in resources::object_buckets(component) {
        let outcome = ensure_object_bucket(js, &spec, tier).await?;
        log_outcome("object bucket", &spec.bucket, &outcome);
    }
    for spec in resources::kv_buckets(component) {
        let outcome = ensure_kv_bucket(js, &spec, tier).await?;
        log_outcome("kv bucket", &spec.bucket, &outcome);
    }
    Ok(())
}

fn log_outcome(kind: &str, name: &str, outcome: &Outcome) {
    match outcome {
        Outcome::Created => tracing::info!(kind, name, "created"),
        Outcome::Updated(changes) => tracing::info!(kind, name, ?changes, "updated"),
        Outcome::Unchanged => tracing::debug!(kind, name, "up to date"),
    }
}

/// Whether JetStream said the stream does not exist (as opposed to not answering: no leader
/// yet, a server restarting).
pub fn stream_not_found(e: &jetstream::context::GetStreamError) -> bool {
    use jetstream::{ErrorCode, context::GetStreamErrorKind};
    matches!(e.kind(), GetStreamErrorKind::JetStream(js) if js.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cim_events::resources::events_stream;
    use std::time::Duration;

    fn base() -> stream::Config {
        events_stream(Component::InformationUnit).config(Tier::Leaf)
    }

    #[test]
    fn identical_configs_need_nothing() {
        assert_eq!(diff_stream(&base(), &base()), Ok(vec![]));
    }

    #[test]
    fn harmless_changes_are_applied() {
        let mut d = base();
        d.subjects.push(cim_events::subject::events_of(Component::Registry));
        d.num_replicas = 3;
        d.duplicate_window = Duration::from_secs(300);
        d.description = Some("new".into());
        let changes = diff_stream(&base(), &d).unwrap();
        assert_eq!(changes.len(), 4, "{changes:?}");
        // a limit becoming looser (from 1 day to unlimited) is harmless
        let mut old = base();
        old.max_age = Duration::from_secs(86400);
        assert!(diff_stream(&old, &base()).is_ok());
    }

    #[test]
    fn destructive_changes_are_refused_with_every_reason() {
        let mut d = base();
        d.subjects = vec![cim_events::subject::events_of(Component::Registry)];
        d.retention = stream::RetentionPolicy::WorkQueue;
        d.max_age = Duration::from_secs(60);
        d.max_bytes = 1024;
        d.deny_delete = false;
        let err = diff_stream(&base(), &d).unwrap_err();
        assert_eq!(err.len(), 5, "{err:?}");
        assert!(err.iter().any(|e| e.contains("remove subjects")));
        assert!(err.iter().any(|e| e.contains("max_age")));
        let mut r3 = base();
        r3.num_replicas = 3;
        assert!(diff_stream(&r3, &base()).unwrap_err()[0].contains("replicas 3 -> 1"));
    }
}
