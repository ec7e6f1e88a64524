//! Property tests of what the engine reads from outside: pipeline definitions (JSON from an
//! apply request or from a `PipelineApplied` event), their templates, globs and media type
//! patterns, and run events decoded from the log and folded into a run.
//!
//! Budget: [`config`] runs 256 cases per property unless `PROPTEST_CASES` says otherwise
//! (docs/testing.md: `PROPTEST_CASES=100000 cargo nextest run -p pipeline-engine props`).

use cim_events::{pipeline::action, proto::pipeline::PipelineApplied};
use cim_testkit::props::config;
use proptest::prelude::*;
use serde_json::{Value, json};

use crate::{
    definition::{self, Definition, Step},
    state::{Run, RunEvent, View},
};

/// Numbers as JSON may carry them: small, at the edges of u32/u64, negative, fractional.
fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0u64..40).prop_map(Value::from),
        Just(json!(u32::MAX)),
        Just(json!(u64::MAX)),
        Just(json!(600_001)),
        Just(json!(-1)),
        Just(json!(i64::MIN)),
        Just(json!(1.5)),
        Just(json!(1e300)),
        Just(Value::Null),
        Just(json!("7")),
    ]
}

fn step_id() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a".to_string()),
        Just("b".to_string()),
        Just("c-1".to_string()),
        Just("unit".to_string()),
        Just(String::new()),
        "[a-z0-9_-]{1,70}",
        ".{0,8}",
    ]
}

/// A field reference or content source, well-formed or not.
fn field() -> impl Strategy<Value = String> {
    prop_oneof![
        step_id().prop_map(|s| format!("{s}.output")),
        Just("unit.content".to_string()),
        Just("unit.name".to_string()),
        Just("unit.attr.x".to_string()),
        Just("unit.nope".to_string()),
        Just("param.p".to_string()),
        Just("a.".to_string()),
        Just("a".to_string()),
        ".{0,12}",
    ]
}

/// A template: literal text, `{field}` references, escaped and unbalanced braces.
fn template() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            field().prop_map(|f| format!("{{{f}}}")),
            Just("{{".to_string()),
            Just("}}".to_string()),
            Just("{".to_string()),
            Just("}".to_string()),
            Just("{ }".to_string()),
            "[^{}]{0,6}",
        ],
        0..5,
    )
    .prop_map(|parts| parts.concat())
}

fn strings_map() -> impl Strategy<Value = Value> {
    prop::collection::btree_map(prop_oneof!["[a-zA-Z0-9_-]{1,8}", ".{0,4}"], template(), 0..3).prop_map(|m| json!(m))
}

fn plugin_ref() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("text-normalize@1.0.0".to_string()),
        Just("x".to_string()),
        Just("@".to_string()),
        Just("x@".to_string()),
        ".{0,12}",
    ]
}

/// One step: usually one kind (sometimes none or two), with limits at their edges.
fn step() -> impl Strategy<Value = Value> {
    let kind = prop_oneof![
        plugin_ref().prop_map(|p| json!({"plugin": p})),
        "[a-z.]{0,12}".prop_map(|c| json!({"capability": c})),
        (plugin_ref(), field(), strings_map()).prop_map(|(p, i, o)| json!({"plugin": p, "input": i, "options": o})),
        (field(), 0u8..6, template()).prop_map(|(f, op, v)| {
            let ops = ["equals", "not_equals", "matches", "exists", "exists", "nope"];
            let v = if op == 3 {
                json!(true)
            } else if op == 4 {
                json!("yes")
            } else {
                json!(v)
            };
            json!({"filter": {"field": f, ops[op as usize]: v}})
        }),
        strings_map().prop_map(|m| json!({"map": m})),
        prop::collection::vec(template(), 0..3).prop_map(|t| json!({"tag": t})),
        strings_map().prop_map(|m| json!({"set_attributes": m})),
        (field(), template(), number(), ".{0,6}").prop_map(|(c, n, max, link)| {
            json!({"create_unit": {"content": c, "name": n, "max_bytes": max, "link": link}})
        }),
        field().prop_map(|c| json!({"new_version": {"content": c}})),
        ("[a-zA-Z0-9_-]{0,8}", strings_map()).prop_map(|(n, d)| json!({"emit": {"name": n, "data": d}})),
        (field(), prop_oneof![Just("lines"), Just("json"), Just("csv")], plugin_ref(), number())
            .prop_map(|(i, s, p, m)| json!({"for_each": {"items": i, "split": s, "plugin": p, "max_items": m}})),
    ];
    (
        step_id(),
        prop::collection::vec(kind, 0..3),
        prop::option::of(number()),
        prop::option::of(number()),
        prop::option::of(number()),
    )
        .prop_map(|(id, kinds, timeout, retries, backoff)| {
            let mut s = json!({"id": id});
            // One kind most of the time; none or two (refused) otherwise.
            for k in kinds.into_iter().take(2) {
                for (key, v) in k.as_object().unwrap() {
                    s[key] = v.clone();
                }
            }
            for (key, v) in [("timeout_ms", timeout), ("retries", retries), ("backoff_ms", backoff)] {
                if let Some(v) = v {
                    s[key] = v;
                }
            }
            s
        })
}

