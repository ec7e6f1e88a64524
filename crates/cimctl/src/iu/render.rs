//! How `cimctl iu` prints for a person: tables, a unit's details, command results, sizes and
//! times. (`--json` output comes from `cim_iu_client::json`.)

use cim_iu_client::{
    json::ToJson,
    proto::{CommandResult, ContentCommitted, IncomingLink, Unit},
};
use serde_json::{Value, json};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// RFC 3339 of milliseconds since the epoch; "-" for 0.
pub fn format_ms(ms: i64) -> String {
    if ms == 0 {
        return "-".into();
    }
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}

/// 1536 → "1.5 KiB".
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Columns padded to their widest cell; the last column is not padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len() - 1;
        let mut l = String::new();
        for (i, cell) in cells.into_iter().enumerate() {
            if i == last {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

pub fn result_line(verb: &str, r: &CommandResult) -> String {
    let mut s = format!("{verb} {} version {}", r.unit_id, r.version);
    if !r.cid.is_empty() {
        s.push_str(&format!(" cid {}", r.cid));
    }
    if r.replayed {
        s.push_str(" (replayed: already done)");
    }
    s
}

pub fn put_json(c: &ContentCommitted, r: &CommandResult) -> Value {
    json!({ "content": c.to_json(), "result": r.to_json() })
}

pub fn units_table(units: &[Unit]) -> String {
    let rows: Vec<Vec<String>> = units
        .iter()
        .map(|u| {
            vec![
                u.unit_id.clone(),
                u.version.to_string(),
                human_size(u.size),
                if u.unit_type.is_empty() { "-".into() } else { u.unit_type.clone() },
                format_ms(u.updated_ms),
                if u.deleted { format!("{} (deleted)", u.name) } else { u.name.clone() },
                u.tags.join(","),
            ]
        })
        .collect();
    table(&["ID", "VERSION", "SIZE", "TYPE", "UPDATED", "NAME", "TAGS"], &rows)
}

/// A unit for a person. `incoming` are the links other units hold to it now; `None` when
/// showing a past version (the service keeps incoming links only for the present).
pub fn unit_text(u: &Unit, incoming: Option<&[IncomingLink]>) -> String {
    let dash = |s: &str| if s.is_empty() { "-".to_string() } else { s.to_string() };
    let mut out = String::new();
    let mut kv = |k: &str, v: String| out.push_str(&format!("{k:<12}{v}\n"));
    kv("unit", u.unit_id.clone());
    kv("name", dash(&u.name));
    kv("media type", dash(&u.media_type));
    kv("unit type", dash(&u.unit_type));
    kv("cid", dash(&u.cid));
    kv("size", format!("{} ({} bytes)", human_size(u.size), u.size));
    kv("version", u.version.to_string());
    if u.deleted {
        kv("deleted", "yes".into());
    }
    for (label, ms, by) in [("created", u.created_ms, &u.created_by), ("updated", u.updated_ms, &u.updated_by)] {
        let mut v = format_ms(ms);
        if let Some(p) = by {
            if !p.source.is_empty() {
                v.push_str(&format!(" by {}", p.source));
            }
            if !p.correlation_id.is_empty() {
                v.push_str(&format!(" (correlation {})", p.correlation_id));
            }
        }
        kv(label, v);
    }
    kv("tags", if u.tags.is_empty() { "-".into() } else { u.tags.join(", ") });
    let mut attrs: Vec<_> = u.attributes.iter().collect();
    attrs.sort();
    if attrs.is_empty() {
        kv("attributes", "-".into());
    } else {
        out.push_str("attributes\n");
        for (k, v) in attrs {
            out.push_str(&format!("  {k} = {v}\n"));
        }
    }
    let incoming = incoming.unwrap_or_default();
    if u.links.is_empty() && incoming.is_empty() {
        out.push_str(&format!("{:<12}-\n", "links"));
    } else {
        out.push_str("links\n");
        for l in &u.links {
            out.push_str(&format!("  {} -> {}\n", l.kind, l.target));
        }
        for l in incoming {
            out.push_str(&format!("  {} <- {}\n", l.kind, l.source));
        }
    }
    if !u.versions.is_empty() {
        out.push_str("versions\n");
        for v in &u.versions {
            out.push_str(&format!("  {:<8}{}  {}  {}\n", v.version, format_ms(v.time_ms), v.cid, human_size(v.size)));
        }
    }
    out
}

/// `iu show --json`: the unit with the links other units hold to it (`incoming_links`, absent
/// for a past version).
pub fn unit_json(u: &Unit, incoming: Option<&[IncomingLink]>) -> Value {
    let mut v = u.to_json();
    if let Some(incoming) = incoming {
        v["incoming_links"] = incoming.to_json();
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_format() {
        assert_eq!(format_ms(1500), "1970-01-01T00:00:01.5Z");
        assert_eq!(format_ms(0), "-");
    }

    #[test]
    fn sizes_and_tables_render() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(1 << 30), "1.0 GiB");
        let t = table(&["A", "BB"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    BB\nxyz  1\n");
    }

    #[test]
    fn outputs_render() {
        let r = CommandResult { unit_id: "u1".into(), version: 4, cid: "bafk".into(), replayed: true, sequence: 12 };
        assert_eq!(result_line("tagged", &r), "tagged u1 version 4 cid bafk (replayed: already done)");
        let c = ContentCommitted { cid: "bafk".into(), size: 3, deduplicated: false };
        let v = put_json(&c, &r);
        assert_eq!(v["content"]["size"], 3);
        assert_eq!(v["result"]["unit_id"], "u1");
        let u = Unit {
            unit_id: "u1".into(),
            name: "n".into(),
            size: 2048,
            tags: vec!["a".into(), "b".into()],
            ..Default::default()
        };
        let t = units_table(std::slice::from_ref(&u));
        assert!(t.starts_with("ID"));
        assert!(t.contains("u1") && t.contains("2.0 KiB") && t.contains("a,b"));
        let s = unit_text(&u, Some(&[]));
        assert!(s.contains("unit        u1\n"));
        assert!(s.contains("tags        a, b\n"));
        assert!(s.contains("links       -\n"));
    }

    #[test]
    fn a_unit_shows_the_links_to_it_too() {
        let u = Unit {
            unit_id: "u1".into(),
            links: vec![cim_iu_client::proto::Link { kind: "cites".into(), target: "u2".into() }],
            ..Default::default()
        };
        let incoming = [IncomingLink { kind: "derived-from".into(), source: "u0".into() }];
        let s = unit_text(&u, Some(&incoming));
        assert!(s.contains("links\n  cites -> u2\n  derived-from <- u0\n"), "{s}");
        let v = unit_json(&u, Some(&incoming));
        assert_eq!(v["incoming_links"][0]["source"], "u0");
        assert_eq!(v["links"][0]["target"], "u2");
        assert!(unit_json(&u, None).get("incoming_links").is_none());
        assert!(!unit_text(&u, None).contains("<-"));
    }
}
