//! The hub's queries and commands: its webhook sources, its subscriptions with their backlog
//! and delivery log, and pausing or resuming a subscription.

use std::sync::Arc;

use cim_events::{hub, proto::hub::SubscriptionCommand};
use cim_runtime::{Endpoint, Endpoints, Reply, ServiceError};
use prost::Message as _;

use crate::outbound::Outbound;

/// What the endpoints read: the subscriptions and the webhook listing fixed at start.
pub struct Queries {
    pub out: Arc<Outbound>,
    /// `{"webhook_addr": …, "webhooks": […]}`, as served on `cim.qry.hub.sources`.
    pub listing: String,
}

pub fn endpoints(q: Arc<Queries>) -> anyhow::Result<Vec<Endpoint>> {
    use hub::{cmd, command, qry, query};
    Ok(Endpoints::new(q)
        .add(qry::SOURCES, query(qry::SOURCES)?, |q, _m| async move {
            Ok(Reply { headers: Default::default(), body: q.listing.clone().into() })
        })
        .add(qry::SUBSCRIPTIONS, query(qry::SUBSCRIPTIONS)?, |q, _m| async move { q.subscriptions().await })
        .add(qry::DELIVERIES, query(qry::DELIVERIES)?, |q, m| async move { q.deliveries(m).await })
        .add(cmd::PAUSE, command(cmd::PAUSE)?, |q, m| async move { q.set_paused(m, true).await })
        .add(cmd::RESUME, command(cmd::RESUME)?, |q, m| async move { q.set_paused(m, false).await })
        .build())
}

impl Queries {
    async fn subscriptions(&self) -> Result<Reply, ServiceError> {
        let o = &self.out;
        let mut list = Vec::new();
        for run in o.subs.values() {
            let s = &run.sub;
            let pending = match o.js.get_stream(&s.stream).await {
                Ok(stream) => match stream.consumer_info(hub::outbound_consumer(&s.name).unwrap_or_default()).await {
                    Ok(i) => serde_json::json!(i.num_pending + i.num_ack_pending as u64),
                    Err(_) => serde_json::Value::Null,
                },
                Err(_) => serde_json::Value::Null,
            };
            list.push(serde_json::json!({ "name": s.name, "filter": s.filter, "url": s.url, "paused": *run.paused.borrow(), "pending": pending, "max_attempts": s.max_attempts }));
        }
        Ok(Reply::json(&serde_json::json!({ "subscriptions": list })))
    }

    async fn deliveries(&self, msg: async_nats::Message) -> Result<Reply, ServiceError> {
        let req: serde_json::Value = cim_runtime::json_request(&msg)?;
        let name = req["subscription"].as_str().ok_or_else(|| ServiceError::bad_request("missing \"subscription\""))?;
        if !self.out.subs.contains_key(name) {
            return Err(ServiceError::not_found(format!("unknown subscription {name:?}")));
        }
        let limit = req["limit"].as_u64().unwrap_or(20) as usize;
        let log = self.out.deliveries(name, limit).await.map_err(|e| ServiceError::unavailable(e.to_string()))?;
        let entries: Vec<serde_json::Value> = log
            .iter()
            .map(|d| serde_json::json!({ "event_subject": d.event_subject, "event_sequence": d.event_sequence, "event_id": d.event_id, "attempts": d.attempts, "http_status": d.http_status, "last_error": d.last_error, "delivered": d.last_error.is_empty(), "at_ms": d.at_ms, "duration_ms": d.duration_ms }))
            .collect();
        Ok(Reply::json(&serde_json::json!({ "subscription": name, "deliveries": entries })))
    }

    async fn set_paused(&self, msg: async_nats::Message, paused: bool) -> Result<Reply, ServiceError> {
        let cmd = SubscriptionCommand::decode(msg.payload)
            .map_err(|e| ServiceError::bad_request(format!("undecodable SubscriptionCommand: {e}")))?;
        if !self.out.subs.contains_key(&cmd.subscription) {
            return Err(ServiceError::not_found(format!("unknown subscription {:?}", cmd.subscription)));
        }
        let change = self
            .out
            .set_paused(&cmd.subscription, paused, &cmd.reason)
            .await
            .map_err(|e| ServiceError::unavailable(e.to_string()))?;
        Ok(Reply::proto(&change))
    }
}
