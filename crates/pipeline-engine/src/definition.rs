//! Pipeline definitions: the declarative document (JSON, see `docs/pipelines.md`), its
//! validation, trigger matching, templates and conditions. Pure: no I/O, unit-tested.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

/// Largest definition accepted (bytes of JSON).
pub const MAX_DEFINITION: usize = 64 * 1024;
/// At most this many steps (steps and sinks together).
pub const MAX_STEPS: usize = 64;
/// Defaults of a step.
pub const DEFAULT_TIMEOUT_MS: u32 = 30_000;
pub const DEFAULT_RETRIES: u32 = 2;
pub const DEFAULT_BACKOFF_MS: u32 = 200;
/// Upper bounds an operator can't be surprised by.
pub const MAX_TIMEOUT_MS: u32 = 600_000;
pub const MAX_RETRIES: u32 = 20;
pub const MAX_CONCURRENCY: u32 = 1024;

/// A pipeline definition as written by its author.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    pub trigger: Trigger,
    /// Most runs of this pipeline in progress at once, across all engine instances (0 = no limit).
    #[serde(default)]
    pub concurrency: u32,
    pub steps: Vec<Step>,
    /// Steps that write results (units, events); run after `steps`, same syntax.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sinks: Vec<Step>,
}

/// What starts a run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    /// `manual`, or a unit event: `unit.created`, `unit.versioned`, `unit.tagged`,
    /// `unit.attributes_set`, `unit.linked`.
    pub on: String,
    /// Media type pattern: `text/plain`, `text/*` or `*` (unit.created and unit.versioned).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub media_type: String,
    /// The unit type must be this (unit.created only).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub unit_type: String,
    /// unit.created: the unit has all these tags; unit.tagged: one of these tags was added.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Name prefix of the unit (unit.created only).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name_prefix: String,
}

/// The unit events a trigger can name, with the event action they match.
pub const TRIGGER_EVENTS: [(&str, &str); 5] = [
    ("unit.created", cim_events::iu::action::CREATED),
    ("unit.versioned", cim_events::iu::action::VERSIONED),
    ("unit.tagged", cim_events::iu::action::TAGGED),
    ("unit.attributes_set", cim_events::iu::action::ATTRIBUTES_SET),
    ("unit.linked", cim_events::iu::action::LINKED),
];

/// One step. Exactly one of the kinds (`plugin`, `capability`, `filter`, …) is set.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub id: String,
    /// Call a plugin version `name@version` (pinned: the version can't be removed meanwhile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin: Option<String>,
    /// Call the newest plugin offering this capability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capability: Option<String>,
    /// Plugin steps: what to feed it — `unit.content` or `<step>.output` (default: the output of
    /// the nearest earlier plugin step, else `unit.content`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// Plugin steps: metadata sent along (values are templates).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
    /// Stop the run (successfully) unless the condition holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Condition>,
    /// Compute values (templates) that later steps read as `<step>.<key>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map: Option<BTreeMap<String, String>>,
    /// Add tags (templates) to the run's unit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<Vec<String>>,
    /// Set attributes (values are templates) on the run's unit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_attributes: Option<BTreeMap<String, String>>,
    /// Write a new unit from a step's output, linked to the run's unit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_unit: Option<CreateUnitSpec>,
    /// Write a step's output as a new version of the run's unit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_version: Option<NewVersionSpec>,
    /// Record an event `cim.evt.pipeline.run.<id>.emitted` with a name and data (templates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emit: Option<EmitSpec>,
    /// Split a step's output into items and call a plugin on each (fan-out); the output is a
    /// JSON array of the items' outputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_each: Option<ForEachSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_ms: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// A context field: `unit.media_type`, `<step>.<metadata-key>`, `param.<k>`, …
    pub field: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_equals: Option<String>,
    /// A glob with `*` (any run of characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matches: Option<String>,
    /// Holds when the field exists (true) or does not (false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exists: Option<bool>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateUnitSpec {
    /// `<step>.output` (or `unit.content`).
    pub content: String,
    /// Keep at most this many bytes (cut at a UTF-8 boundary): e.g. a summary's head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u32>,
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub media_type: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    /// Kind of the link from the new unit to the run's unit (default `derived-from`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub link: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct NewVersionSpec {
    pub content: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub media_type: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct EmitSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub data: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ForEachSpec {
    /// `<step>.output`
    pub items: String,
    /// `lines` (non-empty lines) or `json` (a JSON array; strings as they are, others as JSON).
    #[serde(default = "default_split")]
    pub split: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capability: Option<String>,
    /// At most this many items (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_items: Option<u32>,
}

