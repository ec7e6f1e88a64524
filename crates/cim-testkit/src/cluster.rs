//! A JetStream cluster of real nats-servers on loopback, and leaf nodes attached to it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use cim_proc::free_port;

use crate::nats::{DEFAULT_STARTUP_TIMEOUT, NatsServer, is_addr_in_use, test_connect_options};
use crate::wait::{Attempt, eventually, poll};

/// The JetStream domain of a cluster unless the builder says otherwise.
pub const DEFAULT_HUB_DOMAIN: &str = "hub";

const START_ATTEMPTS: usize = 3;

/// Options for [`NatsCluster`].
#[derive(Clone, Debug)]
pub struct NatsClusterBuilder {
    size: usize,
    name: String,
    domain: String,
    extra_config: String,
    startup_timeout: Duration,
    leaf_no_advertise: bool,
}

impl Default for NatsClusterBuilder {
    fn default() -> Self {
        Self {
            size: 3,
            name: "cim-test".to_owned(),
            domain: DEFAULT_HUB_DOMAIN.to_owned(),
            extra_config: String::new(),
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
            leaf_no_advertise: false,
        }
    }
}

impl NatsClusterBuilder {
    /// Number of nodes (default 3).
    pub fn size(mut self, n: usize) -> Self {
        self.size = n;
        self
    }

    /// `cluster { name }` (default `cim-test`); node names are `<name>-n1`, `<name>-n2`, ...
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.to_owned();
        self
    }

    /// The cluster's JetStream domain (default [`DEFAULT_HUB_DOMAIN`], `hub`).
    pub fn jetstream_domain(mut self, domain: &str) -> Self {
        self.domain = domain.to_owned();
        self
    }

    /// Raw config text appended to every node's config.
    pub fn extra_config(mut self, text: &str) -> Self {
        self.extra_config.push_str(text);
        self.extra_config.push('\n');
        self
    }

    /// Leaves are not told the other nodes' leaf ports ([`NatsServerBuilder::leaf_no_advertise`]).
    pub fn leaf_no_advertise(mut self) -> Self {
        self.leaf_no_advertise = true;
        self
    }

    /// How long the whole start (and each node restart) may take.
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// Starts every node and waits until the cluster is formed: all nodes agree on a
    /// JetStream meta leader, the leader sees every other node as current, every node's
    /// `/healthz` answers 200, a client's JetStream account info request succeeds, and a
    /// replicated probe stream (R3, or one replica per node if fewer) can be placed.
    pub async fn start(self) -> Result<NatsCluster> {
        if self.size == 0 {
            bail!("a cluster needs at least one node");
        }
        let mut attempt = 1;
        loop {
            match self.start_once().await {
                Ok(cluster) => return Ok(cluster),
                Err(e) if attempt < START_ATTEMPTS && is_addr_in_use(&e) => attempt += 1,
                Err(e) => return Err(e),
            }
        }
    }

    async fn start_once(&self) -> Result<NatsCluster> {
        let cluster_ports: Vec<u16> = (0..self.size).map(|_| free_port()).collect();
        let mut nodes = Vec::with_capacity(self.size);
        for (i, cluster_port) in cluster_ports.iter().enumerate() {
            // A route to itself is tolerated but logs "Duplicate Route" churn.
            let routes: Vec<String> = cluster_ports
                .iter()
                .filter(|p| *p != cluster_port)
                .map(|p| format!("nats-route://127.0.0.1:{p}"))
                .collect();
            let mut b = NatsServer::builder()
                .server_name(&format!("{}-n{}", self.name, i + 1))
                .jetstream_domain(&self.domain)
                .cluster(&self.name, *cluster_port, routes)
                .leaf_listen()
                .startup_timeout(self.startup_timeout);
            if !self.extra_config.is_empty() {
                b = b.extra_config(&self.extra_config);
            }
            if self.leaf_no_advertise {
                b = b.leaf_no_advertise();
            }
            // Each node is ready (JetStream enabled) before the meta group has a leader.
            nodes.push(b.start().await.with_context(|| format!("starting node {} of cluster {}", i + 1, self.name))?);
        }
        let cluster = NatsCluster { nodes, opts: self.clone() };
        cluster.wait_formed(true, self.startup_timeout).await?;
        Ok(cluster)
    }
}

