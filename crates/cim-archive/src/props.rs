//! Property tests of the archive's decoders: what a restore or verify reads back from a
//! target is untrusted bytes (manifests, cursors and deletion records as JSON, compressed
//! segments, object keys). They are read or refused, never a panic; segments round-trip; a
//! signed object with any byte changed is never accepted as something else.
//!
//! Budget: [`config`] runs 256 cases per property unless `PROPTEST_CASES` says otherwise
//! (docs/testing.md: `PROPTEST_CASES=100000 cargo nextest run -p cim-archive props`).

use cim_testkit::props::config;
use proptest::prelude::*;
use sha2::{Digest, Sha256};

use crate::{
    ArchiveKey,
    format::{
        self, Cursor, Deletions, FormatError, MANIFEST_FORMAT, MANIFEST_FORMAT_V1, Manifest, Record, SEGMENT_MAGIC,
        SegmentWriter, decode_segment,
    },
    hex,
};

/// Numbers as a hostile manifest might spell them: small, at the edges, anything.
fn seq() -> impl Strategy<Value = u64> {
    prop_oneof![3 => 0u64..8, 3 => Just(u64::MAX), 1 => Just(u64::MAX - 1), 1 => Just(1u64 << 63), 2 => any::<u64>()]
}

fn nanos() -> impl Strategy<Value = i64> {
    prop_oneof![Just(0i64), Just(i64::MIN), Just(i64::MAX), any::<i64>()]
}

/// A manifest with any field values (the right format tag most of the time, so parsing gets
/// to its checks).
fn any_manifest() -> impl Strategy<Value = Manifest> {
    (
        (
            prop_oneof![6 => Just(MANIFEST_FORMAT.to_string()), 3 => Just(MANIFEST_FORMAT_V1.to_string()), 1 => ".{0,30}"],
            ".{0,20}",
            seq(),
            seq(),
            seq(),
        ),
        (nanos(), nanos(), ".{0,40}", seq(), "[0-9a-f]{0,64}", seq()),
        (
            prop::option::of("[0-9a-f]{0,64}"),
            prop_oneof![Just("zstd".to_string()), Just("gzip".to_string()), ".{0,8}"],
            seq(),
        ),
        (prop::option::of(seq()), prop::option::of("[0-9a-f]{0,16}"), prop::option::of("[0-9a-zA-Z]{0,64}")),
    )
        .prop_map(
            |(
                (format, stream, first_seq, last_seq, count),
                (t0, t1, segment_key, segment_bytes, segment_sha256, raw_bytes),
                (raw_sha256, compression, epoch),
                (prev_last_seq, key_id, mac),
            )| Manifest {
                format,
                stream,
                first_seq,
                last_seq,
                count,
                first_time_nanos: t0,
                last_time_nanos: t1,
                segment_key,
                segment_bytes,
                segment_sha256,
                raw_bytes,
                raw_sha256,
                compression,
                epoch,
                prev_last_seq,
                key_id,
                mac,
            },
        )
}

/// JSON text as a target might return it: a manifest's JSON, the same with one byte changed,
/// or any bytes.
fn manifest_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        any_manifest().prop_map(|m| serde_json::to_vec(&m).unwrap()),
        (any_manifest(), any::<prop::sample::Index>(), any::<u8>()).prop_map(|(m, at, b)| {
            let mut v = serde_json::to_vec(&m).unwrap();
            let i = at.index(v.len());
            v[i] = b;
            v
        }),
        prop::collection::vec(any::<u8>(), 0..200),
    ]
}

/// One record as the archiver writes it. Header names hold no ':' and values no CR/LF (what a
/// NATS header can hold); subjects and payloads are anything.
#[derive(Clone, Debug)]
struct In {
    gap: u64,
    time: i64,
    subject: String,
    headers: Vec<(String, String)>,
    payload: Vec<u8>,
}

fn record() -> impl Strategy<Value = In> {
    (
        prop_oneof![Just(1u64), 1u64..1000, Just(1u64 << 40)],
        nanos(),
        ".{0,30}",
        prop::collection::vec(("[^:\r\n]{0,12}", "[^\r\n]{0,20}"), 0..4),
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(gap, time, subject, headers, payload)| In { gap, time, subject, headers, payload })
}

