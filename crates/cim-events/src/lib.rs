//! `cim-events`: the contract every CIM service shares and nothing else defines.
//!
//! - [`subject`]: the subject scheme and its builders,
//! - [`resources`]: stream, consumer and bucket names and their configurations per [`Tier`],
//! - [`envelope`]: the CloudEvents-based envelope carried in NATS headers,
//! - [`payload`]: protobuf payloads with schema versions and upcasting,
//! - [`reference`]: the generated human-readable reference (`docs/SUBJECTS.md`).
//!
//! No other crate spells a subject, stream, consumer or bucket name as a literal.

pub mod cid;
pub mod envelope;
pub mod gateway;
pub mod hub;
pub mod iu;
pub mod payload;
pub mod pipeline;
pub mod plugin;
#[cfg(test)]
mod props;
pub mod reference;
pub mod registry;
pub mod resources;
pub mod storage;
pub mod subject;
pub mod token;

pub use cid::Cid;
pub use envelope::{Envelope, Schema};
pub use payload::{Payload, Upcasters};
pub use resources::Tier;
pub use subject::Component;

/// Version of this contract; services announce the version they speak.
pub const CONTRACT_VERSION: u32 = 1;

/// Generated protobuf types (from `proto/`).
pub mod proto {
    pub mod runtime {
        #![allow(missing_docs, clippy::all)]
        include!(concat!(env!("OUT_DIR"), "/cim.runtime.v1.rs"));
    }
    pub mod iu {
        #![allow(missing_docs, clippy::all)]
        include!(concat!(env!("OUT_DIR"), "/cim.iu.v1.rs"));
    }
    pub mod registry {
        #![allow(missing_docs, clippy::all)]
        include!(concat!(env!("OUT_DIR"), "/cim.registry.v1.rs"));
    }
    pub mod plugin {
        #![allow(missing_docs, clippy::all)]
        include!(concat!(env!("OUT_DIR"), "/cim.plugin.v1.rs"));
    }
    pub mod hub {
        #![allow(missing_docs, clippy::all)]
        include!(concat!(env!("OUT_DIR"), "/cim.hub.v1.rs"));
    }
    pub mod pipeline {
        #![allow(missing_docs, clippy::all)]
        include!(concat!(env!("OUT_DIR"), "/cim.pipeline.v1.rs"));
    }
}

/// Everything the contract can refuse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ContractError {
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidToken { what: &'static str, value: String, reason: &'static str },
    #[error("invalid subject {subject:?}: {reason}")]
    InvalidSubject { subject: String, reason: &'static str },
    #[error("unknown component {0:?}")]
    UnknownComponent(String),
    #[error("unknown tier {0:?} (expected leaf or cluster)")]
    UnknownTier(String),
    #[error("invalid CID {0}")]
    InvalidCid(String),
    #[error("invalid envelope: {0}")]
    InvalidEnvelope(String),
    #[error("expected payload type {expected}, found {found}")]
    WrongType { expected: &'static str, found: String },
    #[error("payload {name} has schema version {version}, newer than the {known} this build knows")]
    FutureVersion { name: String, version: u32, known: u32 },
    #[error("no upcaster for {name} version {version}")]
    NoUpcaster { name: String, version: u32 },
    #[error("payload {name} does not decode: {reason}")]
    Undecodable { name: &'static str, reason: String },
}
