//! The registry's view as a pure fold of its events (instances, nodes, desired state), the node
//! lifecycle rules, and the reasons something is not converging. No I/O: unit-tested here.

use std::collections::BTreeMap;

use cim_events::{
    Component, Payload,
    proto::registry::{
        DesiredService, DesiredSet, Instance, InstanceDrained, InstanceDuplicated, InstanceLost, InstanceRegistered,
        InstanceState, InstanceStopped, Node, NodeEnrolled, NodeState, NodeStateChanged, Problem,
    },
};
use prost::Message as _;

pub use cim_placement::names::{instance_state_name, state_name};

/// One registry event, decoded.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Boxed: an instance is by far the largest payload.
    Registered(Box<InstanceRegistered>),
    Drained(InstanceDrained),
    Stopped(InstanceStopped),
    Lost(InstanceLost),
    Duplicated(InstanceDuplicated),
    Enrolled(NodeEnrolled),
    NodeChanged(NodeStateChanged),
    Desired(DesiredSet),
}

impl Event {
    /// Decodes a stored event by its schema name.
    pub fn decode(type_name: &str, bytes: &[u8]) -> Result<Event, String> {
        fn d<M: prost::Message + Default>(b: &[u8]) -> Result<M, String> {
            M::decode(b).map_err(|e| e.to_string())
        }
        Ok(match type_name {
            InstanceRegistered::TYPE => Event::Registered(Box::new(d(bytes)?)),
            InstanceDrained::TYPE => Event::Drained(d(bytes)?),
            InstanceStopped::TYPE => Event::Stopped(d(bytes)?),
            InstanceLost::TYPE => Event::Lost(d(bytes)?),
            InstanceDuplicated::TYPE => Event::Duplicated(d(bytes)?),
            NodeEnrolled::TYPE => Event::Enrolled(d(bytes)?),
            NodeStateChanged::TYPE => Event::NodeChanged(d(bytes)?),
            DesiredSet::TYPE => Event::Desired(d(bytes)?),
            other => return Err(format!("unknown registry event type {other}")),
        })
    }

    /// Schema name and protobuf bytes.
    pub fn encode(&self) -> (&'static str, Vec<u8>) {
        match self {
            Event::Registered(e) => (InstanceRegistered::TYPE, e.encode_to_vec()),
            Event::Drained(e) => (InstanceDrained::TYPE, e.encode_to_vec()),
            Event::Stopped(e) => (InstanceStopped::TYPE, e.encode_to_vec()),
            Event::Lost(e) => (InstanceLost::TYPE, e.encode_to_vec()),
            Event::Duplicated(e) => (InstanceDuplicated::TYPE, e.encode_to_vec()),
            Event::Enrolled(e) => (NodeEnrolled::TYPE, e.encode_to_vec()),
            Event::NodeChanged(e) => (NodeStateChanged::TYPE, e.encode_to_vec()),
            Event::Desired(e) => (DesiredSet::TYPE, e.encode_to_vec()),
        }
    }

    /// The instance this event is about, if any.
    pub fn instance_id(&self) -> Option<&str> {
        match self {
            Event::Registered(e) => e.instance.as_ref().map(|i| i.instance_id.as_str()),
            Event::Drained(e) => Some(&e.instance_id),
            Event::Stopped(e) => Some(&e.instance_id),
            Event::Lost(e) => Some(&e.instance_id),
            Event::Duplicated(e) => Some(&e.instance_id),
            _ => None,
        }
    }

    pub fn node(&self) -> Option<&str> {
        match self {
            Event::Enrolled(e) => e.node.as_ref().map(|n| n.name.as_str()),
            Event::NodeChanged(e) => Some(&e.node),
            _ => None,
        }
    }
}

