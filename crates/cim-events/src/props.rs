//! Property tests of the decoders of bytes that come from outside a process: the envelope read
//! back from NATS headers, every protobuf payload type (and the upcasting path), subjects and
//! CIDs read back from strings, API token strings, and webhook signatures (Standard Webhooks).
//!
//! Budget: [`config`] runs 256 cases per property unless `PROPTEST_CASES` says otherwise
//! (docs/testing.md: `PROPTEST_CASES=100000 cargo nextest run -p cim-events props`).

use std::time::Duration;

use async_nats::HeaderMap;
use base64::Engine;
use cim_testkit::props::{bytes, config, wire};
use proptest::prelude::*;
use prost::Message;
use time::OffsetDateTime;

use crate::{
    Cid, Component, Envelope, Schema, Upcasters,
    envelope::{self, HEADERS},
    gateway, hub,
    payload::{self, Payload},
    plugin as plg,
    proto::{hub as phub, iu, pipeline as pl, plugin, registry as reg, runtime as rt},
    subject,
};

/// Decodes `data` as `T`; what decodes encodes to something that decodes to the same value.
#[allow(clippy::eq_op)]
fn decodes_or_refuses<T: Message + Default + PartialEq + std::fmt::Debug>(data: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(m) = T::decode(data) {
        let again = T::decode(m.encode_to_vec().as_slice());
        prop_assert!(again.is_ok(), "{} re-encoded does not decode", std::any::type_name::<T>());
        // A message holding a NaN (registry's cpu figures) is not equal to itself.
        if m == m {
            prop_assert_eq!(again.unwrap(), m);
        }
    }
    Ok(())
}

macro_rules! every_message {
    ($data:expr; $($t:ty),* $(,)?) => {{
        $(decodes_or_refuses::<$t>($data)?;)*
    }};
}

/// Every protobuf message of the contract (services decode each from the wire or a store).
fn decode_every_message(data: &[u8]) -> Result<(), TestCaseError> {
    every_message!(data;
        rt::ServiceAnnouncedV1, rt::ServiceAnnounced, rt::ServiceHeartbeat, rt::ServiceStopped, rt::DescribeReply,
        rt::StreamState, rt::ServiceDrained, rt::DrainRequested,
        phub::WebhookReceived, phub::DeliveryRecorded, phub::SubscriptionStateChanged, phub::SubscriptionCommand,
        phub::TableChanged, phub::MqttReceived, phub::S3ObjectImported,
        pl::PipelineApplied, pl::PipelineRemoved, pl::RunRequested, pl::RunStarted, pl::StepStarted,
        pl::StepWaiting, pl::StepCompleted, pl::StepFailed, pl::RunEmitted, pl::RunCompleted, pl::RunFailed, pl::RunCancelled,
        pl::RunRetried,
        plugin::InvokeError, plugin::InvokeRequest, plugin::InvokeReply, plugin::Limits, plugin::Manifest,
        plugin::PluginAnnounced, plugin::PluginPushed, plugin::PluginRemoved, plugin::PushPlugin, plugin::PushReply,
        plugin::RemovePlugin, plugin::RemoveReply, plugin::ListPlugins, plugin::PluginInfo, plugin::ListReply,
        plugin::StatsReply, plugin::PluginReference,
        reg::Instance, reg::InstanceRegistered, reg::InstanceDrained, reg::InstanceStopped, reg::InstanceLost,
        reg::InstanceDuplicated, reg::Node, reg::NodeEnrolled, reg::NodeStateChanged, reg::DesiredService,
        reg::DesiredSet, reg::EnrollNode, reg::NodeCommand, reg::NodeReply, reg::SetDesired, reg::Ack,
        reg::ListInstances, reg::InstanceList, reg::ListNodes, reg::NodeList, reg::GetOverview, reg::Problem,
        reg::ComponentDescription, reg::Overview,
        iu::Link, iu::UnitCreated, iu::UnitVersioned, iu::UnitTagged, iu::UnitUntagged, iu::UnitAttributesSet,
        iu::UnitLinked, iu::UnitUnlinked, iu::UnitDeleted, iu::UnitTypeRegistered, iu::ContentStored,
        iu::ContentCorrupted, iu::ContentCollected, iu::CommandHeader, iu::CommitContent, iu::ContentCommitted,
        iu::CreateUnit, iu::NewVersion, iu::TagUnit, iu::UntagUnit, iu::SetAttributes, iu::LinkUnit,
        iu::UnlinkUnit, iu::DeleteUnit, iu::RegisterType, iu::CommandResult, iu::Rebuild, iu::RebuildStarted,
        iu::ReportCorrupt, iu::Provenance, iu::ContentVersion, iu::Unit, iu::GetUnit, iu::GetHistory,
        iu::HistoryEntry, iu::History, iu::ListUnits, iu::UnitList, iu::GetLinks, iu::IncomingLink, iu::Links,
        iu::GetType, iu::UnitType, iu::ValidateAttributes, iu::Validation, iu::ProjectionStatus,
        gateway::ApiToken,
    );
    Ok(())
}

