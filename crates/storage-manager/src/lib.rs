//! The storage-manager service. Storage manager: leaf -> cluster -> S3 tiers, archive and restore.
//!
//! It runs on the shared runtime (provisioning, announce, `$SRV.*`, health) and archives every
//! CIM stream (events, dead letters, object buckets) continuously to an ordered list of
//! S3-compatible targets in the open format of docs/storage-manager.md (the `cim-archive`
//! crate, which also reads it back for `cimctl restore` and `cimctl archive`).

pub mod archive;
pub mod deletions;
pub mod guard;
pub mod health;
pub mod objects;
pub mod tiers;
pub mod verified;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cim_events::Component;
use cim_runtime::{CommonArgs, CommonSettings, ConfigError, Service, ServiceArgs, ServiceDef, Shutdown};

pub use archive::ArchiveSettings;
use cim_archive::{S3Client, Target, TargetError, archived_streams, mirror_streams};

pub const COMPONENT: Component = Component::StorageManager;

/// Command line and environment of `storage-manager`.
#[derive(clap::Parser, Debug)]
#[command(
    name = "storage-manager",
    version,
    about = "Storage manager: leaf -> cluster -> S3 tiers, archive and restore"
)]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,
    /// An S3 archive target, in order (repeat, or separate with `;`):
    /// `name=nas,endpoint=http://nas:9000,region=us-east-1,bucket=cim,path-style=true,prefix=leaf1,credentials-file=/run/secrets/nas`
    /// (or `credentials-env=NAS` for `NAS_ACCESS_KEY_ID`/`NAS_SECRET_ACCESS_KEY`).
    #[arg(long = "archive-target", env = "CIM_ARCHIVE_TARGETS", value_delimiter = ';')]
    pub archive_targets: Vec<String>,
    /// Cut a segment when its uncompressed records reach this many bytes.
    #[arg(long, env = "CIM_ARCHIVE_SEGMENT_BYTES", default_value_t = 8 << 20)]
    pub archive_segment_bytes: usize,
    /// Cut a segment when its first record has waited this long (e.g. 1s, 500ms).
    #[arg(long, env = "CIM_ARCHIVE_LINGER", default_value = "1s", value_parser = cim_runtime::config::parse_duration)]
    pub archive_linger: Duration,
    /// Objects are also copied by name (CID) as plain S3 objects, in multipart parts of this
    /// many bytes (at least 5 MiB).
    #[arg(long, env = "CIM_ARCHIVE_PART_BYTES", default_value_t = 8 << 20)]
    pub archive_part_bytes: usize,
    /// How often object buckets are checked for objects to copy by name.
    #[arg(long, env = "CIM_ARCHIVE_OBJECT_POLL", default_value = "5s", value_parser = cim_runtime::config::parse_duration)]
    pub archive_object_poll: Duration,
    /// On the cluster: a leaf's JetStream domain whose streams are mirrored here (repeat).
    #[arg(long = "source-leaf", env = "CIM_SOURCE_LEAVES", value_delimiter = ',')]
    pub source_leaves: Vec<String>,
    /// Longest wait between retries while a target is down.
    #[arg(long, env = "CIM_ARCHIVE_RETRY_MAX", default_value = "30s", value_parser = cim_runtime::config::parse_duration)]
    pub archive_retry_max: Duration,
    /// The targets that must hold a verified copy before anything may be removed from a
    /// stream (names, comma-separated; default: every target).
    #[arg(long = "archive-required", env = "CIM_ARCHIVE_REQUIRED", value_delimiter = ',')]
    pub archive_required: Vec<String>,
    /// How often committed segments are read back and checked (advancing the watermarks).
    #[arg(long, env = "CIM_ARCHIVE_VERIFY_INTERVAL", default_value = "5s", value_parser = cim_runtime::config::parse_duration)]
    pub archive_verify_interval: Duration,
    /// Idle, a target is sent one cheap request (a HEAD) when nothing else reached it for this
    /// long, so an outage is noticed while nothing is archived.
    #[arg(long, env = "CIM_ARCHIVE_PROBE_INTERVAL", default_value = "2m", value_parser = cim_runtime::config::parse_duration)]
    pub archive_probe_interval: Duration,
    /// The service says it is degraded while a required target is more than this many
    /// messages of a stream behind (archived and verified)...
    #[arg(long, env = "CIM_ARCHIVE_MAX_LAG", default_value_t = 10_000)]
    pub archive_max_lag: u64,
    /// ...or while the oldest message not yet verified there is older than this.
    #[arg(long, env = "CIM_ARCHIVE_MAX_LAG_AGE", default_value = "5m", value_parser = cim_runtime::config::parse_duration)]
    pub archive_max_lag_age: Duration,
}

/// When the storage manager calls a target down or behind (`cim_archive_target_up`, degraded).
#[derive(Clone, Debug)]
pub struct SignalSettings {
    pub probe_interval: Duration,
    pub max_lag: u64,
    pub max_lag_age: Duration,
}

