//! Queries: pipelines (list, one) and runs (a filtered list from the view, one read from its
//! events).

use cim_events::pipeline::{PipelineInfo, PipelineList, PipelineRef, RunInfo, RunList, RunRef, RunsRequest};
use cim_runtime::{Reply, ServiceError, json_request};

use crate::{
    engine::Engine,
    state::{PipelineVersion, View},
};

impl Engine {
    pub(crate) async fn list(&self, _msg: async_nats::Message) -> Result<Reply, ServiceError> {
        self.caught_up().await?;
        let view = self.view.read().await;
        let pipelines =
            view.pipelines.iter().filter_map(|(name, p)| p.current().map(|v| info(&view, name, p.active, v))).collect();
        Ok(Reply::json(&PipelineList { pipelines }))
    }

    pub(crate) async fn get(&self, msg: async_nats::Message) -> Result<Reply, ServiceError> {
        let req: PipelineRef = json_request(&msg)?;
        self.caught_up().await?;
        let view = self.view.read().await;
        let p = view
            .pipelines
            .get(&req.name)
            .ok_or_else(|| ServiceError::not_found(format!("no pipeline {}", req.name)))?;
        let v = p.current().ok_or_else(|| ServiceError::not_found(format!("no pipeline {}", req.name)))?;
        Ok(Reply::json(&info(&view, &req.name, p.active, v)))
    }

    pub(crate) async fn runs(&self, msg: async_nats::Message) -> Result<Reply, ServiceError> {
        let req: RunsRequest = if msg.payload.is_empty() { RunsRequest::default() } else { json_request(&msg)? };
        self.caught_up().await?;
        let view = self.view.read().await;
        let mut runs: Vec<RunInfo> = view
            .runs
            .values()
            .filter(|r| !r.info.run_id.is_empty())
            .filter(|r| req.pipeline.is_empty() || r.info.pipeline == req.pipeline)
            .filter(|r| req.state.is_empty() || r.info.state == req.state)
            .filter(|r| req.unit_id.is_empty() || r.info.unit_id == req.unit_id)
            .map(|r| r.clone().with_plan(view.definition(&r.info.pipeline, r.info.pipeline_version)).info)
            .collect();
        // UUIDv7 ids sort by time: newest first.
        runs.sort_by(|a, b| b.run_id.cmp(&a.run_id));
        runs.truncate(if req.limit == 0 { 100 } else { req.limit as usize });
        Ok(Reply::json(&RunList { runs }))
    }

    pub(crate) async fn run(&self, msg: async_nats::Message) -> Result<Reply, ServiceError> {
        let req: RunRef = json_request(&msg)?;
        cim_events::token::validate_token("run id", &req.run_id)
            .map_err(|e| ServiceError::bad_request(e.to_string()))?;
        let (run, _) = self
            .load_run(&req.run_id)
            .await
            .map_err(|e| ServiceError::unavailable(e.to_string()))?
            .ok_or_else(|| ServiceError::not_found(format!("no run {}", req.run_id)))?;
        let def = self.definition_of(&run).await;
        Ok(Reply::json(&run.with_plan(def.as_ref()).info))
    }
}

fn info(view: &View, name: &str, active: bool, v: &PipelineVersion) -> PipelineInfo {
    PipelineInfo {
        name: name.to_string(),
        version: v.version,
        digest: v.digest.clone(),
        active,
        definition: v.json.clone(),
        runs: view.counts(name),
    }
}