/// Applies an instance event (stored at `seq`, at `time_ms`) to the instance's state.
/// Idempotent: an event at or below the state's sequence changes nothing.
pub fn apply_instance(current: Option<Instance>, seq: u64, time_ms: i64, event: &Event) -> Option<Instance> {
    if current.as_ref().is_some_and(|c| c.version_seq >= seq) {
        return current;
    }
    let touch = |mut i: Instance, state: InstanceState, reason: String| {
        i.state = state as i32;
        i.reason = reason;
        i.changed_ms = time_ms;
        i.version_seq = seq;
        Some(i)
    };
    match (current, event) {
        (_, Event::Registered(r)) => {
            let mut i = r.instance.clone()?;
            i.state = InstanceState::InstanceRunning as i32;
            i.registered_ms = time_ms;
            i.changed_ms = time_ms;
            i.version_seq = seq;
            i.reason.clear();
            i.duplicate.clear();
            Some(i)
        }
        (Some(i), Event::Drained(d)) if d.incarnation == i.incarnation => {
            touch(i, InstanceState::InstanceDrained, format!("drained ({} requests abandoned)", d.abandoned))
        }
        (Some(i), Event::Stopped(s)) if s.incarnation.is_empty() || s.incarnation == i.incarnation => {
            touch(i, InstanceState::InstanceStopped, format!("said goodbye: {}", s.reason))
        }
        (Some(i), Event::Lost(l)) if l.incarnation == i.incarnation => {
            touch(i, InstanceState::InstanceLost, format!("no heartbeat for more than {} ms", l.ttl_ms))
        }
        (Some(mut i), Event::Duplicated(d)) => {
            i.duplicate =
                format!("another process ({}) on node {} uses this instance id", d.other_incarnation, d.other_node);
            i.version_seq = seq;
            i.changed_ms = time_ms;
            Some(i)
        }
        (Some(mut i), _) => {
            // An event of an older incarnation: nothing changes but the sequence.
            i.version_seq = seq;
            Some(i)
        }
        (None, _) => None,
    }
}

/// Applies a node event to the node's state. Idempotent like [`apply_instance`].
pub fn apply_node(current: Option<Node>, seq: u64, time_ms: i64, event: &Event) -> Option<Node> {
    if current.as_ref().is_some_and(|c| c.version_seq >= seq) {
        return current;
    }
    match (current, event) {
        (_, Event::Enrolled(e)) => {
            let mut n = e.node.clone()?;
            n.state = NodeState::NodeEnrolling as i32;
            n.version_seq = seq;
            n.changed_ms = time_ms;
            Some(n)
        }
        (Some(mut n), Event::NodeChanged(c)) => {
            n.state = c.to;
            n.reason = c.reason.clone();
            n.version_seq = seq;
            n.changed_ms = time_ms;
            Some(n)
        }
        (current, _) => current,
    }
}

/// The whole view: what the registry knows, folded from its events.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub instances: BTreeMap<String, Instance>,
    pub nodes: BTreeMap<String, Node>,
    pub desired: Option<Vec<DesiredService>>,
    pub desired_seq: u64,
    /// Highest stream sequence applied.
    pub applied: u64,
}

impl View {
    pub fn apply(&mut self, seq: u64, time_ms: i64, event: &Event) {
        if let Some(id) = event.instance_id() {
            let next = apply_instance(self.instances.get(id).cloned(), seq, time_ms, event);
            if let Some(i) = next {
                self.instances.insert(id.to_string(), i);
            }
        } else if let Some(name) = event.node() {
            if let Some(n) = apply_node(self.nodes.get(name).cloned(), seq, time_ms, event) {
                self.nodes.insert(name.to_string(), n);
            }
        } else if let Event::Desired(d) = event
            && seq > self.desired_seq
        {
            self.desired = Some(d.services.clone());
            self.desired_seq = seq;
        }
        self.applied = self.applied.max(seq);
    }

    /// Instances that are alive (running or drained), in id order.
    pub fn alive(&self) -> impl Iterator<Item = &Instance> {
        self.instances.values().filter(|i| is_alive(i))
    }

    /// What should run: the set desired state, or one instance of each of the seven services.
    pub fn desired_or_default(&self) -> (Vec<DesiredService>, bool) {
        match &self.desired {
            Some(d) => (d.clone(), false),
            None => (
                Component::ALL
                    .iter()
                    .map(|c| DesiredService {
                        service: c.service_name().to_string(),
                        replicas: 1,
                        ..Default::default()
                    })
                    .collect(),
                true,
            ),
        }
    }
}

pub fn is_alive(i: &Instance) -> bool {
    matches!(i.state(), InstanceState::InstanceRunning | InstanceState::InstanceDrained)
}

/// Why a node command is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodeRefusal {
    #[error("node {0} is not enrolled")]
    Unknown(String),
    #[error("node {node} is {state}: {what}")]
    WrongState { node: String, state: &'static str, what: &'static str },
    #[error("node {node} still holds {what}: {detail}")]
    Stateful { node: String, what: String, detail: String },
    #[error("{0}")]
    Invalid(String),
}