/// A header value as it might arrive: valid for one of the envelope's headers, or anything.
fn header_value() -> impl Strategy<Value = Option<String>> {
    let uuid = prop_oneof![
        Just(envelope::new_id().to_string()),
        Just(uuid::Uuid::new_v4().to_string()),
        Just(uuid::Uuid::nil().to_string()),
        Just(uuid::Uuid::max().to_string()),
    ];
    prop::option::weighted(
        0.9,
        prop_oneof![
            Just("1.0".to_string()),
            uuid,
            Just("2024-02-29T23:59:60Z".to_string()),
            Just("9999-12-31T23:59:59.999999999+23:59".to_string()),
            Just("0000-01-01T00:00:00-23:59".to_string()),
            Just(format!("urn:cim:x:v{}", u32::MAX)),
            Just(format!("urn:cim:x:v{}", u64::MAX)),
            Just("urn:cim::v1".to_string()),
            Just("urn:cim:a:v0".to_string()),
            Just("urn:cim:a:v".to_string()),
            "\\PC{0,40}",
            // Anything a header value can hold (the client refuses CR and LF on the wire).
            "[^\r\n]{0,40}",
        ],
    )
}

fn envelope_headers() -> impl Strategy<Value = HeaderMap> {
    prop::collection::vec(header_value(), HEADERS.len()).prop_map(|values| {
        let mut h = HeaderMap::new();
        for (name, value) in HEADERS.iter().zip(values) {
            if let Some(v) = value {
                h.insert(*name, v.as_str());
            }
        }
        h
    })
}

/// A time RFC 3339 can write (years 0001-9999), to the nanosecond, in UTC.
fn rfc3339_time() -> impl Strategy<Value = OffsetDateTime> {
    (-62_135_596_800i64..253_402_300_799, 0u32..1_000_000_000).prop_map(|(s, ns)| {
        OffsetDateTime::from_unix_timestamp(s).unwrap() + time::Duration::nanoseconds(i64::from(ns))
    })
}

/// A header value that survives the wire (no CR/LF), not empty.
fn text() -> impl Strategy<Value = String> {
    "[^\r\n]{1,40}"
}