/// The validated configuration of `storage-manager`.
#[derive(Clone, Debug)]
pub struct Settings {
    pub common: CommonSettings,
    /// The S3 targets, in order.
    pub targets: Vec<Target>,
    pub archive: ArchiveSettings,
    pub signals: SignalSettings,
    /// On the cluster: the leaves whose streams are mirrored here.
    pub source_leaves: Vec<String>,
}

impl Args {
    /// The targets and archive settings, or a clear error (exit 64).
    pub fn archive(&self) -> Result<(Vec<Target>, ArchiveSettings), TargetError> {
        let targets = Target::parse_all(&self.archive_targets, &|k| std::env::var(k).ok())?;
        let required = if self.archive_required.is_empty() {
            targets.iter().map(|t| t.name.clone()).collect()
        } else {
            for r in &self.archive_required {
                if !targets.iter().any(|t| &t.name == r) {
                    return Err(TargetError::UnknownRequired(r.clone()));
                }
            }
            self.archive_required.clone()
        };
        let settings = ArchiveSettings {
            segment_bytes: self.archive_segment_bytes.max(1024),
            linger: self.archive_linger,
            part_bytes: self.archive_part_bytes.max(objects::MIN_PART_BYTES),
            object_poll: self.archive_object_poll,
            retry_max: self.archive_retry_max,
            required,
            verify_interval: self.archive_verify_interval,
            ..ArchiveSettings::default()
        };
        Ok((targets, settings))
    }
}

impl ServiceArgs for Args {
    type Settings = Settings;

    fn validate(self) -> Result<Settings, ConfigError> {
        let common = self.common.settings(COMPONENT)?;
        let (targets, archive) = self.archive().map_err(|e| ConfigError::invalid(e.to_string()))?;
        // A target the S3 client cannot address is refused here, not on every retry later.
        for t in &targets {
            S3Client::new(t.clone()).map_err(|e| ConfigError::invalid(format!("archive target {}: {e}", t.name)))?;
        }
        for (flag, d) in [
            ("--archive-linger (CIM_ARCHIVE_LINGER)", archive.linger),
            ("--archive-object-poll (CIM_ARCHIVE_OBJECT_POLL)", archive.object_poll),
            ("--archive-retry-max (CIM_ARCHIVE_RETRY_MAX)", archive.retry_max),
            ("--archive-verify-interval (CIM_ARCHIVE_VERIFY_INTERVAL)", archive.verify_interval),
            ("--archive-probe-interval (CIM_ARCHIVE_PROBE_INTERVAL)", self.archive_probe_interval),
            ("--archive-max-lag-age (CIM_ARCHIVE_MAX_LAG_AGE)", self.archive_max_lag_age),
        ] {
            if d.is_zero() {
                return Err(ConfigError::invalid(format!("{flag} must be more than 0")));
            }
        }
        for leaf in &self.source_leaves {
            cim_events::token::validate_token("--source-leaf (CIM_SOURCE_LEAVES)", leaf)
                .map_err(|e| ConfigError::invalid(e.to_string()))?;
        }
        let signals = SignalSettings {
            probe_interval: self.archive_probe_interval,
            max_lag: self.archive_max_lag,
            max_lag_age: self.archive_max_lag_age,
        };
        Ok(Settings { common, targets, archive, signals, source_leaves: self.source_leaves })
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
        description: "Storage manager: leaf -> cluster -> S3 tiers, archive and restore",
        capabilities: vec!["archive".to_string()],
    }
}

