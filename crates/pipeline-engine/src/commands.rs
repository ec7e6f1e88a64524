//! Commands: apply and remove a pipeline (with the plugin references it pins), start a run by
//! hand, cancel and retry a run.

use std::time::Duration;

use async_nats::jetstream::kv;
use cim_events::{
    Component, Envelope, Payload,
    pipeline::{self as pl, ApplyReply, ApplyRequest, RemoveRequest, RunInfo, RunRef, StartRequest, action},
    plugin,
    proto::{
        pipeline::{PipelineApplied, PipelineRemoved, RunCancelled, RunRequested, RunRetried},
        plugin::{ListPlugins, ListReply, PluginReference},
    },
    resources,
};
use cim_runtime::{Reply, ServiceError, json_request};
use prost::Message;
use sha2::{Digest, Sha256};

use crate::{
    definition::{self, Definition, PluginRef},
    engine::{Engine, Publish},
};

impl Engine {
    pub(crate) async fn apply(&self, msg: async_nats::Message) -> Result<Reply, ServiceError> {
        let req: ApplyRequest = json_request(&msg)?;
        let def = Definition::parse(&req.definition).map_err(|e| ServiceError::bad_request(e.0))?;
        self.check_plugins(&def).await?;
        let normalized = definition::normalized(&def);
        let digest = format!("sha256:{}", hex(&Sha256::digest(normalized.as_bytes())));
        self.caught_up().await?;
        let (last_seq, current) = {
            let view = self.view.read().await;
            match view.pipelines.get(&def.name) {
                Some(p) => (
                    p.last_seq,
                    p.current().map(|v| (v.version, v.digest.clone(), p.active, v.definition.pinned_plugins())),
                ),
                None => (0, None),
            }
        };
        if let Some((version, d, true, _)) = &current
            && *d == digest
        {
            return Ok(Reply::json(&ApplyReply { name: def.name, version: *version, unchanged: true }));
        }
        // References first, then the event: a concurrent removal of a pinned version is refused.
        let pinned = def.pinned_plugins();
        self.write_references(&def.name, &pinned).await?;
        let version = current.as_ref().map(|c| c.0 + 1).unwrap_or(1);
        let event = PipelineApplied { name: def.name.clone(), version, definition_json: normalized, digest };
        let env = Envelope::root::<PipelineApplied>(self.ctx.source());
        let subject =
            pl::pipeline_event(&def.name, action::APPLIED).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        let filter = pl::pipeline_history(&def.name).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        match self.publish(subject, env.to_headers(), event.encode_to_vec(), Some((filter, last_seq))).await {
            Ok(_) => {}
            Err(Publish::Conflict) => {
                return Err(ServiceError::conflict(format!("pipeline {} changed meanwhile; apply again", def.name)));
            }
            Err(Publish::Failed(e)) => return Err(ServiceError::unavailable(e)),
        }
        if let Some((_, _, _, old)) = current {
            let stale: Vec<(String, String)> = old.into_iter().filter(|p| !pinned.contains(p)).collect();
            self.delete_references(&def.name, &stale).await;
        }
        tracing::info!(pipeline = %def.name, version, "pipeline applied");
        Ok(Reply::json(&ApplyReply { name: def.name, version, unchanged: false }))
    }

    /// Every plugin a definition calls must exist now (unknown plugins are refused at apply).
    async fn check_plugins(&self, def: &Definition) -> Result<(), ServiceError> {
        let refs = def.plugin_refs();
        if refs.is_empty() {
            return Ok(());
        }
        let subject = plugin::query(plugin::qry::LIST).map_err(|e| ServiceError::internal(e.to_string()))?;
        let req = async_nats::Request::new()
            .payload(ListPlugins::default().encode_to_vec().into())
            .timeout(Some(Duration::from_secs(5)));
        let reply =
            self.ctx.client().send_request(subject, req).await.map_err(|e| {
                ServiceError::unavailable(format!("cannot check plugins: no plugin host answers ({e})"))
            })?;
        let list = ListReply::decode(reply.payload)
            .map_err(|e| ServiceError::internal(format!("plugin list does not decode: {e}")))?;
        for (step, p) in refs {
            let ok = match &p {
                PluginRef::Version { name, version } => {
                    list.plugins.iter().any(|x| &x.name == name && &x.version == version && x.state == "ready")
                }
                PluginRef::Capability(c) => {
                    list.plugins.iter().any(|x| x.capabilities.contains(c) && x.state == "ready")
                }
            };
            if !ok {
                return Err(ServiceError::bad_request(format!(
                    "step {step}: unknown plugin {p} (see cimctl plugin ls)"
                )));
            }
        }
        Ok(())
    }

    async fn references(&self) -> Result<kv::Store, ServiceError> {
        let bucket = resources::kv_bucket(Component::PluginHost, plugin::KV_REFERENCES)
            .map_err(|e| ServiceError::internal(e.to_string()))?;
        self.js
            .get_key_value(bucket)
            .await
            .map_err(|e| ServiceError::unavailable(format!("plugin references bucket: {e}")))
    }

