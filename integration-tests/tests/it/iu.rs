//! The information-unit service end to end, as a real process against real nats-servers:
//! content round trips (small and 1 GiB), dedupe, optimistic concurrency, idempotent retries,
//! rebuild by replay, time travel, corruption, crashes mid-upload, bad input, and R3.

use std::{collections::BTreeMap, pin::Pin, task::Poll, time::Duration};

use anyhow::Result;
use async_nats::jetstream;
use cim_events::{Cid, Component, cid::CidHasher, iu, proto::iu::*, resources, subject};
use cim_iu_client::{IuError, NoProgress, header, header_with_id};
use cim_testkit::eventually;
use futures::StreamExt;
use nix::sys::signal::Signal;
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::common::READY;
use crate::fixture::{CimFixture, Svc};

const C: Component = Component::InformationUnit;

/// The information-unit service (with extra `args`) on a nats-server of its own, ready.
async fn start(args: &[&str]) -> Result<CimFixture> {
    CimFixture::builder().service(Svc::new(C).args(args)).start().await
}

fn create(cid: &str, name: &str) -> CreateUnit {
    CreateUnit { cid: cid.into(), name: name.into(), media_type: "text/plain".into(), ..Default::default() }
}

async fn event_count(js: &jetstream::Context, filter: &str) -> Result<u64> {
    let stream = js.get_stream(resources::events_stream(C).name).await?;
    let info = stream.info_with_subjects(filter).await?;
    let mut n = 0;
    let mut info = info;
    while let Some(s) = info.next().await {
        n += s?.1 as u64;
    }
    Ok(n)
}

