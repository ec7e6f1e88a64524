//! The envelope every CIM message carries in NATS headers: CloudEvents 1.0 binary mode plus
//! CIM's correlation and causation ids, and the rule that ties them together.
//!
//! Rule: a root message has `id == correlation == causation`. A message caused by another
//! inherits the parent's correlation id and takes the parent's id as its causation id. All ids
//! are UUIDv7, so they sort by creation time.

use async_nats::HeaderMap;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use uuid::Uuid;

use crate::{ContractError, payload::Payload};

pub const H_SPECVERSION: &str = "ce-specversion";
pub const H_ID: &str = "ce-id";
pub const H_TYPE: &str = "ce-type";
pub const H_SOURCE: &str = "ce-source";
pub const H_TIME: &str = "ce-time";
pub const H_DATASCHEMA: &str = "ce-dataschema";
/// CloudEvents extension attribute (extension names are lowercase alphanumerics).
pub const H_CORRELATION: &str = "ce-correlationid";
pub const H_CAUSATION: &str = "ce-causationid";
pub const H_CONTENT_TYPE: &str = "content-type";
/// JetStream de-duplication: carries the envelope id.
pub const H_MSG_ID: &str = "Nats-Msg-Id";

pub const SPECVERSION: &str = "1.0";
pub const CONTENT_TYPE_PROTOBUF: &str = "application/protobuf";

/// Every header the envelope writes, in order, for documentation.
pub const HEADERS: [&str; 10] =
    [H_SPECVERSION, H_ID, H_TYPE, H_SOURCE, H_TIME, H_DATASCHEMA, H_CORRELATION, H_CAUSATION, H_CONTENT_TYPE, H_MSG_ID];

/// The metadata of one message. Build it with [`Envelope::root`] or [`Envelope::caused_by`];
/// read it back with [`Envelope::from_headers`], which enforces the id rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    id: Uuid,
    correlation_id: Uuid,
    causation_id: Uuid,
    /// `ce-type`: what happened or is asked, e.g. `cim.runtime.service.announced`.
    pub kind: String,
    /// `ce-source`: who produced it, see [`source`].
    pub source: String,
    pub time: OffsetDateTime,
    /// Payload schema: its type name and version.
    pub schema: Schema,
}

/// A payload schema: type name and version, written as `ce-dataschema: urn:cim:<type>:v<N>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schema {
    pub name: String,
    pub version: u32,
}

impl Schema {
    pub fn of<P: Payload>() -> Schema {
        Schema { name: P::TYPE.to_string(), version: P::SCHEMA_VERSION }
    }

    pub fn to_uri(&self) -> String {
        format!("urn:cim:{}:v{}", self.name, self.version)
    }

    pub fn parse(uri: &str) -> Result<Schema, ContractError> {
        let bad = || ContractError::InvalidEnvelope(format!("ce-dataschema {uri:?} is not urn:cim:<type>:v<N>"));
        let rest = uri.strip_prefix("urn:cim:").ok_or_else(bad)?;
        let (name, version) = rest.rsplit_once(":v").ok_or_else(bad)?;
        let version = version.parse().map_err(|_| bad())?;
        if name.is_empty() || version == 0 {
            return Err(bad());
        }
        Ok(Schema { name: name.to_string(), version })
    }
}

/// The `ce-source` of a service instance: `/cim/<node>/<service>/<instance>`.
pub fn source(node: &str, service: &str, instance: &str) -> String {
    format!("/cim/{node}/{service}/{instance}")
}

/// A new UUIDv7.
pub fn new_id() -> Uuid {
    Uuid::now_v7()
}

impl Envelope {
    /// A message that starts a new chain: `id == correlation == causation`.
    pub fn root<P: Payload>(source: impl Into<String>) -> Envelope {
        Envelope::new_root(P::TYPE, Schema::of::<P>(), source)
    }

    /// A message caused by `parent`: same correlation id, causation = parent's id.
    pub fn caused_by<P: Payload>(parent: &Envelope, source: impl Into<String>) -> Envelope {
        Envelope::new_caused_by(parent, P::TYPE, Schema::of::<P>(), source)
    }

