//! `cimctl restore` and `cimctl archive verify|status`: read the storage manager's S3 archive
//! back — into a fresh JetStream, through every checksum, or against the live streams' lag.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use async_nats::jetstream;
use cim_archive::restore::{self, RestoreOptions, StreamReport, Trust, Until};
use cim_archive::{ArchiveKey, S3Client, Target, archived_streams, committed_position};
use cim_events::{Component, Tier, resources};

/// Where the archive is and how to reach NATS.
#[derive(clap::Args, Debug)]
pub struct ArchiveConn {
    /// The archive targets, as the storage manager is configured (repeat, or separate with `;`).
    #[arg(long = "archive-target", env = "CIM_ARCHIVE_TARGETS", value_delimiter = ';', global = true)]
    targets: Vec<String>,
    /// NATS server URL(s), comma-separated.
    #[arg(long, global = true, env = "CIM_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// NATS credentials file (for `restore`, the restore identity's: see docs/storage-manager.md).
    #[arg(long, global = true, env = "CIM_NATS_CREDS")]
    nats_creds: Option<PathBuf>,
    /// JetStream domain (e.g. `hub` for the cluster).
    #[arg(long, global = true, env = "CIM_JS_DOMAIN")]
    js_domain: Option<String>,
}

impl ArchiveConn {
    fn targets(&self) -> Result<Vec<Target>> {
        // A target spec that does not parse is a usage mistake: exit 64, like the service.
        let t = Target::parse_all(&self.targets, &|k| std::env::var(k).ok())
            .map_err(|e| crate::error::usage(format!("--archive-target: {e}")))?;
        if t.is_empty() {
            return Err(crate::error::usage("no archive target: give --archive-target or CIM_ARCHIVE_TARGETS"));
        }
        Ok(t)
    }

    /// `name` among the configured targets, or a full spec.
    fn target(&self, name: &str) -> Result<Target> {
        if name.contains('=') {
            return Target::parse(name, &|k| std::env::var(k).ok())
                .map_err(|e| crate::error::usage(format!("--from: {e}")));
        }
        let all = self.targets()?;
        let names: Vec<String> = all.iter().map(|t| t.name.clone()).collect();
        all.into_iter()
            .find(|t| t.name == name)
            .with_context(|| format!("no archive target named {name} (configured: {})", names.join(", ")))
    }

    async fn jetstream(&self) -> Result<jetstream::Context> {
        self.jetstream_with_inbox(None).await
    }

    /// The connection of `cimctl restore`: replies below [`restore::inbox_prefix`], where the
    /// restore identity (`cimctl deploy nats-permissions`: `restore`) may read them.
    async fn jetstream_with_inbox(&self, inbox_prefix: Option<&str>) -> Result<jetstream::Context> {
        let client = crate::conn::connect_with_inbox(
            "cimctl-archive",
            &self.nats_url,
            self.nats_creds.as_deref(),
            None,
            inbox_prefix,
        )
        .await?;
        Ok(match &self.js_domain {
            Some(d) => jetstream::with_domain(client, d),
            None => jetstream::new(client),
        })
    }
}

#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    /// The target to restore from: a configured target's name, or a full target spec.
    #[arg(long)]
    from: String,
    /// Stop at a stream sequence (each stream restores up to and including it) or at a time
    /// (RFC 3339: every message stored at or before it).
    #[arg(long)]
    until: Option<String>,
    /// Read and check everything, publish nothing.
    #[arg(long)]
    dry_run: bool,
    /// Replication of the streams created (leaf: R1, cluster: R3).
    #[arg(long, default_value = "leaf")]
    tier: String,
    /// Rebuild leaf LEAF from the cluster's archive: the archives of the cluster's mirrors of
    /// that leaf (`<STREAM>_FROM_<LEAF>`) are restored into the leaf's own streams
    /// (`<STREAM>`), with the leaf's sequence numbers; nothing else is restored.
    #[arg(long)]
    leaf: Option<String>,
    /// Restore this epoch of each stream instead of the current one (an epoch is the history
    /// of a stream recreated under the same name; `cimctl archive verify` lists them).
    #[arg(long)]
    epoch: Option<u64>,
    /// Accept manifests that carry no signature (archives written before CIM signed them).
    /// Manifests signed with another key or altered are refused regardless.
    #[arg(long)]
    allow_unsigned: bool,
    #[command(flatten)]
    conn: ArchiveConn,
}

