//! The values `cimctl iu` takes on its command line: unit ids, byte ranges, `K=V` pairs,
//! links and times. Each refusal is a usage error (exit 64) saying what the value should look
//! like.

use cim_iu_client::proto::Link;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// What a unit id looks like, for messages.
pub const UNIT_ID_EXAMPLE: &str = "0190f4c2-6a1e-7c3b-9d52-3f4a1b2c3d4e";

/// A unit id: the information-unit service names every unit with a UUID (UUIDv7). Other
/// spellings of a UUID (upper case, braces, no hyphens) become the canonical one.
pub fn parse_unit_id(s: &str) -> Result<String, String> {
    match uuid::Uuid::try_parse(s.trim()) {
        Ok(u) => Ok(u.hyphenated().to_string()),
        Err(_) => {
            Err(format!("not a unit id: a unit id is a UUID such as {UNIT_ID_EXAMPLE} (`cimctl iu ls` lists them)"))
        }
    }
}

/// What `iu get` downloads: a unit's content, or content named by its CID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GetTarget {
    Unit(String),
    Cid(String),
}

pub fn parse_get_target(s: &str) -> Result<GetTarget, String> {
    if s.parse::<cim_events::Cid>().is_ok() {
        return Ok(GetTarget::Cid(s.to_string()));
    }
    parse_unit_id(s).map(GetTarget::Unit).map_err(|_| {
        format!("neither a unit id (a UUID such as {UNIT_ID_EXAMPLE}) nor a content id (a CID such as bafkrei…)")
    })
}

/// `--range`: START-END (END exclusive) or START- (to the end).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: Option<u64>,
}

impl ByteRange {
    /// The range as `(start, end_exclusive)` within content of `size` bytes.
    pub fn resolve(self, size: u64) -> (u64, u64) {
        (self.start, self.end.unwrap_or(size).max(self.start))
    }
}

pub fn parse_range(s: &str) -> Result<ByteRange, String> {
    let (a, b) = s.split_once('-').ok_or_else(|| format!("{s:?}: expected START-END or START-"))?;
    let num = |x: &str| x.trim().parse::<u64>().map_err(|_| format!("{s:?}: {x:?} is not a byte offset"));
    let start = num(a)?;
    let end = if b.trim().is_empty() { None } else { Some(num(b)?) };
    if end.is_some_and(|end| end < start) {
        return Err(format!("{s:?}: END is before START"));
    }
    Ok(ByteRange { start, end })
}

pub fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("{s:?}: expected KEY=VALUE")),
    }
}

/// `KIND=TARGET`, the target a unit id.
pub fn parse_link(s: &str) -> Result<Link, String> {
    match s.split_once('=') {
        Some((k, t)) if !k.trim().is_empty() && !t.trim().is_empty() => {
            let target = parse_unit_id(t).map_err(|e| format!("{s:?}: TARGET is {e}"))?;
            Ok(Link { kind: k.trim().to_string(), target })
        }
        _ => Err(format!("{s:?}: expected KIND=TARGET")),
    }
}

pub fn parse_time_ms(s: &str) -> Result<i64, String> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let t = OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| format!("{s:?}: expected an RFC 3339 time such as 2024-05-01T12:00:00Z ({e})"))?;
    Ok((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

pub fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("{s:?}: expected a positive number of seconds")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_ids_are_uuids() {
        assert_eq!(parse_unit_id(UNIT_ID_EXAMPLE).unwrap(), UNIT_ID_EXAMPLE);
        assert_eq!(parse_unit_id(&UNIT_ID_EXAMPLE.to_uppercase()).unwrap(), UNIT_ID_EXAMPLE);
        for bad in ["", "some-unit", "u1", "0190f4c2-6a1e-7c3b-9d52", "a.b"] {
            let e = parse_unit_id(bad).unwrap_err();
            assert!(e.contains("a unit id is a UUID such as"), "{bad}: {e}");
        }
        assert_eq!(parse_get_target(UNIT_ID_EXAMPLE).unwrap(), GetTarget::Unit(UNIT_ID_EXAMPLE.into()));
        let cid = cim_events::Cid::of(b"x").to_string();
        assert_eq!(parse_get_target(&cid).unwrap(), GetTarget::Cid(cid));
        assert!(parse_get_target("nope").unwrap_err().contains("neither a unit id"));
    }

    #[test]
    fn ranges_parse() {
        assert_eq!(parse_range("0-100").unwrap(), ByteRange { start: 0, end: Some(100) });
        assert_eq!(parse_range("5-").unwrap(), ByteRange { start: 5, end: None });
        assert_eq!(parse_range("7-7").unwrap(), ByteRange { start: 7, end: Some(7) });
        for bad in ["", "5", "-5", "a-b", "10-5", "1-2-3", "1.5-2"] {
            assert!(parse_range(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_range("5-").unwrap().resolve(100), (5, 100));
        assert_eq!(parse_range("200-").unwrap().resolve(100), (200, 200));
        assert_eq!(parse_range("1-3").unwrap().resolve(100), (1, 3));
    }

    #[test]
    fn key_values_and_links_parse() {
        assert_eq!(parse_kv("a=b").unwrap(), ("a".into(), "b".into()));
        assert_eq!(parse_kv("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert_eq!(parse_kv("a=").unwrap(), ("a".into(), String::new()));
        assert!(parse_kv("=b").is_err());
        assert!(parse_kv("ab").is_err());
        let link = format!("derived-from={UNIT_ID_EXAMPLE}");
        assert_eq!(parse_link(&link).unwrap(), Link { kind: "derived-from".into(), target: UNIT_ID_EXAMPLE.into() });
        assert!(parse_link("derived-from=u1").unwrap_err().contains("TARGET is not a unit id"));
        assert!(parse_link("kind=").is_err());
        assert!(parse_link("=t").is_err());
    }

    #[test]
    fn times_parse() {
        assert_eq!(parse_time_ms("1970-01-01T00:00:01.5Z").unwrap(), 1500);
        assert_eq!(parse_time_ms("2024-05-01T12:00:00+02:00").unwrap(), 1_714_557_600_000);
        assert_eq!(parse_time_ms("1234").unwrap(), 1234);
        assert!(parse_time_ms("yesterday").is_err());
        assert!(parse_seconds("0").is_err() && parse_seconds("nan").is_err());
        assert_eq!(parse_seconds("1.5").unwrap(), 1.5);
    }
}
