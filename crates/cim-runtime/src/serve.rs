//! Serving one endpoint: requests taken off its subscription only when a concurrency permit
//! is free, each handled in its own task with its trace, metrics and reply; and the
//! `describe` query every service answers.

use std::{sync::Arc, time::Instant};

use async_nats::{HeaderMap, Message};
use cim_events::proto::runtime::{DescribeReply, StreamState};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::{
    crash,
    ctx::Ctx,
    endpoint::{Endpoint, Reply, ServiceError},
    metrics::EndpointLabels,
    provision, telemetry,
};

pub(crate) async fn serve_endpoint(
    mut nats_endpoint: async_nats::service::endpoint::Endpoint,
    e: Endpoint,
    ctx: Ctx,
    permits: Arc<Semaphore>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let labels = EndpointLabels { endpoint: e.name.clone() };
    loop {
        if *stop.borrow() {
            break;
        }
        let request = tokio::select! {
            r = nats_endpoint.next() => match r { Some(r) => r, None => break },
            _ = stop.wait_for(|s| *s) => break,
        };
        // Back-pressure: wait for a slot before taking the next request off the subscription.
        let Ok(permit) = permits.clone().acquire_owned().await else { break };
        let (ctx, handler, labels) = (ctx.clone(), e.handler.clone(), labels.clone());
        tokio::spawn(async move {
            let m = ctx.metrics().clone();
            m.in_flight.inc();
            let started = Instant::now();
            let span = tracing::info_span!("request", endpoint = %labels.endpoint, subject = %request.message.subject);
            telemetry::continue_trace(&span, request.message.headers.as_ref());
            let result = handler(ctx.clone(), request.message.clone()).instrument(span.clone()).await;
            let mut headers = HeaderMap::new();
            span.in_scope(|| telemetry::inject_current(&mut headers));
            let outcome = match result {
                Ok(reply) => {
                    for (k, vs) in reply.headers.iter() {
                        for v in vs {
                            headers.append(k.clone(), v.clone());
                        }
                    }
                    request.respond_with_headers(Ok(reply.body), headers).await
                }
                Err(err) => {
                    m.errors.get_or_create(&labels).inc();
                    tracing::debug!(parent: &span, code = err.code, error = %err.message, "request failed");
                    let micro_err = async_nats::service::error::Error { status: err.message, code: err.code as usize };
                    request.respond_with_headers(Err(micro_err), headers).await
                }
            };
            if let Err(e) = outcome {
                tracing::warn!(error = %e, "could not send reply");
            }
            if crash::any() {
                let point = format!("{}.replied", labels.endpoint);
                if crash::armed(&point) {
                    let _ = ctx.client().flush().await;
                    crash::at(&point);
                }
            }
            m.requests.get_or_create(&labels).inc();
            m.latency.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
            m.in_flight.dec();
            drop(permit);
        });
    }
    let _ = nats_endpoint.stop().await;
}

/// `cim.qry.<component>.describe`: the instance, what it owns and the state of those streams.
pub(crate) async fn describe(ctx: Ctx, msg: Message) -> Result<Reply, ServiceError> {
    if !msg.payload.is_empty() {
        return Err(ServiceError::bad_request("describe takes an empty request body"));
    }
    let mut streams = Vec::new();
    for name in provision::owned_stream_names(ctx.settings().component) {
        let mut stream = ctx
            .jetstream()
            .get_stream(&name)
            .await
            .map_err(|e| ServiceError::unavailable(format!("stream {name}: {e}")))?;
        let info = stream.info().await.map_err(|e| ServiceError::unavailable(format!("stream {name}: {e}")))?;
        streams.push(StreamState {
            name,
            messages: info.state.messages,
            bytes: info.state.bytes,
            first_sequence: info.state.first_sequence,
            last_sequence: info.state.last_sequence,
            replicas: info.config.num_replicas as u32,
            leader: info.cluster.as_ref().and_then(|c| c.leader.clone()).unwrap_or_default(),
        });
    }
    Ok(Reply::proto(&DescribeReply { service: Some(ctx.announcement()), streams, ready: ctx.is_ready() }))
}