/// Writes `records` (sequences from `start`, each `gap` after the last) as one segment.
fn write(start: u64, records: &[In]) -> (bytes::Bytes, Manifest, Vec<Record>) {
    let mut w = SegmentWriter::new();
    let mut seq = start;
    let mut expected = Vec::new();
    for (i, r) in records.iter().enumerate() {
        if i > 0 {
            seq = seq.saturating_add(r.gap);
        }
        w.push(seq, r.time, &r.subject, &r.headers, &r.payload);
        expected.push(Record {
            sequence: seq,
            time_nanos: r.time,
            subject: r.subject.clone(),
            headers: r.headers.clone(),
            payload: bytes::Bytes::from(r.payload.clone()),
        });
    }
    let (bytes, m) = w.finish("S", "p/", 0, start.saturating_sub(1));
    (bytes, m, expected)
}

/// A manifest that describes `compressed` exactly (sizes and digests), with `raw` as what it
/// decompresses to, so decoding gets past the checksums to the records.
fn describe(compressed: &[u8], raw: &[u8], compression: &str, first: u64, last: u64, count: u64) -> Manifest {
    Manifest {
        format: MANIFEST_FORMAT_V1.to_string(),
        stream: "S".into(),
        first_seq: first,
        last_seq: last,
        count,
        first_time_nanos: 0,
        last_time_nanos: 0,
        segment_key: "k".into(),
        segment_bytes: compressed.len() as u64,
        segment_sha256: hex(&Sha256::digest(compressed)),
        raw_bytes: raw.len() as u64,
        // Format 1's hash of the records: decoding checks it where a manifest has one.
        raw_sha256: Some(hex(&Sha256::digest(raw))),
        compression: compression.to_string(),
        epoch: 0,
        prev_last_seq: None,
        key_id: None,
        mac: None,
    }
}

