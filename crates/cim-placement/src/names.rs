//! The names operators read for registry states (`schedulable`, `running`, …): shown by
//! `cimctl` and written into the registry's refusals and problems.

use cim_events::proto::registry::{InstanceState, NodeState};

/// The name of a node's lifecycle state.
pub fn state_name(s: NodeState) -> &'static str {
    match s {
        NodeState::Unspecified => "unknown",
        NodeState::NodeEnrolling => "enrolling",
        NodeState::NodeSchedulable => "schedulable",
        NodeState::NodeDraining => "draining",
        NodeState::NodeDrained => "drained",
        NodeState::NodeDecommissioned => "decommissioned",
    }
}

/// The name of an instance's state.
pub fn instance_state_name(s: InstanceState) -> &'static str {
    match s {
        InstanceState::Unspecified => "unknown",
        InstanceState::InstanceRunning => "running",
        InstanceState::InstanceDrained => "drained",
        InstanceState::InstanceStopped => "stopped",
        InstanceState::InstanceLost => "lost",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_has_its_own_name() {
        let nodes = [
            NodeState::Unspecified,
            NodeState::NodeEnrolling,
            NodeState::NodeSchedulable,
            NodeState::NodeDraining,
            NodeState::NodeDrained,
            NodeState::NodeDecommissioned,
        ]
        .map(state_name);
        assert_eq!(nodes, ["unknown", "enrolling", "schedulable", "draining", "drained", "decommissioned"]);
        let instances = [
            InstanceState::Unspecified,
            InstanceState::InstanceRunning,
            InstanceState::InstanceDrained,
            InstanceState::InstanceStopped,
            InstanceState::InstanceLost,
        ]
        .map(instance_state_name);
        assert_eq!(instances, ["unknown", "running", "drained", "stopped", "lost"]);
    }
}
