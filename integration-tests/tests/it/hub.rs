//! The integration hub as a real process against a real nats-server: signed webhooks become
//! events (or information units) with provenance; missing or wrong signatures, expired
//! timestamps, malformed and oversized payloads and repeated deliveries are refused or
//! ignored with a clear answer, and nothing else reaches the stream.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use async_nats::jetstream;
use cim_events::{
    Component, Envelope, Upcasters, hub, iu, payload::decode, proto::hub::WebhookReceived, resources, subject,
};
use cim_testkit::{eventually, stays_true_for};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{READY, ServiceProc, bin, is_event_of};
use crate::fixture::{CimFixture, Svc};

const C: Component = Component::IntegrationHub;
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

struct Response {
    status: u16,
    body: String,
}

/// `POST path` with `headers` over a raw TCP stream (`Connection: close`, read to EOF).
async fn post(addr: &str, path: &str, headers: &[(&str, String)], body: &[u8]) -> Result<Response> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let mut head =
        format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    // A server may answer (413) before reading the whole body; that is fine.
    let _ = stream.write_all(body).await;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status =
        text.split(' ').nth(1).and_then(|s| s.parse().ok()).with_context(|| format!("no status in {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok(Response { status, body })
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Standard Webhooks headers for one delivery signed with `secret`.
fn signed(secret: &str, id: &str, ts: i64, body: &[u8]) -> Vec<(&'static str, String)> {
    let key = hub::secret_key(secret).unwrap();
    vec![
        (hub::H_WEBHOOK_ID, id.to_string()),
        (hub::H_WEBHOOK_TIMESTAMP, ts.to_string()),
        (hub::H_WEBHOOK_SIGNATURE, hub::sign(&key, id, ts, body)),
        ("content-type", "application/json".to_string()),
    ]
}

/// `cim.evt.iu.unit.*.created`: what the outbound subscriptions and projections here follow.
fn units_created() -> String {
    subject::action_filter(Component::InformationUnit, iu::UNIT, iu::action::CREATED).expect("a valid filter")
}

/// Starts a hub with `config` and `env` in the fixture (one more process; a restart is a new
/// one), waits until it is ready and returns its webhook address ("" when no webhook source
/// is configured, then no port is opened).
async fn start_hub(cim: &mut CimFixture, config: &std::path::Path, env: &[(&str, &str)]) -> Result<String> {
    start_hub_with(cim, config, env, &[]).await
}

/// [`start_hub`] with more arguments.
async fn start_hub_with(
    cim: &mut CimFixture,
    config: &std::path::Path,
    env: &[(&str, &str)],
    args: &[&str],
) -> Result<String> {
    let config = config.to_str().context("config path")?;
    let mut all = vec!["--hub-config", config, "--hub-webhook-listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    cim.start(Svc::new(C).args(&all).envs(env)).await?;
    let reply = cim.client().request(hub::query(hub::qry::SOURCES)?, "".into()).await?;
    let listing: serde_json::Value = serde_json::from_slice(&reply.payload)?;
    Ok(listing["webhook_addr"].as_str().unwrap_or_default().to_string())
}

/// The hub started last, to stop or kill it.
fn hub_proc(cim: &mut CimFixture) -> &mut ServiceProc {
    cim.services_mut().iter_mut().rev().find(|s| s.component == C).expect("a hub was started")
}

/// The log of the hub started last.
fn hub_log(cim: &CimFixture) -> String {
    cim.services().iter().rev().find(|s| s.component == C).map(ServiceProc::log).unwrap_or_default()
}

async fn received(js: &jetstream::Context, source: &str) -> Result<Vec<(Envelope, WebhookReceived)>> {
    hub_events(js, hub::webhook_history(source)?).await
}

/// Every hub event on `filter`, decoded, in stream order.
async fn hub_events<P: cim_events::Payload>(js: &jetstream::Context, filter: String) -> Result<Vec<(Envelope, P)>> {
    let stream = js.get_stream(resources::events_stream(C).name).await?;
    let n = {
        let mut info = stream.info_with_subjects(&filter).await?;
        let mut n = 0;
        while let Some(s) = info.next().await {
            n += s?.1;
        }
        n
    };
    let mut out = Vec::new();
    if n == 0 {
        return Ok(out);
    }
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig { filter_subject: filter, ..Default::default() })
        .await?;
    let mut messages = consumer.messages().await?.take(n);
    while let Some(m) = messages.next().await {
        let m = m?;
        out.push(decode::<P>(m.headers.as_ref(), &m.payload, &Upcasters::empty())?);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn hub_webhooks_verify_signatures_deduplicate_and_refuse_bad_input() -> Result<()> {
    let mut cim = CimFixture::builder().start().await?;
    let dir = tempfile::tempdir()?;
    let secret_file = dir.path().join("shop.secret");
    std::fs::write(&secret_file, format!("{SECRET}\n"))?;
    let config = dir.path().join("hub.json");
    std::fs::write(
        &config,
        serde_json::json!({ "webhooks": [
            { "name": "shop", "secret_file": secret_file, "max_body_bytes": 1024, "tolerance_secs": 300 },
            { "name": "git", "secret_env": "CIM_TEST_GIT_SECRET", "content": "any" },
        ]})
        .to_string(),
    )?;
    let env = [("CIM_TEST_GIT_SECRET", "plain-text-secret")];
    let addr = start_hub(&mut cim, &config, &env).await?;
    let js = cim.js();
    let body = br#"{"order": 42}"#;

    // A signed delivery becomes one event, with its provenance.
    let ok = post(&addr, "/webhooks/shop", &signed(SECRET, "msg_1", now(), body), body).await?;
    assert_eq!(ok.status, 202, "{}", ok.body);
    let events = received(&js, "shop").await?;
    assert_eq!(events.len(), 1);
    let (envelope, event) = &events[0];
    assert!(envelope.is_root());
    assert_eq!(envelope.kind, <WebhookReceived as cim_events::Payload>::TYPE);
    assert_eq!(
        (event.source.as_str(), event.delivery_id.as_str(), event.body.as_slice()),
        ("shop", "msg_1", &body[..])
    );
    assert_eq!(event.content_type, "application/json");
    assert!(event.remote_addr.starts_with("127.0.0.1:"));
    assert_eq!(event.size, body.len() as u64);

    // The same delivery again is acknowledged as a duplicate and writes nothing.
    let again = post(&addr, "/webhooks/shop", &signed(SECRET, "msg_1", now(), body), body).await?;
    assert_eq!(again.status, 200, "{}", again.body);
    assert!(again.body.contains("duplicate"), "{}", again.body);

    // Bad input: each refused with a clear status and reason.
    let mut missing = signed(SECRET, "msg_2", now(), body);
    missing.retain(|(k, _)| *k != hub::H_WEBHOOK_SIGNATURE);
    let r = post(&addr, "/webhooks/shop", &missing, body).await?;
    assert_eq!((r.status, r.body.contains("missing webhook-signature")), (401, true), "{}", r.body);
    let r = post(&addr, "/webhooks/shop", &signed("whsec_b3RoZXIgc2VjcmV0", "msg_2", now(), body), body).await?;
    assert_eq!((r.status, r.body.contains("no valid v1 signature")), (401, true), "{}", r.body);
    let tampered = br#"{"order": 43}"#;
    let r = post(&addr, "/webhooks/shop", &signed(SECRET, "msg_2", now(), body), tampered).await?;
    assert_eq!(r.status, 401, "{}", r.body);
    let r = post(&addr, "/webhooks/shop", &signed(SECRET, "msg_2", now() - 600, body), body).await?;
    assert_eq!((r.status, r.body.contains("tolerance")), (401, true), "{}", r.body);
    let r = post(&addr, "/webhooks/shop", &signed(SECRET, "msg_2", now() + 600, body), body).await?;
    assert_eq!(r.status, 401, "{}", r.body);
    let malformed = b"{\"order\": ";
    let r = post(&addr, "/webhooks/shop", &signed(SECRET, "msg_2", now(), malformed), malformed).await?;
    assert_eq!((r.status, r.body.contains("not valid JSON")), (400, true), "{}", r.body);
    let big = format!("{{\"pad\": \"{}\"}}", "x".repeat(2000));
    let r = post(&addr, "/webhooks/shop", &signed(SECRET, "msg_2", now(), big.as_bytes()), big.as_bytes()).await?;
    assert_eq!((r.status, r.body.contains("larger than 1024 bytes")), (413, true), "{}", r.body);
    let r = post(&addr, "/webhooks/nope", &signed(SECRET, "msg_2", now(), body), body).await?;
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(received(&js, "shop").await?.len(), 1, "refused deliveries write nothing");

    // Refusals lose nothing: the sender's corrected retry of msg_2 is accepted.
    let r = post(&addr, "/webhooks/shop", &signed(SECRET, "msg_2", now(), body), body).await?;
    assert_eq!(r.status, 202, "{}", r.body);

    // A source whose secret comes from the environment, taking any content.
    let raw = b"plain text, not JSON";
    let r = post(&addr, "/webhooks/git", &signed("plain-text-secret", "g1", now(), raw), raw).await?;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(received(&js, "git").await?[0].1.body, raw);

    // De-duplication survives a restart of the hub.
    hub_proc(&mut cim).terminate(Duration::from_secs(10)).await?;
    let addr = start_hub(&mut cim, &config, &env).await?;
    let r = post(&addr, "/webhooks/shop", &signed(SECRET, "msg_1", now(), body), body).await?;
    assert_eq!((r.status, r.body.contains("duplicate")), (200, true), "{}", r.body);
    assert_eq!(received(&js, "shop").await?.len(), 2);

    // Secrets never reach the log.
    let log = hub_log(&cim);
    assert!(!log.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw") && !log.contains("plain-text-secret"), "{log}");
    Ok(())
}

/// A delivery whose event was written by a hub that died before answering, retried by the
/// sender (re-signed, as Standard Webhooks senders do) at once and again after the retry
/// horizon (the events stream's duplicate window) has closed: one event, both retries answered
/// as duplicates of it. The delivery-id index is kept from the log, not written on the path.
#[tokio::test(flavor = "multi_thread")]
async fn hub_webhook_retried_after_a_crash_and_the_window_is_one_delivery() -> Result<()> {
    const HORIZON: Duration = Duration::from_secs(3);
    let horizon = ["--retry-horizon", "3s"];
    let mut cim = CimFixture::builder().start().await?;
    let dir = tempfile::tempdir()?;
    let secret_file = dir.path().join("shop.secret");
    std::fs::write(&secret_file, SECRET)?;
    let config = dir.path().join("hub.json");
    std::fs::write(
        &config,
        serde_json::json!({ "webhooks": [{ "name": "shop", "secret_file": secret_file }] }).to_string(),
    )?;
    let addr =
        start_hub_with(&mut cim, &config, &[(cim_runtime::crash::ENV, "hub.webhook.published")], &horizon).await?;
    let body = br#"{"order": 7}"#;

    // The event is written, the hub dies before it answers.
    let sent = std::time::Instant::now();
    let lost = post(&addr, "/webhooks/shop", &signed(SECRET, "crash-1", now(), body), body).await;
    assert!(lost.as_ref().map_or(true, |r| r.status >= 500), "the armed hub answered: {:?}", lost.map(|r| r.body));
    hub_proc(&mut cim).wait(Duration::from_secs(30)).await?;
    let addr = start_hub_with(&mut cim, &config, &[], &horizon).await?;

    let retry = || async {
        eventually!(Duration::from_secs(30), "the retry answered", {
            let r = post(&addr, "/webhooks/shop", &signed(SECRET, "crash-1", now(), body), body).await?;
            anyhow::ensure!(r.status < 500, "{} {}", r.status, r.body);
            Ok(r)
        })
    };
    let first = retry().await?;
    assert_eq!((first.status, first.body.contains("duplicate")), (200, true), "{}", first.body);
    tokio::time::sleep_until((sent + HORIZON + Duration::from_millis(1500)).into()).await;
    let later = retry().await?;
    assert_eq!((later.status, later.body.contains("duplicate")), (200, true), "{}", later.body);

    let events = received(&cim.js(), "shop").await?;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].1.delivery_id, "crash-1");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn hub_webhook_payloads_can_become_units() -> Result<()> {
    let mut cim = CimFixture::with([Component::InformationUnit]).await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("hub.json");
    std::fs::write(
        &config,
        serde_json::json!({ "webhooks": [{ "name": "docs", "secret_env": "CIM_TEST_DOCS_SECRET", "target": "unit", "tags": ["inbox"] }] }).to_string(),
    )?;
    let addr = start_hub(&mut cim, &config, &[("CIM_TEST_DOCS_SECRET", SECRET)]).await?;
    let body = br#"{"title": "minutes"}"#;
    let r = post(&addr, "/webhooks/docs", &signed(SECRET, "d-1", now(), body), body).await?;
    assert_eq!(r.status, 202, "{}", r.body);
    let answer: serde_json::Value = serde_json::from_str(&r.body)?;
    let unit_id = answer["unit_id"].as_str().context("unit_id")?.to_string();

    let iu = cim.iu();
    let unit = eventually(READY, "the unit is projected", || async { Ok(iu.unit(&unit_id).await?) }).await?;
    assert_eq!(unit.tags, vec!["inbox".to_string()]);
    assert_eq!(unit.attributes.get("hub_source").map(String::as_str), Some("docs"));
    assert_eq!(unit.attributes.get("hub_delivery_id").map(String::as_str), Some("d-1"));
    assert_eq!(iu.get_bytes(&unit.cid, None).await?, body);

    let r = post(&addr, "/webhooks/docs", &signed(SECRET, "d-1", now(), body), body).await?;
    assert_eq!((r.status, r.body.contains("duplicate")), (200, true), "{}", r.body);
    let js = cim.js();
    let events = received(&js, "docs").await?;
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].1.unit_id.as_str(), events[0].1.body.len()), (unit_id.as_str(), 0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn hub_refuses_a_bad_configuration_file_with_exit_64() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("hub.json");
    std::fs::write(&config, r#"{"webhooks": [{"name": "x", "secret_env": "CIM_TEST_UNSET_SECRET"}]}"#)?;
    let out = tokio::process::Command::new(bin(C.service_name()))
        .args(["--nats-url", "nats://127.0.0.1:1", "--hub-config", config.to_str().unwrap()])
        .env_remove("CIM_TEST_UNSET_SECRET")
        .output()
        .await?;
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CIM_TEST_UNSET_SECRET is not set"), "{err}");
    Ok(())
}

// ---- outbound subscriptions, against a real HTTP receiver started here ----

/// What the receiver does with the next request.
#[derive(Clone, Debug)]
enum Act {
    Status(u16),
    /// Never answers (the hub's attempt times out).
    Hang,
    /// `302 Found` to this location.
    Redirect(String),
}

/// A request as the receiver saw it.
#[derive(Clone, Debug)]
struct Seen {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// A raw HTTP/1.1 receiver on loopback: follows a script of answers (then 200), records
/// every request it read in full.
#[derive(Clone)]
struct Receiver {
    addr: std::net::SocketAddr,
    script: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<Act>>>,
    seen: std::sync::Arc<std::sync::Mutex<Vec<Seen>>>,
}

impl Receiver {
    async fn start(ip: &str, script: Vec<Act>) -> Result<Receiver> {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await?;
        let r = Receiver {
            addr: listener.local_addr()?,
            script: std::sync::Arc::new(std::sync::Mutex::new(script.into())),
            seen: Default::default(),
        };
        let me = r.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(me.clone().serve(conn));
            }
        });
        Ok(r)
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    async fn serve(self, mut conn: tokio::net::TcpStream) {
        loop {
            let mut raw = Vec::new();
            let mut buf = [0u8; 8192];
            let head_end = loop {
                if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                    break p;
                }
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => raw.extend_from_slice(&buf[..n]),
                }
            };
            let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
            let headers: Vec<(String, String)> = head
                .lines()
                .skip(1)
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            let len: usize =
                headers.iter().find(|(k, _)| k == "content-length").and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
            let mut body = raw[head_end + 4..].to_vec();
            while body.len() < len {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => body.extend_from_slice(&buf[..n]),
                }
            }
            self.seen.lock().unwrap().push(Seen { headers, body });
            let act = self.script.lock().unwrap().pop_front().unwrap_or(Act::Status(200));
            let answer = match act {
                Act::Status(s) => format!("HTTP/1.1 {s} X\r\nContent-Length: 0\r\n\r\n"),
                Act::Redirect(to) => format!("HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\n\r\n"),
                Act::Hang => {
                    std::future::pending::<()>().await;
                    return;
                }
            };
            if conn.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    }
}

/// The stream the subscriptions read: information-unit events, published here directly.
async fn iu_stream(js: &jetstream::Context) -> Result<()> {
    js.get_or_create_stream(resources::events_stream(Component::InformationUnit).config(cim_events::Tier::Leaf))
        .await?;
    Ok(())
}

/// Publishes one `unit created` event; returns its envelope id.
async fn publish_unit(js: &jetstream::Context, n: u32) -> Result<String> {
    use cim_events::proto::iu::UnitCreated;
    let env = Envelope::root::<UnitCreated>("test");
    let payload = UnitCreated { unit_id: format!("u{n}"), name: format!("unit {n}"), ..Default::default() };
    let (headers, body) = cim_events::payload::encode(&env, &payload);
    js.publish_with_headers(
        cim_events::iu::unit_event(&format!("u{n}"), cim_events::iu::action::CREATED)?,
        headers,
        body,
    )
    .await?
    .await?;
    Ok(env.id().to_string())
}

fn hub_config(dir: &std::path::Path, allow: &[&str], subs: serde_json::Value) -> Result<std::path::PathBuf> {
    let config = dir.join("hub.json");
    std::fs::write(&config, serde_json::json!({ "outbound_allow": allow, "subscriptions": subs }).to_string())?;
    Ok(config)
}

fn sub(name: &str, url: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut s = serde_json::json!({ "name": name, "filter": &units_created(), "url": url, "secret_env": "CIM_TEST_OUT_SECRET", "deliver": "all", "backoff_ms": 50, "max_backoff_ms": 200, "timeout_ms": 1000 });
    for (k, v) in extra.as_object().unwrap() {
        s[k] = v.clone();
    }
    s
}

const OUT_ENV: [(&str, &str); 1] = [("CIM_TEST_OUT_SECRET", SECRET)];

async fn request_json(
    client: &async_nats::Client,
    subject: String,
    body: serde_json::Value,
) -> Result<serde_json::Value> {
    let reply = client.request(subject, body.to_string().into()).await?;
    Ok(serde_json::from_slice(&reply.payload)?)
}

async fn deliveries(client: &async_nats::Client, name: &str) -> Result<Vec<serde_json::Value>> {
    let v = request_json(
        client,
        hub::query(hub::qry::DELIVERIES)?,
        serde_json::json!({ "subscription": name, "limit": 100 }),
    )
    .await?;
    Ok(v["deliveries"].as_array().cloned().unwrap_or_default())
}

/// The distinct `webhook-id`s the receiver accepted (answered 2xx is not visible here, so: all
/// ids in arrival order, repeats removed).
fn distinct_ids(seen: &[Seen]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in seen {
        let id = s.header(hub::H_WEBHOOK_ID).unwrap_or_default().to_string();
        if out.last() != Some(&id) {
            out.push(id);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn hub_outbound_retries_in_order_signs_and_pauses() -> Result<()> {
    let mut cim = CimFixture::builder().start().await?;
    let client = cim.client().clone();
    let js = jetstream::new(client.clone());
    iu_stream(&js).await?;
    // First event: 500, then no answer (timeout), then 404, then accepted on the 4th attempt.
    let rx = Receiver::start("127.0.0.1", vec![Act::Status(500), Act::Hang, Act::Status(404)]).await?;
    let dir = tempfile::tempdir()?;
    let config = hub_config(
        dir.path(),
        &["127.0.0.1/32"],
        serde_json::json!([sub("crm", &rx.url(), serde_json::json!({ "max_attempts": 6 }))]),
    )?;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(publish_unit(&js, n).await?);
    }
    start_hub(&mut cim, &config, &OUT_ENV).await?;

    let log = eventually(READY, "five deliveries logged", || async {
        let log = deliveries(&client, "crm").await?;
        anyhow::ensure!(log.len() == 5, "{} logged", log.len());
        Ok(log)
    })
    .await?;
    assert_eq!(log[0]["attempts"], 4, "{log:?}");
    assert!(log.iter().all(|d| d["delivered"] == true), "{log:?}");
    let seen = rx.seen();
    assert_eq!(seen.len(), 8, "3 failed attempts + 5 deliveries");
    assert_eq!(distinct_ids(&seen), ids, "delivered in stream order, each with its envelope id");
    let key = hub::secret_key(SECRET)?;
    for s in &seen {
        hub::verify(
            &key,
            s.header(hub::H_WEBHOOK_ID),
            s.header(hub::H_WEBHOOK_TIMESTAMP),
            s.header(hub::H_WEBHOOK_SIGNATURE),
            &s.body,
            now(),
            Duration::from_secs(60),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        assert_eq!(s.header("ce-type"), Some("cim.iu.unit.created"));
        assert!(is_event_of(s.header(hub::H_CIM_SUBJECT).unwrap(), Component::InformationUnit, iu::UNIT));
    }

    // Paused: new events wait (pending), nothing is sent; resumed: they arrive, in order.
    let pause =
        cim_events::proto::hub::SubscriptionCommand { subscription: "crm".into(), reason: "maintenance".into() };
    let r = client.request(hub::command(hub::cmd::PAUSE)?, prost::Message::encode_to_vec(&pause).into()).await?;
    let state: cim_events::proto::hub::SubscriptionStateChanged = prost::Message::decode(r.payload)?;
    assert!(state.paused);
    let before = rx.seen().len();
    let mut more = Vec::new();
    for n in 5..7 {
        more.push(publish_unit(&js, n).await?);
    }
    eventually(READY, "two events pending while paused", || async {
        let v = request_json(&client, hub::query(hub::qry::SUBSCRIPTIONS)?, serde_json::json!({})).await?;
        let s = &v["subscriptions"][0];
        anyhow::ensure!(s["paused"] == true && s["pending"] == 2, "{s}");
        Ok(())
    })
    .await?;
    assert_eq!(rx.seen().len(), before, "nothing delivered while paused");
    let r = client.request(hub::command(hub::cmd::RESUME)?, prost::Message::encode_to_vec(&pause).into()).await?;
    let state: cim_events::proto::hub::SubscriptionStateChanged = prost::Message::decode(r.payload)?;
    assert!(!state.paused);
    eventually(READY, "the paused events delivered after resume", || async {
        anyhow::ensure!(deliveries(&client, "crm").await?.len() == 7);
        Ok(())
    })
    .await?;
    assert_eq!(distinct_ids(&rx.seen()[before..]), more);

    // Unknown subscriptions are a clear 404.
    let bad = cim_events::proto::hub::SubscriptionCommand { subscription: "nope".into(), reason: String::new() };
    let r = client.request(hub::command(hub::cmd::PAUSE)?, prost::Message::encode_to_vec(&bad).into()).await?;
    assert_eq!(r.headers.as_ref().and_then(|h| h.get("Nats-Service-Error-Code")).map(|v| v.as_str()), Some("404"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn hub_outbound_dead_letters_after_the_budget_and_refuses_disallowed_redirects() -> Result<()> {
    let mut cim = CimFixture::builder().start().await?;
    let client = cim.client().clone();
    let js = jetstream::new(client.clone());
    iu_stream(&js).await?;
    // A target on a disallowed address (127.0.0.2 is loopback too, but not on the list).
    let forbidden = Receiver::start("127.0.0.2", vec![]).await?;
    let redirecting = Receiver::start("127.0.0.1", vec![Act::Redirect(forbidden.url())]).await?;
    let down = format!("http://127.0.0.1:{}/hook", cim_testkit::free_port());
    let dir = tempfile::tempdir()?;
    let config = hub_config(
        dir.path(),
        &["127.0.0.1"],
        serde_json::json!([
            sub("down", &down, serde_json::json!({ "max_attempts": 3 })),
            sub("redir", &redirecting.url(), serde_json::json!({ "max_attempts": 5 })),
        ]),
    )?;
    let id = publish_unit(&js, 1).await?;
    start_hub(&mut cim, &config, &OUT_ENV).await?;

    for (name, attempts, error) in
        [("down", 3, "error sending request"), ("redir", 1, "redirect refused: address 127.0.0.2 is not allowed")]
    {
        let log = eventually(READY, &format!("{name} dead-lettered"), || async {
            let log = deliveries(&client, name).await?;
            anyhow::ensure!(log.len() == 1, "{log:?}");
            Ok(log)
        })
        .await?;
        assert_eq!(log[0]["delivered"], false);
        assert_eq!(log[0]["attempts"], attempts, "{name}: {log:?}");
        assert!(log[0]["last_error"].as_str().unwrap().contains(error), "{name}: {log:?}");
        // The dead letter keeps the event as it was, with the last error.
        let dlq = js.get_stream(resources::dead_letter_stream(C).name).await?;
        let m = dlq.get_last_raw_message_by_subject(&hub::outbound_dead_letter(name)?).await?;
        let reason = m.headers.get(hub::H_DEAD_LETTER_REASON).map(|v| v.to_string()).unwrap_or_default();
        assert!(reason.contains(error), "{reason}");
        assert_eq!(m.headers.get(cim_events::envelope::H_ID).map(|v| v.to_string()), Some(id.clone()));
    }
    assert_eq!(redirecting.seen().len(), 1);
    assert!(forbidden.seen().is_empty(), "nothing reached the disallowed address");
    assert!(!hub_log(&cim).contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn hub_outbound_resumes_after_a_crash_mid_delivery_without_loss() -> Result<()> {
    let mut cim = CimFixture::builder().start().await?;
    let client = cim.client().clone();
    let js = jetstream::new(client.clone());
    iu_stream(&js).await?;
    let rx = Receiver::start("127.0.0.1", vec![Act::Hang]).await?;
    let dir = tempfile::tempdir()?;
    // The hub is killed while the first delivery hangs (inside its 3 s attempt timeout).
    let config = hub_config(
        dir.path(),
        &["127.0.0.1"],
        serde_json::json!([sub("crm", &rx.url(), serde_json::json!({ "timeout_ms": 3000 }))]),
    )?;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(publish_unit(&js, n).await?);
    }
    start_hub(&mut cim, &config, &OUT_ENV).await?;
    eventually(READY, "the first delivery in flight", || async {
        anyhow::ensure!(rx.seen().len() == 1);
        Ok(())
    })
    .await?;
    hub_proc(&mut cim).signal(nix::sys::signal::Signal::SIGKILL);
    hub_proc(&mut cim).wait(Duration::from_secs(10)).await?;
    // The unacknowledged event comes back to the new instance once the consumer's ack wait
    // (attempt timeout plus a margin) has passed.
    start_hub(&mut cim, &config, &OUT_ENV).await?;
    eventually(Duration::from_secs(120), "all three delivered after the restart", || async {
        anyhow::ensure!(deliveries(&client, "crm").await?.len() == 3);
        Ok(())
    })
    .await?;
    assert_eq!(distinct_ids(&rx.seen()), ids, "in order, the interrupted one again, none lost");
    Ok(())
}

async fn cimctl(cim: &CimFixture, args: &[&str]) -> Result<(bool, String, String)> {
    let out = tokio::process::Command::new(bin("cimctl")).env("CIM_NATS_URL", cim.url()).args(args).output().await?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn hub_cimctl_integration_adds_lists_pauses_and_shows_deliveries() -> Result<()> {
    let mut cim = CimFixture::builder().start().await?;
    let js = cim.js();
    iu_stream(&js).await?;
    let rx = Receiver::start("127.0.0.1", vec![]).await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("hub.json");
    let cfg = config.to_str().unwrap();
    let url = rx.url();
    let add = [
        "integration",
        "add",
        "--config",
        cfg,
        "subscription",
        "--name",
        "crm",
        "--filter",
        &units_created(),
        "--url",
        &url,
        "--secret-env",
        "CIM_TEST_OUT_SECRET",
        "--deliver",
        "all",
    ];
    // Without an allow-list entry the target is refused and the file is not written.
    let (ok, _, err) = cimctl(&cim, &add).await?;
    assert!(!ok && err.contains("is not allowed"), "{err}");
    assert!(!config.exists());
    let (ok, _, err) = cimctl(&cim, &[&add[..], &["--allow", "127.0.0.1"]].concat()).await?;
    assert!(ok, "{err}");
    let (ok, _, err) = cimctl(
        &cim,
        &["integration", "add", "--config", cfg, "webhook", "--name", "shop", "--secret-env", "CIM_TEST_OUT_SECRET"],
    )
    .await?;
    assert!(ok, "{err}");

    let id = publish_unit(&js, 1).await?;
    start_hub(&mut cim, &config, &OUT_ENV).await?;
    eventually(READY, "delivered", || async {
        anyhow::ensure!(distinct_ids(&rx.seen()) == vec![id.clone()]);
        Ok(())
    })
    .await?;
    let (ok, out, err) = cimctl(&cim, &["integration", "list", "--json"]).await?;
    assert!(ok, "{err}");
    let list: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(list["webhooks"][0]["name"], "shop");
    assert_eq!(list["subscriptions"][0]["name"], "crm");
    let (ok, out, err) = cimctl(&cim, &["integration", "pause", "crm"]).await?;
    assert!(ok && out.contains("crm paused"), "{out}{err}");
    let (ok, out, _) = cimctl(&cim, &["integration", "list"]).await?;
    assert!(ok && out.contains("paused"), "{out}");
    let (ok, out, err) = cimctl(&cim, &["integration", "resume", "crm"]).await?;
    assert!(ok && out.contains("crm resumed"), "{out}{err}");
    let (ok, out, err) = cimctl(&cim, &["integration", "deliveries", "crm", "--json"]).await?;
    assert!(ok, "{err}");
    let log: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(log["deliveries"][0]["event_id"], id.as_str());
    assert_eq!(log["deliveries"][0]["delivered"], true);
    let (ok, _, err) = cimctl(&cim, &["integration", "pause", "nope"]).await?;
    assert!(!ok && err.contains("unknown subscription"), "{err}");
    Ok(())
}

// ---- PostgreSQL connector, against the PostgreSQL this machine runs on 127.0.0.1:5432 ----

const PG_URL: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test";

/// Runs SQL with `psql`; returns the unaligned, tuples-only output.
async fn psql(sql: &str) -> Result<String> {
    let out = tokio::process::Command::new("psql")
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-v", "ON_ERROR_STOP=1", "-Atc", sql])
        .output()
        .await
        .context("running psql")?;
    anyhow::ensure!(out.status.success(), "psql {sql:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn hub_postgres_connector_projects_events_into_a_table_and_table_changes_into_events() -> Result<()> {
    let mut cim = CimFixture::builder().start().await?;
    let js = cim.js();
    iu_stream(&js).await?;
    // Names unique to this run: the database is shared.
    let tag = format!("{}_{}", std::process::id(), now());
    let (events_table, orders, connector) =
        (format!("hub_it_events_{tag}"), format!("hub_it_orders_{tag}"), format!("pg{tag}").replace('_', ""));
    psql(&format!("CREATE TABLE {orders} (id int PRIMARY KEY, item text NOT NULL)")).await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("hub.json");
    std::fs::write(
        &config,
        serde_json::json!({ "postgres": [{
            "name": connector, "url_env": "CIM_TEST_PG_URL",
            "project": { "filter": &units_created(), "table": events_table, "deliver": "all" },
            "watch": [orders], "poll_ms": 50,
        }]})
        .to_string(),
    )?;
    let env = [("CIM_TEST_PG_URL", PG_URL)];
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(publish_unit(&js, n).await?);
    }
    start_hub(&mut cim, &config, &env).await?;

    // Events → rows, in stream order, with their envelope.
    let rows = eventually(READY, "three events projected", || async {
        let rows = psql(&format!("SELECT seq, subject, type, event_id FROM {events_table} ORDER BY seq")).await?;
        anyhow::ensure!(rows.lines().count() == 3, "{rows}");
        Ok(rows)
    })
    .await?;
    let got: Vec<String> = rows.lines().map(|l| l.split('|').nth(3).unwrap_or_default().to_string()).collect();
    assert_eq!(got, ids);
    assert!(rows.lines().all(|l| l.contains("|cim.iu.unit.created|")), "{rows}");

    // Table changes → events, in order, with the row.
    psql(&format!("INSERT INTO {orders} VALUES (1, 'tea'), (2, 'cake'); UPDATE {orders} SET item = 'green tea' WHERE id = 1; DELETE FROM {orders} WHERE id = 2")).await?;
    let changes = eventually(READY, "four row changes as events", || async {
        let out: Vec<cim_events::proto::hub::TableChanged> =
            hub_events(&js, hub::table_changed(&connector)?).await?.into_iter().map(|(_, c)| c).collect();
        anyhow::ensure!(out.len() == 4, "{} changes", out.len());
        Ok(out)
    })
    .await?;
    let ops: Vec<&str> = changes.iter().map(|c| c.op.as_str()).collect();
    assert_eq!(ops, ["INSERT", "INSERT", "UPDATE", "DELETE"]);
    assert!(changes.iter().all(|c| c.table == orders));
    let row: serde_json::Value = serde_json::from_str(&changes[2].row_json)?;
    assert_eq!(row, serde_json::json!({ "id": 1, "item": "green tea" }));
    assert!(changes.windows(2).all(|w| w[0].outbox_id < w[1].outbox_id));
    eventually(READY, "the outbox drained", || async {
        anyhow::ensure!(psql(&format!("SELECT count(*) FROM cim_outbox_{connector}")).await? == "0");
        Ok(())
    })
    .await?;

    // A restart writes no row twice and picks up where it stopped.
    hub_proc(&mut cim).terminate(Duration::from_secs(10)).await?;
    ids.push(publish_unit(&js, 3).await?);
    start_hub(&mut cim, &config, &env).await?;
    eventually(READY, "the fourth event projected once", || async {
        let n = psql(&format!("SELECT count(*), count(DISTINCT seq) FROM {events_table}")).await?;
        anyhow::ensure!(n == "4|4", "{n}");
        Ok(())
    })
    .await?;
    assert!(!hub_log(&cim).contains("dbname=test"), "the connection string stays out of the log");
    psql(&format!("DROP TABLE {orders}; DROP TABLE {events_table}; DROP TABLE cim_outbox_{connector}; DROP FUNCTION cim_outbox_{connector}_capture()")).await?;
    Ok(())
}

// ---- PostgreSQL connector across a restart of a PostgreSQL of the test's own ----

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// `runuser -u postgres -- <PG_BIN>/<tool> args…`: initdb and postgres refuse to run as root.
fn as_postgres(tool: &str, args: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new("runuser");
    c.args(["-u", "postgres", "--", &format!("{PG_BIN}/{tool}")]).args(args);
    c
}

/// A PostgreSQL of this test only: a fresh cluster in a temporary directory, run by the
/// `postgres` OS user on its own loopback port, socket in the directory. It may be stopped and
/// started at will; it is stopped (immediately) when dropped. The machine's shared server on
/// 5432 is never touched.
struct PrivatePostgres {
    dir: tempfile::TempDir,
    port: u16,
}

impl PrivatePostgres {
    async fn start() -> Result<PrivatePostgres> {
        let dir = tempfile::Builder::new().prefix("cim-it-pg").tempdir_in("/tmp")?;
        let out = std::process::Command::new("chown").arg("postgres:postgres").arg(dir.path()).output()?;
        anyhow::ensure!(out.status.success(), "chown: {}", String::from_utf8_lossy(&out.stderr));
        std::fs::create_dir(dir.path().join("sock"))?;
        std::process::Command::new("chown").arg("postgres:postgres").arg(dir.path().join("sock")).output()?;
        let data = dir.path().join("data");
        let out = tokio::process::Command::from(as_postgres(
            "initdb",
            &["-D", data.to_str().unwrap(), "-A", "trust", "-U", "postgres", "--no-sync"],
        ))
        .output()
        .await
        .context("running initdb")?;
        anyhow::ensure!(
            out.status.success(),
            "initdb: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let pg = PrivatePostgres { dir, port: cim_testkit::free_port() };
        pg.up().await?;
        Ok(pg)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").to_string_lossy().into_owned()
    }

    /// Starts the server and waits until it accepts connections.
    async fn up(&self) -> Result<()> {
        let opts =
            format!("-p {} -k {} -c listen_addresses=127.0.0.1", self.port, self.dir.path().join("sock").display());
        let log = self.dir.path().join("postgres.log");
        let out = tokio::process::Command::from(as_postgres(
            "pg_ctl",
            &["-D", &self.data(), "-l", log.to_str().unwrap(), "-o", &opts, "-w", "-t", "60", "start"],
        ))
        .output()
        .await?;
        anyhow::ensure!(
            out.status.success(),
            "pg_ctl start: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Ok(())
    }

    /// Stops the server the hard way (`-m immediate`: every connection cut, no checkpoint, crash
    /// recovery at the next start), like a crash or a power cut of the database host.
    async fn kill(&self) -> Result<()> {
        let out = tokio::process::Command::from(as_postgres(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        ))
        .output()
        .await?;
        anyhow::ensure!(out.status.success(), "pg_ctl stop: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }

    fn url(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname=postgres", self.port)
    }

    async fn psql(&self, sql: &str) -> Result<String> {
        let out = tokio::process::Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-Atc",
                sql,
            ])
            .output()
            .await
            .context("running psql")?;
        anyhow::ensure!(out.status.success(), "psql {sql:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = as_postgres("pg_ctl", &["-D", &self.data(), "-m", "immediate", "-w", "stop"]).output();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hub_postgres_connector_loses_and_repeats_nothing_across_a_database_restart() -> Result<()> {
    let pg = std::sync::Arc::new(PrivatePostgres::start().await?);
    let mut cim = CimFixture::builder().start().await?;
    let js = cim.js();
    iu_stream(&js).await?;
    pg.psql("CREATE TABLE orders (id int PRIMARY KEY, item text NOT NULL)").await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("hub.json");
    std::fs::write(
        &config,
        serde_json::json!({ "postgres": [{
            "name": "erp", "url_env": "CIM_TEST_PG_URL",
            "project": { "filter": &units_created(), "table": "cim_iu_events", "deliver": "all" },
            "watch": ["orders"], "poll_ms": 20,
        }]})
        .to_string(),
    )?;
    let url = pg.url();
    let env = [("CIM_TEST_PG_URL", url.as_str())];
    start_hub(&mut cim, &config, &env).await?;

    // Both ways at once: events published into the stream, rows inserted into the table (each
    // insert retried until PostgreSQL confirms it; ON CONFLICT keeps a retry of an insert whose
    // commit was not confirmed from inserting twice).
    let publisher = {
        let js = js.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in 0..80 {
                ids.push(publish_unit(&js, n).await?);
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            anyhow::Ok(ids)
        })
    };
    let writer = {
        let pg = pg.clone();
        tokio::spawn(async move {
            for id in 1..=40 {
                let insert = format!("INSERT INTO orders VALUES ({id}, 'item {id}') ON CONFLICT DO NOTHING");
                eventually(LONG_PG, &format!("row {id} inserted"), || async { pg.psql(&insert).await.map(|_| ()) })
                    .await?;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            anyhow::Ok(())
        })
    };
    let changes = |js: jetstream::Context| async move {
        let out: Vec<cim_events::proto::hub::TableChanged> =
            hub_events(&js, hub::table_changed("erp")?).await?.into_iter().map(|(_, c)| c).collect();
        anyhow::Ok(out)
    };
    // Mid-stream: some rows and some changes have made it, more are on the way.
    eventually(READY, "both directions flowing", || async {
        let rows: usize = pg.psql("SELECT count(*) FROM cim_iu_events").await?.parse()?;
        let moved = changes(js.clone()).await?.len();
        anyhow::ensure!(rows >= 5 && moved >= 5, "{rows} rows, {moved} changes");
        Ok(())
    })
    .await?;
    pg.kill().await?;
    assert!(!publisher.is_finished() && !writer.is_finished(), "stopped mid-stream");
    // Down: more events arrive (the publisher goes on, and ten more after it).
    let mut ids = publisher.await??;
    for n in 100..110 {
        ids.push(publish_unit(&js, n).await?);
    }
    let waiting = || async {
        let stream = js.get_stream(resources::events_stream(Component::InformationUnit).name).await?;
        let info = stream.consumer_info(hub::projection_consumer("erp")?).await?;
        let down_rows = info.num_pending + info.num_ack_pending as u64;
        anyhow::ensure!(down_rows >= 10, "{down_rows} events waiting");
        Ok(())
    };
    // The database stays down for two seconds, and the events wait for it all along.
    stays_true_for(Duration::from_secs(2), "events waiting for the database", waiting).await?;
    pg.up().await?;
    // Back: the writer finishes, then rows are updated, inserted and deleted.
    writer.await??;
    pg.psql("UPDATE orders SET item = item || ' (changed)' WHERE id <= 5").await?;
    pg.psql("INSERT INTO orders VALUES (100, 'late'), (101, 'later'); DELETE FROM orders WHERE id = 100").await?;

    // Events → rows: every event exactly once, in stream order.
    let rows = eventually(LONG_PG, "every event projected", || async {
        let rows = pg.psql("SELECT event_id FROM cim_iu_events ORDER BY seq").await?;
        anyhow::ensure!(rows.lines().count() >= ids.len(), "{} of {} rows", rows.lines().count(), ids.len());
        Ok(rows)
    })
    .await?;
    let got: Vec<&str> = rows.lines().collect();
    assert_eq!(got, ids.iter().map(String::as_str).collect::<Vec<_>>(), "every event once, in order");

    // Table changes → events: every change exactly once, in outbox order.
    let mut expected: Vec<(String, i64)> = (1..=40).map(|id| ("INSERT".to_string(), id)).collect();
    expected.extend((1..=5).map(|id| ("UPDATE".to_string(), id)));
    expected.extend([("INSERT".to_string(), 100), ("INSERT".to_string(), 101), ("DELETE".to_string(), 100)]);
    let got = eventually(LONG_PG, "every row change as an event", || async {
        let got = changes(js.clone()).await?;
        anyhow::ensure!(got.len() >= expected.len(), "{} of {} changes", got.len(), expected.len());
        Ok(got)
    })
    .await?;
    // No late repeat shows itself.
    stays_true_for(Duration::from_secs(1), "no late repeats", || async {
        let again = changes(js.clone()).await?.len();
        anyhow::ensure!(again == got.len(), "{again} changes, {} before", got.len());
        Ok(())
    })
    .await?;
    assert!(
        got.windows(2).all(|w| w[0].outbox_id < w[1].outbox_id),
        "in outbox order, none repeated: {:?}",
        got.iter().map(|c| c.outbox_id).collect::<Vec<_>>()
    );
    let seen: Vec<(String, i64)> = got
        .iter()
        .map(|c| {
            let row: serde_json::Value = serde_json::from_str(&c.row_json).unwrap_or_default();
            (c.op.clone(), row["id"].as_i64().unwrap_or(-1))
        })
        .collect();
    assert_eq!(seen, expected);
    eventually(READY, "the outbox drained", || async {
        anyhow::ensure!(pg.psql("SELECT count(*) FROM cim_outbox_erp").await? == "0");
        Ok(())
    })
    .await?;
    let log = hub_log(&cim);
    assert!(log.contains("retrying"), "the hub saw the outage:\n{log}");
    assert!(!log.contains("dbname=postgres"), "the connection string stays out of the log");
    Ok(())
}

/// Long enough for a reconnect and the redelivery of events handed out before the outage.
const LONG_PG: Duration = Duration::from_secs(90);

// ---- MQTT connector, against our own Mosquitto (the system one is never restarted) ----

/// A Mosquitto of this test: loopback, anonymous, persistent sessions in `dir`.
struct Mosquitto {
    child: tokio::process::Child,
}

impl Mosquitto {
    async fn start(dir: &std::path::Path, port: u16) -> Result<Mosquitto> {
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\n",
                dir.display()
            ),
        )?;
        let child = tokio::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting mosquitto")?;
        eventually(READY, "mosquitto listening", || async {
            Ok(tokio::net::TcpStream::connect(("127.0.0.1", port)).await?)
        })
        .await?;
        Ok(Mosquitto { child })
    }

    /// SIGTERM (sessions are saved), then wait for the exit.
    async fn stop(mut self) -> Result<()> {
        if let Some(pid) = self.child.id() {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM)?;
        }
        tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await??;
        Ok(())
    }
}

/// `mosquitto_sub` with a persistent session (`-c -i`), printing payloads in hex, one a line.
struct Sub {
    _child: tokio::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Sub {
    async fn start(port: u16, topic: &str) -> Result<Sub> {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-t",
                topic,
                "-q",
                "1",
                "-c",
                "-i",
                "cim-it-sub",
                "-F",
                "%x",
            ])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let lines: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
        let out = child.stdout.take().context("stdout")?;
        let l = lines.clone();
        tokio::spawn(async move {
            let mut r = tokio::io::BufReader::new(out).lines();
            while let Ok(Some(line)) = r.next_line().await {
                l.lock().unwrap().push(line);
            }
        });
        Ok(Sub { _child: child, lines })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn mqtt_pub(port: u16, topic: &str, message: &str) -> Result<()> {
    let out = tokio::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", topic, "-q", "1", "-m", message])
        .output()
        .await?;
    anyhow::ensure!(out.status.success(), "mosquitto_pub: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// A hub whose MQTT connector `plant` subscribes to `sensors/#` and publishes unit creations
/// to `cim/units`, on a Mosquitto of its own, with a persistent subscriber to `cim/units`
/// whose session exists before anything is published.
struct MqttHub {
    cim: CimFixture,
    js: jetstream::Context,
    dir: tempfile::TempDir,
    port: u16,
    broker: Mosquitto,
    sub: Sub,
}

impl MqttHub {
    async fn start() -> Result<MqttHub> {
        let mut cim = CimFixture::builder().start().await?;
        let js = cim.js();
        iu_stream(&js).await?;
        let dir = tempfile::tempdir()?;
        let port = cim_testkit::free_port();
        let broker = Mosquitto::start(dir.path(), port).await?;
        let sub = Sub::start(port, "cim/units").await?;
        let config = dir.path().join("hub.json");
        std::fs::write(
            &config,
            serde_json::json!({ "mqtt": [{
                "name": "plant", "host": "127.0.0.1", "port": port, "subscribe": ["sensors/#"],
                "publish": { "filter": &units_created(), "topic": "cim/units", "deliver": "all" },
            }]})
            .to_string(),
        )?;
        start_hub(&mut cim, &config, &[]).await?;
        Ok(MqttHub { cim, js, dir, port, broker, sub })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hub_mqtt_connector_both_ways_across_a_broker_restart() -> Result<()> {
    let MqttHub { cim: _cim, js, dir, port, broker, sub } = MqttHub::start().await?;

    // Events → topic, in order, payload as stored.
    let mut payloads = Vec::new();
    for n in 0..2 {
        publish_unit(&js, n).await?;
        payloads.push(
            js.get_stream(resources::events_stream(Component::InformationUnit).name)
                .await?
                .get_last_raw_message_by_subject(&cim_events::iu::unit_event(
                    &format!("u{n}"),
                    cim_events::iu::action::CREATED,
                )?)
                .await?
                .payload,
        );
    }
    eventually(READY, "two events on the topic", || async {
        anyhow::ensure!(sub.lines.lock().unwrap().len() >= 2);
        Ok(())
    })
    .await?;
    assert_eq!(sub.lines.lock().unwrap()[..2], [hex(&payloads[0]), hex(&payloads[1])]);

    // Topic → events, wait until the hub has subscribed (its first message arrives).
    eventually(READY, "a sensor message as an event", || async {
        mqtt_pub(port, "sensors/t1", "21.5").await?;
        let got: Vec<(Envelope, cim_events::proto::hub::MqttReceived)> =
            hub_events(&js, hub::mqtt_received("plant")?).await?;
        anyhow::ensure!(!got.is_empty());
        assert_eq!((got[0].1.topic.as_str(), got[0].1.payload.as_slice()), ("sensors/t1", &b"21.5"[..]));
        Ok(())
    })
    .await?;

    // The broker restarts mid-stream: events published meanwhile reach the topic afterwards.
    drop(sub);
    broker.stop().await?;
    for n in 2..4 {
        publish_unit(&js, n).await?;
        payloads.push(
            js.get_stream(resources::events_stream(Component::InformationUnit).name)
                .await?
                .get_last_raw_message_by_subject(&cim_events::iu::unit_event(
                    &format!("u{n}"),
                    cim_events::iu::action::CREATED,
                )?)
                .await?
                .payload,
        );
    }
    let _broker = Mosquitto::start(dir.path(), port).await?;
    let sub = Sub::start(port, "cim/units").await?;
    eventually(READY, "the events published while the broker was down", || async {
        let lines = sub.lines.lock().unwrap().clone();
        anyhow::ensure!(
            lines.contains(&hex(&payloads[2])) && lines.contains(&hex(&payloads[3])),
            "{} lines",
            lines.len()
        );
        let at = |p: &bytes::Bytes| lines.iter().position(|l| *l == hex(p)).unwrap();
        assert!(at(&payloads[2]) < at(&payloads[3]), "in order");
        Ok(())
    })
    .await?;
    eventually(READY, "sensor messages flow again after the restart", || async {
        mqtt_pub(port, "sensors/t2", "22.0").await?;
        let got: Vec<(Envelope, cim_events::proto::hub::MqttReceived)> =
            hub_events(&js, hub::mqtt_received("plant")?).await?;
        anyhow::ensure!(got.iter().any(|(_, m)| m.topic == "sensors/t2"));
        Ok(())
    })
    .await?;
    Ok(())
}

/// `mosquitto_pub -f`: one QoS 1 message with the bytes of a file.
async fn mqtt_pub_file(port: u16, topic: &str, bytes: &[u8]) -> Result<()> {
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), bytes)?;
    let out = tokio::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", topic, "-q", "1", "-f"])
        .arg(file.path())
        .output()
        .await?;
    anyhow::ensure!(out.status.success(), "mosquitto_pub: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// Messages larger than the MQTT client's old 10 KiB packet limit go both ways (before, one made
/// the connection drop and the broker sent it again for ever), and one too large to keep as an
/// event is dead-lettered with its topic and acknowledged: the messages after it still flow.
#[tokio::test(flavor = "multi_thread")]
async fn hub_mqtt_carries_large_messages_and_dead_letters_what_no_event_can_hold() -> Result<()> {
    let MqttHub { cim: _cim, js, dir: _dir, port, broker: _broker, sub } = MqttHub::start().await?;

    // Events → topic: a 100 KiB event arrives whole.
    let big: Vec<u8> = (0..100 * 1024).map(|i| (i % 253) as u8).collect();
    js.publish(cim_events::iu::unit_event("big", cim_events::iu::action::CREATED)?, big.clone().into()).await?.await?;
    eventually(READY, "the 100 KiB event on the topic", || async {
        anyhow::ensure!(sub.lines.lock().unwrap().contains(&hex(&big)), "not yet");
        Ok(())
    })
    .await?;

    // Topic → events: 50 KiB kept whole; 2 MiB (more than an event may hold) dead-lettered with
    // its topic; a small message after it still arrives.
    let fifty: Vec<u8> = (0..50 * 1024).map(|i| (i % 251) as u8).collect();
    eventually(READY, "the 50 KiB message as an event", || async {
        mqtt_pub_file(port, "sensors/big", &fifty).await?;
        let got: Vec<(Envelope, cim_events::proto::hub::MqttReceived)> =
            hub_events(&js, hub::mqtt_received("plant")?).await?;
        anyhow::ensure!(got.iter().any(|(_, m)| m.topic == "sensors/big" && m.payload == fifty), "not yet");
        Ok(())
    })
    .await?;
    let huge = vec![7u8; 2 * 1024 * 1024];
    mqtt_pub_file(port, "sensors/huge", &huge).await?;
    eventually(READY, "a small message after the huge one", || async {
        mqtt_pub(port, "sensors/after", "1").await?;
        let got: Vec<(Envelope, cim_events::proto::hub::MqttReceived)> =
            hub_events(&js, hub::mqtt_received("plant")?).await?;
        anyhow::ensure!(got.iter().any(|(_, m)| m.topic == "sensors/after"), "not yet");
        Ok(())
    })
    .await?;
    let dlq = js.get_stream(resources::dead_letter_stream(C).name).await?;
    let parked = dlq.get_last_raw_message_by_subject(&hub::mqtt_dead_letter("plant")?).await?;
    let header = |k: &str| parked.headers.get(k).map(|v| v.as_str().to_string()).unwrap_or_default();
    assert_eq!(header(hub::H_MQTT_TOPIC), "sensors/huge");
    assert!(
        header(hub::H_DEAD_LETTER_REASON).contains(&huge.len().to_string()),
        "{}",
        header(hub::H_DEAD_LETTER_REASON)
    );
    Ok(())
}

// ---- S3 import, against a real S3 server (s3s-fs) ----

#[tokio::test(flavor = "multi_thread")]
async fn hub_s3_import_turns_new_objects_into_units_once() -> Result<()> {
    use cim_archive::{Credentials, S3Client, Target};
    let s3 = cim_testkit::S3Server::start().await?;
    let bucket = S3Client::new(Target {
        name: "inbox".into(),
        endpoint: s3.endpoint(),
        region: s3.region().to_string(),
        bucket: "inbox".into(),
        prefix: String::new(),
        path_style: true,
        credentials: Credentials::new(s3.access_key(), s3.secret_key()),
        signing_key_file: None,
    })?;
    bucket.ensure_bucket().await?;
    bucket.put("scans/a.txt", bytes::Bytes::from_static(b"first scan")).await?;
    bucket.put("other/ignored.txt", bytes::Bytes::from_static(b"not under the prefix")).await?;

    let mut cim = CimFixture::with([Component::InformationUnit]).await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("hub.json");
    std::fs::write(
        &config,
        serde_json::json!({ "s3_import": [{
            "name": "scans", "endpoint": s3.endpoint(), "region": s3.region(), "bucket": "inbox", "prefix": "scans/",
            "access_key_env": "CIM_TEST_S3_ACCESS", "secret_key_env": "CIM_TEST_S3_SECRET", "poll_ms": 100, "tags": ["scanned"],
        }]})
        .to_string(),
    )?;
    let env = [("CIM_TEST_S3_ACCESS", s3.access_key()), ("CIM_TEST_S3_SECRET", s3.secret_key())];
    start_hub(&mut cim, &config, &env).await?;
    let js = cim.js();
    let iu = cim.iu();
    let imported = |n: usize| {
        let js = js.clone();
        async move {
            eventually(READY, &format!("{n} objects imported"), || async {
                let got: Vec<(Envelope, cim_events::proto::hub::S3ObjectImported)> =
                    hub_events(&js, hub::s3_imported("scans")?).await?;
                anyhow::ensure!(got.len() >= n, "{} imported", got.len());
                Ok(got.into_iter().map(|(_, e)| e).collect::<Vec<_>>())
            })
            .await
        }
    };
    let first = imported(1).await?;
    assert_eq!(first[0].key, "scans/a.txt");
    let unit = eventually(READY, "the unit is projected", || async { Ok(iu.unit(&first[0].unit_id).await?) }).await?;
    assert_eq!(iu.get_bytes(&unit.cid, None).await?, b"first scan");
    assert_eq!((unit.name.as_str(), unit.media_type.as_str()), ("a.txt", "text/plain"));
    assert_eq!(unit.attributes.get("hub_s3_key").map(String::as_str), Some("scans/a.txt"));
    assert_eq!(unit.tags, vec!["scanned".to_string()]);

    // A new object is imported; the old one is not imported again, not even after a restart.
    bucket.put("scans/b.txt", bytes::Bytes::from_static(b"second scan")).await?;
    let two = imported(2).await?;
    assert_eq!(two[1].key, "scans/b.txt");
    hub_proc(&mut cim).terminate(Duration::from_secs(10)).await?;
    bucket.put("scans/c.txt", bytes::Bytes::from_static(b"third scan")).await?;
    start_hub(&mut cim, &config, &env).await?;
    let three = imported(3).await?;
    let keys: Vec<&str> = three.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["scans/a.txt", "scans/b.txt", "scans/c.txt"]);
    assert!(!hub_log(&cim).contains(s3.secret_key()), "the secret key stays out of the log");
    Ok(())
}

// ---- the hub under exactly the NATS permissions `cimctl deploy nats-permissions` generates ----

#[tokio::test(flavor = "multi_thread")]
async fn hub_runs_with_its_generated_nats_permissions() -> Result<()> {
    let mut cim = CimFixture::builder().generated_permissions().service(Component::InformationUnit).start().await?;
    let client = cim.client().clone();
    let dir = tempfile::tempdir()?;
    let pg = PrivatePostgres::start().await?;

    // A webhook into units, a subscription and a PostgreSQL projection on unit events.
    let rx = Receiver::start("127.0.0.1", vec![]).await?;
    let config = dir.path().join("hub.json");
    std::fs::write(
        &config,
        serde_json::json!({
            "webhooks": [{ "name": "docs", "secret_env": "CIM_TEST_DOCS_SECRET", "target": "unit", "tags": ["inbox"] }],
            "outbound_allow": ["127.0.0.1"],
            "subscriptions": [sub("crm", &rx.url(), serde_json::json!({}))],
            "postgres": [{ "name": "erp", "url_env": "CIM_TEST_PG_URL",
                "project": { "filter": &units_created(), "table": "cim_iu_events", "deliver": "all" } }],
        })
        .to_string(),
    )?;
    let url = pg.url();
    cim.start(
        Svc::new(C)
            .args(&["--hub-config", config.to_str().unwrap(), "--hub-webhook-listen", "127.0.0.1:0"])
            .envs(&[
                ("CIM_TEST_DOCS_SECRET", SECRET),
                ("CIM_TEST_OUT_SECRET", SECRET),
                ("CIM_TEST_PG_URL", url.as_str()),
            ])
            .own_identity(),
    )
    .await?;
    let listing = request_json(&client, hub::query(hub::qry::SOURCES)?, serde_json::json!({})).await?;
    let addr = listing["webhook_addr"].as_str().context("webhook_addr")?.to_string();

    // Webhook → unit (content upload and the create command, as the hub's own identity).
    let body = br#"{"title": "permitted"}"#;
    let r = post(&addr, "/webhooks/docs", &signed(SECRET, "p-1", now(), body), body).await?;
    assert_eq!(r.status, 202, "{}\n{}", r.body, hub_log(&cim));
    let answer: serde_json::Value = serde_json::from_str(&r.body)?;
    let unit_id = answer["unit_id"].as_str().context("unit_id")?.to_string();
    let iu = cim.iu();
    let unit = eventually(READY, "the unit is projected", || async { Ok(iu.unit(&unit_id).await?) }).await?;
    assert_eq!(iu.get_bytes(&unit.cid, None).await?, body);

    // The unit's event → the subscription (durable consumer on the information unit's stream)
    // and the projection.
    eventually(READY, "the unit event delivered", || async {
        let seen = rx.seen();
        anyhow::ensure!(
            seen.iter().any(|s| s.header(hub::H_CIM_SUBJECT).is_some_and(|h| h.contains(&unit_id))),
            "{} requests\n{}",
            seen.len(),
            hub_log(&cim)
        );
        Ok(())
    })
    .await?;
    let log = eventually(READY, "the delivery logged", || async {
        let log = deliveries(&client, "crm").await?;
        anyhow::ensure!(log.len() == 1, "{log:?}");
        Ok(log)
    })
    .await?;
    assert_eq!(log[0]["delivered"], true);
    eventually(READY, "the unit event projected", || async {
        let n = pg.psql("SELECT count(*) FROM cim_iu_events WHERE subject LIKE '%.created'").await?;
        anyhow::ensure!(n == "1", "{n}\n{}", hub_log(&cim));
        Ok(())
    })
    .await?;

    // Pause and resume (events the hub writes and follows), and the pending count.
    let pause =
        cim_events::proto::hub::SubscriptionCommand { subscription: "crm".into(), reason: "maintenance".into() };
    let r = client.request(hub::command(hub::cmd::PAUSE)?, prost::Message::encode_to_vec(&pause).into()).await?;
    let state: cim_events::proto::hub::SubscriptionStateChanged = prost::Message::decode(r.payload)?;
    assert!(state.paused);
    let v = request_json(&client, hub::query(hub::qry::SUBSCRIPTIONS)?, serde_json::json!({})).await?;
    assert_eq!(v["subscriptions"][0]["pending"], 0, "{v}");
    client.request(hub::command(hub::cmd::RESUME)?, prost::Message::encode_to_vec(&pause).into()).await?;

    let status = hub_proc(&mut cim).terminate(Duration::from_secs(30)).await?;
    let log = hub_log(&cim);
    assert!(status.success(), "integration-hub exited {status}:\n{log}");
    assert!(!log.to_lowercase().contains("permissions violation"), "integration-hub hit its permissions:\n{log}");
    let server_log = std::fs::read_to_string(cim.server().log_path()).unwrap_or_default();
    assert!(!server_log.to_lowercase().contains("violation"), "the server refused something:\n{server_log}");
    Ok(())
}
