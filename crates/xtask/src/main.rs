//! `cargo xtask <task>`: the project's repetitive developer tasks, with no dependencies.
//!
//! - `tidy [CHECK…]`: formatting, clippy, names only in cim-events, crate boundaries, no test
//!   harness in a shipped binary, docs current (tidy.rs); each failure says what to do.
//! - `test [--stress] [ARGS]`: tidy, then install the test tools that are missing (tools.rs),
//!   build every binary (the integration tests run the real service processes), then run the
//!   whole suite with cargo-nextest (ARGS go to it). `--stress` runs it while busy loops take
//!   every core (stress.rs).
//! - `up`: install nats-server if missing (tools.rs), build every binary, then `cimctl up` (a
//!   leaf node with all services).
//! - `bench [SCENARIO] [options]`: install nats-server if missing, build every binary in release
//!   mode (the benchmarks run the real services), then run `cim-bench` (every scenario, or the one named; `all` writes the
//!   envelope and information-unit table to docs/bench-latest.md).
//! - `codegen`: writes the generated parts of the Python package (python.rs).
//! - `pytest [ARGS]`: sets up `.cim/venv` when missing or stale, then runs the Python tests
//!   (`test` runs them after the Rust suite).
//! - `pybench [ARGS]`: a Python plugin invocation vs the Rust native plugin's
//!   (python/bench/plugin_invoke.py, against a release build of plugin-native-example).

