//! The plugin host's state and handlers: a catalog of plugin versions rebuilt from
//! `CIM_PLUGIN_EVENTS` (pushed/removed) and the modules in `cim_plugin_artifacts`; one
//! subscription per ready WebAssembly version on its invoke subject; routing by name or
//! capability to local WebAssembly or to native plugins seen announcing; push and remove with
//! immutable versions and the references check.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use async_nats::{
    HeaderMap, Message,
    jetstream::{self, consumer::DeliverPolicy, kv, object_store::ObjectStore},
};
use bytes::Bytes;
use cim_events::{
    Envelope, Payload, Upcasters, payload,
    plugin::{self, RUNTIME_NATIVE, RUNTIME_WASM},
    proto::plugin::{
        InvokeError, InvokeReply, InvokeRequest, ListPlugins, ListReply, Manifest, PluginAnnounced, PluginInfo,
        PluginPushed, PluginReference, PluginRemoved, PushPlugin, PushReply, RemovePlugin, RemoveReply, StatsReply,
        Status,
    },
    resources, subject,
};
use cim_runtime::{Ctx, NewEvent, PublishError, Reply, ServiceError};
use futures::StreamExt;
use prost::Message as _;
use sha2::{Digest, Sha256};
use tokio::{io::AsyncReadExt, sync::watch};

use crate::{
    PluginArgs,
    builtin::BUILTINS,
    invoker::Invoker,
    sandbox::{Compiled, Sandbox},
};

/// How long a push or remove waits for its own event to be applied.
const APPLY_WAIT: Duration = Duration::from_secs(30);

/// A plugin version this host knows from the event stream.
struct Entry {
    info: PluginInfo,
    compiled: Option<Arc<Compiled>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
        }
    }
}

/// How often modules of removed versions are checked for deletion (the retention guard may
/// have held them back until their archive was verified).
const REMOVED_MODULE_SWEEP: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Catalog {
    /// Live versions by (name, version).
    versions: BTreeMap<(String, String), Entry>,
    /// Every version ever pushed and its digest: versions are immutable even after removal.
    ever: HashMap<(String, String), String>,
    /// Last event sequence per plugin name (optimistic concurrency).
    last_seq: HashMap<String, u64>,
    /// Native plugins seen announcing, with when.
    natives: HashMap<(String, String), (PluginAnnounced, Instant)>,
}

pub struct Host {
    ctx: Ctx,
    sandbox: Sandbox,
    invoker: Invoker,
    bucket: ObjectStore,
    refs: kv::Store,
    max_module: u64,
    catalog: RwLock<Catalog>,
    applied: watch::Sender<u64>,
    upcasters: Upcasters,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").finish_non_exhaustive()
    }
}

enum Target {
    Local(Arc<Compiled>, PluginInfo),
    Native(PluginInfo),
}

impl Host {
    /// Replays the catalog, loads every plugin, pushes the built-ins, and starts serving.
    pub async fn start(ctx: Ctx, args: &PluginArgs) -> anyhow::Result<Arc<Host>> {
        let js = ctx.jetstream().clone();
        let bucket = js.get_object_store(plugin::ARTIFACTS_BUCKET).await?;
        let refs = js.get_key_value(resources::kv_bucket(crate::COMPONENT, plugin::KV_REFERENCES)?).await?;
        let host = Arc::new(Host {
            sandbox: Sandbox::new(args.policy())?,
            invoker: Invoker::new(args.parallelism(), args.plugin_queue as usize),
            bucket,
            refs,
            max_module: args.plugin_max_module,
            catalog: RwLock::new(Catalog::default()),
            applied: watch::channel(0).0,
            upcasters: Upcasters::default(),
            ctx: ctx.clone(),
        });

        // Replay before serving: a restarted host answers for every plugin it had.
        let stream = js.get_stream(resources::events_stream(crate::COMPONENT).name).await?;
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: plugin::all_events(),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await?;
        let mut pending = consumer.cached_info().num_pending;
        let mut messages = consumer.messages().await?;
        while pending > 0 {
            let Some(m) = messages.next().await else { anyhow::bail!("event stream ended during replay") };
            let m = m?;
            let info = m.info().map_err(|e| anyhow::anyhow!("event without metadata: {e}"))?;
            let (seq, left) = (info.stream_sequence, info.pending);
            host.apply(&m.message, seq).await;
            pending = left;
        }
        let h = host.clone();
        ctx.spawn("plugin-events", async move {
            loop {
                tokio::select! {
                    m = messages.next() => match m {
                        Some(Ok(m)) => {
                            let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
                            h.apply(&m.message, seq).await;
                        }
                        Some(Err(e)) => tracing::warn!(error = %e, "reading plugin events"),
                        None => break,
                    },
                    _ = h.ctx.stopping() => break,
                }
            }
        });

        let h = host.clone();
        let mut announcements = ctx.client().subscribe(plugin::all_announcements()).await?;
        ctx.spawn("plugin-announcements", async move {
            loop {
                tokio::select! {
                    m = announcements.next() => match m {
                        Some(m) => h.observe(&m),
                        None => break,
                    },
                    _ = h.ctx.stopping() => break,
                }
            }
        });
        let h = host.clone();
        ctx.spawn("plugin-announce", async move {
            let every = h.announce_every();
            loop {
                h.announce_all().await;
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = h.ctx.stopping() => break,
                }
            }
        });

