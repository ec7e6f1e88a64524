//! Names of the integration-hub contract (aggregates, actions, endpoints, KV keys) and the
//! webhook signature scheme it speaks in both directions (Standard Webhooks: HMAC-SHA256 over
//! `<webhook-id>.<webhook-timestamp>.<body>`, sent as `webhook-signature: v1,<base64>`).
//! The payloads are in `proto/cim/hub/v1/hub.proto`.

use std::time::Duration;

use base64::Engine;
use sha2::{Digest, Sha256};

use crate::{Component, ContractError, subject, token};

const C: Component = Component::IntegrationHub;

/// Aggregate of inbound webhook events; its id is the configured source name.
pub const WEBHOOK: &str = "webhook";

/// Aggregate of the delivery log of one outbound subscription; its id is the subscription name.
pub const DELIVERY: &str = "delivery";
/// Aggregate of the state (paused or not) of one outbound subscription.
pub const SUBSCRIPTION: &str = "subscription";

/// Aggregate of objects imported by an S3 import connector; its id is the connector name.
pub const S3: &str = "s3";

/// Aggregate of messages received by an MQTT connector; its id is the connector name.
pub const MQTT: &str = "mqtt";

/// Aggregate of row changes captured by a PostgreSQL connector; its id is the connector name.
pub const SQL: &str = "sql";

/// Event actions (last subject token).
pub mod action {
    pub const CHANGED: &str = "changed";
    pub const RECEIVED: &str = "received";
    pub const IMPORTED: &str = "imported";
    pub const DELIVERED: &str = "delivered";
    pub const DEAD_LETTERED: &str = "dead_lettered";
    pub const PAUSED: &str = "paused";
    pub const RESUMED: &str = "resumed";
}

/// Command endpoints (`cim.cmd.hub.<name>`).
pub mod cmd {
    pub const PAUSE: &str = "pause";
    pub const RESUME: &str = "resume";
    pub const ALL: [&str; 2] = [PAUSE, RESUME];
}

/// Query endpoints (`cim.qry.hub.<name>`).
pub mod qry {
    /// The configured webhook sources and the address they are served on (JSON).
    pub const SOURCES: &str = "sources";
    /// The outbound subscriptions and their state (JSON).
    pub const SUBSCRIPTIONS: &str = "subscriptions";
    /// The latest delivery log entries of one subscription (request: JSON, reply: JSON).
    pub const DELIVERIES: &str = "deliveries";
    pub const ALL: [&str; 3] = [SOURCES, SUBSCRIPTIONS, DELIVERIES];
}

pub fn command(name: &str) -> Result<String, ContractError> {
    subject::command(C, name)
}

/// `cim.evt.hub.delivery.<subscription>.<delivered|dead_lettered>`.
pub fn delivery_event(subscription: &str, action: &str) -> Result<String, ContractError> {
    subject::event(C, DELIVERY, subscription, action)
}

/// `cim.evt.hub.delivery.<subscription>.*`: the delivery log of one subscription.
pub fn delivery_log(subscription: &str) -> Result<String, ContractError> {
    subject::aggregate_filter(C, DELIVERY, subscription)
}

/// `cim.evt.hub.subscription.<subscription>.<paused|resumed>`.
pub fn subscription_event(subscription: &str, action: &str) -> Result<String, ContractError> {
    subject::event(C, SUBSCRIPTION, subscription, action)
}

/// `cim.evt.hub.subscription.>`: every pause and resume, which every hub instance follows.
pub fn subscription_states() -> String {
    format!("{}.{}.{}.{SUBSCRIPTION}.>", subject::ROOT, subject::Kind::Event.token(), C.token())
}

/// Durable consumer `hub-out-<subscription>` that feeds one subscription, in order.
pub fn outbound_consumer(subscription: &str) -> Result<String, ContractError> {
    token::validate_token("subscription", subscription)?;
    crate::resources::consumer(C, &format!("out-{subscription}"))
}

/// Durable consumer `hub-webhook-ids` that keeps the delivery-id index from the log.
pub fn webhook_ids_consumer() -> String {
    crate::resources::consumer(C, "webhook-ids").expect("a valid consumer name")
}

/// `cim.evt.hub.webhook.*.received`: every accepted delivery of every source.
pub fn webhooks_received() -> String {
    subject::action_filter(C, WEBHOOK, action::RECEIVED).expect("a valid filter")
}

/// `cim.evt.hub.sql.<connector>.changed`: a row change of a connected database.
pub fn table_changed(connector: &str) -> Result<String, ContractError> {
    subject::event(C, SQL, connector, action::CHANGED)
}

/// `Nats-Msg-Id` of a captured row change: a re-published outbox row is dropped by JetStream.
pub fn table_changed_msg_id(connector: &str, outbox_id: i64) -> String {
    format!("hub-sql-{connector}-{outbox_id}")
}

/// `cim.evt.hub.s3.<connector>.imported`: an object that became a unit.
pub fn s3_imported(connector: &str) -> Result<String, ContractError> {
    subject::event(C, S3, connector, action::IMPORTED)
}

