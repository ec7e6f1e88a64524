//! JSON renderings of the information-unit messages, for `--json` output and HTTP gateways.
//! Field names are those of `iu.proto`; maps come out with sorted keys; times stay in
//! milliseconds since the Unix epoch (`*_ms`), as in the protocol.

use cim_events::proto::iu::{
    CommandResult, ContentCommitted, ContentVersion, History, HistoryEntry, IncomingLink, Link, Links,
    ProjectionStatus, Provenance, RebuildStarted, Unit, UnitList, UnitType,
};
use serde_json::{Map, Value, json};

/// A message that renders as JSON.
pub trait ToJson {
    fn to_json(&self) -> Value;
}

impl<T: ToJson> ToJson for [T] {
    fn to_json(&self) -> Value {
        Value::Array(self.iter().map(ToJson::to_json).collect())
    }
}

impl<T: ToJson> ToJson for Vec<T> {
    fn to_json(&self) -> Value {
        self.as_slice().to_json()
    }
}

impl<T: ToJson> ToJson for Option<T> {
    fn to_json(&self) -> Value {
        self.as_ref().map_or(Value::Null, ToJson::to_json)
    }
}

fn string_map<'a>(m: impl IntoIterator<Item = (&'a String, &'a String)>) -> Value {
    // serde_json's Map keeps keys sorted, so the output does not depend on hash order.
    Value::Object(m.into_iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect::<Map<_, _>>())
}

impl ToJson for Link {
    fn to_json(&self) -> Value {
        json!({ "kind": self.kind, "target": self.target })
    }
}

impl ToJson for IncomingLink {
    fn to_json(&self) -> Value {
        json!({ "kind": self.kind, "source": self.source })
    }
}

impl ToJson for Links {
    fn to_json(&self) -> Value {
        json!({ "outgoing": self.outgoing.to_json(), "incoming": self.incoming.to_json() })
    }
}

impl ToJson for Provenance {
    fn to_json(&self) -> Value {
        json!({
            "correlation_id": self.correlation_id,
            "causation_id": self.causation_id,
            "source": self.source,
            "time_ms": self.time_ms,
        })
    }
}

impl ToJson for ContentVersion {
    fn to_json(&self) -> Value {
        json!({
            "cid": self.cid,
            "size": self.size,
            "version": self.version,
            "sequence": self.sequence,
            "previous_cid": self.previous_cid,
            "time_ms": self.time_ms,
        })
    }
}

impl ToJson for Unit {
    fn to_json(&self) -> Value {
        json!({
            "unit_id": self.unit_id,
            "cid": self.cid,
            "size": self.size,
            "name": self.name,
            "media_type": self.media_type,
            "unit_type": self.unit_type,
            "tags": self.tags,
            "attributes": string_map(&self.attributes),
            "links": self.links.to_json(),
            "version": self.version,
            "sequence": self.sequence,
            "deleted": self.deleted,
            "created_ms": self.created_ms,
            "updated_ms": self.updated_ms,
            "versions": self.versions.to_json(),
            "created_by": self.created_by.to_json(),
            "updated_by": self.updated_by.to_json(),
        })
    }
}

impl ToJson for UnitList {
    fn to_json(&self) -> Value {
        json!({ "units": self.units.to_json(), "next_page_token": self.next_page_token })
    }
}

impl ToJson for HistoryEntry {
    fn to_json(&self) -> Value {
        json!({
            "version": self.version,
            "sequence": self.sequence,
            "event_type": self.event_type,
            "provenance": self.provenance.to_json(),
            "summary": self.summary,
        })
    }
}

impl ToJson for History {
    fn to_json(&self) -> Value {
        json!({ "entries": self.entries.to_json() })
    }
}

impl ToJson for UnitType {
    fn to_json(&self) -> Value {
        // The schema is JSON itself: embed it as a value when it parses, else as a string.
        let schema = serde_json::from_str::<Value>(&self.schema_json)
            .unwrap_or_else(|_| Value::String(self.schema_json.clone()));
        json!({ "name": self.name, "schema": schema, "version": self.version })
    }
}

