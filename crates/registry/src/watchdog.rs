//! The watchdog: marks silent instances lost, flags duplicate instance ids, asks strangers to
//! announce, and moves draining nodes on.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use cim_events::{
    proto::registry::{Instance, InstanceDuplicated, InstanceLost, InstanceState, NodeState},
    registry as names,
    subject::{self, ControlAction},
};

use crate::{
    app::{App, now_ms},
    state::Event,
};

impl App {
    /// Every quarter of the smallest TTL (at most 250 ms): marks silent instances lost,
    /// flags duplicate instance ids, asks strangers to announce, moves drained nodes on.
    pub async fn run_watchdog(self: Arc<Self>) {
        let every = (self.opts.min_ttl / 4).min(Duration::from_millis(250));
        let mut resent: HashMap<String, Instant> = HashMap::new();
        loop {
            if !self.ctx.pause(every).await {
                return;
            }
            self.check_instances().await;
            self.settle_nodes().await;
            // Repeat the drain request to instances on draining nodes that still hold work.
            let draining: Vec<String> = self
                .view()
                .nodes
                .values()
                .filter(|n| n.state() == NodeState::NodeDraining)
                .map(|n| n.name.clone())
                .collect();
            for node in draining {
                let due = resent.get(&node).is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
                if due {
                    resent.insert(node.clone(), Instant::now());
                    self.send_drain(&node, "node is draining").await;
                }
            }
        }
    }

    async fn check_instances(&self) {
        let now = Instant::now();
        let alive: Vec<Instance> = self.view().alive().cloned().collect();
        let mut lost = Vec::new();
        let mut dups = Vec::new();
        let mut drained = Vec::new();
        let mut strangers = Vec::new();
        {
            let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            for i in &alive {
                let ttl = Duration::from_millis(i.ttl_ms.max(1));
                let l = live.get(&i.instance_id);
                let last = l.and_then(|l| l.beats.get(&i.incarnation)).map(|(t, ms)| (*t, *ms));
                // Never seen by this registry instance: its TTL starts when this one started.
                let (seen, seen_ms) =
                    last.unwrap_or((self.started, now_ms() - self.started.elapsed().as_millis() as i64));
                if now.duration_since(seen) > ttl {
                    lost.push((i.clone(), seen_ms));
                    continue;
                }
                if let Some(l) = l {
                    for (inc, (t, _)) in &l.beats {
                        if inc != &i.incarnation && now.duration_since(*t) <= ttl && i.duplicate.is_empty() {
                            dups.push((i.clone(), inc.clone(), l.node.clone()));
                        }
                    }
                    if l.drained && l.last_incarnation == i.incarnation && i.state() == InstanceState::InstanceRunning {
                        drained.push(i.clone());
                    }
                }
            }
            for (id, l) in live.iter() {
                let registered = alive.iter().any(|i| &i.instance_id == id && i.incarnation == l.last_incarnation);
                let recent = l
                    .beats
                    .get(&l.last_incarnation)
                    .is_some_and(|(t, _)| now.duration_since(*t) < Duration::from_secs(2));
                let known_for = l.first_seen.map(|f| now.duration_since(f)).unwrap_or_default();
                if !registered && recent && known_for > Duration::from_secs(1) {
                    strangers.push(id.clone());
                }
            }
        }
        for (i, seen_ms) in lost {
            tracing::warn!(instance = %i.instance_id, node = %i.node, ttl_ms = i.ttl_ms, "instance lost: no heartbeat within its ttl");
            let ev = Event::Lost(InstanceLost {
                instance_id: i.instance_id.clone(),
                incarnation: i.incarnation.clone(),
                last_seen_ms: seen_ms,
                ttl_ms: i.ttl_ms,
            });
            self.record_instance(&i.instance_id, names::action::LOST, &i.incarnation, ev).await;
        }
        for (i, other, other_node) in dups {
            tracing::warn!(instance = %i.instance_id, node = %i.node, other_node = %other_node, "two live processes use the same instance id");
            let ev = Event::Duplicated(InstanceDuplicated {
                instance_id: i.instance_id.clone(),
                incarnation: i.incarnation.clone(),
                other_incarnation: other.clone(),
                other_node,
                detail: "both beat within the ttl".into(),
            });
            self.record_instance(&i.instance_id, names::action::DUPLICATED, &other, ev).await;
        }
        for i in drained {
            self.on_drained(&i.instance_id, &i.incarnation, 0).await;
        }
        for id in strangers {
            let due = {
                let mut asked = self.asked.lock().unwrap_or_else(|e| e.into_inner());
                let due = asked.get(&id).is_none_or(|t| t.elapsed() >= Duration::from_secs(2));
                if due {
                    asked.insert(id.clone(), Instant::now());
                }
                due
            };
            if due && let Ok(s) = subject::control_instance(&id, ControlAction::Announce) {
                tracing::info!(instance = %id, "heartbeat from an unregistered instance; asking it to announce");
                let _ = self.ctx.client().publish(s, bytes::Bytes::new()).await;
            }
        }
    }
}
