//! Capacity and placement: does a desired set of services fit on the nodes, and if not exactly
//! why; and a proposed placement. Pure logic (no I/O), used by `cimctl placement check` and the
//! registry; its JSON report is what the NixOS deployment consumes. [`names`] holds the names
//! of registry states that both show.
//!
//! Memory is a hard budget per node: allocatable = physical − reserved − safety buffer, and the
//! sum of the `MemoryMax` of the services placed there may not exceed it. CPU is shared by
//! weight and may be overcommitted: the sum of CPU shares may reach `cpus × cpu_overcommit`.

pub mod names;

use std::collections::{BTreeMap, BTreeSet};

use cim_events::Component;
use serde::{Deserialize, Serialize};

/// Default CPU overcommit ratio.
pub const DEFAULT_CPU_OVERCOMMIT: f64 = 4.0;
/// Default safety buffer per node (kept free besides the reservation).
pub const DEFAULT_SAFETY_BUFFER: u64 = 256 << 20;

/// Why a placement file was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlacementError {
    #[error("placement file does not parse: {0}")]
    Parse(String),
    #[error("unknown service {name:?} (known: {known})")]
    UnknownService { name: String, known: String },
    #[error("assignment names unknown node {0:?}")]
    UnknownNode(String),
    #[error("invalid placement file: {0}")]
    Invalid(String),
}

/// A memory size: bytes, or a string like `512MiB`, `8G`, `1.5GiB` (K, M, G, T are binary, as in
/// systemd's `MemoryMax`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Bytes(pub u64);

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Bytes(n)),
            Raw::S(s) => parse_size(&s).map(Bytes).map_err(serde::de::Error::custom),
        }
    }
}

/// Parses `512MiB`, `8G`, `1.5 GiB`, `1024`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a size like 512MiB or 8G"))?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        other => return Err(format!("{s:?}: unknown unit {other:?} (K, M, G, T or KiB, MiB, GiB, TiB)")),
    };
    Ok((n * mult as f64).round() as u64)
}

/// `512 MiB`, `1.5 GiB`: for messages.
pub fn human(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (u, m) in UNITS {
        if bytes >= m {
            let v = bytes as f64 / m as f64;
            return if (v - v.round()).abs() < 0.05 {
                format!("{} {u}", v.round() as u64)
            } else {
                format!("{v:.1} {u}")
            };
        }
    }
    format!("{bytes} B")
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
    pub memory: Bytes,
    #[serde(default = "zero")]
    pub reserved: Bytes,
    pub cpus: f64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn zero() -> Bytes {
    Bytes(0)
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    #[serde(default = "one")]
    pub replicas: u32,
    pub memory_max: Bytes,
    /// CPU shares in cores (1.0 = one core's worth of weight).
    #[serde(default = "one_f")]
    pub cpu: f64,
}

fn one() -> u32 {
    1
}
fn one_f() -> f64 {
    1.0
}

/// The placement file.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PlacementFile {
    #[serde(default)]
    pub cpu_overcommit: Option<f64>,
    #[serde(default)]
    pub safety_buffer: Option<Bytes>,
    pub nodes: Vec<NodeSpec>,
    pub services: Vec<ServiceSpec>,
    /// Node → services placed there (a service listed twice on a node is two replicas). When
    /// absent, a placement is proposed.
    #[serde(default)]
    pub assignments: Option<BTreeMap<String, Vec<String>>>,
}

impl PlacementFile {
    /// Parses and validates the JSON text of a placement file.
    pub fn parse(text: &str) -> Result<PlacementFile, PlacementError> {
        let f: PlacementFile = serde_json::from_str(text).map_err(|e| PlacementError::Parse(e.to_string()))?;
        f.validate()?;
        Ok(f)
    }

    fn validate(&self) -> Result<(), PlacementError> {
        let bad = |m: String| Err(PlacementError::Invalid(m));
        if let Some(r) = self.cpu_overcommit
            && !(r >= 1.0 && r.is_finite())
        {
            return bad(format!("cpu_overcommit {r} must be at least 1.0"));
        }
        if self.nodes.is_empty() {
            return bad("no nodes".into());
        }
        let mut names = BTreeSet::new();
        for n in &self.nodes {
            cim_events::token::validate_token("node", &n.name).map_err(|e| PlacementError::Invalid(e.to_string()))?;
            if !names.insert(n.name.as_str()) {
                return bad(format!("node {} is listed twice", n.name));
            }
            if !(n.cpus > 0.0 && n.cpus.is_finite()) {
                return bad(format!("node {}: cpus must be more than 0", n.name));
            }
        }
        let mut svcs = BTreeSet::new();
        for s in &self.services {
            canonical_service(&s.name)?;
            if !svcs.insert(canonical_service(&s.name)?) {
                return bad(format!("service {} is listed twice", s.name));
            }
            if s.memory_max.0 == 0 {
                return bad(format!("service {}: memory_max must be more than 0", s.name));
            }
            if !(s.cpu > 0.0 && s.cpu.is_finite()) {
                return bad(format!("service {}: cpu must be more than 0", s.name));
            }
        }
        if let Some(a) = &self.assignments {
            for (node, list) in a {
                if !names.contains(node.as_str()) {
                    return Err(PlacementError::UnknownNode(node.clone()));
                }
                for s in list {
                    let c = canonical_service(s)?;
                    if !svcs.contains(&c) {
                        return bad(format!("assignment on {node} names {s}, which is not in services"));
                    }
                }
            }
        }
        Ok(())
    }
}

