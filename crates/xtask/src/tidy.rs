//! `cargo xtask tidy`: the checks that keep the workspace one shape, each failing with what to
//! do. Formatting and clippy, no CIM name spelled outside `cim-events`, crate boundaries (no
//! service crate depends on another, no test harness in a shipped binary), and the generated
//! or hand-kept docs that must follow the code (docs/SUBJECTS.md, the ARCHITECTURE code map),
//! the committed web UI bundle that must follow `ui/`, and the Python package's generated table
//! and protobuf classes (python.rs), outside of which Python spells no CIM name either.

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
    check("ui bundle", &|| ui_bundle(&root));
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

/// The web UI's bundle (`crates/ui-gateway/src/ui/dist`, embedded in the gateway) is built from
/// `ui/` by `npm --prefix ui run build`, which also writes `bundle.stamp`: the hash of the
/// sources and of the bundle. Both must still match, so a fresh machine needs no npm and the
/// committed bundle is never older than its sources nor edited by hand.
fn ui_bundle(root: &Path) -> Result<(), String> {
    let stamp_path = root.join("crates/ui-gateway/src/ui/bundle.stamp");
    let rebuild = "run `npm --prefix ui ci && npm --prefix ui run build` and commit crates/ui-gateway/src/ui";
    let stamp = fs::read_to_string(&stamp_path).map_err(|e| format!("  {}: {e}: {rebuild}", stamp_path.display()))?;
    let field =
        |name: &str| stamp.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' '))).map(str::trim);
    let sources = tree_hash(&root.join("ui")).map_err(|e| format!("  reading ui/: {e}"))?;
    if field("sources") != Some(sources.as_str()) {
        return Err(format!("  the web UI bundle is stale: ui/ changed since it was built: {rebuild}"));
    }
    let bundle = tree_hash(&root.join("crates/ui-gateway/src/ui/dist"))
        .map_err(|e| format!("  reading crates/ui-gateway/src/ui/dist: {e}"))?;
    if field("bundle") != Some(bundle.as_str()) {
        return Err(format!("  crates/ui-gateway/src/ui/dist is not what ui/ builds (edited by hand?): {rebuild}"));
    }
    Ok(())
}

/// The hex SHA-256 of a tree as `ui/scripts/stamp.mjs` computes it: every file but
/// `node_modules` and dot files, in byte order of its `/`-separated path relative to `root`,
/// as path, NUL, decimal length, NUL, contents.
pub fn tree_hash(root: &Path) -> std::io::Result<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> std::io::Result<()> {
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name == "node_modules" {
                continue;
            }
            let path = entry.path();
            let kind = entry.file_type()?;
            if kind.is_dir() {
                walk(root, &path, out)?;
            } else if kind.is_file() {
                let rel = path.strip_prefix(root).map_err(std::io::Error::other)?;
                let rel: Vec<_> = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
                out.push((rel.join("/"), path));
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(root, root, &mut files)?;
    files.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut data = Vec::new();
    for (rel, path) in files {
        let contents = fs::read(path)?;
        data.extend_from_slice(format!("{rel}\0{}\0", contents.len()).as_bytes());
        data.extend_from_slice(&contents);
    }
    Ok(sha256(&data).iter().map(|b| format!("{b:02x}")).collect())
}

/// SHA-256 (FIPS 180-4), here so that xtask keeps needing no dependencies.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
        0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
        0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
        0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
        0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
        0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
        0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] =
        [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16].wrapping_add(s0).wrapping_add(w[i - 7]).wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh.wrapping_add(s1).wrapping_add(ch).wrapping_add(K[i]).wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 32];
    for (i, v) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&v.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_known_answers() {
        let hex = |d: &[u8]| sha256(d).iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert_eq!(hex(b""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let long = vec![b'a'; 1000];
        assert_eq!(hex(&long), "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3");
    }

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
