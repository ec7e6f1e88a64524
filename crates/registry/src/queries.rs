//! Queries: discovery (instances by component, capability, node), nodes, and the overview
//! with the problems that keep the system from converging.

use std::{sync::atomic::Ordering, time::Duration};

use async_nats::{HeaderMap, Message};
use cim_events::{
    Component,
    proto::{
        registry::{
            ComponentDescription, GetOverview, Instance, InstanceList, InstanceState, ListInstances, ListNodes,
            NodeList, NodeState, Overview,
        },
        runtime::DescribeReply,
    },
    subject,
};
use cim_runtime::{Reply, ServiceError, telemetry};
use prost::Message as _;
use tracing::Instrument;

use crate::{
    app::{App, bad, decode},
    state::{self, LiveFacts},
};

impl App {
    // ---- queries ----

    fn facts(&self, id: &str) -> (LiveFacts, i64, u64) {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        match live.get(id).and_then(|l| l.beats.get(&l.last_incarnation).map(|b| (l, b))) {
            Some((l, (t, ms))) => (
                LiveFacts { ready: l.ready, draining: l.draining, seen_ms_ago: Some(t.elapsed().as_millis() as u64) },
                *ms,
                l.in_flight,
            ),
            None => (LiveFacts::default(), 0, 0),
        }
    }

    fn with_facts(&self, mut i: Instance) -> Instance {
        let (f, ms, in_flight) = self.facts(&i.instance_id);
        i.ready = f.ready;
        i.last_seen_ms = ms;
        i.in_flight = in_flight;
        i.degraded = self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&i.instance_id)
            .map(|l| l.degraded.clone())
            .unwrap_or_default();
        i
    }

    pub async fn instances(&self, msg: Message) -> Result<Reply, ServiceError> {
        let q: ListInstances = decode(&msg)?;
        let component =
            if q.component.is_empty() { None } else { Some(Component::parse(&q.component).map_err(bad)?.token()) };
        let picked: Vec<Instance> = self
            .view()
            .instances
            .values()
            .filter(|i| q.include_gone || state::is_alive(i))
            .filter(|i| component.is_none_or(|c| i.component == c))
            .filter(|i| q.capability.is_empty() || i.capabilities.iter().any(|c| c == &q.capability))
            .filter(|i| q.node.is_empty() || i.node == q.node)
            .cloned()
            .collect();
        let instances = picked.into_iter().map(|i| self.with_facts(i)).collect();
        Ok(Reply::proto(&InstanceList { instances }))
    }

    pub async fn nodes(&self, msg: Message) -> Result<Reply, ServiceError> {
        let q: ListNodes = decode(&msg)?;
        let nodes = self
            .view()
            .nodes
            .values()
            .filter(|n| q.include_decommissioned || n.state() != NodeState::NodeDecommissioned)
            .cloned()
            .collect();
        Ok(Reply::proto(&NodeList { nodes }))
    }

    pub async fn overview(&self, msg: Message) -> Result<Reply, ServiceError> {
        let q: GetOverview = decode(&msg)?;
        let (instances, nodes, desired, desired_is_default, problems) = {
            let v = self.view();
            let live = |id: &str| self.facts(id).0;
            let problems = state::problems(&v, &live);
            let (desired, default) = v.desired_or_default();
            let instances: Vec<Instance> =
                v.instances.values().filter(|i| i.state() != InstanceState::InstanceStopped).cloned().collect();
            (instances, v.nodes.values().cloned().collect::<Vec<_>>(), desired, default, problems)
        };
        let described = if q.deep { self.describe_all().await } else { Vec::new() };
        Ok(Reply::proto(&Overview {
            instances: instances.into_iter().map(|i| self.with_facts(i)).collect(),
            nodes,
            desired,
            desired_is_default,
            problems,
            described,
            registry_instance: self.ctx.settings().instance_id.clone(),
            heartbeats_seen: self.heartbeats.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
        }))
    }

    /// Asks one instance of every other component to describe itself, concurrently, carrying
    /// the trace context (so one overview is one trace across the services).
    async fn describe_all(&self) -> Vec<ComponentDescription> {
        let calls = Component::ALL.into_iter().filter(|c| *c != crate::COMPONENT).map(|c| {
            let client = self.ctx.client().clone();
            let span = tracing::info_span!("describe", component = c.token());
            async move {
                let mut d = ComponentDescription { component: c.token().to_string(), ..Default::default() };
                let mut headers = HeaderMap::new();
                telemetry::inject_current(&mut headers);
                let Ok(subject) = subject::query(c, "describe") else { return d };
                match tokio::time::timeout(
                    Duration::from_secs(2),
                    client.request_with_headers(subject, headers, bytes::Bytes::new()),
                )
                .await
                {
                    Ok(Ok(reply)) => {
                        if let Some(code) = reply.headers.as_ref().and_then(|h| h.get("Nats-Service-Error-Code")) {
                            d.error = format!("error {code}");
                        } else {
                            match DescribeReply::decode(reply.payload) {
                                Ok(r) => {
                                    d.ready = r.ready;
                                    d.instance_id = r.service.map(|s| s.instance_id).unwrap_or_default();
                                }
                                Err(e) => d.error = format!("reply does not decode: {e}"),
                            }
                        }
                    }
                    Ok(Err(e)) => d.error = e.to_string(),
                    Err(_) => d.error = "no answer within 2s".into(),
                }
                d
            }
            .instrument(span)
        });
        futures::future::join_all(calls).await
    }
}
