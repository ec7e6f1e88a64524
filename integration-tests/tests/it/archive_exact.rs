//! The archive cannot lie (issue 14): a restore brings back exactly what the stream held —
//! same sequences, deleted messages deleted, repeated message ids kept —, archiving resumes
//! correctly after a restore and opens a new epoch for a recreated stream, verify names a
//! missing newest manifest and checks everything around a broken one, and forged or foreign
//! manifests are refused. Real nats-server, s3s-fs and storage-manager processes.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use async_nats::{HeaderMap, jetstream};
use bytes::Bytes;
use cim_archive::format::{self, SegmentWriter};
use cim_archive::restore::{self, Until};
use cim_archive::{ArchiveKey, S3Client, archived_through, committed_position};
use cim_events::{Component, resources};
use cim_testkit::{NatsServer, S3Server, eventually};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::common::{ServiceProc, wait_ready};
use crate::storage::{
    BUCKET, WAIT, cimctl, content_bucket, events_stream, headers_of, last_seq, provision, publish_events, restore_env,
    spec, target, trust, wait_archived,
};

/// Fast settings: small segments, short waits, frequent verification and deletion checks.
const FAST: [&str; 10] = [
    "--archive-segment-bytes",
    "4096",
    "--archive-linger",
    "50ms",
    "--archive-retry-max",
    "300ms",
    "--archive-verify-interval",
    "200ms",
    "--archive-object-poll",
    "200ms",
];

fn start_archiver(nats: &NatsServer, s3: &S3Server) -> Result<ServiceProc> {
    let spec = spec(s3, "nas", "", "NAS");
    let mut args = vec!["--archive-target", spec.as_str()];
    args.extend_from_slice(&FAST);
    let env = [("NAS_ACCESS_KEY_ID", s3.access_key()), ("NAS_SECRET_ACCESS_KEY", s3.secret_key())];
    ServiceProc::start_with_env(Component::StorageManager, &nats.url(), &args, &env)
}

/// Every sequence of `stream` in both servers: present in both with the same subject, headers
/// and payload, or absent (deleted) in both; and the same last sequence.
async fn compare_exact(a: &jetstream::Context, b: &jetstream::Context, stream: &str) -> Result<()> {
    let (sa, sb) = (a.get_stream(stream).await?, b.get_stream(stream).await?);
    let (ia, ib) = (sa.get_info().await?.state, sb.get_info().await?.state);
    ensure!(
        ia.last_sequence == ib.last_sequence,
        "{stream}: last sequence {} vs {}",
        ia.last_sequence,
        ib.last_sequence
    );
    ensure!(ia.messages == ib.messages, "{stream}: {} messages vs {}", ia.messages, ib.messages);
    for seq in 1..=ia.last_sequence {
        match (sa.get_raw_message(seq).await, sb.get_raw_message(seq).await) {
            (Ok(ma), Ok(mb)) => {
                ensure!(ma.subject == mb.subject, "{stream} seq {seq}: subject {} vs {}", ma.subject, mb.subject);
                ensure!(ma.payload == mb.payload, "{stream} seq {seq}: payload differs");
                ensure!(
                    headers_of(&ma.headers) == headers_of(&mb.headers),
                    "{stream} seq {seq}: headers {:?} vs {:?}",
                    headers_of(&ma.headers),
                    headers_of(&mb.headers)
                );
            }
            (Err(_), Err(_)) => {}
            (Ok(_), Err(e)) => anyhow::bail!("{stream} seq {seq}: in the original, not restored ({e})"),
            (Err(_), Ok(m)) => anyhow::bail!("{stream} seq {seq}: deleted in the original, restored ({})", m.subject),
        }
    }
    Ok(())
}

/// Restores both streams into a fresh server.
async fn restore_fresh(s3: &S3Client) -> Result<(NatsServer, jetstream::Context, Vec<restore::StreamReport>)> {
    let fresh = NatsServer::start().await?;
    let js = jetstream::new(fresh.connect().await);
    provision(&js).await?;
    let (trust, progress) = (trust(s3), restore_env());
    let opts =
        restore::RestoreOptions { trust: &trust, until: Until::All, dry_run: false, epoch: None, progress: &progress };
    let mut reports = Vec::new();
    for stream in [events_stream(), content_bucket().stream_name()] {
        reports.push(restore::restore_stream(s3, &js, &stream, &stream, &opts).await);
    }
    Ok((fresh, js, reports))
}

