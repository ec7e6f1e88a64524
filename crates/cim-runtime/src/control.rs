//! Control messages: the listener for re-announce and drain requests addressed to every
//! instance, this node or this instance, and stopping intake (at a drain or at shutdown).

use std::sync::{Arc, atomic::Ordering};

use async_nats::Message;
use cim_events::{
    proto::runtime::{DrainRequested, ServiceDrained},
    subject::{self, ControlAction, Lifecycle},
};
use tokio::sync::Semaphore;

use crate::{ctx::Ctx, http, service::lifecycle_subject};

/// Subscribes to the control messages addressed to every instance, this node and this instance.
pub(crate) async fn subscribe_control(ctx: &Ctx) -> anyhow::Result<futures::stream::SelectAll<async_nats::Subscriber>> {
    let s = ctx.settings();
    let mut all = futures::stream::SelectAll::new();
    for filter in subject::control_filters(&s.node, &s.instance_id)? {
        all.push(ctx.client().subscribe(filter).await?);
    }
    ctx.client().flush().await?;
    Ok(all)
}

/// Acts on one control message: re-announce, or drain (once; a repeated drain request repeats
/// the `drained` report, in case the first was missed).
pub(crate) async fn on_control(
    ctx: &Ctx,
    health: &http::Health,
    stop_serving: &tokio::sync::watch::Sender<bool>,
    servers: &mut Vec<tokio::task::JoinHandle<()>>,
    permits: &Arc<Semaphore>,
    m: Message,
) {
    let action = m.subject.rsplit('.').next().and_then(ControlAction::parse);
    match action {
        Some(ControlAction::Announce) => {
            if let Ok(subject) = lifecycle_subject(ctx, Lifecycle::Announce)
                && let Err(e) = ctx.publish_root(subject, &ctx.announcement()).await
            {
                tracing::warn!(error = %e, "could not re-announce");
            }
        }
        Some(ControlAction::Drain) => {
            let reason = cim_events::payload::decode::<DrainRequested>(
                m.headers.as_ref(),
                &m.payload,
                &cim_events::Upcasters::default(),
            )
            .map(|(_, d)| d.reason)
            .unwrap_or_default();
            let abandoned = if ctx.0.draining.swap(true, Ordering::SeqCst) {
                0
            } else {
                tracing::info!(%reason, "draining: no new work");
                ctx.metrics().draining.set(1);
                let abandoned = stop_intake(ctx, health, stop_serving, servers, permits).await;
                ctx.0.drained.store(true, Ordering::SeqCst);
                tracing::info!(abandoned, "drained");
                abandoned
            };
            if !ctx.is_drained() {
                return;
            }
            let s = ctx.settings();
            let drained = ServiceDrained {
                component: s.component.token().to_string(),
                instance_id: s.instance_id.clone(),
                incarnation: ctx.0.incarnation.clone(),
                node: s.node.clone(),
                abandoned,
            };
            if let Ok(subject) = lifecycle_subject(ctx, Lifecycle::Drained)
                && let Err(e) = ctx.publish_root(subject, &drained).await
            {
                tracing::warn!(error = %e, "could not report drained");
            }
        }
        None => tracing::debug!(subject = %m.subject, "unknown control message ignored"),
    }
}

/// Stops taking work: readiness false, endpoints unsubscribed, in-flight requests finished
/// within the grace period, background loops told to stop and awaited. Returns how many
/// requests were abandoned. Safe to call again (after a drain, at shutdown).
pub(crate) async fn stop_intake(
    ctx: &Ctx,
    health: &http::Health,
    stop_serving: &tokio::sync::watch::Sender<bool>,
    servers: &mut Vec<tokio::task::JoinHandle<()>>,
    permits: &Arc<Semaphore>,
) -> u64 {
    let settings = ctx.settings();
    ctx.0.ready.store(false, Ordering::SeqCst);
    health.set_ready(false);
    let _ = stop_serving.send(true);
    for s in servers.drain(..) {
        let _ = s.await;
    }
    let all = settings.max_in_flight as u32;
    let abandoned = match tokio::time::timeout(settings.shutdown_grace, permits.acquire_many(all)).await {
        Ok(_) => {
            tracing::info!("in-flight work finished");
            0
        }
        Err(_) => {
            let left = all as usize - permits.available_permits();
            tracing::warn!(left, "grace period over; abandoning in-flight work (it will be redelivered)");
            left as u64
        }
    };
    let _ = ctx.0.stopping.send(true);
    let background = std::mem::take(&mut *ctx.0.background.lock().unwrap_or_else(|e| e.into_inner()));
    for (name, mut handle) in background {
        if tokio::time::timeout(settings.shutdown_grace, &mut handle).await.is_err() {
            tracing::warn!(task = %name, "background task did not stop within the grace period; aborting");
            handle.abort();
        }
    }
    abandoned
}
