//! Names of the information-unit contract: aggregates, actions, endpoints and KV keys. The
//! payloads are in `proto/cim/iu/v1/iu.proto`.

use std::time::Duration;

use crate::{Component, ContractError, subject};

const C: Component = Component::InformationUnit;

/// Aggregates whose events live in `CIM_IU_EVENTS`.
pub const UNIT: &str = "unit";
pub const TYPE: &str = "type";
pub const CONTENT: &str = "content";

/// Event actions (last subject token).
pub mod action {
    pub const CREATED: &str = "created";
    pub const VERSIONED: &str = "versioned";
    pub const TAGGED: &str = "tagged";
    pub const UNTAGGED: &str = "untagged";
    pub const ATTRIBUTES_SET: &str = "attributes_set";
    pub const LINKED: &str = "linked";
    pub const UNLINKED: &str = "unlinked";
    pub const DELETED: &str = "deleted";
    pub const REGISTERED: &str = "registered";
    pub const STORED: &str = "stored";
    pub const CORRUPTED: &str = "corrupted";
    pub const COLLECTED: &str = "collected";
}

/// Command endpoints (`cim.cmd.iu.<name>`).
pub mod cmd {
    pub const COMMIT: &str = "commit";
    pub const CREATE: &str = "create";
    pub const NEW_VERSION: &str = "new_version";
    pub const TAG: &str = "tag";
    pub const UNTAG: &str = "untag";
    pub const SET_ATTRIBUTES: &str = "set_attributes";
    pub const LINK: &str = "link";
    pub const UNLINK: &str = "unlink";
    pub const DELETE: &str = "delete";
    pub const REGISTER_TYPE: &str = "register_type";
    pub const REBUILD: &str = "rebuild";
    pub const REPORT_CORRUPT: &str = "report_corrupt";
    pub const ALL: [&str; 12] = [
        COMMIT,
        CREATE,
        NEW_VERSION,
        TAG,
        UNTAG,
        SET_ATTRIBUTES,
        LINK,
        UNLINK,
        DELETE,
        REGISTER_TYPE,
        REBUILD,
        REPORT_CORRUPT,
    ];
}

/// Query endpoints (`cim.qry.iu.<name>`).
pub mod qry {
    pub const GET: &str = "get";
    pub const HISTORY: &str = "history";
    pub const LIST: &str = "list";
    pub const LINKS: &str = "links";
    pub const TYPE: &str = "type";
    pub const STATUS: &str = "status";
    pub const VALIDATE: &str = "validate";
    pub const ALL: [&str; 7] = [GET, HISTORY, LIST, LINKS, TYPE, STATUS, VALIDATE];
}

/// KV bucket purposes (`cim_iu_<purpose>`).
pub const KV_UNITS: &str = "units";
pub const KV_TYPES: &str = "types";
pub const KV_REQUESTS: &str = "requests";
/// How long a command's result is remembered for idempotent retries: always. The request
/// index is a projection of the unit stream (each event's `Nats-Msg-Id` is its command's
/// request id), so it is rebuilt with the others and answers a retry after any horizon.
pub const REQUEST_MEMORY: Duration = Duration::ZERO;

/// Object store bucket of unit content.
pub const CONTENT_BUCKET: &str = "cim_iu_content";
/// Prefix of in-progress uploads in the content bucket: `upload.<uuid>`.
pub const UPLOAD_PREFIX: &str = "upload.";

/// Durable consumer that keeps the KV projections current.
pub fn projector_consumer() -> String {
    format!("{}-projector", C.token())
}

/// KV key of a unit's state.
pub fn unit_key(unit_id: &str) -> Result<String, ContractError> {
    crate::token::validate_token("unit id", unit_id)?;
    Ok(format!("u.{unit_id}"))
}

/// KV key of a unit type.
pub fn type_key(name: &str) -> Result<String, ContractError> {
    crate::token::validate_name("unit type", name)?;
    Ok(format!("t.{name}"))
}

/// KV key of a command result.
pub fn request_key(request_id: &str) -> Result<String, ContractError> {
    crate::token::validate_name("request id", request_id)?;
    Ok(format!("r.{request_id}"))
}

/// KV key of the projection checkpoint (last applied stream sequence).
pub const CHECKPOINT_KEY: &str = "checkpoint";
/// Filter of every unit-state key.
pub const UNIT_KEYS: &str = "u.>";

pub fn unit_event(unit_id: &str, action: &str) -> Result<String, ContractError> {
    subject::event(C, UNIT, unit_id, action)
}

pub fn unit_history(unit_id: &str) -> Result<String, ContractError> {
    subject::aggregate_filter(C, UNIT, unit_id)
}

pub fn type_event(name: &str, action: &str) -> Result<String, ContractError> {
    subject::event(C, TYPE, name, action)
}

pub fn type_history(name: &str) -> Result<String, ContractError> {
    subject::aggregate_filter(C, TYPE, name)
}

pub fn content_event(object: &str, action: &str) -> Result<String, ContractError> {
    subject::event(C, CONTENT, object, action)
}

pub fn command(name: &str) -> Result<String, ContractError> {
    subject::command(C, name)
}

pub fn query(name: &str) -> Result<String, ContractError> {
    subject::query(C, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_valid() {
        assert_eq!(unit_event("u1", action::CREATED).unwrap(), "cim.evt.iu.unit.u1.created");
        assert_eq!(unit_history("u1").unwrap(), "cim.evt.iu.unit.u1.*");
        assert_eq!(command(cmd::CREATE).unwrap(), "cim.cmd.iu.create");
        for c in cmd::ALL {
            command(c).unwrap();
        }
        for q in qry::ALL {
            query(q).unwrap();
        }
        assert_eq!(unit_key("abc").unwrap(), "u.abc");
        assert!(unit_key("a.b").is_err());
        assert!(type_key("has space").is_err());
        assert!(request_key("r/1").is_err());
        assert_eq!(projector_consumer(), "iu-projector");
    }
}
