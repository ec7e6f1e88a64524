//! The subject scheme: every NATS subject CIM uses is built here and nowhere else.
//!
//! ```text
//! cim.evt.<component>.<aggregate>.<id>.<action>   events, stored in the component's event stream
//! cim.cmd.<component>.<action>                    commands (request/reply, queue group)
//! cim.qry.<component>.<query>                     queries (request/reply, queue group)
//! cim.svc.<component>.<instance>.<lifecycle>      announce / heartbeat / goodbye (core NATS)
//! cim.dlq.<component>.<origin>                    dead letters, stored with their reason
//! cim.ctl.<all|node.<node>|instance.<id>>.<action> control of running instances (core NATS)
//! ```
//!
//! An aggregate's events share the prefix `cim.evt.<component>.<aggregate>.<id>`, so the filter
//! `cim.evt.<component>.<aggregate>.<id>.*` names exactly one aggregate's history. Writers use it
//! with `Nats-Expected-Last-Subject-Sequence` + `Nats-Expected-Last-Subject-Sequence-Subject`
//! for per-aggregate optimistic concurrency, and `Nats-Msg-Id` (the envelope id) for
//! exactly-once publishing within the stream's duplicate window.

use std::fmt;

use crate::{ContractError, token::validate_token};

/// First token of every CIM subject.
pub const ROOT: &str = "cim";

/// The seven components. The token is what appears in subjects and resource names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    InformationUnit,
    Registry,
    PipelineEngine,
    PluginHost,
    StorageManager,
    UiGateway,
    IntegrationHub,
}

impl Component {
    pub const ALL: [Component; 7] = [
        Component::InformationUnit,
        Component::Registry,
        Component::PipelineEngine,
        Component::PluginHost,
        Component::StorageManager,
        Component::UiGateway,
        Component::IntegrationHub,
    ];

    /// The subject token (short, lowercase).
    pub const fn token(self) -> &'static str {
        match self {
            Component::InformationUnit => "iu",
            Component::Registry => "registry",
            Component::PipelineEngine => "pipeline",
            Component::PluginHost => "plugin",
            Component::StorageManager => "storage",
            Component::UiGateway => "gateway",
            Component::IntegrationHub => "hub",
        }
    }

    /// The service (crate and binary) name.
    pub const fn service_name(self) -> &'static str {
        match self {
            Component::InformationUnit => "information-unit",
            Component::Registry => "registry",
            Component::PipelineEngine => "pipeline-engine",
            Component::PluginHost => "plugin-host",
            Component::StorageManager => "storage-manager",
            Component::UiGateway => "ui-gateway",
            Component::IntegrationHub => "integration-hub",
        }
    }

    /// Name under which the component registers with the NATS micro services protocol
    /// (`$SRV.PING.<name>` etc.).
    pub fn micro_name(self) -> String {
        format!("cim-{}", self.token())
    }

    /// Resolves a service name or a subject token.
    pub fn parse(s: &str) -> Result<Component, ContractError> {
        Component::ALL
            .into_iter()
            .find(|c| c.token() == s || c.service_name() == s)
            .ok_or_else(|| ContractError::UnknownComponent(s.to_string()))
    }

    /// Upper-case token used in stream names.
    pub(crate) fn upper(self) -> String {
        self.token().to_ascii_uppercase()
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.service_name())
    }
}

/// The kind of message, the second token of every subject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Event,
    Command,
    Query,
    Service,
    DeadLetter,
    Control,
}

impl Kind {
    pub const fn token(self) -> &'static str {
        match self {
            Kind::Event => "evt",
            Kind::Command => "cmd",
            Kind::Query => "qry",
            Kind::Service => "svc",
            Kind::DeadLetter => "dlq",
            Kind::Control => "ctl",
        }
    }
}

/// Lifecycle messages a service instance publishes about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    Announce,
    Heartbeat,
    Goodbye,
    /// The instance finished draining: it takes no new work and holds none.
    Drained,
}