/// Raw segment bytes: the magic then record-like fields (lengths at the edges), or anything.
fn raw_segment() -> impl Strategy<Value = Vec<u8>> {
    let field = prop_oneof![
        any::<u64>().prop_map(|n| n.to_be_bytes().to_vec()),
        prop_oneof![Just(0u32), Just(u32::MAX), 0u32..16, any::<u32>()].prop_map(|n| n.to_be_bytes().to_vec()),
        Just(b"NATS/1.0\r\na: b\r\n\r\n".to_vec()),
        Just(b"NATS/1.0\r\nno colon\r\n\r\n".to_vec()),
        prop::collection::vec(any::<u8>(), 0..16),
    ];
    prop_oneof![
        prop::collection::vec(field, 0..16).prop_map(|fields| {
            let mut raw = SEGMENT_MAGIC.to_vec();
            fields.into_iter().for_each(|f| raw.extend(f));
            raw
        }),
        prop::collection::vec(any::<u8>(), 0..64),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Any manifest body is parsed or refused (never a panic, whatever its numbers); what is
    /// accepted has a consistent range.
    #[test]
    fn manifests_parse_or_refuse(body in manifest_body()) {
        if let Ok(m) = Manifest::parse("k", &body) {
            prop_assert!(m.first_seq <= m.last_seq && m.count >= 1);
            prop_assert!(m.count - 1 <= m.last_seq - m.first_seq);
            prop_assert!(m.prev_last_seq.is_none_or(|p| p < m.first_seq));
        }
    }

    /// Cursors and deletion records (JSON from the target) are read or refused, and their seal
    /// checked without a panic.
    #[test]
    fn cursors_and_deletions_parse_or_refuse(body in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        (seq(), nanos(), prop::option::of("[0-9a-f]{0,70}"), prop::option::of(".{0,20}")).prop_map(|(s, t, mac, key)| serde_json::to_vec(&serde_json::json!({
            "format": format::CURSOR_FORMAT, "stream": "S", "target": "t", "last_seq": s, "manifest_key": "m",
            "updated_unix_nanos": t, "epoch": s, "through": s, "seen_unix_nanos": t, "ranges": [[s, 0], [0, s]],
            "key_id": key, "mac": mac,
        })).unwrap()),
    ]) {
        let key = ArchiveKey::derive(b"secret");
        if let Ok(c) = serde_json::from_slice::<Cursor>(&body) {
            let _ = key.check(&c);
        }
        if let Ok(d) = serde_json::from_slice::<Deletions>(&body) {
            let _ = key.check(&d);
        }
    }

    /// Records written by the archiver decode to exactly what was written, and the manifest's
    /// JSON parses back to the manifest.
    #[test]
    fn segments_round_trip(start in prop_oneof![Just(1u64), 1u64..1_000_000, Just(u64::MAX - (1 << 44))], records in prop::collection::vec(record(), 1..12)) {
        let (bytes, m, expected) = write(start, &records);
        prop_assert_eq!(decode_segment(&m, &bytes), Ok(expected));
        prop_assert_eq!(Manifest::parse("k", &serde_json::to_vec(&m).unwrap()), Ok(m));
    }

    /// A stored segment with any byte changed, cut short or lengthened is refused.
    #[test]
    fn damaged_segments_are_refused(records in prop::collection::vec(record(), 1..6), at in any::<prop::sample::Index>(), flip in 1u8..=255, how in 0u8..3) {
        let (bytes, m, _) = write(1, &records);
        let mut bad = bytes.to_vec();
        match how {
            0 => { let i = at.index(bad.len()); bad[i] ^= flip }
            1 => { bad.truncate(at.index(bad.len())) }
            _ => bad.push(flip),
        }
        let refused = matches!(decode_segment(&m, &bad), Err(FormatError::Corrupt { .. }));
        prop_assert!(refused);
    }

    /// Segments whose manifest matches their bytes (so the checksums pass) but whose content is
    /// anything: zstd or gzip of any raw bytes, or bytes that are neither, against any counts
    /// and sizes the manifest claims. Decoded or refused, never a panic, never more memory than
    /// the manifest's size.
    #[test]
    fn segment_records_decode_or_refuse(
        raw in raw_segment(), garbage in prop::collection::vec(any::<u8>(), 0..64), how in 0u8..3,
        first in seq(), last in seq(), count in seq(), size_off in prop_oneof![Just(0i64), -3i64..3, Just(i64::MIN), Just(i64::MAX)],
    ) {
        let (compressed, compression) = match how {
            0 => (zstd::bulk::compress(&raw, 1).unwrap(), "zstd"),
            1 => {
                use std::io::Write;
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                gz.write_all(&raw).unwrap();
                (gz.finish().unwrap(), "gzip")
            }
            _ => (garbage, if first % 2 == 0 { "zstd" } else { "gzip" }),
        };
        let mut m = describe(&compressed, &raw, compression, first, last, count);
        m.raw_bytes = m.raw_bytes.saturating_add_signed(size_off);
        if let Ok(records) = decode_segment(&m, &compressed) {
            prop_assert_eq!(records.len() as u64, m.count);
            prop_assert_eq!(records.first().map(|r| r.sequence), Some(m.first_seq));
            prop_assert_eq!(records.last().map(|r| r.sequence), Some(m.last_seq));
            prop_assert!(records.windows(2).all(|w| w[0].sequence < w[1].sequence));
        }
    }

    /// A signed manifest's JSON with one byte changed is refused by parsing or by the seal, or
    /// reads back as the very manifest that was signed (a change JSON ignores, such as the case
    /// of a hex digit of the MAC or the name of a field that is absent anyway): a verifier never
    /// accepts a changed manifest. Another key refuses it too.
    #[test]
    fn signed_manifests_refuse_any_change(
        m in any_manifest(), at in any::<prop::sample::Index>(), in_mac in any::<bool>(),
        // Any change, and those that keep a hex digit's value for a lax reader: its case (0x20),
        // and `0` → `+` (0x1b).
        flip in prop_oneof![1u8..=255, Just(0x20u8), Just(0x1b)],
    ) {
        let key = ArchiveKey::derive(b"the operator's secret");
        let mut signed = m;
        key.seal(&mut signed);
        prop_assert_eq!(key.check(&signed), Ok(()));
        prop_assert!(ArchiveKey::derive(b"another secret").check(&signed).is_err());
        let mut body = serde_json::to_vec(&signed).unwrap();
        // Half of the changes go to the MAC itself (the last 64 digits before `"}`).
        let i = if in_mac { body.len() - 66 + at.index(64) } else { at.index(body.len()) };
        body[i] ^= flip;
        // Parsing as a restore does (serde_json, then the manifest's checks) and as any other
        // reader of the JSON might (serde_json alone).
        if let Ok(read) = serde_json::from_slice::<Manifest>(&body)
            && key.check(&read).is_ok()
        {
            prop_assert_eq!(&read, &signed, "a changed manifest was accepted: {}", String::from_utf8_lossy(&body));
        }
    }

    /// Any field of a signed manifest changed is refused by the seal.
    #[test]
    fn signed_manifests_refuse_changed_fields(m in any_manifest(), field in 0u8..8, n in 1u64..=u64::MAX) {
        let key = ArchiveKey::derive(b"the operator's secret");
        let mut signed = m;
        key.seal(&mut signed);
        let mut changed = signed.clone();
        match field {
            0 => changed.first_seq = changed.first_seq.wrapping_add(n),
            1 => changed.last_seq = changed.last_seq.wrapping_add(n),
            2 => changed.count = changed.count.wrapping_add(n),
            3 => changed.raw_bytes = changed.raw_bytes.wrapping_add(n),
            4 => changed.segment_sha256.push('0'),
            5 => changed.epoch = changed.epoch.wrapping_add(n),
            6 => changed.prev_last_seq = Some(changed.prev_last_seq.map_or(n, |p| p.wrapping_add(n))),
            _ => changed.compression.push('x'),
        }
        prop_assert_eq!(key.check(&changed), Err(crate::SealError::Mismatch));
    }

    /// Object keys listed from a target: parsed or refused; the archive's own keys parse back.
    #[test]
    fn keys_parse_or_refuse(key in ".{0,80}", first in any::<u64>(), last in any::<u64>(), epoch in any::<u64>(), prefix in "[a-z/]{0,8}") {
        let _ = format::parse_segment_key(&key);
        let _ = format::parse_manifest_key(&key);
        let _ = format::parse_epochs(&format::epochs_prefix("p/", "S"), &[key]);
        prop_assert_eq!(format::parse_segment_key(&format::segment_key(&prefix, "S", epoch, first, last)), Some((first, last)));
        prop_assert_eq!(format::parse_manifest_key(&format::manifest_key(&prefix, "S", epoch, first, last)), Some((first, last)));
        if epoch > 0 {
            let k = format::manifest_key(&prefix, "S", epoch, first, last);
            prop_assert_eq!(format::parse_epochs(&format::epochs_prefix(&prefix, "S"), &[k]), vec![epoch]);
        }
    }
}