    async fn write_references(&self, pipeline: &str, pinned: &[(String, String)]) -> Result<(), ServiceError> {
        if pinned.is_empty() {
            return Ok(());
        }
        let refs = self.references().await?;
        let referrer = pl::plugin_referrer(pipeline).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        for (name, version) in pinned {
            let key = plugin::reference_key(name, version, &referrer)
                .map_err(|e| ServiceError::bad_request(e.to_string()))?;
            let value = PluginReference {
                plugin: name.clone(),
                version: version.clone(),
                referrer: format!("pipeline:{pipeline}"),
                detail: format!("pipeline {pipeline}"),
            };
            refs.put(key, value.encode_to_vec().into())
                .await
                .map_err(|e| ServiceError::unavailable(format!("writing plugin reference: {e}")))?;
        }
        Ok(())
    }

    async fn delete_references(&self, pipeline: &str, stale: &[(String, String)]) {
        if stale.is_empty() {
            return;
        }
        let Ok(refs) = self.references().await else { return };
        let Ok(referrer) = pl::plugin_referrer(pipeline) else { return };
        for (name, version) in stale {
            if let Ok(key) = plugin::reference_key(name, version, &referrer)
                && let Err(e) = refs.delete(&key).await
            {
                tracing::warn!(key, error = %e, "cannot delete a plugin reference");
            }
        }
    }

    pub(crate) async fn remove(&self, msg: async_nats::Message) -> Result<Reply, ServiceError> {
        let req: RemoveRequest = json_request(&msg)?;
        pl::validate_name(&req.name).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        self.caught_up().await?;
        let (last_seq, version, pinned) = {
            let view = self.view.read().await;
            let p = view
                .pipelines
                .get(&req.name)
                .filter(|p| p.active)
                .ok_or_else(|| ServiceError::not_found(format!("no pipeline {}", req.name)))?;
            let v = p.current().ok_or_else(|| ServiceError::not_found(format!("no pipeline {}", req.name)))?;
            (p.last_seq, v.version, v.definition.pinned_plugins())
        };
        let event = PipelineRemoved { name: req.name.clone(), version, reason: req.reason };
        let env = Envelope::root::<PipelineRemoved>(self.ctx.source());
        let subject =
            pl::pipeline_event(&req.name, action::REMOVED).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        let filter = pl::pipeline_history(&req.name).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        match self.publish(subject, env.to_headers(), event.encode_to_vec(), Some((filter, last_seq))).await {
            Ok(_) => {}
            Err(Publish::Conflict) => {
                return Err(ServiceError::conflict(format!("pipeline {} changed meanwhile", req.name)));
            }
            Err(Publish::Failed(e)) => return Err(ServiceError::unavailable(e)),
        }
        self.delete_references(&req.name, &pinned).await;
        Ok(Reply::json(&ApplyReply { name: req.name, version, unchanged: false }))
    }

    pub(crate) async fn start(&self, msg: async_nats::Message) -> Result<Reply, ServiceError> {
        let req: StartRequest = json_request(&msg)?;
        pl::validate_name(&req.pipeline).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        if !req.unit_id.is_empty() {
            cim_events::token::validate_token("unit id", &req.unit_id)
                .map_err(|e| ServiceError::bad_request(e.to_string()))?;
            self.iu
                .unit(&req.unit_id)
                .await
                .map_err(|e| ServiceError::bad_request(format!("unit {}: {e}", req.unit_id)))?;
        }
        let msg_id = match req.request_id.as_str() {
            "" => None,
            id => Some(pl::start_msg_id(id).map_err(|e| ServiceError::bad_request(e.to_string()))?),
        };
        self.caught_up().await?;
        let version = {
            let view = self.view.read().await;
            // A retry of a start the view has seen: the same run (whenever it comes).
            if let Some(run_id) = view.starts.get(&req.request_id).filter(|_| !req.request_id.is_empty()) {
                return Ok(Reply::json(&RunRef { run_id: run_id.clone(), reason: String::new() }));
            }
            let p = view
                .pipelines
                .get(&req.pipeline)
                .filter(|p| p.active)
                .ok_or_else(|| ServiceError::not_found(format!("no pipeline {}", req.pipeline)))?;
            p.current()
                .map(|v| v.version)
                .ok_or_else(|| ServiceError::not_found(format!("no pipeline {}", req.pipeline)))?
        };
        let run_id = uuid::Uuid::now_v7().to_string();
        let request = RunRequested {
            run_id: run_id.clone(),
            pipeline: req.pipeline.clone(),
            pipeline_version: version,
            trigger: "manual".into(),
            unit_id: req.unit_id,
            params: req.params.into_iter().collect(),
            request_id: req.request_id,
            ..Default::default()
        };
        // The caller's envelope, if it sent one, is the cause.
        let env = match msg.headers.as_ref().and_then(|h| Envelope::from_headers(h).ok()) {
            Some(parent) => Envelope::caused_by::<RunRequested>(&parent, self.ctx.source()),
            None => Envelope::root::<RunRequested>(self.ctx.source()),
        };
        let subject = pl::run_event(&run_id, action::REQUESTED).map_err(|e| ServiceError::internal(e.to_string()))?;
        let filter = pl::run_history(&run_id).map_err(|e| ServiceError::internal(e.to_string()))?;
        let mut headers = env.to_headers();
        if let Some(id) = &msg_id {
            headers.insert(cim_events::envelope::H_MSG_ID, id.as_str());
        }
        let ack = self.publish_acked(subject, headers, request.encode_to_vec(), Some((filter, 0))).await.map_err(
            |e| match e {
                Publish::Conflict => ServiceError::conflict("run id collision"),
                Publish::Failed(e) => ServiceError::unavailable(e),
            },
        )?;
        cim_runtime::crash::at("pipeline.start.published");
        if ack.duplicate {
            // A concurrent retry (or one the view has not folded yet): the first one's run.
            return Ok(Reply::json(&RunRef { run_id: self.requested_run(ack.sequence).await?, reason: String::new() }));
        }
        Ok(Reply::json(&RunRef { run_id, reason: String::new() }))
    }