        if !args.no_builtins {
            host.push_builtins().await;
        }
        let h = host.clone();
        ctx.spawn("removed-modules", async move {
            loop {
                h.sweep_removed_modules().await;
                tokio::select! {
                    _ = tokio::time::sleep(REMOVED_MODULE_SWEEP) => {}
                    _ = h.ctx.stopping() => break,
                }
            }
        });
        Ok(host)
    }

    fn announce_every(&self) -> Duration {
        self.ctx.settings().heartbeat_interval.max(Duration::from_millis(100))
    }

    // ---- the catalog ----

    /// Applies one event of the plugin stream. Never fails: a version that cannot load is
    /// listed as failed with its reason, and everything else keeps serving.
    async fn apply(self: &Arc<Self>, msg: &async_nats::Message, seq: u64) {
        let Ok(parsed) = subject::parse_event(&msg.subject) else {
            tracing::warn!(subject = %msg.subject, "ignoring an event with an unexpected subject");
            return;
        };
        let name = parsed.id.clone();
        self.catalog.write().unwrap_or_else(|e| e.into_inner()).last_seq.insert(name.clone(), seq);
        match parsed.action.as_str() {
            plugin::action::PUSHED => {
                match payload::decode::<PluginPushed>(msg.headers.as_ref(), &msg.payload, &self.upcasters) {
                    Ok((_, pushed)) => self.load(pushed).await,
                    Err(e) => tracing::warn!(seq, error = %e, "undecodable plugin event"),
                }
            }
            plugin::action::REMOVED => {
                match payload::decode::<PluginRemoved>(msg.headers.as_ref(), &msg.payload, &self.upcasters) {
                    Ok((_, removed)) => {
                        let mut c = self.catalog.write().unwrap_or_else(|e| e.into_inner());
                        c.versions.remove(&(removed.name.clone(), removed.version.clone()));
                        tracing::info!(plugin = %plugin::reference(&removed.name, &removed.version), "plugin removed");
                    }
                    Err(e) => tracing::warn!(seq, error = %e, "undecodable plugin event"),
                }
            }
            other => tracing::debug!(action = other, "ignoring plugin event"),
        }
        self.applied.send_replace(seq);
    }

    async fn load(self: &Arc<Self>, pushed: PluginPushed) {
        let manifest = pushed.manifest.clone().unwrap_or_default();
        let (name, version) = (manifest.name.clone(), manifest.version.clone());
        let key = (name.clone(), version.clone());
        self.catalog.write().unwrap_or_else(|e| e.into_inner()).ever.insert(key.clone(), pushed.digest.clone());
        let builtin = crate::builtin::Builtin::find(&name).is_some_and(|b| b.version == version);
        let mut info = PluginInfo {
            name: name.clone(),
            version: version.clone(),
            digest: pushed.digest.clone(),
            size: pushed.size,
            capabilities: manifest.capabilities.clone(),
            runtime: RUNTIME_WASM.to_string(),
            subject: plugin::invoke_subject(&name, &version).unwrap_or_default(),
            state: String::new(),
            limits: None,
            description: manifest.description.clone(),
            builtin,
        };
        let compiled = match self.fetch_and_compile(&pushed, &manifest).await {
            Ok(c) => {
                info.state = "ready".into();
                info.limits = Some(c.limits());
                Some(Arc::new(c))
            }
            Err(reason) => {
                tracing::warn!(plugin = %plugin::reference(&name, &version), %reason, "plugin cannot load");
                info.state = format!("failed: {reason}");
                None
            }
        };
        let server = match &compiled {
            Some(c) => match self.serve(c.clone(), info.clone()).await {
                Ok(task) => Some(task),
                Err(e) => {
                    info.state = format!("failed: cannot subscribe: {e}");
                    None
                }
            },
            None => None,
        };
        tracing::info!(plugin = %plugin::reference(&name, &version), state = %info.state, "plugin loaded");
        let announce = compiled.is_some().then(|| info.clone());
        self.catalog.write().unwrap_or_else(|e| e.into_inner()).versions.insert(key, Entry { info, compiled, server });
        if let Some(info) = announce {
            self.announce(&info).await;
        }
    }

    async fn fetch_and_compile(&self, pushed: &PluginPushed, manifest: &Manifest) -> Result<Compiled, String> {
        let mut object = self
            .bucket
            .get(&pushed.object)
            .await
            .map_err(|e| format!("module {} is not in the artifact bucket: {e}", pushed.object))?;
        let mut wasm = Vec::with_capacity(pushed.size as usize);
        object.read_to_end(&mut wasm).await.map_err(|e| format!("reading module {}: {e}", pushed.object))?;
        let digest = digest(&wasm);
        if digest != pushed.digest {
            return Err(format!("module {} has digest {digest}, the event says {}", pushed.object, pushed.digest));
        }
        let (sandbox, manifest) = (self.sandbox.clone(), manifest.clone());
        tokio::task::spawn_blocking(move || sandbox.load(&wasm, &manifest))
            .await
            .map_err(|e| format!("compiling panicked: {e}"))?
            .map_err(|e| e.to_string())
    }

    /// Serves one ready version on its own invoke subject.
    async fn serve(
        self: &Arc<Self>,
        compiled: Arc<Compiled>,
        info: PluginInfo,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let group = plugin::queue_group(&info.name, &info.version)?;
        let mut sub = self.ctx.client().queue_subscribe(info.subject.clone(), group).await?;
        let host = self.clone();
        Ok(tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let (host, compiled, info) = (host.clone(), compiled.clone(), info.clone());
                tokio::spawn(async move {
                    let reply = match decode_request(&msg) {
                        Ok(req) => host.run_local(compiled, &info, req).await,
                        Err(r) => r,
                    };
                    if let Some(to) = msg.reply {
                        let (headers, body) = encode_reply(&reply);
                        if let Err(e) = host.ctx.client().publish_with_headers(to, headers, body).await {
                            tracing::warn!(error = %e, "could not send an invocation reply");
                        }
                    }
                });
            }
        }))
    }

    async fn run_local(&self, compiled: Arc<Compiled>, info: &PluginInfo, req: InvokeRequest) -> InvokeReply {
        let timeout = (req.timeout_ms > 0).then(|| Duration::from_millis(u64::from(req.timeout_ms)));
        let outcome = self.invoker.run(compiled, Bytes::from(req.input), req.metadata, timeout).await;
        InvokeReply {
            status: outcome.status as i32,
            output: outcome.output,
            metadata: outcome.metadata.into_iter().collect(),
            error: (outcome.status != Status::Ok)
                .then(|| InvokeError { status: outcome.status as i32, message: outcome.message }),
            plugin: info.name.clone(),
            version: info.version.clone(),
            digest: info.digest.clone(),
            runtime: RUNTIME_WASM.to_string(),
            duration_us: outcome.duration.as_micros() as u64,
            fuel_used: outcome.fuel_used,
        }
    }

    async fn announce(&self, info: &PluginInfo) {
        let Ok(subject) = plugin::announce_subject(&info.name, &info.version) else { return };
        let msg = PluginAnnounced {
            name: info.name.clone(),
            version: info.version.clone(),
            digest: info.digest.clone(),
            capabilities: info.capabilities.clone(),
            runtime: RUNTIME_WASM.to_string(),
            subject: info.subject.clone(),
            instance_id: self.ctx.settings().instance_id.clone(),
            description: info.description.clone(),
            every_ms: self.announce_every().as_millis() as u32,
        };
        if let Err(e) = self.ctx.publish_root(subject, &msg).await {
            tracing::debug!(error = %e, "could not announce a plugin");
        }
    }

    async fn announce_all(&self) {
        let ready: Vec<PluginInfo> = {
            let c = self.catalog.read().unwrap_or_else(|e| e.into_inner());
            c.versions.values().filter(|e| e.compiled.is_some()).map(|e| e.info.clone()).collect()
        };
        for info in ready {
            self.announce(&info).await;
        }
    }

    /// Remembers native plugins that announce themselves.
    fn observe(&self, msg: &Message) {
        let Ok((_, a)) = payload::decode::<PluginAnnounced>(msg.headers.as_ref(), &msg.payload, &self.upcasters) else {
            tracing::debug!(subject = %msg.subject, "ignoring an undecodable plugin announcement");
            return;
        };
        if a.runtime != RUNTIME_NATIVE
            || plugin::validate_name(&a.name).is_err()
            || plugin::validate_version(&a.version).is_err()
        {
            return;
        }
        // The subject must be the contract's, so a plugin cannot capture another's traffic.
        if plugin::invoke_subject(&a.name, &a.version).ok().as_deref() != Some(a.subject.as_str()) {
            return;
        }
        let mut c = self.catalog.write().unwrap_or_else(|e| e.into_inner());
        c.natives.insert((a.name.clone(), a.version.clone()), (a, Instant::now()));
    }

    fn live_natives(c: &Catalog) -> impl Iterator<Item = PluginInfo> + '_ {
        c.natives
            .values()
            .filter(|(a, seen)| seen.elapsed() < Duration::from_millis(u64::from(a.every_ms.max(100)) * 3))
            .map(|(a, _)| PluginInfo {
                name: a.name.clone(),
                version: a.version.clone(),
                digest: a.digest.clone(),
                size: 0,
                capabilities: a.capabilities.clone(),
                runtime: RUNTIME_NATIVE.to_string(),
                subject: a.subject.clone(),
                state: "ready".into(),
                limits: None,
                description: a.description.clone(),
                builtin: false,
            })
    }

    // ---- handlers ----

    pub fn stats(&self) -> StatsReply {
        self.invoker.stats()
    }

    pub async fn list(&self, msg: Message) -> Result<Reply, ServiceError> {
        let q = ListPlugins::decode(msg.payload)
            .map_err(|e| ServiceError::bad_request(format!("undecodable list request: {e}")))?;
        let c = self.catalog.read().unwrap_or_else(|e| e.into_inner());
        let mut plugins: Vec<PluginInfo> =
            c.versions.values().map(|e| e.info.clone()).chain(Self::live_natives(&c)).collect();
        plugins.retain(|p| {
            (q.name.is_empty() || p.name == q.name)
                && (q.capability.is_empty() || p.capabilities.contains(&q.capability))
        });
        plugins.sort_by(|a, b| {
            a.name
                .cmp(&b.name)
                .then_with(|| compare_versions(&a.version, &b.version))
                .then_with(|| a.runtime.cmp(&b.runtime))
        });
        Ok(Reply::proto(&ListReply { plugins }))
    }

    /// `cim.cmd.plugin.invoke`: resolve by name[@version] or capability, then run locally or
    /// forward to the native plugin.
    pub async fn route(&self, msg: Message) -> Result<Reply, ServiceError> {
        let req = match decode_request(&msg) {
            Ok(r) => r,
            Err(reply) => return Ok(reply_of(&reply)),
        };
        let reply = match self.resolve(&req) {
            Err(reply) => reply,
            Ok(Target::Local(compiled, info)) => self.run_local(compiled, &info, req).await,
            Ok(Target::Native(info)) => self.forward(&info, req).await,
        };
        Ok(reply_of(&reply))
    }

    fn resolve(&self, req: &InvokeRequest) -> Result<Target, InvokeReply> {
        let c = self.catalog.read().unwrap_or_else(|e| e.into_inner());
        let wasm = c.versions.values().filter(|e| e.compiled.is_some()).map(|e| e.info.clone());
        let candidates: Vec<PluginInfo> = if !req.plugin.is_empty() {
            if plugin::validate_name(&req.plugin).is_err()
                || (!req.version.is_empty() && plugin::validate_version(&req.version).is_err())
            {
                return Err(failure(
                    Status::BadRequest,
                    format!("invalid plugin reference {:?}", plugin::reference(&req.plugin, &req.version)),
                ));
            }
            // A version that exists but failed to load is unavailable, not missing.
            if let Some(e) = c.versions.get(&(req.plugin.clone(), req.version.clone()))
                && e.compiled.is_none()
            {
                return Err(failure(
                    Status::Unavailable,
                    format!("{} is not loaded: {}", plugin::reference(&req.plugin, &req.version), e.info.state),
                ));
            }
            wasm.chain(Self::live_natives(&c))
                .filter(|p| p.name == req.plugin && (req.version.is_empty() || p.version == req.version))
                .collect()
        } else if !req.capability.is_empty() {
            wasm.chain(Self::live_natives(&c)).filter(|p| p.capabilities.contains(&req.capability)).collect()
        } else {
            return Err(failure(Status::BadRequest, "an invocation names a plugin or a capability".into()));
        };
        // Newest version first; at equal versions, local WebAssembly before a network hop.
        let best = candidates.into_iter().max_by(|a, b| {
            compare_versions(&a.version, &b.version)
                .then_with(|| (a.runtime == RUNTIME_WASM).cmp(&(b.runtime == RUNTIME_WASM)))
        });
        let Some(best) = best else {
            let what = if req.plugin.is_empty() {
                format!("no plugin has the capability {:?}", req.capability)
            } else if req.version.is_empty() {
                format!("no plugin {:?}", req.plugin)
            } else {
                format!("no plugin {}", plugin::reference(&req.plugin, &req.version))
            };
            return Err(failure(Status::NotFound, what));
        };
        if best.runtime == RUNTIME_NATIVE {
            return Ok(Target::Native(best));
        }
        match c.versions.get(&(best.name.clone(), best.version.clone())).and_then(|e| e.compiled.clone()) {
            Some(compiled) => Ok(Target::Local(compiled, best)),
            None => Err(failure(
                Status::Unavailable,
                format!("{} is not loaded", plugin::reference(&best.name, &best.version)),
            )),
        }
    }

    async fn forward(&self, info: &PluginInfo, req: InvokeRequest) -> InvokeReply {
        let timeout = if req.timeout_ms > 0 {
            Duration::from_millis(u64::from(req.timeout_ms))
        } else {
            self.sandbox.policy().max_timeout
        };
        let started = Instant::now();
        let request = self.ctx.client().request(info.subject.clone(), Bytes::from(req.encode_to_vec()));
        let mut reply = match tokio::time::timeout(timeout + Duration::from_millis(500), request).await {
            Err(_) => failure(
                Status::DeadlineExceeded,
                format!(
                    "native plugin {} did not answer within {timeout:?}",
                    plugin::reference(&info.name, &info.version)
                ),
            ),
            Ok(Err(e)) => failure(
                Status::Unavailable,
                format!("native plugin {} cannot be reached: {e}", plugin::reference(&info.name, &info.version)),
            ),
            Ok(Ok(m)) => match InvokeReply::decode(m.payload.clone()) {
                Ok(r) if Status::try_from(r.status).is_ok_and(|s| s != Status::Unspecified) => r,
                _ => failure(
                    Status::MalformedOutput,
                    format!(
                        "native plugin {} replied with something that is not an invoke reply",
                        plugin::reference(&info.name, &info.version)
                    ),
                ),
            },
        };
        if reply.plugin.is_empty() {
            reply.plugin = info.name.clone();
            reply.version = info.version.clone();
            reply.digest = info.digest.clone();
        }
        reply.runtime = RUNTIME_NATIVE.to_string();
        if reply.duration_us == 0 {
            reply.duration_us = started.elapsed().as_micros() as u64;
        }
        reply
    }

    pub async fn push(&self, msg: Message) -> Result<Reply, ServiceError> {
        let req = PushPlugin::decode(msg.payload)
            .map_err(|e| ServiceError::bad_request(format!("undecodable push request: {e}")))?;
        let manifest = req.manifest.ok_or_else(|| ServiceError::bad_request("a push carries a manifest"))?;
        validate_manifest(&manifest)?;
        let Some(upload_id) = req.upload.strip_prefix(plugin::UPLOAD_PREFIX) else {
            return Err(ServiceError::bad_request(format!("upload must be named {}<id>", plugin::UPLOAD_PREFIX)));
        };
        plugin::upload_object(upload_id).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        let info = self
            .bucket
            .info(&req.upload)
            .await
            .map_err(|e| ServiceError::not_found(format!("upload {} not found: {e}", req.upload)))?;
        if info.size as u64 > self.max_module {
            return Err(ServiceError::bad_request(format!(
                "module is {} bytes; this host takes at most {}",
                info.size, self.max_module
            )));
        }
        let mut object = self
            .bucket
            .get(&req.upload)
            .await
            .map_err(|e| ServiceError::not_found(format!("upload {} not found: {e}", req.upload)))?;
        let mut wasm = Vec::new();
        object
            .read_to_end(&mut wasm)
            .await
            .map_err(|e| ServiceError::unavailable(format!("reading upload {}: {e}", req.upload)))?;
        let result = self.store(manifest, wasm).await;
        if let Err(e) = self.bucket.delete(&req.upload).await {
            tracing::debug!(upload = %req.upload, error = %e, "could not delete an upload");
        }
        let (plugin, already_present) = result?;
        Ok(Reply::proto(&PushReply { plugin: Some(plugin), already_present }))
    }

    /// Verifies, stores and records one version; the same bytes again are a no-op.
    async fn store(&self, manifest: Manifest, wasm: Vec<u8>) -> Result<(PluginInfo, bool), ServiceError> {
        let (name, version) = (manifest.name.clone(), manifest.version.clone());
        let r = plugin::reference(&name, &version);
        let digest = digest(&wasm);
        let expected = {
            let c = self.catalog.read().unwrap_or_else(|e| e.into_inner());
            match c.ever.get(&(name.clone(), version.clone())) {
                Some(d) if *d != digest => {
                    return Err(ServiceError::conflict(format!(
                        "{r} already exists with digest {d}; versions are immutable, push a new version"
                    )));
                }
                Some(_) => {
                    if let Some(e) = c.versions.get(&(name.clone(), version.clone())) {
                        return Ok((e.info.clone(), true));
                    }
                }
                None => {}
            }
            c.last_seq.get(&name).copied().unwrap_or(0)
        };
        // Refuse what would not load here before it enters the store.
        let (sandbox, m, bytes) = (self.sandbox.clone(), manifest.clone(), wasm.clone());
        tokio::task::spawn_blocking(move || sandbox.load(&bytes, &m).map(|_| ()))
            .await
            .map_err(|e| ServiceError::internal(format!("compiling panicked: {e}")))?
            .map_err(|e| ServiceError::bad_request(format!("{r} refused: {e}")))?;
        let object = plugin::artifact_object(&name, &version).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        self.bucket
            .put(object.as_str(), &mut wasm.as_slice())
            .await
            .map_err(|e| ServiceError::unavailable(format!("storing {r}: {e}")))?;
        let event = PluginPushed { manifest: Some(manifest), digest, size: wasm.len() as u64, object };
        let subject =
            plugin::event(&name, plugin::action::PUSHED).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        let seq = self.publish(subject, &name, expected, &event).await?;
        self.wait_applied(seq).await?;
        let c = self.catalog.read().unwrap_or_else(|e| e.into_inner());
        let info = c
            .versions
            .get(&(name, version))
            .map(|e| e.info.clone())
            .ok_or_else(|| ServiceError::internal(format!("{r} vanished after its push")))?;
        Ok((info, false))
    }

    pub async fn remove(&self, msg: Message) -> Result<Reply, ServiceError> {
        let req = RemovePlugin::decode(msg.payload)
            .map_err(|e| ServiceError::bad_request(format!("undecodable remove request: {e}")))?;
        plugin::validate_name(&req.name).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        plugin::validate_version(&req.version).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        let r = plugin::reference(&req.name, &req.version);
        let (info, expected) = {
            let c = self.catalog.read().unwrap_or_else(|e| e.into_inner());
            let info = c
                .versions
                .get(&(req.name.clone(), req.version.clone()))
                .map(|e| e.info.clone())
                .ok_or_else(|| ServiceError::not_found(format!("no plugin {r}")))?;
            (info, c.last_seq.get(&req.name).copied().unwrap_or(0))
        };
        let referrers = self.references(&req.name, &req.version).await?;
        if !referrers.is_empty() {
            return Err(ServiceError::conflict(format!(
                "{r} is still referenced by {}; remove those references first",
                referrers.join(", ")
            )));
        }
        let event = PluginRemoved {
            name: req.name.clone(),
            version: req.version.clone(),
            digest: info.digest.clone(),
            reason: req.reason,
        };
        let subject =
            plugin::event(&req.name, plugin::action::REMOVED).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        let seq = self.publish(subject, &req.name, expected, &event).await?;
        self.wait_applied(seq).await?;
        if let Ok(object) = plugin::artifact_object(&req.name, &req.version) {
            self.drop_removed_module(&object).await;
        }
        Ok(Reply::proto(&RemoveReply { plugin: Some(info) }))
    }

    /// Deletes the module of a removed version from the artifacts bucket — once the storage
    /// manager has verified its archive on every required target (the retention guard);
    /// until then it stays, and [`Host::sweep_removed_modules`] tries again.
    async fn drop_removed_module(&self, object: &str) {
        match self.bucket.info(object).await {
            Ok(i) if !i.deleted => {}
            _ => return,
        }
        if let Err(why) =
            cim_runtime::archive_guard::object_removable(self.ctx.jetstream(), plugin::ARTIFACTS_BUCKET, object).await
        {
            tracing::info!(%object, reason = %why, "module of a removed version kept until its archive is verified");
            return;
        }
        match self.bucket.delete(object).await {
            Ok(()) => tracing::info!(%object, "module of a removed version deleted"),
            Err(e) => tracing::warn!(%object, error = %e, "could not delete a removed module"),
        }
    }

    /// Every removed version whose module is still stored: deleted where the guard allows.
    pub async fn sweep_removed_modules(&self) {
        let removed: Vec<String> = {
            let c = self.catalog.read().unwrap_or_else(|e| e.into_inner());
            c.ever
                .keys()
                .filter(|k| !c.versions.contains_key(*k))
                .filter_map(|(n, v)| plugin::artifact_object(n, v).ok())
                .collect()
        };
        for object in removed {
            self.drop_removed_module(&object).await;
        }
    }

    /// Who references a version (`cim_plugin_references`), described for people.
    async fn references(&self, name: &str, version: &str) -> Result<Vec<String>, ServiceError> {
        let prefix = plugin::reference_prefix(name, version).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        let unavailable =
            |e: &dyn std::fmt::Display| ServiceError::unavailable(format!("reading plugin references: {e}"));
        let mut keys = self.refs.keys().await.map_err(|e| unavailable(&e))?;
        let mut out = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| unavailable(&e))?;
            let Some(referrer) = key.strip_prefix(&prefix) else { continue };
            let detail = match self.refs.get(key.as_str()).await {
                Ok(Some(v)) => PluginReference::decode(v).map(|r| r.detail).unwrap_or_default(),
                _ => String::new(),
            };
            out.push(if detail.is_empty() { referrer.to_string() } else { format!("{referrer} ({detail})") });
        }
        Ok(out)
    }

    async fn publish<P: Payload>(
        &self,
        subject: String,
        name: &str,
        expected: u64,
        payload: &P,
    ) -> Result<u64, ServiceError> {
        let env = Envelope::root::<P>(self.ctx.source());
        let filter = plugin::history(name).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        let ack = NewEvent::new(subject, &env, payload.encode_to_vec())
            .msg_id(&env.id().to_string())
            .expect(&filter, expected)
            .publish(self.ctx.jetstream())
            .await
            .map_err(|e| match e {
                PublishError::Conflict => ServiceError::conflict(format!("plugin {name} changed concurrently; retry")),
                e => e.into(),
            })?;
        Ok(ack.sequence)
    }

    async fn wait_applied(&self, seq: u64) -> Result<(), ServiceError> {
        let mut rx = self.applied.subscribe();
        tokio::time::timeout(APPLY_WAIT, rx.wait_for(|s| *s >= seq))
            .await
            .map_err(|_| ServiceError::unavailable("the event was recorded but not yet applied; retry to see it"))?
            .map_err(|_| ServiceError::unavailable("the host is stopping"))?;
        Ok(())
    }

    async fn push_builtins(&self) {
        for b in BUILTINS {
            let r = plugin::reference(b.name, b.version);
            for attempt in 0..3 {
                match self.store(b.manifest(), b.wasm()).await {
                    Ok(_) => break,
                    Err(e) if e.code == 409 && e.message.contains("immutable") => {
                        tracing::warn!(plugin = %r, "a different module already holds this built-in version; keeping it");
                        break;
                    }
                    // Another host pushed it at the same moment: catch up and look again.
                    Err(e) if e.code == 409 && attempt < 2 => {
                        tracing::debug!(plugin = %r, error = %e.message, "retrying a built-in push")
                    }
                    Err(e) => {
                        tracing::warn!(plugin = %r, error = %e.message, "could not push a built-in plugin");
                        break;
                    }
                }
            }
        }
    }
}