/// Which stream an archive is restored into, or why it is skipped: the cluster's archive holds
/// its mirrors of each leaf (`<STREAM>_FROM_<LEAF>`) beside its own streams; with `--leaf` only
/// that leaf's mirrors are restored, into the leaf's stream names, and without it none are.
fn restore_into(archive: &str, leaf: Option<&str>) -> Result<String, String> {
    match (cim_archive::mirrored_stream(archive), leaf) {
        (Some((stream, l)), Some(want)) if l == want.to_ascii_uppercase() => Ok(stream),
        (Some((_, l)), Some(want)) => Err(format!("skipped: the cluster's mirror of leaf {l}, not of {want}")),
        (Some((stream, l)), None) => Err(format!(
            "skipped: the cluster's mirror of {stream} on leaf {l} (restore a leaf from it with --leaf {})",
            l.to_ascii_lowercase()
        )),
        (None, Some(want)) => Err(format!("skipped: not a mirror of leaf {want}")),
        (None, None) => Ok(archive.to_string()),
    }
}

fn parse_until(s: &str) -> Result<Until> {
    if let Ok(seq) = s.parse::<u64>() {
        return Ok(Until::Sequence(seq));
    }
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .with_context(|| format!("--until {s:?} is neither a sequence number nor an RFC 3339 time"))?;
    Ok(Until::Time(t.unix_timestamp_nanos()))
}

enum Kind {
    Stream(Box<jetstream::stream::Config>),
    Objects(jetstream::object_store::Config),
}

/// The contract's configuration for an archived stream name.
fn stream_kind(name: &str, tier: Tier) -> Option<Kind> {
    for c in Component::ALL {
        if let Some(s) = resources::streams(c).into_iter().find(|s| s.name == name) {
            return Some(Kind::Stream(Box::new(s.config(tier))));
        }
        if let Some(b) = resources::object_buckets(c).into_iter().find(|b| b.stream_name() == name) {
            return Some(Kind::Objects(b.config(tier)));
        }
    }
    None
}

