//! The node lifecycle (enrolling → schedulable → draining → drained → decommissioned): its
//! transitions, the drain requests, and the node and desired-state commands.

use async_nats::Message;
use cim_events::{
    Envelope,
    proto::{
        registry::{
            Ack, DesiredSet, EnrollNode, Node, NodeCommand, NodeEnrolled, NodeReply, NodeState, NodeStateChanged,
            SetDesired,
        },
        runtime::DrainRequested,
    },
    registry as names,
    subject::{self, ControlAction},
};
use cim_runtime::{PublishError, Reply, ServiceError, telemetry};
use futures::StreamExt;

use crate::{
    app::{App, bad, decode, refusal},
    state::{self, Event, NodeRefusal},
};

impl App {
    /// Draining nodes whose instances all drained (or went away) become drained.
    pub(crate) async fn settle_nodes(&self) {
        let done: Vec<Node> = {
            let v = self.view();
            v.nodes
                .values()
                .filter(|n| n.state() == NodeState::NodeDraining && state::holding_work(&v, &n.name).is_empty())
                .cloned()
                .collect()
        };
        for n in done {
            let _ = self.transition(&n, NodeState::NodeDrained, "every instance on it drained".into()).await;
        }
    }

    pub(crate) async fn send_drain(&self, node: &str, reason: &str) {
        let Ok(s) = subject::control_node(node, ControlAction::Drain) else { return };
        let req = DrainRequested { node: node.to_string(), reason: reason.to_string() };
        let (mut headers, body) =
            cim_events::payload::encode(&Envelope::root::<DrainRequested>(self.ctx.source()), &req);
        telemetry::inject_current(&mut headers);
        if let Err(e) = self.ctx.client().publish_with_headers(s, headers, body).await {
            tracing::warn!(node, error = %e, "could not send the drain request");
        }
    }

    async fn transition(&self, n: &Node, to: NodeState, reason: String) -> Result<Node, ServiceError> {
        let subject = names::node_event(&n.name, state::transition_action(to)).map_err(bad)?;
        let filter = names::node_history(&n.name).map_err(bad)?;
        let ev = Event::NodeChanged(NodeStateChanged { node: n.name.clone(), from: n.state, to: to as i32, reason });
        match self.record(subject, ev, None, Some((filter, n.version_seq))).await {
            Ok(_) => {}
            Err(PublishError::Conflict) => {
                return Err(ServiceError::conflict(format!("node {} changed concurrently; retry", n.name)));
            }
            Err(PublishError::Failed(e)) => {
                return Err(ServiceError::unavailable(format!("recording the node event: {e}")));
            }
        }
        tracing::info!(node = %n.name, from = state::state_name(n.state()), to = state::state_name(to), "node transition");
        self.view().nodes.get(&n.name).cloned().ok_or_else(|| ServiceError::internal("node vanished"))
    }

    pub(crate) fn node(&self, name: &str) -> Option<Node> {
        self.view().nodes.get(name).cloned()
    }

    // ---- commands ----

    pub async fn enroll(&self, msg: Message) -> Result<Reply, ServiceError> {
        let e: EnrollNode = decode(&msg)?;
        let existing = self.node(&e.name);
        state::check_enroll(existing.as_ref(), &e).map_err(refusal)?;
        let subject = names::node_event(&e.name, names::action::ENROLLED).map_err(bad)?;
        let filter = names::node_history(&e.name).map_err(bad)?;
        let node = Node {
            name: e.name.clone(),
            memory_bytes: e.memory_bytes,
            reserved_bytes: e.reserved_bytes,
            cpus: e.cpus,
            labels: e.labels.clone(),
            jetstream_server: e.jetstream_server.clone(),
            ..Default::default()
        };
        let expect = existing.map(|n| n.version_seq).unwrap_or(0);
        match self
            .record(subject, Event::Enrolled(NodeEnrolled { node: Some(node) }), None, Some((filter, expect)))
            .await
        {
            Ok(_) => {}
            Err(PublishError::Conflict) => {
                return Err(ServiceError::conflict(format!("node {} changed concurrently; retry", e.name)));
            }
            Err(PublishError::Failed(err)) => {
                return Err(ServiceError::unavailable(format!("recording the node event: {err}")));
            }
        }
        let mut node = self.node(&e.name).ok_or_else(|| ServiceError::internal("node vanished"))?;
        if !e.hold {
            node = self.transition(&node, NodeState::NodeSchedulable, "enrolled".into()).await?;
        }
        Ok(Reply::proto(&NodeReply { node: Some(node) }))
    }

