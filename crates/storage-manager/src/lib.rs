//! The storage-manager service. Storage manager: leaf -> cluster -> S3 tiers, archive and restore.
//!
//! It runs on the shared runtime (provisioning, announce, `$SRV.*`, health) and archives every
//! CIM stream (events, dead letters, object buckets) continuously to an ordered list of
//! S3-compatible targets in the open format of docs/storage-manager.md (the `cim-archive`
//! crate, which also reads it back for `cimctl restore` and `cimctl archive`).

pub mod archive;
pub mod guard;
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
}

/// The validated configuration of `storage-manager`.
#[derive(Clone, Debug)]
pub struct Settings {
    pub common: CommonSettings,
    /// The S3 targets, in order.
    pub targets: Vec<Target>,
    pub archive: ArchiveSettings,
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
        ] {
            if d.is_zero() {
                return Err(ConfigError::invalid(format!("{flag} must be more than 0")));
            }
        }
        for leaf in &self.source_leaves {
            cim_events::token::validate_token("--source-leaf (CIM_SOURCE_LEAVES)", leaf)
                .map_err(|e| ConfigError::invalid(e.to_string()))?;
        }
        Ok(Settings { common, targets, archive, source_leaves: self.source_leaves })
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
                for stream in streams.iter().cloned() {
                    let name = format!("archive-{}-{stream}", s3.target().name);
                    ctx.spawn(&name, archive::run_stream(ctx.jetstream().clone(), s3.clone(), stream, archive.clone(), stop_rx.clone()));
                }
                let verify = verified::VerifySettings {
                    required: Arc::new(archive.required.clone()),
                    interval: archive.verify_interval,
                    metrics: ctx.metrics().clone(),
                };
                for stream in streams.iter().cloned() {
                    let name = format!("verify-{}-{stream}", s3.target().name);
                    ctx.spawn(&name, verified::run_verifier(ctx.jetstream().clone(), s3.clone(), stream, verify.clone(), stop_rx.clone()));
                }
                for c in Component::ALL {
                    for b in cim_events::resources::object_buckets(c) {
                        let name = format!("objects-{}-{}", s3.target().name, b.bucket);
                        let task = objects::run_bucket(ctx.jetstream().clone(), s3.clone(), b.bucket, archive.part_bytes, archive.object_poll, stop_rx.clone());
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
        for flag in ["--archive-linger", "--archive-object-poll", "--archive-retry-max", "--archive-verify-interval"] {
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