impl Lifecycle {
    pub const ALL: [Lifecycle; 4] = [Lifecycle::Announce, Lifecycle::Heartbeat, Lifecycle::Goodbye, Lifecycle::Drained];

    pub const fn token(self) -> &'static str {
        match self {
            Lifecycle::Announce => "announce",
            Lifecycle::Heartbeat => "heartbeat",
            Lifecycle::Goodbye => "goodbye",
            Lifecycle::Drained => "drained",
        }
    }

    /// Parses the last token of a lifecycle subject.
    pub fn parse(token: &str) -> Option<Lifecycle> {
        Lifecycle::ALL.into_iter().find(|l| l.token() == token)
    }
}

/// What a control message asks of running instances (`cim.ctl.…`, core NATS, no reply).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlAction {
    /// Publish the announcement again (the registry asks after it starts or meets a stranger).
    Announce,
    /// Stop taking new work, finish what is held, report `drained`.
    Drain,
}

impl ControlAction {
    pub const ALL: [ControlAction; 2] = [ControlAction::Announce, ControlAction::Drain];

    pub const fn token(self) -> &'static str {
        match self {
            ControlAction::Announce => "announce",
            ControlAction::Drain => "drain",
        }
    }

    pub fn parse(token: &str) -> Option<ControlAction> {
        ControlAction::ALL.into_iter().find(|a| a.token() == token)
    }
}

/// `cim.ctl.all.<action>`: addressed to every instance of every service.
pub fn control_all(action: ControlAction) -> String {
    join(&[ROOT, Kind::Control.token(), "all", action.token()])
}

/// `cim.ctl.node.<node>.<action>`: addressed to every instance on one node.
pub fn control_node(node: &str, action: ControlAction) -> Result<String, ContractError> {
    validate_token("node", node)?;
    Ok(join(&[ROOT, Kind::Control.token(), "node", node, action.token()]))
}

/// `cim.ctl.instance.<instance>.<action>`: addressed to one instance.
pub fn control_instance(instance: &str, action: ControlAction) -> Result<String, ContractError> {
    validate_token("instance id", instance)?;
    Ok(join(&[ROOT, Kind::Control.token(), "instance", instance, action.token()]))
}

/// The three filters an instance subscribes to for control messages addressed to it.
pub fn control_filters(node: &str, instance: &str) -> Result<[String; 3], ContractError> {
    validate_token("node", node)?;
    validate_token("instance id", instance)?;
    let ctl = Kind::Control.token();
    Ok([
        join(&[ROOT, ctl, "all", "*"]),
        join(&[ROOT, ctl, "node", node, "*"]),
        join(&[ROOT, ctl, "instance", instance, "*"]),
    ])
}

/// The parts of a lifecycle subject, parsed back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LifecycleSubject {
    pub component: Component,
    pub instance: String,
    pub what: Lifecycle,
}

/// Parses `cim.svc.<component>.<instance>.<lifecycle>`.
pub fn parse_lifecycle(subject: &str) -> Result<LifecycleSubject, ContractError> {
    let bad =
        |reason: &'static str| ContractError::InvalidSubject { subject: subject.escape_debug().to_string(), reason };
    let parts: Vec<&str> = subject.split('.').collect();
    let [root, kind, component, instance, what] = parts.as_slice() else {
        return Err(bad("a lifecycle subject has exactly 5 tokens"));
    };
    if *root != ROOT || *kind != Kind::Service.token() {
        return Err(bad("a lifecycle subject starts with 'cim.svc.'"));
    }
    let component = Component::parse(component)?;
    validate_token("instance id", instance)?;
    let what = Lifecycle::parse(what).ok_or_else(|| bad("unknown lifecycle action"))?;
    Ok(LifecycleSubject { component, instance: instance.to_string(), what })
}

fn join(parts: &[&str]) -> String {
    parts.join(".")
}

