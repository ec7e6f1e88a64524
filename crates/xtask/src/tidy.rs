//! `cargo xtask tidy`: the checks that keep the workspace one shape, each failing with what to
//! do. Formatting and clippy, no CIM name spelled outside `cim-events`, crate boundaries (no
//! service crate depends on another, no test harness in a shipped binary), and the generated
//! or hand-kept docs that must follow the code (docs/SUBJECTS.md, the ARCHITECTURE code map),
//! and the Python package's generated table and protobuf classes (python.rs), outside of which
//! Python spells no CIM name either.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{cargo, root, run};

/// The seven services: a crate with component logic, that no other service may depend on.
pub const SERVICES: [&str; 7] = [
    "information-unit",
    "registry",
    "pipeline-engine",
    "plugin-host",
    "storage-manager",
    "ui-gateway",
    "integration-hub",
];

/// Crates whose binaries are shipped (flake packages, NixOS modules): the test harness must
/// not be linked into them.
const SHIPPED: [&str; 2] = ["cimctl", "plugin-native-example"];

/// Runs every check, or only those named in `only` (e.g. `cargo xtask tidy names code-map`).
pub fn tidy(only: &[String]) -> Result<(), String> {
    let root = root();
    let mut failures = Vec::new();
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| o.replace('-', " ") == name);
    let mut check =
        |name: &str, result: &dyn Fn() -> Result<(), String>| match (wanted(name), wanted(name).then(result)) {
            (false, _) => {}
            (true, Some(Ok(()))) | (true, None) => eprintln!("tidy: {name}: ok"),
            (true, Some(Err(e))) => {
                eprintln!("tidy: {name}: FAILED\n{e}");
                failures.push(name.to_string());
            }
        };
    check("formatting", &|| {
        run(cargo().current_dir(&root).args(["fmt", "--all", "--check"]))
            .map_err(|_| "  the tree is not formatted: run `cargo fmt` and commit the result".to_string())
    });
    check("names", &|| names(&root));
    check("crate boundaries", &|| boundaries(&root));
    check("shipped binaries", &|| shipped(&root));
    check("code map", &|| code_map(&root));
    check("subject reference", &|| {
        run(cargo().current_dir(&root).args(["test", "-q", "-p", "cim-events", "--lib", "docs_reference_is_current"]))
            .map_err(|_| {
                "  docs/SUBJECTS.md is stale: run `CIM_BLESS=1 cargo test -p cim-events` and commit it".to_string()
            })
    });
    check("python generated", &|| crate::python::check(&root));
    check("python names", &|| python_names(&root));
    check("clippy", &|| {
        run(cargo().current_dir(&root).args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))
            .map_err(|_| "  clippy found problems (above): fix them; `#[allow]` only with a reason".to_string())
    });
    if failures.is_empty() { Ok(()) } else { Err(format!("tidy failed: {}", failures.join(", "))) }
}

