//! Property tests of what the registry decodes from outside: its events read back from the log
//! and folded into the view (then the problems it reports), node enrollments and transitions,
//! desired-state requests, and the versions services announce.
//!
//! Budget: [`config`] runs 256 cases per property unless `PROPTEST_CASES` says otherwise
//! (docs/testing.md: `PROPTEST_CASES=100000 cargo nextest run -p registry props`).

use cim_events::{
    Payload,
    proto::registry::{
        DesiredSet, EnrollNode, InstanceDrained, InstanceDuplicated, InstanceLost, InstanceRegistered, InstanceStopped,
        Node, NodeCommand, NodeEnrolled, NodeState, NodeStateChanged, SetDesired,
    },
};
use cim_testkit::props::{config, wire};
use proptest::prelude::*;
use prost::Message;

use crate::state::{self, Event, LiveFacts, View};

const EVENT_TYPES: [&str; 9] = [
    InstanceRegistered::TYPE,
    InstanceDrained::TYPE,
    InstanceStopped::TYPE,
    InstanceLost::TYPE,
    InstanceDuplicated::TYPE,
    NodeEnrolled::TYPE,
    NodeStateChanged::TYPE,
    DesiredSet::TYPE,
    "cim.registry.nope",
];

fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(-0.0),
        Just(f64::MIN_POSITIVE),
        Just(f64::MAX),
        any::<f64>(),
        0.0..64.0
    ]
}

fn node_state() -> impl Strategy<Value = NodeState> {
    prop_oneof![
        Just(NodeState::NodeEnrolling),
        Just(NodeState::NodeSchedulable),
        Just(NodeState::NodeDraining),
        Just(NodeState::NodeDrained),
        Just(NodeState::NodeDecommissioned),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Registry events from the log (any body under any type name): decoded or refused; what
    /// decodes round-trips and folds into the view, whose problems can then be listed, at any
    /// sequence and time, never a panic.
    #[test]
    fn events_decode_fold_and_report(
        events in prop::collection::vec((0usize..EVENT_TYPES.len(), wire(), prop_oneof![Just(u64::MAX), any::<u64>(), 0u64..10], any::<i64>()), 1..10),
        seen in prop::option::of(any::<u64>()), ready in any::<bool>(),
    ) {
        let mut view = View::default();
        for (t, body, seq, time) in events {
            if let Ok(e) = Event::decode(EVENT_TYPES[t], &body) {
                let (name, bytes) = e.encode();
                let again = Event::decode(name, &bytes);
                // Desired states carry CPU figures, which may be NaN (not equal to themselves).
                #[allow(clippy::eq_op)]
                let comparable = e == e;
                if comparable {
                    prop_assert_eq!(again, Ok(e.clone()));
                }
                view.apply(seq, time, &e);
            }
        }
        let live = |_: &str| LiveFacts { ready, draining: false, seen_ms_ago: seen };
        let _ = state::problems(&view, &live);
        let _ = view.desired_or_default();
        for n in view.nodes.keys() {
            let _ = state::holding_work(&view, n);
        }
    }

    /// Node commands as they arrive (any bytes, or enrollments with any figures): refused with
    /// a reason or accepted only with a usable node.
    #[test]
    fn node_commands_are_checked(
        data in wire(), name in prop_oneof!["[a-z0-9-]{1,12}", ".{0,12}"], memory in any::<u64>(), reserved in any::<u64>(),
        cpus in float(), existing in prop::option::of(node_state()), to in node_state(),
    ) {
        if let Ok(e) = EnrollNode::decode(data.as_slice()) {
            let _ = state::check_enroll(None, &e);
        }
        if let Ok(c) = NodeCommand::decode(data.as_slice()) {
            let _ = cim_events::token::validate_token("node", &c.name);
        }
        let e = EnrollNode { name: name.clone(), memory_bytes: memory, reserved_bytes: reserved, cpus, ..Default::default() };
        let node = existing.map(|s| Node { name: name.clone(), state: s as i32, ..Default::default() });
        if state::check_enroll(node.as_ref(), &e).is_ok() {
            prop_assert!(memory > 0 && reserved < memory && cpus > 0.0 && cpus.is_finite());
        }
        let _ = state::check_transition(node.as_ref(), &name, to);
        let _ = state::transition_action(to);
    }

    /// Desired-state requests: any bytes decode or not; each service name is canonical or
    /// refused.
    #[test]
    fn desired_state_requests_are_checked(data in wire()) {
        if let Ok(d) = SetDesired::decode(data.as_slice()) {
            for s in &d.services {
                let _ = crate::placement::canonical_service(&s.service);
            }
        }
    }

    /// Versions as services announce them: parsed or not, never a panic; `a.b.c` parses.
    #[test]
    fn versions_parse_or_not(v in ".{0,20}", a in any::<u64>(), b in any::<u64>(), c in any::<u64>(), suffix in "([-+][a-z0-9.]{0,6})?") {
        let _ = state::semver(&v);
        prop_assert_eq!(state::semver(&format!("{a}.{b}.{c}{suffix}")), Some((a, b, c)));
    }
}
