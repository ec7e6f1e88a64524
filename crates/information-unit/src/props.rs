//! Property tests of what information-unit decodes from outside: command requests (protobuf,
//! then the validation each command applies before it looks anything up), unit events read
//! back from the log and folded into a unit's state (also decoded from the projection's KV),
//! and unit type schemas (JSON) with the attributes they check.
//!
//! Budget: [`config`] runs 256 cases per property unless `PROPTEST_CASES` says otherwise
//! (docs/testing.md: `PROPTEST_CASES=100000 cargo nextest run -p information-unit props`).

use std::collections::BTreeMap;

use cim_events::{
    Payload,
    proto::iu::{
        CommandHeader, CreateUnit, DeleteUnit, Link, LinkUnit, NewVersion, Provenance, RegisterType, SetAttributes,
        TagUnit, Unit, UnitAttributesSet, UnitCreated, UnitDeleted, UnitLinked, UnitTagged, UnitUnlinked, UnitUntagged,
        UnitVersioned, UntagUnit,
    },
};
use cim_testkit::props::{bytes, config, wire};
use proptest::prelude::*;
use prost::Message;
use serde_json::json;

use crate::{
    domain::{self, EventMeta, UnitEvent},
    schema::TypeSchema,
};

/// Text a client may send: ordinary, with separators, wildcards or control characters, long.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9_-]{1,12}",
        Just(".".to_string()),
        Just("..".to_string()),
        Just("a/b".to_string()),
        Just("text/plain; charset=utf-8".to_string()),
        ".{0,12}",
        (250usize..260).prop_map(|n| "é".repeat(n / 2)),
    ]
}

fn cid() -> impl Strategy<Value = String> {
    prop_oneof![bytes(16).prop_map(|b| cim_events::Cid::of(&b).to_string()), ".{0,20}", "b[a-z2-7]{0,70}"]
}

fn attributes() -> impl Strategy<Value = std::collections::HashMap<String, String>> {
    prop::collection::hash_map(text(), prop_oneof![text(), (4090usize..4100).prop_map(|n| "v".repeat(n))], 0..4)
}

/// A CreateUnit as a client might send it, fields valid or not.
fn create_unit() -> impl Strategy<Value = CreateUnit> {
    (
        cid(),
        text(),
        text(),
        text(),
        prop::collection::vec(text(), 0..4),
        attributes(),
        prop::collection::vec((text(), text()), 0..3),
    )
        .prop_map(|(cid, name, media_type, unit_type, tags, attributes, links)| CreateUnit {
            header: Some(CommandHeader::default()),
            cid,
            name,
            media_type,
            unit_type,
            tags,
            attributes,
            links: links.into_iter().map(|(kind, target)| Link { kind, target }).collect(),
        })
}

/// The checks `create` applies before any lookup; an accepted request's event passes the
/// metadata limit or is refused by it.
fn validate_create(c: &CreateUnit) -> Result<(), domain::Rejection> {
    let cid = domain::validate_cid(&c.cid)?;
    domain::validate_display_name(&c.name)?;
    domain::validate_media_type(&c.media_type)?;
    domain::validate_tags(&c.tags)?;
    let attrs: BTreeMap<String, String> = c.attributes.clone().into_iter().collect();
    domain::validate_attributes(&attrs)?;
    for l in &c.links {
        domain::validate_link(l)?;
    }
    let _ = cim_events::token::validate_name("unit type", &c.unit_type);
    let event = UnitEvent::Created(UnitCreated {
        unit_id: "u".into(),
        cid: cid.to_string(),
        size: 0,
        name: c.name.clone(),
        media_type: c.media_type.clone(),
        unit_type: c.unit_type.clone(),
        tags: c.tags.clone(),
        attributes: c.attributes.clone(),
        links: c.links.clone(),
    });
    domain::check_metadata_size(&event)
}

/// Every command request decoded from `data`, then validated as the service does.
fn decode_and_validate(data: &[u8]) {
    let _ = CommandHeader::decode(data).map(|h| cim_events::iu::request_key(&h.request_id));
    if let Ok(c) = CreateUnit::decode(data) {
        let _ = validate_create(&c);
    }
    if let Ok(c) = NewVersion::decode(data) {
        let _ = (domain::validate_cid(&c.cid), domain::validate_display_name(&c.name));
        let _ = domain::validate_media_type(&c.media_type);
        let _ = cim_events::iu::unit_history(&c.unit_id);
    }
    if let Ok(c) = TagUnit::decode(data) {
        let _ = domain::validate_tags(&c.tags);
    }
    if let Ok(c) = UntagUnit::decode(data) {
        let _ = domain::validate_tags(&c.tags);
    }
    if let Ok(c) = SetAttributes::decode(data) {
        let _ = domain::validate_attributes(&c.set.into_iter().collect());
    }
    if let Ok(c) = LinkUnit::decode(data)
        && let Some(l) = c.link
    {
        let _ = domain::validate_link(&l);
    }
    if let Ok(c) = DeleteUnit::decode(data) {
        let _ = cim_events::iu::unit_history(&c.unit_id);
    }
    if let Ok(c) = RegisterType::decode(data) {
        let _ = cim_events::token::validate_name("unit type", &c.name);
        let _ = TypeSchema::parse(&c.schema_json);
    }
}

const EVENT_TYPES: [&str; 9] = [
    UnitCreated::TYPE,
    UnitVersioned::TYPE,
    UnitTagged::TYPE,
    UnitUntagged::TYPE,
    UnitAttributesSet::TYPE,
    UnitLinked::TYPE,
    UnitUnlinked::TYPE,
    UnitDeleted::TYPE,
    "cim.iu.unit.exploded",
];

