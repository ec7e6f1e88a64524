//! Lifecycle listening: every instance's messages on `cim.svc.>`. Heartbeats update memory at
//! once; announcements, drains and goodbyes become events (in order, on a worker of their own);
//! what cannot be registered is dead-lettered with the reason.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use async_nats::Message;
use cim_events::{
    CONTRACT_VERSION, Component,
    envelope::H_MSG_ID,
    payload::decode as decode_payload,
    proto::{
        registry::{Instance, InstanceDrained, InstanceRegistered, InstanceState, InstanceStopped},
        runtime::{ServiceAnnounced, ServiceDrained, ServiceHeartbeat, ServiceStopped},
    },
    registry as names,
    subject::{self, ControlAction, Lifecycle},
};
use cim_runtime::telemetry;
use futures::StreamExt;
use tracing::Instrument;

use crate::{
    app::{App, now_ms},
    state::{self, Event},
};

impl App {
    /// Sends a refused lifecycle message to the dead-letter stream with the reason.
    async fn dead_letter(&self, msg: &Message, reason: String) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(subject = %msg.subject, %reason, "lifecycle message refused");
        let mut headers = msg.headers.clone().unwrap_or_default();
        headers.insert(names::DLQ_REASON, reason.replace(['\r', '\n'], " ").as_str());
        headers.insert(names::DLQ_SUBJECT, msg.subject.as_str());
        // The refused message's own id must not de-duplicate the dead letter away.
        headers.insert(H_MSG_ID, uuid::Uuid::now_v7().to_string().as_str());
        match self.js.publish_with_headers(names::lifecycle_dead_letter(), headers, msg.payload.clone()).await {
            Ok(ack) => {
                if let Err(e) = ack.await {
                    tracing::warn!(error = %e, "dead letter not stored");
                }
            }
            Err(e) => tracing::warn!(error = %e, "dead letter not stored"),
        }
    }

    // ---- lifecycle messages ----

    /// Listens to `cim.svc.>`: heartbeats update memory at once; announcements, drains and
    /// goodbyes go in order to a worker that records events (so a slow JetStream write never
    /// delays heartbeats and never causes a false loss).
    pub async fn run_lifecycle(self: Arc<Self>) {
        let mut sub = match self.ctx.client().subscribe(subject::all_lifecycle()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot subscribe to lifecycle messages");
                return;
            }
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Message>();
        let worker = self.clone();
        self.ctx.spawn("lifecycle-writer", async move {
            loop {
                let m = tokio::select! { m = rx.recv() => m, _ = worker.ctx.stopping() => return };
                let Some(m) = m else { return };
                let span = tracing::info_span!("lifecycle", subject = %m.subject);
                telemetry::continue_trace(&span, m.headers.as_ref());
                worker.on_event_message(m).instrument(span).await;
            }
        });
        // Everyone says who they are again: the view then covers instances that started
        // before this registry.
        let _ = self.ctx.client().publish(subject::control_all(ControlAction::Announce), bytes::Bytes::new()).await;
        loop {
            let m = tokio::select! { m = sub.next() => m, _ = self.ctx.stopping() => return };
            let Some(m) = m else { return };
            match subject::parse_lifecycle(&m.subject) {
                Ok(l) if l.what == Lifecycle::Heartbeat => self.on_heartbeat(&m, &l).await,
                Ok(_) => {
                    let _ = tx.send(m);
                }
                Err(e) => self.dead_letter(&m, e.to_string()).await,
            }
        }
    }

    async fn on_heartbeat(&self, m: &Message, l: &subject::LifecycleSubject) {
        self.heartbeats.fetch_add(1, Ordering::Relaxed);
        let beat = match decode_payload::<ServiceHeartbeat>(m.headers.as_ref(), &m.payload, &self.upcasters) {
            Ok((_, b)) => b,
            Err(e) => return self.dead_letter(m, format!("heartbeat: {e}")).await,
        };
        if beat.instance_id != l.instance || beat.component != l.component.token() {
            return self
                .dead_letter(
                    m,
                    format!(
                        "heartbeat of {}/{} published on the subject of {}/{}",
                        beat.component,
                        beat.instance_id,
                        l.component.token(),
                        l.instance
                    ),
                )
                .await;
        }
        let now = Instant::now();
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let e = live.entry(beat.instance_id).or_default();
        e.first_seen.get_or_insert(now);
        e.beats.insert(beat.incarnation.clone(), (now, now_ms()));
        e.last_incarnation = beat.incarnation;
        e.ready = beat.ready;
        e.in_flight = beat.in_flight;
        e.draining = beat.draining;
        e.drained = beat.drained;
        e.node = beat.node;
        e.degraded = beat.degraded;
    }

    async fn on_event_message(&self, m: Message) {
        let Ok(l) = subject::parse_lifecycle(&m.subject) else { return };
        match l.what {
            Lifecycle::Announce => {
                match decode_payload::<ServiceAnnounced>(m.headers.as_ref(), &m.payload, &self.upcasters) {
                    Ok((_, a)) => match self.check_announcement(&l, &a) {
                        Ok(()) => self.on_announce(a).await,
                        Err(reason) => self.dead_letter(&m, reason).await,
                    },
                    Err(e) => self.dead_letter(&m, format!("announcement: {e}")).await,
                }
            }
            Lifecycle::Goodbye => {
                match decode_payload::<ServiceStopped>(m.headers.as_ref(), &m.payload, &self.upcasters) {
                    Ok((_, g)) => {
                        let registered = self.view().instances.get(&l.instance).cloned();
                        if let Some(i) = registered.filter(|i| {
                            state::is_alive(i) && (g.incarnation.is_empty() || g.incarnation == i.incarnation)
                        }) {
                            let ev = Event::Stopped(InstanceStopped {
                                instance_id: i.instance_id.clone(),
                                incarnation: i.incarnation.clone(),
                                reason: g.reason,
                            });
                            self.record_instance(&i.instance_id, names::action::STOPPED, &i.incarnation, ev).await;
                        }
                    }
                    Err(e) => self.dead_letter(&m, format!("goodbye: {e}")).await,
                }
            }
            Lifecycle::Drained => {
                match decode_payload::<ServiceDrained>(m.headers.as_ref(), &m.payload, &self.upcasters) {
                    Ok((_, d)) => self.on_drained(&d.instance_id, &d.incarnation, d.abandoned).await,
                    Err(e) => self.dead_letter(&m, format!("drained: {e}")).await,
                }
            }
            Lifecycle::Heartbeat => {}
        }
    }

    /// Refuses announcements that cannot be registered, with one line saying why.
    fn check_announcement(&self, l: &subject::LifecycleSubject, a: &ServiceAnnounced) -> Result<(), String> {
        if a.instance_id != l.instance {
            return Err(format!(
                "announcement of instance {:?} published on the subject of {:?}",
                a.instance_id, l.instance
            ));
        }
        let c = Component::parse(&a.component).map_err(|e| format!("announcement: {e}"))?;
        if c != l.component {
            return Err(format!(
                "announcement of component {} published on the subject of {}",
                a.component,
                l.component.token()
            ));
        }
        cim_events::token::validate_token("node", &a.node).map_err(|e| format!("announcement: {e}"))?;
        if state::semver(&a.version).is_none() {
            return Err(format!("announcement: version {:?} is not MAJOR.MINOR.PATCH", a.version));
        }
        if a.incarnation.is_empty() {
            return Err(
                "announcement: no incarnation (an instance older than the registry contract; upgrade it)".into()
            );
        }
        Ok(())
    }

    fn ttl(&self, heartbeat_interval_ms: u64) -> Duration {
        let beats = Duration::from_millis(heartbeat_interval_ms.max(100)) * self.opts.missed_beats;
        beats.max(self.opts.min_ttl)
    }

    async fn on_announce(&self, a: ServiceAnnounced) {
        let existing = self.view().instances.get(&a.instance_id).cloned();
        if let Some(e) = &existing
            && state::is_alive(e)
            && e.incarnation == a.incarnation
        {
            return; // a re-announcement of what is registered
        }
        let incompatible = if a.contract_version != CONTRACT_VERSION {
            format!("speaks contract v{}, this registry v{}", a.contract_version, CONTRACT_VERSION)
        } else {
            String::new()
        };
        let ttl = self.ttl(a.heartbeat_interval_ms);
        // A new incarnation starts its TTL now, even before its first heartbeat.
        {
            let now = Instant::now();
            let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            let e = live.entry(a.instance_id.clone()).or_default();
            e.first_seen.get_or_insert(now);
            e.beats.entry(a.incarnation.clone()).or_insert((now, now_ms()));
            e.last_incarnation = a.incarnation.clone();
            e.node = a.node.clone();
        }
        let instance = Instance {
            instance_id: a.instance_id.clone(),
            component: a.component,
            service: a.service,
            version: a.version,
            node: a.node,
            contract_version: a.contract_version,
            capabilities: a.capabilities,
            subjects: a.subjects,
            http_addr: a.http_addr,
            incarnation: a.incarnation.clone(),
            ttl_ms: ttl.as_millis() as u64,
            incompatible,
            ..Default::default()
        };
        let ev = Event::Registered(Box::new(InstanceRegistered { instance: Some(instance) }));
        self.record_instance(&a.instance_id, names::action::REGISTERED, &a.incarnation, ev).await;
    }

    pub(crate) async fn on_drained(&self, instance_id: &str, incarnation: &str, abandoned: u64) {
        let registered = self.view().instances.get(instance_id).cloned();
        let Some(i) = registered else { return };
        if i.state() != InstanceState::InstanceRunning || i.incarnation != incarnation {
            return;
        }
        let ev = Event::Drained(InstanceDrained {
            instance_id: instance_id.to_string(),
            incarnation: incarnation.to_string(),
            abandoned,
        });
        self.record_instance(instance_id, names::action::DRAINED, incarnation, ev).await;
        self.settle_nodes().await;
    }
}