fn default_split() -> String {
    "lines".to_string()
}

/// What a step does, resolved from its fields.
#[derive(Clone, Debug, PartialEq)]
pub enum Kind<'a> {
    Plugin(PluginRef),
    Filter(&'a Condition),
    Map(&'a BTreeMap<String, String>),
    Tag(&'a [String]),
    SetAttributes(&'a BTreeMap<String, String>),
    CreateUnit(&'a CreateUnitSpec),
    NewVersion(&'a NewVersionSpec),
    Emit(&'a EmitSpec),
    ForEach(&'a ForEachSpec, PluginRef),
}

/// Which plugin a step calls.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PluginRef {
    Version { name: String, version: String },
    Capability(String),
}

impl std::fmt::Display for PluginRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PluginRef::Version { name, version } => write!(f, "{name}@{version}"),
            PluginRef::Capability(c) => write!(f, "capability {c}"),
        }
    }
}

/// Why a definition was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

fn invalid(s: impl Into<String>) -> Invalid {
    Invalid(s.into())
}

fn plugin_ref(plugin: &Option<String>, capability: &Option<String>, step: &str) -> Result<Option<PluginRef>, Invalid> {
    match (plugin, capability) {
        (Some(_), Some(_)) => Err(invalid(format!("step {step}: give plugin or capability, not both"))),
        (Some(p), None) => {
            let (name, version) =
                cim_events::plugin::parse_reference(p).map_err(|e| invalid(format!("step {step}: {e}")))?;
            let version = version.ok_or_else(|| {
                invalid(format!("step {step}: plugin {p:?} needs a version (name@version), or use capability"))
            })?;
            Ok(Some(PluginRef::Version { name, version }))
        }
        (None, Some(c)) => {
            cim_events::plugin::validate_capability(c).map_err(|e| invalid(format!("step {step}: {e}")))?;
            Ok(Some(PluginRef::Capability(c.clone())))
        }
        (None, None) => Ok(None),
    }
}

impl Step {
    /// The one thing this step does.
    pub fn kind(&self) -> Result<Kind<'_>, Invalid> {
        let id = &self.id;
        let mut kinds = Vec::new();
        let direct = plugin_ref(&self.plugin, &self.capability, id)?;
        if let Some(p) = &direct {
            kinds.push(Kind::Plugin(p.clone()));
        }
        if let Some(c) = &self.filter {
            kinds.push(Kind::Filter(c));
        }
        if let Some(m) = &self.map {
            kinds.push(Kind::Map(m));
        }
        if let Some(t) = &self.tag {
            kinds.push(Kind::Tag(t));
        }
        if let Some(a) = &self.set_attributes {
            kinds.push(Kind::SetAttributes(a));
        }
        if let Some(c) = &self.create_unit {
            kinds.push(Kind::CreateUnit(c));
        }
        if let Some(v) = &self.new_version {
            kinds.push(Kind::NewVersion(v));
        }
        if let Some(e) = &self.emit {
            kinds.push(Kind::Emit(e));
        }
        if let Some(f) = &self.for_each {
            let p = plugin_ref(&f.plugin, &f.capability, id)?
                .ok_or_else(|| invalid(format!("step {id}: for_each needs a plugin or a capability")))?;
            kinds.push(Kind::ForEach(f, p));
        }
        match kinds.len() {
            1 => Ok(kinds.remove(0)),
            0 => Err(invalid(format!(
                "step {id}: says nothing to do (one of plugin, capability, filter, map, tag, set_attributes, create_unit, new_version, emit, for_each)"
            ))),
            _ => Err(invalid(format!("step {id}: does more than one thing; split it into steps"))),
        }
    }

    pub fn timeout_ms(&self) -> u32 {
        self.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS)
    }
    pub fn retries(&self) -> u32 {
        self.retries.unwrap_or(DEFAULT_RETRIES)
    }
    /// Pause before retry `attempt` (1-based count of failures so far): doubling, at most 30s.
    pub fn backoff(&self, failures: u32) -> std::time::Duration {
        let base = u64::from(self.backoff_ms.unwrap_or(DEFAULT_BACKOFF_MS));
        let ms = base.saturating_mul(1u64 << failures.saturating_sub(1).min(16)).min(30_000);
        std::time::Duration::from_millis(ms)
    }
}

impl Definition {
    /// Parses and validates a definition (everything that needs no other service).
    pub fn parse(value: &serde_json::Value) -> Result<Definition, Invalid> {
        let text = value.to_string();
        if text.len() > MAX_DEFINITION {
            return Err(invalid(format!("definition is {} bytes, more than {MAX_DEFINITION}", text.len())));
        }
        let def: Definition =
            serde_json::from_value(value.clone()).map_err(|e| invalid(format!("definition does not parse: {e}")))?;
        def.validate()?;
        Ok(def)
    }

    /// Every step in execution order: `steps`, then `sinks`.
    pub fn all_steps(&self) -> impl Iterator<Item = &Step> {
        self.steps.iter().chain(self.sinks.iter())
    }

    pub fn step(&self, id: &str) -> Option<&Step> {
        self.all_steps().find(|s| s.id == id)
    }

    /// Plugin versions this pipeline pins (they may not be removed while it exists).
    pub fn pinned_plugins(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .all_steps()
            .filter_map(|s| match s.kind() {
                Ok(Kind::Plugin(PluginRef::Version { name, version }))
                | Ok(Kind::ForEach(_, PluginRef::Version { name, version })) => Some((name, version)),
                _ => None,
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Every plugin reference (pinned or by capability), for the existence check at apply.
    pub fn plugin_refs(&self) -> Vec<(String, PluginRef)> {
        self.all_steps()
            .filter_map(|s| match s.kind() {
                Ok(Kind::Plugin(p)) | Ok(Kind::ForEach(_, p)) => Some((s.id.clone(), p)),
                _ => None,
            })
            .collect()
    }

    pub fn is_manual(&self) -> bool {
        self.trigger.on == "manual"
    }

    fn validate(&self) -> Result<(), Invalid> {
        cim_events::pipeline::validate_name(&self.name).map_err(|e| invalid(e.to_string()))?;
        self.trigger.validate()?;
        if self.concurrency > MAX_CONCURRENCY {
            return Err(invalid(format!("concurrency {} is more than {MAX_CONCURRENCY}", self.concurrency)));
        }
        if self.steps.is_empty() && self.sinks.is_empty() {
            return Err(invalid("a pipeline needs at least one step"));
        }
        let n = self.steps.len() + self.sinks.len();
        if n > MAX_STEPS {
            return Err(invalid(format!("{n} steps, more than {MAX_STEPS}")));
        }
        // Each step may read only steps that run before it: a reference to itself or a later
        // step would be a cycle, to an unknown one a missing input.
        let all: HashSet<&str> = self.all_steps().map(|s| s.id.as_str()).collect();
        let mut before: HashSet<&str> = HashSet::new();
        for step in self.all_steps() {
            validate_step_id(&step.id)?;
            if before.contains(step.id.as_str()) {
                return Err(invalid(format!("step id {} is used twice", step.id)));
            }
            let kind = step.kind()?;
            if let Some(t) = step.timeout_ms
                && (t == 0 || t > MAX_TIMEOUT_MS)
            {
                return Err(invalid(format!("step {}: timeout_ms must be 1..={MAX_TIMEOUT_MS}", step.id)));
            }
            if step.retries.is_some_and(|r| r > MAX_RETRIES) {
                return Err(invalid(format!("step {}: retries must be at most {MAX_RETRIES}", step.id)));
            }
            let check = |field: &str| check_ref(field, &step.id, &before, &all);
            match &kind {
                Kind::Plugin(_) => {
                    if let Some(input) = &step.input {
                        check_content(input, &step.id, &before, &all)?;
                    }
                    for v in step.options.values() {
                        check_template(v, &step.id, &before, &all)?;
                    }
                }
                Kind::Filter(c) => {
                    check(&c.field)?;
                    let n = [c.equals.is_some(), c.not_equals.is_some(), c.matches.is_some(), c.exists.is_some()]
                        .iter()
                        .filter(|b| **b)
                        .count();
                    if n != 1 {
                        return Err(invalid(format!(
                            "step {}: a filter needs exactly one of equals, not_equals, matches, exists",
                            step.id
                        )));
                    }
                }
                Kind::Map(m) => {
                    for (k, v) in *m {
                        validate_key(k, &step.id)?;
                        check_template(v, &step.id, &before, &all)?;
                    }
                }
                Kind::Tag(tags) => {
                    if tags.is_empty() {
                        return Err(invalid(format!("step {}: no tags to add", step.id)));
                    }
                    for t in *tags {
                        check_template(t, &step.id, &before, &all)?;
                    }
                }
                Kind::SetAttributes(a) => {
                    if a.is_empty() {
                        return Err(invalid(format!("step {}: no attributes to set", step.id)));
                    }
                    for v in a.values() {
                        check_template(v, &step.id, &before, &all)?;
                    }
                }
                Kind::CreateUnit(c) => {
                    check_content(&c.content, &step.id, &before, &all)?;
                    check_template(&c.name, &step.id, &before, &all)?;
                    for t in c.tags.iter().chain(c.attributes.values()) {
                        check_template(t, &step.id, &before, &all)?;
                    }
                    if !c.link.is_empty() {
                        cim_events::token::validate_token("link kind", &c.link)
                            .map_err(|e| invalid(format!("step {}: {e}", step.id)))?;
                    }
                }
                Kind::NewVersion(v) => check_content(&v.content, &step.id, &before, &all)?,
                Kind::Emit(e) => {
                    validate_key(&e.name, &step.id)?;
                    for v in e.data.values() {
                        check_template(v, &step.id, &before, &all)?;
                    }
                }
                Kind::ForEach(f, _) => {
                    check_content(&f.items, &step.id, &before, &all)?;
                    if f.split != "lines" && f.split != "json" {
                        return Err(invalid(format!("step {}: split must be lines or json", step.id)));
                    }
                }
            }
            before.insert(step.id.as_str());
        }
        Ok(())
    }
}

impl Trigger {
    fn validate(&self) -> Result<(), Invalid> {
        if self.on == "manual" {
            if !self.media_type.is_empty()
                || !self.unit_type.is_empty()
                || !self.tags.is_empty()
                || !self.name_prefix.is_empty()
            {
                return Err(invalid("a manual trigger takes no filters"));
            }
            return Ok(());
        }
        let Some((_, action)) = TRIGGER_EVENTS.iter().find(|(n, _)| *n == self.on) else {
            let known: Vec<&str> = TRIGGER_EVENTS.iter().map(|(n, _)| *n).collect();
            return Err(invalid(format!(
                "trigger on {:?} matches no event: use manual or one of {}",
                self.on,
                known.join(", ")
            )));
        };
        let action = *action;
        use cim_events::iu::action as a;
        if !self.media_type.is_empty() {
            if action != a::CREATED && action != a::VERSIONED {
                return Err(invalid(format!(
                    "trigger on {}: media_type applies only to unit.created and unit.versioned",
                    self.on
                )));
            }
            validate_media_pattern(&self.media_type)?;
        }
        if (!self.unit_type.is_empty() || !self.name_prefix.is_empty()) && action != a::CREATED {
            return Err(invalid(format!(
                "trigger on {}: unit_type and name_prefix apply only to unit.created",
                self.on
            )));
        }
        if !self.tags.is_empty() && action != a::CREATED && action != a::TAGGED {
            return Err(invalid(format!("trigger on {}: tags apply only to unit.created and unit.tagged", self.on)));
        }
        for t in &self.tags {
            cim_events::token::validate_token("tag", t).map_err(|e| invalid(format!("trigger: {e}")))?;
        }
        Ok(())
    }

    /// The unit event action this trigger listens to (None for manual).
    pub fn action(&self) -> Option<&'static str> {
        TRIGGER_EVENTS.iter().find(|(n, _)| *n == self.on).map(|(_, a)| *a)
    }

    /// Does this unit event start a run?
    pub fn matches(&self, event: &UnitEventFacts) -> bool {
        if self.action() != Some(event.action.as_str()) {
            return false;
        }
        if !self.media_type.is_empty() && !media_matches(&self.media_type, &event.media_type) {
            return false;
        }
        if !self.unit_type.is_empty() && self.unit_type != event.unit_type {
            return false;
        }
        if !self.name_prefix.is_empty() && !event.name.starts_with(&self.name_prefix) {
            return false;
        }
        if !self.tags.is_empty() {
            if event.action == cim_events::iu::action::TAGGED {
                return self.tags.iter().any(|t| event.tags.contains(t));
            }
            return self.tags.iter().all(|t| event.tags.contains(t));
        }
        true
    }
}

/// What a trigger looks at in a unit event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnitEventFacts {
    pub action: String,
    pub unit_id: String,
    pub media_type: String,
    pub unit_type: String,
    pub name: String,
    pub tags: Vec<String>,
}

fn validate_media_pattern(p: &str) -> Result<(), Invalid> {
    if p == "*" {
        return Ok(());
    }
    let bad = || invalid(format!("trigger media_type {p:?} is not type/subtype, type/* or *"));
    let (t, sub) = p.split_once('/').ok_or_else(bad)?;
    let ok = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "!#$&-^_.+".contains(c));
    if !ok(t) || !(sub == "*" || ok(sub)) {
        return Err(bad());
    }
    Ok(())
}

/// `text/*` matches `text/plain; charset=utf-8`; case-insensitive.
pub fn media_matches(pattern: &str, media_type: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let mt = media_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let pattern = pattern.to_ascii_lowercase();
    match pattern.strip_suffix("/*") {
        Some(t) => mt.split_once('/').is_some_and(|(mt_t, _)| mt_t == t),
        None => mt == pattern,
    }
}

/// Glob with `*` only.
pub fn glob(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == s;
    }
    let mut rest = s;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            match rest.strip_prefix(part) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
    }
    true
}

