//! Protobuf payloads: their type names and schema versions, and the upcasting path that lets
//! today's code read events written by older versions.

use std::collections::HashMap;

use async_nats::HeaderMap;
use bytes::Bytes;
use prost::Message;

use crate::{
    ContractError,
    envelope::{Envelope, Schema},
    proto::runtime::{
        DescribeReply, DrainRequested, ServiceAnnounced, ServiceAnnouncedV1, ServiceDrained, ServiceHeartbeat,
        ServiceStopped,
    },
};

/// A protobuf message that travels as a CIM payload.
pub trait Payload: Message + Default {
    /// The `ce-type` / schema name, e.g. `cim.runtime.service.announced`.
    const TYPE: &'static str;
    /// Current schema version; older versions are upcast to it on read.
    const SCHEMA_VERSION: u32;
}

macro_rules! payload {
    ($t:ty, $name:literal, $version:literal) => {
        impl Payload for $t {
            const TYPE: &'static str = $name;
            const SCHEMA_VERSION: u32 = $version;
        }
    };
}

payload!(ServiceAnnounced, "cim.runtime.service.announced", 2);
payload!(ServiceHeartbeat, "cim.runtime.service.heartbeat", 1);
payload!(ServiceStopped, "cim.runtime.service.stopped", 1);
payload!(DescribeReply, "cim.runtime.describe.reply", 1);
payload!(ServiceDrained, "cim.runtime.service.drained", 1);
payload!(DrainRequested, "cim.runtime.drain.requested", 1);

use crate::proto::registry as reg;
payload!(reg::InstanceRegistered, "cim.registry.instance.registered", 1);
payload!(reg::InstanceDrained, "cim.registry.instance.drained", 1);
payload!(reg::InstanceStopped, "cim.registry.instance.stopped", 1);
payload!(reg::InstanceLost, "cim.registry.instance.lost", 1);
payload!(reg::InstanceDuplicated, "cim.registry.instance.duplicated", 1);
payload!(reg::NodeEnrolled, "cim.registry.node.enrolled", 1);
payload!(reg::NodeStateChanged, "cim.registry.node.state_changed", 1);
payload!(reg::DesiredSet, "cim.registry.desired.set", 1);

use crate::proto::iu;
payload!(iu::UnitCreated, "cim.iu.unit.created", 1);
payload!(iu::UnitVersioned, "cim.iu.unit.versioned", 1);
payload!(iu::UnitTagged, "cim.iu.unit.tagged", 1);
payload!(iu::UnitUntagged, "cim.iu.unit.untagged", 1);
payload!(iu::UnitAttributesSet, "cim.iu.unit.attributes_set", 1);
payload!(iu::UnitLinked, "cim.iu.unit.linked", 1);
payload!(iu::UnitUnlinked, "cim.iu.unit.unlinked", 1);
payload!(iu::UnitDeleted, "cim.iu.unit.deleted", 1);
payload!(iu::UnitTypeRegistered, "cim.iu.type.registered", 1);
payload!(iu::ContentStored, "cim.iu.content.stored", 1);
payload!(iu::ContentCorrupted, "cim.iu.content.corrupted", 1);
payload!(iu::ContentCollected, "cim.iu.content.collected", 1);

use crate::proto::plugin;
payload!(plugin::PluginPushed, "cim.plugin.plugin.pushed", 1);
payload!(plugin::PluginRemoved, "cim.plugin.plugin.removed", 1);
payload!(plugin::PluginAnnounced, "cim.plugin.announced", 1);
payload!(plugin::InvokeRequest, "cim.plugin.invoke.request", 1);
payload!(plugin::InvokeReply, "cim.plugin.invoke.reply", 1);
payload!(crate::proto::hub::WebhookReceived, "cim.hub.webhook.received", 1);
payload!(crate::proto::hub::DeliveryRecorded, "cim.hub.delivery.recorded", 1);
payload!(crate::proto::hub::SubscriptionStateChanged, "cim.hub.subscription.state_changed", 1);
payload!(crate::proto::hub::TableChanged, "cim.hub.sql.changed", 1);
payload!(crate::proto::hub::MqttReceived, "cim.hub.mqtt.received", 1);
payload!(crate::proto::hub::S3ObjectImported, "cim.hub.s3.imported", 1);

