//! Content identifiers: CIDv1, codec `raw` (0x55), multihash sha2-256 (0x12, 32 bytes), written
//! in multibase base32 lower-case without padding (prefix `b`), e.g. `bafkrei…` (59 chars).
//!
//! The digest is the SHA-256 of the content bytes, which is also what the JetStream object
//! store records for every object (`SHA-256=<base64url>`), so a CID can be checked against the
//! store's metadata without reading the content, and against the bytes while streaming them.

use std::{fmt, str::FromStr};

use base64::Engine;
use sha2::{Digest, Sha256};

use crate::ContractError;

const CID_VERSION: u8 = 0x01;
const CODEC_RAW: u8 = 0x55;
const MH_SHA2_256: u8 = 0x12;
const DIGEST_LEN: usize = 32;
const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// A content identifier. Ordering and equality are those of the digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cid {
    digest: [u8; DIGEST_LEN],
}

impl Cid {
    pub fn from_sha256(digest: [u8; DIGEST_LEN]) -> Cid {
        Cid { digest }
    }

    /// The CID of `bytes`.
    pub fn of(bytes: &[u8]) -> Cid {
        Cid::from_sha256(Sha256::digest(bytes).into())
    }

    pub fn digest(&self) -> &[u8; DIGEST_LEN] {
        &self.digest
    }

    /// Reads the digest the JetStream object store records, `SHA-256=<base64url>`.
    pub fn from_object_digest(s: &str) -> Result<Cid, ContractError> {
        let bad = |why: &str| ContractError::InvalidCid(format!("object digest {s:?}: {why}"));
        let b64 = s.strip_prefix("SHA-256=").ok_or_else(|| bad("not SHA-256"))?;
        let raw = base64::engine::general_purpose::URL_SAFE
            .decode(b64)
            .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(b64))
            .map_err(|_| bad("not base64url"))?;
        let digest: [u8; DIGEST_LEN] = raw.try_into().map_err(|_| bad("not 32 bytes"))?;
        Ok(Cid::from_sha256(digest))
    }

    /// The object store's spelling of this digest.
    pub fn to_object_digest(&self) -> String {
        format!("SHA-256={}", base64::engine::general_purpose::URL_SAFE.encode(self.digest))
    }

    fn to_bytes(self) -> [u8; 4 + DIGEST_LEN] {
        let mut b = [0u8; 4 + DIGEST_LEN];
        b[..4].copy_from_slice(&[CID_VERSION, CODEC_RAW, MH_SHA2_256, DIGEST_LEN as u8]);
        b[4..].copy_from_slice(&self.digest);
        b
    }
}

/// Streaming hasher that yields the CID of everything fed to it.
#[derive(Clone, Default)]
pub struct CidHasher(Sha256);

impl CidHasher {
    pub fn new() -> CidHasher {
        CidHasher(Sha256::new())
    }
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    pub fn finish(self) -> Cid {
        Cid::from_sha256(self.0.finalize().into())
    }
}

impl fmt::Debug for CidHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CidHasher")
    }
}

impl fmt::Display for Cid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.to_bytes();
        let mut out = String::with_capacity(1 + (bytes.len() * 8).div_ceil(5));
        out.push('b');
        let (mut acc, mut bits) = (0u32, 0u32);
        for &byte in &bytes {
            acc = (acc << 8) | u32::from(byte);
            bits += 8;
            while bits >= 5 {
                bits -= 5;
                out.push(BASE32[((acc >> bits) & 31) as usize] as char);
            }
        }
        if bits > 0 {
            out.push(BASE32[((acc << (5 - bits)) & 31) as usize] as char);
        }
        f.write_str(&out)
    }
}

impl fmt::Debug for Cid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cid({self})")
    }
}

impl FromStr for Cid {
    type Err = ContractError;
    fn from_str(s: &str) -> Result<Cid, ContractError> {
        let bad = |why: &str| ContractError::InvalidCid(format!("{:?}: {why}", s.escape_debug().to_string()));
        let body = s.strip_prefix('b').ok_or_else(|| bad("expected multibase base32 (prefix 'b')"))?;
        let mut bytes = Vec::with_capacity(36);
        let (mut acc, mut bits) = (0u32, 0u32);
        for c in body.bytes() {
            let v = BASE32.iter().position(|&b| b == c).ok_or_else(|| bad("not base32 lower-case"))? as u32;
            acc = (acc << 5) | v;
            bits += 5;
            if bits >= 8 {
                bits -= 8;
                bytes.push((acc >> bits) as u8);
                acc &= (1 << bits) - 1;
            }
        }
        if acc != 0 {
            return Err(bad("trailing bits"));
        }
        match bytes.as_slice() {
            [CID_VERSION, CODEC_RAW, MH_SHA2_256, 32, digest @ ..] if digest.len() == DIGEST_LEN => {
                let mut d = [0u8; DIGEST_LEN];
                d.copy_from_slice(digest);
                Ok(Cid::from_sha256(d))
            }
            [CID_VERSION, ..] => Err(bad("only CIDv1 raw sha2-256 is used by CIM")),
            _ => Err(bad("not a CIDv1")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_cid_of_empty_and_hello() {
        // Cross-checked with `ipfs add --cid-version 1 --raw-leaves` / multiformats.
        assert_eq!(Cid::of(b"").to_string(), "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku");
        assert_eq!(Cid::of(b"hello world").to_string(), "bafkreifzjut3te2nhyekklss27nh3k72ysco7y32koao5eei66wof36n5e");
    }

    #[test]
    fn round_trips_and_streams() {
        let c = Cid::of(b"some content");
        assert_eq!(c.to_string().parse::<Cid>().unwrap(), c);
        let mut h = CidHasher::new();
        h.update(b"some ");
        h.update(b"content");
        assert_eq!(h.finish(), c);
        assert_eq!(Cid::from_object_digest(&c.to_object_digest()).unwrap(), c);
    }

    #[test]
    fn rejects_what_is_not_a_cim_cid() {
        for bad in ["", "b", "Bafk", "zabc", "bafkrei!", "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"] {
            assert!(bad.parse::<Cid>().is_err(), "{bad}");
        }
        // a dag-pb CIDv1 (codec 0x70) is a CID but not ours
        let mut s = Cid::of(b"x").to_string();
        s.replace_range(0..4, "bafy");
        assert!(s.parse::<Cid>().is_err());
        assert!(Cid::from_object_digest("MD5=abc").is_err());
        assert!(Cid::from_object_digest("SHA-256=AAAA").is_err());
    }
}
