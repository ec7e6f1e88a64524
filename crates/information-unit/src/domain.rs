//! The unit aggregate, purely: validation of commands, the events they become, and the fold
//! of events into a unit's state. No I/O here; everything is unit-tested.

use std::collections::{BTreeMap, BTreeSet};

use cim_events::{
    Cid, Payload,
    iu::action,
    proto::iu::{
        ContentVersion, Link, Provenance, Unit, UnitAttributesSet, UnitCreated, UnitDeleted, UnitLinked, UnitTagged,
        UnitUnlinked, UnitUntagged, UnitVersioned,
    },
    token::{validate_name, validate_token},
};
use prost::Message;

use crate::schema::TypeSchema;

pub const MAX_NAME: usize = 256;
pub const MAX_MEDIA_TYPE: usize = 127;
pub const MAX_TAGS: usize = 64;
pub const MAX_ATTRIBUTES: usize = 128;
pub const MAX_ATTRIBUTE_VALUE: usize = 4096;
pub const MAX_LINKS: usize = 256;
/// Largest encoded metadata of one event; content is not counted (it is in the object store).
pub const MAX_METADATA: usize = 64 * 1024;

/// Why a command was refused before anything was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
}

fn invalid(m: impl Into<String>) -> Rejection {
    Rejection::Invalid(m.into())
}

/// One event of a unit, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum UnitEvent {
    Created(UnitCreated),
    Versioned(UnitVersioned),
    Tagged(UnitTagged),
    Untagged(UnitUntagged),
    AttributesSet(UnitAttributesSet),
    Linked(UnitLinked),
    Unlinked(UnitUnlinked),
    Deleted(UnitDeleted),
}

impl UnitEvent {
    /// The subject action and the payload type name of this event.
    pub fn action(&self) -> &'static str {
        match self {
            UnitEvent::Created(_) => action::CREATED,
            UnitEvent::Versioned(_) => action::VERSIONED,
            UnitEvent::Tagged(_) => action::TAGGED,
            UnitEvent::Untagged(_) => action::UNTAGGED,
            UnitEvent::AttributesSet(_) => action::ATTRIBUTES_SET,
            UnitEvent::Linked(_) => action::LINKED,
            UnitEvent::Unlinked(_) => action::UNLINKED,
            UnitEvent::Deleted(_) => action::DELETED,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            UnitEvent::Created(_) => UnitCreated::TYPE,
            UnitEvent::Versioned(_) => UnitVersioned::TYPE,
            UnitEvent::Tagged(_) => UnitTagged::TYPE,
            UnitEvent::Untagged(_) => UnitUntagged::TYPE,
            UnitEvent::AttributesSet(_) => UnitAttributesSet::TYPE,
            UnitEvent::Linked(_) => UnitLinked::TYPE,
            UnitEvent::Unlinked(_) => UnitUnlinked::TYPE,
            UnitEvent::Deleted(_) => UnitDeleted::TYPE,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        match self {
            UnitEvent::Created(e) => e.encode_to_vec(),
            UnitEvent::Versioned(e) => e.encode_to_vec(),
            UnitEvent::Tagged(e) => e.encode_to_vec(),
            UnitEvent::Untagged(e) => e.encode_to_vec(),
            UnitEvent::AttributesSet(e) => e.encode_to_vec(),
            UnitEvent::Linked(e) => e.encode_to_vec(),
            UnitEvent::Unlinked(e) => e.encode_to_vec(),
            UnitEvent::Deleted(e) => e.encode_to_vec(),
        }
    }

    /// Decodes by payload type name (the envelope's `ce-type`, after upcasting).
    pub fn decode(type_name: &str, bytes: &[u8]) -> Result<UnitEvent, String> {
        fn d<M: Message + Default>(b: &[u8]) -> Result<M, String> {
            M::decode(b).map_err(|e| e.to_string())
        }
        Ok(match type_name {
            t if t == UnitCreated::TYPE => UnitEvent::Created(d(bytes)?),
            t if t == UnitVersioned::TYPE => UnitEvent::Versioned(d(bytes)?),
            t if t == UnitTagged::TYPE => UnitEvent::Tagged(d(bytes)?),
            t if t == UnitUntagged::TYPE => UnitEvent::Untagged(d(bytes)?),
            t if t == UnitAttributesSet::TYPE => UnitEvent::AttributesSet(d(bytes)?),
            t if t == UnitLinked::TYPE => UnitEvent::Linked(d(bytes)?),
            t if t == UnitUnlinked::TYPE => UnitEvent::Unlinked(d(bytes)?),
            t if t == UnitDeleted::TYPE => UnitEvent::Deleted(d(bytes)?),
            other => return Err(format!("unknown unit event type {other:?}")),
        })
    }