/// Found by `manifests_parse_or_refuse` (once `seq` favoured the edges): a manifest spanning every sequence (0..=u64::MAX)
/// overflowed the range check (`last - first + 1`), a panic in debug builds and a wrong
/// refusal in release ones.
#[test]
fn regression_manifest_spanning_every_sequence() {
    let mut m = describe(b"", b"", "zstd", 0, u64::MAX, 1);
    let body = serde_json::to_vec(&m).unwrap();
    assert_eq!(Manifest::parse("k", &body), Ok(m.clone()));
    m.count = u64::MAX;
    assert!(Manifest::parse("k", &serde_json::to_vec(&m).unwrap()).is_ok());
    m.first_seq = 2; // u64::MAX - 1 sequences
    assert!(Manifest::parse("k", &serde_json::to_vec(&m).unwrap()).is_err(), "more records than sequences");
}

/// Found by `signed_manifests_refuse_any_change` (with `PROPTEST_CASES=20000`): the MAC's hex
/// was read case-insensitively (and `u8::from_str_radix` also takes a leading `+`), so a signed
/// manifest whose MAC had a digit changed to upper case, or a `0` to a `+`, still verified.
#[test]
fn regression_respelled_mac_is_refused() {
    let key = ArchiveKey::derive(b"secret");
    let mut m = describe(b"", b"", "zstd", 1, 1, 1);
    key.seal(&mut m);
    assert_eq!(key.check(&m), Ok(()));
    let mac = m.mac.clone().unwrap();
    let mut upper = m.clone();
    upper.mac = Some(mac.to_uppercase());
    assert_ne!(upper.mac, m.mac, "a MAC of 64 hex digits with no letter");
    assert_eq!(key.check(&upper), Err(crate::SealError::Mismatch));
    // A MAC with a `0` at the start of a byte, spelled `+`.
    let mut m = describe(b"", b"", "zstd", 1, 1, 1);
    let plus = (0..1000)
        .find_map(|epoch| {
            m.epoch = epoch;
            key.seal(&mut m);
            let mac = m.mac.clone().unwrap();
            let i = (0..mac.len()).step_by(2).find(|&i| &mac[i..i + 1] == "0")?;
            Some(format!("{}+{}", &mac[..i], &mac[i + 1..]))
        })
        .unwrap();
    let mut respelled = m.clone();
    respelled.mac = Some(plus);
    assert_eq!(key.check(&respelled), Err(crate::SealError::Mismatch));
}
