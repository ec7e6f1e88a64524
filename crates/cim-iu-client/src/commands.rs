//! Commands: every information-unit command with a request id filled in and retried with
//! that same id, so a retry never writes twice; the projection rebuild.

use cim_events::{
    iu,
    proto::iu::{
        CommandHeader, CommandResult, CreateUnit, DeleteUnit, LinkUnit, NewVersion, Rebuild, RebuildStarted,
        RegisterType, SetAttributes, TagUnit, UnlinkUnit, UntagUnit,
    },
};
use prost::Message;

use crate::{IuClient, IuError, Retry};

/// A command of the information-unit service: it has an endpoint and a [`CommandHeader`].
pub trait IuCommand: Message + Default + Send + Sync {
    /// The endpoint name (`iu::cmd::*`).
    const ENDPOINT: &'static str;
    fn header_mut(&mut self) -> &mut Option<CommandHeader>;
}

macro_rules! iu_command {
    ($($t:ty => $endpoint:expr),* $(,)?) => {$(
        impl IuCommand for $t {
            const ENDPOINT: &'static str = $endpoint;
            fn header_mut(&mut self) -> &mut Option<CommandHeader> {
                &mut self.header
            }
        }
    )*};
}

iu_command! {
    CreateUnit => iu::cmd::CREATE,
    NewVersion => iu::cmd::NEW_VERSION,
    TagUnit => iu::cmd::TAG,
    UntagUnit => iu::cmd::UNTAG,
    SetAttributes => iu::cmd::SET_ATTRIBUTES,
    LinkUnit => iu::cmd::LINK,
    UnlinkUnit => iu::cmd::UNLINK,
    DeleteUnit => iu::cmd::DELETE,
    RegisterType => iu::cmd::REGISTER_TYPE,
}

/// A command header with an expected version (0 = don't check) and a request id to be filled
/// in by the client.
pub fn header(expected_version: u64) -> Option<CommandHeader> {
    Some(CommandHeader { request_id: String::new(), expected_version })
}

/// A command header with the caller's own request id, for retries across processes.
pub fn header_with_id(request_id: impl Into<String>, expected_version: u64) -> Option<CommandHeader> {
    Some(CommandHeader { request_id: request_id.into(), expected_version })
}

impl IuClient {
    /// Sends a command: fills in a fresh UUIDv7 request id when it has none, and retries the
    /// very same request (same id) on timeout, no responders and 503.
    pub async fn execute<C: IuCommand>(&self, command: C) -> Result<CommandResult, IuError> {
        self.execute_with(command, None).await
    }

    /// Like [`IuClient::execute`], on behalf of `parent`: the events the command writes inherit
    /// its correlation id and take its id as causation (provenance of derived work).
    pub async fn execute_caused_by<C: IuCommand>(
        &self,
        command: C,
        parent: &cim_events::Envelope,
    ) -> Result<CommandResult, IuError> {
        self.execute_with(command, Some(parent.to_headers())).await
    }

    async fn execute_with<C: IuCommand>(
        &self,
        mut command: C,
        headers: Option<async_nats::HeaderMap>,
    ) -> Result<CommandResult, IuError> {
        let header = command.header_mut().get_or_insert_with(CommandHeader::default);
        if header.request_id.is_empty() {
            header.request_id = uuid::Uuid::now_v7().to_string();
        }
        let body = command.encode_to_vec();
        let subject = iu::command(C::ENDPOINT).map_err(|e| IuError::Internal(e.to_string()))?;
        let msg = self.call_with(&subject, headers, body.into(), self.timeout, Retry::Idempotent).await?;
        let result = CommandResult::decode(msg.payload)?;
        self.saw(result.sequence);
        Ok(result)
    }

    pub async fn create(&self, command: CreateUnit) -> Result<CommandResult, IuError> {
        self.execute(command).await
    }
    pub async fn new_version(&self, command: NewVersion) -> Result<CommandResult, IuError> {
        self.execute(command).await
    }
    pub async fn tag(&self, command: TagUnit) -> Result<CommandResult, IuError> {
        self.execute(command).await
    }
    pub async fn untag(&self, command: UntagUnit) -> Result<CommandResult, IuError> {
        self.execute(command).await
    }
    pub async fn set_attributes(&self, command: SetAttributes) -> Result<CommandResult, IuError> {
        self.execute(command).await
    }
    pub async fn link(&self, command: LinkUnit) -> Result<CommandResult, IuError> {
        self.execute(command).await
    }
    pub async fn unlink(&self, command: UnlinkUnit) -> Result<CommandResult, IuError> {
        self.execute(command).await
    }
    pub async fn delete(&self, command: DeleteUnit) -> Result<CommandResult, IuError> {
        self.execute(command).await
    }
    pub async fn register_type(&self, command: RegisterType) -> Result<CommandResult, IuError> {
        self.execute(command).await
    }

    /// Asks the service to drop its projections and rebuild them by replay.
    pub async fn rebuild(&self) -> Result<RebuildStarted, IuError> {
        let body = Rebuild {}.encode_to_vec();
        self.call(iu::command(iu::cmd::REBUILD), body.into(), self.timeout, Retry::NotProcessed).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_have_endpoints_and_headers() {
        let mut c = TagUnit { header: header(3), unit_id: "u".into(), tags: vec!["t".into()] };
        assert_eq!(<TagUnit as IuCommand>::ENDPOINT, iu::cmd::TAG);
        assert_eq!(c.header_mut().as_ref().unwrap().expected_version, 3);
        assert_eq!(header_with_id("r1", 0).unwrap().request_id, "r1");
        for e in [CreateUnit::ENDPOINT, NewVersion::ENDPOINT, DeleteUnit::ENDPOINT, RegisterType::ENDPOINT] {
            iu::command(e).unwrap();
        }
    }
}
