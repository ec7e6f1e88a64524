//! Validation of a definition: everything that needs no other service (names, step ids,
//! references between steps, templates, trigger filters), each refusal saying why.

use std::collections::HashSet;

use super::{
    Definition, Invalid, Kind, MAX_CONCURRENCY, MAX_RETRIES, MAX_STEPS, MAX_TIMEOUT_MS, TRIGGER_EVENTS, Trigger,
    invalid, template_fields,
};

impl Definition {
    pub(super) fn validate(&self) -> Result<(), Invalid> {
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
