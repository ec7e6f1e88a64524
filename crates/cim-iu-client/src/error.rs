//! What a call to the information-unit service can fail with.

use async_nats::{
    HeaderMap,
    service::{NATS_SERVICE_ERROR, NATS_SERVICE_ERROR_CODE},
};

/// Errors of [`crate::IuClient`]. Service error replies (`Nats-Service-Error-Code`) map to
/// `BadRequest` (400), `NotFound` (404), `Conflict` (409), `Unavailable` (503) and `Internal`
/// (500 and anything else); transport problems to `Timeout`, `Unavailable` (no responders) and
/// `Nats`.
#[derive(Debug, thiserror::Error)]
pub enum IuError {
    /// The request was refused: invalid input, failed validation, unknown unit type, …
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The unit, type, content or upload does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// Optimistic concurrency failed: the expected version is stale.
    #[error("conflict: {0}")]
    Conflict(String),
    /// Nobody answered (no responders) or the service said 503; worth retrying later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The request got no reply in time (it may or may not have been carried out).
    #[error("timed out: {0}")]
    Timeout(String),
    /// The service failed (500, or an error code this client does not know).
    #[error("service error: {0}")]
    Internal(String),
    /// Bytes read for a CID do not match it. The corruption has been reported to the service.
    #[error("content {cid} is corrupt: {detail}")]
    Corrupt { cid: String, detail: String },
    /// A NATS or JetStream operation failed.
    #[error("nats: {0}")]
    Nats(String),
    /// Reading or writing local data failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A reply did not decode as the expected protobuf message.
    #[error("undecodable reply: {0}")]
    Decode(prost::DecodeError),
}

impl From<prost::DecodeError> for IuError {
    fn from(e: prost::DecodeError) -> IuError {
        IuError::Decode(e)
    }
}

impl IuError {
    pub fn is_bad_request(&self) -> bool {
        matches!(self, IuError::BadRequest(_))
    }
    pub fn is_not_found(&self) -> bool {
        matches!(self, IuError::NotFound(_))
    }
    pub fn is_conflict(&self) -> bool {
        matches!(self, IuError::Conflict(_))
    }
    pub fn is_unavailable(&self) -> bool {
        matches!(self, IuError::Unavailable(_))
    }
    pub fn is_timeout(&self) -> bool {
        matches!(self, IuError::Timeout(_))
    }
    /// Worth trying again later: the service or NATS did not answer, said 503, or a JetStream
    /// operation failed (a server restarting, a cluster electing a leader). Never an answer
    /// about the request itself.
    pub fn is_transient(&self) -> bool {
        matches!(self, IuError::Unavailable(_) | IuError::Timeout(_) | IuError::Nats(_))
    }
    pub fn is_corrupt(&self) -> bool {
        matches!(self, IuError::Corrupt { .. })
    }

    /// The service error code this error stands for (as in `Nats-Service-Error-Code`).
    pub fn code(&self) -> Option<u16> {
        match self {
            IuError::BadRequest(_) => Some(400),
            IuError::NotFound(_) => Some(404),
            IuError::Conflict(_) => Some(409),
            IuError::Unavailable(_) => Some(503),
            IuError::Internal(_) => Some(500),
            _ => None,
        }
    }

    /// The service error a reply carries in its headers, if any.
    pub fn from_reply_headers(headers: Option<&HeaderMap>) -> Option<IuError> {
        let headers = headers?;
        let code = headers.get(NATS_SERVICE_ERROR_CODE)?.as_str().trim().to_string();
        let message = headers
            .get(NATS_SERVICE_ERROR)
            .map(|v| v.as_str().to_string())
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| format!("error code {code}"));
        Some(IuError::from_code(&code, message))
    }

    /// Maps a service error code and its message.
    pub fn from_code(code: &str, message: String) -> IuError {
        match code.parse::<u16>() {
            Ok(400) | Ok(422) => IuError::BadRequest(message),
            Ok(404) => IuError::NotFound(message),
            Ok(409) | Ok(412) => IuError::Conflict(message),
            Ok(503) => IuError::Unavailable(message),
            Ok(500) => IuError::Internal(message),
            Ok(c) if (400..500).contains(&c) => IuError::BadRequest(format!("{message} (code {c})")),
            _ => IuError::Internal(format!("{message} (code {code})")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_headers_map_to_variants() {
        let mut h = HeaderMap::new();
        assert!(IuError::from_reply_headers(Some(&h)).is_none());
        assert!(IuError::from_reply_headers(None).is_none());
        h.insert(NATS_SERVICE_ERROR_CODE, "409");
        h.insert(NATS_SERVICE_ERROR, "expected version 3, unit is at 4");
        let e = IuError::from_reply_headers(Some(&h)).unwrap();
        assert!(e.is_conflict());
        assert_eq!(e.to_string(), "conflict: expected version 3, unit is at 4");
        assert!(IuError::from_code("400", "x".into()).is_bad_request());
        assert!(IuError::from_code("404", "x".into()).is_not_found());
        assert!(IuError::from_code("503", "x".into()).is_unavailable());
        assert!(matches!(IuError::from_code("500", "x".into()), IuError::Internal(_)));
        assert!(IuError::from_code("413", "x".into()).is_bad_request());
        assert!(matches!(IuError::from_code("abc", "x".into()), IuError::Internal(_)));
        assert_eq!(IuError::from_code("404", "x".into()).code(), Some(404));
    }
}