fn validate_step_id(id: &str) -> Result<(), Invalid> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && !matches!(id, "unit" | "param" | "run" | "pipeline");
    if ok {
        Ok(())
    } else {
        Err(invalid(format!("step id {id:?}: use 1-64 of a-z, 0-9, '-', '_' (not unit, param, run or pipeline)")))
    }
}

fn validate_key(k: &str, step: &str) -> Result<(), Invalid> {
    let ok = !k.is_empty() && k.len() <= 128 && k.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
    if ok { Ok(()) } else { Err(invalid(format!("step {step}: key {k:?}: use a-z, A-Z, 0-9, '-', '_'"))) }
}

/// Roots a field may start with besides earlier step ids.
const CONTEXT_ROOTS: [&str; 4] = ["unit", "param", "run", "pipeline"];

fn check_ref(field: &str, step: &str, before: &HashSet<&str>, all: &HashSet<&str>) -> Result<(), Invalid> {
    let (root, rest) = field
        .split_once('.')
        .ok_or_else(|| invalid(format!("step {step}: field {field:?} needs the form <step>.<key> or unit.<field>")))?;
    if rest.is_empty() {
        return Err(invalid(format!("step {step}: field {field:?} names nothing after {root:?}")));
    }
    if CONTEXT_ROOTS.contains(&root) {
        if root == "unit" && !UNIT_FIELDS.contains(&rest) && !rest.starts_with("attr.") {
            return Err(invalid(format!(
                "step {step}: unknown unit field {rest:?} (one of {}, attr.<name>)",
                UNIT_FIELDS.join(", ")
            )));
        }
        return Ok(());
    }
    if before.contains(root) {
        return Ok(());
    }
    if root == step || all.contains(root) {
        return Err(invalid(format!("step {step} reads {field}, but step {root} does not run before it (a cycle)")));
    }
    Err(invalid(format!("step {step} reads {field}, but there is no step {root} (missing input)")))
}

