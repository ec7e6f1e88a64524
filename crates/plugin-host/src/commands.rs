//! Commands: push (verify, store, record a version; immutable versions, the same bytes again
//! are a no-op; the built-ins every host ships) and remove (the references check, then the
//! module deleted once the retention guard allows).

use async_nats::Message;
use cim_events::{
    plugin,
    proto::plugin::{
        Manifest, PluginInfo, PluginPushed, PluginReference, PluginRemoved, PushPlugin, PushReply, RemovePlugin,
        RemoveReply,
    },
};
use cim_runtime::{Reply, ServiceError};
use futures::StreamExt;
use prost::Message as _;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::{builtin::BUILTINS, host::Host};

impl Host {
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

    pub(crate) async fn push_builtins(&self) {
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
