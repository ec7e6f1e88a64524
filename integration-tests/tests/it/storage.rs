//! Storage manager against real processes: nats-server, two S3 targets and the
//! `storage-manager` binary. Archive with a crash mid-archive, verify, restore message by
//! message and object by checksum, point-in-time restore, corruption named, S3 outage.
//! The S3 servers are `s3s-fs`; the main round trip also runs on moto's server (a second,
//! unrelated S3 implementation), and the archive is read back with the aws CLI.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use async_nats::{HeaderMap, jetstream};
use bytes::Bytes;
use cim_archive::restore::{self, Until};
use cim_archive::{ArchiveKey, Credentials, S3Client, Target, archived_through};
use cim_events::{Component, Tier, resources};
use cim_testkit::{NatsServer, S3Kind, S3Server, eventually, stays_true_for};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::common::{ServiceProc, wait_ready};

pub(crate) const BUCKET: &str = "cim-archive";
pub(crate) const WAIT: Duration = Duration::from_secs(90);

pub(crate) fn target(s3: &S3Server, name: &str, prefix: &str) -> Target {
    Target {
        name: name.to_string(),
        endpoint: s3.endpoint(),
        region: s3.region().to_string(),
        bucket: BUCKET.to_string(),
        prefix: prefix.to_string(),
        path_style: true,
        credentials: Credentials::new(s3.access_key(), s3.secret_key()),
        signing_key_file: None,
    }
}

pub(crate) fn spec(s3: &S3Server, name: &str, prefix: &str, env: &str) -> String {
    format!(
        "name={name},endpoint={},region={},bucket={BUCKET},path-style=true,prefix={prefix},credentials-env={env}",
        s3.endpoint(),
        s3.region()
    )
}

pub(crate) fn events_stream() -> String {
    resources::events_stream(Component::InformationUnit).name
}

pub(crate) fn content_bucket() -> resources::ObjectBucketSpec {
    resources::object_buckets(Component::InformationUnit).remove(0)
}

/// Creates the streams the test archives (normally the information-unit service does).
pub(crate) async fn provision(js: &jetstream::Context) -> Result<()> {
    js.get_or_create_stream(resources::events_stream(Component::InformationUnit).config(Tier::Leaf)).await?;
    js.create_object_store(content_bucket().config(Tier::Leaf)).await?;
    Ok(())
}

pub(crate) async fn publish_events(js: &jetstream::Context, from: u64, to: u64) -> Result<()> {
    let mut acks = Vec::new();
    for i in from..to {
        let subject =
            cim_events::subject::event(Component::InformationUnit, "unit", &format!("u{}", i % 37), "tagged")?;
        let mut h = HeaderMap::new();
        let id = format!("0190-test-{i}");
        h.insert("ce-id", id.as_str());
        h.insert("Nats-Msg-Id", id.as_str());
        h.insert("ce-type", "cim.iu.tagged");
        h.append("x-repeat", "a");
        h.append("x-repeat", "b");
        let payload = Bytes::from(format!("event {i} {}", "x".repeat((i % 200) as usize)));
        acks.push(js.publish_with_headers(subject, h, payload).await?);
        if acks.len() >= 256 {
            for a in acks.drain(..) {
                a.await?;
            }
        }
    }
    for a in acks {
        a.await?;
    }
    Ok(())
}

pub(crate) fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub(crate) async fn last_seq(js: &jetstream::Context, stream: &str) -> Result<u64> {
    Ok(js.get_stream(stream).await?.info().await?.state.last_sequence)
}

pub(crate) async fn wait_archived(s3: &S3Client, stream: &str, last: u64) -> Result<()> {
    eventually(WAIT, &format!("{stream} archived to {} up to {last}", s3.target().name), || async {
        let p = archived_through(s3, stream).await?;
        ensure!(p >= last, "at {p}");
        Ok(())
    })
    .await
}

pub(crate) fn headers_of(h: &HeaderMap) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = h
        .iter()
        .flat_map(|(k, vs)| vs.iter().map(move |x| (k.to_string(), x.to_string())))
        // Not data, and not restored: preconditions and the rollup instruction.
        .filter(|(k, _)| !k.starts_with("Nats-Expected-") && k != "Nats-Rollup")
        .collect();
    v.sort();
    v
}

/// Every message of `stream` in both servers: same sequence, subject, headers, payload.
async fn compare_streams(a: &jetstream::Context, b: &jetstream::Context, stream: &str, upto: u64) -> Result<()> {
    let (sa, sb) = (a.get_stream(stream).await?, b.get_stream(stream).await?);
    let nb = sb.clone().info().await?.state.messages;
    ensure!(nb == upto, "{stream}: restored holds {nb} messages, expected {upto}");
    for seq in 1..=upto {
        let ma = sa.get_raw_message(seq).await.with_context(|| format!("{stream} original seq {seq}"))?;
        let mb = sb.get_raw_message(seq).await.with_context(|| format!("{stream} restored seq {seq}"))?;
        ensure!(ma.subject == mb.subject, "{stream} seq {seq}: subject {} vs {}", ma.subject, mb.subject);
        ensure!(ma.payload == mb.payload, "{stream} seq {seq}: payload differs");
        ensure!(
            headers_of(&ma.headers) == headers_of(&mb.headers),
            "{stream} seq {seq}: headers {:?} vs {:?}",
            headers_of(&ma.headers),
            headers_of(&mb.headers)
        );
    }
    Ok(())
}

async fn object_sha(js: &jetstream::Context, name: &str) -> Result<String> {
    let store = js.get_object_store(&content_bucket().bucket).await?;
    let mut obj = store.get(name).await?;
    let mut buf = Vec::new();
    obj.read_to_end(&mut buf).await?;
    Ok(format!("{:x}", Sha256::digest(&buf)))
}

/// The target's own key, signatures required.
pub(crate) fn trust(s3: &S3Client) -> restore::Trust {
    restore::Trust::new(ArchiveKey::for_target(s3.target()).expect("test targets have keys"))
}

/// Verifies the current (only) epoch of `stream`.
pub(crate) async fn verify(s3: &S3Client, stream: &str) -> restore::StreamReport {
    let mut reports = restore::verify_stream(s3, &trust(s3), stream).await;
    assert_eq!(reports.len(), 1, "one epoch expected: {reports:?}");
    reports.remove(0)
}

pub(crate) fn restore_env() -> impl Fn(&str, u64) + Sync {
    |_s: &str, _n: u64| {}
}

/// Restores every archived stream from `s3` into a fresh server.
async fn restore_into(s3: &S3Client, until: Until) -> Result<(NatsServer, Vec<restore::StreamReport>)> {
    let fresh = NatsServer::start().await?;
    let js = jetstream::new(fresh.connect().await);
    provision(&js).await?;
    let mut reports = Vec::new();
    for stream in [events_stream(), content_bucket().stream_name()] {
        let (trust, progress) = (trust(s3), restore_env());
        let opts = restore::RestoreOptions { trust: &trust, until, dry_run: false, epoch: None, progress: &progress };
        reports.push(restore::restore_stream(s3, &js, &stream, &stream, &opts).await);
    }
    Ok((fresh, reports))
}

