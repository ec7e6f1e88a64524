//! The MQTT connector, both ways:
//! - topics → events: the hub subscribes (QoS 1, persistent session) and acknowledges a message
//!   to the broker only after its `MqttReceived` event is stored, so a message is never lost
//!   between broker and stream;
//! - events → a topic: events matching a filter, from a durable consumer, are published with
//!   QoS 1 one at a time and acknowledged to JetStream only after the broker's PUBACK.
//!
//! The connection is re-established (and topics re-subscribed) after a broker restart.
//!
//! Packets up to MQTT's own limit (256 MiB) are read and written: a smaller client limit made a
//! larger message drop the connection, and the broker sent it again for ever. A message too
//! large to keep as an event (the stream's message limit) is dead-lettered with its topic and
//! size (`cim.dlq.hub.mqtt-<connector>`) and then acknowledged. A publish waits for the PUBACK
//! of its own packet id.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, pull},
};
use cim_events::{Envelope, hub, proto::hub::MqttReceived};
use cim_runtime::{Ctx, NewEvent};
use futures::StreamExt;
use prost::Message;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::mpsc;

use crate::config::{Deliver, Mqtt};

/// The largest packet MQTT can carry (its remaining length is at most 268,435,455 bytes).
const MQTT_MAX_PACKET: usize = 268_435_455;
/// Room kept in a NATS message for the event's headers and envelope.
const EVENT_HEADROOM: usize = 16 * 1024;

/// What the connection tells the publishing task: a publish went out with a packet id, or the
/// broker acknowledged one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flight {
    Sent(u16),
    Acked(u16),
}

