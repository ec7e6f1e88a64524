//! The one fixture of the integration tests: a nats-server (or a cluster), the CIM services a
//! test asks for, started and ready, and the clients to talk to them.
//!
//! ```ignore
//! let cim = CimFixture::builder()
//!     .service(Component::InformationUnit)
//!     .service(Svc::new(Component::PipelineEngine).args(&["--instance-id", "engine-a"]))
//!     .start()
//!     .await?;
//! let unit = cim.iu().put_bytes(b"hello").await?;
//! ```
//!
//! On a cluster ([`CimFixtureBuilder::cluster`]) every service runs with `--tier cluster`.
//! With [`CimFixtureBuilder::generated_permissions`] the server runs in operator mode with
//! JetStream domain `leaf`; services run as an all-permitted admin user unless marked
//! [`Svc::own_identity`], which gives them the identity and permissions a deployment gives
//! them (`nixos-modules/nats-permissions.json`).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use async_nats::jetstream;
use cim_events::Component;
use cim_iu_client::IuClient;
use cim_testkit::{NatsCluster, NatsServer, NatsServerBuilder, Permissions};

use crate::common::{ServiceProc, generated_permissions, wait_ready};

/// The JetStream domain of a fixture under generated permissions (as a deployment's leaf).
pub const LEAF_DOMAIN: &str = "leaf";

/// One service a test asks for: its component, extra arguments and environment.
#[derive(Clone, Debug)]
pub struct Svc {
    component: Component,
    args: Vec<String>,
    env: Vec<(String, String)>,
    own_identity: bool,
    wait: bool,
}

impl Svc {
    pub fn new(component: Component) -> Svc {
        Svc { component, args: Vec::new(), env: Vec::new(), own_identity: false, wait: true }
    }

    /// Appends command-line arguments.
    pub fn args(mut self, args: &[&str]) -> Svc {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: &str, value: &str) -> Svc {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Adds environment variables.
    pub fn envs(mut self, env: &[(&str, &str)]) -> Svc {
        self.env.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }

    /// Runs under the service's own NATS identity with its generated permissions (the
    /// fixture must be built with [`CimFixtureBuilder::generated_permissions`]).
    pub fn own_identity(mut self) -> Svc {
        self.own_identity = true;
        self
    }

    /// Started, but not waited for (a test that expects it never to become ready).
    pub fn no_wait(mut self) -> Svc {
        self.wait = false;
        self
    }
}

impl From<Component> for Svc {
    fn from(component: Component) -> Svc {
        Svc::new(component)
    }
}

/// How a [`CimFixture`] is set up; [`start`](Self::start) runs it.
#[derive(Default)]
pub struct CimFixtureBuilder {
    nodes: usize,
    permissions: bool,
    services: Vec<Svc>,
}

impl CimFixtureBuilder {
    /// A cluster of `nodes` nats-servers instead of one server; services get `--tier cluster`.
    pub fn cluster(mut self, nodes: usize) -> Self {
        self.nodes = nodes;
        self
    }

    /// Operator mode with JetStream domain [`LEAF_DOMAIN`]: services run as an admin user, or
    /// under their generated permissions when marked [`Svc::own_identity`].
    pub fn generated_permissions(mut self) -> Self {
        self.permissions = true;
        self
    }

    /// A service to start (a [`Component`] or a [`Svc`] with arguments).
    pub fn service(mut self, svc: impl Into<Svc>) -> Self {
        self.services.push(svc.into());
        self
    }

    /// Several services without arguments.
    pub fn services(mut self, components: impl IntoIterator<Item = Component>) -> Self {
        self.services.extend(components.into_iter().map(Svc::new));
        self
    }