/// What a step can read as content: `unit.content` or `<step>.output`.
fn check_content(field: &str, step: &str, before: &HashSet<&str>, all: &HashSet<&str>) -> Result<(), Invalid> {
    if field == "unit.content" {
        return Ok(());
    }
    match field.split_once('.') {
        Some((_, "output")) => check_ref(field, step, before, all),
        _ => Err(invalid(format!("step {step}: content {field:?} must be unit.content or <step>.output"))),
    }
}

/// The unit fields a template can read (`unit.<field>`).
pub const UNIT_FIELDS: [&str; 7] = ["id", "name", "media_type", "unit_type", "cid", "size", "content"];

fn check_template(t: &str, step: &str, before: &HashSet<&str>, all: &HashSet<&str>) -> Result<(), Invalid> {
    for field in template_fields(t).map_err(|e| invalid(format!("step {step}: {e}")))? {
        check_ref(field, step, before, all)?;
    }
    Ok(())
}

/// The `{field}` references of a template; `{{` and `}}` are literal braces.
pub fn template_fields(t: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let b = t.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'{' if b.get(i + 1) == Some(&b'{') => i += 2,
            b'}' if b.get(i + 1) == Some(&b'}') => i += 2,
            b'{' => {
                let end = t[i + 1..].find('}').ok_or_else(|| format!("template {t:?} has an unclosed '{{'"))?;
                let field = t[i + 1..i + 1 + end].trim();
                if field.is_empty() {
                    return Err(format!("template {t:?} has an empty '{{}}'"));
                }
                out.push(field);
                i += end + 2;
            }
            b'}' => return Err(format!("template {t:?} has a '}}' without '{{'")),
            _ => i += 1,
        }
    }
    Ok(out)
}

