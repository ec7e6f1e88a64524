//! The client's mechanics against a real nats-server and a minimal stand-in for the
//! information-unit service (the real service is tested in `integration-tests`): streamed
//! upload + commit, verified and ranged download, corruption detection and reporting, error
//! replies, and retries that keep their request id.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_nats::{
    HeaderMap,
    service::{NATS_SERVICE_ERROR, NATS_SERVICE_ERROR_CODE},
};
use cim_events::{
    Cid, Component, Tier, iu,
    proto::iu::{
        CommandResult, CommitContent, ContentCommitted, CreateUnit, ProjectionStatus, ReportCorrupt, TagUnit,
    },
    resources,
};
use cim_iu_client::{IuClient, IuError, NoProgress, header, header_with_id};
use futures::StreamExt;
use prost::Message;
use tokio::io::AsyncReadExt;

#[derive(Default)]
struct Seen {
    create_ids: Vec<String>,
    tag_ids: Vec<String>,
    corrupt: Vec<ReportCorrupt>,
    status_body_len: Option<usize>,
}

async fn reply_error(client: &async_nats::Client, reply: async_nats::Subject, code: u16, text: &str) {
    let mut h = HeaderMap::new();
    h.insert(NATS_SERVICE_ERROR_CODE, code.to_string().as_str());
    h.insert(NATS_SERVICE_ERROR, text);
    client.publish_with_headers(reply, h, bytes::Bytes::new()).await.unwrap();
}

/// Serves commit, create, tag, report_corrupt and status like the real service would, as far
/// as the client can tell.
async fn fake_service(client: async_nats::Client, seen: Arc<Mutex<Seen>>) {
    let js = async_nats::jetstream::new(client.clone());
    let store = js.get_object_store(iu::CONTENT_BUCKET).await.unwrap();
    let mut subs = futures::stream::select_all(vec![
        client.subscribe(iu::command(iu::cmd::COMMIT).unwrap()).await.unwrap(),
        client.subscribe(iu::command(iu::cmd::CREATE).unwrap()).await.unwrap(),
        client.subscribe(iu::command(iu::cmd::TAG).unwrap()).await.unwrap(),
        client.subscribe(iu::command(iu::cmd::REPORT_CORRUPT).unwrap()).await.unwrap(),
        client.subscribe(iu::query(iu::qry::STATUS).unwrap()).await.unwrap(),
    ]);
    let mut results: HashMap<String, CommandResult> = HashMap::new();
    let mut tag_attempts = 0;
    while let Some(msg) = subs.next().await {
        let reply = msg.reply.clone().unwrap();
        let subject = msg.subject.to_string();
        if subject == iu::command(iu::cmd::COMMIT).unwrap() {
            let c = CommitContent::decode(msg.payload).unwrap();
            let Ok(mut obj) = store.get(&c.upload).await else {
                reply_error(&client, reply, 404, "no such upload").await;
                continue;
            };
            let mut bytes = Vec::new();
            obj.read_to_end(&mut bytes).await.unwrap();
            let cid = Cid::of(&bytes).to_string();
            let deduplicated = store.info(&cid).await.is_ok();
            if !deduplicated {
                store.put(cid.as_str(), &mut bytes.as_slice()).await.unwrap();
            }
            store.delete(&c.upload).await.unwrap();
            let r = ContentCommitted { cid, size: bytes.len() as u64, deduplicated };
            client.publish(reply, r.encode_to_vec().into()).await.unwrap();
        } else if subject == iu::command(iu::cmd::CREATE).unwrap() {
            let c = CreateUnit::decode(msg.payload).unwrap();
            let h = c.header.unwrap();
            seen.lock().unwrap().create_ids.push(h.request_id.clone());
            if c.name == "bad name" {
                reply_error(&client, reply, 400, "invalid name \"bad name\"").await;
                continue;
            }
            if h.expected_version == 99 {
                reply_error(&client, reply, 409, "expected version 99, unit is at 1").await;
                continue;
            }
            let r = match results.get(&h.request_id) {
                Some(r) => CommandResult { replayed: true, ..r.clone() },
                None => {
                    let r = CommandResult { unit_id: format!("u{}", results.len()), version: 1, cid: c.cid, replayed: false };
                    results.insert(h.request_id.clone(), r.clone());
                    r
                }
            };
            client.publish(reply, r.encode_to_vec().into()).await.unwrap();
        } else if subject == iu::command(iu::cmd::TAG).unwrap() {
            let t = TagUnit::decode(msg.payload).unwrap();
            seen.lock().unwrap().tag_ids.push(t.header.unwrap().request_id);
            tag_attempts += 1;
            match tag_attempts {
                1 => reply_error(&client, reply, 503, "projection rebuilding").await,
                2 => {} // no reply: the client times out and retries
                _ => {
                    let r = CommandResult { unit_id: t.unit_id, version: 2, ..Default::default() };
                    client.publish(reply, r.encode_to_vec().into()).await.unwrap();
                }
            }
        } else if subject == iu::command(iu::cmd::REPORT_CORRUPT).unwrap() {
            seen.lock().unwrap().corrupt.push(ReportCorrupt::decode(msg.payload).unwrap());
            client.publish(reply, bytes::Bytes::new()).await.unwrap();
        } else {
            seen.lock().unwrap().status_body_len = Some(msg.payload.len());
            let s = ProjectionStatus { stream_last_sequence: 5, checkpoint: 4, lag: 1, rebuilding: false, units: 2 };
            client.publish(reply, s.encode_to_vec().into()).await.unwrap();
        }
    }
}