pub async fn restore(args: RestoreArgs) -> Result<ExitCode> {
    let until = args.until.as_deref().map(parse_until).transpose()?.unwrap_or(Until::All);
    let tier: Tier = args.tier.parse().map_err(|e| anyhow::anyhow!("--tier: {e}"))?;
    let s3 = S3Client::new(args.conn.target(&args.from)?)?;
    let trust = Trust { key: ArchiveKey::for_target(s3.target())?, allow_unsigned: args.allow_unsigned };
    let names = restore::archived_stream_names(&s3).await?;
    if names.is_empty() {
        bail!("target {} holds no archived stream under {:?}", s3.target().name, s3.target().prefix);
    }
    let plan: Vec<(&String, Result<String, String>)> =
        names.iter().map(|n| (n, restore_into(n, args.leaf.as_deref()))).collect();
    if let Some(leaf) = &args.leaf
        && plan.iter().all(|(_, p)| p.is_err())
    {
        bail!("target {} holds no archive of the cluster's mirrors of leaf {leaf}", s3.target().name);
    }
    let js = args.conn.jetstream_with_inbox(Some(&restore::inbox_prefix())).await?;
    let mut failed = false;
    let mut total = (0u64, 0u64);
    let started = std::time::Instant::now();
    let count = plan.iter().filter(|(_, p)| p.is_ok()).count();
    eprintln!("restoring {count} streams from {}{}", s3.target().name, if args.dry_run { " (dry run)" } else { "" });
    for (name, into) in &plan {
        let name = name.as_str();
        let into = match into {
            Ok(into) => into.as_str(),
            Err(why) => {
                println!("{name}: {why}");
                continue;
            }
        };
        let Some(kind) = stream_kind(into, tier) else {
            println!("{name}: NOT RESTORED: not a stream of the CIM contract");
            failed = true;
            continue;
        };
        if into != name {
            println!("{name}: into {into}");
        }
        if !args.dry_run {
            let created = async {
                let stream = match kind {
                    Kind::Stream(cfg) => js.get_or_create_stream(*cfg).await.map_err(|e| e.to_string())?,
                    Kind::Objects(cfg) => {
                        let bucket = cfg.bucket.clone();
                        if js.get_object_store(&bucket).await.is_err() {
                            js.create_object_store(cfg).await.map_err(|e| e.to_string())?;
                        }
                        js.get_stream(into).await.map_err(|e| e.to_string())?
                    }
                };
                let info = stream.get_info().await.map_err(|e| e.to_string())?;
                if info.state.messages > 0 || info.state.last_sequence > 0 {
                    return Err(format!(
                        "stream is not empty ({} messages): restore needs a fresh JetStream",
                        info.state.messages
                    ));
                }
                Ok::<_, String>(())
            }
            .await;
            if let Err(e) = created {
                println!("{name}: NOT RESTORED: {e}");
                failed = true;
                continue;
            }
        }
        let progress = |stream: &str, n: u64| eprintln!("  {stream}: {n} messages");
        let opts =
            RestoreOptions { trust: &trust, until, dry_run: args.dry_run, epoch: args.epoch, progress: &progress };
        let r = restore::restore_stream(&s3, &js, name, into, &opts).await;
        total.0 += r.messages;
        total.1 += r.bytes;
        print_report(&r, if args.dry_run { "checked" } else { "restored" });
        failed |= !r.problems.is_empty();
    }
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    println!(
        "{} {} messages ({:.1} MB archived) in {:.1}s: {:.0} messages/s, {:.1} MB/s",
        if args.dry_run { "checked" } else { "restored" },
        total.0,
        total.1 as f64 / 1e6,
        secs,
        total.0 as f64 / secs,
        total.1 as f64 / 1e6 / secs
    );
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn print_report(r: &StreamReport, verb: &str) {
    let name = match r.epoch {
        0 => r.stream.clone(),
        e => format!("{} (epoch {e})", r.stream),
    };
    let mut extra = String::new();
    if r.deletions > 0 {
        extra.push_str(&format!(", {} deleted since archived", r.deletions));
    }
    if r.deleted > 0 {
        extra.push_str(&format!(", {} sequences deleted again", r.deleted));
    }
    if r.messages > 0 {
        println!(
            "{name}: {verb} {} messages, sequences {}..{}, {} segments{extra}",
            r.messages, r.first_seq, r.last_seq, r.segments
        );
    } else {
        println!("{name}: {verb} 0 messages{extra}");
    }
    for p in &r.problems {
        println!("{name}: PROBLEM: {p}");
    }
}

#[derive(clap::Args, Debug)]
pub struct ArchiveArgs {
    #[command(subcommand)]
    command: ArchiveCommand,
    #[command(flatten)]
    conn: ArchiveConn,
}

#[derive(clap::Subcommand, Debug)]
enum ArchiveCommand {
    /// Re-read every segment on every target (or one) and check every checksum and the chain,
    /// and every copy of an object named by its CID against that CID.
    Verify {
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
        /// Accept manifests that carry no signature (archives written before CIM signed
        /// them); they are still checked for everything else.
        #[arg(long)]
        allow_unsigned: bool,
    },
    /// The archive lag of every stream on every target; exits 1 when a required target is
    /// unreachable or more than `--max-lag` messages behind, naming each.
    Status {
        /// A required target more than this many messages of a stream behind fails the check.
        #[arg(long, default_value_t = 1000)]
        max_lag: u64,
        /// The targets that must be current (names, comma-separated; default: every target),
        /// as the storage manager's `--archive-required`.
        #[arg(long = "archive-required", env = "CIM_ARCHIVE_REQUIRED", value_delimiter = ',')]
        required: Vec<String>,
    },
}

/// An S3 client for each target, or a usage error (exit 64) for one the client cannot address.
fn clients(targets: Vec<Target>) -> Result<Vec<S3Client>> {
    targets
        .into_iter()
        .map(|t| {
            let name = t.name.clone();
            S3Client::new(t).map_err(|e| crate::error::usage(format!("archive target {name}: {e}")))
        })
        .collect()
}

pub async fn run(args: ArchiveArgs) -> Result<ExitCode> {
    match args.command {
        ArchiveCommand::Verify { target, allow_unsigned } => {
            let targets = match target {
                Some(t) => vec![args.conn.target(&t)?],
                None => args.conn.targets()?,
            };
            let mut failed = false;
            // With NATS reachable, the archive is also checked against the streams and the
            // storage manager's own record of what it verified; without, on its own.
            let live = match tokio::time::timeout(std::time::Duration::from_secs(5), args.conn.jetstream()).await {
                Ok(Ok(js)) => Some(js),
                _ => {
                    println!("(NATS not reachable: the archive is checked on its own, not against the streams)");
                    None
                }
            };
            for t in targets {
                let s3 = S3Client::new(t)?;
                let trust = Trust { key: ArchiveKey::for_target(s3.target())?, allow_unsigned };
                let names = match restore::archived_stream_names(&s3).await {
                    Ok(n) => n,
                    Err(e) => {
                        println!("{}: PROBLEM: {e}", s3.target().name);
                        failed = true;
                        continue;
                    }
                };
                for name in names {
                    let mut reports = restore::verify_stream(&s3, &trust, &name).await;
                    if let (Some(js), Some(current)) = (&live, reports.last_mut()) {
                        current.problems.extend(against_the_stream(js, &name, &s3.target().name, current).await);
                    }
                    for r in reports {
                        print!("{}/", s3.target().name);
                        print_report(&r, "verified");
                        failed |= !r.problems.is_empty();
                    }
                }
                for c in cim_events::Component::ALL {
                    for b in cim_events::resources::object_buckets(c) {
                        let r = restore::verify_objects(&s3, &b.bucket).await;
                        if r.verified + r.not_by_cid == 0 && r.problems.is_empty() {
                            continue;
                        }
                        println!(
                            "{}/objects/{}: verified {} copies by CID ({} bytes){}",
                            s3.target().name,
                            r.bucket,
                            r.verified,
                            r.bytes,
                            if r.not_by_cid > 0 {
                                format!(", {} not named by a CID (checked through the stream)", r.not_by_cid)
                            } else {
                                String::new()
                            }
                        );
                        for p in &r.problems {
                            println!("{}/objects/{}: PROBLEM: {p}", s3.target().name, r.bucket);
                        }
                        failed |= !r.problems.is_empty();
                    }
                }
            }
            println!("{}", if failed { "archive verify: PROBLEMS FOUND" } else { "archive verify: ok" });
            Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        ArchiveCommand::Status { max_lag, required } => status(&args.conn, max_lag, &required).await,
    }
}

/// `cimctl archive status`: per stream and target, the stream's last sequence against the
/// position committed on the target (read from the target now). Exits 1 when a required
/// target cannot be read or is more than `max_lag` messages behind, 64 for a target that is
/// not configured right.
async fn status(conn: &ArchiveConn, max_lag: u64, required: &[String]) -> Result<ExitCode> {
    let targets = conn.targets()?;
    for r in required {
        if !targets.iter().any(|t| &t.name == r) {
            return Err(crate::error::usage(format!(
                "--archive-required names {r}, which is not a configured target ({})",
                targets.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ")
            )));
        }
    }
    let is_required = |name: &str| required.is_empty() || required.iter().any(|r| r == name);
    let clients = clients(targets)?;
    let js = conn.jetstream().await?;
    // On the cluster, the leaf mirrors there are archived too.
    let mut streams = archived_streams();
    let mut names = js.stream_names();
    while let Some(n) = futures::StreamExt::next(&mut names).await {
        let n = n.context("listing the streams")?;
        if cim_archive::mirrored_stream(&n).is_some() {
            streams.push(n);
        }
    }
    let mut lasts = Vec::new();
    for stream in streams {
        match js.get_stream(&stream).await {
            Ok(s) => lasts.push((stream, s.cached_info().state.last_sequence)),
            Err(_) => continue, // not provisioned here
        }
    }
    println!("{:<32} {:<12} {:>12} {:>12} {:>10}", "STREAM", "TARGET", "STREAM LAST", "ARCHIVED", "LAG");
    // Per target: why it fails the check (unreachable, or the streams it is behind on).
    let mut problems: Vec<String> = Vec::new();
    let mut warnings: Vec<String> = Vec::new();
    for s3 in &clients {
        let name = s3.target().name.as_str();
        let key = ArchiveKey::for_target(s3.target())?;
        let mut behind: Vec<String> = Vec::new();
        let mut unreachable: Option<String> = None;
        for (stream, last) in &lasts {
            if unreachable.is_some() {
                // One failure names the target; the other streams are not asked again.
                println!("{stream:<32} {name:<12} {last:>12} {:>12} {:>10}", "?", "?");
                continue;
            }
            match committed_position(s3, &key, stream).await {
                Ok(cim_archive::Position { last_seq: p, .. }) => {
                    let lag = last.saturating_sub(p);
                    if lag > max_lag {
                        behind.push(format!("{stream} {lag} messages behind"));
                    }
                    println!("{stream:<32} {name:<12} {last:>12} {p:>12} {lag:>10}");
                }
                Err(e) => {
                    println!("{stream:<32} {name:<12} {last:>12} {:>12} {:>10}", "?", "?");
                    unreachable = Some(crate::error::tidy(&e.to_string()));
                }
            }
        }
        let why = match (unreachable, behind.is_empty()) {
            (Some(e), _) => Some(format!("target {name} unreachable: {e}")),
            (None, false) => {
                Some(format!("target {name} behind by more than {max_lag} messages: {}", behind.join(", ")))
            }
            (None, true) => None,
        };
        if let Some(why) = why {
            if is_required(name) {
                problems.push(why);
            } else {
                warnings.push(format!("{why} (not required)"));
            }
        }
    }
    for w in &warnings {
        println!("warning: {w}");
    }
    for p in &problems {
        println!("PROBLEM: {p}");
    }
    if problems.is_empty() {
        println!("archive status: ok");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("archive status: {} required target(s) unreachable or behind", problems.len());
        Ok(ExitCode::FAILURE)
    }
}

/// What the live side says about the current epoch of an archived stream: the stream must
/// not end before the archive (that would be another history), and the storage manager must
/// not have verified more on this target than the archive now holds (manifests removed since).
async fn against_the_stream(js: &jetstream::Context, stream: &str, target: &str, r: &StreamReport) -> Vec<String> {
    let mut problems = Vec::new();
    if let Ok(s) = js.get_stream(stream).await
        && let Ok(info) = s.get_info().await
        && info.state.last_sequence < r.last_seq
    {
        problems.push(format!(
            "the stream ends at sequence {} but the archive's current epoch at {}: the stream is not the history archived",
            info.state.last_sequence, r.last_seq
        ));
    }
    let Ok(bucket) = resources::kv_bucket(Component::StorageManager, cim_events::storage::KV_ARCHIVE) else {
        return problems;
    };
    if let Ok(kv) = js.get_key_value(&bucket).await
        && let Ok(key) = cim_events::storage::target_key(stream, target)
        && let Ok(Some(v)) = kv.get(&key).await
        && let Ok(w) = serde_json::from_slice::<cim_events::storage::Watermark>(&v)
        && w.verified_seq > r.last_seq
    {
        problems.push(format!(
            "the storage manager verified sequences up to {} on {target}, but the archive now ends at {}: manifests were removed",
            w.verified_seq, r.last_seq
        ));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_mirror_archives_restore_into_the_leaf_streams_only_when_asked() {
        let stream = resources::events_stream(Component::InformationUnit).name;
        let mirror = resources::leaf_mirror(&stream, "leaf1").unwrap();
        assert_eq!(restore_into(&stream, None).unwrap(), stream);
        assert_eq!(restore_into(&mirror, Some("leaf1")).unwrap(), stream);
        assert_eq!(restore_into(&mirror, Some("LEAF1")).unwrap(), stream);
        assert!(restore_into(&mirror, None).unwrap_err().contains("--leaf leaf1"));
        assert!(restore_into(&mirror, Some("leaf2")).unwrap_err().contains("not of leaf2"));
        assert!(restore_into(&stream, Some("leaf1")).unwrap_err().contains("not a mirror"));
    }

    #[test]
    fn until_is_a_sequence_or_a_time() {
        assert_eq!(parse_until("42").unwrap(), Until::Sequence(42));
        assert_eq!(parse_until("1970-01-01T00:00:01Z").unwrap(), Until::Time(1_000_000_000));
        assert!(parse_until("yesterday").unwrap_err().to_string().contains("neither"));
    }

    #[test]
    fn every_archived_stream_has_a_contract_config() {
        for s in archived_streams() {
            assert!(stream_kind(&s, Tier::Leaf).is_some(), "{s}");
        }
        assert!(stream_kind("NOPE", Tier::Leaf).is_none());
    }
}