/// A storage manager archiving to `nas` and `wasabi` (each with its key prefix), credentials
/// from the environment, plus `extra` arguments.
pub(crate) fn start_two_targets(
    nats: &NatsServer,
    nas: (&S3Server, &str),
    wasabi: (&S3Server, &str),
    extra: &[&str],
) -> Result<ServiceProc> {
    let specs = [spec(nas.0, "nas", nas.1, "NAS"), spec(wasabi.0, "wasabi", wasabi.1, "WASABI")];
    let mut args = vec!["--archive-target", specs[0].as_str(), "--archive-target", specs[1].as_str()];
    args.extend_from_slice(extra);
    let env = [
        ("NAS_ACCESS_KEY_ID", nas.0.access_key()),
        ("NAS_SECRET_ACCESS_KEY", nas.0.secret_key()),
        ("WASABI_ACCESS_KEY_ID", wasabi.0.access_key()),
        ("WASABI_SECRET_ACCESS_KEY", wasabi.0.secret_key()),
    ];
    ServiceProc::start_with_env(Component::StorageManager, &nats.url(), &args, &env)
}

/// Flips one bit of the object at `key` (at byte `at(len)`), through S3: works on any server.
async fn flip_bit(s3: &S3Client, key: &str, at: impl Fn(usize) -> usize) -> Result<()> {
    let mut bytes = s3.get(key).await?.with_context(|| format!("{key} is not there"))?.to_vec();
    let i = at(bytes.len());
    bytes[i] ^= 0x40;
    s3.put(key, Bytes::from(bytes)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storage_archive_two_targets_crash_resume_restore() -> Result<()> {
    archive_crash_resume_restore(S3Kind::S3sFs).await
}

/// The same round trip against moto's S3 server, an implementation unrelated to s3s-fs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storage_archive_two_targets_crash_resume_restore_on_moto() -> Result<()> {
    archive_crash_resume_restore(S3Kind::Moto).await
}

async fn archive_crash_resume_restore(kind: S3Kind) -> Result<()> {
    let (nats, nas, wasabi) =
        tokio::try_join!(NatsServer::start(), S3Server::start_kind(kind), S3Server::start_kind(kind))?;
    let client = nats.connect().await;
    let js = jetstream::new(client.clone());
    provision(&js).await?;
    let (nas_c, wasabi_c) =
        (S3Client::new(target(&nas, "nas", ""))?, S3Client::new(target(&wasabi, "wasabi", "leaf1"))?);
    nas_c.ensure_bucket().await?;
    wasabi_c.ensure_bucket().await?;

    // Batch 1 and content (a multi-chunk object, a small one, an empty one).
    publish_events(&js, 0, 300).await?;
    let store = js.get_object_store(&content_bucket().bucket).await?;
    let objects = [("big", pseudo_random(12 << 20, 7)), ("small", b"hello".to_vec()), ("empty", Vec::new())];
    for (name, data) in &objects {
        store.put(*name, &mut data.as_slice()).await?;
    }

    let settings = [
        "--archive-segment-bytes",
        "8192",
        "--archive-linger",
        "100ms",
        "--archive-retry-max",
        "500ms",
        "--archive-object-poll",
        "200ms",
    ];
    let mut svc = start_two_targets(&nats, (&nas, ""), (&wasabi, "leaf1"), &settings)?;
    wait_ready(&client, &svc).await?;

    // Batch 2 while archiving; crash the service (SIGKILL) once it is part-way through.
    publish_events(&js, 300, 6000).await?;
    let last = last_seq(&js, &events_stream()).await?;
    assert_eq!(last, 6000);
    eventually(WAIT, "the archive to pass batch 1", || async {
        let p = archived_through(&nas_c, &events_stream()).await?;
        ensure!(p > 300, "at {p}");
        Ok(())
    })
    .await?;
    svc.signal(nix::sys::signal::Signal::SIGKILL);
    svc.wait(Duration::from_secs(10)).await?;
    let at_crash =
        (archived_through(&nas_c, &events_stream()).await?, archived_through(&wasabi_c, &events_stream()).await?);
    eprintln!("archive positions at the crash: nas {}, wasabi {} of {last}", at_crash.0, at_crash.1);
    let log1 = svc.log();

    let mut svc = start_two_targets(&nats, (&nas, ""), (&wasabi, "leaf1"), &settings)?;
    wait_ready(&client, &svc).await?;
    let obj_stream = content_bucket().stream_name();
    let obj_last = last_seq(&js, &obj_stream).await?;
    for s3 in [&nas_c, &wasabi_c] {
        wait_archived(s3, &events_stream(), last).await?;
        wait_archived(s3, &obj_stream, obj_last).await?;
    }
    // Objects by name (CID in the content bucket), the big one in multipart parts.
    for s3 in [&nas_c, &wasabi_c] {
        for (name, data) in &objects {
            let key = cim_archive::format::object_key(&s3.target().prefix, &content_bucket().bucket, name);
            eventually(WAIT, &format!("{key} on {}", s3.target().name), || async {
                let got = s3.get(&key).await?.context("not there yet")?;
                ensure!(Sha256::digest(&got) == Sha256::digest(data), "{key}: content differs ({} bytes)", got.len());
                Ok(())
            })
            .await?;
            // HEAD gives the object's size (not the length of its empty body), so a copy
            // that is there is not uploaded again.
            assert_eq!(s3.head(&key).await?, Some(data.len() as u64), "{key}: HEAD size");
        }
    }
    let copies = svc.log().matches("objects archived by name").count();
    stays_true_for(Duration::from_secs(2), "no object copied again while idle", || async {
        let now = svc.log().matches("objects archived by name").count();
        ensure!(now == copies, "objects copied again: {copies} -> {now} passes that copied");
        Ok(())
    })
    .await?;
    svc.terminate(Duration::from_secs(20)).await?;
    let log2 = svc.log();
    for log in [&log1, &log2] {
        assert!(!log.contains(nas.secret_key()), "a secret reached the log");
    }

    // Verify: every checksum, contiguous, no duplicate.
    for s3 in [&nas_c, &wasabi_c] {
        let r = verify(s3, &events_stream()).await;
        assert!(r.problems.is_empty(), "{}: {:?}", s3.target().name, r.problems);
        assert_eq!((r.first_seq, r.last_seq, r.messages), (1, last, last), "{}", s3.target().name);
        assert!(r.segments > 10, "expected many segments, got {}", r.segments);
        let r = verify(s3, &obj_stream).await;
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.messages, obj_last);
    }
    assert!(at_crash.0 < last || at_crash.1 < last, "the crash should have hit mid-archive: {at_crash:?}");

    // Restore from the second target into a fresh server: message by message, object by checksum.
    let (fresh, reports) = restore_into(&wasabi_c, Until::All).await?;
    for r in &reports {
        assert!(r.problems.is_empty(), "{}: {:?}", r.stream, r.problems);
    }
    let fjs = jetstream::new(fresh.connect().await);
    compare_streams(&js, &fjs, &events_stream(), last).await?;
    compare_streams(&js, &fjs, &obj_stream, obj_last).await?;
    for (name, data) in &objects {
        assert_eq!(object_sha(&fjs, name).await?, format!("{:x}", Sha256::digest(data)), "object {name}");
    }
    drop(fresh);

    // Point in time: by sequence, and by time (the store time of message 150).
    let (fresh, reports) = restore_into(&nas_c, Until::Sequence(150)).await?;
    assert_eq!(reports[0].messages, 150);
    let fjs = jetstream::new(fresh.connect().await);
    compare_streams(&js, &fjs, &events_stream(), 150).await?;
    drop(fresh);
    let t150 = js.get_stream(events_stream()).await?.get_raw_message(150).await?.time.unix_timestamp_nanos();
    let t151 = js.get_stream(events_stream()).await?.get_raw_message(151).await?.time.unix_timestamp_nanos();
    let (fresh, reports) = restore_into(&nas_c, Until::Time(t150)).await?;
    let n = reports[0].messages;
    if t151 > t150 {
        assert_eq!(n, 150);
    } else {
        assert!(n >= 150, "{n}");
    }
    drop(fresh);

    // Corruption: flip a byte of one segment, delete another; both named, nothing wrong restored.
    let manifests = restore::manifests(&nas_c, &trust(&nas_c), &events_stream(), 0).await?.0;
    let (_, m3) = &manifests[3];
    let (_, m5) = &manifests[5];
    flip_bit(&nas_c, &m3.segment_key, |len| len / 2).await?;
    nas_c.delete(&m5.segment_key).await?;
    ensure!(nas_c.head(&m5.segment_key).await?.is_none(), "{} still there after delete", m5.segment_key);
    let r = verify(&nas_c, &events_stream()).await;
    assert_eq!(r.problems.len(), 2, "{:?}", r.problems);
    assert!(r.problems[0].contains(&m3.segment_key) && r.problems[0].contains("sha256"), "{:?}", r.problems);
    assert!(r.problems[1].contains(&m5.segment_key) && r.problems[1].contains("missing"), "{:?}", r.problems);
    let (fresh, reports) = restore_into(&nas_c, Until::All).await?;
    assert_eq!(reports[0].messages, m3.first_seq - 1, "restore stops before the corrupt segment");
    assert!(reports[0].problems[0].contains(&m3.segment_key), "{:?}", reports[0].problems);
    let fjs = jetstream::new(fresh.connect().await);
    compare_streams(&js, &fjs, &events_stream(), m3.first_seq - 1).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storage_archive_rides_out_an_s3_outage() -> Result<()> {
    let (nats, mut nas) = tokio::try_join!(NatsServer::start(), S3Server::start())?;
    let client = nats.connect().await;
    let js = jetstream::new(client.clone());
    provision(&js).await?;
    let nas_c = S3Client::new(target(&nas, "nas", "x"))?;
    nas_c.ensure_bucket().await?;
    publish_events(&js, 0, 100).await?;
    let spec = spec(&nas, "nas", "x", "NAS");
    let args = ["--archive-target", spec.as_str(), "--archive-linger", "50ms", "--archive-retry-max", "300ms"];
    let env = [("NAS_ACCESS_KEY_ID", nas.access_key()), ("NAS_SECRET_ACCESS_KEY", nas.secret_key())];
    let mut svc = ServiceProc::start_with_env(Component::StorageManager, &nats.url(), &args, &env)?;
    wait_ready(&client, &svc).await?;
    wait_archived(&nas_c, &events_stream(), 100).await?;

    nas.kill();
    publish_events(&js, 100, 400).await?;
    eventually(WAIT, "the service to report failed uploads", || async {
        if svc.log().contains("archive upload failed") { Ok(()) } else { bail!("no failure logged yet") }
    })
    .await?;
    nas.restart().await?;
    wait_archived(&nas_c, &events_stream(), 400).await?;
    let r = verify(&nas_c, &events_stream()).await;
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!((r.first_seq, r.last_seq, r.messages), (1, 400, 400));

    // Refused credentials: a second service with a wrong secret logs the refusal (not the secret).
    svc.terminate(Duration::from_secs(20)).await?;
    let bad_env = [("NAS_ACCESS_KEY_ID", nas.access_key()), ("NAS_SECRET_ACCESS_KEY", "wrong-secret-value")];
    publish_events(&js, 400, 410).await?;
    let svc = ServiceProc::start_with_env(Component::StorageManager, &nats.url(), &args, &bad_env)?;
    wait_ready(&client, &svc).await?;
    eventually(WAIT, "credentials refused to be reported", || async {
        let log = svc.log();
        ensure!(
            log.contains("403") || log.contains("SignatureDoesNotMatch") || log.contains("AccessDenied"),
            "not yet"
        );
        Ok(())
    })
    .await?;
    assert!(!svc.log().contains("wrong-secret-value"));
    assert_eq!(archived_through(&nas_c, &events_stream()).await?, 400);
    Ok(())
}

pub(crate) async fn cimctl(args: &[&str], nats_url: &str, spec: &str, env: &[(&str, &str)]) -> Result<(bool, String)> {
    let out = tokio::process::Command::new(crate::common::bin("cimctl"))
        .args(args)
        .env("CIM_NATS_URL", nats_url)
        .env("CIM_ARCHIVE_TARGETS", spec)
        .envs(env.iter().copied())
        .output()
        .await?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storage_cimctl_restore_verify_status() -> Result<()> {
    let (nats, nas) = tokio::try_join!(NatsServer::start(), S3Server::start())?;
    let client = nats.connect().await;
    let js = jetstream::new(client.clone());
    provision(&js).await?;
    let nas_c = S3Client::new(target(&nas, "nas", "site"))?;
    nas_c.ensure_bucket().await?;
    publish_events(&js, 0, 500).await?;
    let store = js.get_object_store(&content_bucket().bucket).await?;
    let blob = pseudo_random(300_000, 3);
    store.put("blob", &mut blob.as_slice()).await?;
    // Content as the information unit keeps it: named by its CID.
    let content = pseudo_random(200_000, 4);
    let cid = cim_events::Cid::of(&content).to_string();
    store.put(cid.as_str(), &mut content.as_slice()).await?;
    let spec = spec(&nas, "nas", "site", "NAS");
    let env = [("NAS_ACCESS_KEY_ID", nas.access_key()), ("NAS_SECRET_ACCESS_KEY", nas.secret_key())];
    let args = [
        "--archive-target",
        spec.as_str(),
        "--archive-linger",
        "50ms",
        "--archive-segment-bytes",
        "20000",
        "--archive-object-poll",
        "200ms",
    ];
    let mut svc = ServiceProc::start_with_env(Component::StorageManager, &nats.url(), &args, &env)?;
    wait_ready(&client, &svc).await?;
    let obj_stream = content_bucket().stream_name();
    let obj_last = last_seq(&js, &obj_stream).await?;
    wait_archived(&nas_c, &events_stream(), 500).await?;
    wait_archived(&nas_c, &obj_stream, obj_last).await?;
    let copy_key = cim_archive::format::object_key(&nas_c.target().prefix, &content_bucket().bucket, &cid);
    eventually(WAIT, "the content copied by its CID", || async {
        ensure!(nas_c.head(&copy_key).await?.is_some(), "not yet");
        Ok(())
    })
    .await?;
    svc.terminate(Duration::from_secs(20)).await?;

    // status: lag 0 everywhere once archived; then lag shows new events.
    publish_events(&js, 500, 520).await?;
    let (ok, out) = cimctl(&["archive", "status"], &nats.url(), &spec, &env).await?;
    assert!(ok, "{out}");
    let line = out.lines().find(|l| l.starts_with(&events_stream())).context("events line")?;
    assert_eq!(line.split_whitespace().collect::<Vec<_>>()[1..], ["nas", "520", "500", "20"], "{out}");
    assert!(!out.contains(nas.secret_key()));

    let (ok, out) = cimctl(&["archive", "verify"], &nats.url(), &spec, &env).await?;
    assert!(ok && out.contains("archive verify: ok"), "{out}");
    assert!(
        out.contains(&format!(
            "nas/objects/{}: verified 1 copies by CID (200000 bytes), 1 not named by a CID",
            content_bucket().bucket
        )),
        "{out}"
    );

    // dry run: reads and checks everything, publishes nothing.
    let fresh = NatsServer::start().await?;
    let (ok, out) = cimctl(&["restore", "--from", "nas", "--dry-run"], &fresh.url(), &spec, &env).await?;
    assert!(ok, "{out}");
    assert!(out.contains(&format!("{}: checked 500 messages", events_stream())), "{out}");
    let fjs = jetstream::new(fresh.connect().await);
    assert!(fjs.get_stream(events_stream()).await.is_err(), "a dry run created a stream");

    // full restore, then the same again is refused (not a fresh JetStream).
    let (ok, out) = cimctl(&["restore", "--from", "nas"], &fresh.url(), &spec, &env).await?;
    assert!(ok, "{out}");
    assert!(out.contains("messages/s"), "{out}");
    compare_streams(&js, &fjs, &events_stream(), 500).await?;
    compare_streams(&js, &fjs, &obj_stream, obj_last).await?;
    assert_eq!(object_sha(&fjs, "blob").await?, format!("{:x}", Sha256::digest(&blob)));
    let (ok, out) = cimctl(&["restore", "--from", "nas"], &fresh.url(), &spec, &env).await?;
    assert!(!ok && out.contains("restore needs a fresh JetStream"), "{out}");
    drop(fresh);

    // point in time by sequence; a bad --until is refused clearly.
    let fresh = NatsServer::start().await?;
    let (ok, out) = cimctl(&["restore", "--from", "nas", "--until", "50"], &fresh.url(), &spec, &env).await?;
    assert!(ok, "{out}");
    let fjs = jetstream::new(fresh.connect().await);
    compare_streams(&js, &fjs, &events_stream(), 50).await?;
    let (ok, out) = cimctl(&["restore", "--from", "nas", "--until", "soon"], &fresh.url(), &spec, &env).await?;
    assert!(!ok && out.contains("neither a sequence number nor an RFC 3339 time"), "{out}");
    let (ok, out) = cimctl(&["restore", "--from", "elsewhere"], &fresh.url(), &spec, &env).await?;
    assert!(!ok && out.contains("no archive target named elsewhere"), "{out}");

    // a corrupt segment: verify names it and fails.
    let (key, m) = restore::manifests(&nas_c, &trust(&nas_c), &events_stream(), 0).await?.0.remove(1);
    flip_bit(&nas_c, &m.segment_key, |len| len - 1).await?;
    // ... and a copy whose bytes no longer match the CID it is named by.
    flip_bit(&nas_c, &copy_key, |_| 0).await?;
    let (ok, out) = cimctl(&["archive", "verify"], &nats.url(), &spec, &env).await?;
    assert!(!ok, "{out}");
    assert!(out.contains(&format!("segment {}: sha256", m.segment_key)) && out.contains("PROBLEMS FOUND"), "{out}");
    assert!(
        out.contains(&format!("object {copy_key}: its bytes hash to")) && out.contains("not to the CID it is named by"),
        "{out}"
    );
    let _ = key;
    Ok(())
}

/// The archive written by the code before format 2 (`crates/cim-archive/tests/fixtures/format1`):
/// one signed format 1 manifest and its zstd segment of the unit events, sequences 1-10 without
/// 4, under the key prefix `format1/`, signed with a key derived from [`FORMAT1_SECRET`].
fn format1_fixture() -> Result<(Vec<u8>, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/cim-archive/tests/fixtures/format1");
    Ok((std::fs::read(dir.join("manifest.json"))?, std::fs::read(dir.join("segment.cimseg.zst"))?))
}
const FORMAT1_SECRET: &[u8] = b"cim format 1 fixture signing key";
const FORMAT1_PREFIX: &str = "format1";

/// An archive written before format 2 still verifies and restores, continued by format 2
/// segments as the archiver writes them now (no hash of the decompressed records in the
/// manifest, uploaded with a CRC32C instead of a signed SHA-256): s3s-fs checks that CRC32C
/// and refuses a segment whose CRC32C does not match its bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_a_format_1_archive_verifies_and_restores_beside_format_2_segments() -> Result<()> {
    use cim_archive::format::{self, MANIFEST_FORMAT, MANIFEST_FORMAT_V1, Manifest, SegmentWriter};
    let nas = S3Server::start().await?;
    let dir = tempfile::tempdir()?;
    let key_file = dir.path().join("signing-key");
    std::fs::write(&key_file, FORMAT1_SECRET)?;
    let mut t = target(&nas, "nas", FORMAT1_PREFIX);
    t.signing_key_file = Some(key_file);
    let s3 = S3Client::new(t)?;
    s3.ensure_bucket().await?;
    let stream = events_stream();
    let prefix = s3.target().prefix.clone();

    let (old_json, old_segment) = format1_fixture()?;
    let old = Manifest::parse("fixture", &old_json)?;
    ensure!(old.format == MANIFEST_FORMAT_V1 && old.raw_sha256.is_some() && old.stream == stream, "{old:?}");
    let old_records = format::decode_segment(&old, &old_segment)?;
    s3.put(&old.segment_key, Bytes::from(old_segment)).await?;
    s3.put(&format::manifest_key(&prefix, &stream, 0, old.first_seq, old.last_seq), Bytes::from(old_json)).await?;

    // Format 2 after it, through the archiver's own upload path.
    let key = ArchiveKey::for_target(s3.target())?;
    let subject = cim_events::subject::event(Component::InformationUnit, "unit", "u9", "tagged")?;
    let mut w = SegmentWriter::new();
    for seq in old.last_seq + 1..=old.last_seq + 20 {
        let headers = [("ce-id".to_string(), format!("new-{seq}"))];
        w.push(seq, seq as i64 * 1000, &subject, &headers, format!("format 2 record {seq}").as_bytes());
    }
    let (new_segment, mut new) = w.finish(&stream, &prefix, 0, old.last_seq);
    ensure!(new.format == MANIFEST_FORMAT && new.raw_sha256.is_none(), "{new:?}");
    key.seal(&mut new);
    let crc = cim_archive::s3::crc32c(&new_segment);
    let refused = s3.put_segment(&new.segment_key, new_segment.clone(), crc ^ 1).await;
    match refused {
        Err(cim_archive::S3Error::Status { status: 400, ref message, .. }) if message.contains("BadDigest") => {}
        other => bail!("a segment with a wrong CRC32C was not refused as a bad digest: {other:?}"),
    }
    s3.put_segment(&new.segment_key, new_segment.clone(), crc).await?;
    let new_records = format::decode_segment(&new, &new_segment)?;
    let manifest_body = Bytes::from(serde_json::to_vec_pretty(&new)?);
    s3.put(&format::manifest_key(&prefix, &stream, 0, new.first_seq, new.last_seq), manifest_body).await?;

    let report = verify(&s3, &stream).await;
    ensure!(report.problems.is_empty(), "verify: {:?}", report.problems);
    ensure!((report.segments, report.messages) == (2, old.count + 20), "{report:?}");

    // The fixture has a gap (sequence 4 deleted), which an event stream, denying deletes, never
    // has: restore into a stream of the same name and subjects that allows them.
    let fresh = NatsServer::start().await?;
    let fjs = jetstream::new(fresh.connect().await);
    let mut config = resources::events_stream(Component::InformationUnit).config(Tier::Leaf);
    config.deny_delete = false;
    fjs.create_stream(config).await?;
    let (trust, progress) = (trust(&s3), restore_env());
    let opts =
        restore::RestoreOptions { trust: &trust, until: Until::All, dry_run: false, epoch: None, progress: &progress };
    let r = restore::restore_stream(&s3, &fjs, &stream, &stream, &opts).await;
    ensure!(r.problems.is_empty() && r.messages == old.count + 20, "{r:?}");
    let restored = fjs.get_stream(&stream).await?;
    ensure!(restored.clone().info().await?.state.messages == old.count + 20, "message count");
    for rec in old_records.iter().chain(&new_records) {
        let m = restored.get_raw_message(rec.sequence).await.with_context(|| format!("sequence {}", rec.sequence))?;
        ensure!(m.subject.as_str() == rec.subject && m.payload == rec.payload, "sequence {} differs", rec.sequence);
        let mut want = rec.headers.clone();
        want.sort();
        ensure!(
            headers_of(&m.headers) == want,
            "sequence {}: headers {:?} vs {want:?}",
            rec.sequence,
            headers_of(&m.headers)
        );
    }
    // The gap inside the format 1 segment is a gap again.
    for seq in 1..=old.last_seq {
        if !old_records.iter().any(|r| r.sequence == seq) {
            ensure!(restored.get_raw_message(seq).await.is_err(), "sequence {seq} was deleted in the original");
        }
    }
    Ok(())
}

/// How long a refused request or publish is given to take effect anyway. A permitted request
/// answers in milliseconds; the states checked afterwards catch a slow one.
const REFUSAL_WAIT: Duration = Duration::from_secs(3);
/// Deadline for the server's log to name a refusal.
const LOG_DEADLINE: Duration = Duration::from_secs(20);

/// The restore identity of the committed, generated `nixos-modules/nats-permissions.json`
/// (`restore`): what a deployment gives `cimctl restore`.
fn generated_restore_permissions() -> Result<cim_testkit::Permissions> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../nixos-modules/nats-permissions.json");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let p = serde_json::from_str::<serde_json::Value>(&text)?["restore"].clone();
    let mut perms = cim_testkit::Permissions::all();
    for s in p["publish"]["allow"].as_array().context("restore publish")? {
        perms = perms.allow_publish(s.as_str().context("publish entry")?);
    }
    for s in p["subscribe"]["allow"].as_array().context("restore subscribe")? {
        perms = perms.allow_subscribe(s.as_str().context("subscribe entry")?);
    }
    ensure!(p["allow_responses"] == serde_json::json!(false), "the restore identity answers nothing");
    Ok(perms)
}