proptest! {
    #![proptest_config(config())]

    /// Any set of envelope headers, valid or not, is read or refused, never a panic; what is
    /// read obeys the id rule.
    #[test]
    fn envelope_headers_never_panic(h in envelope_headers()) {
        if let Ok(env) = Envelope::from_headers(&h) {
            prop_assert_eq!(env.is_root(), env.causation_id() == env.id());
            prop_assert!(env.schema.version > 0);
            prop_assert_eq!(env.id().get_version_num(), 7);
        }
    }

    /// write_headers → from_headers is the identity, for roots and for derived messages.
    #[test]
    fn envelope_round_trips(
        kind in text(), source in text(), name in text(), version in 1u32..=u32::MAX,
        time in rfc3339_time(), derived in any::<bool>(),
    ) {
        let schema = Schema { name, version };
        let mut env = Envelope::new_root(&kind, schema.clone(), source.clone());
        if derived {
            env = Envelope::new_caused_by(&env, &kind, schema, source);
        }
        env.time = time;
        let back = Envelope::from_headers(&env.to_headers());
        prop_assert_eq!(back, Ok(env));
    }

    /// `ce-dataschema` of any text is parsed or refused; a written one reads back.
    #[test]
    fn schema_uris_parse_or_refuse(uri in ".{0,60}", name in text(), version in 1u32..=u32::MAX) {
        if let Ok(s) = Schema::parse(&uri) {
            prop_assert!(!s.name.is_empty() && s.version > 0);
        }
        let s = Schema { name, version };
        prop_assert_eq!(Schema::parse(&s.to_uri()), Ok(s));
    }

    /// Arbitrary bytes (and well-formed wire data) as every message type: decoded or refused;
    /// what decodes re-encodes to the same value.
    #[test]
    fn every_payload_type_decodes_or_refuses(data in wire()) {
        decode_every_message(&data)?;
    }

    /// The whole read path of a message (envelope + upcasting + payload) with arbitrary bodies,
    /// including the v1 → v2 upcaster of announcements.
    #[test]
    fn payload_decode_with_upcasting_never_panics(data in wire(), version in prop_oneof![Just(0u32), Just(1), Just(2), Just(3), Just(u32::MAX)]) {
        let upcasters = Upcasters::default();
        let schema = Schema { name: rt::ServiceAnnounced::TYPE.to_string(), version };
        let direct = upcasters.decode::<rt::ServiceAnnounced>(&schema, &data);
        if version > rt::ServiceAnnounced::SCHEMA_VERSION {
            let is_future = matches!(direct, Err(crate::ContractError::FutureVersion { .. }));
            prop_assert!(is_future);
        }
        let env = Envelope::new_root(rt::ServiceAnnounced::TYPE, schema, "/x");
        let via_message = payload::decode::<rt::ServiceAnnounced>(Some(&env.to_headers()), &data, &upcasters);
        if version > 0 {
            prop_assert_eq!(via_message.map(|(_, p)| p), direct);
        } else {
            prop_assert!(via_message.is_err() && direct.is_err()); // version 0 is no schema version
        }
        let hb = Envelope::root::<rt::ServiceHeartbeat>("/x");
        let _ = payload::decode::<rt::ServiceHeartbeat>(Some(&hb.to_headers()), &data, &upcasters);
        let _ = payload::decode::<plugin::PluginPushed>(Some(&hb.to_headers()), &data, &upcasters);
    }

    /// encode → decode of a payload with its envelope is the identity.
    #[test]
    fn payload_round_trips(component in ".{0,20}", instance in ".{0,20}", uptime in any::<u64>(), ready in any::<bool>(), in_flight in any::<u64>()) {
        let msg = rt::ServiceHeartbeat { component, instance_id: instance, uptime_ms: uptime, ready, in_flight, ..Default::default() };
        let env = Envelope::root::<rt::ServiceHeartbeat>("/x");
        let (h, body) = payload::encode(&env, &msg);
        let back = payload::decode::<rt::ServiceHeartbeat>(Some(&h), &body, &Upcasters::default());
        prop_assert_eq!(back, Ok((env, msg)));
    }

    /// Subjects read back from the wire: parsed or refused; built ones parse back.
    #[test]
    fn subjects_parse_or_refuse(
        s in prop_oneof!["\\PC{0,80}", "cim\\.(evt|svc)\\.[a-z-]{0,20}(\\.[^.]{0,10}){0,5}"],
        c in 0..Component::ALL.len(), agg in "[a-z_]{1,10}", id in "[!-~&&[^.*>]]{1,128}", act in "[a-z_]{1,10}",
    ) {
        let _ = subject::parse_event(&s);
        let _ = subject::parse_lifecycle(&s);
        let _ = Component::parse(&s);
        let c = Component::ALL[c];
        let built = subject::event(c, &agg, &id, &act).unwrap();
        let back = subject::parse_event(&built).unwrap();
        prop_assert_eq!((back.component, back.aggregate, back.id, back.action), (c, agg, id, act));
    }

    /// CIDs from strings (object store digests, CID text): parsed or refused; round trips.
    #[test]
    fn cids_parse_or_refuse(s in prop_oneof![".{0,80}", "SHA-256=[A-Za-z0-9_=-]{0,50}", "b[a-z2-7]{0,70}"], content in bytes(64)) {
        let _ = Cid::from_object_digest(&s);
        let _ = s.parse::<Cid>();
        let cid = Cid::of(&content);
        prop_assert_eq!(Cid::from_object_digest(&cid.to_object_digest()), Ok(cid));
        prop_assert_eq!(cid.to_string().parse::<Cid>(), Ok(cid));
    }

    /// `cimt_<id>_<secret>` tokens: any string is read or refused; a well-formed one names its
    /// id; hashes compare equal exactly when equal.
    #[test]
    fn api_tokens_parse_or_refuse(
        s in prop_oneof![".{0,300}", "cimt_[A-Za-z0-9_]{0,140}"],
        id in "[A-Za-z0-9]{1,128}", secret in "[A-Za-z0-9]{1,128}", other in ".{0,70}",
    ) {
        if let Some(id) = gateway::token_id(&s) {
            prop_assert!(!id.is_empty() && id.len() <= 128);
        }
        let token = format!("cimt_{id}_{secret}");
        prop_assert_eq!(gateway::token_id(&token), Some(id.as_str()));
        let h = gateway::hash_token(&token);
        prop_assert!(gateway::hashes_equal(&h, &h));
        prop_assert_eq!(gateway::hashes_equal(&h, &other), h == other);
        prop_assert_eq!(gateway::hashes_equal(&h, &gateway::hash_token(&other)), token == other);
    }

    /// Webhook verification with any headers, body, clock and tolerance (extremes included):
    /// a result or a refusal, never a panic; an accepted timestamp is within the tolerance.
    #[test]
    fn webhook_verify_never_panics(
        key in bytes(80), id in prop::option::of(".{0,30}"),
        ts in prop::option::of(prop_oneof![".{0,25}", any::<i64>().prop_map(|n| n.to_string()), Just(format!("{}", u64::MAX)), Just(" +12 ".to_string())]),
        sig in prop::option::of(prop_oneof![".{0,120}", "(v1,[A-Za-z0-9+/=]{0,50} ?){0,4}"]),
        body in bytes(128), now in any::<i64>(), tolerance in prop_oneof![Just(u64::MAX), Just(0u64), any::<u64>(), 0u64..1000],
    ) {
        let tolerance = Duration::from_secs(tolerance);
        if let Ok(at) = hub::verify(&key, id.as_deref(), ts.as_deref(), sig.as_deref(), &body, now, tolerance) {
            prop_assert!(now.saturating_sub(at).unsigned_abs() <= tolerance.as_secs());
        }
    }

    /// sign → verify accepts within the tolerance (both ways) and refuses as expired outside.
    #[test]
    fn webhook_signatures_verify_within_tolerance(
        key in bytes(80), id in "[^ ]{1,30}", ts in any::<i64>(), body in bytes(128),
        skew in any::<i64>(), tolerance in prop_oneof![0u64..600, any::<u64>()],
    ) {
        let sig = hub::sign(&key, &id, ts, &body);
        let now = ts.saturating_add(skew);
        let off = now.saturating_sub(ts);
        let got = hub::verify(&key, Some(&id), Some(&ts.to_string()), Some(&sig), &body, now, Duration::from_secs(tolerance));
        if off.unsigned_abs() <= tolerance {
            prop_assert_eq!(got, Ok(ts));
        } else {
            let expired = matches!(got, Err(hub::SignatureError::Expired { .. }));
            prop_assert!(expired);
        }
    }

    /// A signed delivery with one byte of its body, id, timestamp or signature changed, or
    /// checked with another key, is refused.
    #[test]
    fn webhook_verify_refuses_any_change(
        key in bytes(80), id in "[A-Za-z0-9_-]{1,30}", ts in 0i64..4_000_000_000, body in bytes(128),
        at in any::<prop::sample::Index>(), flip in 1u8..=255, what in 0u8..5,
    ) {
        let sig = hub::sign(&key, &id, ts, &body);
        let t = Duration::from_secs(u64::MAX);
        prop_assert_eq!(hub::verify(&key, Some(&id), Some(&ts.to_string()), Some(&sig), &body, ts, t), Ok(ts));
        let (mut key2, mut id2, mut ts2, mut sig2, mut body2) = (key.clone(), id.clone().into_bytes(), ts, sig.clone().into_bytes(), body.clone());
        match what {
            0 if !body2.is_empty() => { let i = at.index(body2.len()); body2[i] ^= flip }
            0 => body2.push(flip),
            1 => { let i = at.index(id2.len()); id2[i] = if id2[i] == b'x' { b'y' } else { b'x' } }
            2 => ts2 = ts2 + 1 + i64::from(flip),
            3 => { let i = at.index(sig2.len()); sig2[i] ^= flip }
            _ => if key2.is_empty() { key2.push(flip) } else { let i = at.index(key2.len()); key2[i] ^= flip },
        }
        let id2 = String::from_utf8(id2).unwrap();
        let Ok(sig2) = String::from_utf8(sig2) else { return Ok(()) }; // not a header value
        let got = hub::verify(&key2, Some(&id2), Some(&ts2.to_string()), Some(&sig2), &body2, ts, t);
        prop_assert!(got.is_err(), "accepted a changed delivery ({what})");
    }

    /// Webhook secrets: any text is a key or a refusal; `whsec_<base64>` is its bytes.
    #[test]
    fn webhook_secrets_parse_or_refuse(s in prop_oneof![".{0,80}", "whsec_[A-Za-z0-9+/=]{0,60}"], key in bytes(64)) {
        let _ = hub::secret_key(&s);
        let b64 = base64::engine::general_purpose::STANDARD.encode(&key);
        prop_assert_eq!(hub::secret_key(&format!("whsec_{b64}")), Ok(key));
    }

    /// Plugin requests as the plugin host reads them (push, remove, invoke): decoded or
    /// refused, and their names, versions, capabilities and upload ids checked as the host
    /// does, never a panic.
    #[test]
    fn plugin_requests_decode_and_validate(data in wire()) {
        if let Ok(p) = plugin::PushPlugin::decode(data.as_slice()) {
            if let Some(m) = &p.manifest {
                let _ = (plg::validate_name(&m.name), plg::validate_version(&m.version));
                for c in &m.capabilities {
                    let _ = plg::validate_capability(c);
                }
            }
            if let Some(id) = p.upload.strip_prefix(plg::UPLOAD_PREFIX) {
                let _ = plg::upload_object(id);
            }
        }
        if let Ok(r) = plugin::RemovePlugin::decode(data.as_slice()) {
            let _ = (plg::validate_name(&r.name), plg::validate_version(&r.version), plg::invoke_subject(&r.name, &r.version));
        }
        if let Ok(r) = plugin::InvokeRequest::decode(data.as_slice()) {
            let _ = (plg::parse_reference(&r.plugin), plg::validate_capability(&r.capability), plg::version_token(&r.version));
        }
    }

    /// Plugin references and version tokens: any text is read or refused; valid ones round-trip
    /// (`name@version`, and a version through its subject token).
    #[test]
    fn plugin_references_round_trip(
        s in prop_oneof![".{0,40}", "[a-z0-9-]{0,10}@[0-9A-Za-z.+_-]{0,10}"],
        name in "[a-z0-9][a-z0-9-]{0,63}", version in "[0-9A-Za-z+-]{1,10}(\\.[0-9A-Za-z+-]{1,10}){0,3}",
    ) {
        let _ = (plg::parse_reference(&s), plg::version_from_token(&s), plg::validate_capability(&s));
        prop_assert_eq!(plg::parse_reference(&plg::reference(&name, &version)), Ok((name.clone(), Some(version.clone()))));
        prop_assert_eq!(plg::version_from_token(&plg::version_token(&version).unwrap()), Ok(version));
    }
}