    /// [`Envelope::root`] for a payload type chosen at run time.
    pub fn new_root(kind: &str, schema: Schema, source: impl Into<String>) -> Envelope {
        let id = new_id();
        Envelope {
            id,
            correlation_id: id,
            causation_id: id,
            kind: kind.to_string(),
            source: source.into(),
            time: OffsetDateTime::now_utc(),
            schema,
        }
    }

    /// [`Envelope::caused_by`] for a payload type chosen at run time.
    pub fn new_caused_by(parent: &Envelope, kind: &str, schema: Schema, source: impl Into<String>) -> Envelope {
        Envelope {
            id: new_id(),
            correlation_id: parent.correlation_id,
            causation_id: parent.id,
            kind: kind.to_string(),
            source: source.into(),
            time: OffsetDateTime::now_utc(),
            schema,
        }
    }

    /// Unix milliseconds of `time`.
    pub fn time_ms(&self) -> i64 {
        (self.time.unix_timestamp_nanos() / 1_000_000) as i64
    }

    pub fn id(&self) -> Uuid {
        self.id
    }

    pub fn correlation_id(&self) -> Uuid {
        self.correlation_id
    }

    pub fn causation_id(&self) -> Uuid {
        self.causation_id
    }

    pub fn is_root(&self) -> bool {
        self.id == self.correlation_id
    }