/// `cimctl restore` as the generated restore identity, on a server that enforces it (operator
/// mode): every stream comes back message by message and object by object; then the same
/// identity, used as a thief of its credentials would, is refused a command, a KV write, a
/// stream that is not archived and deleting a restored stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storage_restore_runs_as_an_identity_that_can_publish_only_the_restored_streams() -> Result<()> {
    let (nats, nas) = tokio::try_join!(NatsServer::start(), S3Server::start())?;
    let client = nats.connect().await;
    let js = jetstream::new(client.clone());
    provision(&js).await?;
    let nas_c = S3Client::new(target(&nas, "nas", "site"))?;
    nas_c.ensure_bucket().await?;
    publish_events(&js, 0, 300).await?;
    let blob = pseudo_random(200_000, 7);
    js.get_object_store(&content_bucket().bucket).await?.put("blob", &mut blob.as_slice()).await?;
    let spec = spec(&nas, "nas", "site", "NAS");
    let env = [("NAS_ACCESS_KEY_ID", nas.access_key()), ("NAS_SECRET_ACCESS_KEY", nas.secret_key())];
    let args = ["--archive-target", spec.as_str(), "--archive-linger", "50ms", "--archive-segment-bytes", "20000"];
    let mut svc = ServiceProc::start_with_env(Component::StorageManager, &nats.url(), &args, &env)?;
    wait_ready(&client, &svc).await?;
    let obj_stream = content_bucket().stream_name();
    let obj_last = last_seq(&js, &obj_stream).await?;
    wait_archived(&nas_c, &events_stream(), 300).await?;
    wait_archived(&nas_c, &obj_stream, obj_last).await?;
    svc.terminate(Duration::from_secs(20)).await?;

    let mut op = cim_testkit::Operator::new();
    let app = op.account_with_jetstream("APP");
    // A user JWT that carries its permissions outgrows the default 4 KiB CONNECT line (as the
    // services' do: see fixture.rs).
    let fresh = NatsServer::builder().operator(&op).extra_config("max_control_line: 65536").start().await?;
    let admin = jetstream::new(app.user("admin", cim_testkit::Permissions::all()).connect(&fresh.url()).await?);
    let restorer = app.user("restore", generated_restore_permissions()?);
    let dir = tempfile::tempdir()?;
    let creds = restorer.write_creds(dir.path())?;
    let creds = creds.to_str().context("creds path")?;

    let (ok, out) = cimctl(&["restore", "--from", "nas", "--nats-creds", creds], &fresh.url(), &spec, &env).await?;
    assert!(ok, "{out}\n{}", fresh.log_tail(40));
    compare_streams(&js, &admin, &events_stream(), 300).await?;
    compare_streams(&js, &admin, &obj_stream, obj_last).await?;
    assert_eq!(object_sha(&admin, "blob").await?, format!("{:x}", Sha256::digest(&blob)));
    let log = std::fs::read_to_string(fresh.log_path())?;
    assert!(!log.contains("Violation"), "the restore hit its permissions:\n{log}");

    // The same identity as a thief would use it (replies below its own inbox prefix, as
    // `cimctl restore` gets them). A permitted request answers, so the refusals below are the
    // permissions', not a connection that cannot hear replies.
    let thief = restorer.connect_options()?.custom_inbox_prefix(restore::inbox_prefix()).connect(fresh.url()).await?;
    let info = format!("$JS.API.STREAM.INFO.{}", events_stream());
    tokio::time::timeout(WAIT, thief.request(info, Bytes::new())).await??;

    // A command to the information unit: never delivered.
    let admin_client = app.user("listener", cim_testkit::Permissions::all()).connect(&fresh.url()).await?;
    let command = cim_events::subject::command(Component::InformationUnit, "create")?;
    let mut commands = admin_client.subscribe(command.clone()).await?;
    admin_client.flush().await?;
    thief.publish(command.clone(), Bytes::from_static(b"{}")).await?;
    thief.flush().await?;
    let delivered = tokio::time::timeout(REFUSAL_WAIT, futures::StreamExt::next(&mut commands)).await;
    ensure!(delivered.is_err(), "a command from the restore identity was delivered: {delivered:?}");

    // A KV bucket (not archived): the admin makes one; the thief can neither write into it nor
    // create another stream, nor delete a restored one.
    let kv = resources::kv_buckets(Component::StorageManager).remove(0);
    let bucket = admin.create_key_value(kv.config(Tier::Leaf)).await?;
    let thief_js = jetstream::new(thief.clone());
    let put = thief_js.publish(format!("$KV.{}.k", kv.bucket), Bytes::from_static(b"v")).await;
    if let Ok(ack) = put {
        ensure!(
            tokio::time::timeout(REFUSAL_WAIT, ack).await.map(|a| a.is_err()).unwrap_or(true),
            "a KV put was stored"
        );
    }
    ensure!(bucket.get("k").await?.is_none(), "the KV put arrived");
    let other = format!("{}_OTHER", events_stream());
    let mut other_config = resources::events_stream(Component::InformationUnit).config(Tier::Leaf);
    other_config.name = other.clone();
    other_config.subjects = vec![format!("{}.other", kv.bucket)];
    let create = format!("$JS.API.STREAM.CREATE.{other}");
    let created =
        tokio::time::timeout(REFUSAL_WAIT, thief.request(create, serde_json::to_vec(&other_config)?.into())).await;
    ensure!(!matches!(created, Ok(Ok(_))), "a stream that is not archived was created: {created:?}");
    let delete = format!("$JS.API.STREAM.DELETE.{}", events_stream());
    let deleted = tokio::time::timeout(REFUSAL_WAIT, thief.request(delete, Bytes::new())).await;
    ensure!(!matches!(deleted, Ok(Ok(_))), "the restored stream was deleted: {deleted:?}");
    ensure!(admin.get_stream(&other).await.is_err(), "{other} exists");
    compare_streams(&js, &admin, &events_stream(), 300).await?;
    // Refused by the server (rather than unanswered): each refusal is in its log.
    let key = restorer.public_key();
    eventually(LOG_DEADLINE, "the restore identity's refusals in the server log", || async {
        let log = std::fs::read_to_string(fresh.log_path())?;
        let refused =
            |what: &str| log.lines().any(|l| l.contains(&key) && l.contains("Publish Violation") && l.contains(what));
        for what in [command.as_str(), &format!("$KV.{}.k", kv.bucket), "STREAM.CREATE", "STREAM.DELETE"] {
            ensure!(refused(what), "{what} not refused yet");
        }
        Ok(())
    })
    .await?;
    Ok(())
}

