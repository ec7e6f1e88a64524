//! Tests of the configuration file: parsing, secrets, the allow-list and every refusal.

use cim_events::{Component, hub, iu, resources, subject};
use serde_json::json;

use super::*;

fn env(name: &str) -> Option<String> {
    (name == "GH").then(|| "whsec_c2VjcmV0".to_string())
}
fn read(p: &Path) -> Result<String, String> {
    if p == Path::new("/s") { Ok("raw-secret\n".into()) } else { Err("no such file".into()) }
}

#[test]
fn parses_sources_with_defaults() {
    let text = r#"{"webhooks": [
        {"name": "github", "secret_env": "GH"},
        {"name": "shop", "secret_file": "/s", "target": "unit", "content": "any", "tolerance_secs": 60, "max_body_bytes": 10, "tags": ["orders"]}
    ]}"#;
    let s = parse(text, env, read).unwrap().sources;
    assert_eq!(s["github"].key, b"secret");
    assert_eq!(s["github"].target, Target::Event);
    assert_eq!(s["github"].tolerance, Duration::from_secs(300));
    assert_eq!(s["github"].content, Content::Json);
    assert_eq!(s["shop"].key, b"raw-secret");
    assert_eq!(s["shop"].target, Target::Unit);
    assert_eq!(s["shop"].max_body_bytes, 10);
    assert!(!format!("{:?}", s["shop"]).contains("raw-secret"));
}

#[test]
fn parses_subscriptions() {
    let filter = subject::action_filter(Component::InformationUnit, iu::UNIT, iu::action::CREATED).unwrap();
    let text = json!({"outbound_allow": ["127.0.0.0/8"], "subscriptions": [
        {"name": "crm", "filter": filter, "url": "http://127.0.0.1:9/hook", "secret_env": "GH", "max_attempts": 3, "deliver": "all"}
    ]})
    .to_string();
    let hub = parse(&text, env, read).unwrap();
    let s = &hub.subscriptions["crm"];
    assert_eq!(s.stream, resources::events_stream(Component::InformationUnit).name);
    assert_eq!((s.max_attempts, s.deliver, s.timeout), (3, Deliver::All, Duration::from_secs(10)));
    assert!(!format!("{s:?}").contains("secret"));
}

#[test]
fn refuses_unclear_configuration() {
    let iu_events = subject::events_of(Component::InformationUnit);
    let hub_deliveries = subject::events_of(Component::IntegrationHub).replace('>', &format!("{}.>", hub::DELIVERY));
    let built = [
        (
            json!({"postgres": [{"name": "db", "url_env": "GH", "project": {"filter": iu_events, "table": "Bad"}}]}),
            "plain identifier",
        ),
        (
            json!({"mqtt": [{"name": "m", "host": "h", "publish": {"filter": iu_events, "topic": "a/#"}}]}),
            "no wildcards",
        ),
        (
            json!({"subscriptions": [{"name": "s", "filter": hub_deliveries, "url": "http://127.0.0.1/", "secret_env": "GH"}]}),
            "own webhook events only",
        ),
        (
            json!({"subscriptions": [{"name": "s", "filter": iu_events, "url": "http://127.0.0.1/", "secret_env": "GH"}]}),
            "not allowed",
        ),
        (
            json!({"outbound_allow": ["127.0.0.1"], "subscriptions": [{"name": "s", "filter": iu_events, "url": "ftp://127.0.0.1/", "secret_env": "GH"}]}),
            "http",
        ),
    ];
    let built: Vec<(String, &str)> = built.into_iter().map(|(v, want)| (v.to_string(), want)).collect();
    for (text, want) in built.iter().map(|(t, w)| (t.as_str(), *w)).chain([
        (r#"{"webhooks": [{"name": "a"}]}"#, "exactly one"),
        (r#"{"webhooks": [{"name": "a", "secret_env": "NOPE"}]}"#, "NOPE is not set"),
        (r#"{"webhooks": [{"name": "a", "secret_file": "/x"}]}"#, "cannot read secret_file"),
        (r#"{"webhooks": [{"name": "a.b", "secret_env": "GH"}]}"#, "invalid"),
        (r#"{"webhooks": [{"name": "a", "secret_env": "GH", "colour": 1}]}"#, "unknown field"),
        (r#"{"webhooks": [{"name": "a", "secret_env": "GH", "target": "fax"}]}"#, "unknown variant"),
        (r#"{"webhooks": [{"name": "a", "secret_env": "GH"}, {"name": "a", "secret_env": "GH"}]}"#, "defined twice"),
        (r#"{"webhooks": [{"name": "a", "secret_env": "GH", "max_body_bytes": 0}]}"#, "max_body_bytes"),
        ("not json", "invalid hub configuration"),
        (r#"{"postgres": [{"name": "db", "url_env": "GH", "watch": ["orders; drop table x"]}]}"#, "plain identifier"),
        (r#"{"postgres": [{"name": "db"}]}"#, "exactly one of url_file and url_env"),
        (r#"{"mqtt": [{"name": "m", "host": "h", "password_env": "GH"}]}"#, "needs a username"),
        (r#"{"outbound_allow": ["10.0.0.0/33"]}"#, "invalid"),
        (r#"{"outbound_allow": ["169.254.169.254"]}"#, "never allowed"),
        (r#"{"webhooks": [{"name": "a", "secret_env": "GH", "tolerance_secs": 86401}]}"#, "between 1 and 86400"),
        (r#"{"webhooks": [{"name": "a", "secret_env": "GH", "tolerance_secs": 0}]}"#, "between 1 and 86400"),
        (
            r#"{"subscriptions": [{"name": "s", "filter": "orders", "url": "http://127.0.0.1/", "secret_env": "GH"}]}"#,
            "not an event subject filter",
        ),
    ]) {
        let e = parse(text, env, read).unwrap_err().to_string();
        assert!(e.contains(want), "{text}: {e}");
    }
}
