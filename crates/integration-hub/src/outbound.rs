//! Outbound subscriptions: each reads its filter from a durable consumer (one event in flight,
//! so deliveries keep the stream's order), POSTs the event signed the Standard Webhooks way,
//! retries with exponential backoff and jitter, records every outcome in the delivery log and
//! dead-letters an event with its last error once the attempts are spent. The event is acked
//! only after that, so a hub that dies mid-delivery hands the event to the next instance.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use async_nats::jetstream::{
    self, AckKind,
    consumer::{DeliverPolicy, pull},
};
use cim_events::{
    Envelope, envelope, hub,
    proto::hub::{DeliveryRecorded, SubscriptionStateChanged},
};
use cim_runtime::{Ctx, NewEvent};
use futures::StreamExt;
use prost::Message;
use tokio::sync::watch;

use crate::config::{Deliver, Subscription};

/// One subscription at run time: its configuration and whether it is paused.
pub struct Running {
    pub sub: Subscription,
    pub paused: watch::Sender<bool>,
}

/// What the delivery workers share.
pub struct Outbound {
    pub js: jetstream::Context,
    pub http: reqwest::Client,
    pub ce_source: String,
    pub subs: BTreeMap<String, Arc<Running>>,
}

impl Outbound {
    /// Reads the last pause/resume of every subscription, so a restart keeps the state.
    pub async fn load_states(&self) -> anyhow::Result<()> {
        let stream = self.js.get_stream(cim_events::resources::events_stream(crate::COMPONENT).name).await?;
        for (name, run) in &self.subs {
            let mut last = (0u64, false);
            for (action, paused) in [(hub::action::PAUSED, true), (hub::action::RESUMED, false)] {
                if let Ok(m) = stream.get_last_raw_message_by_subject(&hub::subscription_event(name, action)?).await
                    && m.sequence > last.0
                {
                    last = (m.sequence, paused);
                }
            }
            run.paused.send_replace(last.1);
        }
        Ok(())
    }

    /// Pauses or resumes: the event first, then the state (every instance follows the event).
    pub async fn set_paused(&self, name: &str, paused: bool, reason: &str) -> anyhow::Result<SubscriptionStateChanged> {
        let run = self.subs.get(name).ok_or_else(|| anyhow::anyhow!("unknown subscription {name:?}"))?;
        let change = SubscriptionStateChanged { subscription: name.to_string(), paused, reason: reason.to_string() };
        let action = if paused { hub::action::PAUSED } else { hub::action::RESUMED };
        let env = Envelope::root::<SubscriptionStateChanged>(self.ce_source.clone());
        NewEvent::new(hub::subscription_event(name, action)?, &env, change.encode_to_vec()).publish(&self.js).await?;
        run.paused.send_replace(paused);
        Ok(change)
    }

    /// Follows pause/resume events written by any instance.
    pub async fn follow_states(self: Arc<Self>, ctx: Ctx) {
        let Ok(mut sub) = ctx.client().subscribe(hub::subscription_states()).await else {
            tracing::error!("cannot follow subscription states");
            return;
        };
        loop {
            tokio::select! {
                _ = ctx.stopping() => return,
                m = sub.next() => {
                    let Some(m) = m else { return };
                    if let Ok(change) = SubscriptionStateChanged::decode(m.payload)
                        && let Some(run) = self.subs.get(&change.subscription)
                    {
                        run.paused.send_replace(change.paused);
                    }
                }
            }
        }
    }