/// The service name of a component, given its service name or token; anything else is an
/// unknown service.
pub fn canonical_service(name: &str) -> Result<&'static str, PlacementError> {
    Component::parse(name).map(Component::service_name).map_err(|_| PlacementError::UnknownService {
        name: name.to_string(),
        known: Component::ALL.map(Component::service_name).join(", "),
    })
}

/// One service replica placed on a node, with what systemd needs.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Placed {
    pub service: String,
    pub memory_max_bytes: u64,
    pub cpu: f64,
    /// systemd `CPUWeight` (100 = one core's share).
    pub cpu_weight: u32,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct NodeReport {
    pub name: String,
    pub memory_bytes: u64,
    pub reserved_bytes: u64,
    pub allocatable_bytes: u64,
    pub memory_used_bytes: u64,
    pub cpus: f64,
    pub cpu_limit: f64,
    pub cpu_used: f64,
    pub labels: BTreeMap<String, String>,
    pub services: Vec<Placed>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Report {
    pub fits: bool,
    /// True when the placement was computed here, false when the file's assignments were checked.
    pub proposed: bool,
    pub cpu_overcommit: f64,
    pub safety_buffer_bytes: u64,
    pub problems: Vec<String>,
    pub nodes: Vec<NodeReport>,
}

struct Bin<'a> {
    spec: &'a NodeSpec,
    allocatable: u64,
    used: u64,
    cpu_limit: f64,
    cpu_used: f64,
    placed: Vec<Placed>,
}

impl Bin<'_> {
    fn free(&self) -> u64 {
        self.allocatable.saturating_sub(self.used)
    }
    fn has(&self, service: &str) -> bool {
        self.placed.iter().any(|p| p.service == service)
    }
    fn put(&mut self, s: &ServiceSpec, service: &str) {
        self.used += s.memory_max.0;
        self.cpu_used += s.cpu;
        self.placed.push(Placed {
            service: service.to_string(),
            memory_max_bytes: s.memory_max.0,
            cpu: s.cpu,
            cpu_weight: (s.cpu * 100.0).round().clamp(1.0, 10000.0) as u32,
        });
    }
}

