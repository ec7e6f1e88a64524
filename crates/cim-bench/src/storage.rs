//! `cim-bench storage`: the storage manager's archive and restore beside raw baselines in
//! the same run — archive throughput vs raw aws-sdk-s3 PutObject of the same segment bytes to the
//! same S3 server and vs a bare ordered-consumer read of the same stream, the copy of a large
//! object by name vs a raw multipart PutObject of the same bytes, restore rate vs raw
//! JetStream publish of the same messages.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use async_nats::{HeaderMap, jetstream};
use bytes::Bytes;
use cim_archive::format::SegmentWriter;
use cim_archive::restore::{self, Until};
use cim_archive::{ArchiveKey, Credentials, S3Client, Target, archived_through};
use cim_events::{Component, Tier, resources};
use cim_testkit::{NatsServer, S3Server};
use futures::StreamExt;
use storage_manager::archive::{self, ArchiveSettings};

#[derive(clap::Args, Debug)]
pub struct StorageArgs {
    /// Events archived and restored.
    #[arg(long, default_value_t = 50_000)]
    events: u64,
    /// Payload bytes per event (pseudo-random, so gzip does not flatter the figures).
    #[arg(long, default_value_t = 512)]
    payload: usize,
    /// Segment size (raw bytes).
    #[arg(long, default_value_t = 4 << 20)]
    segment_bytes: usize,
    /// Size of the object copied by name (MiB; 0 skips that scenario).
    #[arg(long, default_value_t = 256)]
    object_mib: usize,
    /// Segments uploaded at the same time by the archiver.
    #[arg(long, default_value_t = 2)]
    uploads_in_flight: usize,
}

fn payload(i: u64, len: usize) -> Bytes {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    Bytes::from(
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect::<Vec<u8>>(),
    )
}

async fn publish_all(js: &jetstream::Context, n: u64, len: usize) -> Result<()> {
    let mut acks = std::collections::VecDeque::new();
    for i in 0..n {
        let subject =
            cim_events::subject::event(Component::InformationUnit, "unit", &format!("u{}", i % 1000), "tagged")?;
        let mut h = HeaderMap::new();
        let id = format!("bench-{i}");
        h.insert("ce-id", id.as_str());
        h.insert("Nats-Msg-Id", id.as_str());
        acks.push_back(js.publish_with_headers(subject, h, payload(i, len)).await?);
        if acks.len() >= 512 {
            while acks.len() > 256 {
                acks.pop_front().expect("non-empty").await?;
            }
        }
    }
    for a in acks {
        a.await?;
    }
    Ok(())
}