impl ToJson for ProjectionStatus {
    fn to_json(&self) -> Value {
        json!({
            "stream_last_sequence": self.stream_last_sequence,
            "checkpoint": self.checkpoint,
            "lag": self.lag,
            "rebuilding": self.rebuilding,
            "units": self.units,
        })
    }
}

impl ToJson for CommandResult {
    fn to_json(&self) -> Value {
        json!({
            "unit_id": self.unit_id,
            "version": self.version,
            "cid": self.cid,
            "replayed": self.replayed,
            "sequence": self.sequence,
        })
    }
}

impl ToJson for ContentCommitted {
    fn to_json(&self) -> Value {
        json!({ "cid": self.cid, "size": self.size, "deduplicated": self.deduplicated })
    }
}

impl ToJson for RebuildStarted {
    fn to_json(&self) -> Value {
        json!({ "up_to_sequence": self.up_to_sequence })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_renders_every_field_with_sorted_attributes() {
        let unit = Unit {
            unit_id: "u1".into(),
            cid: "bafkreiabc".into(),
            size: 5,
            name: "a.txt".into(),
            media_type: "text/plain".into(),
            tags: vec!["x".into(), "y".into()],
            attributes: [("b".to_string(), "2".to_string()), ("a".to_string(), "1".to_string())].into_iter().collect(),
            links: vec![Link { kind: "derived-from".into(), target: "u0".into() }],
            version: 7,
            versions: vec![ContentVersion { cid: "bafkreiabc".into(), size: 5, version: 3, ..Default::default() }],
            created_by: Some(Provenance { source: "/cimctl".into(), time_ms: 1000, ..Default::default() }),
            ..Default::default()
        };
        let v = unit.to_json();
        assert_eq!(v["unit_id"], "u1");
        assert_eq!(v["size"], 5);
        assert_eq!(v["tags"], json!(["x", "y"]));
        assert_eq!(v["links"][0], json!({"kind": "derived-from", "target": "u0"}));
        assert_eq!(v["versions"][0]["version"], 3);
        assert_eq!(v["created_by"]["source"], "/cimctl");
        assert_eq!(v["updated_by"], Value::Null);
        assert_eq!(v["deleted"], false);
        // keys sorted regardless of HashMap order
        assert_eq!(serde_json::to_string(&v["attributes"]).unwrap(), r#"{"a":"1","b":"2"}"#);
    }

    #[test]
    fn other_messages_render() {
        let r = CommandResult { unit_id: "u".into(), version: 2, cid: String::new(), replayed: true, sequence: 9 };
        assert_eq!(r.to_json(), json!({"unit_id": "u", "version": 2, "cid": "", "replayed": true, "sequence": 9}));
        let t = UnitType { name: "doc".into(), schema_json: r#"{"type":"object"}"#.into(), version: 2 };
        assert_eq!(t.to_json()["schema"], json!({"type": "object"}));
        let bad = UnitType { name: "doc".into(), schema_json: "not json".into(), version: 2 };
        assert_eq!(bad.to_json()["schema"], "not json");
        let h = History {
            entries: vec![HistoryEntry {
                version: 1,
                event_type: "created".into(),
                provenance: None,
                summary: "s".into(),
                sequence: 4,
            }],
        };
        assert_eq!(h.to_json()["entries"][0]["event_type"], "created");
        let l = Links { outgoing: vec![], incoming: vec![IncomingLink { kind: "k".into(), source: "s".into() }] };
        assert_eq!(l.to_json(), json!({"outgoing": [], "incoming": [{"kind": "k", "source": "s"}]}));
        let s = ProjectionStatus { lag: 3, ..Default::default() };
        assert_eq!(s.to_json()["lag"], 3);
        let c = ContentCommitted { cid: "b".into(), size: 1, deduplicated: true };
        assert_eq!(c.to_json()["deduplicated"], true);
    }
}