/// `Nats-Msg-Id` (and unit request id) of an imported object.
pub fn s3_import_id(connector: &str, key: &str) -> String {
    let hex: String = key.bytes().map(|b| format!("{b:02x}")).collect();
    format!("hub-s3-{connector}-{hex}")
}

/// `cim.evt.hub.mqtt.<connector>.received`: a message from an MQTT broker.
pub fn mqtt_received(connector: &str) -> Result<String, ContractError> {
    subject::event(C, MQTT, connector, action::RECEIVED)
}

/// `cim.dlq.hub.mqtt-<connector>`: MQTT messages the connector could not keep as events (larger
/// than the stream's message limit), with the reason; acknowledged to the broker so it does not
/// send them again for ever.
pub fn mqtt_dead_letter(connector: &str) -> Result<String, ContractError> {
    token::validate_token("connector", connector)?;
    subject::dead_letter(C, &format!("mqtt-{connector}"))
}

/// Durable consumer `hub-mqtt-<connector>` that publishes events to an MQTT topic.
pub fn mqtt_consumer(connector: &str) -> Result<String, ContractError> {
    token::validate_token("connector", connector)?;
    crate::resources::consumer(C, &format!("mqtt-{connector}"))
}

/// Durable consumer `hub-pg-<connector>` that projects events into a connector's table.
pub fn projection_consumer(connector: &str) -> Result<String, ContractError> {
    token::validate_token("connector", connector)?;
    crate::resources::consumer(C, &format!("pg-{connector}"))
}

/// `cim.dlq.hub.out-<subscription>`: events a subscription gave up on, with the last error.
pub fn outbound_dead_letter(subscription: &str) -> Result<String, ContractError> {
    token::validate_token("subscription", subscription)?;
    subject::dead_letter(C, &format!("out-{subscription}"))
}

/// Header of a dead letter carrying the last error.
pub const H_DEAD_LETTER_REASON: &str = "cim-dead-letter-reason";
/// Header of an MQTT dead letter: the topic the message came on.
pub const H_MQTT_TOPIC: &str = "cim-mqtt-topic";
/// Headers of an outbound delivery besides the CloudEvents ones: where the event came from.
pub const H_CIM_SUBJECT: &str = "cim-subject";
pub const H_CIM_SEQUENCE: &str = "cim-sequence";

/// KV bucket purpose (`cim_hub_<purpose>`): accepted webhook delivery ids.
pub const KV_WEBHOOK_IDS: &str = "webhook_ids";
/// How long an accepted delivery id is remembered: always. The index is derived from the log
/// (the `WebhookReceived` events), so a retry after the events stream's duplicate window
/// (the retry horizon) is still answered, never accepted twice.
pub const WEBHOOK_ID_MEMORY: Duration = Duration::ZERO;

/// Standard Webhooks headers.
pub const H_WEBHOOK_ID: &str = "webhook-id";
pub const H_WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
pub const H_WEBHOOK_SIGNATURE: &str = "webhook-signature";
/// Prefix of a Standard Webhooks secret; the rest is the base64 key.
pub const SECRET_PREFIX: &str = "whsec_";

/// `cim.evt.hub.webhook.<source>.received`.
pub fn webhook_event(source: &str) -> Result<String, ContractError> {
    subject::event(C, WEBHOOK, source, action::RECEIVED)
}

/// `cim.evt.hub.webhook.<source>.*`: everything one source delivered.
pub fn webhook_history(source: &str) -> Result<String, ContractError> {
    subject::aggregate_filter(C, WEBHOOK, source)
}

pub fn query(name: &str) -> Result<String, ContractError> {
    subject::query(C, name)
}

/// KV key of an accepted delivery: `<source>.<hex(delivery id)>` (ids are free text).
pub fn webhook_id_key(source: &str, delivery_id: &str) -> Result<String, ContractError> {
    token::validate_token("webhook source", source)?;
    let hex: String = delivery_id.bytes().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{source}.{hex}"))
}

/// `Nats-Msg-Id` of the event of an accepted delivery: JetStream drops a concurrent duplicate.
pub fn webhook_msg_id(source: &str, delivery_id: &str) -> String {
    format!("hub-webhook-{source}-{delivery_id}")
}

/// The HMAC key of a secret: `whsec_<base64>` decodes to its bytes, anything else is used as is.
pub fn secret_key(secret: &str) -> Result<Vec<u8>, ContractError> {
    let secret = secret.trim();
    match secret.strip_prefix(SECRET_PREFIX) {
        Some(b64) => base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| ContractError::InvalidToken {
            what: "webhook secret",
            value: "whsec_…".into(),
            reason: "not base64 after whsec_",
        }),
        None if secret.is_empty() => {
            Err(ContractError::InvalidToken { what: "webhook secret", value: String::new(), reason: "empty" })
        }
        None => Ok(secret.as_bytes().to_vec()),
    }
}

