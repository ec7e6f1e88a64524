//! Property tests of what the gateway parses from a request before anything else sees it:
//! `Range` headers, query strings, unit names, `cimt_…` API tokens, the caller's request ids,
//! the role a route needs, and the per-token rate limit.
//!
//! Budget: [`config`] runs 256 cases per property unless `PROPTEST_CASES` says otherwise
//! (docs/testing.md: `PROPTEST_CASES=100000 cargo nextest run -p ui-gateway props`).

use std::collections::HashMap;

use axum::{extract::Query, http::Method};
use cim_events::gateway::{self, role};
use cim_testkit::props::config;
use proptest::prelude::*;

use crate::{
    api::{check_name, parse_range},
    auth::{Caller, RateLimiter, required_role},
    error::ApiError,
};

/// Sizes and positions at the edges: 0, small, 2^63, u64::MAX, anything.
fn number() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0u64), 0u64..200, Just(1u64 << 63), Just(u64::MAX - 1), Just(u64::MAX), any::<u64>()]
}

/// A number as a client might spell it: digits (past u64 too), signs, spaces, nothing.
fn spelled() -> impl Strategy<Value = String> {
    prop_oneof![
        number().prop_map(|n| n.to_string()),
        Just("18446744073709551616".to_string()),
        Just("99999999999999999999999".to_string()),
        Just("+5".to_string()),
        Just("-0".to_string()),
        Just(String::new()),
        Just(" 7 ".to_string()),
        "[0-9 ,=-]{0,6}",
    ]
}

fn range_header() -> impl Strategy<Value = String> {
    prop_oneof![
        (spelled(), spelled()).prop_map(|(a, b)| format!("bytes={a}-{b}")),
        spelled().prop_map(|a| format!("bytes={a}-")),
        spelled().prop_map(|n| format!("bytes=-{n}")),
        (spelled(), spelled(), spelled()).prop_map(|(a, b, c)| format!("bytes={a}-{b},{c}-")),
        ".{0,30}",
    ]
}