    /// A one-line description for history listings.
    pub fn summary(&self) -> String {
        match self {
            UnitEvent::Created(e) => format!("created {:?} ({} bytes, {})", e.name, e.size, e.cid),
            UnitEvent::Versioned(e) => format!("new version {} ({} bytes) after {}", e.cid, e.size, e.previous_cid),
            UnitEvent::Tagged(e) => format!("tagged {}", e.tags.join(", ")),
            UnitEvent::Untagged(e) => format!("untagged {}", e.tags.join(", ")),
            UnitEvent::AttributesSet(e) => {
                let set: Vec<String> = e.set.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("attributes set [{}] removed [{}]", set.join(", "), e.removed.join(", "))
            }
            UnitEvent::Linked(e) => link_summary("linked", e.link.as_ref()),
            UnitEvent::Unlinked(e) => link_summary("unlinked", e.link.as_ref()),
            UnitEvent::Deleted(e) => format!("deleted: {}", e.reason),
        }
    }
}

fn link_summary(verb: &str, l: Option<&Link>) -> String {
    l.map(|l| format!("{verb} {} -> {}", l.kind, l.target)).unwrap_or_else(|| verb.to_string())
}

/// Where an event sits in the log and who caused it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventMeta {
    /// The event's stream sequence.
    pub sequence: u64,
    pub provenance: Provenance,
}

/// Folds one event into the state. Events at or below the state's sequence are ignored, so
/// applying is idempotent (projections may see an event twice). Each event applied makes the
/// unit's own version one more (1 at creation).
pub fn apply(state: Option<Unit>, event: &UnitEvent, meta: &EventMeta) -> Option<Unit> {
    if let Some(s) = &state
        && s.sequence >= meta.sequence
    {
        return state;
    }
    // Saturating: a stored state (from the projection's KV) may claim any version.
    let version = state.as_ref().map_or(1, |s| s.version.saturating_add(1));
    let time = meta.provenance.time_ms;
    let mut u = match (state, event) {
        (None, UnitEvent::Created(c)) => Unit {
            unit_id: c.unit_id.clone(),
            cid: c.cid.clone(),
            size: c.size,
            name: c.name.clone(),
            media_type: c.media_type.clone(),
            unit_type: c.unit_type.clone(),
            tags: sorted(c.tags.iter().cloned()),
            attributes: c.attributes.clone(),
            links: c.links.clone(),
            created_ms: time,
            created_by: Some(meta.provenance.clone()),
            versions: vec![ContentVersion {
                cid: c.cid.clone(),
                size: c.size,
                version,
                previous_cid: String::new(),
                time_ms: time,
                sequence: meta.sequence,
            }],
            ..Default::default()
        },
        (None, _) => return None,
        (Some(s), UnitEvent::Created(_)) => s,
        (Some(mut s), e) => {
            match e {
                UnitEvent::Created(_) => {}
                UnitEvent::Versioned(v) => {
                    s.cid = v.cid.clone();
                    s.size = v.size;
                    if !v.name.is_empty() {
                        s.name = v.name.clone();
                    }
                    if !v.media_type.is_empty() {
                        s.media_type = v.media_type.clone();
                    }
                    s.versions.push(ContentVersion {
                        cid: v.cid.clone(),
                        size: v.size,
                        version,
                        previous_cid: v.previous_cid.clone(),
                        time_ms: time,
                        sequence: meta.sequence,
                    });
                }
                UnitEvent::Tagged(t) => s.tags = sorted(s.tags.iter().chain(&t.tags).cloned()),
                UnitEvent::Untagged(t) => s.tags.retain(|x| !t.tags.contains(x)),
                UnitEvent::AttributesSet(a) => {
                    for k in &a.removed {
                        s.attributes.remove(k);
                    }
                    s.attributes.extend(a.set.clone());
                }
                UnitEvent::Linked(l) => {
                    if let Some(l) = &l.link
                        && !s.links.contains(l)
                    {
                        s.links.push(l.clone());
                    }
                }
                UnitEvent::Unlinked(l) => {
                    if let Some(l) = &l.link {
                        s.links.retain(|x| x != l);
                    }
                }
                UnitEvent::Deleted(_) => s.deleted = true,
            }
            s
        }
    };
    u.version = version;
    u.sequence = meta.sequence;
    u.updated_ms = time;
    u.updated_by = Some(meta.provenance.clone());
    Some(u)
}