    /// Starts the server, then every service in the order asked (all spawned first, then
    /// each waited for until it answers describe and reports ready).
    pub async fn start(self) -> Result<CimFixture> {
        let mut auth = None;
        let nats = if self.nodes > 1 {
            if self.permissions {
                bail!("the fixture's cluster runs without operator mode");
            }
            Nats::Cluster(NatsCluster::start(self.nodes).await?)
        } else {
            let mut builder: NatsServerBuilder = NatsServer::builder();
            if self.permissions {
                let mut op = cim_testkit::Operator::new();
                let account = op.account_with_jetstream("CIM");
                builder = builder.operator(&op).jetstream_domain(LEAF_DOMAIN).extra_config("max_control_line: 65536");
                let dir = tempfile::tempdir()?;
                let admin = account.user("admin", Permissions::all());
                let admin_creds = admin.write_creds(dir.path())?;
                auth = Some(Auth { account, admin, admin_creds, dir });
            }
            Nats::Server(Box::new(builder.start().await?))
        };
        let url = match &nats {
            Nats::Server(s) => s.url(),
            Nats::Cluster(c) => c.urls().join(","),
        };
        let client = match (&nats, &auth) {
            (_, Some(a)) => a.admin.connect(&url).await?,
            (Nats::Server(s), None) => s.connect().await,
            (Nats::Cluster(c), None) => c.connect().await,
        };
        let mut cim = CimFixture { services: Vec::new(), client, url, auth, cluster: self.nodes > 1, nats };
        let mut waits = Vec::new();
        for svc in self.services {
            let wait = svc.wait;
            let i = cim.spawn(svc)?;
            if wait {
                waits.push(i);
            }
        }
        for i in waits {
            wait_ready(&cim.client, &cim.services[i]).await?;
        }
        Ok(cim)
    }
}

enum Nats {
    Server(Box<NatsServer>),
    Cluster(NatsCluster),
}

struct Auth {
    account: cim_testkit::Account,
    admin: cim_testkit::User,
    admin_creds: PathBuf,
    dir: tempfile::TempDir,
}

/// A running CIM for one test: dropped, it kills the services and the server.
pub struct CimFixture {
    // Services first: they are dropped (killed) before the server goes away.
    services: Vec<ServiceProc>,
    client: async_nats::Client,
    url: String,
    auth: Option<Auth>,
    cluster: bool,
    nats: Nats,
}

impl CimFixture {
    pub fn builder() -> CimFixtureBuilder {
        CimFixtureBuilder::default()
    }

    /// A fixture with just these services (each without extra arguments).
    pub async fn with(components: impl IntoIterator<Item = Component>) -> Result<CimFixture> {
        CimFixture::builder().services(components).start().await
    }

    /// The URL(s) services and cimctl connect to (comma-separated on a cluster).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The test's own NATS connection (the admin user under generated permissions).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// A new NATS connection (the admin user under generated permissions).
    pub async fn connect(&self) -> Result<async_nats::Client> {
        match (&self.nats, &self.auth) {
            (_, Some(a)) => a.admin.connect(&self.url).await,
            (Nats::Server(s), None) => s.try_connect().await,
            (Nats::Cluster(c), None) => c.try_connect().await,
        }
    }

    /// A new connection as `component`'s own identity with its generated permissions, and that
    /// identity's public key (what the server names in its permission violations). Only under
    /// [`CimFixtureBuilder::generated_permissions`].
    pub async fn connect_as(&self, component: Component) -> Result<(async_nats::Client, String)> {
        let a = self.auth.as_ref().context("connect_as needs a fixture with generated_permissions()")?;
        let user = a.account.user(component.service_name(), generated_permissions(component)?);
        let client = user.connect(&self.url).await?;
        Ok((client, user.public_key()))
    }

    /// A new user of the fixture's account with `permissions`, its credentials file and its
    /// public key. Only under [`CimFixtureBuilder::generated_permissions`].
    pub fn user(&self, name: &str, permissions: Permissions) -> Result<(PathBuf, String)> {
        let a = self.auth.as_ref().context("user needs a fixture with generated_permissions()")?;
        let user = a.account.user(name, permissions);
        Ok((user.write_creds(a.dir.path())?, user.public_key()))
    }