/// The aws CLI (`pip install awscli`), or a clear error naming the install line.
fn aws_cli() -> Result<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("aws"))
        .find(|p| p.is_file())
        .context("the aws CLI is not on PATH: install it with `pip install awscli` (.ci/run does)")
}

/// Runs `aws --endpoint-url <s3> <args>` against `s3` with its credentials and path-style
/// addressing, isolated from any AWS configuration of the machine; returns stdout.
async fn aws(s3: &S3Server, config_dir: &std::path::Path, args: &[&str]) -> Result<String> {
    let config = config_dir.join("aws-config");
    std::fs::write(&config, format!("[default]\nregion = {}\ns3 =\n    addressing_style = path\n", s3.region()))?;
    let out = tokio::process::Command::new(aws_cli()?)
        .arg("--endpoint-url")
        .arg(s3.endpoint())
        .args(args)
        .env("AWS_CONFIG_FILE", &config)
        .env("AWS_SHARED_CREDENTIALS_FILE", config_dir.join("no-credentials-file"))
        .env("AWS_ACCESS_KEY_ID", s3.access_key())
        .env("AWS_SECRET_ACCESS_KEY", s3.secret_key())
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_PAGER", "")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .context("running the aws CLI")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(out.status.success(), "aws {args:?} failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    Ok(stdout)
}