    /// Writes the envelope into `headers` (keeping any others, e.g. `traceparent`).
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        let time = self.time.format(&Rfc3339).unwrap_or_default();
        headers.insert(H_SPECVERSION, SPECVERSION);
        headers.insert(H_ID, self.id.to_string().as_str());
        headers.insert(H_TYPE, self.kind.as_str());
        headers.insert(H_SOURCE, self.source.as_str());
        headers.insert(H_TIME, time.as_str());
        headers.insert(H_DATASCHEMA, self.schema.to_uri().as_str());
        headers.insert(H_CORRELATION, self.correlation_id.to_string().as_str());
        headers.insert(H_CAUSATION, self.causation_id.to_string().as_str());
        headers.insert(H_CONTENT_TYPE, CONTENT_TYPE_PROTOBUF);
        headers.insert(H_MSG_ID, self.id.to_string().as_str());
    }

    pub fn to_headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        self.write_headers(&mut h);
        h
    }

    /// Reads and checks an envelope: every attribute present, spec version 1.0, ids UUIDv7,
    /// and the root/derived rule.
    pub fn from_headers(headers: &HeaderMap) -> Result<Envelope, ContractError> {
        let get = |name: &str| -> Result<&str, ContractError> {
            headers
                .get(name)
                .map(|v| v.as_str())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| ContractError::InvalidEnvelope(format!("missing header {name}")))
        };
        let uuid = |name: &str| -> Result<Uuid, ContractError> {
            let raw = get(name)?;
            let id = Uuid::parse_str(raw)
                .map_err(|_| ContractError::InvalidEnvelope(format!("{name} {raw:?} is not a UUID")))?;
            if id.get_version_num() != 7 {
                return Err(ContractError::InvalidEnvelope(format!("{name} {raw:?} is not a UUIDv7")));
            }
            Ok(id)
        };
        let spec = get(H_SPECVERSION)?;
        if spec != SPECVERSION {
            return Err(ContractError::InvalidEnvelope(format!("{H_SPECVERSION} {spec:?} is not {SPECVERSION}")));
        }
        let raw_time = get(H_TIME)?;
        let time = OffsetDateTime::parse(raw_time, &Rfc3339)
            .map_err(|_| ContractError::InvalidEnvelope(format!("{H_TIME} {raw_time:?} is not RFC 3339")))?;
        let env = Envelope {
            id: uuid(H_ID)?,
            correlation_id: uuid(H_CORRELATION)?,
            causation_id: uuid(H_CAUSATION)?,
            kind: get(H_TYPE)?.to_string(),
            source: get(H_SOURCE)?.to_string(),
            time,
            schema: Schema::parse(get(H_DATASCHEMA)?)?,
        };
        env.check_chain()?;
        Ok(env)
    }

    fn check_chain(&self) -> Result<(), ContractError> {
        if self.is_root() && self.causation_id != self.id {
            return Err(ContractError::InvalidEnvelope(
                "a root message (id = correlation id) must have causation id = id".to_string(),
            ));
        }
        if !self.is_root() && self.causation_id == self.id {
            return Err(ContractError::InvalidEnvelope(
                "a derived message (id != correlation id) must name its parent as causation id".to_string(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::runtime::{ServiceAnnounced, ServiceHeartbeat};

    #[test]
    fn root_messages_are_their_own_correlation_and_causation() {
        let e = Envelope::root::<ServiceAnnounced>("/cim/n1/registry/i1");
        assert!(e.is_root());
        assert_eq!(e.id(), e.correlation_id());
        assert_eq!(e.id(), e.causation_id());
        assert_eq!(e.id().get_version_num(), 7);
    }

    #[test]
    fn derived_messages_inherit_correlation_and_name_their_parent() {
        let root = Envelope::root::<ServiceAnnounced>("/a");
        let child = Envelope::caused_by::<ServiceHeartbeat>(&root, "/b");
        let grandchild = Envelope::caused_by::<ServiceHeartbeat>(&child, "/c");
        assert_eq!(child.correlation_id(), root.id());
        assert_eq!(child.causation_id(), root.id());
        assert_eq!(grandchild.correlation_id(), root.id());
        assert_eq!(grandchild.causation_id(), child.id());
        assert!(!grandchild.is_root());
        assert!(child.id() > root.id(), "UUIDv7 ids sort by creation");
    }

    #[test]
    fn headers_round_trip() {
        let root = Envelope::root::<ServiceAnnounced>("/a");
        let child = Envelope::caused_by::<ServiceHeartbeat>(&root, "/b");
        let h = child.to_headers();
        assert_eq!(h.get(H_MSG_ID).unwrap().as_str(), child.id().to_string());
        assert_eq!(h.get(H_SPECVERSION).unwrap().as_str(), "1.0");
        let back = Envelope::from_headers(&h).unwrap();
        // RFC 3339 keeps nanoseconds, so the round trip is exact.
        assert_eq!(back, child);
        assert_eq!(back.schema, Schema::of::<ServiceHeartbeat>());
    }

    #[test]
    fn broken_envelopes_are_rejected_with_a_reason() {
        let good = Envelope::root::<ServiceAnnounced>("/a").to_headers();
        let with = |name: &str, value: &str| {
            let mut h = good.clone();
            h.insert(name, value);
            Envelope::from_headers(&h).unwrap_err().to_string()
        };
        assert!(with(H_SPECVERSION, "0.3").contains("1.0"));
        assert!(with(H_ID, "nope").contains("not a UUID"));
        assert!(with(H_ID, &Uuid::new_v4().to_string()).contains("UUIDv7"));
        assert!(with(H_TIME, "yesterday").contains("RFC 3339"));
        assert!(with(H_DATASCHEMA, "http://x").contains("urn:cim"));
        assert!(with(H_TYPE, "").contains("missing header ce-type"));
        // root whose causation is someone else
        assert!(with(H_CAUSATION, &new_id().to_string()).contains("root message"));
        // derived message claiming to be its own cause
        let root = Envelope::root::<ServiceAnnounced>("/a");
        let mut h = Envelope::caused_by::<ServiceAnnounced>(&root, "/b").to_headers();
        let id = h.get(H_ID).unwrap().as_str().to_string();
        h.insert(H_CAUSATION, id.as_str());
        assert!(Envelope::from_headers(&h).unwrap_err().to_string().contains("derived message"));
        assert!(Envelope::from_headers(&HeaderMap::new()).is_err());
    }

    #[test]
    fn schema_uri_parses_back() {
        let s = Schema { name: "cim.runtime.service.announced".into(), version: 2 };
        assert_eq!(s.to_uri(), "urn:cim:cim.runtime.service.announced:v2");
        assert_eq!(Schema::parse(&s.to_uri()).unwrap(), s);
        for bad in ["urn:cim:x:v0", "urn:cim::v1", "urn:cim:x", "urn:cim:x:vq"] {
            assert!(Schema::parse(bad).is_err(), "{bad}");
        }
    }
}