/// Fills a template from `lookup`; a field that does not exist is an error (named).
pub fn render(t: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(t.len());
    let b = t.as_bytes();
    let mut i = 0;
    let mut literal_from = 0;
    while i < b.len() {
        match b[i] {
            b'{' if b.get(i + 1) == Some(&b'{') => {
                out.push_str(&t[literal_from..i]);
                out.push('{');
                i += 2;
                literal_from = i;
            }
            b'}' if b.get(i + 1) == Some(&b'}') => {
                out.push_str(&t[literal_from..i]);
                out.push('}');
                i += 2;
                literal_from = i;
            }
            b'{' => {
                out.push_str(&t[literal_from..i]);
                let end = t[i + 1..].find('}').ok_or_else(|| format!("template {t:?} has an unclosed '{{'"))?;
                let field = t[i + 1..i + 1 + end].trim();
                let value = lookup(field).ok_or_else(|| format!("{field} has no value"))?;
                out.push_str(&value);
                i += end + 2;
                literal_from = i;
            }
            _ => i += 1,
        }
    }
    out.push_str(&t[literal_from..]);
    Ok(out)
}

/// Evaluates a filter condition.
pub fn holds(c: &Condition, value: Option<&str>) -> bool {
    if let Some(want) = c.exists {
        return value.is_some() == want;
    }
    let Some(v) = value else { return false };
    if let Some(e) = &c.equals {
        return v == e;
    }
    if let Some(e) = &c.not_equals {
        return v != e;
    }
    if let Some(p) = &c.matches {
        return glob(p, v);
    }
    false
}

