//! Names of the registry contract: aggregates, actions, endpoints, KV keys and message ids. The
//! payloads are in `proto/cim/registry/v1/registry.proto`.

use crate::{Component, ContractError, subject, token};

const C: Component = Component::Registry;

/// Aggregates whose events live in `CIM_REGISTRY_EVENTS`.
pub const INSTANCE: &str = "instance";
pub const NODE: &str = "node";
pub const DESIRED: &str = "desired";
/// The one id of the `desired` aggregate.
pub const DESIRED_ID: &str = "current";

/// Event actions (last subject token).
pub mod action {
    pub const REGISTERED: &str = "registered";
    pub const DRAINED: &str = "drained";
    pub const STOPPED: &str = "stopped";
    pub const LOST: &str = "lost";
    pub const DUPLICATED: &str = "duplicated";
    pub const ENROLLED: &str = "enrolled";
    pub const SCHEDULABLE: &str = "schedulable";
    pub const DRAINING: &str = "draining";
    pub const DECOMMISSIONED: &str = "decommissioned";
    pub const SET: &str = "set";
    pub const INSTANCE_ALL: [&str; 5] = [REGISTERED, DRAINED, STOPPED, LOST, DUPLICATED];
    /// Node transitions; `drained` is shared with instances.
    pub const NODE_ALL: [&str; 5] = [ENROLLED, SCHEDULABLE, DRAINING, DRAINED, DECOMMISSIONED];
}

/// Command endpoints (`cim.cmd.registry.<name>`).
pub mod cmd {
    pub const ENROLL: &str = "enroll";
    pub const SCHEDULE: &str = "schedule";
    pub const DRAIN: &str = "drain";
    pub const DECOMMISSION: &str = "decommission";
    pub const SET_DESIRED: &str = "set_desired";
    pub const ALL: [&str; 5] = [ENROLL, SCHEDULE, DRAIN, DECOMMISSION, SET_DESIRED];
}

/// Query endpoints (`cim.qry.registry.<name>`).
pub mod qry {
    pub const INSTANCES: &str = "instances";
    pub const NODES: &str = "nodes";
    pub const OVERVIEW: &str = "overview";
    pub const ALL: [&str; 3] = [INSTANCES, NODES, OVERVIEW];
}

/// KV bucket purposes (`cim_registry_<purpose>`).
pub const KV_INSTANCES: &str = "instances";
pub const KV_NODES: &str = "nodes";

/// KV key of the projection checkpoint (last applied stream sequence), in the instances bucket.
pub const CHECKPOINT_KEY: &str = "checkpoint";
/// KV key of the desired state, in the nodes bucket.
pub const DESIRED_KEY: &str = "desired";

/// Durable consumer that keeps the KV projections current.
pub fn projector_consumer() -> String {
    format!("{}-projector", C.token())
}

/// KV key of an instance.
pub fn instance_key(instance_id: &str) -> Result<String, ContractError> {
    token::validate_token("instance id", instance_id)?;
    Ok(format!("i.{instance_id}"))
}

/// KV key of a node.
pub fn node_key(node: &str) -> Result<String, ContractError> {
    token::validate_token("node", node)?;
    Ok(format!("n.{node}"))
}

pub fn instance_event(instance_id: &str, action: &str) -> Result<String, ContractError> {
    subject::event(C, INSTANCE, instance_id, action)
}

pub fn instance_history(instance_id: &str) -> Result<String, ContractError> {
    subject::aggregate_filter(C, INSTANCE, instance_id)
}

pub fn node_event(node: &str, action: &str) -> Result<String, ContractError> {
    subject::event(C, NODE, node, action)
}

pub fn node_history(node: &str) -> Result<String, ContractError> {
    subject::aggregate_filter(C, NODE, node)
}

pub fn desired_event() -> String {
    subject::event(C, DESIRED, DESIRED_ID, action::SET).expect("constant, valid tokens")
}

pub fn command(name: &str) -> Result<String, ContractError> {
    subject::command(C, name)
}

pub fn query(name: &str) -> Result<String, ContractError> {
    subject::query(C, name)
}

/// Dead letters of lifecycle messages the registry refused: `cim.dlq.registry.lifecycle`.
pub fn lifecycle_dead_letter() -> String {
    subject::dead_letter(C, "lifecycle").expect("a constant, valid token")
}

/// Header of a dead letter: why it was refused (one line).
pub const DLQ_REASON: &str = "CIM-Dead-Letter-Reason";
/// Header of a dead letter: the subject it arrived on.
pub const DLQ_SUBJECT: &str = "CIM-Dead-Letter-Subject";

/// `Nats-Msg-Id` of an instance event: every registry instance that observes the same fact
/// writes the same id, so JetStream keeps it once.
pub fn instance_msg_id(action: &str, instance_id: &str, incarnation: &str) -> String {
    format!("registry.{action}.{instance_id}.{incarnation}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(instance_event("iu-1", action::LOST).unwrap(), "cim.evt.registry.instance.iu-1.lost");
        assert_eq!(instance_history("iu-1").unwrap(), "cim.evt.registry.instance.iu-1.*");
        assert_eq!(node_event("n2", action::DRAINING).unwrap(), "cim.evt.registry.node.n2.draining");
        assert_eq!(desired_event(), "cim.evt.registry.desired.current.set");
        assert_eq!(command(cmd::ENROLL).unwrap(), "cim.cmd.registry.enroll");
        assert_eq!(query(qry::OVERVIEW).unwrap(), "cim.qry.registry.overview");
        assert_eq!(instance_key("a").unwrap(), "i.a");
        assert_eq!(node_key("n1").unwrap(), "n.n1");
        assert!(node_key("a b").is_err());
        assert_eq!(projector_consumer(), "registry-projector");
        assert_eq!(lifecycle_dead_letter(), "cim.dlq.registry.lifecycle");
        crate::subject::parse_event(&desired_event()).unwrap();
    }
}
