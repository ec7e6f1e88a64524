//! Names of the storage-manager contract: the archive watermarks that the retention guard
//! reads before anything is removed from an archived stream.
//!
//! The storage manager re-reads every committed archive segment from S3 and checks it (sizes,
//! both SHA-256, records) before it counts it as verified. It keeps, in the KV bucket
//! `cim_storage_archive`:
//! - `target.<STREAM>.<target>`: through which stream sequence `STREAM` is archived *and*
//!   verified on that one target;
//! - `verified.<STREAM>`: the smallest of those over the *required* targets — the
//!   sequence through which a message of `STREAM` may be removed from JetStream.
//!
//! A service that removes messages from an archived stream (the information unit's content
//! collection, the plugin host's removal of a module) removes nothing above
//! `verified.<STREAM>`, and nothing at all while the key is missing.

use serde::{Deserialize, Serialize};

use crate::{ContractError, token};

/// Purpose of the watermark bucket (`cim_storage_archive`).
pub const KV_ARCHIVE: &str = "archive";

/// Format tag of a watermark value.
pub const WATERMARK_FORMAT: &str = "cim-archive-watermark/1";

/// A watermark value (JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    pub format: String,
    pub stream: String,
    /// Every message of `stream` with a sequence at or below this one is archived and was
    /// read back and checked (on one target, or on every required target).
    pub verified_seq: u64,
    /// The target (for `target.*` keys) or the required targets (for `verified.*`).
    pub targets: Vec<String>,
    pub updated_unix_nanos: i64,
}

impl Watermark {
    pub fn new(stream: &str, verified_seq: u64, targets: Vec<String>) -> Watermark {
        Watermark {
            format: WATERMARK_FORMAT.to_string(),
            stream: stream.to_string(),
            verified_seq,
            targets,
            updated_unix_nanos: time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64,
        }
    }
}

/// `verified.<STREAM>`: the removal watermark of a stream (over the required targets).
pub fn verified_key(stream: &str) -> Result<String, ContractError> {
    token::validate_name("stream", stream)?;
    Ok(format!("verified.{stream}"))
}

/// `target.<STREAM>.<target>`: how far one target's archive of a stream is verified.
pub fn target_key(stream: &str, target: &str) -> Result<String, ContractError> {
    token::validate_name("stream", stream)?;
    token::validate_name("archive target", target)?;
    Ok(format!("target.{stream}.{target}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert_eq!(verified_key("OBJ_cim_iu_content").unwrap(), "verified.OBJ_cim_iu_content");
        assert_eq!(target_key("CIM_IU_EVENTS", "nas").unwrap(), "target.CIM_IU_EVENTS.nas");
        assert!(verified_key("a.b").is_err());
        assert!(target_key("CIM_IU_EVENTS", "n*s").is_err());
        let w = Watermark::new("S", 7, vec!["nas".into()]);
        let back: Watermark = serde_json::from_slice(&serde_json::to_vec(&w).unwrap()).unwrap();
        assert_eq!(back, w);
    }
}
