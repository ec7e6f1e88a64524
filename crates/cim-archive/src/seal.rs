//! Authenticated archive objects: every manifest, cursor and deletion record carries an
//! HMAC-SHA256 over its canonical JSON, made with the archive key. The key is derived from the
//! target's secret access key (the operator's credentials) unless a signing key file is given,
//! so whoever can read an archive with the target's credentials can check it, and a manifest
//! forged or altered by anyone without the key is refused by verify and restore.
//!
//! The MAC covers the object serialised with `mac` absent; `key_id` (inside what is covered)
//! names the key, so an archive signed with another key is named as foreign rather than
//! "altered".

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::hex;

type HmacSha256 = Hmac<Sha256>;

/// The key archive objects are signed with. `Debug` never shows it.
#[derive(Clone)]
pub struct ArchiveKey {
    key: [u8; 32],
    id: String,
}

impl std::fmt::Debug for ArchiveKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveKey").field("id", &self.id).finish_non_exhaustive()
    }
}

/// Why an archive object's signature was not accepted.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SealError {
    #[error("not signed (written without an archive key, or the signature was removed)")]
    Unsigned,
    #[error("signed with another archive key (key id {found}, this key is {expected}): a foreign archive")]
    ForeignKey { found: String, expected: String },
    #[error("signature does not match: the object was altered after it was signed")]
    Mismatch,
}

impl ArchiveKey {
    /// The key derived from secret material (a target's secret access key, or the contents of
    /// a signing key file): `HMAC-SHA256(secret, "cim-archive-key/1")`.
    pub fn derive(secret: &[u8]) -> ArchiveKey {
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
        mac.update(b"cim-archive-key/1");
        let key: [u8; 32] = mac.finalize().into_bytes().into();
        let id = hex(&Sha256::digest([b"cim-archive-key-id/1".as_slice(), &key].concat())[..8]);
        ArchiveKey { key, id }
    }

    /// The key of a target: derived from its signing key file, or else its secret access key.
    pub fn for_target(target: &crate::Target) -> Result<ArchiveKey, crate::TargetError> {
        Ok(ArchiveKey::derive(&target.signing_secret()?))
    }

    /// A short public name of the key (16 hex digits), recorded in every signed object.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn mac(&self, bytes: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(bytes);
        mac
    }

    /// Signs `value` in place: sets its key id, then its MAC over the JSON without the MAC.
    pub fn seal<T: Sealed>(&self, value: &mut T) {
        value.set_seal(Some(self.id.clone()), None);
        let body = serde_json::to_vec(value).expect("archive objects serialise");
        let mac = hex(&self.mac(&body).finalize().into_bytes());
        value.set_seal(Some(self.id.clone()), Some(mac));
    }

    /// Checks `value`'s signature (constant time).
    pub fn check<T: Sealed + Clone>(&self, value: &T) -> Result<(), SealError> {
        let (key_id, mac) = value.seal_fields();
        let (Some(key_id), Some(mac)) = (key_id, mac) else { return Err(SealError::Unsigned) };
        if key_id != self.id {
            return Err(SealError::ForeignKey { found: key_id.to_string(), expected: self.id.clone() });
        }
        let Some(given) = unhex(mac) else { return Err(SealError::Mismatch) };
        let mut bare = value.clone();
        bare.set_seal(Some(key_id.to_string()), None);
        let body = serde_json::to_vec(&bare).expect("archive objects serialise");
        self.mac(&body).verify_slice(&given).map_err(|_| SealError::Mismatch)
    }
}

/// An archive object with a signature: its `key_id` and `mac` fields.
pub trait Sealed: Serialize {
    fn seal_fields(&self) -> (Option<&str>, Option<&str>);
    fn set_seal(&mut self, key_id: Option<String>, mac: Option<String>);
}

/// The bytes of a MAC in the lowercase hex the archive writes, and only that: another spelling
/// of the same bytes (upper case, or a `+` that `from_str_radix` would take) is refused, so no
/// changed byte of a signed object verifies.
fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Serialize)]
    struct Doc {
        value: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        key_id: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        mac: Option<String>,
    }

    impl Sealed for Doc {
        fn seal_fields(&self) -> (Option<&str>, Option<&str>) {
            (self.key_id.as_deref(), self.mac.as_deref())
        }
        fn set_seal(&mut self, key_id: Option<String>, mac: Option<String>) {
            self.key_id = key_id;
            self.mac = mac;
        }
    }

    #[test]
    fn sealed_objects_check_and_tampering_is_named() {
        let key = ArchiveKey::derive(b"secret");
        let mut d = Doc { value: 7, key_id: None, mac: None };
        assert_eq!(key.check(&d), Err(SealError::Unsigned));
        key.seal(&mut d);
        assert_eq!(key.check(&d), Ok(()));
        let mut altered = d.clone();
        altered.value = 8;
        assert_eq!(key.check(&altered), Err(SealError::Mismatch));
        let other = ArchiveKey::derive(b"another secret");
        assert!(matches!(other.check(&d), Err(SealError::ForeignKey { .. })));
        let mut forged = d.clone();
        forged.key_id = Some(other.id().to_string());
        assert!(matches!(key.check(&forged), Err(SealError::ForeignKey { .. })));
        forged.key_id = d.key_id.clone();
        forged.mac = Some("zz".into());
        assert_eq!(key.check(&forged), Err(SealError::Mismatch));
        assert!(!format!("{key:?}").contains("key:"), "the key is never printed");
        assert_eq!(key.id().len(), 16);
    }
}
