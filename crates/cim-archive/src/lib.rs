//! The CIM S3 archive as a library: the open format of docs/storage-manager.md
//! ([`format`](mod@format)), the S3 client ([`s3`]) and the targets it talks to ([`target`]),
//! what is archived and how far ([`catalog`]), and reading an archive back: verify and restore
//! ([`restore`]).
//!
//! The storage-manager service writes archives with it; `cimctl restore` / `cimctl archive`
//! read them; the integration hub's S3 import lists and fetches objects with its client.
//! Everything that speaks HTTP to S3 is inside [`s3`] (aws-sdk-s3).

pub mod catalog;
pub mod format;
#[cfg(test)]
mod props;
pub mod restore;
pub mod s3;
pub mod seal;
pub mod target;

pub use catalog::{Position, archived_streams, archived_through, committed_position, mirror_streams, mirrored_stream};
pub use s3::{S3Client, S3Error};
pub use seal::{ArchiveKey, SealError};
pub use target::{CredentialSource, Credentials, Target, TargetError};

/// Lowercase hex of `bytes` (SHA-256 digests in manifests and signatures).
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