pub async fn run(args: StorageArgs) -> Result<ExitCode> {
    let (nats, s3srv) = tokio::try_join!(NatsServer::start(), S3Server::start())?;
    let js = jetstream::new(nats.connect().await);
    let spec = resources::events_stream(Component::InformationUnit);
    js.get_or_create_stream(spec.config(Tier::Leaf)).await?;
    eprintln!("publishing {} events of {} bytes", args.events, args.payload);
    publish_all(&js, args.events, args.payload).await?;
    let target = |prefix: &str| Target {
        name: "bench".into(),
        endpoint: s3srv.endpoint(),
        region: s3srv.region().into(),
        bucket: "bench".into(),
        prefix: prefix.into(),
        path_style: true,
        credentials: Credentials::new(s3srv.access_key(), s3srv.secret_key()),
        signing_key_file: None,
    };
    let archive_c = S3Client::new(target("archive"))?;
    archive_c.ensure_bucket().await?;
    let raw_c = S3Client::new(target("raw"))?;

    // Baseline: the same segments, built beforehand, PUT one after the other.
    let stream = js.get_stream(&spec.name).await?;
    let mut segments = Vec::new();
    let mut w = SegmentWriter::new();
    for seq in 1..=args.events {
        let m = stream.get_raw_message(seq).await?;
        let headers: Vec<(String, String)> =
            m.headers.iter().flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.to_string()))).collect();
        w.push(seq, m.time.unix_timestamp_nanos() as i64, m.subject.as_str(), &headers, &m.payload);
        if w.raw_len() >= args.segment_bytes {
            segments.push(std::mem::take(&mut w).finish(&spec.name, "raw/", 0, 0).0);
        }
    }
    if !w.is_empty() {
        segments.push(w.finish(&spec.name, "raw/", 0, 0).0);
    }
    let bytes: usize = segments.iter().map(Bytes::len).sum();
    let t = Instant::now();
    for (i, seg) in segments.iter().enumerate() {
        raw_put_object(&raw_c, &format!("raw/seg-{i}"), seg.clone()).await?;
    }
    let raw_put = t.elapsed();

    eprintln!("reading");
    // Read-side baseline: a bare ordered consumer over the same stream, nothing done per
    // message but counting its bytes.
    let t = Instant::now();
    let mut read = 0u64;
    let mut read_bytes = 0usize;
    let mut messages =
        stream.create_consumer(jetstream::consumer::pull::OrderedConfig::default()).await?.messages().await?;
    while read < args.events {
        match messages.next().await {
            Some(m) => {
                let m = m?;
                read_bytes += m.payload.len() + m.subject.len();
                read += 1;
            }
            None => bail!("the ordered consumer ended after {read} messages"),
        }
    }
    drop(messages);
    let raw_read = t.elapsed();

    // The archiver, from nothing to caught up.
    eprintln!("archiving");
    let settings = Arc::new(ArchiveSettings {
        segment_bytes: args.segment_bytes,
        linger: Duration::from_millis(200),
        uploads_in_flight: args.uploads_in_flight,
        ..Default::default()
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let t = Instant::now();
    let (archived_tx, mut archived_rx) = tokio::sync::watch::channel(archive::Archived::default());
    let key = ArchiveKey::for_target(archive_c.target())?;
    let task = tokio::spawn(archive::run_stream(
        js.clone(),
        archive_c.clone(),
        key,
        spec.name.clone(),
        settings,
        archived_tx,
        stop_rx,
    ));
    // The archiver announces every commit; no polling of the target.
    tokio::time::timeout(Duration::from_secs(600), archived_rx.wait_for(|a| a.position >= args.events))
        .await
        .map_err(|_| anyhow::anyhow!("the archive did not catch up within 10 minutes"))?
        .map_err(|_| anyhow::anyhow!("the archiver stopped"))?;
    anyhow::ensure!(
        archived_through(&archive_c, &spec.name).await? >= args.events,
        "the cursor is behind the announcement"
    );
    let archived = t.elapsed();
    let _ = stop_tx.send(true);
    let _ = task.await;
    eprintln!("archived");

    let object =
        if args.object_mib > 0 { Some(bench_object(&js, &archive_c, &raw_c, args.object_mib).await?) } else { None };

    // Restore into a fresh server vs raw publish of the same messages into another.
    let fresh = NatsServer::start().await?;
    let fjs = jetstream::new(fresh.connect().await);
    fjs.get_or_create_stream(spec.config(Tier::Leaf)).await?;
    let t = Instant::now();
    let trust = restore::Trust::new(ArchiveKey::for_target(archive_c.target())?);
    let opts =
        restore::RestoreOptions { trust: &trust, until: Until::All, dry_run: false, epoch: None, progress: &|_, _| {} };
    let r = restore::restore_stream(&archive_c, &fjs, &spec.name, &spec.name, &opts).await;
    let restored = t.elapsed();
    if !r.problems.is_empty() || r.messages != args.events {
        bail!("restore: {} messages, problems {:?}", r.messages, r.problems);
    }
    let raw_srv = NatsServer::start().await?;
    let rjs = jetstream::new(raw_srv.connect().await);
    rjs.get_or_create_stream(spec.config(Tier::Leaf)).await?;
    let t = Instant::now();
    publish_all(&rjs, args.events, args.payload).await?;
    let raw_pub = t.elapsed();

    let mb = bytes as f64 / 1e6;
    let n = args.events as f64;
    println!("| scenario | storage manager | raw baseline | ratio |");
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| archive MB/s ({} segments, {:.1} MB compressed) vs raw PutObject of the same bytes | {:.1} | {:.1} | {:.2} |",
        segments.len(),
        mb,
        mb / archived.as_secs_f64(),
        mb / raw_put.as_secs_f64(),
        raw_put.as_secs_f64() / archived.as_secs_f64()
    );
    println!("| archive events/s | {:.0} | {:.0} | |", n / archived.as_secs_f64(), n / raw_put.as_secs_f64());
    println!(
        "| restore events/s vs raw JetStream publish | {:.0} | {:.0} | {:.2} |",
        n / restored.as_secs_f64(),
        n / raw_pub.as_secs_f64(),
        raw_pub.as_secs_f64() / restored.as_secs_f64()
    );
    println!("| restore MB/s (archived bytes) | {:.1} | | |", r.bytes as f64 / 1e6 / restored.as_secs_f64());
    println!(
        "| archive events/s vs a bare ordered-consumer read ({:.1} MB of payload and subjects) | {:.0} | {:.0} | {:.2} |",
        read_bytes as f64 / 1e6,
        n / archived.as_secs_f64(),
        n / raw_read.as_secs_f64(),
        raw_read.as_secs_f64() / archived.as_secs_f64()
    );
    // The two raw halves back to back: what reading the stream and uploading the segments
    // cost together on the same cores (the archive overlaps them, but they share the CPU).
    let serial = raw_read + raw_put;
    println!(
        "| archive events/s vs a bare read then raw PutObject of the same data, back to back | {:.0} | {:.0} | {:.2} |",
        n / archived.as_secs_f64(),
        n / serial.as_secs_f64(),
        serial.as_secs_f64() / archived.as_secs_f64()
    );
    if let Some(o) = object {
        println!(
            "| {} MiB object copied by name (multipart, {} MiB parts) vs raw multipart PutObject, MB/s | {:.1} | {:.1} | {:.2} |",
            o.mib,
            ArchiveSettings::default().part_bytes >> 20,
            o.mb() / o.copy.as_secs_f64(),
            o.mb() / o.raw.as_secs_f64(),
            o.raw.as_secs_f64() / o.copy.as_secs_f64()
        );
    }
    Ok(ExitCode::SUCCESS)
}

