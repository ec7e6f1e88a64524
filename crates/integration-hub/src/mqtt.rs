//! The MQTT connector, both ways:
//! - topics → events: the hub subscribes (QoS 1, persistent session) and acknowledges a message
//!   to the broker only after its `MqttReceived` event is stored, so a message is never lost
//!   between broker and stream;
//! - events → a topic: events matching a filter, from a durable consumer, are published with
//!   QoS 1 one at a time and acknowledged to JetStream only after the broker's PUBACK.
//!
//! The connection is re-established (and topics re-subscribed) after a broker restart.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, pull},
};
use cim_events::{Envelope, hub, proto::hub::MqttReceived};
use cim_runtime::{Ctx, NewEvent};
use futures::StreamExt;
use prost::Message;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

use crate::config::{Deliver, Mqtt};

pub async fn run(ctx: Ctx, js: jetstream::Context, ce_source: String, m: Mqtt) {
    let mut opts = MqttOptions::new(format!("cim-hub-{}", m.name), m.host.clone(), m.port);
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_clean_session(false);
    opts.set_manual_acks(true);
    if let Some((user, password)) = &m.credentials {
        opts.set_credentials(user.clone(), password.clone());
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let (puback_tx, puback_rx) = mpsc::channel::<()>(64);
    if let Some(p) = m.publish.clone() {
        ctx.spawn(
            &format!("mqtt-{}-publish", m.name),
            publish(ctx.clone(), js.clone(), client.clone(), m.clone(), p, puback_rx),
        );
    }
    let subject = match hub::mqtt_received(&m.name) {
        Ok(s) => s,
        Err(_) => return,
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
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                let _ = puback_tx.try_send(());
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

async fn publish(
    ctx: Ctx,
    js: jetstream::Context,
    client: AsyncClient,
    m: Mqtt,
    p: crate::config::MqttPublish,
    mut pubacks: mpsc::Receiver<()>,
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
            while pubacks.try_recv().is_ok() {}
            // Until the broker acknowledges: a publish queued while the broker is down is sent
            // again after the reconnect (persistent session), so wait, keeping the event ours.
            loop {
                let _ = msg.ack_with(jetstream::AckKind::Progress).await;
                if let Err(e) = client.publish(p.topic.clone(), QoS::AtLeastOnce, false, msg.payload.to_vec()).await {
                    tracing::warn!(connector = %m.name, error = %e, "mqtt publish failed");
                }
                let acked = tokio::select! {
                    _ = ctx.stopping() => return,
                    a = tokio::time::timeout(Duration::from_secs(5), pubacks.recv()) => matches!(a, Ok(Some(()))),
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