/// A JetStream cluster of `n` nats-servers on 127.0.0.1, each with its own store dir, a
/// JetStream domain (default `hub`) and a leaf node listener. Dropping it kills every node.
///
/// Timing: nats-server's Raft election timeout is a fixed 4-9 s (not configurable), so a
/// start takes 0.5-9 s, and after killing a stream's or the meta group's leader the next
/// write succeeds only after a new election; wait for it with [`crate::eventually()`]
/// (20 s is a safe bound), retrying publishes with a message id to avoid duplicates.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
    opts: NatsClusterBuilder,
}

impl NatsCluster {
    /// `n` nodes with default options; see [`NatsClusterBuilder::start`] for what "started" means.
    pub async fn start(n: usize) -> Result<Self> {
        Self::builder().size(n).start().await
    }

    pub fn builder() -> NatsClusterBuilder {
        NatsClusterBuilder::default()
    }

    pub fn size(&self) -> usize {
        self.nodes.len()
    }

    pub fn name(&self) -> &str {
        &self.opts.name
    }

    pub fn jetstream_domain(&self) -> &str {
        &self.opts.domain
    }

    /// Client URLs of all nodes, `nats://127.0.0.1:PORT`; `async_nats::connect(urls)` takes this.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// The client URLs joined with commas, the form the `nats` CLI and `NATS_URL` take.
    /// async-nats does NOT split such a string (it parses it as one malformed URL); use
    /// [`urls`](Self::urls) or [`connect`](Self::connect) there.
    pub fn url(&self) -> String {
        self.urls().join(",")
    }

    /// `nats-leaf://127.0.0.1:LEAF_PORT` of every node, for a leaf's `remotes`.
    pub fn leaf_urls(&self) -> Vec<String> {
        self.nodes.iter().filter_map(NatsServer::leaf_url).collect()
    }

    /// A client that knows every node (so it survives the loss of the one it talks to);
    /// panics if no node accepts.
    pub async fn connect(&self) -> async_nats::Client {
        self.try_connect().await.unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub async fn try_connect(&self) -> Result<async_nats::Client> {
        // Running nodes first: the initial connect does not always try every server.
        let mut urls: Vec<String> = self.nodes.iter().filter(|n| n.is_running()).map(NatsServer::url).collect();
        urls.extend(self.nodes.iter().filter(|n| !n.is_running()).map(NatsServer::url));
        test_connect_options()
            .retain_servers_order()
            .connect(urls)
            .await
            .with_context(|| format!("connecting to cluster {} at {}", self.name(), self.url()))
    }

    pub fn node(&self, i: usize) -> &NatsServer {
        &self.nodes[i]
    }

    pub fn node_mut(&mut self, i: usize) -> &mut NatsServer {
        &mut self.nodes[i]
    }

    pub fn nodes(&self) -> &[NatsServer] {
        &self.nodes
    }

    /// The index of the node with this `server_name` (as JetStream reports leaders).
    pub fn node_index(&self, server_name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.server_name() == server_name)
    }

