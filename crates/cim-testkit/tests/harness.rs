//! Tests of the test harness itself, against real processes: nats-servers (single, cluster,
//! leaf), s3s-fs and the wait helper. (Moved here from integration-tests: the harness's tests
//! live with the harness.)

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use async_nats::jetstream::{self, message::PublishMessage, stream};
use cim_testkit::{
    NatsCluster, NatsServer, S3Server, eventually, http_get, nats_server_binary, nats_server_version,
    require_nats_server, start_leaf,
};

const WAIT: Duration = Duration::from_secs(20);

fn stream_config(name: &str, subjects: &str, replicas: usize) -> stream::Config {
    stream::Config {
        name: name.to_owned(),
        subjects: vec![subjects.to_owned()],
        num_replicas: replicas,
        ..Default::default()
    }
}

/// Alive and not a zombie. A reaped process has no /proc entry at all.
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

#[test]
fn nats_server_binary_is_new_enough_and_old_ones_are_refused() {
    let bin = nats_server_binary().unwrap();
    let (major, minor, _) = nats_server_version(&bin).unwrap();
    assert!((major, minor) >= (2, 10), "{} is {major}.{minor}", bin.display());

    let err = require_nats_server(Path::new("/nonexistent/nats-server")).unwrap_err();
    assert!(format!("{err:#}").contains(cim_testkit::NATS_SERVER_INSTALL), "{err:#}");

    let debian = Path::new("/usr/sbin/nats-server");
    if let Ok((2, minor, _)) = nats_server_version(debian)
        && minor < 10
    {
        let err = require_nats_server(debian).unwrap_err();
        assert!(format!("{err:#}").contains("too old"), "{err:#}");
        assert!(format!("{err:#}").contains(cim_testkit::NATS_SERVER_INSTALL), "{err:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_server_keeps_jetstream_data_across_restart_and_crash() -> Result<()> {
    let mut server = NatsServer::start().await?;
    assert_eq!(server.url(), format!("nats://127.0.0.1:{}", server.port()));
    let js = jetstream::new(server.connect().await);
    js.create_stream(stream_config("ORDERS", "orders.>", 1)).await?;
    for i in 0..3u64 {
        let ack = js.publish(format!("orders.{i}"), format!("order {i}").into()).await?.await?;
        assert_eq!((ack.stream.as_str(), ack.sequence), ("ORDERS", i + 1));
    }

    let (port, first_pid) = (server.port(), server.pid().context("running")?);
    server.restart().await?;
    assert_eq!(server.port(), port);
    assert!(!process_alive(first_pid), "the old process is gone");
    let js = jetstream::new(server.connect().await);
    let mut orders = js.get_stream("ORDERS").await?;
    assert_eq!(orders.info().await?.state.messages, 3);
    assert_eq!(&orders.get_raw_message(2).await?.payload[..], b"order 1");

    server.kill();
    assert!(!server.is_running());
    server.restart().await?;
    let js = jetstream::new(server.connect().await);
    assert_eq!(js.get_stream("ORDERS").await?.info().await?.state.messages, 3);

    let (pid, dir) = (server.pid().context("running")?, server.store_dir().to_owned());
    drop(server);
    assert!(!process_alive(pid), "drop kills the server");
    assert!(!dir.exists(), "drop removes the temp store {}", dir.display());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builder_options_reach_the_server_config() -> Result<()> {
    let store = tempfile::tempdir()?;
    let server = NatsServer::builder()
        .server_name("options")
        .jetstream_domain("edge")
        .store_dir(store.path().join("js"))
        .extra_config("max_payload: 2MB")
        .start()
        .await?;
    let varz = server.monitor_json("/varz").await?;
    assert_eq!(varz["server_name"], "options");
    assert_eq!(varz["max_payload"], 2 * 1024 * 1024);
    assert_eq!(server.monitor_json("/jsz").await?["config"]["domain"], "edge");

    let js = jetstream::new(server.connect().await);
    js.create_stream(stream_config("S", "s.>", 1)).await?;
    let ack = js.publish("s.1", "x".into()).await?.await?;
    assert_eq!(ack.domain, "edge");

    drop(server);
    assert!(store.path().join("js/jetstream").is_dir(), "a caller-owned store dir is kept");
    Ok(())
}

#[tokio::test]
async fn startup_failures_fail_fast_and_show_the_server_log() -> Result<()> {
    let start = Instant::now();
    let err = NatsServer::builder().extra_config("max_payload: banana").start().await.unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("did not become ready") && msg.contains("exited"), "{msg}");
    assert!(msg.contains("nats-server.conf:"), "the log tail has the server's complaint: {msg}");
    assert!(msg.contains("max_payload: banana"), "the config is shown: {msg}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = taken.local_addr()?.port();
    let err = NatsServer::builder().port(port).start().await.unwrap_err();
    assert!(format!("{err:#}").contains("address already in use"), "{err:#}");
    assert!(start.elapsed() < Duration::from_secs(10), "an exiting server is not waited for");
    Ok(())
}

#[test]
fn a_server_dies_with_the_thread_that_started_it() -> Result<()> {
    // The thread leaks the server (no Drop), then ends: PR_SET_PDEATHSIG must kill it.
    let (pid, dir) = std::thread::spawn(|| -> Result<(u32, std::path::PathBuf)> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let server = rt.block_on(NatsServer::start())?;
        let leaked = (server.pid().context("running")?, server.config_path().parent().unwrap().to_owned());
        std::mem::forget(server);
        Ok(leaked)
    })
    .join()
    .expect("thread")?;
    let deadline = Instant::now() + WAIT;
    while process_alive(pid) {
        assert!(Instant::now() < deadline, "nats-server {pid} outlived the thread that started it");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_r3_stream_survives_losing_its_leader() -> Result<()> {
    let mut cluster = NatsCluster::start(3).await?;
    assert_eq!(cluster.urls().len(), 3);
    assert_eq!(cluster.leaf_urls().len(), 3);
    assert!(
        async_nats::connect(cluster.url()).await.is_err(),
        "async-nats does not split a comma-separated URL list; url() is for the CLI"
    );

    let js = jetstream::new(cluster.connect().await);
    let mut events = js.create_stream(stream_config("EVENTS", "events.>", 3)).await?;
    for i in 0..5 {
        js.publish("events.a", format!("e{i}").into()).await?.await?;
    }
    let info = events.info().await?.clone();
    assert_eq!(info.config.num_replicas, 3);
    let replicas = info.cluster.as_ref().map(|c| c.replicas.len());
    assert_eq!(replicas, Some(2), "{:?}", info.cluster);
    let leader = info.cluster.and_then(|c| c.leader).context("EVENTS has no leader")?;
    let victim = cluster.node_index(&leader).context("leader is a cluster node")?;

    cluster.kill_node(victim);
    // Retried with a message id, so an attempt whose ack was lost is not stored twice.
    let ack = eventually(WAIT, "a publish to EVENTS after its leader died", || async {
        let publish = PublishMessage::build().payload("after".into()).message_id("after-1");
        Ok(js.send_publish("events.b", publish).await?.await?)
    })
    .await?;
    assert_eq!(ack.sequence, 6);

    let js = jetstream::new(cluster.connect().await);
    let info = js.get_stream("EVENTS").await?.cached_info().clone();
    assert_eq!(info.state.messages, 6);
    assert_ne!(info.cluster.as_ref().and_then(|c| c.leader.as_deref()), Some(leader.as_str()));

    cluster.restart_node(victim).await?;
    eventually(WAIT, "the restarted node to be a current EVENTS replica again", || async {
        let info = js.get_stream("EVENTS").await?.cached_info().clone();
        let cluster_info = info.cluster.as_ref().context("no cluster info")?;
        let names: Vec<&str> = cluster_info.replicas.iter().map(|p| p.name.as_str()).collect();
        ensure!(cluster_info.replicas.iter().all(|p| p.current && !p.offline), "replicas {names:?}");
        ensure!(cluster_info.replicas.len() == 2, "replicas {names:?}");
        Ok(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaf_node_has_its_own_domain_and_reaches_the_hub() -> Result<()> {
    let cluster = NatsCluster::start(3).await?;
    assert_eq!(cluster.jetstream_domain(), "hub");
    let leaf = start_leaf(&cluster, "leaf1").await?;
    assert!(leaf.leaf_connections().await? >= 1);

    let client = leaf.connect().await;
    let local = jetstream::new(client.clone());
    local.create_stream(stream_config("LOCAL", "local.>", 1)).await?;
    let ack = local.publish("local.x", "stays here".into()).await?.await?;
    assert_eq!((ack.stream.as_str(), ack.domain.as_str()), ("LOCAL", "leaf1"));

    let hub = jetstream::with_domain(client, "hub");
    // Through a leaf, the hub's peer states can lag a moment behind the cluster's own view.
    eventually(Duration::from_secs(20), "an R3 stream created in the hub from the leaf", || async {
        hub.create_stream(stream_config("CENTRAL", "central.>", 3)).await?;
        Ok(())
    })
    .await?;
    // The stream's interest in central.> reaches the leaf a moment after the create answers;
    // until then a publish gets "no responders". Retried with a message id: stored once.
    let ack = eventually(WAIT, "a publish from the leaf to reach CENTRAL", || async {
        let publish = PublishMessage::build().payload("from the leaf".into()).message_id("leaf-1");
        Ok(hub.send_publish("central.x", publish).await?.await?)
    })
    .await?;
    assert_eq!((ack.stream.as_str(), ack.domain.as_str(), ack.sequence), ("CENTRAL", "hub", 1));

    let hub_js = jetstream::new(cluster.connect().await);
    let central = hub_js.get_stream("CENTRAL").await?;
    assert_eq!(&central.get_raw_message(1).await?.payload[..], b"from the leaf");
    assert!(hub_js.get_stream("LOCAL").await.is_err(), "the leaf's stream lives only in its domain");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_server_answers_http_and_restarts_on_the_same_port() -> Result<()> {
    let mut s3 = S3Server::start().await?;
    let endpoint = s3.endpoint();
    let addr = endpoint.strip_prefix("http://").context("http endpoint")?.to_owned();
    assert!(!s3.access_key().is_empty() && !s3.secret_key().is_empty());
    assert_eq!(s3.region(), "us-east-1");

    let r = http_get(&addr, "/").await?;
    assert_eq!(r.status, 403, "an unsigned request is refused: {}", r.text());
    assert!(r.text().contains("AccessDenied"), "{}", r.text());

    std::fs::create_dir(s3.root().join("bucket"))?;
    let pid = s3.pid().context("running")?;
    s3.restart().await?;
    assert_eq!(s3.endpoint(), endpoint);
    assert!(!process_alive(pid));
    assert_eq!(http_get(&addr, "/bucket").await?.status, 403);
    assert!(s3.root().join("bucket").is_dir(), "restart keeps the root");

    s3.kill();
    assert!(http_get(&addr, "/").await.is_err(), "killed means not answering");
    s3.restart().await?;
    let (pid, root) = (s3.pid().context("running")?, s3.root().to_owned());
    drop(s3);
    assert!(!process_alive(pid));
    assert!(!root.exists());
    Ok(())
}

#[tokio::test]
async fn eventually_names_what_and_the_last_error_after_the_timeout() {
    let calls = AtomicU32::new(0);
    let start = Instant::now();
    let err = eventually::<(), _, _>(Duration::from_millis(300), "the answer to be 42", || async {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        anyhow::bail!("still wrong after {n} tries")
    })
    .await
    .unwrap_err();
    let elapsed = start.elapsed();
    let n = calls.load(Ordering::SeqCst);
    assert!(elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(3), "{elapsed:?}");
    assert!(n >= 3, "polls more than once: {n}");
    assert!(err.to_string().contains("the answer to be 42"), "{err}");
    assert!(format!("{err:#}").contains(&format!("still wrong after {n} tries")), "{err:#}");

    let counter = AtomicU32::new(0);
    let reached: Result<u32> = cim_testkit::eventually!(Duration::from_secs(5), "the counter to reach 3", {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        ensure!(n >= 3, "only {n}");
        Ok(n)
    });
    assert_eq!(reached.unwrap(), 3);
}