    /// Creates a gateway API token with `cimctl token create` (as the admin under generated
    /// permissions): its id and its secret.
    pub async fn token(&self, name: &str, role: &str) -> Result<(String, String)> {
        let out = tokio::process::Command::new(crate::common::bin("cimctl"))
            .args(["token", "--nats-url", self.url(), "--json", "create", "--name", name, "--role", role])
            .envs(self.admin_env())
            .output()
            .await?;
        anyhow::ensure!(out.status.success(), "cimctl token create: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok((v["id"].as_str().context("id")?.to_string(), v["token"].as_str().context("token")?.to_string()))
    }

    /// The JetStream domain services use, if not the default.
    pub fn domain(&self) -> Option<&str> {
        self.auth.as_ref().map(|_| LEAF_DOMAIN)
    }

    /// JetStream over [`client`](Self::client), in the fixture's domain.
    pub fn js(&self) -> jetstream::Context {
        match self.domain() {
            Some(d) => jetstream::with_domain(self.client.clone(), d),
            None => jetstream::new(self.client.clone()),
        }
    }

    /// An information-unit client over [`client`](Self::client), in the fixture's domain. A
    /// test observes what services wrote, so its queries read what the log holds
    /// ([`IuClient::latest`]); [`iu_own`](Self::iu_own) reads only its own writes fresh.
    pub fn iu(&self) -> IuClient {
        self.iu_own().latest()
    }

    /// An information-unit client as services hold one: queries reflect its own writes.
    pub fn iu_own(&self) -> IuClient {
        match self.domain() {
            Some(d) => IuClient::with_domain(self.client.clone(), d),
            None => IuClient::new(self.client.clone()),
        }
    }

    /// The environment cimctl (or an admin-run service) needs to reach this CIM: the admin
    /// credentials and the JetStream domain under generated permissions, nothing otherwise.
    pub fn admin_env(&self) -> Vec<(&'static str, String)> {
        match &self.auth {
            Some(a) => vec![
                ("CIM_NATS_CREDS", a.admin_creds.to_string_lossy().into_owned()),
                ("CIM_JS_DOMAIN", LEAF_DOMAIN.to_string()),
            ],
            None => Vec::new(),
        }
    }

    /// The single server (not on a cluster).
    pub fn server(&self) -> &NatsServer {
        match &self.nats {
            Nats::Server(s) => s,
            Nats::Cluster(_) => panic!("the fixture runs a cluster; use cluster()"),
        }
    }

    /// The single server, to stop or restart it.
    pub fn server_mut(&mut self) -> &mut NatsServer {
        match &mut self.nats {
            Nats::Server(s) => s,
            Nats::Cluster(_) => panic!("the fixture runs a cluster; use cluster_mut()"),
        }
    }

    /// The cluster (only when built with [`CimFixtureBuilder::cluster`]).
    pub fn cluster(&self) -> &NatsCluster {
        match &self.nats {
            Nats::Cluster(c) => c,
            Nats::Server(_) => panic!("the fixture runs a single server; use server()"),
        }
    }

    /// The cluster, to kill or restart nodes.
    pub fn cluster_mut(&mut self) -> &mut NatsCluster {
        match &mut self.nats {
            Nats::Cluster(c) => c,
            Nats::Server(_) => panic!("the fixture runs a single server; use server_mut()"),
        }
    }

    /// Starts one more service and waits until it is ready (unless [`Svc::no_wait`]).
    pub async fn start(&mut self, svc: impl Into<Svc>) -> Result<&mut ServiceProc> {
        let svc = svc.into();
        let wait = svc.wait;
        let i = self.spawn(svc)?;
        if wait {
            wait_ready(&self.client, &self.services[i]).await?;
        }
        Ok(&mut self.services[i])
    }

    fn spawn(&mut self, svc: Svc) -> Result<usize> {
        let mut args: Vec<&str> = Vec::new();
        if self.cluster && !svc.args.iter().any(|a| a == "--tier") {
            args.extend(["--tier", "cluster"]);
        }
        args.extend(svc.args.iter().map(String::as_str));
        let mut env: Vec<(String, String)> = Vec::new();
        match (&self.auth, svc.own_identity) {
            (None, true) => bail!("{}: own_identity() needs a fixture with generated_permissions()", svc.component),
            (None, false) => {}
            (Some(a), own) => {
                let creds = if own {
                    let perms = generated_permissions(svc.component)?;
                    a.account.user(svc.component.service_name(), perms).write_creds(a.dir.path())?
                } else {
                    a.admin_creds.clone()
                };
                env.push(("CIM_NATS_CREDS".into(), creds.to_str().context("creds path")?.to_string()));
                env.push(("CIM_JS_DOMAIN".into(), LEAF_DOMAIN.into()));
            }
        }
        env.extend(svc.env.iter().cloned());
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let proc = ServiceProc::start_with_env(svc.component, &self.url, &args, &env)?;
        self.services.push(proc);
        Ok(self.services.len() - 1)
    }

    /// Waits until the `i`-th service (in start order) is ready again, e.g. after a restart.
    pub async fn wait_ready(&self, i: usize) -> Result<cim_events::proto::runtime::DescribeReply> {
        wait_ready(&self.client, &self.services[i]).await
    }

    /// Every service, in start order.
    pub fn services(&self) -> &[ServiceProc] {
        &self.services
    }

    /// Every service, in start order, to signal, stop or restart.
    pub fn services_mut(&mut self) -> &mut [ServiceProc] {
        &mut self.services
    }

    /// The first service of `component`.
    pub fn service(&self, component: Component) -> &ServiceProc {
        self.services.iter().find(|s| s.component == component).unwrap_or_else(|| panic!("no {component} started"))
    }

    /// The first service of `component`, to signal, stop or restart.
    pub fn service_mut(&mut self, component: Component) -> &mut ServiceProc {
        self.services.iter_mut().find(|s| s.component == component).unwrap_or_else(|| panic!("no {component} started"))
    }
}