fn sorted(it: impl Iterator<Item = String>) -> Vec<String> {
    it.collect::<BTreeSet<_>>().into_iter().collect()
}

// ---- validation ----

pub fn validate_display_name(name: &str) -> Result<(), Rejection> {
    if name.is_empty() {
        return Err(invalid("name is empty"));
    }
    if name.len() > MAX_NAME {
        return Err(invalid(format!("name is longer than {MAX_NAME} bytes")));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid("name contains a control character"));
    }
    if name.contains('/') || name.contains('\\') || name == "." || name == ".." {
        return Err(invalid("name contains a path separator or is . or .."));
    }
    Ok(())
}

pub fn validate_media_type(mt: &str) -> Result<(), Rejection> {
    let bad = || invalid(format!("media type {:?} is not type/subtype", mt.escape_debug().to_string()));
    if mt.len() > MAX_MEDIA_TYPE {
        return Err(bad());
    }
    let (t, rest) = mt.split_once('/').ok_or_else(bad)?;
    let sub = rest.split(';').next().unwrap_or("").trim();
    let ok = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "!#$&-^_.+".contains(c));
    if !ok(t) || !ok(sub) {
        return Err(bad());
    }
    Ok(())
}

pub fn validate_tags(tags: &[String]) -> Result<(), Rejection> {
    if tags.len() > MAX_TAGS {
        return Err(invalid(format!("more than {MAX_TAGS} tags")));
    }
    for t in tags {
        validate_token("tag", t).map_err(|e| invalid(e.to_string()))?;
    }
    Ok(())
}

pub fn validate_attributes(attrs: &BTreeMap<String, String>) -> Result<(), Rejection> {
    if attrs.len() > MAX_ATTRIBUTES {
        return Err(invalid(format!("more than {MAX_ATTRIBUTES} attributes")));
    }
    for (k, v) in attrs {
        validate_name("attribute name", k).map_err(|e| invalid(e.to_string()))?;
        if v.len() > MAX_ATTRIBUTE_VALUE {
            return Err(invalid(format!("attribute {k} is longer than {MAX_ATTRIBUTE_VALUE} bytes")));
        }
        if v.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
            return Err(invalid(format!("attribute {k} contains a control character")));
        }
    }
    Ok(())
}

pub fn validate_link(l: &Link) -> Result<(), Rejection> {
    validate_token("link kind", &l.kind).map_err(|e| invalid(e.to_string()))?;
    validate_token("link target", &l.target).map_err(|e| invalid(e.to_string()))?;
    Ok(())
}

pub fn validate_cid(cid: &str) -> Result<Cid, Rejection> {
    cid.parse::<Cid>().map_err(|e| invalid(e.to_string()))
}

pub fn check_metadata_size(event: &UnitEvent) -> Result<(), Rejection> {
    let n = event.encode().len();
    if n > MAX_METADATA {
        return Err(invalid(format!("metadata is {n} bytes, more than the {MAX_METADATA} allowed")));
    }
    Ok(())
}

/// Checks attributes against the unit type's schema (if the unit is typed).
pub fn check_schema(schema: Option<&TypeSchema>, attrs: &BTreeMap<String, String>) -> Result<(), Rejection> {
    match schema {
        Some(s) => s.validate(attrs).map_err(Rejection::Invalid),
        None => Ok(()),
    }
}