use crate::proto::pipeline as pl;
payload!(pl::PipelineApplied, "cim.pipeline.pipeline.applied", 1);
payload!(pl::PipelineRemoved, "cim.pipeline.pipeline.removed", 1);
payload!(pl::RunRequested, "cim.pipeline.run.requested", 1);
payload!(pl::RunStarted, "cim.pipeline.run.started", 1);
payload!(pl::StepStarted, "cim.pipeline.run.step_started", 1);
payload!(pl::StepCompleted, "cim.pipeline.run.step_completed", 1);
payload!(pl::StepWaiting, "cim.pipeline.run.step_waiting", 1);
payload!(pl::StepFailed, "cim.pipeline.run.step_failed", 1);
payload!(pl::RunEmitted, "cim.pipeline.run.emitted", 1);
payload!(pl::RunCompleted, "cim.pipeline.run.completed", 1);
payload!(pl::RunFailed, "cim.pipeline.run.failed", 1);
payload!(pl::RunCancelled, "cim.pipeline.run.cancelled", 1);
payload!(pl::RunRetried, "cim.pipeline.run.retried", 1);

/// One step of an upcasting path: bytes of `(type, version)` to bytes of `version + 1`.
pub type UpcastFn = fn(&[u8]) -> Result<Vec<u8>, ContractError>;

/// The known upcasting steps, keyed by type name and the version they read.
#[derive(Clone)]
pub struct Upcasters {
    steps: HashMap<(&'static str, u32), UpcastFn>,
}

impl std::fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.steps.keys()).finish()
    }
}

impl Default for Upcasters {
    /// Every upcasting step the contract ships.
    fn default() -> Self {
        let mut u = Upcasters::empty();
        u.register(ServiceAnnounced::TYPE, 1, announced_v1_to_v2);
        u
    }
}

impl Upcasters {
    pub fn empty() -> Upcasters {
        Upcasters { steps: HashMap::new() }
    }

    /// Adds the step that reads version `from` of `type_name` and writes version `from + 1`.
    pub fn register(&mut self, type_name: &'static str, from: u32, step: UpcastFn) {
        self.steps.insert((type_name, from), step);
    }

    /// Decodes `data` written with `schema` into the current version of `P`, upcasting one
    /// version at a time. A future version, a missing step or bytes that do not decode are
    /// errors that name the type and version.
    pub fn decode<P: Payload>(&self, schema: &Schema, data: &[u8]) -> Result<P, ContractError> {
        if schema.name != P::TYPE {
            return Err(ContractError::WrongType { expected: P::TYPE, found: schema.name.clone() });
        }
        if schema.version > P::SCHEMA_VERSION {
            return Err(ContractError::FutureVersion {
                name: schema.name.clone(),
                version: schema.version,
                known: P::SCHEMA_VERSION,
            });
        }
        let mut bytes = std::borrow::Cow::Borrowed(data);
        for v in schema.version..P::SCHEMA_VERSION {
            let step = self
                .steps
                .get(&(P::TYPE, v))
                .ok_or_else(|| ContractError::NoUpcaster { name: schema.name.clone(), version: v })?;
            bytes = std::borrow::Cow::Owned(step(&bytes)?);
        }
        P::decode(bytes.as_ref()).map_err(|e| ContractError::Undecodable { name: P::TYPE, reason: e.to_string() })
    }
}

/// Encodes a payload with its envelope into NATS headers and body.
pub fn encode<P: Payload>(envelope: &Envelope, payload: &P) -> (HeaderMap, Bytes) {
    (envelope.to_headers(), Bytes::from(payload.encode_to_vec()))
}