/// The archive is plain S3 that any tool reads: the aws CLI lists it, and a segment it
/// downloads hashes to its manifest's SHA-256, a content copy it downloads by name hashes
/// to the CID it is named by (a multipart copy). The service signs with `credentials=default`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_archive_reads_back_with_the_aws_cli() -> Result<()> {
    aws_cli()?;
    let (nats, nas) = tokio::try_join!(NatsServer::start(), S3Server::start())?;
    let client = nats.connect().await;
    let js = jetstream::new(client.clone());
    provision(&js).await?;
    let nas_c = S3Client::new(target(&nas, "nas", "cli"))?;
    nas_c.ensure_bucket().await?;
    publish_events(&js, 0, 300).await?;
    let store = js.get_object_store(&content_bucket().bucket).await?;
    let content = pseudo_random(6 << 20, 21);
    let cid = cim_events::Cid::of(&content).to_string();
    store.put(cid.as_str(), &mut content.as_slice()).await?;
    // The service takes its keys from the AWS SDK's default credential chain (here the
    // AWS_* variables; s3s-fs checks every signature).
    // The archive's signing key then comes from a file (the chain's keys may rotate).
    let key_dir = tempfile::tempdir()?;
    let key_file = key_dir.path().join("archive-key");
    std::fs::write(&key_file, "an archive signing key for the aws CLI test")?;
    let spec = spec(&nas, "nas", "cli", "NAS")
        .replace("credentials-env=NAS", &format!("credentials=default,signing-key-file={}", key_file.display()));
    let env = [
        ("AWS_ACCESS_KEY_ID", nas.access_key()),
        ("AWS_SECRET_ACCESS_KEY", nas.secret_key()),
        ("AWS_CONFIG_FILE", "/nonexistent/cim-test-aws-config"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/cim-test-aws-credentials"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];
    let args = [
        "--archive-target",
        spec.as_str(),
        "--archive-linger",
        "50ms",
        "--archive-segment-bytes",
        "20000",
        "--archive-object-poll",
        "200ms",
    ];
    let mut svc = ServiceProc::start_with_env(Component::StorageManager, &nats.url(), &args, &env)?;
    wait_ready(&client, &svc).await?;
    wait_archived(&nas_c, &events_stream(), 300).await?;
    let copy_key = cim_archive::format::object_key(&nas_c.target().prefix, &content_bucket().bucket, &cid);
    eventually(WAIT, "the content copied by its CID", || async {
        ensure!(nas_c.head(&copy_key).await? == Some(content.len() as u64), "not yet");
        Ok(())
    })
    .await?;
    svc.terminate(Duration::from_secs(20)).await?;

    let dir = tempfile::tempdir()?;
    let listing = aws(&nas, dir.path(), &["s3", "ls", "--recursive", &format!("s3://{BUCKET}/cli/")]).await?;
    // `2026-12-07 03:14:51   20000000 key`
    let listed: Vec<(u64, &str)> = listing
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, _, size, key) = (f.next()?, f.next()?, f.next()?, f.next()?);
            Some((size.parse().ok()?, key))
        })
        .collect();
    ensure!(listed.contains(&(content.len() as u64, copy_key.as_str())), "{copy_key} not listed:\n{listing}");
    let manifests_prefix = cim_archive::format::manifests_prefix(&nas_c.target().prefix, &events_stream(), 0);
    let manifest_keys: Vec<&str> =
        listed.iter().map(|(_, k)| *k).filter(|k| k.starts_with(&manifests_prefix)).collect();
    ensure!(manifest_keys.len() > 2, "expected several manifests under {manifests_prefix}:\n{listing}");

    // A manifest and its segment, downloaded by the CLI: the segment hashes to the manifest's
    // SHA-256 and has its size.
    let manifest_key = manifest_keys[1];
    let manifest_file = dir.path().join("manifest.json");
    aws(
        &nas,
        dir.path(),
        &[
            "s3",
            "cp",
            "--only-show-errors",
            &format!("s3://{BUCKET}/{manifest_key}"),
            manifest_file.to_str().context("path")?,
        ],
    )
    .await?;
    let m = cim_archive::format::Manifest::parse(manifest_key, &std::fs::read(&manifest_file)?)?;
    ensure!(listed.iter().any(|(_, k)| *k == m.segment_key), "{} not listed", m.segment_key);
    let segment_file = dir.path().join("segment");
    aws(
        &nas,
        dir.path(),
        &[
            "s3",
            "cp",
            "--only-show-errors",
            &format!("s3://{BUCKET}/{}", m.segment_key),
            segment_file.to_str().context("path")?,
        ],
    )
    .await?;
    let segment = std::fs::read(&segment_file)?;
    assert_eq!(segment.len() as u64, m.segment_bytes, "{}", m.segment_key);
    assert_eq!(format!("{:x}", Sha256::digest(&segment)), m.segment_sha256, "{}", m.segment_key);

    // The content copy, by name: its bytes are the CID it is named by.
    let object_file = dir.path().join("object");
    aws(
        &nas,
        dir.path(),
        &[
            "s3",
            "cp",
            "--only-show-errors",
            &format!("s3://{BUCKET}/{copy_key}"),
            object_file.to_str().context("path")?,
        ],
    )
    .await?;
    let object = std::fs::read(&object_file)?;
    assert_eq!(cim_events::Cid::of(&object).to_string(), cid, "the copy's bytes are not its CID");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_retention_guard_refuses_streams_that_drop_unarchived_data() -> Result<()> {
    let (nats, nas) = tokio::try_join!(NatsServer::start(), S3Server::start())?;
    let js = jetstream::new(nats.connect().await);
    let mut cfg = resources::events_stream(Component::InformationUnit).config(Tier::Leaf);
    cfg.max_age = Duration::from_secs(3600);
    // JetStream refuses a duplicate window (the retry horizon) longer than the age limit.
    cfg.duplicate_window = Duration::from_secs(120);
    js.create_stream(cfg).await?;
    let spec = spec(&nas, "nas", "", "NAS");
    let env = [("NAS_ACCESS_KEY_ID", nas.access_key()), ("NAS_SECRET_ACCESS_KEY", nas.secret_key())];
    let mut svc = ServiceProc::start_with_env(
        Component::StorageManager,
        &nats.url(),
        &["--archive-target", spec.as_str()],
        &env,
    )?;
    let status = svc.wait(WAIT).await?;
    assert!(!status.success());
    let log = svc.log();
    assert!(log.contains(&format!("retention guard: stream {} has max_age 3600s", events_stream())), "{log}");

    // A bad target spec is a configuration error (exit 64) that names the problem.
    let mut svc = ServiceProc::start_with_env(
        Component::StorageManager,
        &nats.url(),
        &["--archive-target", "name=nas,endpoint=ftp://x,bucket=b"],
        &env,
    )?;
    let status = svc.wait(WAIT).await?;
    assert_eq!(status.code(), Some(64), "{}", svc.log());
    assert!(svc.log().contains("must start with http"), "{}", svc.log());
    // Virtual-hosted addressing cannot put the bucket into an IP address: refused at start,
    // by the service and by cimctl.
    let vhost = spec.replace("path-style=true", "path-style=false");
    let mut svc = ServiceProc::start_with_env(
        Component::StorageManager,
        &nats.url(),
        &["--archive-target", vhost.as_str()],
        &env,
    )?;
    let status = svc.wait(WAIT).await?;
    assert_eq!(status.code(), Some(64), "{}", svc.log());
    assert!(svc.log().contains("use path-style=true"), "{}", svc.log());
    let out = tokio::process::Command::new(crate::common::bin("cimctl"))
        .args(["archive", "status"])
        .env("CIM_NATS_URL", nats.url())
        .env("CIM_ARCHIVE_TARGETS", &vhost)
        .envs(env.iter().copied())
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{text}");
    assert!(text.contains("use path-style=true"), "{text}");
    Ok(())
}