/// Rust files under `dir`, sorted.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n == "target" || n == "node_modules") {
                continue;
            }
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The string literals of a Rust source with their line numbers (comments skipped; raw
/// strings and escapes handled well enough for names, which never hold quotes).
pub fn string_literals(src: &str) -> Vec<(usize, String)> {
    let b = src.as_bytes();
    let (mut i, mut line, mut out) = (0, 1, Vec::new());
    while i < b.len() {
        match b[i] {
            b'\n' => line += 1,
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    if b[i] == b'\n' {
                        line += 1;
                    }
                    i += 1;
                }
                i += 2;
                continue;
            }
            // a char literal such as '"' must not open a string; lifetimes ('a) are skipped too
            b'\'' => {
                if b.get(i + 2) == Some(&b'\'') {
                    i += 3;
                    continue;
                }
                if b.get(i + 1) == Some(&b'\\')
                    && let Some(end) = src[i + 2..].find('\'')
                {
                    i += end + 3;
                    continue;
                }
            }
            b'r' if (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#'))
                && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')) =>
            {
                let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
                if b.get(i + 1 + hashes) == Some(&b'"') {
                    let start = i + 2 + hashes;
                    let close = format!("\"{}", "#".repeat(hashes));
                    let end = src[start..].find(&close).map(|e| start + e).unwrap_or(b.len());
                    let text = &src[start..end];
                    out.push((line, text.to_string()));
                    line += text.matches('\n').count();
                    i = end + close.len();
                    continue;
                }
            }
            b'"' => {
                let start = i + 1;
                let mut j = start;
                while j < b.len() && b[j] != b'"' {
                    if b[j] == b'\\' {
                        j += 1;
                    }
                    j += 1;
                }
                let text = &src[start..j.min(b.len())];
                out.push((line, text.to_string()));
                line += text.matches('\n').count();
                i = j + 1;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// The stream and bucket names of the contract, read from the generated reference.
fn contract_names(root: &Path) -> Result<BTreeSet<String>, String> {
    let text = fs::read_to_string(root.join("docs/SUBJECTS.md")).map_err(|e| format!("  docs/SUBJECTS.md: {e}"))?;
    let mut names = BTreeSet::new();
    for part in text.split('`').skip(1).step_by(2) {
        let looks_like_name = part.len() > 4
            && part.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
            && (part.starts_with("CIM_")
                || part.starts_with("OBJ_cim_")
                || part.starts_with("KV_cim_")
                || part.starts_with("cim_"));
        if looks_like_name {
            names.insert(part.to_string());
        }
    }
    if names.is_empty() {
        return Err("  docs/SUBJECTS.md names no stream or bucket: regenerate it".into());
    }
    Ok(names)
}

/// Why a literal spells a CIM name, if it does.
pub fn spelled_name(literal: &str, names: &BTreeSet<String>) -> Option<String> {
    for kind in ["evt", "cmd", "qry", "svc", "dlq", "plg", "ctl"] {
        let prefix = format!("cim.{kind}.");
        if literal.contains(&prefix) || literal == format!("cim.{kind}") {
            return Some(format!("subject {prefix}…"));
        }
    }
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    for name in names {
        for (at, _) in literal.match_indices(name.as_str()) {
            let before = literal[..at].chars().next_back();
            let after = literal[at + name.len()..].chars().next();
            if !before.is_some_and(is_word) && !after.is_some_and(is_word) {
                return Some(name.clone());
            }
        }
    }
    None
}

/// No CIM subject, stream or bucket name as a string literal outside `crates/cim-events`.
fn names(root: &Path) -> Result<(), String> {
    let names = contract_names(root)?;
    let mut files = Vec::new();
    rust_files(&root.join("crates"), &mut files);
    rust_files(&root.join("integration-tests"), &mut files);
    // the contract itself, and this checker (its tests spell names on purpose)
    let exempt = [root.join("crates/cim-events"), root.join("crates/xtask")];
    let mut found = Vec::new();
    for f in files.iter().filter(|f| !exempt.iter().any(|e| f.starts_with(e))) {
        let src = fs::read_to_string(f).map_err(|e| format!("  {}: {e}", f.display()))?;
        for (line, lit) in string_literals(&src) {
            if let Some(what) = spelled_name(&lit, &names) {
                let rel = f.strip_prefix(root).unwrap_or(f);
                found.push(format!("  {}:{line}: {what} in {lit:?}", rel.display()));
            }
        }
    }
    if found.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{}\n  subjects, streams and buckets are built only by crates/cim-events: call its builders \
         (cim_events::subject, resources, iu, pipeline, …) instead of spelling the name",
        found.join("\n")
    ))
}

/// Python files under `dir`, sorted, without the generated ones.
fn python_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if p.is_dir() {
            if name != "proto" && name != "__pycache__" && !name.starts_with('.') {
                python_files(&p, out);
            }
        } else if name.ends_with(".py") && name != "_subjects.py" {
            out.push(p);
        }
    }
}

/// No CIM subject, stream or bucket name in the Python package outside its generated table
/// (`python/cim/_subjects.py`): every line but comments is searched, docstrings included.
fn python_names(root: &Path) -> Result<(), String> {
    let names = contract_names(root)?;
    let mut files = Vec::new();
    python_files(&root.join("python"), &mut files);
    let mut found = Vec::new();
    for f in files {
        let src = fs::read_to_string(&f).map_err(|e| format!("  {}: {e}", f.display()))?;
        for (i, line) in src.lines().enumerate() {
            if line.trim_start().starts_with('#') {
                continue;
            }
            if let Some(what) = spelled_name(line, &names) {
                let rel = f.strip_prefix(root).unwrap_or(&f);
                found.push(format!("  {}:{}: {what}", rel.display(), i + 1));
            }
        }
    }
    if found.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{}\n  Python takes every name from the generated table python/cim/_subjects.py (through cim.subjects)",
        found.join("\n")
    ))
}

/// The dependency names of one manifest section kind (`dependencies`, `dev-dependencies`, …).
pub fn manifest_dependencies(manifest: &str) -> BTreeSet<String> {
    let mut deps = BTreeSet::new();
    let mut in_deps = false;
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_deps = line.ends_with("dependencies]");
            continue;
        }
        if in_deps && let Some((key, _)) = line.split_once('=') {
            let key = key.trim();
            if !key.is_empty() && !key.starts_with('#') {
                deps.insert(key.split('.').next().unwrap_or(key).trim_matches('"').to_string());
            }
        }
    }
    deps
}

/// A service crate never depends on another service crate (in any dependency section).
fn boundaries(root: &Path) -> Result<(), String> {
    let mut found = Vec::new();
    for service in SERVICES {
        let path = root.join("crates").join(service).join("Cargo.toml");
        let manifest = fs::read_to_string(&path).map_err(|e| format!("  {}: {e}", path.display()))?;
        for dep in manifest_dependencies(&manifest) {
            if dep != service && SERVICES.contains(&dep.as_str()) {
                found.push(format!("  crates/{service} depends on the service crate {dep}"));
            }
        }
    }
    if found.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{}\n  services share only cim-events and plumbing crates: move what both need into a library crate",
        found.join("\n")
    ))
}