fn trigger() -> impl Strategy<Value = Value> {
    let on = prop_oneof![
        Just("manual"),
        Just("unit.created"),
        Just("unit.versioned"),
        Just("unit.tagged"),
        Just("unit.attributes_set"),
        Just("unit.linked"),
        Just("unit.deleted"),
        Just(""),
    ];
    (
        on,
        prop::option::of(prop_oneof![
            Just("text/*"),
            Just("*"),
            Just("text/plain"),
            Just("/"),
            Just("a/b/c"),
            Just("")
        ]),
        prop::option::of(prop::collection::vec(prop_oneof![Just("t"), Just("a.b"), Just(""), Just("x y")], 0..3)),
        prop::option::of(".{0,6}"),
    )
        .prop_map(|(on, media, tags, prefix)| {
            let mut t = json!({"on": on});
            if let Some(m) = media {
                t["media_type"] = json!(m);
            }
            if let Some(tags) = tags {
                t["tags"] = json!(tags);
            }
            if let Some(p) = prefix {
                t["name_prefix"] = json!(p);
            }
            t
        })
}

/// A definition document: shaped like a real one, with every part drawn from valid and
/// invalid values, sometimes an unknown field or a wrong type.
fn definition() -> impl Strategy<Value = Value> {
    (
        prop_oneof![Just("text-ingest".to_string()), Just("Bad Name".to_string()), "[a-z0-9-]{0,70}"],
        trigger(),
        prop::option::of(number()),
        prop::collection::vec(step(), 0..6),
        prop::collection::vec(step(), 0..3),
        0u8..8,
    )
        .prop_map(|(name, trigger, concurrency, steps, sinks, oddity)| {
            let mut d = json!({"name": name, "trigger": trigger, "steps": steps});
            if let Some(c) = concurrency {
                d["concurrency"] = c;
            }
            if !sinks.is_empty() {
                d["sinks"] = json!(sinks);
            }
            match oddity {
                0 => d["extra"] = json!(1),
                1 => d["steps"] = json!("not a list"),
                _ => {}
            }
            d
        })
}

/// The same document with `{step}.output` references made to point at earlier steps, so more
/// definitions get past validation (their round trip is then tested).
fn plausible_definition() -> impl Strategy<Value = Value> {
    definition().prop_map(|mut d| {
        d["name"] = json!("p");
        d["trigger"] = json!({"on": "manual"});
        if let Some(steps) = d["steps"].as_array_mut() {
            for (i, s) in steps.iter_mut().enumerate() {
                s["id"] = json!(format!("s{i}"));
            }
        }
        d
    })
}