#[tokio::test]
async fn client_mechanics_against_a_stand_in_service() {
    let server = cim_testkit::NatsServer::start().await.unwrap();
    let nats = server.connect().await;
    let js = async_nats::jetstream::new(nats.clone());
    for b in resources::object_buckets(Component::InformationUnit) {
        js.create_object_store(b.config(Tier::Leaf)).await.unwrap();
    }
    let client = IuClient::new(nats.clone()).timeout(Duration::from_millis(500));

    // Nobody serving yet: no responders, retried, then Unavailable.
    let e = client.clone().retry_delays(vec![Duration::from_millis(10)]).status().await.unwrap_err();
    assert!(e.is_unavailable(), "{e}");

    let seen = Arc::new(Mutex::new(Seen::default()));
    tokio::spawn(fake_service(server.connect().await, seen.clone()));
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Streamed upload of 3 MiB + 5 bytes with progress, then commit.
    let data: Vec<u8> = (0..3 * 1024 * 1024 + 5).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let mut last = 0;
    let mut progress = |n: u64| last = n;
    let committed = client.put_content(&data[..], &mut progress).await.unwrap();
    assert_eq!(last, data.len() as u64);
    assert_eq!(committed.cid, Cid::of(&data).to_string());
    assert_eq!(committed.size, data.len() as u64);
    assert!(!committed.deduplicated);
    assert!(client.put_bytes(&data).await.unwrap().deduplicated);

    // Verified download, whole and ranged; the writer only gets the range.
    assert_eq!(client.get_bytes(&committed.cid, None).await.unwrap(), data);
    let part = client.get_bytes(&committed.cid, Some((1_000_000, 1_300_007))).await.unwrap();
    assert_eq!(part, &data[1_000_000..1_300_007]);
    assert!(client.get_bytes(&committed.cid, Some((10, data.len() as u64 + 1))).await.unwrap_err().is_bad_request());
    assert_eq!(client.content_size(&committed.cid).await.unwrap(), data.len() as u64);
    assert!(client.get_bytes(&Cid::of(b"never stored").to_string(), None).await.unwrap_err().is_not_found());
    assert!(client.get_bytes("not-a-cid", None).await.unwrap_err().is_bad_request());

    // Content stored under a CID it does not match: detected, reported, never returned.
    let store = js.get_object_store(iu::CONTENT_BUCKET).await.unwrap();
    let lie = Cid::of(b"hello").to_string();
    store.put(lie.as_str(), &mut &b"hellp"[..]).await.unwrap();
    let mut out = Vec::new();
    let e = client.get_content(&lie, None, &mut out, &mut NoProgress).await.unwrap_err();
    assert!(e.is_corrupt(), "{e}");
    assert!(out.is_empty());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(seen.lock().unwrap().corrupt[0].cid, lie);

    // Commands: a request id is filled in; the same id replays; error codes map.
    let create = CreateUnit { cid: committed.cid.clone(), name: "a".into(), ..Default::default() };
    let r1 = client.create(create.clone()).await.unwrap();
    assert!(!r1.replayed);
    let again = CreateUnit { header: header_with_id("fixed-id", 0), ..create.clone() };
    let r2 = client.create(again.clone()).await.unwrap();
    let r3 = client.create(again).await.unwrap();
    assert!(r3.replayed);
    assert_eq!(r2.unit_id, r3.unit_id);
    {
        let seen = seen.lock().unwrap();
        uuid::Uuid::parse_str(&seen.create_ids[0]).unwrap();
        assert_eq!(seen.create_ids[1..], ["fixed-id".to_string(), "fixed-id".to_string()]);
    }
    let e = client.create(CreateUnit { name: "bad name".into(), ..create.clone() }).await.unwrap_err();
    assert!(e.is_bad_request() && e.to_string().contains("invalid name"), "{e}");
    let e = client.create(CreateUnit { header: header(99), ..create.clone() }).await.unwrap_err();
    assert!(e.is_conflict(), "{e}");

    // 503, then a timeout, then success: three attempts of one request id.
    let r = client.tag(TagUnit { header: header(1), unit_id: "u0".into(), tags: vec!["t".into()] }).await.unwrap();
    assert_eq!(r.version, 2);
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.tag_ids.len(), 3);
        assert!(seen.tag_ids.iter().all(|id| *id == seen.tag_ids[0]));
    }

    // status: empty request body.
    let s = client.status().await.unwrap();
    assert_eq!((s.lag, s.units), (1, 2));
    assert_eq!(seen.lock().unwrap().status_body_len, Some(0));

    // put_file: name and media type default from the path.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.md");
    std::fs::write(&path, b"# notes\n").unwrap();
    let (c, r) = client.put_file(&path, CreateUnit::default(), &mut NoProgress).await.unwrap();
    assert_eq!(c.cid, Cid::of(b"# notes\n").to_string());
    assert_eq!(r.cid, c.cid);
    let e = client.put_file(dir.path().join("missing"), CreateUnit::default(), &mut NoProgress).await.unwrap_err();
    assert!(matches!(e, IuError::Io(_)), "{e}");
}