fn meta(sequence: u64, time_ms: i64) -> EventMeta {
    EventMeta { sequence, provenance: Provenance { time_ms, ..Default::default() } }
}

/// A schema document: attribute specs with every kind and limits at the edges of f64 and
/// usize, or any JSON.
fn schema_json() -> impl Strategy<Value = String> {
    let limit = prop_oneof![
        Just(json!(null)),
        Just(json!(0)),
        Just(json!(-1)),
        Just(json!(1e308)),
        Just(json!(-1e308)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(0.5)),
        Just(json!("1")),
    ];
    let spec = (
        prop_oneof![Just("string"), Just("integer"), Just("number"), Just("boolean"), Just("date")],
        any::<bool>(),
        limit.clone(),
        limit.clone(),
        limit,
        prop::option::of(prop::collection::vec(".{0,4}", 0..3)),
    )
        .prop_map(|(kind, required, min, max, max_length, one_of)| {
            let mut s = json!({"type": kind, "required": required});
            for (k, v) in [("min", min), ("max", max), ("max_length", max_length)] {
                if !v.is_null() {
                    s[k] = v;
                }
            }
            if let Some(e) = one_of {
                s["enum"] = json!(e);
            }
            s
        });
    prop_oneof![
        (prop::collection::btree_map(prop_oneof!["[a-z]{1,4}", ".{0,4}"], spec, 0..4), prop::option::of(any::<bool>()))
            .prop_map(|(attrs, additional)| {
                let mut d = json!({"attributes": attrs});
                if let Some(a) = additional {
                    d["additional_attributes"] = json!(a);
                }
                d.to_string()
            }),
        ".{0,40}",
        Just("[]".to_string()),
        Just("{\"attributes\": 1}".to_string()),
    ]
}

/// Attribute values against a schema: numbers at every edge, booleans, text.
fn attribute_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| f.to_string()),
        Just("NaN".to_string()),
        Just("inf".to_string()),
        Just("-0".to_string()),
        Just("1e999".to_string()),
        Just("99999999999999999999".to_string()),
        Just("true".to_string()),
        ".{0,8}",
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Any request body, as any command: decoded or refused, and what decodes is validated
    /// as the command does, never a panic.
    #[test]
    fn command_requests_decode_and_validate(data in wire()) {
        decode_and_validate(&data);
    }

    /// Create requests with fields valid or not: refused with a reason, or accepted only with
    /// a name, media type, tags and attributes the rules allow.
    #[test]
    fn create_requests_are_validated(c in create_unit()) {
        decode_and_validate(&c.encode_to_vec());
        if validate_create(&c).is_ok() {
            prop_assert!(!c.name.is_empty() && !c.name.contains('/') && c.name != "." && c.name != "..");
            prop_assert!(c.media_type.contains('/'));
            prop_assert!(c.tags.iter().all(|t| cim_events::token::validate_token("tag", t).is_ok()));
            prop_assert!(c.attributes.values().all(|v| v.len() <= domain::MAX_ATTRIBUTE_VALUE));
        }
    }

    /// Unit events from the log (any body under any type name) decode or are refused; what
    /// decodes folds into a state, from nothing or from any stored state (itself decoded from
    /// the KV), at any sequence, never a panic; and events round-trip through their encoding.
    #[test]
    fn unit_events_decode_and_fold(
        events in prop::collection::vec((0usize..EVENT_TYPES.len(), wire(), prop_oneof![Just(u64::MAX), any::<u64>(), 0u64..10]), 1..8),
        stored in wire(), version in prop_oneof![Just(u64::MAX), any::<u64>()], time in any::<i64>(),
    ) {
        let mut from_nothing: Option<Unit> = None;
        let mut from_stored: Option<Unit> = Unit::decode(stored.as_slice()).ok().map(|mut u| {
            u.version = version;
            u
        });
        for (t, body, seq) in events {
            if let Ok(e) = UnitEvent::decode(EVENT_TYPES[t], &body) {
                prop_assert_eq!(UnitEvent::decode(e.type_name(), &e.encode()), Ok(e.clone()));
                let _ = (e.summary(), e.action(), domain::check_metadata_size(&e));
                from_nothing = domain::apply(from_nothing, &e, &meta(seq, time));
                from_stored = domain::apply(from_stored, &e, &meta(seq, time));
                if let Some(u) = &from_stored {
                    let _ = domain::require_live(u);
                }
            }
        }
    }

    /// Unit type schemas (JSON from a RegisterType request or its event) parse or are refused;
    /// a parsed schema checks any attributes with an answer, never a panic.
    #[test]
    fn type_schemas_parse_and_check(json in schema_json(), attrs in prop::collection::btree_map(prop_oneof!["[a-z]{1,4}", ".{0,4}"], attribute_value(), 0..5)) {
        if let Ok(s) = TypeSchema::parse(&json) {
            let _ = s.validate(&attrs);
            let _ = domain::check_schema(Some(&s), &attrs);
        }
    }
}

/// Found by `unit_events_decode_and_fold`: a stored state claiming version u64::MAX made the
/// fold's `version + 1` overflow (a panic in debug builds) on the next event.
#[test]
fn regression_fold_onto_the_last_version() {
    let stored = Unit { unit_id: "u".into(), version: u64::MAX, sequence: 1, ..Default::default() };
    let e = UnitEvent::Tagged(UnitTagged { unit_id: "u".into(), tags: vec!["t".into()] });
    let u = domain::apply(Some(stored), &e, &meta(2, 0)).unwrap();
    assert_eq!((u.version, u.tags), (u64::MAX, vec!["t".to_string()]));
}