fn validate_manifest(m: &Manifest) -> Result<(), ServiceError> {
    let bad = |e: cim_events::ContractError| ServiceError::bad_request(e.to_string());
    plugin::validate_name(&m.name).map_err(bad)?;
    plugin::validate_version(&m.version).map_err(bad)?;
    for c in &m.capabilities {
        plugin::validate_capability(c).map_err(bad)?;
    }
    Ok(())
}

pub fn digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn failure(status: Status, message: String) -> InvokeReply {
    InvokeReply {
        status: status as i32,
        error: Some(InvokeError { status: status as i32, message }),
        ..Default::default()
    }
}

fn decode_request(msg: &Message) -> Result<InvokeRequest, InvokeReply> {
    InvokeRequest::decode(msg.payload.clone())
        .map_err(|e| failure(Status::BadRequest, format!("undecodable invoke request: {e}")))
}

/// The micro-protocol error code that goes with a status (so generic NATS tools see failures).
pub fn error_code(status: Status) -> Option<u16> {
    match status {
        Status::Ok => None,
        Status::BadRequest | Status::InvalidInput => Some(400),
        Status::NotFound => Some(404),
        Status::Unavailable => Some(503),
        Status::DeadlineExceeded => Some(504),
        _ => Some(500),
    }
}

