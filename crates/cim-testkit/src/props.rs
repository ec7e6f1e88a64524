//! Shared pieces of the property tests (`props.rs` in each crate; docs/testing.md): their
//! budget and the strategies for bytes that arrive from outside a process.

use proptest::prelude::*;

/// The fixed budget of every property test of the workspace: 256 cases, or `PROPTEST_CASES` when it is set.
/// Failures are not written to `proptest-regressions/` files: a failure found becomes a named
/// regression test instead.
pub fn config() -> ProptestConfig {
    let mut c = ProptestConfig { failure_persistence: None, ..ProptestConfig::default() };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = 256;
    }
    c
}

/// Bytes as they might arrive: empty, short, long, anything.
pub fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

/// Well-formed protobuf wire data (fields 1..20 of every wire type, length-delimited ones
/// holding random bytes or nested wire data), so that decoding gets past the first byte and
/// into the fields of a message.
pub fn wire() -> impl Strategy<Value = Vec<u8>> {
    let leaf = bytes(24);
    let nested = leaf.prop_recursive(3, 256, 6, |inner| {
        prop::collection::vec((1u32..20, 0u8..4, any::<u64>(), prop_oneof![inner, bytes(24)]), 0..6).prop_map(
            |fields| {
                let mut out = Vec::new();
                for (field, wire_type, n, data) in fields {
                    let wire_type = [0u8, 1, 2, 5][wire_type as usize];
                    put_varint(&mut out, u64::from(field << 3 | u32::from(wire_type)));
                    match wire_type {
                        0 => put_varint(&mut out, n),
                        1 => out.extend_from_slice(&n.to_le_bytes()),
                        5 => out.extend_from_slice(&(n as u32).to_le_bytes()),
                        _ => {
                            put_varint(&mut out, data.len() as u64);
                            out.extend_from_slice(&data);
                        }
                    }
                }
                out
            },
        )
    });
    prop_oneof![bytes(64), nested]
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}