/// `cim.evt.<component>.<aggregate>.<id>.<action>`: one event of one aggregate.
pub fn event(component: Component, aggregate: &str, id: &str, action: &str) -> Result<String, ContractError> {
    validate_token("aggregate", aggregate)?;
    validate_token("aggregate id", id)?;
    validate_token("action", action)?;
    Ok(join(&[ROOT, Kind::Event.token(), component.token(), aggregate, id, action]))
}

/// `cim.evt.<component>.<aggregate>.<id>.*`: the whole history of one aggregate. Used for the
/// per-aggregate optimistic concurrency check and to replay one aggregate.
pub fn aggregate_filter(component: Component, aggregate: &str, id: &str) -> Result<String, ContractError> {
    validate_token("aggregate", aggregate)?;
    validate_token("aggregate id", id)?;
    Ok(join(&[ROOT, Kind::Event.token(), component.token(), aggregate, id, "*"]))
}

/// Sets the per-aggregate optimistic-concurrency headers on a JetStream publish: the server
/// stores the message only if the last message on `filter` (an [`aggregate_filter`]) has
/// sequence `seq` (0: none yet), else it refuses with "wrong last sequence".
pub fn expect_aggregate_sequence(headers: &mut async_nats::HeaderMap, filter: &str, seq: u64) {
    headers.insert("Nats-Expected-Last-Subject-Sequence", seq.to_string().as_str());
    headers.insert("Nats-Expected-Last-Subject-Sequence-Subject", filter);
}

/// `cim.evt.<component>.<aggregate>.*.<action>`: one kind of event across all aggregates of a
/// type (what a pipeline trigger subscribes to).
pub fn action_filter(component: Component, aggregate: &str, action: &str) -> Result<String, ContractError> {
    validate_token("aggregate", aggregate)?;
    validate_token("action", action)?;
    Ok(join(&[ROOT, Kind::Event.token(), component.token(), aggregate, "*", action]))
}

/// `cim.evt.<component>.>`: every event of a component; the subjects of its event stream.
pub fn events_of(component: Component) -> String {
    join(&[ROOT, Kind::Event.token(), component.token(), ">"])
}

/// `cim.cmd.<component>.<action>`.
pub fn command(component: Component, action: &str) -> Result<String, ContractError> {
    validate_token("command", action)?;
    Ok(join(&[ROOT, Kind::Command.token(), component.token(), action]))
}

/// `cim.qry.<component>.<query>`.
pub fn query(component: Component, query: &str) -> Result<String, ContractError> {
    validate_token("query", query)?;
    Ok(join(&[ROOT, Kind::Query.token(), component.token(), query]))
}

/// `cim.svc.<component>.<instance>.<lifecycle>`.
pub fn lifecycle(component: Component, instance: &str, what: Lifecycle) -> Result<String, ContractError> {
    validate_token("instance id", instance)?;
    Ok(join(&[ROOT, Kind::Service.token(), component.token(), instance, what.token()]))
}

/// `cim.svc.>`: every lifecycle message of every instance (what the registry listens to).
pub fn all_lifecycle() -> String {
    join(&[ROOT, Kind::Service.token(), ">"])
}

/// `cim.dlq.<component>.<origin>`: a dead letter from `origin` (a consumer or endpoint name).
pub fn dead_letter(component: Component, origin: &str) -> Result<String, ContractError> {
    validate_token("dead-letter origin", origin)?;
    Ok(join(&[ROOT, Kind::DeadLetter.token(), component.token(), origin]))
}

/// `cim.dlq.<component>.>`: the subjects of a component's dead-letter stream.
pub fn dead_letters_of(component: Component) -> String {
    join(&[ROOT, Kind::DeadLetter.token(), component.token(), ">"])
}

/// A verb of the NATS micro services protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MicroVerb {
    Ping,
    Info,
    Stats,
}