pub async fn run(ctx: Ctx, js: jetstream::Context, ce_source: String, m: Mqtt) {
    let mut opts = MqttOptions::new(format!("cim-hub-{}", m.name), m.host.clone(), m.port);
    opts.set_max_packet_size(MQTT_MAX_PACKET, MQTT_MAX_PACKET);
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_clean_session(false);
    opts.set_manual_acks(true);
    if let Some((user, password)) = &m.credentials {
        opts.set_credentials(user.clone(), password.clone());
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let (puback_tx, puback_rx) = mpsc::channel::<Flight>(64);
    if let Some(p) = m.publish.clone() {
        ctx.spawn(
            &format!("mqtt-{}-publish", m.name),
            publish(ctx.clone(), js.clone(), client.clone(), m.clone(), p, puback_rx),
        );
    }
    let (Ok(subject), Ok(dead_letters)) = (hub::mqtt_received(&m.name), hub::mqtt_dead_letter(&m.name)) else {
        return;
    };
    let mut connected = false;
    loop {
        let event = tokio::select! {
            _ = ctx.stopping() => { let _ = client.disconnect().await; return; }
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if !connected {
                    tracing::info!(connector = %m.name, host = %m.host, port = m.port, "mqtt connected");
                }
                connected = true;
                for t in &m.subscribe {
                    if let Err(e) = client.subscribe(t.clone(), QoS::AtLeastOnce).await {
                        tracing::warn!(connector = %m.name, topic = %t, error = %e, "mqtt subscribe failed");
                    }
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                let _ = puback_tx.try_send(Flight::Sent(pkid));
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                let _ = puback_tx.try_send(Flight::Acked(ack.pkid));
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let event = MqttReceived {
                    connector: m.name.clone(),
                    topic: p.topic.clone(),
                    payload: p.payload.to_vec(),
                    qos: p.qos as u32,
                    retain: p.retain,
                };
                let env = Envelope::root::<MqttReceived>(ce_source.clone());
                let limit = (ctx.client().server_info().max_payload).saturating_sub(EVENT_HEADROOM);
                if event.encoded_len() > limit {
                    // Never storable: park what it was and let the broker forget it, rather than
                    // have it sent again for ever.
                    let reason = format!(
                        "message of {} bytes is larger than the {limit} bytes an event may hold",
                        p.payload.len()
                    );
                    tracing::warn!(connector = %m.name, topic = %p.topic, %reason, "mqtt message dead-lettered");
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert(hub::H_DEAD_LETTER_REASON, reason.as_str());
                    headers.insert(hub::H_MQTT_TOPIC, p.topic.as_str());
                    let parked = match js.publish_with_headers(dead_letters.clone(), headers, Default::default()).await
                    {
                        Ok(ack) => ack.await.is_ok(),
                        Err(_) => false,
                    };
                    if parked {
                        let _ = client.ack(&p).await;
                    }
                    continue;
                }
                // Stored first, acknowledged to the broker after: a failure leaves it with the broker.
                let stored = NewEvent::new(subject.clone(), &env, event.encode_to_vec()).publish(&js).await.is_ok();
                if stored {
                    let _ = client.ack(&p).await;
                } else {
                    tracing::warn!(connector = %m.name, topic = %p.topic, "mqtt message not stored; not acknowledged, the broker sends it again");
                }
            }
            Ok(_) => {}
            Err(e) => {
                if connected {
                    tracing::warn!(connector = %m.name, error = %e, "mqtt connection lost; reconnecting");
                }
                connected = false;
                if !ctx.pause(Duration::from_millis(500)).await {
                    return;
                }
            }
        }
    }
}

/// Waits for the PUBACK of this task's publish: the packet id of the next publish that goes
/// out (this task is the connection's only publisher), then the acknowledgement of that id.
/// An acknowledgement of another id (a publish before a reconnect) does not count.
async fn own_puback(flights: &mut mpsc::Receiver<Flight>) {
    let mut sent = None;
    while let Some(f) = flights.recv().await {
        match (f, sent) {
            (Flight::Sent(id), _) => sent = Some(id),
            (Flight::Acked(id), Some(s)) if id == s => return,
            _ => {}
        }
    }
    std::future::pending::<()>().await
}

async fn publish(
    ctx: Ctx,
    js: jetstream::Context,
    client: AsyncClient,
    m: Mqtt,
    p: crate::config::MqttPublish,
    mut flights: mpsc::Receiver<Flight>,
) {
    let opened = ctx
        .retry_until_stopped(&format!("the mqtt publish consumer of {}", m.name), || async {
            let config = pull::Config {
                durable_name: Some(hub::mqtt_consumer(&m.name)?),
                filter_subject: p.filter.clone(),
                deliver_policy: match p.deliver {
                    Deliver::New => DeliverPolicy::New,
                    Deliver::All => DeliverPolicy::All,
                },
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: 1,
                ..Default::default()
            };
            cim_runtime::consumer::durable(&js, &p.stream, config).await
        })
        .await;
    let Some(consumer) = opened else { return };
    loop {
        let batch = tokio::select! {
            _ = ctx.stopping() => return,
            b = consumer.fetch().max_messages(1).expires(Duration::from_secs(1)).messages() => b,
        };
        let Ok(mut batch) = batch else {
            if !ctx.pause(Duration::from_millis(500)).await {
                return;
            }
            continue;
        };
        while let Some(Ok(msg)) = batch.next().await {
            while flights.try_recv().is_ok() {}
            // Until the broker acknowledges: a publish queued while the broker is down is sent
            // again after the reconnect (persistent session), so wait, keeping the event ours.
            loop {
                let _ = msg.ack_with(jetstream::AckKind::Progress).await;
                if let Err(e) = client.publish(p.topic.clone(), QoS::AtLeastOnce, false, msg.payload.to_vec()).await {
                    tracing::warn!(connector = %m.name, error = %e, "mqtt publish failed");
                }
                let acked = tokio::select! {
                    _ = ctx.stopping() => return,
                    a = tokio::time::timeout(Duration::from_secs(5), own_puback(&mut flights)) => a.is_ok(),
                };
                if acked {
                    let _ = msg.double_ack().await;
                    break;
                }
                tracing::warn!(connector = %m.name, topic = %p.topic, "no PUBACK yet; publishing again");
            }
        }
    }
}