/// The event action of a node transition to `to`.
pub fn transition_action(to: NodeState) -> &'static str {
    use cim_events::registry::action;
    match to {
        NodeState::NodeSchedulable => action::SCHEDULABLE,
        NodeState::NodeDraining => action::DRAINING,
        NodeState::NodeDrained => action::DRAINED,
        NodeState::NodeDecommissioned => action::DECOMMISSIONED,
        _ => action::ENROLLED,
    }
}

/// Checks an enrollment. Re-enrolling a decommissioned node starts it over; enrolling a node
/// that is in service is refused (drain and decommission it first).
pub fn check_enroll(existing: Option<&Node>, e: &cim_events::proto::registry::EnrollNode) -> Result<(), NodeRefusal> {
    cim_events::token::validate_token("node", &e.name).map_err(|err| NodeRefusal::Invalid(err.to_string()))?;
    if e.memory_bytes == 0 {
        return Err(NodeRefusal::Invalid(format!("node {}: memory must be more than 0", e.name)));
    }
    if !(e.cpus > 0.0 && e.cpus.is_finite()) {
        return Err(NodeRefusal::Invalid(format!("node {}: cpus must be more than 0", e.name)));
    }
    if e.reserved_bytes >= e.memory_bytes {
        return Err(NodeRefusal::Invalid(format!(
            "node {}: reserved memory ({}) leaves nothing of {}",
            e.name, e.reserved_bytes, e.memory_bytes
        )));
    }
    if let Some(n) = existing
        && n.state() != NodeState::NodeDecommissioned
    {
        return Err(NodeRefusal::WrongState {
            node: n.name.clone(),
            state: state_name(n.state()),
            what: "already enrolled (decommission it to enroll it again)",
        });
    }
    Ok(())
}

/// Checks a requested transition against the lifecycle
/// enrolling → schedulable → draining → drained → decommissioned (drained → schedulable puts a
/// node back in service). Returns the node's current state.
pub fn check_transition(node: Option<&Node>, name: &str, to: NodeState) -> Result<NodeState, NodeRefusal> {
    let n = node.ok_or_else(|| NodeRefusal::Unknown(name.to_string()))?;
    let from = n.state();
    let ok = matches!(
        (from, to),
        (NodeState::NodeEnrolling | NodeState::NodeDrained, NodeState::NodeSchedulable)
            | (NodeState::NodeEnrolling | NodeState::NodeSchedulable, NodeState::NodeDraining)
            | (NodeState::NodeDraining, NodeState::NodeDrained)
            | (NodeState::NodeDrained | NodeState::NodeEnrolling, NodeState::NodeDecommissioned)
    );
    if ok {
        return Ok(from);
    }
    let what = match to {
        NodeState::NodeSchedulable => "only an enrolling or drained node can become schedulable",
        NodeState::NodeDraining => "only an enrolling or schedulable node can be drained",
        NodeState::NodeDecommissioned => "drain it first",
        _ => "not a valid transition",
    };
    Err(NodeRefusal::WrongState { node: name.to_string(), state: state_name(from), what })
}

/// Instances on `node` that still hold work (alive and not drained).
pub fn holding_work<'a>(view: &'a View, node: &str) -> Vec<&'a Instance> {
    view.alive().filter(|i| i.node == node && i.state() == InstanceState::InstanceRunning).collect()
}

/// Parses `MAJOR.MINOR.PATCH` (pre-release and build suffixes ignored) for ordering.
pub fn semver(v: &str) -> Option<(u64, u64, u64)> {
    let core = v.split(['-', '+']).next()?;
    let mut it = core.split('.').map(|p| p.parse::<u64>().ok());
    Some((it.next()??, it.next()??, it.next()??))
}

/// What the live registry adds to the folded view per instance (from heartbeats).
#[derive(Clone, Debug, Default)]
pub struct LiveFacts {
    pub ready: bool,
    pub draining: bool,
    pub seen_ms_ago: Option<u64>,
}