/// `$SRV.<PING|INFO|STATS>.cim-<component>`: discovery and stats of every instance of a
/// component, answered by the runtime through the NATS micro services protocol.
pub fn micro(verb: MicroVerb, component: Component) -> String {
    let verb = match verb {
        MicroVerb::Ping => "PING",
        MicroVerb::Info => "INFO",
        MicroVerb::Stats => "STATS",
    };
    format!("$SRV.{verb}.{}", component.micro_name())
}

/// `_INBOX.cim-<component>`: the inbox prefix of a component's NATS connections. Replies to
/// its requests (and its consumers' deliveries) arrive below it, and its NATS identity may
/// subscribe only there, so no other identity can read the replies it gets.
pub fn inbox_prefix(component: Component) -> String {
    format!("_INBOX.{}", component.micro_name())
}

/// `_INBOX.>`: every reply subject of an account (an all-permitted identity's inboxes).
pub fn all_inboxes() -> String {
    "_INBOX.>".to_string()
}

/// `$O.<bucket>.C.<nuid>`: the chunks of one object in JetStream's object store layout.
pub fn object_chunks(bucket: &str, nuid: &str) -> Result<String, ContractError> {
    crate::token::validate_name("object bucket", bucket)?;
    validate_token("object nuid", nuid)?;
    Ok(format!("$O.{bucket}.C.{nuid}"))
}

/// `$O.<bucket>.M.<base64url(name)>`: the metadata of one object (JetStream's layout).
pub fn object_meta(bucket: &str, name: &str) -> Result<String, ContractError> {
    use base64::Engine;
    crate::token::validate_name("object bucket", bucket)?;
    Ok(format!("$O.{bucket}.M.{}", base64::engine::general_purpose::URL_SAFE.encode(name)))
}

/// `$O.<bucket>.C.>`: every chunk subject of a bucket.
pub fn all_object_chunks(bucket: &str) -> Result<String, ContractError> {
    crate::token::validate_name("object bucket", bucket)?;
    Ok(format!("$O.{bucket}.C.>"))
}

/// The parts of an event subject, parsed back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventSubject {
    pub component: Component,
    pub aggregate: String,
    pub id: String,
    pub action: String,
}