async fn object_bytes(js: &jetstream::Context, name: &str) -> Result<Vec<u8>> {
    let store = js.get_object_store(&content_bucket().bucket).await?;
    let mut obj = store.get(name).await?;
    let mut buf = Vec::new();
    obj.read_to_end(&mut buf).await?;
    Ok(buf)
}

/// The deleted sequences of `stream` (interior ones and those below its first sequence).
async fn deleted_seqs(js: &jetstream::Context, stream: &str) -> Result<Vec<u64>> {
    let s = js.get_stream(stream).await?;
    let info = s.info_builder().with_deleted(true).fetch().await?.info;
    let mut out: Vec<u64> = (1..info.state.first_sequence).collect();
    out.extend(info.state.deleted.unwrap_or_default());
    Ok(out)
}

/// Publishes `id` again until JetStream stores it (its duplicate window has passed): what a
/// client would do.
async fn publish_repeated_id(js: &jetstream::Context, subject: &str, id: &str, payload: &str) -> Result<()> {
    eventually(WAIT, &format!("{id} stored a second time"), || async {
        let mut h = HeaderMap::new();
        h.insert("Nats-Msg-Id", id);
        let ack = js.publish_with_headers(subject.to_string(), h, Bytes::from(payload.to_string())).await?.await?;
        ensure!(!ack.duplicate, "still inside the duplicate window");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn archive_restore_is_exact_across_deletions_and_repeated_ids() -> Result<()> {
    let (nats, nas) = tokio::try_join!(NatsServer::start(), S3Server::start())?;
    let client = nats.connect().await;
    let js = jetstream::new(client.clone());
    provision(&js).await?;
    let nas_c = S3Client::new(target(&nas, "nas", ""))?;
    nas_c.ensure_bucket().await?;
    let events = events_stream();
    let objects = content_bucket().stream_name();

    // Message ids that repeat further apart than the stream's duplicate window: the original
    // stored both. A restore with the contract's 2-minute window used to drop the second.
    let mut cfg = js.get_stream(&events).await?.get_info().await?.config;
    cfg.duplicate_window = Duration::from_millis(200);
    js.update_stream(&cfg).await?;
    publish_events(&js, 0, 300).await?;
    let subject = cim_events::subject::event(Component::InformationUnit, "unit", "u1", "tagged")?;
    for i in 0..5 {
        publish_repeated_id(&js, &subject, &format!("0190-test-{i}"), &format!("again {i}")).await?;
    }
    // Event streams deny deletes and purges; the object stream is where deletions happen:
    // an object deleted before anything was archived, one after (below).
    let store = js.get_object_store(&content_bucket().bucket).await?;
    let data: Vec<(String, Vec<u8>)> =
        (0..4).map(|i| (format!("obj{i}"), crate::storage::pseudo_random(70_000 + i * 1000, i as u64 + 1))).collect();
    for (name, bytes) in &data {
        store.put(name.as_str(), &mut bytes.as_slice()).await?;
    }
    // The first object deleted: the stream's first sequences are gone before anything is
    // archived (the restore starts the stream at the first archived sequence).
    store.delete("obj0").await?;
    ensure!(js.get_stream(&objects).await?.get_info().await?.state.first_sequence > 1, "obj0's chunks purged");

    // What was deleted before the archiver ever ran: the manifests account for those gaps.
    let before = (deleted_seqs(&js, &events).await?, deleted_seqs(&js, &objects).await?);

    let mut svc = start_archiver(&nats, &nas)?;
    wait_ready(&client, &svc).await?;
    wait_archived(&nas_c, &events, last_seq(&js, &events).await?).await?;
    wait_archived(&nas_c, &objects, last_seq(&js, &objects).await?).await?;

    // Deleted after they were archived: an object (its chunks purged, its metadata rolled up)
    // and a single message.
    store.delete("obj2").await?;
    let obj_stream = js.get_stream(&objects).await?;
    let first_meta = obj_stream.get_info().await?.state.last_sequence;
    store.put("obj4", &mut b"late".as_slice()).await?;
    obj_stream.delete_message(first_meta + 1).await?;
    let ev_last = last_seq(&js, &events).await?;
    let obj_last = last_seq(&js, &objects).await?;
    wait_archived(&nas_c, &objects, obj_last).await?;
    ensure!(before.0.is_empty(), "the events stream has no deletions");
    for (stream, before) in [(&objects, &before.1)] {
        let after: Vec<u64> = deleted_seqs(&js, stream).await?.into_iter().filter(|s| !before.contains(s)).collect();
        ensure!(!after.is_empty(), "{stream}: nothing was deleted after archiving");
        eventually(WAIT, &format!("{stream}: the deletions after archiving recorded"), || async {
            let (records, problems) = restore::deletions(&nas_c, &trust(&nas_c), stream, 0).await?;
            ensure!(problems.is_empty(), "{problems:?}");
            let missing: Vec<&u64> = after
                .iter()
                .filter(|s| !records.iter().flat_map(|d| d.ranges.iter()).any(|(a, b)| a <= *s && *s <= b))
                .collect();
            ensure!(missing.is_empty(), "not recorded yet: {missing:?}");
            Ok(())
        })
        .await?;
    }
    svc.terminate(Duration::from_secs(20)).await?;

    for stream in [&events, &objects] {
        let reports = restore::verify_stream(&nas_c, &trust(&nas_c), stream).await;
        ensure!(reports.len() == 1 && reports[0].problems.is_empty(), "{stream}: {reports:?}");
    }
    let (_fresh, fjs, reports) = restore_fresh(&nas_c).await?;
    for r in &reports {
        ensure!(r.problems.is_empty(), "{}: {:?}", r.stream, r.problems);
    }
    assert_eq!(last_seq(&fjs, &events).await?, ev_last);
    compare_exact(&js, &fjs, &events).await?;
    compare_exact(&js, &fjs, &objects).await?;
    // The objects: the live ones byte for byte, the deleted ones not resurrected.
    for (name, bytes) in &data {
        let restored = object_bytes(&fjs, name).await;
        if name == "obj0" || name == "obj2" {
            ensure!(restored.is_err(), "{name} was deleted and came back");
        } else {
            ensure!(Sha256::digest(restored?) == Sha256::digest(bytes), "{name} differs");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn archive_verify_names_a_missing_newest_manifest_and_reads_past_a_broken_one() -> Result<()> {
    let (nats, nas) = tokio::try_join!(NatsServer::start(), S3Server::start())?;
    let client = nats.connect().await;
    let js = jetstream::new(client.clone());
    provision(&js).await?;
    let nas_c = S3Client::new(target(&nas, "nas", ""))?;
    nas_c.ensure_bucket().await?;
    let events = events_stream();
    publish_events(&js, 0, 500).await?;
    let mut svc = start_archiver(&nats, &nas)?;
    wait_ready(&client, &svc).await?;
    wait_archived(&nas_c, &events, 500).await?;
    let marks =
        js.get_key_value(resources::kv_bucket(Component::StorageManager, cim_events::storage::KV_ARCHIVE)?).await?;
    let key = cim_events::storage::target_key(&events, "nas")?;
    eventually(WAIT, "the storage manager to verify everything", || async {
        let v = marks.get(key.as_str()).await?.context("no watermark yet")?;
        let w: cim_events::storage::Watermark = serde_json::from_slice(&v)?;
        ensure!(w.verified_seq >= 500, "verified through {}", w.verified_seq);
        Ok(())
    })
    .await?;
    svc.terminate(Duration::from_secs(20)).await?;
    let (ms, _) = restore::manifests(&nas_c, &trust(&nas_c), &events, 0).await?;
    ensure!(ms.len() > 6, "expected several segments, got {}", ms.len());
    let bucket_root = nas.root().join(BUCKET);

    // The newest manifest deleted: verify and restore both say the archive is incomplete.
    let (newest_key, newest) = ms.last().cloned().context("a manifest")?;
    std::fs::remove_file(bucket_root.join(&newest_key))?;
    let reports = restore::verify_stream(&nas_c, &trust(&nas_c), &events).await;
    let problems = reports[0].problems.join("\n");
    assert!(problems.contains("the newest manifests are missing"), "{problems}");
    assert!(problems.contains(&newest.segment_key) && problems.contains("has no manifest"), "{problems}");
    let spec = spec(&nas, "nas", "", "NAS");
    let env = [("NAS_ACCESS_KEY_ID", nas.access_key()), ("NAS_SECRET_ACCESS_KEY", nas.secret_key())];
    let (ok, out) = cimctl(&["archive", "verify"], &nats.url(), &spec, &env).await?;
    assert!(!ok && out.contains("PROBLEMS FOUND") && out.contains("newest manifests are missing"), "{out}");
    let fresh = NatsServer::start().await?;
    let (ok, out) = cimctl(&["restore", "--from", "nas"], &fresh.url(), &spec, &env).await?;
    assert!(!ok && out.contains("newest manifests are missing"), "restore must not look complete: {out}");
    drop(fresh);
    // The cursor removed as well: the streams and the storage manager's record still tell.
    std::fs::remove_file(bucket_root.join(format::cursor_key("", &events)))?;
    let (ok, out) = cimctl(&["archive", "verify"], &nats.url(), &spec, &env).await?;
    assert!(!ok && out.contains("manifests were removed"), "{out}");

    // A manifest in the middle cut off: named, and every other segment is still checked.
    let (cut_key, cut) = ms[3].clone();
    let body = std::fs::read(bucket_root.join(&cut_key))?;
    std::fs::write(bucket_root.join(&cut_key), &body[..body.len() / 2])?;
    let reports = restore::verify_stream(&nas_c, &trust(&nas_c), &events).await;
    let r = &reports[0];
    let problems = r.problems.join("\n");
    assert!(problems.contains(&cut_key), "{problems}");
    assert!(problems.contains(&format!("sequences {}..", cut.first_seq)), "the gap it leaves is named: {problems}");
    let others: u64 = ms.iter().take(ms.len() - 1).filter(|(k, _)| *k != cut_key).map(|(_, m)| m.count).sum();
    assert_eq!(r.messages, others, "every other segment is verified");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn archive_resumes_after_a_restore_and_a_recreated_stream_is_a_new_epoch() -> Result<()> {
    let (nats, nas) = tokio::try_join!(NatsServer::start(), S3Server::start())?;
    let client = nats.connect().await;
    let js = jetstream::new(client.clone());
    provision(&js).await?;
    let nas_c = S3Client::new(target(&nas, "nas", ""))?;
    nas_c.ensure_bucket().await?;
    let events = events_stream();
    publish_events(&js, 0, 300).await?;
    publish_events(&js, 300, 320).await?;
    let mut svc = start_archiver(&nats, &nas)?;
    wait_ready(&client, &svc).await?;
    wait_archived(&nas_c, &events, 320).await?;
    svc.terminate(Duration::from_secs(20)).await?;

    // Restore into a new server, archive on from there to the same target.
    let (b, bjs, reports) = restore_fresh(&nas_c).await?;
    for r in &reports {
        ensure!(r.problems.is_empty(), "{}: {:?}", r.stream, r.problems);
    }
    compare_exact(&js, &bjs, &events).await?;
    let bclient = b.connect().await;
    let mut svc = start_archiver(&b, &nas)?;
    wait_ready(&bclient, &svc).await?;
    publish_events(&bjs, 320, 400).await?;
    wait_archived(&nas_c, &events, 400).await?;
    let reports = restore::verify_stream(&nas_c, &trust(&nas_c), &events).await;
    ensure!(reports.len() == 1 && reports[0].problems.is_empty(), "{reports:?}");
    assert_eq!((reports[0].last_seq, reports[0].messages), (400, 400), "every message after the restore archived");
    let (_c, cjs, reports) = restore_fresh(&nas_c).await?;
    ensure!(reports[0].problems.is_empty(), "{:?}", reports[0].problems);
    compare_exact(&bjs, &cjs, &events).await?;

    // The stream recreated under the same name with fewer messages: another history. It is
    // archived as epoch 1, from its first message; epoch 0 stays as it was.
    svc.terminate(Duration::from_secs(20)).await?;
    bjs.delete_stream(&events).await?;
    provision(&bjs).await?;
    publish_events(&bjs, 0, 50).await?;
    let mut svc = start_archiver(&b, &nas)?;
    wait_ready(&bclient, &svc).await?;
    let key = ArchiveKey::for_target(nas_c.target())?;
    eventually(WAIT, "the recreated stream archived as epoch 1", || async {
        let p = committed_position(&nas_c, &key, &events).await?;
        ensure!(p.epoch == 1 && p.last_seq >= 50, "at epoch {} position {}", p.epoch, p.last_seq);
        Ok(())
    })
    .await?;
    assert!(svc.log().contains("ALARM"), "the new epoch is alarmed");
    // The removal watermark follows the new history: nothing of it is removable beyond what
    // is verified of it (the old history's 400 must not count).
    let marks =
        bjs.get_key_value(resources::kv_bucket(Component::StorageManager, cim_events::storage::KV_ARCHIVE)?).await?;
    let vkey = cim_events::storage::verified_key(&events)?;
    eventually(WAIT, "the removal watermark of the new epoch", || async {
        let v = marks.get(vkey.as_str()).await?.context("no removal watermark")?;
        let w: cim_events::storage::Watermark = serde_json::from_slice(&v)?;
        ensure!(w.verified_seq == 50, "removal watermark at {}", w.verified_seq);
        Ok(())
    })
    .await?;
    svc.terminate(Duration::from_secs(20)).await?;
    assert_eq!(archived_through(&nas_c, &events).await?, 50);
    let reports = restore::verify_stream(&nas_c, &trust(&nas_c), &events).await;
    ensure!(reports.len() == 2, "two epochs: {reports:?}");
    for r in &reports {
        ensure!(r.problems.is_empty(), "epoch {}: {:?}", r.epoch, r.problems);
    }
    assert_eq!((reports[0].last_seq, reports[1].last_seq, reports[1].messages), (400, 50, 50));
    let (_d, djs, reports) = restore_fresh(&nas_c).await?;
    ensure!(reports[0].problems.is_empty() && reports[0].epoch == 1, "{reports:?}");
    compare_exact(&bjs, &djs, &events).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn archive_forged_and_foreign_manifests_are_refused() -> Result<()> {
    let (nats, nas) = tokio::try_join!(NatsServer::start(), S3Server::start())?;
    let client = nats.connect().await;
    let js = jetstream::new(client.clone());
    provision(&js).await?;
    let nas_c = S3Client::new(target(&nas, "nas", ""))?;
    nas_c.ensure_bucket().await?;
    let events = events_stream();
    publish_events(&js, 0, 100).await?;
    let mut svc = start_archiver(&nats, &nas)?;
    wait_ready(&client, &svc).await?;
    wait_archived(&nas_c, &events, 100).await?;
    svc.terminate(Duration::from_secs(20)).await?;

    // A self-consistent segment after the real ones, whose record would write into another
    // component's stream.
    let foreign_subject = cim_events::subject::event(Component::Registry, "node", "n1", "announced")?;
    let forge = |key: Option<&ArchiveKey>| {
        let mut w = SegmentWriter::new();
        w.push(101, 1, &foreign_subject, &[], b"forged");
        let (bytes, mut m) = w.finish(&events, "", 0, 100);
        if let Some(k) = key {
            k.seal(&mut m);
        }
        (bytes, m)
    };
    let right = ArchiveKey::for_target(nas_c.target())?;
    for (who, key, expect) in [
        ("unsigned", None, "not signed"),
        ("foreign", Some(ArchiveKey::derive(b"someone else's secret")), "another archive key"),
    ] {
        let (bytes, m) = forge(key.as_ref());
        nas_c.put(&m.segment_key, bytes).await?;
        let mkey = format::manifest_key("", &events, 0, 101, 101);
        nas_c.put(&mkey, Bytes::from(serde_json::to_vec(&m)?)).await?;
        let reports = restore::verify_stream(&nas_c, &trust(&nas_c), &events).await;
        let problems = reports[0].problems.join("\n");
        assert!(problems.contains(&mkey) && problems.contains(expect), "{who}: {problems}");
        let (_fresh, fjs, reports) = restore_fresh(&nas_c).await?;
        assert_eq!(reports[0].messages, 100, "{who}: only the real messages");
        assert!(reports[0].problems.iter().any(|p| p.contains(expect)), "{who}: {:?}", reports[0].problems);
        let registry = resources::events_stream(Component::Registry).name;
        assert!(fjs.get_stream(&registry).await.is_err(), "{who}: nothing written elsewhere");
        assert_eq!(last_seq(&fjs, &events).await?, 100, "{who}");
    }

    // Even correctly signed (a leaked key), a record outside the stream's subjects stops the
    // restore there.
    let (bytes, m) = forge(Some(&right));
    nas_c.put(&m.segment_key, bytes).await?;
    nas_c.put(&format::manifest_key("", &events, 0, 101, 101), Bytes::from(serde_json::to_vec(&m)?)).await?;
    let (_fresh, fjs, reports) = restore_fresh(&nas_c).await?;
    assert!(
        reports[0].problems.iter().any(|p| p.contains("is not one of the stream's subjects")),
        "{:?}",
        reports[0].problems
    );
    assert_eq!(last_seq(&fjs, &events).await?, 100);
    Ok(())
}

/// The drill of issue 14 finding 2: units committed (each commit purges its upload's
/// metadata), archived, restored into a fresh server, and the information-unit service started
/// there with a short orphan grace. Nothing purged comes back, so collection finds nothing to
/// take, and every unit's content reads back and hashes to its CID.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn archive_restore_then_collection_keeps_every_unit() -> Result<()> {
    use cim_events::proto::iu::CreateUnit;
    use cim_iu_client::IuClient;

    let (nats, nas) = tokio::try_join!(NatsServer::start(), S3Server::start())?;
    let client = nats.connect().await;
    let js = jetstream::new(client.clone());
    let iu = ServiceProc::start(Component::InformationUnit, &nats.url(), &[])?;
    wait_ready(&client, &iu).await?;
    let iu_client = IuClient::new(client.clone()).latest();
    let mut units = Vec::new();
    for i in 0..12u64 {
        let body = crate::storage::pseudo_random(20_000 + i as usize * 3000, i + 100);
        let cid = iu_client.put_bytes(&body).await?.cid;
        iu_client
            .create(CreateUnit {
                cid: cid.clone(),
                name: format!("u{i}.bin"),
                media_type: "application/octet-stream".into(),
                ..Default::default()
            })
            .await?;
        units.push((cid, body));
    }
    let objects = content_bucket().stream_name();
    let events = events_stream();
    let nas_c = S3Client::new(target(&nas, "nas", ""))?;
    nas_c.ensure_bucket().await?;
    let mut svc = start_archiver(&nats, &nas)?;
    wait_ready(&client, &svc).await?;
    wait_archived(&nas_c, &events, last_seq(&js, &events).await?).await?;
    wait_archived(&nas_c, &objects, last_seq(&js, &objects).await?).await?;
    // The upload metadata each commit purged is recorded as deleted.
    let deleted = deleted_seqs(&js, &objects).await?;
    ensure!(!deleted.is_empty(), "the commits purged nothing?");
    eventually(WAIT, "the purged uploads recorded as deletions", || async {
        let (records, _) = restore::deletions(&nas_c, &trust(&nas_c), &objects, 0).await?;
        let covered = |s: &u64| records.iter().flat_map(|d| d.ranges.iter()).any(|(a, b)| a <= s && s <= b);
        let (ms, _) = restore::manifests(&nas_c, &trust(&nas_c), &objects, 0).await?;
        let archived = |s: &u64| ms.iter().any(|(_, m)| m.first_seq <= *s && *s <= m.last_seq);
        // Deleted before the archive read them: accounted for as gaps; the rest recorded.
        let missing: Vec<&u64> = deleted.iter().filter(|s| !covered(s) && archived(s)).collect();
        ensure!(missing.is_empty(), "not recorded yet: {missing:?}");
        Ok(())
    })
    .await?;
    svc.terminate(Duration::from_secs(20)).await?;
    drop(iu);

    let fresh = NatsServer::start().await?;
    let spec = spec(&nas, "nas", "", "NAS");
    let env = [("NAS_ACCESS_KEY_ID", nas.access_key()), ("NAS_SECRET_ACCESS_KEY", nas.secret_key())];
    let (ok, out) = cimctl(&["restore", "--from", "nas"], &fresh.url(), &spec, &env).await?;
    ensure!(ok, "{out}");
    let fclient = fresh.connect().await;
    let fjs = jetstream::new(fclient.clone());
    compare_exact(&js, &fjs, &objects).await?;
    compare_exact(&js, &fjs, &events).await?;
    let fiu = ServiceProc::start(
        Component::InformationUnit,
        &fresh.url(),
        &["--iu-orphan-grace", "1s", "--iu-collect-interval", "300ms"],
    )?;
    wait_ready(&fclient, &fiu).await?;
    let fiu_client = IuClient::new(fclient.clone()).latest();
    // Past the orphan grace, over many collection passes, every unit's content stays whole.
    cim_testkit::stays_true_for(Duration::from_secs(4), "every unit's content readable", || async {
        for (cid, body) in &units {
            let got = fiu_client.get_bytes(cid, None).await.with_context(|| format!("{cid} after the restore"))?;
            ensure!(got == *body, "{cid}: content differs after the restore");
        }
        Ok(())
    })
    .await?;
    ensure!(!fiu.log().contains("upload never committed"), "an upload came back and was collected: {}", fiu.log());
    Ok(())
}