/// Reads a message: its envelope (checked) and its payload (upcast to the current version).
pub fn decode<P: Payload>(
    headers: Option<&HeaderMap>,
    body: &[u8],
    upcasters: &Upcasters,
) -> Result<(Envelope, P), ContractError> {
    let headers = headers.ok_or_else(|| ContractError::InvalidEnvelope("message has no headers".to_string()))?;
    let envelope = Envelope::from_headers(headers)?;
    let payload = upcasters.decode::<P>(&envelope.schema, body)?;
    Ok((envelope, payload))
}

/// v1 had only name, version and instance; v2 adds the component, node and capabilities.
/// The component is derived from the service name; unknown facts stay empty.
fn announced_v1_to_v2(bytes: &[u8]) -> Result<Vec<u8>, ContractError> {
    let old = ServiceAnnouncedV1::decode(bytes)
        .map_err(|e| ContractError::Undecodable { name: "cim.runtime.service.announced v1", reason: e.to_string() })?;
    let component = crate::Component::parse(&old.name).map(|c| c.token().to_string()).unwrap_or_default();
    Ok(ServiceAnnounced {
        component,
        service: old.name,
        version: old.version,
        instance_id: old.instance,
        contract_version: 1,
        ..Default::default()
    }
    .encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v1_schema() -> Schema {
        Schema { name: ServiceAnnounced::TYPE.into(), version: 1 }
    }

    #[test]
    fn current_version_decodes_directly() {
        let msg = ServiceHeartbeat {
            component: "iu".into(),
            instance_id: "i".into(),
            uptime_ms: 5,
            ready: true,
            in_flight: 0,
            ..Default::default()
        };
        let env = Envelope::root::<ServiceHeartbeat>("/x");
        let (h, body) = encode(&env, &msg);
        let (back_env, back) = decode::<ServiceHeartbeat>(Some(&h), &body, &Upcasters::default()).unwrap();
        assert_eq!(back, msg);
        assert_eq!(back_env, env);
    }

    #[test]
    fn old_announcements_are_upcast() {
        let v1 =
            ServiceAnnouncedV1 { name: "information-unit".into(), version: "0.1.0".into(), instance: "i-7".into() };
        let v2: ServiceAnnounced = Upcasters::default().decode(&v1_schema(), &v1.encode_to_vec()).unwrap();
        assert_eq!(v2.component, "iu");
        assert_eq!(v2.service, "information-unit");
        assert_eq!(v2.instance_id, "i-7");
        assert_eq!(v2.version, "0.1.0");
        assert_eq!(v2.contract_version, 1);
        assert!(v2.node.is_empty());
    }

    #[test]
    fn missing_steps_future_versions_and_garbage_are_errors() {
        let v1 = ServiceAnnouncedV1 { name: "x".into(), ..Default::default() }.encode_to_vec();
        let err = Upcasters::empty().decode::<ServiceAnnounced>(&v1_schema(), &v1).unwrap_err();
        assert!(matches!(err, ContractError::NoUpcaster { version: 1, .. }), "{err}");

        let future = Schema { name: ServiceAnnounced::TYPE.into(), version: 9 };
        let err = Upcasters::default().decode::<ServiceAnnounced>(&future, &[]).unwrap_err();
        assert!(err.to_string().contains("version 9"), "{err}");

        let wrong = Schema { name: "cim.other".into(), version: 1 };
        assert!(matches!(
            Upcasters::default().decode::<ServiceAnnounced>(&wrong, &[]),
            Err(ContractError::WrongType { .. })
        ));

        let current = Schema::of::<ServiceAnnounced>();
        let err = Upcasters::default().decode::<ServiceAnnounced>(&current, &[0xff, 0xff, 0xff]).unwrap_err();
        assert!(matches!(err, ContractError::Undecodable { .. }), "{err}");

        assert!(decode::<ServiceAnnounced>(None, &[], &Upcasters::default()).is_err());
    }
}