/// Every reason the system is not where it should be, one line each, in a stable order.
pub fn problems(view: &View, live: &dyn Fn(&str) -> LiveFacts) -> Vec<Problem> {
    let mut out = Vec::new();
    let p = |subject: String, reason: String| Problem { subject, reason };
    let (desired, _) = view.desired_or_default();
    let serving = |svc: &str| -> Vec<&Instance> {
        view.alive()
            .filter(|i| (i.service == svc || i.component == svc) && i.state() == InstanceState::InstanceRunning)
            .filter(|i| {
                view.nodes
                    .get(&i.node)
                    .is_none_or(|n| matches!(n.state(), NodeState::NodeSchedulable | NodeState::NodeEnrolling))
            })
            .collect()
    };
    for d in &desired {
        let have = serving(&d.service);
        if (have.len() as u32) < d.replicas {
            let lost: Vec<String> = view
                .instances
                .values()
                .filter(|i| {
                    (i.service == d.service || i.component == d.service) && i.state() == InstanceState::InstanceLost
                })
                .map(|i| format!("{} on {}", i.instance_id, i.node))
                .collect();
            let mut reason = format!("{} of {} desired instances running", have.len(), d.replicas);
            if !lost.is_empty() {
                reason.push_str(&format!("; lost: {}", lost.join(", ")));
            }
            out.push(p(d.service.clone(), reason));
        }
    }
    let newest: BTreeMap<&str, (u64, u64, u64)> = view.alive().fold(BTreeMap::new(), |mut m, i| {
        if let Some(v) = semver(&i.version) {
            let e = m.entry(i.service.as_str()).or_insert(v);
            *e = (*e).max(v);
        }
        m
    });
    for i in view.instances.values() {
        let who = format!("instance {}", i.instance_id);
        match i.state() {
            InstanceState::InstanceLost => out.push(p(who.clone(), format!("lost on node {}: {}", i.node, i.reason))),
            InstanceState::InstanceRunning | InstanceState::InstanceDrained => {
                if !i.incompatible.is_empty() {
                    out.push(p(who.clone(), format!("incompatible: {}", i.incompatible)));
                }
                if !i.duplicate.is_empty() {
                    out.push(p(who.clone(), format!("duplicate instance id: {}", i.duplicate)));
                }
                if let (Some(v), Some(n)) = (semver(&i.version), newest.get(i.service.as_str()))
                    && v < *n
                {
                    out.push(p(who.clone(), format!("stale version {} while {}.{}.{} runs", i.version, n.0, n.1, n.2)));
                }
                let facts = live(&i.instance_id);
                if i.state() == InstanceState::InstanceRunning
                    && !facts.ready
                    && !facts.draining
                    && facts.seen_ms_ago.is_some()
                {
                    out.push(p(who.clone(), "not ready (NATS or its streams unavailable)".into()));
                }
                if !view.nodes.is_empty() && !view.nodes.contains_key(&i.node) {
                    out.push(p(who.clone(), format!("runs on node {}, which is not enrolled", i.node)));
                }
            }
            _ => {}
        }
    }
    for n in view.nodes.values() {
        let who = format!("node {}", n.name);
        match n.state() {
            NodeState::NodeDraining => {
                let held: Vec<String> = holding_work(view, &n.name).iter().map(|i| i.instance_id.clone()).collect();
                out.push(p(
                    who,
                    format!("draining: waiting for {} instance(s) to drain: {}", held.len(), held.join(", ")),
                ));
            }
            NodeState::NodeEnrolling => {
                out.push(p(who, "enrolling: not schedulable yet (`cimctl node schedule`)".into()))
            }
            NodeState::NodeDrained | NodeState::NodeDecommissioned => {
                let running = holding_work(view, &n.name);
                if !running.is_empty() {
                    let ids: Vec<&str> = running.iter().map(|i| i.instance_id.as_str()).collect();
                    out.push(p(
                        who,
                        format!("{} but runs instances that take work: {}", state_name(n.state()), ids.join(", ")),
                    ));
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use cim_events::proto::registry::EnrollNode;

    fn inst(id: &str, svc: &str, node: &str, inc: &str) -> Instance {
        Instance {
            instance_id: id.into(),
            component: Component::parse(svc).map(|c| c.token().to_string()).unwrap_or_default(),
            service: svc.into(),
            version: "0.1.0".into(),
            node: node.into(),
            incarnation: inc.into(),
            contract_version: 1,
            ..Default::default()
        }
    }

    fn registered(i: Instance) -> Event {
        Event::Registered(Box::new(InstanceRegistered { instance: Some(i) }))
    }

    fn node_changed(n: &str, from: NodeState, to: NodeState) -> Event {
        Event::NodeChanged(NodeStateChanged { node: n.into(), from: from as i32, to: to as i32, reason: String::new() })
    }

    #[test]
    fn events_round_trip_and_unknown_types_are_refused() {
        let e = registered(inst("a", "registry", "n1", "x"));
        let (t, b) = e.encode();
        assert_eq!(Event::decode(t, &b).unwrap(), e);
        assert!(Event::decode("cim.nope", &b).unwrap_err().contains("unknown"));
    }

    #[test]
    fn instance_lifecycle_folds_and_is_idempotent() {
        let mut v = View::default();
        v.apply(1, 10, &registered(inst("a", "registry", "n1", "x")));
        assert_eq!(v.instances["a"].state(), InstanceState::InstanceRunning);
        // an event of another incarnation does not change the state
        v.apply(
            2,
            11,
            &Event::Lost(InstanceLost { instance_id: "a".into(), incarnation: "old".into(), ..Default::default() }),
        );
        assert_eq!(v.instances["a"].state(), InstanceState::InstanceRunning);
        v.apply(
            3,
            12,
            &Event::Lost(InstanceLost {
                instance_id: "a".into(),
                incarnation: "x".into(),
                ttl_ms: 600,
                ..Default::default()
            }),
        );
        assert_eq!(v.instances["a"].state(), InstanceState::InstanceLost);
        assert!(v.instances["a"].reason.contains("600"));
        // replaying an older event changes nothing
        v.apply(1, 10, &registered(inst("a", "registry", "n1", "x")));
        assert_eq!(v.instances["a"].state(), InstanceState::InstanceLost);
        v.apply(4, 13, &registered(inst("a", "registry", "n1", "y")));
        assert_eq!(v.instances["a"].state(), InstanceState::InstanceRunning);
        v.apply(
            5,
            14,
            &Event::Drained(InstanceDrained { instance_id: "a".into(), incarnation: "y".into(), abandoned: 0 }),
        );
        assert_eq!(v.instances["a"].state(), InstanceState::InstanceDrained);
        v.apply(
            6,
            15,
            &Event::Stopped(InstanceStopped {
                instance_id: "a".into(),
                incarnation: "y".into(),
                reason: "shutdown".into(),
            }),
        );
        assert_eq!(v.instances["a"].state(), InstanceState::InstanceStopped);
        assert_eq!(v.applied, 6);
    }

    #[test]
    fn node_lifecycle_allows_only_the_documented_transitions() {
        let mut v = View::default();
        let enroll = EnrollNode {
            name: "n1".into(),
            memory_bytes: 8 << 30,
            reserved_bytes: 1 << 30,
            cpus: 4.0,
            ..Default::default()
        };
        check_enroll(None, &enroll).unwrap();
        v.apply(1, 1, &Event::Enrolled(NodeEnrolled { node: Some(Node { name: "n1".into(), ..Default::default() }) }));
        fn get(v: &View) -> Option<Node> {
            v.nodes.get("n1").cloned()
        }
        assert_eq!(get(&v).unwrap().state(), NodeState::NodeEnrolling);
        assert!(check_enroll(get(&v).as_ref(), &enroll).unwrap_err().to_string().contains("already enrolled"));
        let err = check_transition(get(&v).as_ref(), "n1", NodeState::NodeDrained).unwrap_err();
        assert!(err.to_string().contains("node n1 is enrolling"), "{err}");
        check_transition(get(&v).as_ref(), "n1", NodeState::NodeSchedulable).unwrap();
        v.apply(2, 2, &node_changed("n1", NodeState::NodeEnrolling, NodeState::NodeSchedulable));
        let err = check_transition(get(&v).as_ref(), "n1", NodeState::NodeDecommissioned).unwrap_err();
        assert_eq!(err.to_string(), "node n1 is schedulable: drain it first");
        check_transition(get(&v).as_ref(), "n1", NodeState::NodeDraining).unwrap();
        v.apply(3, 3, &node_changed("n1", NodeState::NodeSchedulable, NodeState::NodeDraining));
        check_transition(get(&v).as_ref(), "n1", NodeState::NodeDrained).unwrap();
        v.apply(4, 4, &node_changed("n1", NodeState::NodeDraining, NodeState::NodeDrained));
        check_transition(get(&v).as_ref(), "n1", NodeState::NodeSchedulable).unwrap();
        check_transition(get(&v).as_ref(), "n1", NodeState::NodeDecommissioned).unwrap();
        v.apply(5, 5, &node_changed("n1", NodeState::NodeDrained, NodeState::NodeDecommissioned));
        assert!(check_transition(get(&v).as_ref(), "n1", NodeState::NodeSchedulable).is_err());
        check_enroll(get(&v).as_ref(), &enroll).unwrap();
        assert_eq!(
            check_transition(None, "n9", NodeState::NodeDraining).unwrap_err(),
            NodeRefusal::Unknown("n9".into())
        );
    }

    #[test]
    fn bad_enrollments_are_refused() {
        let ok = EnrollNode { name: "n1".into(), memory_bytes: 1 << 30, cpus: 1.0, ..Default::default() };
        for (bad, want) in [
            (EnrollNode { name: "a b".into(), ..ok.clone() }, "whitespace"),
            (EnrollNode { memory_bytes: 0, ..ok.clone() }, "memory"),
            (EnrollNode { cpus: 0.0, ..ok.clone() }, "cpus"),
            (EnrollNode { reserved_bytes: 1 << 30, ..ok.clone() }, "reserved"),
        ] {
            let err = check_enroll(None, &bad).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn problems_name_missing_lost_stale_incompatible_and_draining() {
        let mut v = View {
            desired: Some(vec![
                DesiredService { service: "registry".into(), replicas: 2, ..Default::default() },
                DesiredService { service: "information-unit".into(), replicas: 1, ..Default::default() },
            ]),
            ..Default::default()
        };
        v.apply(1, 1, &registered(inst("r1", "registry", "n1", "a")));
        let mut old = inst("r2", "registry", "n1", "b");
        old.version = "0.0.9".into();
        old.incompatible = "speaks contract v0, the registry v1".into();
        v.apply(2, 2, &registered(old));
        v.apply(3, 3, &registered(inst("iu-1", "information-unit", "n2", "c")));
        v.apply(
            4,
            4,
            &Event::Lost(InstanceLost {
                instance_id: "iu-1".into(),
                incarnation: "c".into(),
                ttl_ms: 600,
                ..Default::default()
            }),
        );
        let live = |_: &str| LiveFacts { ready: true, ..Default::default() };
        let ps = problems(&v, &live);
        let text: Vec<String> = ps.iter().map(|p| format!("{}: {}", p.subject, p.reason)).collect();
        assert!(
            text.iter().any(|t| t.starts_with("information-unit: 0 of 1 desired instances running; lost: iu-1 on n2")),
            "{text:#?}"
        );
        assert!(text.iter().any(|t| t.starts_with("instance iu-1: lost on node n2")), "{text:#?}");
        assert!(text.iter().any(|t| t == "instance r2: stale version 0.0.9 while 0.1.0 runs"), "{text:#?}");
        assert!(text.iter().any(|t| t.contains("incompatible: speaks contract v0")), "{text:#?}");
        assert!(!text.iter().any(|t| t.starts_with("registry:")), "2 registries run: {text:#?}");

        v.apply(5, 5, &Event::Enrolled(NodeEnrolled { node: Some(Node { name: "n1".into(), ..Default::default() }) }));
        v.apply(6, 6, &node_changed("n1", NodeState::NodeEnrolling, NodeState::NodeDraining));
        let text: Vec<String> = problems(&v, &live).iter().map(|p| format!("{}: {}", p.subject, p.reason)).collect();
        assert!(text.iter().any(|t| t == "node n1: draining: waiting for 2 instance(s) to drain: r1, r2"), "{text:#?}");
        assert!(
            text.iter().any(|t| t == "registry: 0 of 2 desired instances running"),
            "instances on a draining node do not count: {text:#?}"
        );
        assert!(
            text.iter().any(|t| t == "instance iu-1: lost on node n2: no heartbeat for more than 600 ms"),
            "{text:#?}"
        );
    }

    #[test]
    fn versions_order_numerically() {
        assert!(semver("0.10.0").unwrap() > semver("0.9.1").unwrap());
        assert_eq!(semver("1.2.3-rc.1+x"), Some((1, 2, 3)));
        assert_eq!(semver("garbage"), None);
    }
}