struct ObjectFigures {
    mib: usize,
    copy: Duration,
    raw: Duration,
}

impl ObjectFigures {
    fn mb(&self) -> f64 {
        (self.mib << 20) as f64 / 1e6
    }
}

/// One object of `mib` MiB in the content bucket: the archiver's copy by name (read from the
/// object store while uploading) vs a raw multipart upload of the same bytes from memory.
async fn bench_object(
    js: &jetstream::Context,
    archive_c: &S3Client,
    raw_c: &S3Client,
    mib: usize,
) -> Result<ObjectFigures> {
    let spec = resources::object_buckets(Component::InformationUnit).into_iter().next().expect("the content bucket");
    let store = js.create_object_store(spec.config(Tier::Leaf)).await?;
    let body: Vec<u8> = (0..mib as u64).flat_map(|i| payload(i, 1 << 20)).collect();
    eprintln!("putting a {mib} MiB object");
    store.put("bench-object", &mut &body[..]).await?;

    // The archiver's default part size, on both sides.
    let part_bytes = ArchiveSettings::default().part_bytes;
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let t = Instant::now();
    let health = storage_manager::health::TargetHealth::standalone(&archive_c.target().name);
    let mut memo = storage_manager::objects::Copied::default();
    let stream = spec.stream_name();
    let copied = storage_manager::objects::sync_once(
        js,
        archive_c,
        &spec.bucket,
        &stream,
        part_bytes,
        &mut memo,
        &health,
        &stop_rx,
    )
    .await
    .map_err(anyhow::Error::msg)?;
    let copy = t.elapsed();
    if copied != 1 {
        bail!("the object copy copied {copied} objects, not 1");
    }

    let t = Instant::now();
    raw_multipart(raw_c, "raw/object", &body, part_bytes).await?;
    let raw = t.elapsed();
    Ok(ObjectFigures { mib, copy, raw })
}

/// The baseline's PutObject: a plain aws-sdk-s3 call (the SDK signs the payload; no
/// checksum header), on the same client configuration as the archive's.
async fn raw_put_object(c: &S3Client, key: &str, body: Bytes) -> Result<()> {
    use cim_archive::s3::sdk::primitives::ByteStream;
    c.sdk().put_object().bucket(&c.target().bucket).key(key).body(ByteStream::from(body)).send().await?;
    Ok(())
}

/// The baseline's multipart upload from memory: plain aws-sdk-s3 calls, one part after the
/// other.
async fn raw_multipart(c: &S3Client, key: &str, body: &[u8], part_bytes: usize) -> Result<()> {
    use cim_archive::s3::sdk::primitives::ByteStream;
    use cim_archive::s3::sdk::types::{CompletedMultipartUpload, CompletedPart};
    let (sdk, bucket) = (c.sdk(), &c.target().bucket);
    let started = sdk.create_multipart_upload().bucket(bucket).key(key).send().await?;
    let id = started.upload_id().unwrap_or_default();
    let mut parts = Vec::new();
    for (i, part) in body.chunks(part_bytes).enumerate() {
        let number = i as i32 + 1;
        let out = sdk
            .upload_part()
            .bucket(bucket)
            .key(key)
            .upload_id(id)
            .part_number(number)
            .body(ByteStream::from(Bytes::copy_from_slice(part)))
            .send()
            .await?;
        parts.push(CompletedPart::builder().part_number(number).e_tag(out.e_tag().unwrap_or_default()).build());
    }
    sdk.complete_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(id)
        .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
        .send()
        .await?;
    Ok(())
}