/// Percent-encodes every byte but ASCII letters and digits.
fn encode(s: &str) -> String {
    s.bytes().map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

proptest! {
    #![proptest_config(config())]

    /// Any `Range` header against any size: a range inside the content, or 416; never a panic
    /// or an overflow.
    #[test]
    fn ranges_are_satisfiable_or_refused(v in range_header(), size in number()) {
        match parse_range(&v, size) {
            Ok((start, end)) => prop_assert!(start < end && end <= size, "{v:?} of {size}: {start}..{end}"),
            Err(e) => {
                let is_416 = matches!(e, ApiError::RangeNotSatisfiable(_, s) if s == size);
                prop_assert!(is_416, "{v:?}: {e:?}");
            }
        }
    }

    /// Well-formed ranges mean what they say: `a-b` is `a..=b` cut at the end, `a-` the rest,
    /// `-n` the last n bytes.
    #[test]
    fn ranges_mean_what_they_say(size in 1u64..=u64::MAX, a in number(), b in number(), n in number()) {
        let a = a % size;
        let b = a.saturating_add(b);
        prop_assert_eq!(parse_range(&format!("bytes={a}-{b}"), size).ok(), Some((a, b.saturating_add(1).min(size))));
        prop_assert_eq!(parse_range(&format!(" bytes={a}- "), size).ok(), Some((a, size)));
        let suffix = parse_range(&format!("bytes=-{n}"), size).ok();
        prop_assert_eq!(suffix, (n > 0).then(|| (size - n.min(size), size)));
    }

    /// Query strings as a client sends them (any bytes, percent-encoded or raw): read into
    /// the parameters or refused, never a panic; encoded parameters read back as they were.
    #[test]
    fn queries_parse_or_refuse(
        raw in "[a-zA-Z0-9%&=+._~-]{0,40}",
        params in prop::collection::hash_map("[^\u{0}]{1,10}", ".{0,10}", 0..5),
    ) {
        if let Ok(uri) = format!("http://gw/api/v1/units?{raw}").parse() {
            let _ = Query::<HashMap<String, String>>::try_from_uri(&uri);
        }
        let query: Vec<String> = params.iter().map(|(k, v)| format!("{}={}", encode(k), encode(v))).collect();
        let uri = format!("http://gw/api/v1/units?{}", query.join("&")).parse().unwrap();
        let Query(back) = Query::<HashMap<String, String>>::try_from_uri(&uri).unwrap();
        prop_assert_eq!(back, params);
    }

    /// Unit names from a query or a form: accepted ones can name no other path.
    #[test]
    fn names_are_checked(name in prop_oneof![".{0,20}", "[./\\\\a]{0,4}", ".{250,260}"]) {
        if check_name(&name).is_ok() {
            prop_assert!(!name.is_empty() && name.len() <= 255);
            prop_assert!(!name.contains('/') && !name.contains('\\') && name != "." && name != "..");
            prop_assert!(!name.chars().any(char::is_control));
        }
    }

    /// `cimt_<id>_<secret>` tokens as presented: any string is a token id or not; a minted one
    /// names its id and hashes to the stored hash, and any other string does not.
    #[test]
    fn api_tokens_are_read_or_refused(
        presented in prop_oneof![".{0,300}", "cimt_[A-Za-z0-9_]{0,300}", Just("cimt_".to_string()), Just("cimt__".to_string())],
        id in "[A-Za-z0-9]{1,128}", secret in "[A-Za-z0-9]{1,128}",
    ) {
        if let Some(id) = gateway::token_id(&presented) {
            prop_assert!(presented.starts_with("cimt_") && !id.is_empty() && id.len() <= 128);
            prop_assert!(gateway::token_key(id).is_ok());
        }
        let token = format!("cimt_{id}_{secret}");
        prop_assert_eq!(gateway::token_id(&token), Some(id.as_str()));
        let stored = gateway::hash_token(&token);
        prop_assert_eq!(gateway::hashes_equal(&stored, &gateway::hash_token(&presented)), presented == token);
    }

    /// A caller's request ids are its own: two different tokens never name the same id,
    /// whatever ids they choose.
    #[test]
    fn request_ids_are_namespaced(a in "[A-Za-z0-9]{1,20}", b in "[A-Za-z0-9]{1,20}", x in ".{0,30}", y in ".{0,30}") {
        let caller = |id: &str| Caller { id: id.to_string(), name: String::new(), role: role::WRITER.to_string() };
        let (ca, cb) = (caller(&a), caller(&b));
        let prefix = format!("gw-{a}-");
        prop_assert!(ca.own_request_id(&x).starts_with(&prefix));
        if a != b {
            prop_assert_ne!(ca.own_request_id(&x), cb.own_request_id(&y));
        }
    }

    /// Every path gets a role or is public; only the UI and the OpenAPI document are public,
    /// and nothing but GET/HEAD is allowed to a reader.
    #[test]
    fn every_route_needs_a_role(path in prop_oneof![".{0,30}", "/api/[a-z0-9/._-]{0,30}", "/api/v1/(status|nodes|pipelines|units|runs)[/a-z]{0,10}"], m in 0usize..6) {
        let method = [Method::GET, Method::HEAD, Method::POST, Method::DELETE, Method::PUT, Method::PATCH][m].clone();
        match required_role(&method, &path) {
            None => prop_assert!(!path.starts_with("/api/") || path == "/api/openapi.json"),
            Some(r) => {
                let rank = gateway::role_rank(r);
                prop_assert!(rank.is_some());
                if method != Method::GET && method != Method::HEAD {
                    prop_assert!(rank >= gateway::role_rank(role::WRITER));
                }
            }
        }
    }

    /// The rate limiter with any rate and ids: admits or names a wait of at least a second.
    #[test]
    fn rate_limits_admit_or_name_a_wait(rate in prop_oneof![Just(0u32), Just(1u32), Just(u32::MAX), any::<u32>()], ids in prop::collection::vec(".{0,6}", 1..20)) {
        let l = RateLimiter::new(rate);
        for id in &ids {
            if let Err(wait) = l.check(id) {
                prop_assert!(rate > 0 && wait >= 1);
            }
        }
    }
}
