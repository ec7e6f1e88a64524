//! `cargo xtask <task>`: the project's repetitive developer tasks, with no dependencies.
//!
//! - `tidy [CHECK…]`: formatting, clippy, names only in cim-events, crate boundaries, no test
//!   harness in a shipped binary, docs current (tidy.rs); each failure says what to do.
//! - `test`: tidy, then build every binary (the integration tests run the real service
//!   processes), then run the whole suite with cargo-nextest (or `cargo test` when absent).
//! - `up`: build every binary, then `cimctl up` (a leaf node with all services).
//! - `bench [SCENARIO] [options]`: build every binary in release mode (the benchmarks run the
//!   real services), then run `cim-bench` (every scenario, or the one named; `all` writes the
//!   envelope and information-unit table to docs/bench-latest.md).
//! - `codegen`: writes the generated parts of the Python package (python.rs).
//! - `pytest [ARGS]`: sets up `.cim/venv` when missing or stale, then runs the Python tests
//!   (`test` runs them after the Rust suite).

mod python;
mod tidy;

use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (task, rest) = match args.split_first() {
        Some((t, r)) => (t.as_str(), r.to_vec()),
        None => ("help", Vec::new()),
    };
    let result = match task {
        "tidy" => tidy::tidy(&rest),
        "test" => test(&rest),
        "up" => up(&rest),
        "bench" => bench(&rest),
        "codegen" => python::codegen(&root()),
        "pytest" => pytest(&rest),
        _ => {
            eprintln!("usage: cargo xtask <tidy [CHECK…]|test|up|bench [SCENARIO]|codegen|pytest> [args passed on]");
            return ExitCode::from(if task == "help" { 0 } else { 64 });
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask {task}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn run(cmd: &mut Command) -> Result<(), String> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("{cmd:?} failed: {status}")) }
}

fn has_nextest() -> bool {
    cargo().args(["nextest", "--version"]).output().is_ok_and(|o| o.status.success())
}

fn test(rest: &[String]) -> Result<(), String> {
    tidy::tidy(&[])?;
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    let rust = if has_nextest() {
        run(cargo().args(["nextest", "run", "--workspace", "--no-fail-fast"]).args(rest))
    } else {
        run(cargo().args(["test", "--workspace", "--no-fail-fast"]).args(rest))
    };
    // The Python tests run even when a Rust test failed: both verdicts are reported.
    let python = pytest(&[]);
    rust.and(python)
}

/// The Python tools' home: a virtual environment inside the ignored `.cim/`.
fn venv() -> std::path::PathBuf {
    root().join(".cim/venv")
}

/// Creates `.cim/venv` and installs the package (editable) with its test dependencies:
/// nats-py, protobuf, pytest (and hatchling, to build it). Done again only when
/// python/pyproject.toml changed (its copy in the venv is the stamp).
fn python_setup() -> Result<std::path::PathBuf, String> {
    let venv = venv();
    let python = venv.join("bin/python");
    let pyproject = root().join("python/pyproject.toml");
    let stamp = venv.join("cim-pyproject.toml");
    let wanted = std::fs::read(&pyproject).map_err(|e| format!("{}: {e}", pyproject.display()))?;
    if python.exists() && std::fs::read(&stamp).is_ok_and(|s| s == wanted) {
        return Ok(python);
    }
    eprintln!("xtask: setting up {} (nats-py, protobuf, pytest; the cim package editable)", venv.display());
    let python3 = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    if !python.exists() {
        run(Command::new(&python3).args(["-m", "venv"]).arg(&venv))?;
    }
    run(Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-e"])
        .arg(format!("{}[test]", root().join("python").display())))?;
    std::fs::write(&stamp, wanted).map_err(|e| format!("{}: {e}", stamp.display()))?;
    Ok(python)
}

/// `cargo xtask pytest [ARGS]`: the Python tests, against the binaries in target/debug (built
/// by `test` before).
fn pytest(rest: &[String]) -> Result<(), String> {
    let python = python_setup()?;
    run(Command::new(python)
        .current_dir(root().join("python"))
        .env("CIM_BIN_DIR", target_dir().join("debug"))
        .args(["-m", "pytest", "-q"])
        .args(rest))
}

fn up(rest: &[String]) -> Result<(), String> {
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    let exe = target_dir().join("debug").join("cimctl");
    run(Command::new(exe).arg("up").args(rest))
}

fn bench(rest: &[String]) -> Result<(), String> {
    run(cargo().args(["build", "--release", "--workspace", "--bins"]))?;
    let exe = target_dir().join("release").join("cim-bench");
    let args = bench_args(rest);
    run(Command::new(exe).args(args))
}

/// `cim-bench`'s arguments for `cargo xtask bench REST`: the scenario named first (`all` when
/// none is), and for `all` the table written to docs/bench-latest.md unless `--out` is given.
fn bench_args(rest: &[String]) -> Vec<String> {
    let (scenario, options) = match rest.split_first() {
        Some((s, o)) if !s.starts_with('-') => (s.clone(), o.to_vec()),
        _ => ("all".to_string(), rest.to_vec()),
    };
    let mut args = vec![scenario];
    if args[0] == "all" && !options.iter().any(|a| a == "--out") {
        args.extend(["--out".to_string(), "docs/bench-latest.md".to_string()]);
    }
    args.extend(options);
    args
}

/// The workspace root.
fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn target_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(Into::into)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        bench_args(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn bench_runs_all_or_the_named_scenario() {
        assert_eq!(args(&[]), ["all", "--out", "docs/bench-latest.md"]);
        assert_eq!(args(&["all", "--out", "x.md"]), ["all", "--out", "x.md"]);
        assert_eq!(args(&["envelope", "--rounds", "1"]), ["envelope", "--rounds", "1"]);
        assert_eq!(args(&["storage"]), ["storage"]);
    }
}