/// No shipped binary links the test harness.
fn shipped(root: &Path) -> Result<(), String> {
    let mut found = Vec::new();
    for krate in SERVICES.iter().chain(SHIPPED.iter()) {
        let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(root)
            .args(["tree", "-q", "-p", krate, "-e", "normal", "--prefix", "none"])
            .output()
            .map_err(|e| format!("  cannot run cargo tree: {e}"))?;
        if !out.status.success() {
            return Err(format!("  cargo tree -p {krate}: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        if String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with("cim-testkit ")) {
            found.push(format!("  {krate} links cim-testkit"));
        }
    }
    if found.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{}\n  cim-testkit is for tests and benchmarks: move what a shipped binary needs into a non-test crate",
        found.join("\n")
    ))
}

/// The paragraph of docs/ARCHITECTURE.md's code map about `crates/<name>`.
fn code_map_paragraph<'a>(doc: &'a str, krate: &str) -> Option<&'a str> {
    let head = format!("- `crates/{krate}`");
    let start = doc.find(&head)?;
    let rest = &doc[start + head.len()..];
    let end = rest.find("\n- ").or_else(|| rest.find("\n\n")).unwrap_or(rest.len());
    Some(&rest[..end])
}

/// The ARCHITECTURE code map names every crate, and every module of a service crate.
fn code_map(root: &Path) -> Result<(), String> {
    let doc =
        fs::read_to_string(root.join("docs/ARCHITECTURE.md")).map_err(|e| format!("  docs/ARCHITECTURE.md: {e}"))?;
    let mut found = Vec::new();
    let mut crates: Vec<_> = fs::read_dir(root.join("crates"))
        .map_err(|e| format!("  crates/: {e}"))?
        .flatten()
        .filter(|e| e.path().join("Cargo.toml").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    crates.sort();
    for krate in &crates {
        let Some(paragraph) = code_map_paragraph(&doc, krate) else {
            found.push(format!("  crates/{krate} has no paragraph (\"- `crates/{krate}` — …\")"));
            continue;
        };
        if !SERVICES.contains(&krate.as_str()) {
            continue;
        }
        let src = root.join("crates").join(krate).join("src");
        let mut modules: Vec<String> = fs::read_dir(&src)
            .map_err(|e| format!("  {}: {e}", src.display()))?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                if e.path().is_dir() {
                    Some(format!("{name}/"))
                } else if name.ends_with(".rs") && name != "lib.rs" && name != "main.rs" {
                    Some(name)
                } else {
                    None
                }
            })
            .collect();
        modules.sort();
        for m in modules {
            // `definition/` is named by `definition/validate.rs` as well
            let named = if m.ends_with('/') { format!("`{m}") } else { format!("`{m}`") };
            if !paragraph.contains(&named) {
                found.push(format!("  crates/{krate}/src/{m} is not named in its code-map paragraph"));
            }
        }
    }
    if found.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{}\n  docs/ARCHITECTURE.md's code map names every crate and every module of a service: add a line saying what it is for",
        found.join("\n")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_found_and_comments_skipped() {
        let src = "// \"cim.evt.x\" in a comment\nlet a = \"CIM_IU_EVENTS\"; let c = '\"'; let r = r#\"cim.cmd.iu.create\"#;\n/* \"x\" */ let b = \"a\\\"b\";";
        let lits: Vec<_> = string_literals(src).into_iter().map(|(_, l)| l).collect();
        assert_eq!(lits, vec!["CIM_IU_EVENTS", "cim.cmd.iu.create", "a\\\"b"]);
        assert_eq!(string_literals(src)[0].0, 2);
    }

    #[test]
    fn names_are_told_from_other_words() {
        let names: BTreeSet<String> = ["CIM_IU_EVENTS".to_string(), "cim_iu_content".to_string()].into();
        assert!(spelled_name("stream CIM_IU_EVENTS is gone", &names).is_some());
        assert!(spelled_name("$O.cim_iu_content.>", &names).is_some());
        assert!(spelled_name("cim.evt.iu.unit.x.created", &names).is_some());
        assert!(spelled_name("CIM_IU_EVENTS_X", &names).is_none());
        assert!(spelled_name("CIM_NATS_URL", &names).is_none());
        assert!(spelled_name("cim.example.com", &names).is_none());
    }

    #[test]
    fn manifest_dependencies_are_read() {
        let m = "[package]\nname = \"x\"\n[dependencies]\nregistry.workspace = true\ntokio = { workspace = true }\n# c = 1\n[dev-dependencies]\ncim-testkit.workspace = true\n[lints]\nworkspace = true\n";
        let d = manifest_dependencies(m);
        assert_eq!(d, ["cim-testkit", "registry", "tokio"].into_iter().map(String::from).collect());
    }
}