async fn messages_in(js: &jetstream::Context, stream: &str) -> Result<u64> {
    Ok(js.get_stream(stream).await?.info().await?.state.messages)
}

fn leaf_builder(
    cluster: &cim_testkit::NatsCluster,
    store: &std::path::Path,
    uplink: bool,
) -> cim_testkit::NatsServerBuilder {
    let b = NatsServer::builder().server_name("leaf-leaf1").jetstream_domain("leaf1").store_dir(store.to_path_buf());
    if uplink { b.leaf_remotes(cluster.leaf_urls()) } else { b }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storage_leaf_to_cluster_mirror_survives_uplink_outage() -> Result<()> {
    let (cluster, nas) = tokio::try_join!(cim_testkit::NatsCluster::start(3), S3Server::start())?;
    let store = tempfile::tempdir()?;
    let mut leaf = leaf_builder(&cluster, store.path(), true).start().await?;
    let ljs = jetstream::new(leaf.connect().await);
    provision(&ljs).await?;
    publish_events(&ljs, 0, 100).await?;

    // The cluster's storage manager keeps the mirrors and archives them: leaf → cluster → S3.
    let urls = cluster.urls().join(",");
    let nas_c = S3Client::new(target(&nas, "nas", "hub"))?;
    nas_c.ensure_bucket().await?;
    let spec = spec(&nas, "nas", "hub", "NAS");
    let env = [("NAS_ACCESS_KEY_ID", nas.access_key()), ("NAS_SECRET_ACCESS_KEY", nas.secret_key())];
    let args =
        ["--tier", "cluster", "--source-leaf", "leaf1", "--archive-target", spec.as_str(), "--archive-linger", "50ms"];
    let mut svc = ServiceProc::start_with_env(Component::StorageManager, &urls, &args, &env)?;
    let cclient = cluster.connect().await;
    wait_ready(&cclient, &svc).await?;
    let cjs = jetstream::new(cclient.clone());
    let mirror = resources::leaf_mirror(&events_stream(), "leaf1")?;
    eventually(WAIT, "the cluster mirror to hold the first 100 events", || async {
        let n = messages_in(&cjs, &mirror).await?;
        ensure!(n == 100, "{n}");
        Ok(())
    })
    .await?;

    // Uplink outage: the leaf runs on without its leaf node connection and keeps taking work.
    leaf.kill();
    drop(leaf);
    let island = leaf_builder(&cluster, store.path(), false).start().await?;
    let ijs = jetstream::new(island.connect().await);
    publish_events(&ijs, 100, 300).await?;
    assert_eq!(messages_in(&ijs, &events_stream()).await?, 300);
    assert_eq!(messages_in(&cjs, &mirror).await?, 100, "the cluster cannot have seen the outage's events");
    drop(ijs);
    let mut island = island;
    island.stop();
    drop(island);

    // The uplink returns: the cluster catches up with no gap and no duplicate.
    let leaf = leaf_builder(&cluster, store.path(), true).start().await?;
    let ljs = jetstream::new(leaf.connect().await);
    publish_events(&ljs, 300, 320).await?;
    eventually(WAIT, "the cluster mirror to catch up to 320", || async {
        let n = messages_in(&cjs, &mirror).await?;
        ensure!(n == 320, "{n}");
        Ok(())
    })
    .await?;
    let (sl, sc) = (ljs.get_stream(events_stream()).await?, cjs.get_stream(&mirror).await?);
    for seq in 1..=320 {
        let (a, b) = (sl.get_raw_message(seq).await?, sc.get_raw_message(seq).await?);
        ensure!(a.subject == b.subject && a.payload == b.payload, "seq {seq} differs");
        ensure!(headers_of(&a.headers) == headers_of(&b.headers), "seq {seq}: headers differ");
    }
    let replicas = cjs.get_stream(&mirror).await?.info().await?.config.num_replicas;
    assert_eq!(replicas, 3);

    // The mirror reaches S3, outage included; status on the cluster shows it caught up.
    wait_archived(&nas_c, &mirror, 320).await.map_err(|e| e.context(svc.log()))?;
    let (ok, out) = cimctl(&["archive", "status"], &urls, &spec, &env).await?;
    assert!(ok, "{out}");
    let line =
        out.lines().find(|l| l.starts_with(&format!("{mirror} "))).with_context(|| format!("no {mirror} in {out}"))?;
    assert!(line.split_whitespace().collect::<Vec<_>>().ends_with(&["nas", "320", "320", "0"]), "{line}");

    // A lost leaf is rebuilt from the cluster's archive: into its own stream names, with its
    // sequence numbers, message by message the same as the leaf's stream.
    let fresh = NatsServer::start().await?;
    let (ok, out) = cimctl(&["restore", "--from", "nas"], &fresh.url(), &spec, &env).await?;
    assert!(
        ok && out.contains(&format!(
            "{mirror}: skipped: the cluster's mirror of {} on leaf LEAF1 (restore a leaf from it with --leaf leaf1)",
            events_stream()
        )),
        "{out}"
    );
    let (ok, out) = cimctl(&["restore", "--from", "nas", "--leaf", "leaf2"], &fresh.url(), &spec, &env).await?;
    assert!(!ok && out.contains("no archive of the cluster's mirrors of leaf leaf2"), "{out}");
    let (ok, out) = cimctl(&["restore", "--from", "nas", "--leaf", "leaf1"], &fresh.url(), &spec, &env).await?;
    assert!(ok && out.contains(&format!("{mirror}: into {}", events_stream())), "{out}");
    let fjs = jetstream::new(fresh.connect().await);
    let restored = fjs.get_stream(events_stream()).await?;
    assert_eq!(restored.get_info().await?.state.messages, 320);
    for seq in 1..=320 {
        let (a, b) = (sl.get_raw_message(seq).await?, restored.get_raw_message(seq).await?);
        ensure!(a.subject == b.subject && a.payload == b.payload, "seq {seq} differs after restore");
        ensure!(headers_of(&a.headers) == headers_of(&b.headers), "seq {seq}: headers differ after restore");
    }
    svc.terminate(Duration::from_secs(20)).await?;
    Ok(())
}

/// How many times `needle` is in the service's log so far.
fn log_count(svc: &ServiceProc, needle: &str) -> usize {
    svc.log().matches(needle).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storage_content_leaves_jetstream_only_after_its_archive_is_verified_on_every_required_target() -> Result<()> {
    use cim_events::proto::iu::{CreateUnit, DeleteUnit};
    use cim_events::{iu, storage};
    use cim_iu_client::{IuClient, header};
    const KEPT: &str = "unreferenced content kept until its archive is verified";

    let (nats, nas, mut wasabi) = tokio::try_join!(NatsServer::start(), S3Server::start(), S3Server::start())?;
    let client = nats.connect().await;
    let js = jetstream::new(client.clone());
    // Content with no live unit is due for collection at once (retention 0s).
    let iu_svc = ServiceProc::start(
        Component::InformationUnit,
        &nats.url(),
        &["--iu-content-retention", "0s", "--iu-collect-interval", "300ms"],
    )?;
    wait_ready(&client, &iu_svc).await?;
    let iu_client = IuClient::new(client.clone()).latest();
    let body = pseudo_random(300_000, 11);
    let cid = iu_client.put_bytes(&body).await?.cid;
    let unit = iu_client
        .create(CreateUnit {
            cid: cid.clone(),
            name: "doomed.bin".into(),
            media_type: "application/octet-stream".into(),
            ..Default::default()
        })
        .await?;
    iu_client.delete(DeleteUnit { header: header(0), unit_id: unit.unit_id.clone(), reason: "test".into() }).await?;
    let store = js.get_object_store(iu::CONTENT_BUCKET).await?;
    let obj_stream = content_bucket().stream_name();
    let meta_seq = js
        .get_stream(&obj_stream)
        .await?
        .get_last_raw_message_by_subject(&cim_events::subject::object_meta(iu::CONTENT_BUCKET, &cid)?)
        .await?
        .sequence;

    // 1. No archive at all: collection holds the content back, and says why.
    eventually(WAIT, "collection to hold back content with no archive", || async {
        ensure!(log_count(&iu_svc, KEPT) >= 2, "not yet");
        Ok(())
    })
    .await?;
    assert!(iu_svc.log().contains("no verified archive of"), "{}", iu_svc.log());
    assert!(!store.info(&cid).await?.deleted);

    // 2. Two required targets, one of them down: the one that is up verifies its copy, but
    //    the removal watermark needs both, so the content stays.
    let (nas_c, wasabi_c) = (S3Client::new(target(&nas, "nas", "p"))?, S3Client::new(target(&wasabi, "wasabi", "p"))?);
    nas_c.ensure_bucket().await?;
    wasabi_c.ensure_bucket().await?;
    wasabi.kill();
    let sm = start_two_targets(
        &nats,
        (&nas, "p"),
        (&wasabi, "p"),
        &["--archive-linger", "100ms", "--archive-retry-max", "300ms", "--archive-verify-interval", "200ms"],
    )?;
    let sm_http = wait_ready(&client, &sm).await?.service.context("describe without service")?.http_addr;
    let marks = js.get_key_value(resources::kv_bucket(Component::StorageManager, storage::KV_ARCHIVE)?).await?;
    let mark = |key: String| {
        let marks = marks.clone();
        async move {
            Ok::<_, anyhow::Error>(match marks.get(key.as_str()).await? {
                Some(v) => Some(serde_json::from_slice::<storage::Watermark>(&v)?.verified_seq),
                None => None,
            })
        }
    };
    eventually(WAIT, "the nas copy of the content verified", || async {
        let v = mark(storage::target_key(&obj_stream, "nas")?).await?;
        ensure!(v.is_some_and(|v| v >= meta_seq), "nas verified through {v:?}, the object is at {meta_seq}");
        Ok(())
    })
    .await?;
    let seen = log_count(&iu_svc, KEPT);
    eventually(WAIT, "another collection pass", || async {
        ensure!(log_count(&iu_svc, KEPT) > seen, "not yet");
        Ok(())
    })
    .await?;
    assert_eq!(mark(storage::verified_key(&obj_stream)?).await?, None, "a removal watermark without the wasabi copy");
    assert!(!store.info(&cid).await?.deleted, "content removed while a required target had no verified copy");

    // 3. The second target comes back: both verify, the watermark passes the object, and the
    //    collection removes it (recorded as an event); the archive can give it back.
    wasabi.restart().await?;
    eventually(WAIT, "the content collected once both copies are verified", || async {
        ensure!(store.info(&cid).await.map(|i| i.deleted).unwrap_or(true), "still stored");
        Ok(())
    })
    .await
    .map_err(|e| e.context(sm.log()))?;
    let through = mark(storage::verified_key(&obj_stream)?).await?.context("no removal watermark")?;
    assert!(through >= meta_seq);
    let events = js.get_stream(resources::events_stream(Component::InformationUnit).name).await?;
    let collected = iu::content_event(&cid, iu::action::COLLECTED)?;
    assert!(events.get_last_raw_message_by_subject(&collected).await.is_ok(), "no {collected} event");
    let metrics = cim_testkit::http_get(&sm_http, "/metrics").await?.text();
    let verified_line = "cim_archive_verified_sequence{service=\"storage-manager\",instance=";
    assert!(
        metrics.contains(verified_line)
            && metrics.contains(&format!("stream=\"{obj_stream}\",target=\"wasabi\"}}"))
            && metrics.contains("cim_archive_lag{"),
        "{metrics}"
    );

    // `cimctl status` shows the verified copy of every stream on every target, and its lag.
    let (_, out) = cimctl(&["status", "--json", "--timeout", "2"], &nats.url(), "", &[]).await?;
    let json_start = out.find('{').context("no JSON")?;
    let status: serde_json::Value =
        serde_json::Deserializer::from_str(&out[json_start..]).into_iter().next().context("no JSON")??;
    let rows = status["archive"].as_array().context("no archive rows")?;
    for t in ["nas", "wasabi"] {
        let row = rows
            .iter()
            .find(|r| r["stream"] == obj_stream.as_str() && r["target"] == t)
            .with_context(|| format!("no {t} row: {status}"))?;
        assert!(row["verified_seq"].as_u64() >= Some(meta_seq), "{row}");
    }

    let (fresh, reports) = restore_into(&wasabi_c, Until::Sequence(meta_seq)).await?;
    assert!(reports.iter().all(|r| r.problems.is_empty()), "{reports:?}");
    let fjs = jetstream::new(fresh.connect().await);
    assert_eq!(object_sha(&fjs, &cid).await?, format!("{:x}", Sha256::digest(&body)));
    Ok(())
}