/// Refuses changes to a deleted unit.
pub fn require_live(state: &Unit) -> Result<(), Rejection> {
    if state.deleted {
        return Err(Rejection::NotFound(format!("unit {} is deleted", state.unit_id)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(v: u64) -> EventMeta {
        EventMeta { sequence: v, provenance: Provenance { time_ms: v as i64 * 1000, ..Default::default() } }
    }

    fn created() -> UnitEvent {
        UnitEvent::Created(UnitCreated {
            unit_id: "u1".into(),
            cid: Cid::of(b"a").to_string(),
            size: 1,
            name: "a.txt".into(),
            media_type: "text/plain".into(),
            tags: vec!["b".into(), "a".into()],
            ..Default::default()
        })
    }

    #[test]
    fn fold_builds_state_and_version_chain() {
        let s = apply(None, &created(), &meta(3)).unwrap();
        assert_eq!(s.tags, vec!["a", "b"]);
        assert_eq!((s.version, s.sequence), (1, 3), "the unit's own version, and the stream's sequence");
        let v2 = UnitEvent::Versioned(UnitVersioned {
            unit_id: "u1".into(),
            cid: Cid::of(b"b").to_string(),
            size: 1,
            previous_cid: s.cid.clone(),
            ..Default::default()
        });
        let s = apply(Some(s), &v2, &meta(7)).unwrap();
        assert_eq!(s.versions.len(), 2);
        assert_eq!((s.version, s.sequence), (2, 7), "versions count the unit's events, whatever the stream holds");
        assert_eq!((s.versions[1].version, s.versions[1].sequence), (2, 7));
        assert_eq!(s.versions[1].previous_cid, s.versions[0].cid);
        assert_eq!(s.cid, Cid::of(b"b").to_string());
        assert_eq!(s.name, "a.txt", "empty name in a version keeps the old one");
        let s = apply(
            Some(s),
            &UnitEvent::Untagged(UnitUntagged { unit_id: "u1".into(), tags: vec!["a".into()] }),
            &meta(8),
        )
        .unwrap();
        assert_eq!(s.tags, vec!["b"]);
        let link = Link { kind: "cites".into(), target: "u2".into() };
        let s =
            apply(Some(s), &UnitEvent::Linked(UnitLinked { unit_id: "u1".into(), link: Some(link.clone()) }), &meta(9))
                .unwrap();
        let s = apply(
            Some(s),
            &UnitEvent::Linked(UnitLinked { unit_id: "u1".into(), link: Some(link.clone()) }),
            &meta(10),
        )
        .unwrap();
        assert_eq!(s.links, vec![link.clone()], "linking twice keeps one link");
        let s =
            apply(Some(s), &UnitEvent::Deleted(UnitDeleted { unit_id: "u1".into(), reason: "x".into() }), &meta(11))
                .unwrap();
        assert!(s.deleted);
        assert_eq!(s.version, 6);
        assert!(require_live(&s).is_err());
    }

    #[test]
    fn applying_is_idempotent_and_ignores_orphans() {
        let s = apply(None, &created(), &meta(3)).unwrap();
        let tag = UnitEvent::Tagged(UnitTagged { unit_id: "u1".into(), tags: vec!["z".into()] });
        let once = apply(Some(s.clone()), &tag, &meta(4)).unwrap();
        let twice = apply(Some(once.clone()), &tag, &meta(4)).unwrap();
        assert_eq!(once, twice);
        assert!(apply(None, &tag, &meta(4)).is_none(), "an event before creation has no state");
    }

    #[test]
    fn events_round_trip_by_type_name() {
        let e = created();
        assert_eq!(UnitEvent::decode(e.type_name(), &e.encode()).unwrap(), e);
        assert!(UnitEvent::decode("cim.nope", &[]).is_err());
    }

    #[test]
    fn validation_names_the_problem() {
        assert!(validate_display_name("report.pdf").is_ok());
        for (bad, why) in
            [("", "empty"), ("a\u{1}b", "control"), ("../x", "path"), (&"x".repeat(300) as &str, "longer")]
        {
            let e = validate_display_name(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        assert!(validate_media_type("text/plain; charset=utf-8").is_ok());
        for bad in ["text", "/plain", "text/", "te xt/plain", "text/pl\u{0}ain"] {
            assert!(validate_media_type(bad).is_err(), "{bad}");
        }
        assert!(validate_tags(&["a.b".into()]).is_err());
        assert!(validate_tags(&vec!["t".to_string(); 65]).is_err());
        let mut attrs = BTreeMap::new();
        attrs.insert("ok".to_string(), "v".to_string());
        assert!(validate_attributes(&attrs).is_ok());
        attrs.insert("bad key".to_string(), "v".to_string());
        assert!(validate_attributes(&attrs).is_err());
        let mut big = BTreeMap::new();
        big.insert("k".to_string(), "x".repeat(MAX_ATTRIBUTE_VALUE + 1));
        assert!(validate_attributes(&big).is_err());
        assert!(validate_cid("nope").is_err());
        assert!(validate_link(&Link { kind: "a b".into(), target: "u".into() }).is_err());
    }

    #[test]
    fn oversized_metadata_is_refused() {
        let mut c = UnitCreated { unit_id: "u".into(), ..Default::default() };
        for i in 0..100 {
            c.attributes.insert(format!("k{i}"), "x".repeat(1000));
        }
        let e = check_metadata_size(&UnitEvent::Created(c)).unwrap_err().to_string();
        assert!(e.contains("metadata is"), "{e}");
    }
}
