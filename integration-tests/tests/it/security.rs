//! Least privilege against a compromised service: each service's generated NATS identity
//! (`nixos-modules/nats-permissions.json`) used as an attacker holding its credentials would use
//! it. Every attempt to purge, delete, reconfigure or delete messages of a stream it does not
//! own, to shorten its own history, or to read replies meant for others must be refused by the
//! server, and the streams must be as they were.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context as _, Result, ensure};
use bytes::Bytes;
use cim_events::proto::iu::CreateUnit;
use cim_events::{Component, resources, subject};
use cim_testkit::eventually;
use futures::{StreamExt as _, TryStreamExt as _};

use crate::fixture::{CimFixture, LEAF_DOMAIN, Svc};

/// How long a refused request is given to be answered anyway. A permitted JetStream API request
/// answers in milliseconds; the stream states checked afterwards catch a slow one.
const REFUSAL_WAIT: Duration = Duration::from_secs(3);
/// How long nothing may arrive on an inbox an identity may not read.
const QUIET: Duration = Duration::from_millis(500);
/// Deadline for the server's log to name the refusals.
const LOG_DEADLINE: Duration = Duration::from_secs(20);

/// The JetStream API calls that destroy or rewrite what a stream holds, and a body for each.
fn destructive(config: &async_nats::jetstream::stream::Config) -> Result<Vec<(&'static str, Bytes)>> {
    let mut shortened = config.clone();
    shortened.max_messages = 1;
    Ok(vec![
        ("STREAM.PURGE", Bytes::from_static(b"{}")),
        ("STREAM.DELETE", Bytes::new()),
        ("STREAM.UPDATE", serde_json::to_vec(&shortened)?.into()),
        ("STREAM.MSG.DELETE", Bytes::from_static(br#"{"seq":1}"#)),
    ])
}

/// What a stream looks like to the admin: its message limit, first sequence and count.
#[derive(Clone, Debug, PartialEq)]
struct Shape {
    max_messages: i64,
    first: u64,
    messages: u64,
}

async fn shapes(js: &async_nats::jetstream::Context) -> Result<BTreeMap<String, Shape>> {
    let names: Vec<String> = js.stream_names().try_collect().await?;
    let mut out = BTreeMap::new();
    for name in names {
        let info = js.get_stream(&name).await?.info().await?.clone();
        out.insert(
            name,
            Shape {
                max_messages: info.config.max_messages,
                first: info.state.first_sequence,
                messages: info.state.messages,
            },
        );
    }
    Ok(out)
}

/// Gateway API tokens, one per `(name, role)`: their secrets.
async fn tokens(fx: &CimFixture, wanted: &[(&str, &str)]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (name, role) in wanted {
        out.push(fx.token(name, role).await?.1);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn no_service_identity_can_destroy_history_or_read_replies_meant_for_others() -> Result<()> {
    let gateway = format!("127.0.0.1:{}", cim_testkit::free_port());
    let fx = CimFixture::builder()
        .generated_permissions()
        .service(Svc::new(Component::InformationUnit).own_identity())
        .service(Svc::new(Component::Registry).own_identity())
        .service(Svc::new(Component::PluginHost).own_identity())
        .service(Svc::new(Component::StorageManager).own_identity())
        .service(Svc::new(Component::PipelineEngine).own_identity())
        .service(
            Svc::new(Component::UiGateway)
                .args(&["--gateway-listen", &gateway, "--gateway-grpc-listen", "off"])
                .own_identity(),
        )
        .service(Svc::new(Component::IntegrationHub).own_identity())
        .start()
        .await?;
    // Something in the unit history and the content bucket.
    let iu = fx.iu();
    let content = iu.put_bytes(b"kept whatever happens").await?;
    let unit = iu
        .create(CreateUnit {
            cid: content.cid,
            name: "kept.txt".into(),
            media_type: "text/plain".into(),
            ..Default::default()
        })
        .await?;
    let js = fx.js();
    let before = shapes(&js).await?;
    let content_stream = resources::object_buckets(Component::InformationUnit)[0].stream_name();
    ensure!(before.contains_key(&content_stream), "no content stream in {before:?}");

    let mut attackers = Vec::new();
    for c in Component::ALL {
        attackers.push((c, fx.connect_as(c).await?));
    }

    // 1. Destroying or rewriting any stream but the dead letters and buckets it owns, its own
    //    event history included.
    let mut attempts = Vec::new();
    for (c, (client, _)) in &attackers {
        let own_events = resources::events_stream(*c).name;
        let owned: Vec<String> =
            cim_runtime::provision::owned_stream_names(*c).into_iter().filter(|s| *s != own_events).collect();
        for stream in before.keys().filter(|s| !owned.contains(s)) {
            let config = js.get_stream(stream).await?.info().await?.config.clone();
            for (op, body) in destructive(&config)? {
                let subject = format!("$JS.{LEAF_DOMAIN}.API.{op}.{stream}");
                let client = client.clone();
                attempts.push(async move {
                    let reply = tokio::time::timeout(REFUSAL_WAIT, client.request(subject.clone(), body)).await;
                    match reply {
                        Ok(Ok(m)) => Some(format!("{c} {subject}: {}", String::from_utf8_lossy(&m.payload))),
                        _ => None,
                    }
                });
            }
        }
    }
    let tried = attempts.len();
    let answered: Vec<String> = futures::future::join_all(attempts).await.into_iter().flatten().collect();
    ensure!(
        answered.is_empty(),
        "{} of {tried} destructive requests were answered:\n{}",
        answered.len(),
        answered.join("\n")
    );

    // The server refused them (rather than nobody answering): each identity's violations are
    // in its log.
    let log_path = fx.server().log_path().to_path_buf();
    for (c, (_, key)) in &attackers {
        eventually(LOG_DEADLINE, &format!("{c}'s refused purges in the server log"), || async {
            let log = std::fs::read_to_string(&log_path)?;
            let refused = log
                .lines()
                .filter(|l| l.contains(key.as_str()) && l.contains("Publish Violation") && l.contains("STREAM.PURGE"))
                .count();
            ensure!(refused > 0, "no purge refused for {c}");
            Ok(())
        })
        .await?;
    }
    // Every stream is still there with its limits; histories and content lost nothing.
    let after = shapes(&js).await?;
    for (name, was) in &before {
        let now = after.get(name).with_context(|| format!("stream {name} was deleted"))?;
        ensure!(now.max_messages == was.max_messages, "{name}'s limit changed: {was:?} -> {now:?}");
        let append_only =
            *name == content_stream || Component::ALL.iter().any(|c| resources::events_stream(*c).name == *name);
        if append_only {
            ensure!(now.first == was.first && now.messages >= was.messages, "{name} lost messages: {was:?} -> {now:?}");
        }
    }
    ensure!(iu.unit(&unit.unit_id).await?.name == "kept.txt");

    // 2. Replies: no identity may listen to the account's inboxes or another service's.
    let probe = fx.client().clone();
    for (c, (client, key)) in &attackers {
        let other = Component::ALL.into_iter().find(|o| o != c).context("another component")?;
        let theirs = format!("{}.>", subject::inbox_prefix(other));
        let mut everything = client.subscribe(subject::all_inboxes()).await?;
        let mut others = client.subscribe(theirs.clone()).await?;
        let own_prefix = subject::inbox_prefix(*c);
        let mut own = client.subscribe(format!("{own_prefix}.>")).await?;
        client.flush().await?;
        eventually(LOG_DEADLINE, &format!("{c}'s refused inbox subscriptions in the server log"), || async {
            let log = std::fs::read_to_string(&log_path)?;
            let refused = |what: &str| {
                log.lines()
                    .any(|l| l.contains(key.as_str()) && l.contains("Subscription Violation") && l.contains(what))
            };
            ensure!(refused(&subject::all_inboxes()) && refused(&theirs), "not yet refused");
            Ok(())
        })
        .await?;
        // A reply to the admin (a unit get) and a message into the other service's inbox...
        probe.publish(format!("{}.probe", subject::inbox_prefix(other)), "secret".into()).await?;
        iu.unit(&unit.unit_id).await?;
        // ...while the identity's own inbox still works.
        // (The service running as this identity gets its own replies there too.)
        let yours = format!("{own_prefix}.probe-{}", uuid::Uuid::new_v4().simple());
        probe.publish(yours.clone(), "yours".into()).await?;
        probe.flush().await?;
        tokio::time::timeout(LOG_DEADLINE, async {
            while let Some(m) = own.next().await {
                if m.subject.as_str() == yours {
                    return Ok(());
                }
            }
            anyhow::bail!("own inbox closed")
        })
        .await??;
        let leaked = tokio::time::timeout(QUIET, futures::future::select(everything.next(), others.next())).await;
        ensure!(leaked.is_err(), "{c} read a reply meant for someone else");
    }
    Ok(())
}

/// Request ids are idempotency keys; one a gRPC caller chooses is its own. Another writer
/// choosing the same id (or a service's predictable one, `hub-webhook-…`) gets its own effect,
/// never the first caller's answer, and a caller's retry is still answered with its first result.
#[tokio::test(flavor = "multi_thread")]
async fn a_caller_cannot_claim_another_callers_request_ids() -> Result<()> {
    use cim_events::proto::iu::{CommandHeader, TagUnit};
    use ui_gateway::grpc::proto::gateway_client::GatewayClient;

    let grpc = format!("127.0.0.1:{}", cim_testkit::free_port());
    let http = format!("127.0.0.1:{}", cim_testkit::free_port());
    let fx = CimFixture::builder()
        .service(Component::InformationUnit)
        .service(Svc::new(Component::UiGateway).args(&["--gateway-listen", &http, "--gateway-grpc-listen", &grpc]))
        .start()
        .await?;
    let tokens = tokens(&fx, &[("alice", "writer"), ("mallory", "writer")]).await?;
    let iu = fx.iu();
    let mut units = Vec::new();
    for name in ["alice.txt", "mallory.txt"] {
        let c = iu.put_bytes(name.as_bytes()).await?;
        let unit = CreateUnit { cid: c.cid, name: name.into(), media_type: "text/plain".into(), ..Default::default() };
        units.push(iu.create(unit).await?.unit_id);
    }
    let channel = eventually(LOG_DEADLINE, "grpc port open", || async {
        Ok(tonic::transport::Channel::from_shared(format!("http://{grpc}"))?.connect().await?)
    })
    .await?;
    let mut client = GatewayClient::new(channel);
    let tag = |unit: &str, tag: &str, token: &str| {
        let mut r = tonic::Request::new(TagUnit {
            header: Some(CommandHeader { request_id: "hub-webhook-shared-1".into(), expected_version: 0 }),
            unit_id: unit.to_string(),
            tags: vec![tag.to_string()],
        });
        r.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("metadata"));
        r
    };
    let first = client.tag(tag(&units[0], "alice", &tokens[0])).await?.into_inner();
    let other = client.tag(tag(&units[1], "mallory", &tokens[1])).await?.into_inner();
    ensure!(other.unit_id == units[1], "mallory was answered with alice's result: {other:?}");
    ensure!(iu.unit(&units[1]).await?.tags.contains(&"mallory".to_string()), "mallory's tag was dropped");
    // Alice's retry is answered with her first result, and tags nothing twice.
    let retry = client.tag(tag(&units[0], "alice", &tokens[0])).await?.into_inner();
    ensure!(retry.sequence == first.sequence, "a retry made a second event: {first:?} vs {retry:?}");
    Ok(())
}

/// A range of content is never sent before the whole content is known to match its CID: the
/// digest covers the whole object, so damage after the range must fail the read before any
/// byte of the range is written (a 206 with bytes the store cannot vouch for, before).
#[tokio::test(flavor = "multi_thread")]
async fn a_range_of_damaged_content_is_refused_before_any_byte_is_sent() -> Result<()> {
    use async_nats::jetstream::consumer::pull::OrderedConfig;

    let fx = CimFixture::builder().service(Component::InformationUnit).start().await?;
    let iu = fx.iu();
    let content: Vec<u8> = (0..3 * cim_iu_client::DEFAULT_CHUNK_SIZE).map(|i| (i % 251) as u8).collect();
    let put = iu.put_bytes(&content).await?;
    // An intact range reads, and the same range of a fresh client too.
    ensure!(iu.get_bytes(&put.cid, Some((0, 10))).await? == content[..10]);

    // Damage the last chunk: delete it and store a changed copy in its place (last on its subject).
    let js = fx.js();
    let store = js.get_object_store(cim_events::iu::CONTENT_BUCKET).await?;
    let info = store.info(put.cid.as_str()).await?;
    let chunks = subject::object_chunks(cim_events::iu::CONTENT_BUCKET, &info.nuid)?;
    let stream = js.get_stream(resources::object_buckets(Component::InformationUnit)[0].stream_name()).await?;
    let consumer =
        stream.create_consumer(OrderedConfig { filter_subject: chunks.clone(), ..Default::default() }).await?;
    let mut messages = consumer.messages().await?;
    let mut last = None;
    for _ in 0..info.chunks {
        let m = tokio::time::timeout(LOG_DEADLINE, messages.next()).await?.context("chunks ended")??;
        last = Some((m.info().map_err(|e| anyhow::anyhow!("{e}"))?.stream_sequence, m.payload.clone()));
    }
    let (seq, payload) = last.context("no chunk")?;
    stream.delete_message(seq).await?;
    let mut damaged = payload.to_vec();
    damaged[0] ^= 0xff;
    js.publish(chunks, damaged.into()).await?.await?;

    // A client that never read it whole: the range fails, and nothing was written.
    let fresh = fx.iu();
    let mut written = Vec::new();
    let read = fresh.get_content(&put.cid, Some((0, 10)), &mut written, &mut cim_iu_client::NoProgress).await;
    ensure!(read.is_err(), "a range of damaged content was read");
    ensure!(written.is_empty(), "{} bytes of damaged content were sent before the damage was found", written.len());
    Ok(())
}

/// A service cannot change its own event stream's configuration; when its settings ask for a
/// change (here a shorter retry horizon) it says so, keeps serving on the stream as it is, and
/// the operator applies the change with `cimctl deploy provision`.
#[tokio::test(flavor = "multi_thread")]
async fn a_changed_history_configuration_is_applied_by_the_operator_not_the_service() -> Result<()> {
    let mut fx = CimFixture::builder()
        .generated_permissions()
        .service(Svc::new(Component::InformationUnit).own_identity())
        .start()
        .await?;
    let events = resources::events_stream(Component::InformationUnit).name;
    let js = fx.js();
    let window = |js: async_nats::jetstream::Context| {
        let events = events.clone();
        async move { anyhow::Ok(js.get_stream(&events).await?.info().await?.config.duplicate_window) }
    };
    let before = window(js.clone()).await?;
    let shorter = Duration::from_secs(3600);
    ensure!(before > shorter, "{before:?}");

    // The service restarted with a shorter horizon: refused by the server, logged, still serving.
    fx.start(Svc::new(Component::InformationUnit).own_identity().args(&["--retry-horizon", "1h"])).await?;
    let iu = fx.iu();
    let c = iu.put_bytes(b"still serving").await?;
    iu.create(CreateUnit { cid: c.cid, name: "s.txt".into(), media_type: "text/plain".into(), ..Default::default() })
        .await?;
    let svc = &*fx.services_mut().last_mut().context("the restarted service")?;
    eventually(LOG_DEADLINE, "the service to name what the operator runs", || async {
        let log = svc.log();
        ensure!(log.contains("cimctl deploy provision --service information-unit"), "{log}");
        Ok(())
    })
    .await?;
    ensure!(window(js.clone()).await? == before, "the service changed its own history stream");

    // The operator applies it.
    let mut cmd = tokio::process::Command::new(crate::common::bin("cimctl"));
    cmd.args(["deploy", "provision", "--service", "information-unit", "--retry-horizon", "1h", "--nats-url", fx.url()]);
    for (k, v) in fx.admin_env() {
        cmd.env(k, v);
    }
    let out = cmd.output().await?;
    ensure!(out.status.success(), "cimctl deploy provision: {}", String::from_utf8_lossy(&out.stderr));
    ensure!(window(js).await? == shorter, "the operator's provision did not apply the new window");
    Ok(())
}

/// A caller nobody has authenticated learns nothing of the gateway's insides: a token the store
/// cannot read back is "retry shortly" (503), not the store's own error.
#[tokio::test(flavor = "multi_thread")]
async fn token_store_errors_are_not_shown_to_unauthenticated_callers() -> Result<()> {
    let http = format!("127.0.0.1:{}", cim_testkit::free_port());
    let fx = CimFixture::builder()
        .service(Component::InformationUnit)
        .service(Svc::new(Component::UiGateway).args(&["--gateway-listen", &http, "--gateway-grpc-listen", "off"]))
        .start()
        .await?;
    let bucket = resources::kv_bucket(Component::UiGateway, cim_events::gateway::KV_TOKENS)?;
    let kv = fx.js().get_key_value(&bucket).await?;
    kv.put(cim_events::gateway::token_key("broken")?, "not a token record".into()).await?;
    let client = reqwest::Client::builder().no_proxy().build()?;
    let resp = client
        .get(format!("http://{http}/api/v1/units"))
        .bearer_auth(format!("{}broken_secret", cim_events::gateway::TOKEN_PREFIX))
        .send()
        .await?;
    let status = resp.status();
    let body = resp.text().await?;
    ensure!(status == reqwest::StatusCode::SERVICE_UNAVAILABLE, "{status}: {body}");
    for inside in ["undecodable", "token store", "stream", "decode"] {
        ensure!(!body.contains(inside), "the reply tells about the store ({inside}): {body}");
    }
    Ok(())
}

/// One policy for event payloads: a reader following a component's events over gRPC sees the
/// payloads of units and pipeline runs (what it may read anyway) but only the metadata of the
/// others' (registry nodes, webhook bodies, database rows), which are the admin's.
#[tokio::test(flavor = "multi_thread")]
async fn readers_see_event_metadata_not_other_components_payloads() -> Result<()> {
    use ui_gateway::grpc::proto::{EventsRequest, gateway_client::GatewayClient};

    let grpc = format!("127.0.0.1:{}", cim_testkit::free_port());
    let http = format!("127.0.0.1:{}", cim_testkit::free_port());
    let fx = CimFixture::builder()
        .service(Component::InformationUnit)
        .service(Component::Registry)
        .service(Svc::new(Component::UiGateway).args(&["--gateway-listen", &http, "--gateway-grpc-listen", &grpc]))
        .start()
        .await?;
    let made = tokens(&fx, &[("reader", "reader"), ("admin", "admin")]).await?;
    let tokens: BTreeMap<&str, String> = ["reader", "admin"].into_iter().zip(made).collect();
    let c = fx.iu().put_bytes(b"a unit").await?;
    fx.iu()
        .create(CreateUnit { cid: c.cid, name: "u.txt".into(), media_type: "text/plain".into(), ..Default::default() })
        .await?;
    let channel = eventually(LOG_DEADLINE, "grpc port open", || async {
        Ok(tonic::transport::Channel::from_shared(format!("http://{grpc}"))?.connect().await?)
    })
    .await?;
    let mut client = GatewayClient::new(channel);
    // The first event of a component's history, as `role` sees it.
    let mut first = async |component: &str, role: &str| -> Result<ui_gateway::grpc::proto::Event> {
        let mut r =
            tonic::Request::new(EventsRequest { component: component.into(), after: Some(0), ..Default::default() });
        r.metadata_mut().insert("authorization", format!("Bearer {}", tokens[role]).parse()?);
        let mut events = client.events(r).await?.into_inner();
        tokio::time::timeout(LOG_DEADLINE, events.message()).await??.context("events ended")
    };
    let (reader_reg, admin_reg) = (first("registry", "reader").await?, first("registry", "admin").await?);
    ensure!(reader_reg.seq == admin_reg.seq && !reader_reg.subject.is_empty() && !reader_reg.r#type.is_empty());
    ensure!(reader_reg.payload.is_empty(), "a reader saw a registry payload: {} bytes", reader_reg.payload.len());
    ensure!(!admin_reg.payload.is_empty(), "the admin saw no registry payload");
    ensure!(!first("iu", "reader").await?.payload.is_empty(), "a reader saw no unit payload");
    Ok(())
}

/// One token holds at most its share of event streams (`--gateway-max-streams`): one more is
/// refused with 429 and a reason, other tokens are not affected, and a stream its client leaves
/// frees its slot.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_holds_at_most_its_share_of_event_streams() -> Result<()> {
    let http = format!("127.0.0.1:{}", cim_testkit::free_port());
    let fx = CimFixture::builder()
        .service(Component::InformationUnit)
        .service(Svc::new(Component::UiGateway).args(&[
            "--gateway-listen",
            &http,
            "--gateway-grpc-listen",
            "off",
            "--gateway-max-streams",
            "2",
        ]))
        .start()
        .await?;
    let tokens = tokens(&fx, &[("busy", "reader"), ("other", "reader")]).await?;
    let client = reqwest::Client::builder().no_proxy().build()?;
    let open = |token: &str| {
        client.get(format!("http://{http}/api/v1/events?component=iu")).bearer_auth(token.to_string()).send()
    };
    let first = open(&tokens[0]).await?;
    let second = open(&tokens[0]).await?;
    ensure!(first.status() == 200 && second.status() == 200, "{} {}", first.status(), second.status());
    let third = open(&tokens[0]).await?;
    let status = third.status();
    let body = third.text().await?;
    ensure!(status == reqwest::StatusCode::TOO_MANY_REQUESTS, "{status}: {body}");
    ensure!(body.contains("open event streams"), "{body}");
    let other = open(&tokens[1]).await?;
    ensure!(other.status() == 200, "another token was refused: {}", other.status());
    // The client of one stream leaves: its slot comes free (the gateway notices at the latest
    // when it next writes to it, a keep-alive within 15 s).
    drop(first);
    let mut again = Vec::new();
    eventually(Duration::from_secs(60), "a slot freed by a client that left", || async {
        let r = open(&tokens[0]).await?;
        ensure!(r.status() == 200, "{}", r.status());
        Ok(r)
    })
    .await
    .map(|r| again.push(r))?;
    drop(second);
    Ok(())
}

/// A header value with a line break, sent straight in the NATS protocol (no client library
/// lets one through) to a subject a service serves, leaves the service's connection up: before
/// async-nats 0.52 the receiving client's connection task panicked on it, so any identity
/// allowed to publish a command could cut a service off from NATS for good.
#[tokio::test(flavor = "multi_thread")]
async fn a_header_with_a_line_break_does_not_cut_a_service_off() -> Result<()> {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
    let fx = CimFixture::builder().service(Component::InformationUnit).start().await?;
    let iu = fx.iu();
    let before = iu.put_bytes(b"before the bad header").await?;
    let addr = fx.url().trim_start_matches("nats://").to_string();
    let stream = tokio::net::TcpStream::connect(&addr).await?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let info = lines.next_line().await?.context("no INFO from the server")?;
    ensure!(info.starts_with("INFO "), "{info}");
    let create = cim_events::iu::command(cim_events::iu::cmd::CREATE)?;
    let headers = "NATS/1.0\r\nX-Broken: a\rb\r\n\r\n";
    let frame = format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":true,\"protocol\":1}}\r\nSUB _INBOX.raw.1 1\r\nHPUB {create} _INBOX.raw.1 {} {}\r\n{headers}\r\nPING\r\n",
        headers.len(),
        headers.len()
    );
    write.write_all(frame.as_bytes()).await?;
    // The service received it and answered (a refusal: the body is no create), which shows
    // the line break reached its client.
    let answered = tokio::time::timeout(LOG_DEADLINE, async {
        let mut seen = Vec::new();
        while let Some(line) = lines.next_line().await? {
            if line.starts_with("HMSG _INBOX.raw.1") || line.starts_with("MSG _INBOX.raw.1") {
                return anyhow::Ok(line);
            }
            seen.push(line);
        }
        anyhow::bail!("the server closed the connection after {seen:?}")
    })
    .await
    .context("the service never answered the message with the broken header")??;
    ensure!(answered.contains("_INBOX.raw.1"), "{answered}");
    // The service still serves: a create is answered, a unit made.
    let unit = iu
        .create(CreateUnit {
            cid: before.cid.clone(),
            name: "after.txt".into(),
            media_type: "text/plain".into(),
            ..Default::default()
        })
        .await
        .context("the information-unit service stopped answering after the bad header")?;
    ensure!(iu.unit(&unit.unit_id).await?.cid == before.cid);
    let log = fx.services().iter().find(|s| s.component == Component::InformationUnit).context("iu")?.log();
    ensure!(!log.contains("panicked"), "the service panicked:\n{log}");
    Ok(())
}
