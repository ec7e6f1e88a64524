//! Pipeline definitions: the declarative document (JSON, see `docs/pipelines.md`), its types,
//! and what a step does. Pure: no I/O, unit-tested.
//!
//! Submodules: `validate` (what a definition must satisfy to be applied), `template`
//! (`{field}` templates, filter conditions, globs), `trigger` (which unit events start a run),
//! and their unit tests in `tests`.

mod template;
#[cfg(test)]
mod tests;
mod trigger;
mod validate;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use template::{glob, head, holds, render, template_fields};
pub use trigger::{TRIGGER_EVENTS, UnitEventFacts, media_matches};
pub use validate::UNIT_FIELDS;

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
}

/// The definition in its normalized form (what is stored and digested).
pub fn normalized(def: &Definition) -> String {
    serde_json::to_string(def).unwrap_or_default()
}
