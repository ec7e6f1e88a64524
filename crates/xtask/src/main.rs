//! `cargo xtask <task>`: the project's repetitive developer tasks, with no dependencies.
//!
//! - `tidy`:  formatting, clippy, names only in cim-events, crate boundaries, docs current
//!            (tidy.rs); each failure says what to do.
//! - `test`:  tidy, then build every binary (the integration tests run the real service
//!            processes), then run the whole suite with cargo-nextest (or `cargo test`).
//! - `up`:    build every binary, then `cimctl up` (a leaf node with all services).
//! - `bench`: build every binary in release mode (the information-unit scenarios run the real
//!            service), then run `cimctl bench`, writing docs/bench-latest.md.

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
        _ => {
            eprintln!("usage: cargo xtask <tidy|test|up|bench> [args passed on]");
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
    if has_nextest() {
        run(cargo().args(["nextest", "run", "--workspace", "--no-fail-fast"]).args(rest))
    } else {
        run(cargo().args(["test", "--workspace", "--no-fail-fast"]).args(rest))
    }
}

fn up(rest: &[String]) -> Result<(), String> {
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    let exe = target_dir().join("debug").join("cimctl");
    run(Command::new(exe).arg("up").args(rest))
}

fn bench(rest: &[String]) -> Result<(), String> {
    run(cargo().args(["build", "--release", "--workspace", "--bins"]))?;
    let exe = target_dir().join("release").join("cimctl");
    let mut args = vec!["bench".to_string()];
    if !rest.iter().any(|a| a == "--out") {
        args.extend(["--out".to_string(), "docs/bench-latest.md".to_string()]);
    }
    run(Command::new(exe).args(args).args(rest))
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