/// HMAC-SHA256 (RFC 2104).
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    for p in parts {
        inner.update(p);
    }
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// The `webhook-signature` value for one delivery: `v1,<base64(hmac)>`.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let ts = timestamp.to_string();
    let mac = hmac_sha256(key, &[id.as_bytes(), b".", ts.as_bytes(), b".", body]);
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac))
}

/// Why a delivery's signature was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("missing {0} header")]
    Missing(&'static str),
    #[error("invalid webhook-timestamp (expected seconds since the epoch)")]
    BadTimestamp,
    #[error("timestamp outside the tolerance of {tolerance_secs}s (off by {off_secs}s)")]
    Expired { tolerance_secs: u64, off_secs: i64 },
    #[error("no valid v1 signature")]
    Invalid,
}

/// Checks a delivery: the timestamp lies within `tolerance` of `now` (both ways) and one of
/// the space-separated `v1,<base64>` signatures matches (compared in constant time).
pub fn verify(
    key: &[u8],
    id: Option<&str>,
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now_secs: i64,
    tolerance: Duration,
) -> Result<i64, SignatureError> {
    let id = id.filter(|s| !s.is_empty()).ok_or(SignatureError::Missing(H_WEBHOOK_ID))?;
    let ts = timestamp.ok_or(SignatureError::Missing(H_WEBHOOK_TIMESTAMP))?;
    let signature = signature.filter(|s| !s.is_empty()).ok_or(SignatureError::Missing(H_WEBHOOK_SIGNATURE))?;
    let ts: i64 = ts.trim().parse().map_err(|_| SignatureError::BadTimestamp)?;
    let off = now_secs.saturating_sub(ts);
    if off.unsigned_abs() > tolerance.as_secs() {
        return Err(SignatureError::Expired { tolerance_secs: tolerance.as_secs(), off_secs: off });
    }
    let expected = sign(key, id, ts, body);
    let ok = signature
        .split(' ')
        .filter(|s| s.starts_with("v1,"))
        .any(|candidate| constant_time_eq(candidate.as_bytes(), expected.as_bytes()));
    if ok { Ok(ts) } else { Err(SignatureError::Invalid) }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        let mac = hmac_sha256(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn standard_webhooks_reference_vector() {
        // The example of the Standard Webhooks specification.
        let key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        let sig = sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        let t = Duration::from_secs(300);
        let ok = verify(
            &key,
            Some("msg_p5jXN8AQM9LWM0D4loKWxJek"),
            Some("1614265330"),
            Some(&format!("v1,bogus {sig}")),
            body,
            1614265330 + 10,
            t,
        );
        assert_eq!(ok, Ok(1614265330));
    }

    #[test]
    fn refuses_missing_wrong_and_expired() {
        let key = b"k".to_vec();
        let t = Duration::from_secs(300);
        let sig = sign(&key, "id1", 1000, b"x");
        assert_eq!(
            verify(&key, None, Some("1000"), Some(&sig), b"x", 1000, t),
            Err(SignatureError::Missing(H_WEBHOOK_ID))
        );
        assert_eq!(
            verify(&key, Some("id1"), Some("1000"), None, b"x", 1000, t),
            Err(SignatureError::Missing(H_WEBHOOK_SIGNATURE))
        );
        assert_eq!(
            verify(&key, Some("id1"), Some("soon"), Some(&sig), b"x", 1000, t),
            Err(SignatureError::BadTimestamp)
        );
        assert_eq!(verify(&key, Some("id1"), Some("1000"), Some(&sig), b"y", 1000, t), Err(SignatureError::Invalid));
        assert_eq!(
            verify(b"other", Some("id1"), Some("1000"), Some(&sig), b"x", 1000, t),
            Err(SignatureError::Invalid)
        );
        assert!(matches!(
            verify(&key, Some("id1"), Some("1000"), Some(&sig), b"x", 1301, t),
            Err(SignatureError::Expired { .. })
        ));
        assert!(matches!(
            verify(&key, Some("id1"), Some("1000"), Some(&sig), b"x", 699, t),
            Err(SignatureError::Expired { .. })
        ));
        assert!(secret_key("whsec_!!").is_err());
        assert!(secret_key("  ").is_err());
    }

    #[test]
    fn names() {
        assert_eq!(webhook_event("github").unwrap(), "cim.evt.hub.webhook.github.received");
        assert!(webhook_event("a.b").is_err());
        assert_eq!(webhook_id_key("gh", "a.b").unwrap(), "gh.612e62");
        assert_eq!(query(qry::SOURCES).unwrap(), "cim.qry.hub.sources");
        assert_eq!(outbound_consumer("crm").unwrap(), "hub-out-crm");
        assert_eq!(outbound_dead_letter("crm").unwrap(), "cim.dlq.hub.out-crm");
        assert_eq!(delivery_event("crm", action::DELIVERED).unwrap(), "cim.evt.hub.delivery.crm.delivered");
        assert_eq!(command(cmd::PAUSE).unwrap(), "cim.cmd.hub.pause");
    }
}
