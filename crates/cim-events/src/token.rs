//! Validation of the values that become one token of a NATS subject or a resource name.

use crate::ContractError;

/// Longest token we accept; keeps subjects well under NATS limits and readable in tools.
pub const MAX_TOKEN_LEN: usize = 128;

/// Checks that `value` can be used as one subject token.
///
/// Rejected: empty, longer than [`MAX_TOKEN_LEN`], or containing `.` (a separator), `*` or `>`
/// (wildcards), whitespace, any control character, or anything outside printable ASCII. The last
/// rule keeps subjects byte-for-byte equal to what every NATS tool prints.
pub fn validate_token(what: &'static str, value: &str) -> Result<(), ContractError> {
    let bad =
        |reason: &'static str| ContractError::InvalidToken { what, value: value.escape_debug().to_string(), reason };
    if value.is_empty() {
        return Err(bad("is empty"));
    }
    if value.len() > MAX_TOKEN_LEN {
        return Err(bad("is longer than 128 bytes"));
    }
    for c in value.chars() {
        match c {
            '.' => return Err(bad("contains '.', the subject separator")),
            '*' | '>' => return Err(bad("contains a wildcard ('*' or '>')")),
            c if c.is_whitespace() => return Err(bad("contains whitespace")),
            c if c.is_control() => return Err(bad("contains a control character")),
            c if !c.is_ascii_graphic() => return Err(bad("contains a non-ASCII character")),
            _ => {}
        }
    }
    Ok(())
}

/// Checks a lowercase name such as a plugin or pipeline name: `[a-z0-9][a-z0-9-]*`, 1-64
/// characters (fits in a subject token, a KV key and an object name).
pub fn validate_slug(what: &'static str, name: &str) -> Result<(), ContractError> {
    let bad = |reason| ContractError::InvalidToken { what, value: name.escape_debug().to_string(), reason };
    if name.is_empty() || name.len() > 64 {
        return Err(bad("must be 1-64 characters"));
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return Err(bad("only a-z, 0-9 and '-' are allowed"));
    }
    if name.starts_with('-') {
        return Err(bad("must not start with '-'"));
    }
    Ok(())
}

/// Checks a name used for a stream, consumer or bucket: [`validate_token`] plus JetStream's
/// stricter alphabet (`A-Z a-z 0-9 - _`), which also keeps names valid as file names.
pub fn validate_name(what: &'static str, value: &str) -> Result<(), ContractError> {
    validate_token(what, value)?;
    if let Some(c) = value.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_')) {
        return Err(ContractError::InvalidToken {
            what,
            value: value.to_string(),
            reason: if c == '/' || c == '\\' {
                "contains a path separator"
            } else {
                "may only contain A-Z, a-z, 0-9, '-' and '_'"
            },
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_tokens() {
        for ok in ["a", "unit", "0190b5a0-7f2e-7c1a-9c3e-2f1d4b6a8c9e", "x_y-z", "A:B", "~!@#"] {
            validate_token("id", ok).unwrap();
        }
    }

    #[test]
    fn rejects_tokens_that_would_break_a_subject() {
        let cases = [
            ("", "is empty"),
            ("a.b", "separator"),
            ("a*", "wildcard"),
            (">", "wildcard"),
            ("a b", "whitespace"),
            ("a\tb", "whitespace"),
            ("a\u{7}b", "control"),
            ("a\u{0}b", "control"),
            ("é", "non-ASCII"),
            ("a\u{2003}b", "whitespace"),
        ];
        for (value, reason) in cases {
            let err = validate_token("id", value).unwrap_err().to_string();
            assert!(err.contains(reason), "{value:?}: {err}");
        }
        let long = "x".repeat(MAX_TOKEN_LEN + 1);
        assert!(validate_token("id", &long).unwrap_err().to_string().contains("longer"));
        validate_token("id", &"x".repeat(MAX_TOKEN_LEN)).unwrap();
    }

    #[test]
    fn names_are_stricter_than_tokens() {
        validate_name("stream", "CIM_IU_EVENTS").unwrap();
        assert!(validate_name("stream", "a:b").is_err());
        let err = validate_name("bucket", "a/b").unwrap_err().to_string();
        assert!(err.contains("path separator"), "{err}");
    }
}