/// Parses `cim.evt.<component>.<aggregate>.<id>.<action>`.
pub fn parse_event(subject: &str) -> Result<EventSubject, ContractError> {
    let bad =
        |reason: &'static str| ContractError::InvalidSubject { subject: subject.escape_debug().to_string(), reason };
    let parts: Vec<&str> = subject.split('.').collect();
    let [root, kind, component, aggregate, id, action] = parts.as_slice() else {
        return Err(bad("an event subject has exactly 6 tokens"));
    };
    if *root != ROOT || *kind != Kind::Event.token() {
        return Err(bad("an event subject starts with 'cim.evt.'"));
    }
    let component = Component::parse(component)?;
    for (what, v) in [("aggregate", aggregate), ("aggregate id", id), ("action", action)] {
        validate_token(what, v)?;
    }
    Ok(EventSubject { component, aggregate: aggregate.to_string(), id: id.to_string(), action: action.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_every_kind_of_subject() {
        let iu = Component::InformationUnit;
        assert_eq!(event(iu, "unit", "u1", "created").unwrap(), "cim.evt.iu.unit.u1.created");
        assert_eq!(aggregate_filter(iu, "unit", "u1").unwrap(), "cim.evt.iu.unit.u1.*");
        assert_eq!(action_filter(iu, "unit", "created").unwrap(), "cim.evt.iu.unit.*.created");
        assert_eq!(events_of(iu), "cim.evt.iu.>");
        assert_eq!(command(iu, "create").unwrap(), "cim.cmd.iu.create");
        assert_eq!(query(iu, "get").unwrap(), "cim.qry.iu.get");
        assert_eq!(
            lifecycle(Component::Registry, "i-1", Lifecycle::Heartbeat).unwrap(),
            "cim.svc.registry.i-1.heartbeat"
        );
        assert_eq!(all_lifecycle(), "cim.svc.>");
        assert_eq!(dead_letter(Component::PipelineEngine, "steps").unwrap(), "cim.dlq.pipeline.steps");
        assert_eq!(dead_letters_of(Component::IntegrationHub), "cim.dlq.hub.>");
        assert_eq!(micro(MicroVerb::Ping, iu), "$SRV.PING.cim-iu");
        assert_eq!(micro(MicroVerb::Stats, Component::UiGateway), "$SRV.STATS.cim-gateway");
    }

    #[test]
    fn control_and_lifecycle_subjects() {
        assert_eq!(control_all(ControlAction::Announce), "cim.ctl.all.announce");
        assert_eq!(control_node("n1", ControlAction::Drain).unwrap(), "cim.ctl.node.n1.drain");
        assert_eq!(control_instance("i-1", ControlAction::Announce).unwrap(), "cim.ctl.instance.i-1.announce");
        assert_eq!(
            control_filters("n1", "i-1").unwrap(),
            ["cim.ctl.all.*".to_string(), "cim.ctl.node.n1.*".into(), "cim.ctl.instance.i-1.*".into()]
        );
        assert!(control_node("a.b", ControlAction::Drain).is_err());
        let s = lifecycle(Component::InformationUnit, "iu-1", Lifecycle::Drained).unwrap();
        assert_eq!(s, "cim.svc.iu.iu-1.drained");
        let p = parse_lifecycle(&s).unwrap();
        assert_eq!(
            (p.component, p.instance.as_str(), p.what),
            (Component::InformationUnit, "iu-1", Lifecycle::Drained)
        );
        assert!(parse_lifecycle("cim.svc.iu.iu-1").is_err());
        assert!(parse_lifecycle("cim.svc.nope.i.announce").is_err());
        assert!(parse_lifecycle("cim.svc.iu.i.explode").is_err());
    }

    #[test]
    fn event_subjects_parse_back() {
        let s = event(Component::PluginHost, "plugin", "ocr", "pushed").unwrap();
        let p = parse_event(&s).unwrap();
        assert_eq!(p.component, Component::PluginHost);
        assert_eq!((p.aggregate.as_str(), p.id.as_str(), p.action.as_str()), ("plugin", "ocr", "pushed"));
        assert!(parse_event("cim.evt.iu.unit.created").is_err());
        assert!(parse_event("cim.cmd.iu.unit.u1.created").is_err());
        assert!(parse_event("cim.evt.nope.unit.u1.created").is_err());
    }

    #[test]
    fn every_builder_rejects_bad_tokens() {
        let iu = Component::InformationUnit;
        for bad in ["", "a.b", "*", ">", "a b", "\n"] {
            assert!(event(iu, bad, "id", "x").is_err(), "{bad:?}");
            assert!(event(iu, "unit", bad, "x").is_err(), "{bad:?}");
            assert!(event(iu, "unit", "id", bad).is_err(), "{bad:?}");
            assert!(aggregate_filter(iu, "unit", bad).is_err(), "{bad:?}");
            assert!(action_filter(iu, "unit", bad).is_err(), "{bad:?}");
            assert!(command(iu, bad).is_err(), "{bad:?}");
            assert!(query(iu, bad).is_err(), "{bad:?}");
            assert!(lifecycle(iu, bad, Lifecycle::Announce).is_err(), "{bad:?}");
            assert!(dead_letter(iu, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn components_resolve_by_token_and_service_name() {
        for c in Component::ALL {
            assert_eq!(Component::parse(c.token()).unwrap(), c);
            assert_eq!(Component::parse(c.service_name()).unwrap(), c);
            crate::token::validate_name("micro name", &c.micro_name()).unwrap();
        }
        assert!(Component::parse("nope").is_err());
    }
}