    pub async fn node_command(&self, msg: Message, to: NodeState) -> Result<Reply, ServiceError> {
        let c: NodeCommand = decode(&msg)?;
        let node = self.node(&c.name);
        state::check_transition(node.as_ref(), &c.name, to).map_err(refusal)?;
        let node = node.ok_or_else(|| ServiceError::not_found(format!("node {} is not enrolled", c.name)))?;
        if to == NodeState::NodeDecommissioned {
            self.check_stateless(&node).await?;
        }
        let reason = if c.reason.is_empty() { "requested by an operator".to_string() } else { c.reason.clone() };
        let mut node = self.transition(&node, to, reason.clone()).await?;
        if to == NodeState::NodeDraining {
            self.send_drain(&node.name, &reason).await;
            self.settle_nodes().await;
            node = self.node(&node.name).unwrap_or(node);
        }
        Ok(Reply::proto(&NodeReply { node: Some(node) }))
    }

    /// Decommissioning is refused while the node holds anything stateful: instances that have
    /// not drained, or JetStream replicas on its nats-server.
    async fn check_stateless(&self, node: &Node) -> Result<(), ServiceError> {
        let held: Vec<String> = {
            let v = self.view();
            state::holding_work(&v, &node.name).iter().map(|i| i.instance_id.clone()).collect()
        };
        if !held.is_empty() {
            return Err(refusal(NodeRefusal::Stateful {
                node: node.name.clone(),
                what: format!("{} instance(s) that did not drain", held.len()),
                detail: held.join(", "),
            }));
        }
        if node.jetstream_server.is_empty() {
            return Ok(());
        }
        let mut streams = self.js.streams();
        let mut holding = Vec::new();
        while let Some(info) = streams.next().await {
            let info = info.map_err(|e| ServiceError::unavailable(format!("listing streams: {e}")))?;
            let on_node = info.cluster.as_ref().is_some_and(|c| {
                c.leader.as_deref() == Some(node.jetstream_server.as_str())
                    || c.replicas.iter().any(|r| r.name == node.jetstream_server)
            });
            if on_node {
                holding.push(info.config.name.clone());
            }
        }
        if holding.is_empty() {
            return Ok(());
        }
        holding.sort();
        let shown: Vec<&str> = holding.iter().take(5).map(String::as_str).collect();
        let more = if holding.len() > 5 { format!(" and {} more", holding.len() - 5) } else { String::new() };
        Err(refusal(NodeRefusal::Stateful {
            node: node.name.clone(),
            what: format!("replicas of {} stream(s) on nats-server {}", holding.len(), node.jetstream_server),
            detail: format!("{}{more}; move them first (nats stream cluster peer-remove)", shown.join(", ")),
        }))
    }

    pub async fn set_desired(&self, msg: Message) -> Result<Reply, ServiceError> {
        let d: SetDesired = decode(&msg)?;
        let mut seen = std::collections::BTreeSet::new();
        let mut services = Vec::new();
        for mut s in d.services {
            let name = crate::placement::canonical_service(&s.service).map_err(bad)?;
            if !seen.insert(name) {
                return Err(bad(format!("service {name} is listed twice")));
            }
            s.service = name.to_string();
            services.push(s);
        }
        match self.record(names::desired_event(), Event::Desired(DesiredSet { services }), None, None).await {
            Ok(_) => Ok(Reply::proto(&Ack {})),
            Err(PublishError::Conflict) => Err(ServiceError::conflict("desired state changed concurrently; retry")),
            Err(PublishError::Failed(e)) => Err(ServiceError::unavailable(format!("recording the desired state: {e}"))),
        }
    }
}