    /// The run the `RunRequested` event at `seq` requested.
    async fn requested_run(&self, seq: u64) -> Result<String, ServiceError> {
        let stream = self
            .js
            .get_stream(&self.events_stream)
            .await
            .map_err(|e| ServiceError::unavailable(format!("pipeline events: {e}")))?;
        let msg = stream
            .get_raw_message(seq)
            .await
            .map_err(|e| ServiceError::unavailable(format!("reading run request {seq}: {e}")))?;
        RunRequested::decode(msg.payload)
            .map(|r| r.run_id)
            .map_err(|e| ServiceError::internal(format!("run request {seq} does not decode: {e}")))
    }

    pub(crate) async fn cancel(&self, msg: async_nats::Message) -> Result<Reply, ServiceError> {
        let req: RunRef = json_request(&msg)?;
        self.change_run(
            &req,
            "cancel",
            |info| !info.is_terminal(),
            |run_id, reason| (action::CANCELLED, RunCancelled { run_id, reason }.encode_to_vec(), RunCancelled::TYPE),
        )
        .await
    }

    pub(crate) async fn retry(&self, msg: async_nats::Message) -> Result<Reply, ServiceError> {
        let req: RunRef = json_request(&msg)?;
        self.change_run(
            &req,
            "retry",
            |info| info.state == "failed" || info.state == "cancelled",
            |run_id, reason| (action::RETRIED, RunRetried { run_id, reason }.encode_to_vec(), RunRetried::TYPE),
        )
        .await
    }

    /// Writes a cancel or retry event if the run's state allows it, retrying on conflicts.
    async fn change_run(
        &self,
        req: &RunRef,
        what: &str,
        allowed: impl Fn(&RunInfo) -> bool,
        event: impl Fn(String, String) -> (&'static str, Vec<u8>, &'static str),
    ) -> Result<Reply, ServiceError> {
        cim_events::token::validate_token("run id", &req.run_id)
            .map_err(|e| ServiceError::bad_request(e.to_string()))?;
        for _ in 0..10 {
            let (run, parent) = self
                .load_run(&req.run_id)
                .await
                .map_err(|e| ServiceError::unavailable(e.to_string()))?
                .ok_or_else(|| ServiceError::not_found(format!("no run {}", req.run_id)))?;
            if !allowed(&run.info) {
                return Err(ServiceError::conflict(format!(
                    "cannot {what} run {}: it is {}",
                    req.run_id, run.info.state
                )));
            }
            let (act, body, type_name) = event(req.run_id.clone(), req.reason.clone());
            let schema = cim_events::Schema { name: type_name.to_string(), version: 1 };
            let env = Envelope::new_caused_by(&parent, type_name, schema, self.ctx.source());
            let subject = pl::run_event(&req.run_id, act).map_err(|e| ServiceError::bad_request(e.to_string()))?;
            let filter = pl::run_history(&req.run_id).map_err(|e| ServiceError::bad_request(e.to_string()))?;
            match self.publish(subject, env.to_headers(), body, Some((filter, run.info.last_seq))).await {
                Ok(_) => {
                    let (run, _) = self
                        .load_run(&req.run_id)
                        .await
                        .map_err(|e| ServiceError::unavailable(e.to_string()))?
                        .ok_or_else(|| ServiceError::not_found("run vanished"))?;
                    let def = self.definition_of(&run).await;
                    return Ok(Reply::json(&run.with_plan(def.as_ref()).info));
                }
                Err(Publish::Conflict) => continue,
                Err(Publish::Failed(e)) => return Err(ServiceError::unavailable(e)),
            }
        }
        Err(ServiceError::conflict(format!("run {} keeps changing; try again", req.run_id)))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