fn error_headers(reply: &InvokeReply) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let status = Status::try_from(reply.status).unwrap_or(Status::Unspecified);
    if let Some(code) = error_code(status) {
        let message = reply.error.as_ref().map(|e| e.message.as_str()).unwrap_or_default();
        headers.insert("Nats-Service-Error-Code", code.to_string().as_str());
        headers.insert("Nats-Service-Error", message.replace(['\r', '\n'], " ").as_str());
    }
    headers
}

fn encode_reply(reply: &InvokeReply) -> (HeaderMap, Bytes) {
    (error_headers(reply), Bytes::from(reply.encode_to_vec()))
}

fn reply_of(reply: &InvokeReply) -> Reply {
    let (headers, body) = encode_reply(reply);
    Reply { headers, body }
}

/// Orders versions: numeric parts numerically, a pre-release (`-...`) before its release.
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    let split = |v: &str| {
        let (core, pre) = match v.split_once('-') {
            Some((c, p)) => (c.to_string(), Some(p.to_string())),
            None => (v.split('+').next().unwrap_or(v).to_string(), None),
        };
        (core, pre)
    };
    let (ca, pa) = split(a);
    let (cb, pb) = split(b);
    let part = |x: &str, y: &str| match (x.parse::<u64>(), y.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        _ => x.cmp(y),
    };
    let (mut ia, mut ib) = (ca.split('.'), cb.split('.'));
    loop {
        match (ia.next(), ib.next()) {
            (None, None) => break,
            (Some(_), None) => return std::cmp::Ordering::Greater,
            (None, Some(_)) => return std::cmp::Ordering::Less,
            (Some(x), Some(y)) => {
                let o = part(x, y);
                if o.is_ne() {
                    return o;
                }
            }
        }
    }
    match (pa, pb) {
        (None, None) => std::cmp::Ordering::Equal,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (Some(_), None) => std::cmp::Ordering::Less,
        (Some(x), Some(y)) => x.cmp(&y),
    }
}

#[cfg(test)]
mod tests {
    use std::cmp::Ordering::*;

    use super::*;

    #[test]
    fn versions_order_like_semver() {
        assert_eq!(compare_versions("1.10.0", "1.9.0"), Greater);
        assert_eq!(compare_versions("1.0.0", "1.0.0-rc.1"), Greater);
        assert_eq!(compare_versions("2", "1.9"), Greater);
        assert_eq!(compare_versions("1.0", "1.0.0"), Less);
        assert_eq!(compare_versions("1.2.3", "1.2.3"), Equal);
    }

    #[test]
    fn statuses_map_to_error_codes() {
        assert_eq!(error_code(Status::Ok), None);
        assert_eq!(error_code(Status::NotFound), Some(404));
        assert_eq!(error_code(Status::Unavailable), Some(503));
        assert_eq!(error_code(Status::Trapped), Some(500));
        assert_eq!(digest(b"").len(), "sha256:".len() + 64);
    }
}