    /// SIGKILLs node `i`; the others keep running. Does not wait for a new leader.
    pub fn kill_node(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Restarts node `i` (same ports and store) and waits until the running nodes form a
    /// healthy cluster again, with the restarted node caught up in the meta group.
    pub async fn restart_node(&mut self, i: usize) -> Result<()> {
        self.nodes[i].restart().await?;
        self.wait_formed(false, self.opts.startup_timeout).await?;
        Ok(())
    }

    /// The current JetStream meta leader's server name, as node `i`'s `/jsz` reports it.
    pub async fn meta_leader(&self) -> Result<String> {
        let running = self.nodes.iter().find(|n| n.is_running()).ok_or_else(|| anyhow!("no node is running"))?;
        let jsz = running.monitor_json("/jsz").await?;
        match jsz["meta_cluster"]["leader"].as_str() {
            Some(l) if !l.is_empty() => Ok(l.to_owned()),
            _ => bail!("{} knows no meta leader", running.server_name()),
        }
    }

    /// Waits until the running nodes form a healthy cluster (see [`NatsClusterBuilder::start`]);
    /// returns the meta leader's name. With `require_all`, a node that is not running fails at once.
    pub async fn wait_formed(&self, require_all: bool, timeout: Duration) -> Result<String> {
        let what = format!("cluster {} to form with a JetStream meta leader", self.name());
        poll(timeout, &what, || async {
            if require_all && let Some(dead) = self.nodes.iter().find(|n| !n.is_running()) {
                return Attempt::Fail(anyhow!(
                    "node {} exited; last log lines:\n{}",
                    dead.server_name(),
                    dead.log_tail(40)
                ));
            }
            match self.check_formed().await {
                Ok(leader) => Attempt::Done(leader),
                Err(e) => Attempt::Retry(e),
            }
        })
        .await
    }

    async fn check_formed(&self) -> Result<String> {
        let running: Vec<&NatsServer> = self.nodes.iter().filter(|n| n.is_running()).collect();
        let mut leader: Option<String> = None;
        for node in &running {
            let jsz = node.monitor_json("/jsz").await?;
            let l = jsz["meta_cluster"]["leader"].as_str().unwrap_or_default();
            if l.is_empty() {
                bail!("{} knows no meta leader yet", node.server_name());
            }
            match &leader {
                None => leader = Some(l.to_owned()),
                Some(seen) if seen != l => {
                    bail!("nodes disagree on the meta leader ({seen} vs {l})")
                }
                Some(_) => {}
            }
        }
        let leader = leader.ok_or_else(|| anyhow!("no node is running"))?;
        let leader_node = running
            .iter()
            .find(|n| n.server_name() == leader)
            .ok_or_else(|| anyhow!("meta leader {leader} is not a running node"))?;
        let jsz = leader_node.monitor_json("/jsz").await?;
        let replicas = jsz["meta_cluster"]["replicas"].as_array().cloned().unwrap_or_default();
        for node in running.iter().filter(|n| n.server_name() != leader) {
            // Current and not offline: placement of R3 assets refuses peers the meta leader
            // still counts as offline ("no suitable peers for placement").
            let current = replicas.iter().any(|r| {
                r["name"].as_str() == Some(node.server_name())
                    && r["current"].as_bool() == Some(true)
                    && r["offline"].as_bool() != Some(true)
            });
            if !current {
                bail!("meta leader {leader} does not see {} as a current peer yet", node.server_name());
            }
        }
        for node in &running {
            let r = node.monitor_get("/healthz").await?;
            if r.status != 200 {
                bail!("{} /healthz answered {}: {}", node.server_name(), r.status, r.text());
            }
        }
        let client = self.try_connect().await?;
        let js = async_nats::jetstream::new(client);
        js.query_account().await.context("JetStream account info through the cluster")?;
        // The peer list above is the meta group's Raft view; placement also needs the meta
        // leader's statsz view of every peer, which can lag it ("no suitable peers for
        // placement, peer offline"). Only a placed replicated stream proves both.
        placement_probe(&js, running.len().min(3)).await?;
        Ok(leader)
    }

    /// See [`start_leaf`].
    pub async fn start_leaf(&self, domain: &str) -> Result<NatsServer> {
        start_leaf(self, domain).await
    }
}

/// Creates and deletes a memory stream with `replicas` replicas, so the cluster has shown
/// it can place one; a failure is returned for the caller to retry.
async fn placement_probe(js: &async_nats::jetstream::Context, replicas: usize) -> Result<()> {
    static PROBES: AtomicU64 = AtomicU64::new(0);
    let name = format!("TESTKIT_PROBE_{}_{}", std::process::id(), PROBES.fetch_add(1, Ordering::Relaxed));
    let config = async_nats::jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![format!("testkit.probe.{name}")],
        num_replicas: replicas,
        storage: async_nats::jetstream::stream::StorageType::Memory,
        ..Default::default()
    };
    js.create_stream(config).await.with_context(|| format!("placing an R{replicas} probe stream"))?;
    js.delete_stream(&name).await.with_context(|| format!("deleting the probe stream {name}"))?;
    Ok(())
}

/// A single JetStream server in its own `domain`, a leaf node of `cluster` (one remote
/// listing every cluster node's leaf URL). Returns once `/leafz` on the leaf shows the
/// connection and the hub's JetStream API answers through it, i.e.
/// `async_nats::jetstream::with_domain(leaf_client, cluster.jetstream_domain())` works.
pub async fn start_leaf(cluster: &NatsCluster, domain: &str) -> Result<NatsServer> {
    if domain == cluster.jetstream_domain() {
        bail!("the leaf's JetStream domain must differ from the hub's ({domain})");
    }
    let leaf = NatsServer::builder()
        .server_name(&format!("leaf-{domain}"))
        .jetstream_domain(domain)
        .leaf_remotes(cluster.leaf_urls())
        .startup_timeout(cluster.opts.startup_timeout)
        .start()
        .await?;
    let hub = async_nats::jetstream::with_domain(leaf.try_connect().await?, cluster.jetstream_domain());
    let what = format!("the hub's JetStream domain {:?} to answer through leaf {domain}", cluster.jetstream_domain());
    eventually(cluster.opts.startup_timeout, &what, || async {
        hub.query_account().await?;
        Ok(())
    })
    .await?;
    Ok(leaf)
}