proptest! {
    #![proptest_config(config())]

    /// Any definition document is accepted or refused with a reason, never a panic; an
    /// accepted one reads back from its normalized form as the same definition, and its plan
    /// (plugins, steps) can be asked for.
    #[test]
    fn definitions_parse_or_refuse(v in prop_oneof![definition(), plausible_definition()]) {
        match Definition::parse(&v) {
            Ok(def) => {
                let normalized = definition::normalized(&def);
                let again: Value = serde_json::from_str(&normalized).unwrap();
                prop_assert_eq!(Definition::parse(&again), Ok(def.clone()));
                let _ = (def.pinned_plugins(), def.plugin_refs(), def.is_manual());
                for s in def.all_steps() {
                    prop_assert!(s.kind().is_ok());
                    prop_assert!(s.timeout_ms() > 0);
                    let _ = s.backoff(u32::MAX);
                }
            }
            Err(e) => prop_assert!(!e.0.is_empty()),
        }
    }

    /// Definition bytes as an apply request carries them: any bytes are JSON or not, and any
    /// JSON is a definition or not.
    #[test]
    fn definition_bytes_parse_or_refuse(data in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        definition().prop_map(|v| v.to_string().into_bytes()),
        Just(b"[".repeat(200)),
        Just(format!("{}1{}", "[".repeat(100), "]".repeat(100)).into_bytes()),
    ]) {
        if let Ok(v) = serde_json::from_slice::<Value>(&data) {
            let _ = Definition::parse(&v);
        }
    }

    /// Templates: fields are found or the template refused; rendering a template whose fields
    /// all have values succeeds; literal text escaped with `{{`/`}}` renders as itself.
    #[test]
    fn templates_render_or_refuse(t in prop_oneof![template(), ".{0,40}"], literal in ".{0,40}") {
        match definition::template_fields(&t) {
            Ok(fields) => {
                let out = definition::render(&t, &|f| Some(format!("<{f}>")));
                prop_assert!(out.is_ok(), "{:?} has fields {:?} but does not render: {:?}", t, fields, out);
                let none = definition::render(&t, &|_| None);
                prop_assert_eq!(none.is_ok(), fields.is_empty());
            }
            Err(_) => {
                let _ = definition::render(&t, &|_| Some(String::new()));
            }
        }
        let escaped = literal.replace('{', "{{").replace('}', "}}");
        prop_assert_eq!(definition::template_fields(&escaped), Ok(vec![]));
        prop_assert_eq!(definition::render(&escaped, &|_| None), Ok(literal));
    }

    /// Globs, media type patterns and content heads on any text: an answer, never a panic.
    #[test]
    fn globs_media_types_and_heads(pattern in "[a-z*/;]{0,10}|.{0,10}", s in ".{0,20}", bytes in prop::collection::vec(any::<u8>(), 0..40), max in 0usize..50) {
        prop_assert!(definition::glob("*", &s));
        if !s.contains('*') {
            prop_assert!(definition::glob(&s, &s));
        }
        let _ = definition::glob(&pattern, &s);
        let _ = definition::media_matches(&pattern, &s);
        let head = definition::head(&bytes, max);
        prop_assert!(head.len() <= max);
        prop_assert!(bytes.starts_with(head));
        if std::str::from_utf8(&bytes).is_ok() {
            prop_assert!(std::str::from_utf8(head).is_ok());
        }
        let text = s.as_bytes();
        let h = definition::head(text, max);
        prop_assert!(std::str::from_utf8(h).is_ok() && text.starts_with(h));
    }

    /// Run events from the log: any body under any action decodes or is refused, and whatever
    /// decodes folds into a run (with or without a plan) without a panic.
    #[test]
    fn run_events_decode_and_fold(events in prop::collection::vec((0usize..13, prop::collection::vec(any::<u8>(), 0..64)), 1..8), seq in any::<u64>(), time in any::<i64>()) {
        let actions = [
            action::REQUESTED, action::STARTED, action::STEP_STARTED, action::STEP_WAITING, action::STEP_COMPLETED,
            action::STEP_FAILED, action::EMITTED, action::COMPLETED, action::FAILED, action::CANCELLED, action::RETRIED, "exploded", "",
        ];
        let def = Definition::parse(&json!({"name": "p", "trigger": {"on": "manual"}, "steps": [{"id": "a", "tag": ["t"]}]})).unwrap();
        let mut run = Run::default();
        for (a, body) in events {
            if let Ok(e) = RunEvent::decode(actions[a], &body) {
                run.apply(e, seq, time, "c");
            }
        }
        let _ = run.clone().with_plan(Some(&def));
        let _ = run.with_plan(None);
    }

    /// `PipelineApplied` events carry a definition as JSON text: anything there is folded into
    /// the view or refused, never a panic.
    #[test]
    fn applied_definitions_fold_or_refuse(json in prop_oneof![definition().prop_map(|v| v.to_string()), ".{0,60}"], version in any::<u32>()) {
        let mut view = View::default();
        let e = PipelineApplied { name: "p".into(), version, definition_json: json, ..Default::default() };
        if view.apply_applied(e, 1, 0).is_ok() {
            prop_assert!(view.definition("p", version).is_some());
        }
        let _ = view.counts("p");
    }

    /// Pauses between retries: any failure count and backoff, at most 30 s, never a panic.
    #[test]
    fn backoff_is_bounded(failures in any::<u32>(), backoff_ms in prop::option::of(any::<u32>())) {
        let s = Step { id: "a".into(), backoff_ms, ..Default::default() };
        prop_assert!(s.backoff(failures) <= std::time::Duration::from_secs(30));
    }
}
