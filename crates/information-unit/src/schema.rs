//! Unit type schemas: which attributes a unit of the type has, of what kind, and which are
//! required. A small documented JSON format (docs/information-units.md):
//!
//! ```json
//! {"attributes": {"author": {"type": "string", "required": true, "max_length": 200},
//!                 "pages":  {"type": "integer", "min": 1},
//!                 "status": {"type": "string", "enum": ["draft", "final"]}},
//!  "additional_attributes": false}
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TypeSchema {
    #[serde(default)]
    pub attributes: BTreeMap<String, AttributeSpec>,
    #[serde(default = "yes")]
    pub additional_attributes: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    String,
    Integer,
    Number,
    Boolean,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttributeSpec {
    #[serde(rename = "type")]
    pub kind: Kind,
    #[serde(default)]
    pub required: bool,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub max_length: Option<usize>,
    #[serde(rename = "enum")]
    pub one_of: Option<Vec<String>>,
}

impl TypeSchema {
    /// Parses and checks a schema document; the error says what is wrong with it.
    pub fn parse(json: &str) -> Result<TypeSchema, String> {
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format!("schema is not valid JSON: {e}"))?;
        if !value.is_object() {
            return Err("schema must be a JSON object".to_string());
        }
        let s: TypeSchema = serde_json::from_value(value).map_err(|e| format!("schema is not valid: {e}"))?;
        for (name, spec) in &s.attributes {
            cim_events::token::validate_name("attribute name", name).map_err(|e| format!("schema: {e}"))?;
            if let (Some(min), Some(max)) = (spec.min, spec.max)
                && min > max
            {
                return Err(format!("schema: attribute {name}: min {min} is above max {max}"));
            }
            if (spec.min.is_some() || spec.max.is_some()) && !matches!(spec.kind, Kind::Integer | Kind::Number) {
                return Err(format!("schema: attribute {name}: min/max need type integer or number"));
            }
        }
        Ok(s)
    }

    /// Checks a unit's attributes; the error names every problem.
    pub fn validate(&self, attrs: &BTreeMap<String, String>) -> Result<(), String> {
        let mut problems = Vec::new();
        for (name, spec) in &self.attributes {
            match attrs.get(name) {
                None if spec.required => problems.push(format!("{name} is required")),
                None => {}
                Some(v) => {
                    if let Err(p) = spec.check(v) {
                        problems.push(format!("{name} {p}"));
                    }
                }
            }
        }
        if !self.additional_attributes {
            for name in attrs.keys().filter(|k| !self.attributes.contains_key(*k)) {
                problems.push(format!("{name} is not in the schema"));
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(format!("schema violation: {}", problems.join("; "))) }
    }
}

impl AttributeSpec {
    fn check(&self, v: &str) -> Result<(), String> {
        let n = match self.kind {
            Kind::String => None,
            Kind::Integer => Some(v.parse::<i64>().map_err(|_| format!("{v:?} is not an integer"))? as f64),
            Kind::Number => {
                Some(v.parse::<f64>().ok().filter(|f| f.is_finite()).ok_or_else(|| format!("{v:?} is not a number"))?)
            }
            Kind::Boolean => {
                if v != "true" && v != "false" {
                    return Err(format!("{v:?} is not true or false"));
                }
                None
            }
        };
        if let (Some(n), Some(min)) = (n, self.min)
            && n < min
        {
            return Err(format!("{v} is below {min}"));
        }
        if let (Some(n), Some(max)) = (n, self.max)
            && n > max
        {
            return Err(format!("{v} is above {max}"));
        }
        if let Some(max) = self.max_length
            && v.chars().count() > max
        {
            return Err(format!("is longer than {max} characters"));
        }
        if let Some(set) = &self.one_of
            && !set.iter().any(|x| x == v)
        {
            return Err(format!("{v:?} is not one of {set:?}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"{"attributes": {"author": {"type": "string", "required": true, "max_length": 5},
        "pages": {"type": "integer", "min": 1, "max": 10}, "ok": {"type": "boolean"},
        "status": {"type": "string", "enum": ["draft", "final"]}}, "additional_attributes": false}"#;

    fn attrs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn accepts_conforming_attributes() {
        let s = TypeSchema::parse(DOC).unwrap();
        s.validate(&attrs(&[("author", "ann"), ("pages", "3"), ("ok", "true"), ("status", "final")])).unwrap();
    }

    #[test]
    fn names_every_violation() {
        let s = TypeSchema::parse(DOC).unwrap();
        let e = s.validate(&attrs(&[("pages", "11"), ("ok", "yes"), ("status", "wip"), ("extra", "1")])).unwrap_err();
        for want in ["author is required", "above 10", "not true or false", "not one of", "extra is not in the schema"]
        {
            assert!(e.contains(want), "{want}: {e}");
        }
        assert!(s.validate(&attrs(&[("author", "toolong")])).unwrap_err().contains("longer than 5"));
        assert!(s.validate(&attrs(&[("author", "a"), ("pages", "x")])).unwrap_err().contains("not an integer"));
    }

    #[test]
    fn bad_schemas_are_refused() {
        for bad in [
            "",
            "[]",
            r#"{"attributes": {"a": {"type": "date"}}}"#,
            r#"{"attributes": {"a b": {"type": "string"}}}"#,
            r#"{"attributes": {"a": {"type": "string", "min": 1}}}"#,
            r#"{"attributes": {"a": {"type": "integer", "min": 5, "max": 1}}}"#,
            r#"{"nope": 1}"#,
        ] {
            assert!(TypeSchema::parse(bad).is_err(), "{bad}");
        }
    }
}
