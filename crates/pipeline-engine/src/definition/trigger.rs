//! Trigger matching: the unit events a trigger can name, and whether one event starts a run.

use super::Trigger;

/// The unit events a trigger can name, with the event action they match.
pub const TRIGGER_EVENTS: [(&str, &str); 5] = [
    ("unit.created", cim_events::iu::action::CREATED),
    ("unit.versioned", cim_events::iu::action::VERSIONED),
    ("unit.tagged", cim_events::iu::action::TAGGED),
    ("unit.attributes_set", cim_events::iu::action::ATTRIBUTES_SET),
    ("unit.linked", cim_events::iu::action::LINKED),
];

impl Trigger {
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