    /// The worker of one subscription, until the service stops.
    pub async fn run(self: Arc<Self>, ctx: Ctx, run: Arc<Running>) {
        let sub = &run.sub;
        let what = format!("the consumer of subscription {} on {}", sub.name, sub.stream);
        let Some(consumer) = ctx.retry_until_stopped(&what, || self.consumer(sub)).await else { return };
        let mut paused = run.paused.subscribe();
        loop {
            tokio::select! {
                _ = ctx.stopping() => return,
                r = paused.wait_for(|p| !*p) => if r.is_err() { return },
            }
            let batch = consumer.fetch().max_messages(1).expires(Duration::from_secs(1)).messages().await;
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(subscription = %sub.name, error = %e, "fetch failed; retrying");
                    if !ctx.pause(Duration::from_millis(500)).await {
                        return;
                    }
                    continue;
                }
            };
            while let Some(m) = batch.next().await {
                match m {
                    Ok(m) => self.deliver(&ctx, &run, m).await,
                    Err(e) => tracing::warn!(subscription = %sub.name, error = %e, "fetch failed"),
                }
            }
        }
    }

    async fn consumer(&self, sub: &Subscription) -> anyhow::Result<jetstream::consumer::Consumer<pull::Config>> {
        let name = hub::outbound_consumer(&sub.name)?;
        let stream = self.js.get_stream(&sub.stream).await?;
        let config = pull::Config {
            durable_name: Some(name.clone()),
            description: Some(format!("integration-hub subscription {} -> {}", sub.name, sub.url)),
            filter_subject: sub.filter.clone(),
            deliver_policy: match sub.deliver {
                Deliver::New => DeliverPolicy::New,
                Deliver::All => DeliverPolicy::All,
            },
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: ack_wait(sub),
            // One event in flight across all instances: deliveries keep the stream's order.
            max_ack_pending: 1,
            max_deliver: -1,
            ..Default::default()
        };
        Ok(stream.get_or_create_consumer(&name, config).await?)
    }

    async fn deliver(&self, ctx: &Ctx, run: &Running, msg: jetstream::Message) {
        let sub = &run.sub;
        // Fetched just before a pause: give it back untouched; it stays first in line.
        if *run.paused.borrow() {
            let _ = msg.ack_with(AckKind::Nak(None)).await;
            return;
        }
        let started = Instant::now();
        let (sequence, subject) = (msg.info().map(|i| i.stream_sequence).unwrap_or(0), msg.subject.to_string());
        let parent = msg.headers.as_ref().and_then(|h| Envelope::from_headers(h).ok());
        let event_id =
            parent.as_ref().map(|e| e.id().to_string()).unwrap_or_else(|| format!("{}-{sequence}", sub.stream));
        let mut last = (0u16, String::new());
        let mut attempts = 0;
        let mut permanent = false;
        while attempts < sub.max_attempts {
            attempts += 1;
            let _ = msg.ack_with(AckKind::Progress).await;
            match self.attempt(sub, &msg, &subject, sequence, &event_id).await {
                Ok(status) if (200..300).contains(&status) => {
                    self.record(
                        sub,
                        hub::action::DELIVERED,
                        &subject,
                        sequence,
                        &event_id,
                        attempts,
                        status,
                        "",
                        started,
                        parent.as_ref(),
                    )
                    .await;
                    let _ = msg.double_ack().await;
                    tracing::debug!(subscription = %sub.name, sequence, attempts, "delivered");
                    return;
                }
                Ok(status) => last = (status, format!("http status {status}")),
                Err(e) => {
                    permanent = e.is_redirect() || chain(&e).contains("not allowed");
                    last = (e.status().map(|s| s.as_u16()).unwrap_or(0), chain(&e));
                }
            }
            tracing::warn!(subscription = %sub.name, sequence, attempts, error = %last.1, "delivery failed");
            if permanent || attempts >= sub.max_attempts {
                break;
            }
            // Paused or stopping: give the event back; it is the first one delivered later.
            let delay = backoff(sub, attempts);
            let mut paused = run.paused.subscribe();
            let interrupted = tokio::select! {
                _ = ctx.stopping() => true,
                _ = paused.wait_for(|p| *p) => true,
                _ = sleep_with_progress(&msg, delay, ack_wait(sub) / 2) => false,
            };
            if interrupted {
                let _ = msg.ack_with(AckKind::Nak(None)).await;
                return;
            }
        }
        // The budget is spent (or the target is forbidden): dead-letter with the last error.
        let mut headers = msg.headers.clone().unwrap_or_default();
        headers.insert(hub::H_DEAD_LETTER_REASON, last.1.as_str());
        headers.insert(hub::H_CIM_SUBJECT, subject.as_str());
        headers.insert(hub::H_CIM_SEQUENCE, sequence.to_string().as_str());
        headers.insert(envelope::H_MSG_ID, format!("hub-dlq-{}-{sequence}", sub.name).as_str());
        let parked = match hub::outbound_dead_letter(&sub.name) {
            Ok(dlq) => match self.js.publish_with_headers(dlq, headers, msg.payload.clone()).await {
                Ok(ack) => ack.await.is_ok(),
                Err(_) => false,
            },
            Err(_) => false,
        };
        if !parked {
            // Not parked: keep the event (redelivered after ack_wait) rather than lose it.
            tracing::error!(subscription = %sub.name, sequence, "cannot dead-letter; the event stays pending");
            let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
            return;
        }
        self.record(
            sub,
            hub::action::DEAD_LETTERED,
            &subject,
            sequence,
            &event_id,
            attempts,
            last.0,
            &last.1,
            started,
            parent.as_ref(),
        )
        .await;
        tracing::warn!(subscription = %sub.name, sequence, attempts, error = %last.1, "event dead-lettered");
        let _ = msg.double_ack().await;
    }

    async fn attempt(
        &self,
        sub: &Subscription,
        msg: &jetstream::Message,
        subject: &str,
        sequence: u64,
        event_id: &str,
    ) -> reqwest::Result<u16> {
        let ts =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
        let mut req = self
            .http
            .post(&sub.url)
            .timeout(sub.timeout)
            .header(hub::H_WEBHOOK_ID, event_id)
            .header(hub::H_WEBHOOK_TIMESTAMP, ts.to_string())
            .header(hub::H_WEBHOOK_SIGNATURE, hub::sign(&sub.key, event_id, ts, &msg.payload))
            .header(hub::H_CIM_SUBJECT, subject)
            .header(hub::H_CIM_SEQUENCE, sequence.to_string());
        // The event's envelope travels as CloudEvents HTTP binary-mode headers.
        if let Some(h) = &msg.headers {
            for name in envelope::HEADERS.iter().filter(|n| n.starts_with("ce-") || **n == envelope::H_CONTENT_TYPE) {
                if let Some(v) = h.get(*name) {
                    req = req.header(*name, v.as_str());
                }
            }
        }
        Ok(req.body(msg.payload.clone()).send().await?.status().as_u16())
    }

    #[allow(clippy::too_many_arguments)]
    async fn record(
        &self,
        sub: &Subscription,
        action: &str,
        subject: &str,
        sequence: u64,
        event_id: &str,
        attempts: u32,
        status: u16,
        error: &str,
        started: Instant,
        parent: Option<&Envelope>,
    ) {
        let entry = DeliveryRecorded {
            subscription: sub.name.clone(),
            event_subject: subject.to_string(),
            event_sequence: sequence,
            event_id: event_id.to_string(),
            attempts,
            http_status: status as u32,
            last_error: error.to_string(),
            at_ms: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis()
                as i64,
            duration_ms: started.elapsed().as_millis() as u64,
        };
        let env = match parent {
            Some(p) => Envelope::caused_by::<DeliveryRecorded>(p, self.ce_source.clone()),
            None => Envelope::root::<DeliveryRecorded>(self.ce_source.clone()),
        };
        let Ok(subject) = hub::delivery_event(&sub.name, action) else { return };
        // One log entry per event and subscription, however often a restart repeats it.
        let entry = NewEvent::new(subject, &env, entry.encode_to_vec())
            .msg_id(&format!("hub-delivery-{}-{}-{sequence}", sub.name, sub.stream));
        match entry.publish(&self.js).await {
            Ok(_) => {}
            Err(e) => tracing::warn!(subscription = %sub.name, error = %e, "delivery log entry not stored"),
        }
    }

    /// The latest `limit` entries of a subscription's delivery log, oldest first.
    pub async fn deliveries(&self, name: &str, limit: usize) -> anyhow::Result<Vec<DeliveryRecorded>> {
        let stream = self.js.get_stream(cim_events::resources::events_stream(crate::COMPONENT).name).await?;
        let filter = hub::delivery_log(name)?;
        let mut total = 0;
        let mut info = stream.info_with_subjects(&filter).await?;
        while let Some(s) = info.next().await {
            total += s?.1;
        }
        let mut out = std::collections::VecDeque::new();
        if total == 0 {
            return Ok(Vec::new());
        }
        let consumer =
            stream.create_consumer(pull::OrderedConfig { filter_subject: filter, ..Default::default() }).await?;
        let mut messages = consumer.messages().await?.take(total);
        while let Some(m) = messages.next().await {
            let m = m?;
            if let Ok(e) = DeliveryRecorded::decode(m.payload.clone()) {
                out.push_back(e);
                if out.len() > limit {
                    out.pop_front();
                }
            }
        }
        Ok(out.into())
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// How long JetStream waits before handing an unacknowledged event to another instance.
fn ack_wait(sub: &Subscription) -> Duration {
    (sub.timeout + Duration::from_secs(2)).max(Duration::from_secs(3))
}

/// `backoff * 2^(attempt-1)`, capped, with "equal jitter": half fixed, half random.
pub fn backoff(sub: &Subscription, attempt: u32) -> Duration {
    let exp = sub.backoff.saturating_mul(1u32 << (attempt.saturating_sub(1)).min(20));
    let capped = exp.min(sub.max_backoff);
    let half = capped / 2;
    half + half.mul_f64(jitter())
}

fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

async fn sleep_with_progress(msg: &jetstream::Message, total: Duration, every: Duration) {
    let end = Instant::now() + total;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left.min(every)).await;
        let _ = msg.ack_with(AckKind::Progress).await;
    }
}