/// Cuts `bytes` to at most `max` bytes at a UTF-8 boundary (bytes that are not UTF-8 are cut
/// exactly).
pub fn head(bytes: &[u8], max: usize) -> &[u8] {
    if bytes.len() <= max {
        return bytes;
    }
    match std::str::from_utf8(bytes) {
        Ok(s) => {
            let mut end = max;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            &bytes[..end]
        }
        Err(_) => &bytes[..max],
    }
}

/// The definition in its normalized form (what is stored and digested).
pub fn normalized(def: &Definition) -> String {
    serde_json::to_string(def).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn example() -> serde_json::Value {
        json!({
            "name": "text-ingest",
            "trigger": {"on": "unit.created", "media_type": "text/*"},
            "concurrency": 2,
            "steps": [
                {"id": "normalize", "plugin": "text-normalize@1.0.0", "input": "unit.content"},
                {"id": "classify", "capability": "content.sniff", "input": "normalize.output"},
                {"id": "is-text", "filter": {"field": "classify.media-type", "matches": "text/*"}},
                {"id": "tag", "tag": ["normalized", "{classify.media-type}"]}
            ],
            "sinks": [
                {"id": "summary", "create_unit": {"content": "normalize.output", "max_bytes": 100, "name": "{unit.name}.summary", "link": "summary-of"}}
            ]
        })
    }

    #[test]
    fn the_example_is_valid() {
        let d = Definition::parse(&example()).unwrap();
        assert_eq!(d.all_steps().count(), 5);
        assert_eq!(d.pinned_plugins(), vec![("text-normalize".to_string(), "1.0.0".to_string())]);
        assert_eq!(d.plugin_refs().len(), 2);
        assert!(matches!(d.step("classify").unwrap().kind().unwrap(), Kind::Plugin(PluginRef::Capability(_))));
    }

    fn refuse(mut v: serde_json::Value, patch: impl FnOnce(&mut serde_json::Value), needle: &str) {
        patch(&mut v);
        let e = Definition::parse(&v).unwrap_err().0;
        assert!(e.contains(needle), "{e:?} should mention {needle:?}");
    }

    #[test]
    fn bad_definitions_say_why() {
        refuse(example(), |v| v["name"] = json!("Bad Name"), "pipeline name");
        refuse(example(), |v| v["trigger"]["on"] = json!("unit.exploded"), "matches no event");
        refuse(example(), |v| v["trigger"]["media_type"] = json!("text"), "media_type");
        refuse(
            example(),
            |v| {
                v["steps"] = json!([]);
                v.as_object_mut().unwrap().remove("sinks");
            },
            "at least one step",
        );
        refuse(example(), |v| v["steps"][1]["input"] = json!("summary.output"), "does not run before it (a cycle)");
        refuse(example(), |v| v["steps"][1]["input"] = json!("classify.output"), "a cycle");
        refuse(example(), |v| v["steps"][1]["input"] = json!("nope.output"), "missing input");
        refuse(example(), |v| v["steps"][3]["tag"] = json!(["{ghost.x}"]), "there is no step ghost");
        refuse(example(), |v| v["steps"][3]["tag"] = json!(["{unclosed"]), "unclosed");
        refuse(example(), |v| v["steps"][0]["plugin"] = json!("text-normalize"), "needs a version");
        refuse(example(), |v| v["steps"][0]["capability"] = json!("x.y"), "not both");
        refuse(example(), |v| v["steps"][1]["id"] = json!("normalize"), "used twice");
        refuse(example(), |v| v["steps"][2]["filter"]["equals"] = json!("x"), "exactly one of");
        refuse(example(), |v| v["steps"][0]["bogus"] = json!(1), "unknown field");
        refuse(example(), |v| v["steps"][0]["timeout_ms"] = json!(0), "timeout_ms");
        refuse(example(), |v| v["steps"].as_array_mut().unwrap().push(json!({"id": "empty"})), "says nothing to do");
        refuse(example(), |v| v["steps"][3]["map"] = json!({"a": "b"}), "more than one thing");
        refuse(example(), |v| v["steps"][3]["tag"] = json!(["{unit.colour}"]), "unknown unit field");
        refuse(
            example(),
            |v| v["trigger"] = json!({"on": "manual", "media_type": "text/*"}),
            "manual trigger takes no filters",
        );
        refuse(json!("not an object"), |_| {}, "does not parse");
    }

    #[test]
    fn triggers_match_events() {
        let t = Trigger {
            on: "unit.created".into(),
            media_type: "text/*".into(),
            tags: vec!["inbox".into()],
            ..Default::default()
        };
        let mut e = UnitEventFacts {
            action: "created".into(),
            media_type: "text/plain; charset=utf-8".into(),
            tags: vec!["inbox".into(), "x".into()],
            ..Default::default()
        };
        assert!(t.matches(&e));
        e.media_type = "image/png".into();
        assert!(!t.matches(&e));
        e.media_type = "TEXT/markdown".into();
        assert!(t.matches(&e));
        e.tags = vec!["x".into()];
        assert!(!t.matches(&e));
        e.tags = vec!["inbox".into()];
        e.action = "versioned".into();
        assert!(!t.matches(&e));
        let tagged = Trigger { on: "unit.tagged".into(), tags: vec!["review".into()], ..Default::default() };
        let e = UnitEventFacts { action: "tagged".into(), tags: vec!["review".into()], ..Default::default() };
        assert!(tagged.matches(&e));
        assert!(!Trigger { on: "manual".into(), ..Default::default() }.matches(&e));
    }

    #[test]
    fn templates_conditions_and_heads() {
        let lookup = |f: &str| match f {
            "unit.name" => Some("a.txt".to_string()),
            "classify.media-type" => Some("text/plain".to_string()),
            _ => None,
        };
        assert_eq!(render("{unit.name}.summary", &lookup).unwrap(), "a.txt.summary");
        assert_eq!(render("{{literal}} {classify.media-type}", &lookup).unwrap(), "{literal} text/plain");
        assert!(render("{nope.x}", &lookup).unwrap_err().contains("nope.x"));
        assert_eq!(template_fields("a {b.c} {{d}} { e.f }").unwrap(), vec!["b.c", "e.f"]);
        assert!(template_fields("x}").is_err());
        let c = Condition { field: "x.y".into(), matches: Some("text/*".into()), ..Default::default() };
        assert!(holds(&c, Some("text/plain")));
        assert!(!holds(&c, Some("image/png")));
        assert!(!holds(&c, None));
        let c = Condition { field: "x.y".into(), exists: Some(false), ..Default::default() };
        assert!(holds(&c, None));
        assert!(glob("*b*d", "abcd") && glob("a*", "a") && !glob("a*c", "abd") && glob("*", ""));
        assert_eq!(head("héllo".as_bytes(), 2), b"h");
        assert_eq!(head(b"hello", 10), b"hello");
        let s = Step { id: "s".into(), backoff_ms: Some(100), ..Default::default() };
        assert_eq!(s.backoff(1).as_millis(), 100);
        assert_eq!(s.backoff(3).as_millis(), 400);
        assert_eq!(s.backoff(40).as_millis(), 30_000);
    }
}
