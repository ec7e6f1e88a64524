//! Readiness and heartbeats: readiness true only while NATS is connected and every owned
//! stream answers (a stream that disappeared is re-provisioned), a heartbeat on every interval.
//! Apart from readiness, a service may say it is *degraded* ([`Degraded`]): it takes work,
//! but something it is responsible for is not as it should be (the storage manager cannot
//! reach an archive target, or one falls behind). Heartbeats, `/readyz` (still 200) and
//! `cim_degraded` carry it; `cimctl status` shows it.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use cim_events::{proto::runtime::ServiceHeartbeat, subject::Lifecycle};
use tokio::sync::Notify;
use tracing::Instrument;

use crate::{ctx::Ctx, http, provision, service::lifecycle_subject};

/// Keeps the readiness flag true only while NATS is connected and every owned stream answers;
/// re-provisions a stream that disappeared; publishes heartbeats.
pub(crate) async fn watch_health(ctx: Ctx, health: http::Health, reconnected: Arc<Notify>) {
    let settings = ctx.settings().clone();
    let heartbeat = lifecycle_subject(&ctx, Lifecycle::Heartbeat).ok();
    let owned = provision::owned_stream_names(settings.component);
    loop {
        // A draining instance is alive but takes no work: not ready.
        let ready = check_ready(&ctx, &owned).await && !ctx.is_draining();
        ctx.0.ready.store(ready, Ordering::SeqCst);
        health.set_ready(ready);
        let degraded = ctx.degraded().summary();
        health.set_degraded(degraded.clone());
        if let Some(subject) = &heartbeat
            && ctx.client().connection_state() == async_nats::connection::State::Connected
        {
            let beat = ServiceHeartbeat {
                component: settings.component.token().to_string(),
                instance_id: settings.instance_id.clone(),
                uptime_ms: ctx.0.started.elapsed().as_millis() as u64,
                ready,
                in_flight: ctx.metrics().in_flight.get().max(0) as u64,
                incarnation: ctx.0.incarnation.clone(),
                draining: ctx.is_draining(),
                drained: ctx.is_drained(),
                node: settings.node.clone(),
                degraded: degraded.unwrap_or_default(),
            };
            let _ = ctx.publish_root(subject.clone(), &beat).instrument(tracing::info_span!("heartbeat")).await;
        }
        // Check again soon after a (re)connect, else on the heartbeat interval.
        let interval = if ready {
            settings.heartbeat_interval
        } else {
            settings.heartbeat_interval.min(Duration::from_millis(500))
        };
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = reconnected.notified() => {}
        }
    }
}

/// How long one owned stream may take to answer a readiness check. All are asked at once, so
/// after a leader election or a reconnect readiness follows within about this long.
const STREAM_CHECK: Duration = Duration::from_secs(1);

/// Ready when NATS is connected and every owned stream answers, all asked at once. A stream
/// that does not exist (deleted) is provisioned again; one that does not answer yet (no
/// leader after a node loss, a server restarting) only makes the service not ready, since
/// provisioning could not reach it either.
async fn check_ready(ctx: &Ctx, owned: &[String]) -> bool {
    if ctx.client().connection_state() != async_nats::connection::State::Connected {
        return false;
    }
    let checks = owned
        .iter()
        .map(|name| async move { (name, tokio::time::timeout(STREAM_CHECK, ctx.jetstream().get_stream(name)).await) });
    let mut ready = true;
    let mut missing = false;
    for (name, answer) in futures::future::join_all(checks).await {
        match answer {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if provision::stream_not_found(&e) => {
                tracing::warn!(stream = %name, error = %e, "owned stream missing; re-provisioning");
                (ready, missing) = (false, true);
            }
            Ok(Err(e)) => {
                tracing::debug!(stream = %name, error = %e, "owned stream not answering");
                ready = false;
            }
            Err(_) => ready = false,
        }
    }
    if missing && let Err(e) = provision::provision(ctx.jetstream(), ctx.settings()).await {
        tracing::warn!(error = %e, "re-provisioning failed");
    }
    ready
}

/// Why a running service is degraded, by concern (a service sets and clears its own keys,
/// e.g. one per archive target). Cheap to clone; every clone is the same state.
#[derive(Clone, Debug, Default)]
pub struct Degraded(Arc<Mutex<BTreeMap<String, String>>>);

/// At most this many reasons are spelled out in the summary.
const MAX_REASONS: usize = 4;

impl Degraded {
    /// Sets (`Some`) or clears (`None`) the reason under `key`.
    pub fn set(&self, key: &str, reason: Option<String>) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match reason {
            Some(r) => {
                if map.get(key) != Some(&r) {
                    map.insert(key.to_string(), r);
                }
            }
            None => {
                map.remove(key);
            }
        }
    }

    /// Every reason, `; `-separated (the first few, then how many more), or `None` when the
    /// service is not degraded.
    pub fn summary(&self) -> Option<String> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.is_empty() {
            return None;
        }
        let mut s = map.values().take(MAX_REASONS).cloned().collect::<Vec<_>>().join("; ");
        if map.len() > MAX_REASONS {
            s.push_str(&format!("; and {} more", map.len() - MAX_REASONS));
        }
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn degraded_reasons_are_set_cleared_and_summarised() {
        let d = Degraded::default();
        assert_eq!(d.summary(), None);
        d.set("a", Some("target a unreachable".into()));
        d.clone().set("b", Some("target b behind".into()));
        assert_eq!(d.summary().unwrap(), "target a unreachable; target b behind");
        d.set("a", None);
        assert_eq!(d.summary().unwrap(), "target b behind");
        for i in 0..6 {
            d.set(&format!("k{i}"), Some(format!("r{i}")));
        }
        assert!(d.summary().unwrap().ends_with("; and 3 more"), "{:?}", d.summary());
    }
}
