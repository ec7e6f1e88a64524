//! Unit tests of pipeline definitions: validation refusals, trigger matching, templates.

use super::*;
use serde_json::json;

fn example() -> serde_json::Value {
    json!({
        "name": "text-ingest",
        "trigger": {"on": "unit.created", "media_type": "text/*"},
        "concurrency": 2,
        "steps": [
            {"id": "normalize", "plugin": "text-normalize@1.0.0", "input": "unit.content"},
            {"id": "classify", "capability": "content.sniff", "input": "normalize.output"},
            {"id": "is-text", "filter": {"field": "classify.media-type", "matches": "text/*"}},
            {"id": "tag", "tag": ["normalized", "{classify.media-type}"]}
        ],
        "sinks": [
            {"id": "summary", "create_unit": {"content": "normalize.output", "max_bytes": 100, "name": "{unit.name}.summary", "link": "summary-of"}}
        ]
    })
}

#[test]
fn the_example_is_valid() {
    let d = Definition::parse(&example()).unwrap();
    assert_eq!(d.all_steps().count(), 5);
    assert_eq!(d.pinned_plugins(), vec![("text-normalize".to_string(), "1.0.0".to_string())]);
    assert_eq!(d.plugin_refs().len(), 2);
    assert!(matches!(d.step("classify").unwrap().kind().unwrap(), Kind::Plugin(PluginRef::Capability(_))));
}

fn refuse(mut v: serde_json::Value, patch: impl FnOnce(&mut serde_json::Value), needle: &str) {
    patch(&mut v);
    let e = Definition::parse(&v).unwrap_err().0;
    assert!(e.contains(needle), "{e:?} should mention {needle:?}");
}

#[test]
fn bad_definitions_say_why() {
    refuse(example(), |v| v["name"] = json!("Bad Name"), "pipeline name");
    refuse(example(), |v| v["trigger"]["on"] = json!("unit.exploded"), "matches no event");
    refuse(example(), |v| v["trigger"]["media_type"] = json!("text"), "media_type");
    refuse(
        example(),
        |v| {
            v["steps"] = json!([]);
            v.as_object_mut().unwrap().remove("sinks");
        },
        "at least one step",
    );
    refuse(example(), |v| v["steps"][1]["input"] = json!("summary.output"), "does not run before it (a cycle)");
    refuse(example(), |v| v["steps"][1]["input"] = json!("classify.output"), "a cycle");
    refuse(example(), |v| v["steps"][1]["input"] = json!("nope.output"), "missing input");
    refuse(example(), |v| v["steps"][3]["tag"] = json!(["{ghost.x}"]), "there is no step ghost");
    refuse(example(), |v| v["steps"][3]["tag"] = json!(["{unclosed"]), "unclosed");
    refuse(example(), |v| v["steps"][0]["plugin"] = json!("text-normalize"), "needs a version");
    refuse(example(), |v| v["steps"][0]["capability"] = json!("x.y"), "not both");
    refuse(example(), |v| v["steps"][1]["id"] = json!("normalize"), "used twice");
    refuse(example(), |v| v["steps"][2]["filter"]["equals"] = json!("x"), "exactly one of");
    refuse(example(), |v| v["steps"][0]["bogus"] = json!(1), "unknown field");
    refuse(example(), |v| v["steps"][0]["timeout_ms"] = json!(0), "timeout_ms");
    refuse(example(), |v| v["steps"].as_array_mut().unwrap().push(json!({"id": "empty"})), "says nothing to do");
    refuse(example(), |v| v["steps"][3]["map"] = json!({"a": "b"}), "more than one thing");
    refuse(example(), |v| v["steps"][3]["tag"] = json!(["{unit.colour}"]), "unknown unit field");
    refuse(
        example(),
        |v| v["trigger"] = json!({"on": "manual", "media_type": "text/*"}),
        "manual trigger takes no filters",
    );
    refuse(json!("not an object"), |_| {}, "does not parse");
}

#[test]
fn triggers_match_events() {
    let t = Trigger {
        on: "unit.created".into(),
        media_type: "text/*".into(),
        tags: vec!["inbox".into()],
        ..Default::default()
    };
    let mut e = UnitEventFacts {
        action: "created".into(),
        media_type: "text/plain; charset=utf-8".into(),
        tags: vec!["inbox".into(), "x".into()],
        ..Default::default()
    };
    assert!(t.matches(&e));
    e.media_type = "image/png".into();
    assert!(!t.matches(&e));
    e.media_type = "TEXT/markdown".into();
    assert!(t.matches(&e));
    e.tags = vec!["x".into()];
    assert!(!t.matches(&e));
    e.tags = vec!["inbox".into()];
    e.action = "versioned".into();
    assert!(!t.matches(&e));
    let tagged = Trigger { on: "unit.tagged".into(), tags: vec!["review".into()], ..Default::default() };
    let e = UnitEventFacts { action: "tagged".into(), tags: vec!["review".into()], ..Default::default() };
    assert!(tagged.matches(&e));
    assert!(!Trigger { on: "manual".into(), ..Default::default() }.matches(&e));
}

#[test]
fn templates_conditions_and_heads() {
    let lookup = |f: &str| match f {
        "unit.name" => Some("a.txt".to_string()),
        "classify.media-type" => Some("text/plain".to_string()),
        _ => None,
    };
    assert_eq!(render("{unit.name}.summary", &lookup).unwrap(), "a.txt.summary");
    assert_eq!(render("{{literal}} {classify.media-type}", &lookup).unwrap(), "{literal} text/plain");
    assert!(render("{nope.x}", &lookup).unwrap_err().contains("nope.x"));
    assert_eq!(template_fields("a {b.c} {{d}} { e.f }").unwrap(), vec!["b.c", "e.f"]);
    assert!(template_fields("x}").is_err());
    let c = Condition { field: "x.y".into(), matches: Some("text/*".into()), ..Default::default() };
    assert!(holds(&c, Some("text/plain")));
    assert!(!holds(&c, Some("image/png")));
    assert!(!holds(&c, None));
    let c = Condition { field: "x.y".into(), exists: Some(false), ..Default::default() };
    assert!(holds(&c, None));
    assert!(glob("*b*d", "abcd") && glob("a*", "a") && !glob("a*c", "abd") && glob("*", ""));
    assert_eq!(head("héllo".as_bytes(), 2), b"h");
    assert_eq!(head(b"hello", 10), b"hello");
    let s = Step { id: "s".into(), backoff_ms: Some(100), ..Default::default() };
    assert_eq!(s.backoff(1).as_millis(), 100);
    assert_eq!(s.backoff(3).as_millis(), 400);
    assert_eq!(s.backoff(40).as_millis(), 30_000);
}
