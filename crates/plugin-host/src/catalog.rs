//! The catalog: events of `CIM_PLUGIN_EVENTS` applied to the loaded versions (module fetched,
//! digest checked, compiled, served), and the announcements of local and native plugins.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_nats::Message;
use cim_events::{
    payload,
    plugin::{self, RUNTIME_NATIVE, RUNTIME_WASM},
    proto::plugin::{Manifest, PluginAnnounced, PluginInfo, PluginPushed, PluginRemoved},
    subject,
};
use tokio::io::AsyncReadExt;

use crate::{
    commands::digest,
    host::{Catalog, Entry, Host},
    sandbox::Compiled,
};

impl Host {
    /// Applies one event of the plugin stream. Never fails: a version that cannot load is
    /// listed as failed with its reason, and everything else keeps serving.
    pub(crate) async fn apply(self: &Arc<Self>, msg: &async_nats::Message, seq: u64) {
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

    pub(crate) async fn announce_all(&self) {
        let ready: Vec<PluginInfo> = {
            let c = self.catalog.read().unwrap_or_else(|e| e.into_inner());
            c.versions.values().filter(|e| e.compiled.is_some()).map(|e| e.info.clone()).collect()
        };
        for info in ready {
            self.announce(&info).await;
        }
    }

    /// Remembers native plugins that announce themselves.
    pub(crate) fn observe(&self, msg: &Message) {
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

    pub(crate) fn live_natives(c: &Catalog) -> impl Iterator<Item = PluginInfo> + '_ {
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
}