#[tokio::test(flavor = "multi_thread")]
async fn small_units_round_trip_with_metadata_links_history_and_ranges() -> Result<()> {
    let cim = start(&[]).await?;
    let iu = cim.iu();
    let body = b"hello, information unit".to_vec();
    let committed = iu.put_bytes(&body).await?;
    assert_eq!(committed.cid, Cid::of(&body).to_string());
    assert!(!committed.deduplicated);

    let mut c = create(&committed.cid, "greeting.txt");
    c.tags = vec!["demo".into()];
    c.attributes.insert("lang".into(), "en".into());
    let a = iu.create(c).await?;
    let other = iu.create(create(&committed.cid, "other.txt")).await?;
    // Versions a person can count: every unit starts at 1, whatever else the stream holds.
    assert_eq!((a.version, other.version), (1, 1));
    assert!(other.sequence > a.sequence);
    iu.link(LinkUnit {
        header: header(0),
        unit_id: other.unit_id.clone(),
        link: Some(Link { kind: "cites".into(), target: a.unit_id.clone() }),
    })
    .await?;

    let unit = iu.unit(&a.unit_id).await?;
    assert_eq!(unit.name, "greeting.txt");
    assert_eq!(unit.cid, committed.cid);
    assert_eq!(unit.size, body.len() as u64);
    assert_eq!(unit.tags, vec!["demo"]);
    assert_eq!(unit.attributes.get("lang").map(String::as_str), Some("en"));
    let prov = unit.created_by.unwrap();
    assert!(!prov.correlation_id.is_empty() && prov.source.contains("information-unit"));

    assert_eq!(iu.get_bytes(&unit.cid, None).await?, body);
    assert_eq!(iu.get_bytes(&unit.cid, Some((7, 18))).await?, b"information".to_vec());

    let links = iu.links(&a.unit_id).await?;
    assert_eq!(links.incoming.len(), 1);
    assert_eq!(links.incoming[0].source, other.unit_id);

    // a new version chains to its predecessor
    let v2 = iu.put_bytes(b"hello again").await?;
    let r = iu
        .new_version(NewVersion {
            header: header(unit.version),
            unit_id: a.unit_id.clone(),
            cid: v2.cid.clone(),
            ..Default::default()
        })
        .await?;
    let unit = iu.unit(&a.unit_id).await?;
    assert_eq!(unit.version, r.version);
    assert_eq!(unit.versions.len(), 2);
    assert_eq!(unit.versions[1].previous_cid, committed.cid);

    let history = iu.history(&a.unit_id).await?;
    assert_eq!(history.entries.len(), 2);
    assert!(history.entries[1].summary.contains("new version"), "{:?}", history.entries[1]);

    // listing and filters
    eventually(READY, "both units listed", || async {
        let all = iu.list(ListUnits::default()).await?;
        anyhow::ensure!(all.units.len() == 2, "{} listed", all.units.len());
        let tagged = iu.list(ListUnits { tag: "demo".into(), ..Default::default() }).await?;
        anyhow::ensure!(tagged.units.len() == 1);
        let prefixed = iu.list(ListUnits { name_prefix: "oth".into(), ..Default::default() }).await?;
        anyhow::ensure!(prefixed.units.len() == 1 && prefixed.units[0].unit_id == other.unit_id);
        Ok(())
    })
    .await?;

    // delete is a tombstone: gone from lists, still in history
    iu.delete(DeleteUnit { header: header(0), unit_id: other.unit_id.clone(), reason: "test".into() }).await?;
    assert!(iu.unit(&other.unit_id).await?.deleted);
    let err = iu
        .tag(TagUnit { header: header(0), unit_id: other.unit_id.clone(), tags: vec!["x".into()] })
        .await
        .unwrap_err();
    assert!(matches!(err, IuError::NotFound(_)), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn identical_content_is_stored_once() -> Result<()> {
    let cim = start(&[]).await?;
    let iu = cim.iu();
    let first = iu.put_bytes(b"same bytes").await?;
    let second = iu.put_bytes(b"same bytes").await?;
    assert_eq!(first.cid, second.cid);
    assert!(second.deduplicated);
    let store = cim.js().get_object_store(iu::CONTENT_BUCKET).await?;
    let mut names = Vec::new();
    let mut list = store.list().await?;
    while let Some(o) = list.next().await {
        names.push(o?.name);
    }
    assert_eq!(names, vec![first.cid.clone()], "one object, no leftover upload");
    let js = cim.js();
    assert_eq!(event_count(&js, &iu::content_event(&first.cid, iu::action::STORED)?).await?, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_updates_with_the_same_expected_version_give_one_conflict() -> Result<()> {
    let cim = start(&[]).await?;
    let iu = cim.iu();
    let c = iu.put_bytes(b"x").await?;
    let u = iu.create(create(&c.cid, "x")).await?;
    let tag = |t: &str| TagUnit { header: header(u.version), unit_id: u.unit_id.clone(), tags: vec![t.into()] };
    let (a, b) = tokio::join!(iu.tag(tag("a")), iu.tag(tag("b")));
    let (ok, err) = match (a, b) {
        (Ok(ok), Err(e)) | (Err(e), Ok(ok)) => (ok, e),
        other => panic!("expected exactly one success: {other:?}"),
    };
    assert!(matches!(err, IuError::Conflict(_)), "{err}");
    let unit = iu.unit(&u.unit_id).await?;
    assert_eq!(unit.version, ok.version);
    assert_eq!(unit.tags.len(), 1, "the loser wrote nothing: {:?}", unit.tags);
    // a stale expected version is refused outright
    let stale = iu.tag(tag("c")).await.unwrap_err();
    assert!(matches!(stale, IuError::Conflict(_)), "{stale}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_command_returns_the_first_result_and_writes_once() -> Result<()> {
    let cim = start(&[]).await?;
    let iu = cim.iu();
    let c = iu.put_bytes(b"idem").await?;
    let mut cmd = create(&c.cid, "idem");
    cmd.header = header_with_id("req-create-1", 0);
    let first = iu.create(cmd.clone()).await?;
    let again = iu.create(cmd).await?;
    assert_eq!(first.unit_id, again.unit_id);
    assert_eq!(first.version, again.version);
    assert!(again.replayed && !first.replayed);

    let tag =
        TagUnit { header: header_with_id("req-tag-1", 0), unit_id: first.unit_id.clone(), tags: vec!["t".into()] };
    let (x, y) = tokio::join!(iu.tag(tag.clone()), iu.tag(tag));
    assert_eq!(x?.version, y?.version);
    let js = cim.js();
    assert_eq!(event_count(&js, &iu::unit_history(&first.unit_id)?).await?, 2, "created + tagged, nothing twice");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn get_as_of_a_version_or_a_time() -> Result<()> {
    let cim = start(&[]).await?;
    let iu = cim.iu();
    let c = iu.put_bytes(b"tt").await?;
    let u = iu.create(create(&c.cid, "before")).await?;
    let t1 = iu.unit(&u.unit_id).await?.updated_ms;
    let tagged = iu.tag(TagUnit { header: header(0), unit_id: u.unit_id.clone(), tags: vec!["later".into()] }).await?;
    let at_v1 =
        iu.get_unit(GetUnit { unit_id: u.unit_id.clone(), at_version: u.version, ..Default::default() }).await?;
    assert!(at_v1.tags.is_empty());
    assert_eq!(at_v1.version, u.version);
    let at_t1 = iu.get_unit(GetUnit { unit_id: u.unit_id.clone(), at_time_ms: t1, ..Default::default() }).await?;
    assert!(at_t1.tags.is_empty(), "{at_t1:?}");
    let now = iu.unit(&u.unit_id).await?;
    assert_eq!(now.tags, vec!["later"]);
    assert_eq!(now.version, tagged.version);
    let before =
        iu.get_unit(GetUnit { unit_id: u.unit_id.clone(), at_time_ms: 1, ..Default::default() }).await.unwrap_err();
    assert!(matches!(before, IuError::NotFound(_)));
    Ok(())
}

/// Every unit state in the KV projection.
async fn kv_states(js: &jetstream::Context) -> Result<BTreeMap<String, Unit>> {
    let kv = js.get_key_value(resources::kv_bucket(C, iu::KV_UNITS)?).await?;
    let mut keys = kv.keys().await?;
    let mut out = BTreeMap::new();
    while let Some(k) = keys.next().await {
        let k = k?;
        if k.starts_with("u.")
            && let Some(v) = kv.get(&k).await?
        {
            out.insert(k, Unit::decode(v)?);
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_racing_live_writes_ends_equal_to_the_stream() -> Result<()> {
    let cim = start(&[]).await?;
    let iu = cim.iu();
    let js = cim.js();
    let c = iu.put_bytes(b"racing").await?;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(iu.create(create(&c.cid, &format!("r{i}"))).await?.unit_id);
    }
    // Writers keep changing units (and creating more) while the projection is dropped and
    // rebuilt under them, three times.
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (iu, ids, cid) = (iu.clone(), ids.clone(), c.cid.clone());
            tokio::spawn(async move {
                for i in 0..40 {
                    let unit_id = ids[(w * 7 + i) % ids.len()].clone();
                    iu.tag(TagUnit { header: header(0), unit_id, tags: vec![format!("w{w}-{}", i % 5)] }).await?;
                    if i % 10 == 0 {
                        iu.create(create(&cid, &format!("w{w}-{i}"))).await?;
                    }
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for _ in 0..3 {
        iu.rebuild().await?;
        eventually(READY, "the rebuild under way", || async {
            let s = iu.status().await?;
            anyhow::ensure!(s.checkpoint > 0, "{s:?}");
            Ok(())
        })
        .await?;
    }
    for w in writers {
        w.await??;
    }
    // Every projected state is the state the stream folds to, event for event.
    let projected = eventually(READY, "projection caught up", || async {
        let s = iu.status().await?;
        anyhow::ensure!(s.lag == 0 && s.checkpoint == s.stream_last_sequence, "{s:?}");
        kv_states(&js).await
    })
    .await?;
    assert_eq!(projected.len(), 20 + 4 * 4, "every unit projected");
    for (key, state) in &projected {
        let replayed =
            iu.get_unit(GetUnit { unit_id: state.unit_id.clone(), at_time_ms: i64::MAX, ..Default::default() }).await?;
        assert_eq!(&replayed, state, "{key}: the projection differs from the stream");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_projection_from_before_per_unit_versions_is_rebuilt_with_them() -> Result<()> {
    let mut cim = start(&[]).await?;
    let iu = cim.iu();
    let js = cim.js();
    let c = iu.put_bytes(b"older").await?;
    let u = iu.create(create(&c.cid, "older")).await?;
    let tagged = iu.tag(TagUnit { header: header(0), unit_id: u.unit_id.clone(), tags: vec!["t".into()] }).await?;
    assert_eq!(tagged.version, 2);
    eventually(READY, "projection caught up", || async {
        let s = iu.status().await?;
        anyhow::ensure!(s.lag == 0 && s.checkpoint == s.stream_last_sequence, "{s:?}");
        Ok(())
    })
    .await?;
    cim.service(C).signal(Signal::SIGKILL);
    cim.service_mut(C).wait(Duration::from_secs(10)).await?;
    // What the version before per-unit versions left: a unit's version was its stream
    // sequence, and the checkpoint named no format.
    let kv = js.get_key_value(resources::kv_bucket(C, iu::KV_UNITS)?).await?;
    let key = iu::unit_key(&u.unit_id)?;
    let mut old = Unit::decode(kv.get(&key).await?.expect("projected state"))?;
    (old.version, old.sequence) = (old.sequence, 0);
    kv.put(&key, old.encode_to_vec().into()).await?;
    kv.put(iu::CHECKPOINT_KEY, format!("old-generation:{}", tagged.sequence).into()).await?;

    cim.service_mut(C).restart().await?;
    cim.wait_ready(0).await?;
    let again = eventually(READY, "the projection rebuilt", || async {
        let s = iu.status().await?;
        anyhow::ensure!(s.lag == 0 && s.checkpoint == s.stream_last_sequence, "{s:?}");
        let raw = kv.get(&key).await?.ok_or_else(|| anyhow::anyhow!("not projected yet"))?;
        let state = Unit::decode(raw)?;
        anyhow::ensure!(state.sequence == tagged.sequence, "{state:?}");
        Ok(state)
    })
    .await?;
    assert_eq!((again.version, again.tags.as_slice()), (2, &["t".to_string()][..]));
    assert_eq!(iu.unit(&u.unit_id).await?.version, 2);
    // Commands expect the unit's own version from now on.
    let r = iu.tag(TagUnit { header: header(2), unit_id: u.unit_id.clone(), tags: vec!["u".into()] }).await?;
    assert_eq!(r.version, 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_rebuilds_identical_projections_after_the_kv_is_deleted() -> Result<()> {
    let mut cim = start(&[]).await?;
    let iu = cim.iu();
    let js = cim.js();
    let c = iu.put_bytes(b"replay").await?;
    let c2 = iu.put_bytes(b"replay v2").await?;
    let mut ids: Vec<String> = Vec::new();
    for i in 0..20 {
        let u = iu.create(create(&c.cid, &format!("u{i}"))).await?;
        iu.tag(TagUnit { header: header(0), unit_id: u.unit_id.clone(), tags: vec![format!("t{}", i % 3)] }).await?;
        if i % 4 == 0 {
            iu.new_version(NewVersion {
                header: header(0),
                unit_id: u.unit_id.clone(),
                cid: c2.cid.clone(),
                ..Default::default()
            })
            .await?;
        }
        if i > 0 && (i - 1) % 7 != 0 {
            iu.link(LinkUnit {
                header: header(0),
                unit_id: u.unit_id.clone(),
                link: Some(Link { kind: "next-of".into(), target: ids[i - 1].clone() }),
            })
            .await?;
        }
        if i % 7 == 0 {
            iu.delete(DeleteUnit { header: header(0), unit_id: u.unit_id.clone(), reason: "r".into() }).await?;
        }
        ids.push(u.unit_id);
    }
    eventually(READY, "projection caught up", || async {
        let s = iu.status().await?;
        anyhow::ensure!(s.lag == 0 && s.checkpoint == s.stream_last_sequence, "{s:?}");
        Ok(())
    })
    .await?;
    let before = kv_states(&js).await?;
    assert_eq!(before.len(), 20);

    // 1. stop, delete the projection, start: the service replays the stream
    assert!(cim.service_mut(C).terminate(Duration::from_secs(20)).await?.success());
    js.delete_key_value(resources::kv_bucket(C, iu::KV_UNITS)?).await?;
    cim.service_mut(C).restart().await?;
    cim.wait_ready(0).await?;
    eventually(READY, "projection rebuilt after the KV was deleted", || async {
        let s = iu.status().await?;
        anyhow::ensure!(s.lag == 0 && s.checkpoint == s.stream_last_sequence, "{s:?}");
        anyhow::ensure!(kv_states(&js).await? == before, "projection differs");
        Ok(())
    })
    .await?;

    // 2. rebuild on demand while running, several times: the first while the projector is
    //    idle, the next ones back to back, while it is replaying (a bucket dropped and
    //    recreated under a projector must never make it skip an event)
    for round in 0..4 {
        iu.rebuild().await?;
        if round > 0 && round < 3 {
            continue;
        }
        eventually(READY, "projection rebuilt on demand", || async {
            let s = iu.status().await?;
            anyhow::ensure!(s.lag == 0 && s.checkpoint == s.stream_last_sequence, "{s:?}");
            anyhow::ensure!(kv_states(&js).await? == before, "projection differs");
            anyhow::ensure!(
                iu.list(ListUnits { include_deleted: true, page_size: 1000, ..Default::default() }).await?.units.len()
                    == 20
            );
            Ok(())
        })
        .await
        .map_err(|e| e.context(format!("round {round}")))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_poison_event_is_skipped_with_its_sequence_and_later_events_still_project() -> Result<()> {
    let cim = start(&[]).await?;
    let (svc, iu) = (cim.service(C), cim.iu());
    let js = cim.js();
    let c = iu.put_bytes(b"poison").await?;
    let a = iu.create(create(&c.cid, "before")).await?;
    // An event no envelope can be read from (no headers), as a broken writer would leave it.
    let ack = js.publish(iu::unit_event("0190-not-a-unit", iu::action::TAGGED)?, "not an event".into()).await?.await?;
    let b = iu.create(create(&c.cid, "after")).await?;
    iu.tag(TagUnit { header: header(0), unit_id: a.unit_id.clone(), tags: vec!["still".into()] }).await?;
    eventually(READY, "the projection passed the poison event", || async {
        let s = iu.status().await?;
        anyhow::ensure!(s.lag == 0 && s.checkpoint == s.stream_last_sequence && s.checkpoint > ack.sequence, "{s:?}");
        Ok(())
    })
    .await?;
    assert_eq!(iu.unit(&b.unit_id).await?.name, "after");
    assert_eq!(iu.unit(&a.unit_id).await?.tags, vec!["still"]);
    // Nothing was lost from the log, and the skip names the event.
    let stream = js.get_stream(resources::events_stream(C).name).await?;
    assert_eq!(stream.get_raw_message(ack.sequence).await?.payload.as_ref(), b"not an event");
    let log = svc.log();
    assert!(
        log.contains("event could not be projected; skipped") && log.contains(&format!("sequence={}", ack.sequence)),
        "{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn content_that_does_not_match_its_cid_is_detected_recorded_and_removed() -> Result<()> {
    let cim = start(&[]).await?;
    let (svc, iu) = (cim.service(C), cim.iu());
    let js = cim.js();
    let store = js.get_object_store(iu::CONTENT_BUCKET).await?;
    // Bytes B stored under the CID of A (as a lying client or a damaged store would leave them).
    let claimed = Cid::of(b"the real bytes");
    store.put(claimed.to_string().as_str(), &mut &b"other bytes"[..]).await?;
    let err = iu.get_bytes(&claimed.to_string(), None).await.unwrap_err();
    assert!(matches!(err, IuError::Corrupt { .. }), "{err}");
    eventually(READY, "corruption recorded and the object removed", || async {
        anyhow::ensure!(event_count(&js, &iu::content_event(&claimed.to_string(), iu::action::CORRUPTED)?).await? >= 1);
        anyhow::ensure!(store.info(claimed.to_string()).await.is_err(), "object still there");
        Ok(())
    })
    .await
    .map_err(|e| e.context(svc.log()))?;
    // the honest bytes can be stored again under their CID
    let again = iu.put_bytes(b"the real bytes").await?;
    assert_eq!(again.cid, claimed.to_string());
    assert_eq!(iu.get_bytes(&again.cid, None).await?, b"the real bytes");
    // Bytes that do not match a correct-looking record: metadata says CID(A), chunks hold B.
    let honest = Cid::of(b"bytes the record promises");
    store.put(honest.to_string().as_str(), &mut &b"bytes actually stored"[..]).await?;
    let mut info = store.info(honest.to_string()).await?;
    info.digest = Some(honest.to_object_digest());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Rollup", "sub");
    js.publish_with_headers(
        cim_events::subject::object_meta(iu::CONTENT_BUCKET, &honest.to_string())?,
        headers,
        serde_json::to_vec(&info)?.into(),
    )
    .await?
    .await?;
    let err = iu.get_bytes(&honest.to_string(), None).await.unwrap_err();
    assert!(matches!(err, IuError::Corrupt { .. }), "{err}");
    eventually(READY, "the mismatching chunks recorded and removed", || async {
        anyhow::ensure!(event_count(&js, &iu::content_event(&honest.to_string(), iu::action::CORRUPTED)?).await? >= 1);
        anyhow::ensure!(store.info(honest.to_string()).await.is_err(), "object still there");
        Ok(())
    })
    .await?;

    // a false report is refused: the service reads the bytes back itself
    let err = iu.report_corrupt(&again.cid, "I say so").await.unwrap_err();
    assert!(matches!(err, IuError::Conflict(_)), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_a_clear_error_and_writes_nothing() -> Result<()> {
    let cim = start(&[]).await?;
    let iu = cim.iu();
    let js = cim.js();
    let c = iu.put_bytes(b"valid").await?;
    let u = iu.create(create(&c.cid, "ok")).await?;
    let schema =
        r#"{"attributes": {"pages": {"type": "integer", "required": true, "min": 1}}, "additional_attributes": false}"#;
    iu.register_type(RegisterType { header: header(0), name: "book".into(), schema_json: schema.into() }).await?;
    let events_before = event_count(&js, &subject::events_of(C)).await?;

    let bad_request = |e: IuError, want: &str| {
        assert!(matches!(e, IuError::BadRequest(_)), "{want}: {e}");
        assert!(e.to_string().contains(want), "{want}: {e}");
    };
    let not_found = |e: IuError, want: &str| {
        assert!(matches!(e, IuError::NotFound(_)), "{want}: {e}");
        assert!(e.to_string().contains(want), "{want}: {e}");
    };
    bad_request(iu.create(create(&c.cid, "")).await.unwrap_err(), "name is empty");
    bad_request(iu.create(create(&c.cid, "a\u{7}b")).await.unwrap_err(), "control");
    bad_request(iu.create(create(&c.cid, "../etc/passwd")).await.unwrap_err(), "path separator");
    bad_request(
        iu.create(CreateUnit { media_type: "nonsense".into(), ..create(&c.cid, "x") }).await.unwrap_err(),
        "media type",
    );
    bad_request(iu.create(CreateUnit { tags: vec!["a b".into()], ..create(&c.cid, "x") }).await.unwrap_err(), "tag");
    let mut bad_attr = create(&c.cid, "x");
    bad_attr.attributes.insert("bad key".into(), "v".into());
    bad_request(iu.create(bad_attr).await.unwrap_err(), "attribute name");
    let mut huge = create(&c.cid, "x");
    for i in 0..40 {
        huge.attributes.insert(format!("k{i}"), "x".repeat(4000));
    }
    bad_request(iu.create(huge).await.unwrap_err(), "metadata is");
    bad_request(iu.create(create("not-a-cid", "x")).await.unwrap_err(), "CID");
    not_found(iu.create(create(&Cid::of(b"never uploaded").to_string(), "x")).await.unwrap_err(), "not stored");
    not_found(
        iu.create(CreateUnit { unit_type: "novel".into(), ..create(&c.cid, "x") }).await.unwrap_err(),
        "not registered",
    );
    bad_request(
        iu.create(CreateUnit { unit_type: "book".into(), ..create(&c.cid, "x") }).await.unwrap_err(),
        "pages is required",
    );
    let mut wrong = CreateUnit { unit_type: "book".into(), ..create(&c.cid, "x") };
    wrong.attributes.insert("pages".into(), "zero".into());
    bad_request(iu.create(wrong).await.unwrap_err(), "not an integer");
    let mut dangling = create(&c.cid, "x");
    dangling.links.push(Link { kind: "cites".into(), target: "no-such-unit".into() });
    not_found(iu.create(dangling).await.unwrap_err(), "does not exist");
    not_found(
        iu.link(LinkUnit {
            header: header(0),
            unit_id: u.unit_id.clone(),
            link: Some(Link { kind: "cites".into(), target: "ghost".into() }),
        })
        .await
        .unwrap_err(),
        "ghost",
    );
    let stale = iu
        .tag(TagUnit { header: header(u.version + 100), unit_id: u.unit_id.clone(), tags: vec!["t".into()] })
        .await
        .unwrap_err();
    assert!(matches!(stale, IuError::Conflict(_)), "{stale}");
    bad_request(
        iu.register_type(RegisterType { header: header(0), name: "broken".into(), schema_json: "{".into() })
            .await
            .unwrap_err(),
        "schema",
    );
    not_found(iu.commit(&format!("{}{}", iu::UPLOAD_PREFIX, uuid_like())).await.unwrap_err(), "does not exist");
    bad_request(iu.commit("../../etc").await.unwrap_err(), "not an upload name");
    // undecodable request bodies
    let raw = cim.client().request(iu::command(iu::cmd::CREATE)?, vec![0xff, 0xff, 0xff].into()).await?;
    assert_eq!(raw.headers.unwrap().get("Nats-Service-Error-Code").unwrap().as_str(), "400");

    // validation without writing, and schema checks on set_attributes
    let v = iu.validate("book", [("pages".to_string(), "0".to_string())].into()).await?;
    assert!(!v.valid && v.problems.iter().any(|p| p.contains("below 1")), "{v:?}");
    assert!(iu.validate("book", [("pages".to_string(), "3".to_string())].into()).await?.valid);
    assert_eq!(event_count(&js, &subject::events_of(C)).await?, events_before, "nothing was written");

    let mut book = CreateUnit { unit_type: "book".into(), ..create(&c.cid, "a book") };
    book.attributes.insert("pages".into(), "3".into());
    let b = iu.create(book).await?;
    bad_request(
        iu.set_attributes(SetAttributes {
            header: header(0),
            unit_id: b.unit_id.clone(),
            set: [("pages".to_string(), "0".to_string())].into(),
            remove: vec![],
        })
        .await
        .unwrap_err(),
        "below 1",
    );
    bad_request(
        iu.set_attributes(SetAttributes {
            header: header(0),
            unit_id: b.unit_id.clone(),
            set: Default::default(),
            remove: vec!["pages".into()],
        })
        .await
        .unwrap_err(),
        "pages is required",
    );
    iu.set_attributes(SetAttributes {
        header: header(0),
        unit_id: b.unit_id.clone(),
        set: [("pages".to_string(), "5".to_string())].into(),
        remove: vec![],
    })
    .await?;
    assert_eq!(iu.unit(&b.unit_id).await?.attributes.get("pages").map(String::as_str), Some("5"));
    assert!(cim.wait_ready(0).await.is_ok(), "still serving");
    Ok(())
}

fn uuid_like() -> String {
    "0190b5a0-7f2e-7c1a-9c3e-2f1d4b6a8c9e".to_string()
}

/// Deterministic pseudo-random bytes, generated on the fly (never held in memory).
struct Generated {
    left: u64,
    state: u64,
    hasher: CidHasher,
}

impl Generated {
    fn new(size: u64) -> Generated {
        Generated { left: size, state: 0x9e37_79b9_7f4a_7c15, hasher: CidHasher::new() }
    }
}

impl AsyncRead for Generated {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = (buf.remaining() as u64).min(self.left).min(64 * 1024) as usize;
        let mut chunk = vec![0u8; n];
        for b in chunk.chunks_mut(8) {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            let bytes = self.state.to_le_bytes();
            b.copy_from_slice(&bytes[..b.len()]);
        }
        self.hasher.update(&chunk);
        buf.put_slice(&chunk);
        self.left -= n as u64;
        Poll::Ready(Ok(()))
    }
}

/// A writer that only hashes.
struct HashSink(CidHasher, u64);

impl AsyncWrite for HashSink {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.0.update(buf);
        self.1 += buf.len() as u64;
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_one_gib_unit_round_trips_with_bounded_memory() -> Result<()> {
    const SIZE: u64 = 1 << 30;
    let cim = start(&[]).await?;
    let (svc, iu) = (cim.service(C), cim.iu());
    let mut source = Generated::new(SIZE);
    let committed = iu.put_content(&mut source, &mut NoProgress).await?;
    let expected = std::mem::take(&mut source.hasher).finish();
    assert_eq!(committed.cid, expected.to_string());
    assert_eq!(committed.size, SIZE);
    let u = iu
        .create(CreateUnit { media_type: "application/octet-stream".into(), ..create(&committed.cid, "big.bin") })
        .await?;
    let mut sink = HashSink(CidHasher::new(), 0);
    iu.get_content(&iu.unit(&u.unit_id).await?.cid, None, &mut sink, &mut NoProgress).await?;
    assert_eq!(sink.1, SIZE);
    assert_eq!(sink.0.finish(), expected, "downloaded bytes hash to the CID");
    // The service never held the content: its resident memory stayed small.
    let rss = rss_kib(svc.pid()).unwrap_or(0);
    assert!(rss < 128 * 1024, "service RSS {rss} KiB");
    Ok(())
}

fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn interrupted_uploads_leave_no_unit_and_are_collected() -> Result<()> {
    let cim = start(&["--iu-orphan-grace", "1s", "--iu-collect-interval", "500ms"]).await?;
    let iu = cim.iu();
    let js = cim.js();
    // A client dies mid-upload: cimctl is SIGKILLed while streaming a large file.
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("big.bin");
    {
        let f = std::fs::File::create(&file)?;
        f.set_len(256 << 20)?;
    }
    let mut put = tokio::process::Command::new(crate::common::bin("cimctl"))
        .args(["iu", "--nats-url", cim.url(), "put"])
        .arg(&file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let obj_stream = resources::object_buckets(C)[0].stream_name();
    eventually(READY, "upload under way", || async {
        let info = js.get_stream(&obj_stream).await?.info().await?.state.bytes;
        anyhow::ensure!(info > 4 << 20, "{info} bytes so far");
        Ok(())
    })
    .await?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(put.id().unwrap() as i32), Signal::SIGKILL)?;
    put.wait().await?;
    assert!(iu.list(ListUnits::default()).await?.units.is_empty(), "no visible unit");
    eventually(Duration::from_secs(30), "the leftover chunks collected", || async {
        let state = js.get_stream(&obj_stream).await?.info().await?.state.clone();
        anyhow::ensure!(state.messages == 0, "{} messages left", state.messages);
        Ok(())
    })
    .await?;
    // The service was up all along and a new upload works.
    let c = iu.put_bytes(b"after the crash").await?;
    iu.create(create(&c.cid, "after")).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_killed_mid_upload_restarts_into_a_consistent_store() -> Result<()> {
    let mut cim = start(&["--instance-id", "iu-a"]).await?;
    let iu = cim.iu();
    // The upload goes to JetStream directly; the service dies before the commit.
    let upload = iu.upload(&mut Generated::new(32 << 20), &mut NoProgress).await?;
    cim.service(C).signal(Signal::SIGKILL);
    cim.service_mut(C).wait(Duration::from_secs(10)).await?;
    let commit = {
        let iu = iu.clone();
        let name = upload.name.clone();
        tokio::spawn(async move { iu.commit(&name).await })
    };
    cim.service_mut(C).restart().await?;
    cim.wait_ready(0).await?;
    let committed = commit.await??;
    let u = iu.create(create(&committed.cid, "survivor")).await?;
    let mut sink = HashSink(CidHasher::new(), 0);
    iu.get_content(&committed.cid, None, &mut sink, &mut NoProgress).await?;
    assert_eq!(sink.1, 32 << 20);
    assert_eq!(iu.unit(&u.unit_id).await?.cid, committed.cid);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn units_work_on_a_three_node_cluster_with_r3() -> Result<()> {
    let cim = CimFixture::builder().cluster(3).service(C).start().await?;
    let js = cim.js();
    for name in [
        resources::events_stream(C).name,
        resources::object_buckets(C)[0].stream_name(),
        resources::kv_buckets(C)[0].stream_name(),
    ] {
        assert_eq!(js.get_stream(&name).await?.info().await?.config.num_replicas, 3, "{name}");
    }
    let iu = cim.iu();
    let c = iu.put_bytes(b"replicated").await?;
    let u = iu.create(create(&c.cid, "r3")).await?;
    assert_eq!(iu.get_bytes(&iu.unit(&u.unit_id).await?.cid, None).await?, b"replicated");

    // Every read that decides a command sees the writes it depends on: an upload finished a
    // moment ago, content committed a moment ago (a direct get may be answered by a replica
    // that has not applied them yet). Clients on every node, 4 at a time.
    let clients: Vec<cim_iu_client::IuClient> = {
        let mut v = Vec::new();
        for url in cim.cluster().urls() {
            v.push(cim_iu_client::IuClient::new(async_nats::connect(url).await?));
        }
        v
    };
    let failures: Vec<String> = futures::stream::iter(0..120usize)
        .map(|i| {
            let iu = clients[i % clients.len()].clone();
            async move {
                let bytes = format!("replicated {i}");
                let put = iu.put_bytes(bytes.as_bytes()).await.map_err(|e| format!("{i}: put: {e}"))?;
                let made =
                    iu.create(create(&put.cid, &format!("r3-{i}"))).await.map_err(|e| format!("{i}: create: {e}"))?;
                let unit = iu.unit(&made.unit_id).await.map_err(|e| format!("{i}: get: {e}"))?;
                let back = iu.get_bytes(&unit.cid, None).await.map_err(|e| format!("{i}: read: {e}"))?;
                if back != bytes.as_bytes() {
                    return Err(format!("{i}: read back other bytes"));
                }
                Ok::<_, String>(())
            }
        })
        .buffer_unordered(4)
        .filter_map(|r| async move { r.err() })
        .collect()
        .await;
    assert!(failures.is_empty(), "{} of 120 failed: {failures:?}", failures.len());
    Ok(())
}

/// Bytes that differ from unit to unit and span several 128 KiB chunks for most of them.
fn unit_bytes(i: usize) -> Vec<u8> {
    (0..1_000 + i * 97_000).map(|j| (j as u8).wrapping_mul(31) ^ (j >> 9) as u8 ^ i as u8).collect()
}

/// How many chunk messages the content stream holds for the object `nuid`.
async fn chunk_count(js: &jetstream::Context, nuid: &str) -> Result<u64> {
    let stream = js.get_stream(resources::object_buckets(C)[0].stream_name()).await?;
    let mut pages = stream.info_with_subjects(subject::object_chunks(iu::CONTENT_BUCKET, nuid)?).await?;
    let mut n = 0;
    while let Some(page) = pages.next().await {
        n += page?.1 as u64;
    }
    Ok(n)
}

/// Uploads `bytes`, keeps the upload's metadata message as the stream held it, commits it
/// (which purges that message) and creates a unit of it: (unit id, CID, the message).
async fn commit_keeping_the_upload_record(
    cim: &CimFixture,
    bytes: &[u8],
    name: &str,
) -> Result<(String, String, jetstream::message::StreamMessage)> {
    let (iu, js) = (cim.iu(), cim.js());
    let upload = iu.upload(bytes, &mut NoProgress).await?;
    let stream = js.get_stream(resources::object_buckets(C)[0].stream_name()).await?;
    let record =
        stream.get_last_raw_message_by_subject(&subject::object_meta(iu::CONTENT_BUCKET, &upload.name)?).await?;
    let committed = iu.commit(&upload.name).await?;
    assert!(!committed.deduplicated);
    let store = js.get_object_store(iu::CONTENT_BUCKET).await?;
    assert!(store.info(&upload.name).await.is_err(), "the commit purged the upload's metadata");
    let u = iu.create(create(&committed.cid, name)).await?;
    Ok((u.unit_id, committed.cid, record))
}

/// Publishes a kept metadata message again exactly as it was (subject, headers, body), as a
/// restore from an archive or from a mirror (neither replays purges) brings it back.
async fn bring_back(js: &jetstream::Context, record: &jetstream::message::StreamMessage) -> Result<()> {
    js.publish_with_headers(record.subject.clone(), record.headers.clone(), record.payload.clone()).await?.await?;
    Ok(())
}

/// Every unit's content still reads back byte for byte, verified against its CID, and every
/// chunk it records is still in the stream.
async fn content_intact(cim: &CimFixture, units: &[(String, String, Vec<u8>)]) -> Result<()> {
    let (iu, js) = (cim.iu(), cim.js());
    let store = js.get_object_store(iu::CONTENT_BUCKET).await?;
    let mut lost = Vec::new();
    for (unit_id, cid, _) in units {
        let info = store.info(cid).await?;
        anyhow::ensure!(!info.deleted, "content {cid} of unit {unit_id} was deleted");
        let stored = chunk_count(&js, &info.nuid).await?;
        if stored != info.chunks as u64 {
            lost.push(format!("{cid}: {stored} of {} chunks", info.chunks));
        }
    }
    anyhow::ensure!(lost.is_empty(), "{} of {} units lost chunks: {lost:?}", lost.len(), units.len());
    for (unit_id, cid, bytes) in units {
        assert_eq!(&iu.unit(unit_id).await?.cid, cid);
        let read = tokio::time::timeout(Duration::from_secs(30), iu.get_bytes(cid, None)).await??;
        assert_eq!(Cid::of(&read).to_string(), *cid);
        assert!(read == *bytes, "content {cid} reads back other bytes");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn uploads_brought_back_after_their_commit_are_collected_without_the_content_they_share() -> Result<()> {
    let cim = start(&["--iu-orphan-grace", "2s", "--iu-collect-interval", "300ms"]).await?;
    let js = cim.js();
    let store = js.get_object_store(iu::CONTENT_BUCKET).await?;
    let mut units = Vec::new();
    let mut records = Vec::new();
    for i in 0..8 {
        let bytes = unit_bytes(i);
        let (unit_id, cid, record) = commit_keeping_the_upload_record(&cim, &bytes, &format!("u{i}")).await?;
        units.push((unit_id, cid, bytes));
        records.push(record);
    }
    // The purged upload records come back, naming the committed objects' chunks.
    let mut uploads = Vec::new();
    for (record, (_, cid, _)) in records.iter().zip(&units) {
        bring_back(&js, record).await?;
        let info: async_nats::jetstream::object_store::ObjectInfo = serde_json::from_slice(&record.payload)?;
        let back = store.info(&info.name).await?;
        assert!(!back.deleted && back.nuid == store.info(cid).await?.nuid, "{} shares {cid}'s chunks", info.name);
        uploads.push(info.name);
    }
    // Collection (rule 1) removes them once they are older than the grace.
    eventually(Duration::from_secs(60), "the uploads brought back collected", || async {
        for name in &uploads {
            let token = name.replace('.', "_");
            anyhow::ensure!(
                event_count(&js, &iu::content_event(&token, iu::action::COLLECTED)?).await? >= 1,
                "{name} not collected yet"
            );
            anyhow::ensure!(store.info(name).await.is_err(), "{name} still listed");
        }
        Ok(())
    })
    .await
    .map_err(|e| e.context(cim.service(C).log()))?;
    let events = js.get_stream(resources::events_stream(C).name).await?;
    for name in &uploads {
        let subject = iu::content_event(&name.replace('.', "_"), iu::action::COLLECTED)?;
        let event = ContentCollected::decode(events.get_last_raw_message_by_subject(&subject).await?.payload)?;
        assert!(event.size == 0 && event.reason.contains("metadata only"), "{name}: {event:?}");
    }
    // Chunks no object names, older than the grace (a client cut off mid-upload): once rule 2
    // has purged them, a whole pass has run over the store without the uploads.
    let orphan = format!("cutoff{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos());
    js.publish(subject::object_chunks(iu::CONTENT_BUCKET, &orphan)?, "cut off".into()).await?.await?;
    eventually(Duration::from_secs(60), "the orphaned chunks collected", || async {
        anyhow::ensure!(chunk_count(&js, &orphan).await? == 0, "still there");
        Ok(())
    })
    .await?;
    content_intact(&cim, &units).await.map_err(|e| e.context(cim.service(C).log()))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_brought_back_after_its_commit_cannot_take_its_content_with_it() -> Result<()> {
    let cim = start(&[]).await?;
    let (iu, js) = (cim.iu(), cim.js());
    let store = js.get_object_store(iu::CONTENT_BUCKET).await?;
    let mut units = Vec::new();
    let mut records = Vec::new();
    for i in 0..2 {
        let bytes = unit_bytes(i + 1);
        let (unit_id, cid, record) = commit_keeping_the_upload_record(&cim, &bytes, &format!("u{i}")).await?;
        units.push((unit_id, cid, bytes));
        records.push(record);
    }
    // Committed again while young: a duplicate, dropped without the chunks it shares.
    bring_back(&js, &records[0]).await?;
    let upload: async_nats::jetstream::object_store::ObjectInfo = serde_json::from_slice(&records[0].payload)?;
    let again = iu.commit(&upload.name).await?;
    assert!(again.deduplicated && again.cid == units[0].1, "{again:?}");
    assert!(store.info(&upload.name).await.is_err(), "the duplicate upload is gone");
    content_intact(&cim, &units[..1]).await?;
    // Brought back with its original age past the grace: the commit is refused.
    let mut old: serde_json::Value = serde_json::from_slice(&records[1].payload)?;
    old["mtime"] = serde_json::json!("2020-01-01T00:00:00Z");
    js.publish_with_headers(records[1].subject.clone(), records[1].headers.clone(), serde_json::to_vec(&old)?.into())
        .await?
        .await?;
    let name = old["name"].as_str().unwrap_or_default().to_string();
    assert!(store.info(&name).await.is_ok(), "{old}");
    let err = iu.commit(&name).await.unwrap_err();
    assert!(matches!(err, IuError::Conflict(_)) && err.to_string().contains("orphan grace"), "{err}");
    content_intact(&cim, &units).await
}

#[tokio::test(flavor = "multi_thread")]
async fn content_whose_chunks_are_gone_is_a_clear_error_within_the_timeout_and_a_new_upload_heals_it() -> Result<()> {
    let cim = start(&[]).await?;
    let (iu, js) = (cim.iu(), cim.js());
    let store = js.get_object_store(iu::CONTENT_BUCKET).await?;
    let stream = js.get_stream(resources::object_buckets(C)[0].stream_name()).await?;
    let lose_chunks = |cid: String| {
        let (store, stream) = (store.clone(), stream.clone());
        async move {
            let nuid = store.info(&cid).await?.nuid;
            stream.purge().filter(subject::object_chunks(iu::CONTENT_BUCKET, &nuid)?).await?;
            anyhow::Ok(())
        }
    };
    let (a, b) = (unit_bytes(3), unit_bytes(2));
    let ca = iu.put_bytes(&a).await?.cid;
    let ua = iu.create(create(&ca, "a")).await?;
    let cb = iu.put_bytes(&b).await?.cid;
    lose_chunks(ca.clone()).await?;
    lose_chunks(cb.clone()).await?;

    // `cimctl iu get` says what is wrong, within its timeout, instead of waiting for ever.
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("a.bin");
    let started = std::time::Instant::now();
    let got = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(crate::common::bin("cimctl"))
            .args(["iu", "--nats-url", cim.url(), "--timeout", "3", "get", &ua.unit_id, "-o"])
            .arg(&out)
            .output(),
    )
    .await
    .map_err(|_| anyhow::anyhow!("cimctl iu get --timeout 3 still running after 30 s"))??;
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&got.stderr);
    assert!(!got.status.success(), "{stderr}");
    assert!(took < Duration::from_secs(6), "took {took:?}");
    assert!(stderr.contains(&ca) && stderr.contains("0 of its") && stderr.contains("purged or lost"), "{stderr}");
    assert!(!out.exists(), "no partial download left");
    // The client reports it; the service checks for itself and quarantines the record.
    eventually(READY, "the lost content recorded and removed", || async {
        anyhow::ensure!(event_count(&js, &iu::content_event(&ca, iu::action::CORRUPTED)?).await? >= 1);
        anyhow::ensure!(store.info(&ca).await.is_err(), "record still there");
        Ok(())
    })
    .await?;
    let err = iu.get_bytes(&ca, None).await.unwrap_err();
    assert!(matches!(err, IuError::NotFound(_)), "{err}");
    // The same bytes uploaded again are stored again, whether or not anyone read the lost copy.
    let again = iu.put_bytes(&a).await?;
    assert!(again.cid == ca && !again.deduplicated, "{again:?}");
    assert_eq!(iu.get_bytes(&iu.unit(&ua.unit_id).await?.cid, None).await?, a);
    let again = iu.put_bytes(&b).await?;
    assert!(again.cid == cb && !again.deduplicated, "{again:?}");
    assert_eq!(iu.get_bytes(&cb, None).await?, b);
    Ok(())
}

/// A command writes its event and nothing else: the projector applies it after the reply.
/// The client that wrote still reads its own writes (queries ask for the sequence its
/// command got), and a version it was just answered with is accepted as expected, however far
/// the projection has got; a separate observer (`latest`) reads what the log holds.
#[tokio::test(flavor = "multi_thread")]
async fn commands_write_only_the_event_and_the_writer_reads_its_own_writes() -> Result<()> {
    let cim = CimFixture::builder().service(C).start().await?;
    let iu = cim.iu_own();
    let kv = cim.js().get_key_value(resources::kv_bucket(C, "units")?).await?;
    let c = iu.put_bytes(b"own writes").await?;
    let made = iu.create(create(&c.cid, "own")).await?;
    let key = iu::unit_key(&made.unit_id)?;
    let mut version = made.version;
    let mut projection_behind = 0;
    for i in 0..100u64 {
        // Tag and untag by turns (a unit holds at most 64 tags): a new version each time.
        let tag = format!("t{}", i - i % 2);
        let r = if i % 2 == 0 {
            iu.tag(TagUnit { header: header(version), unit_id: made.unit_id.clone(), tags: vec![tag.clone()] }).await?
        } else {
            iu.untag(UntagUnit { header: header(version), unit_id: made.unit_id.clone(), tags: vec![tag.clone()] })
                .await?
        };
        assert_eq!(r.version, version + 1, "change {i}");
        version = r.version;
        // What the projection holds right after the reply: never written by the command.
        let projected = match kv.get(&key).await? {
            Some(bytes) => Unit::decode(bytes)?.sequence,
            None => 0,
        };
        if projected < r.sequence {
            projection_behind += 1;
        }
        let unit = iu.unit(&made.unit_id).await?;
        assert_eq!((unit.version, unit.sequence), (r.version, r.sequence), "get after change {i}");
        assert_eq!(unit.tags.contains(&tag), i % 2 == 0, "{:?} after change {i}", unit.tags);
        if i % 10 == 0 {
            let listed = iu.list(ListUnits { tag: tag.clone(), ..Default::default() }).await?;
            assert_eq!(listed.units.len(), 1, "list after change {i}");
            assert_eq!(listed.units[0].version, r.version);
        }
    }
    assert!(projection_behind > 0, "the projection was never behind a reply: the command wrote it");
    // An observer that did not write reads the newest too.
    assert_eq!(cim.iu().unit(&made.unit_id).await?.version, version);
    // And the projector gets there.
    eventually(Duration::from_secs(10), "projection current", || async {
        let bytes = kv.get(&key).await?.ok_or_else(|| anyhow::anyhow!("not projected"))?;
        anyhow::ensure!(Unit::decode(bytes)?.version == version);
        Ok(())
    })
    .await?;
    Ok(())
}
