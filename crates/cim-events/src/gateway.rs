//! Names and records of the ui-gateway contract: the API token bucket, its keys, the token
//! format and how a token is hashed. Tokens are stored hashed (SHA-256), never in clear.

use sha2::{Digest, Sha256};

use crate::{ContractError, token};

/// KV bucket purpose (`cim_gateway_tokens`): one entry per live API token, key `t.<id>`.
pub const KV_TOKENS: &str = "tokens";

/// Prefix of every API token handed out: `cimt_<id>_<secret>`.
pub const TOKEN_PREFIX: &str = "cimt_";

/// Roles, weakest first: a reader reads, a writer also uploads, tags and links, an admin also
/// sees components, nodes and status of the whole system.
pub mod role {
    pub const READER: &str = "reader";
    pub const WRITER: &str = "writer";
    pub const ADMIN: &str = "admin";
    pub const ALL: [&str; 3] = [READER, WRITER, ADMIN];
}

/// Rank of a role (reader 1, writer 2, admin 3), or `None` when it is not one.
pub fn role_rank(role: &str) -> Option<u8> {
    match role {
        role::READER => Some(1),
        role::WRITER => Some(2),
        role::ADMIN => Some(3),
        _ => None,
    }
}

/// A stored API token (the value of a `cim_gateway_tokens` entry): never the secret itself.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ApiToken {
    #[prost(string, tag = "1")]
    pub id: String,
    /// What the token is for, chosen by whoever created it.
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(string, tag = "3")]
    pub role: String,
    /// Lowercase hex SHA-256 of the whole token string.
    #[prost(string, tag = "4")]
    pub sha256: String,
    #[prost(int64, tag = "5")]
    pub created_ms: i64,
}

/// KV key of a token.
pub fn token_key(id: &str) -> Result<String, ContractError> {
    token::validate_name("token id", id)?;
    Ok(format!("t.{id}"))
}

/// The id a token string carries, when it has the `cimt_<id>_<secret>` shape.
pub fn token_id(token: &str) -> Option<&str> {
    let rest = token.strip_prefix(TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let ok = |s: &str| !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric());
    (ok(id) && ok(secret)).then_some(id)
}

/// Lowercase hex SHA-256 of a token string.
pub fn hash_token(token: &str) -> String {
    Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares two hashes in time independent of where they differ.
pub fn hashes_equal(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        assert_eq!(token_id("cimt_abc_def"), Some("abc"));
        assert_eq!(token_id("cimt_abc"), None);
        assert_eq!(token_id("cimt__x"), None);
        assert_eq!(token_id("cimt_a.b_x"), None);
        assert_eq!(token_id("nope_a_b"), None);
        assert_eq!(token_key("abc").unwrap(), "t.abc");
        assert!(token_key("a.b").is_err());
        let h = hash_token("cimt_a_b");
        assert_eq!(h.len(), 64);
        assert!(hashes_equal(&h, &hash_token("cimt_a_b")));
        assert!(!hashes_equal(&h, &hash_token("cimt_a_c")));
        assert_eq!(role_rank(role::WRITER), Some(2));
        assert_eq!(role_rank("root"), None);
    }
}