/// Checks the file's assignments, or (without them, or with `propose`) computes a placement.
pub fn check(file: &PlacementFile, propose: bool) -> Report {
    let ratio = file.cpu_overcommit.unwrap_or(DEFAULT_CPU_OVERCOMMIT);
    let buffer = file.safety_buffer.map(|b| b.0).unwrap_or(DEFAULT_SAFETY_BUFFER);
    let mut bins: Vec<Bin> = file
        .nodes
        .iter()
        .map(|n| Bin {
            spec: n,
            allocatable: n.memory.0.saturating_sub(n.reserved.0).saturating_sub(buffer),
            used: 0,
            cpu_limit: n.cpus * ratio,
            cpu_used: 0.0,
            placed: Vec::new(),
        })
        .collect();
    let specs: BTreeMap<&'static str, &ServiceSpec> =
        file.services.iter().filter_map(|s| canonical_service(&s.name).ok().map(|c| (c, s))).collect();
    let mut problems = Vec::new();
    let proposed = propose || file.assignments.is_none();
    if proposed {
        // Largest memory first; replicas of one service on distinct nodes when possible, each on
        // the node with the most memory left (spreads load, keeps room for big services).
        let mut order: Vec<(&'static str, &ServiceSpec)> = specs.iter().map(|(k, v)| (*k, *v)).collect();
        order.sort_by(|a, b| b.1.memory_max.0.cmp(&a.1.memory_max.0).then(a.0.cmp(b.0)));
        for (name, s) in order {
            for r in 0..s.replicas {
                let fits = |b: &Bin| b.free() >= s.memory_max.0 && b.cpu_used + s.cpu <= b.cpu_limit + 1e-9;
                let pick = |spread: bool, bins: &[Bin]| {
                    bins.iter()
                        .enumerate()
                        .filter(|(_, b)| fits(b) && (!spread || !b.has(name)))
                        .max_by(|(_, a), (_, b)| a.free().cmp(&b.free()).then(b.spec.name.cmp(&a.spec.name)))
                        .map(|(i, _)| i)
                };
                match pick(true, &bins).or_else(|| pick(false, &bins)) {
                    Some(i) => bins[i].put(s, name),
                    None => {
                        let best = bins.iter().max_by_key(|b| b.free());
                        let cpu_best = bins.iter().map(|b| b.cpu_limit - b.cpu_used).fold(0.0f64, f64::max);
                        let why = match best {
                            Some(b) if b.free() < s.memory_max.0 => format!(
                                "{name} needs {}, {} has {} allocatable (the most left on any node)",
                                human(s.memory_max.0),
                                b.spec.name,
                                human(b.free())
                            ),
                            _ => format!(
                                "{name} needs {:.2} CPU shares, at most {cpu_best:.2} are left on any node (overcommit {ratio})",
                                s.cpu
                            ),
                        };
                        problems.push(format!("replica {} of {}: {why}", r + 1, s.replicas,));
                    }
                }
            }
        }
    } else if let Some(assign) = &file.assignments {
        let mut count: BTreeMap<&str, u32> = BTreeMap::new();
        for b in bins.iter_mut() {
            for svc in assign.get(&b.spec.name).into_iter().flatten() {
                let Ok(name) = canonical_service(svc) else { continue };
                let Some(s) = specs.get(name) else { continue };
                *count.entry(name).or_default() += 1;
                if b.free() < s.memory_max.0 {
                    problems.push(format!(
                        "{name} needs {}, {} has {} allocatable",
                        human(s.memory_max.0),
                        b.spec.name,
                        human(b.free())
                    ));
                }
                b.put(s, name);
            }
            if b.cpu_used > b.cpu_limit + 1e-9 {
                problems.push(format!(
                    "{}: CPU shares {:.2} exceed {} cpus x overcommit {ratio} = {:.2}",
                    b.spec.name, b.cpu_used, b.spec.cpus, b.cpu_limit
                ));
            }
        }
        for (name, s) in &specs {
            let have = count.get(name).copied().unwrap_or(0);
            if have != s.replicas {
                problems.push(format!("{name}: {have} of {} replicas placed", s.replicas));
            }
        }
    }
    for b in &bins {
        if b.allocatable == 0 {
            problems.push(format!(
                "{}: nothing allocatable ({} physical - {} reserved - {} safety buffer)",
                b.spec.name,
                human(b.spec.memory.0),
                human(b.spec.reserved.0),
                human(buffer)
            ));
        }
    }
    Report {
        fits: problems.is_empty(),
        proposed,
        cpu_overcommit: ratio,
        safety_buffer_bytes: buffer,
        problems,
        nodes: bins
            .into_iter()
            .map(|b| NodeReport {
                name: b.spec.name.clone(),
                memory_bytes: b.spec.memory.0,
                reserved_bytes: b.spec.reserved.0,
                allocatable_bytes: b.allocatable,
                memory_used_bytes: b.used,
                cpus: b.spec.cpus,
                cpu_limit: b.cpu_limit,
                cpu_used: b.cpu_used,
                labels: b.spec.labels.clone(),
                services: b.placed,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(assign: &str) -> String {
        format!(
            r#"{{
              "cpu_overcommit": 4.0,
              "safety_buffer": "100MiB",
              "nodes": [
                {{"name": "n1", "memory": "2GiB", "reserved": "512MiB", "cpus": 2}},
                {{"name": "n2", "memory": "1GiB", "reserved": "624MiB", "cpus": 1}}
              ],
              "services": [
                {{"name": "ui-gateway", "replicas": 2, "memory_max": "512MiB", "cpu": 0.5}},
                {{"name": "registry", "memory_max": "128MiB", "cpu": 0.25}}
              ]{assign}
            }}"#
        )
    }

    #[test]
    fn sizes_parse_like_systemd() {
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("1.5 GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert!(parse_size("12 parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse_size("lots").is_err());
        assert_eq!(human(300 << 20), "300 MiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
    }

    #[test]
    fn a_fitting_assignment_is_accepted() {
        let f =
            PlacementFile::parse(&file(r#", "assignments": {"n1": ["ui-gateway", "registry"], "n2": []}"#)).unwrap();
        // n1: 2048 - 512 - 100 = 1436 MiB allocatable; but ui-gateway has 2 replicas
        let r = check(&f, false);
        assert!(!r.fits);
        assert_eq!(r.problems, vec!["ui-gateway: 1 of 2 replicas placed".to_string()]);
        let f = PlacementFile::parse(&file(r#", "assignments": {"n1": ["ui-gateway", "ui-gateway", "registry"]}"#))
            .unwrap();
        let r = check(&f, false);
        assert!(r.fits, "{:?}", r.problems);
        assert_eq!(r.nodes[0].allocatable_bytes, 1436 << 20);
        assert_eq!(r.nodes[0].memory_used_bytes, (512 + 512 + 128) << 20);
        assert_eq!(r.nodes[0].services[0].cpu_weight, 50);
    }

    #[test]
    fn a_non_fitting_assignment_says_exactly_why() {
        // n2: 1024 - 624 - 100 = 300 MiB allocatable
        let f =
            PlacementFile::parse(&file(r#", "assignments": {"n1": ["ui-gateway", "registry"], "n2": ["ui-gateway"]}"#))
                .unwrap();
        let r = check(&f, false);
        assert!(!r.fits);
        assert_eq!(r.problems, vec!["ui-gateway needs 512 MiB, n2 has 300 MiB allocatable".to_string()]);
    }

    #[test]
    fn cpu_may_be_overcommitted_up_to_the_ratio() {
        let text = r#"{"cpu_overcommit": 2.0, "nodes": [{"name": "n1", "memory": "64GiB", "cpus": 1}],
            "services": [{"name": "iu", "replicas": 1, "memory_max": "1GiB", "cpu": 1.5}, {"name": "hub", "memory_max": "1GiB", "cpu": 1.0}],
            "assignments": {"n1": ["iu", "hub"]}}"#;
        let r = check(&PlacementFile::parse(text).unwrap(), false);
        assert_eq!(r.problems, vec!["n1: CPU shares 2.50 exceed 1 cpus x overcommit 2 = 2.00".to_string()]);
        let ok = text.replace("\"cpu\": 1.5", "\"cpu\": 1.0");
        assert!(check(&PlacementFile::parse(&ok).unwrap(), false).fits);
    }

    #[test]
    fn a_proposal_spreads_replicas_or_explains_what_is_missing() {
        let f = PlacementFile::parse(&file("")).unwrap();
        let r = check(&f, false);
        assert!(r.proposed);
        // both ui-gateway replicas only fit on n1 (n2 has 300 MiB), so they share it; registry
        // goes where the most memory is left (n1: 412 MiB)
        assert!(r.fits, "{:?}", r.problems);
        let n1: Vec<&str> = r.nodes[0].services.iter().map(|p| p.service.as_str()).collect();
        assert_eq!(n1, vec!["ui-gateway", "ui-gateway", "registry"]);
        assert!(r.nodes[1].services.is_empty());

        let big = file("").replace("\"replicas\": 2", "\"replicas\": 3");
        let r = check(&PlacementFile::parse(&big).unwrap(), true);
        assert!(!r.fits);
        assert_eq!(
            r.problems,
            vec![
                "replica 3 of 3: ui-gateway needs 512 MiB, n1 has 412 MiB allocatable (the most left on any node)"
                    .to_string()
            ]
        );

        let spread = r#"{"nodes": [{"name": "a", "memory": "4GiB", "cpus": 2}, {"name": "b", "memory": "4GiB", "cpus": 2}],
            "services": [{"name": "registry", "replicas": 2, "memory_max": "256MiB"}]}"#;
        let r = check(&PlacementFile::parse(spread).unwrap(), true);
        assert!(r.nodes.iter().all(|n| n.services.len() == 1), "{r:?}");
    }

    #[test]
    fn bad_files_are_refused_clearly() {
        let e = PlacementFile::parse("{ nodes: ").unwrap_err();
        assert!(matches!(e, PlacementError::Parse(_)) && e.to_string().contains("line 1"), "{e}");
        let e = PlacementFile::parse(&file("").replace("ui-gateway", "ui-gatway")).unwrap_err();
        assert_eq!(e.to_string().split(" (known").next().unwrap(), "unknown service \"ui-gatway\"");
        let e = PlacementFile::parse(&file(r#", "assignments": {"n7": ["registry"]}"#)).unwrap_err();
        assert_eq!(e, PlacementError::UnknownNode("n7".into()));
        let e = PlacementFile::parse(&file("").replace("\"512MiB\"", "\"512 parsecs\"")).unwrap_err();
        assert!(e.to_string().contains("unknown unit"), "{e}");
        let e = PlacementFile::parse(&file("").replace("\"cpus\": 2", "\"cpus\": 2, \"gpus\": 1")).unwrap_err();
        assert!(e.to_string().contains("unknown field `gpus`"), "{e}");
        let e = PlacementFile::parse(&file(r#", "assignments": {"n1": ["storage-manager"]}"#)).unwrap_err();
        assert!(e.to_string().contains("not in services"), "{e}");
    }
}
