//! Readiness and heartbeats: readiness true only while NATS is connected and every owned
//! stream answers (a stream that disappeared is re-provisioned), a heartbeat on every interval.

use std::{
    sync::{Arc, atomic::Ordering},
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

async fn check_ready(ctx: &Ctx, owned: &[String]) -> bool {
    if ctx.client().connection_state() != async_nats::connection::State::Connected {
        return false;
    }
    for name in owned {
        let ok = tokio::time::timeout(Duration::from_secs(2), ctx.jetstream().get_stream(name)).await;
        match ok {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(stream = %name, error = %e, "owned stream not usable; re-provisioning");
                if let Err(e) =
                    provision::provision(ctx.jetstream(), ctx.settings().component, ctx.settings().tier).await
                {
                    tracing::warn!(error = %e, "re-provisioning failed");
                }
                return false;
            }
            Err(_) => return false,
        }
    }
    true
}