mod python;
mod stress;
mod tidy;
mod tools;

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
        "pybench" => pybench(&rest),
        _ => {
            eprintln!(
                "usage: cargo xtask <tidy [CHECK…]|test|up|bench [SCENARIO]|codegen|pytest|pybench> [args passed on]"
            );
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

fn test(rest: &[String]) -> Result<(), String> {
    // `--stress`: the tests run while busy loops take every core (stress.rs).
    let stress = rest.iter().any(|a| a == "--stress");
    let rest: Vec<&String> = rest.iter().filter(|a| *a != "--stress").collect();
    tidy::tidy(&[])?;
    let tools = tools::Tools::new(&root());
    tools.for_tests()?;
    run(cargo().args(["build", "--workspace", "--bins", "--tests"]))?;
    ui_test_tools();
    let _hog = stress.then(stress::Hog::start);
    let mut tests = cargo();
    tests.env("PATH", tools.path());
    if tools.has_nextest() {
        tests.args(["nextest", "run", "--workspace", "--no-fail-fast"]).args(&rest);
    } else {
        tests.args(["test", "--workspace", "--no-fail-fast"]).args(&rest);
    }
    let rust = run(&mut if stress { stress::favoured(&tests) } else { tests });
    // The Python tests run even when a Rust test failed: both verdicts are reported.
    let python = pytest(&[]);
    rust.and(python)
}

/// The web UI's accessibility check (axe-core, run by the browser test on every page) comes
/// from the UI's locked dev dependencies. Where npm is present and they are not installed,
/// `npm ci` installs them into the ignored `ui/node_modules`; without npm (or without the
/// registry) the browser test runs without it and says so.
fn ui_test_tools() {
    let axe = root().join("ui/node_modules/axe-core/axe.min.js");
    if axe.exists() {
        return;
    }
    if !Command::new("npm").arg("--version").output().is_ok_and(|o| o.status.success()) {
        eprintln!("xtask: npm is missing; the browser test skips its accessibility check (axe-core)");
        return;
    }
    eprintln!("xtask: installing the web UI's locked dev dependencies for its accessibility check (npm ci)");
    let ui = root().join("ui");
    if let Err(e) = run(Command::new("npm").args(["ci", "--no-audit", "--no-fund", "--prefix"]).arg(&ui)) {
        eprintln!("xtask: {e}; the browser test skips its accessibility check");
    }
}

/// The Python tools' home: a virtual environment inside the ignored `.cim/`.
fn venv() -> std::path::PathBuf {
    root().join(".cim/venv")
}

/// Where the tests' Python comes from: an interpreter and extra environment.
struct PythonEnv {
    python: std::path::PathBuf,
    env: Vec<(String, std::ffi::OsString)>,
}

/// Sets up the Python tests' tools, once: `.cim/venv` with the package (editable) and its test
/// dependencies (nats-py, protobuf, pytest; hatchling builds it). Where `python3 -m venv` is
/// unavailable (Debian without python3-venv) the dependencies go to `.cim/python` with
/// `pip install --target` and the package is imported from the source tree. Done again only
/// when python/pyproject.toml changed (its copy next to the tools is the stamp).
fn python_setup() -> Result<PythonEnv, String> {
    let pyproject = root().join("python/pyproject.toml");
    let wanted = std::fs::read(&pyproject).map_err(|e| format!("{}: {e}", pyproject.display()))?;
    let python3 = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let package = format!("{}[test]", root().join("python").display());
    let venv = venv();
    let python = venv.join("bin/python");
    let stamp = venv.join("cim-pyproject.toml");
    if python.exists() && std::fs::read(&stamp).is_ok_and(|s| s == wanted) {
        return Ok(PythonEnv { python, env: Vec::new() });
    }
    let quiet = ["install", "--quiet", "--disable-pip-version-check"];
    if python.exists() || Command::new(&python3).args(["-m", "venv"]).arg(&venv).status().is_ok_and(|s| s.success()) {
        eprintln!(
            "xtask: installing the cim package (editable) with nats-py, protobuf and pytest into {}",
            venv.display()
        );
        run(Command::new(&python).arg("-m").arg("pip").args(quiet).arg("-e").arg(&package))?;
        std::fs::write(&stamp, wanted).map_err(|e| format!("{}: {e}", stamp.display()))?;
        return Ok(PythonEnv { python, env: Vec::new() });
    }
    let _ = std::fs::remove_dir_all(&venv);
    let target = root().join(".cim/python");
    let path = std::env::join_paths([root().join("python"), target.clone()]).map_err(|e| e.to_string())?;
    let env = vec![("PYTHONPATH".to_string(), path)];
    let stamp = target.join("cim-pyproject.toml");
    if !std::fs::read(&stamp).is_ok_and(|s| s == wanted) {
        eprintln!("xtask: no python3 -m venv here: installing nats-py, protobuf and pytest into {}", target.display());
        let _ = std::fs::remove_dir_all(&target);
        run(Command::new(&python3).arg("-m").arg("pip").args(quiet).arg("--target").arg(&target).arg(&package))?;
        std::fs::write(&stamp, wanted).map_err(|e| format!("{}: {e}", stamp.display()))?;
    }
    Ok(PythonEnv { python: python3.into(), env })
}

/// `cargo xtask pytest [ARGS]`: the Python tests, against the binaries in target/debug (built
/// by `test` before).
fn pytest(rest: &[String]) -> Result<(), String> {
    let py = python_setup()?;
    let tools = tools::Tools::new(&root());
    tools.nats_server()?;
    run(tools
        .command(&py.python)
        .current_dir(root().join("python"))
        .envs(py.env.iter().map(|(k, v)| (k, v)))
        .env("CIM_BIN_DIR", target_dir().join("debug"))
        .args(["-m", "pytest", "-q"])
        .args(rest))
}

fn pybench(rest: &[String]) -> Result<(), String> {
    run(cargo().args(["build", "--release", "-p", "plugin-native-example"]))?;
    let py = python_setup()?;
    run(Command::new(&py.python)
        .current_dir(root().join("python"))
        .envs(py.env.iter().map(|(k, v)| (k, v)))
        .arg("bench/plugin_invoke.py")
        .arg("--bin-dir")
        .arg(target_dir().join("release"))
        .args(rest))
}

fn up(rest: &[String]) -> Result<(), String> {
    let tools = tools::Tools::new(&root());
    tools.nats_server()?;
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    let exe = target_dir().join("debug").join("cimctl");
    run(tools.command(exe).arg("up").args(rest))
}

fn bench(rest: &[String]) -> Result<(), String> {
    // the benchmarks start their own nats-servers
    let tools = tools::Tools::new(&root());
    tools.nats_server()?;
    run(cargo().args(["build", "--release", "--workspace", "--bins"]))?;
    let exe = target_dir().join("release").join("cim-bench");
    let args = bench_args(rest);
    run(tools.command(exe).args(args))
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
