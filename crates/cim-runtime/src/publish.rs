//! Recording an event in JetStream, the one way every service does it: the envelope in
//! headers, an optional `Nats-Msg-Id` (de-duplication of retries), the aggregate's expected
//! last sequence (optimistic concurrency), the current trace context, and one error type.

use async_nats::{
    HeaderMap,
    jetstream::{self, context::PublishErrorKind, publish::PublishAck},
};
use bytes::Bytes;
use cim_events::{Envelope, envelope::H_MSG_ID};

use crate::{endpoint::ServiceError, telemetry};

/// Why an event was not recorded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// Someone else wrote to the aggregate first: its last sequence is not the one expected.
    #[error("the aggregate changed concurrently")]
    Conflict,
    /// JetStream did not store it (unreachable, timed out, refused); a retry may help.
    #[error("recording the event: {0}")]
    Failed(String),
}

impl From<PublishError> for ServiceError {
    fn from(e: PublishError) -> ServiceError {
        match e {
            PublishError::Conflict => ServiceError::conflict("changed concurrently; read it again and retry"),
            PublishError::Failed(m) => ServiceError::unavailable(format!("recording the event: {m}")),
        }
    }
}

/// One event about to be recorded.
#[derive(Debug)]
pub struct NewEvent {
    subject: String,
    headers: HeaderMap,
    body: Bytes,
}

impl NewEvent {
    /// An event on `subject` (built by `cim-events`) with `envelope` in its headers.
    pub fn new(subject: String, envelope: &Envelope, body: impl Into<Bytes>) -> NewEvent {
        NewEvent { subject, headers: envelope.to_headers(), body: body.into() }
    }

    /// An event whose headers are already written (an envelope plus headers of the caller's).
    pub fn with_headers(subject: String, headers: HeaderMap, body: impl Into<Bytes>) -> NewEvent {
        NewEvent { subject, headers, body: body.into() }
    }

    /// De-duplicates a retry within the stream's duplicate window.
    pub fn msg_id(mut self, id: &str) -> NewEvent {
        self.headers.insert(H_MSG_ID, id);
        self
    }

    /// Stored only if the last message on `filter` (the aggregate's history) has sequence
    /// `last` (0: the aggregate has no event yet).
    pub fn expect(mut self, filter: &str, last: u64) -> NewEvent {
        cim_events::subject::expect_aggregate_sequence(&mut self.headers, filter, last);
        self
    }

    /// Records the event and waits for JetStream's acknowledgement.
    pub async fn publish(mut self, js: &jetstream::Context) -> Result<PublishAck, PublishError> {
        telemetry::inject_current(&mut self.headers);
        js.publish_with_headers(self.subject, self.headers, self.body)
            .await
            .map_err(|e| PublishError::Failed(e.to_string()))?
            .await
            .map_err(|e| match e.kind() {
                PublishErrorKind::WrongLastSequence => PublishError::Conflict,
                _ => PublishError::Failed(e.to_string()),
            })
    }
}