/// Runs the service until `shutdown` completes, archiving to the targets of `settings`.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let clients = settings.targets.into_iter().map(S3Client::new).collect::<Result<Vec<_>, _>>()?;
    let archive = Arc::new(settings.archive);
    let signals = settings.signals;
    let leaves = settings.source_leaves;
    Service::new(definition())
        .setup(move |ctx| async move {
            // On the cluster the leaf mirrors are archived like the rest: leaf → cluster → S3.
            let mut streams = archived_streams();
            streams.extend(mirror_streams(&leaves)?);
            // The retention guard: refuse to run over a stream that could drop unarchived data.
            let mut refused = Vec::new();
            for stream in &streams {
                if let Ok(mut s) = ctx.jetstream().get_stream(&stream).await
                    && let Ok(info) = s.info().await
                {
                    refused.extend(guard::violations(&info.config));
                }
            }
            if !refused.is_empty() {
                anyhow::bail!("retention guard: {}", refused.join("; "));
            }
            let stop_rx = ctx.stop_receiver();
            if !leaves.is_empty() {
                let mirrored = archived_streams();
                tiers::ensure_mirrors(ctx.jetstream(), &leaves, &mirrored, ctx.settings().tier).await?;
                ctx.spawn("leaf-mirrors", tiers::watch_mirrors(ctx.jetstream().clone(), leaves.clone(), mirrored, Duration::from_secs(10), stop_rx.clone()));
            }
            for s3 in &clients {
                tracing::info!(target = %s3.target().name, endpoint = %s3.target().endpoint, bucket = %s3.target().bucket, "archiving");
                let key = cim_archive::ArchiveKey::for_target(s3.target())?;
                let health = health::TargetHealth::new(&s3.target().name, ctx.metrics().clone(), ctx.degraded().clone());
                if let Some(first) = streams.first() {
                    let name = format!("probe-{}", s3.target().name);
                    let probe = health::run_prober(
                        s3.clone(),
                        health.clone(),
                        first.clone(),
                        archive.verify_interval,
                        signals.probe_interval,
                        archive.retry_max,
                        stop_rx.clone(),
                    );
                    ctx.spawn(&name, probe);
                }
                let verify = verified::VerifySettings {
                    required: Arc::new(archive.required.clone()),
                    interval: archive.verify_interval,
                    retry_max: archive.retry_max,
                    max_lag: signals.max_lag,
                    max_lag_age: signals.max_lag_age,
                    metrics: ctx.metrics().clone(),
                    health: health.clone(),
                    degraded: ctx.degraded().clone(),
                    key: key.clone(),
                };
                for stream in streams.iter().cloned() {
                    // The archiver announces each commit (epoch, position); the deletion
                    // tracker and the verifier follow it.
                    let (archived_tx, archived_rx) = tokio::sync::watch::channel(archive::Archived::default());
                    let js = ctx.jetstream().clone();
                    let name = format!("archive-{}-{stream}", s3.target().name);
                    ctx.spawn(&name, archive::run_stream(js.clone(), s3.clone(), key.clone(), stream.clone(), archive.clone(), archived_tx, stop_rx.clone()));
                    let name = format!("deletions-{}-{stream}", s3.target().name);
                    ctx.spawn(&name, deletions::run_deletions(js.clone(), s3.clone(), key.clone(), stream.clone(), archive.verify_interval, archived_rx.clone(), stop_rx.clone()));
                    let name = format!("verify-{}-{stream}", s3.target().name);
                    ctx.spawn(&name, verified::run_verifier(js, s3.clone(), stream, verify.clone(), archived_rx, stop_rx.clone()));
                }
                for c in Component::ALL {
                    for b in cim_events::resources::object_buckets(c) {
                        let name = format!("objects-{}-{}", s3.target().name, b.bucket);
                        let task = objects::run_bucket(
                            ctx.jetstream().clone(),
                            s3.clone(),
                            b.bucket.clone(),
                            b.stream_name(),
                            archive.part_bytes,
                            archive.object_poll,
                            health.clone(),
                            stop_rx.clone(),
                        );
                        ctx.spawn(&name, task);
                    }
                }
            }
            Ok(Vec::new())
        })
        .run(settings.common, shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(args: &[&str]) -> Result<Settings, String> {
        Args::validate_args(args)
    }

    /// A target spec with a credentials file (kept alive by the returned directory).
    fn nas() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("nas");
        std::fs::write(&creds, "aws_access_key_id = ak\naws_secret_access_key = sk\n").unwrap();
        let spec = format!(
            "name=nas,endpoint=http://127.0.0.1:9000,bucket=cim,path-style=true,credentials-file={}",
            creds.display()
        );
        (dir, spec)
    }

    #[test]
    fn no_targets_is_valid() {
        let s = validate(&[]).unwrap();
        assert!(s.targets.is_empty() && s.source_leaves.is_empty());
    }

    #[test]
    fn a_target_and_its_required_list_are_read() {
        let (_dir, nas) = nas();
        let s = validate(&["--archive-target", &nas, "--archive-required", "nas"]).unwrap();
        assert_eq!(s.targets[0].name, "nas");
        assert_eq!(s.archive.required, vec!["nas".to_string()]);
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let (_dir, nas) = nas();
        let e = validate(&["--archive-target", &nas, "--archive-required", "wasabi"]).unwrap_err();
        assert!(e.contains("wasabi"), "{e}");
        let e = validate(&["--archive-target", "name=nas"]).unwrap_err();
        assert!(e.contains("invalid configuration"), "{e}");
        for flag in [
            "--archive-linger",
            "--archive-object-poll",
            "--archive-retry-max",
            "--archive-verify-interval",
            "--archive-probe-interval",
            "--archive-max-lag-age",
        ] {
            let e = validate(&[flag, "0s"]).unwrap_err();
            assert!(e.contains(flag), "{flag}: {e}");
        }
        let e = validate(&["--source-leaf", "bad leaf"]).unwrap_err();
        assert!(e.contains("--source-leaf"), "{e}");
    }

    #[test]
    fn virtual_hosted_addressing_on_an_ip_endpoint_is_refused() {
        let (_dir, nas) = nas();
        let spec = nas.replace("path-style=true", "path-style=false");
        let e = validate(&["--archive-target", &spec]).unwrap_err();
        assert!(e.contains("use path-style=true") && e.contains("127.0.0.1"), "{e}");
    }
}
