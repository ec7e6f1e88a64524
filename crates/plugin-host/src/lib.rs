//! The plugin-host service: runs WebAssembly plugins in a sandbox (hard memory limit, fuel,
//! deadline, no files or network unless allowed), stores their modules in the object store with
//! digest and immutable versions, and serves every plugin version behind the plugin contract of
//! `cim_events::plugin` — the same contract native plugins serve (docs/plugins.md).

pub mod builtin;
mod catalog;
mod commands;
mod host;
mod invoker;
mod queries;
mod routing;
pub mod sandbox;

use std::{collections::HashMap, future::Future, path::PathBuf, sync::Arc, time::Duration};

use cim_events::{Component, plugin};
use cim_runtime::{
    CommonArgs, CommonSettings, ConfigError, Endpoint, Endpoints, Reply, Service, ServiceArgs, ServiceDef, Shutdown,
    config::parse_duration,
};

pub use host::Host;
pub use invoker::Invoker;

pub const COMPONENT: Component = Component::PluginHost;

/// Command line and environment of `plugin-host`.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "plugin-host", version, about = "Plugin host: sandboxed WebAssembly and native plugins")]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub plugins: PluginArgs,
}

/// Options of the plugin sandbox and its scheduling.
#[derive(clap::Args, Debug, Clone)]
pub struct PluginArgs {
    /// WebAssembly invocations run at once; more wait in a queue (default: the CPU count).
    #[arg(long, env = "CIM_PLUGIN_PARALLELISM", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub plugin_parallelism: Option<u32>,

    /// Invocations that may wait for a free slot; beyond that the host answers "saturated"
    /// (status UNAVAILABLE, 503) at once so callers back off.
    #[arg(long, env = "CIM_PLUGIN_QUEUE", default_value_t = 256)]
    pub plugin_queue: u32,

    /// Most memory a plugin may use (e.g. 64MiB); a manifest may ask for less, never more.
    #[arg(long, env = "CIM_PLUGIN_MAX_MEMORY", default_value = "64MiB", value_parser = parse_size)]
    pub plugin_max_memory: u64,

    /// Most fuel (roughly: WebAssembly instructions) one invocation may burn.
    #[arg(long, env = "CIM_PLUGIN_MAX_FUEL", default_value_t = 10_000_000_000)]
    pub plugin_max_fuel: u64,

    /// Longest wall-clock time one invocation may take (e.g. 10s).
    #[arg(long, env = "CIM_PLUGIN_MAX_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub plugin_max_timeout: Duration,

    /// Largest module that can be pushed (e.g. 32MiB).
    #[arg(long, env = "CIM_PLUGIN_MAX_MODULE", default_value = "32MiB", value_parser = parse_size)]
    pub plugin_max_module: u64,

    /// A directory plugins may ask for (read-only, mounted at /NAME): NAME=PATH. Repeatable;
    /// comma-separated in the environment.
    #[arg(long = "plugin-dir", env = "CIM_PLUGIN_DIRS", value_delimiter = ',', value_parser = parse_dir)]
    pub plugin_dirs: Vec<(String, PathBuf)>,

    /// Do not push the built-in plugins at start.
    #[arg(long, env = "CIM_PLUGIN_NO_BUILTINS")]
    pub no_builtins: bool,
}

/// `123`, `64KiB`, `64MiB`, `1GiB` (also `K`, `M`, `G`, `KB`, `MB`, `GB` as powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(digits);
    let n: u64 = n.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?} (use KiB, MiB or GiB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} is too large"))
}

fn parse_dir(s: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = s.split_once('=').ok_or_else(|| format!("expected NAME=PATH, got {s:?}"))?;
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(format!("invalid directory name {name:?}"));
    }
    Ok((name.to_string(), PathBuf::from(path)))
}

impl PluginArgs {
    pub fn policy(&self) -> sandbox::Policy {
        sandbox::Policy {
            max_memory: self.plugin_max_memory,
            max_fuel: self.plugin_max_fuel,
            max_timeout: self.plugin_max_timeout,
            max_output: 8 << 20,
            directories: self.plugin_dirs.iter().cloned().collect::<HashMap<_, _>>(),
            // every running invocation, plus headroom for the built-ins' load-time checks
            instances: (self.parallelism() as u32).saturating_add(16),
        }
    }

    pub fn parallelism(&self) -> usize {
        self.plugin_parallelism
            .map(|p| p as usize)
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
    }
}

/// The validated configuration of `plugin-host`.
#[derive(Clone, Debug)]
pub struct Settings {
    pub common: CommonSettings,
    pub plugins: PluginArgs,
}

impl ServiceArgs for Args {
    type Settings = Settings;

    fn validate(self) -> Result<Settings, ConfigError> {
        let common = self.common.settings(COMPONENT)?;
        let p = &self.plugins;
        if p.plugin_max_memory < 64 << 10 {
            return Err(ConfigError::invalid("--plugin-max-memory (CIM_PLUGIN_MAX_MEMORY) must be at least 64KiB"));
        }
        if p.plugin_max_fuel == 0 {
            return Err(ConfigError::invalid("--plugin-max-fuel (CIM_PLUGIN_MAX_FUEL) must be more than 0"));
        }
        if p.plugin_max_timeout < std::time::Duration::from_millis(1) {
            return Err(ConfigError::invalid("--plugin-max-timeout (CIM_PLUGIN_MAX_TIMEOUT) must be more than 0"));
        }
        if p.plugin_max_module == 0 {
            return Err(ConfigError::invalid("--plugin-max-module (CIM_PLUGIN_MAX_MODULE) must be more than 0"));
        }
        for (name, path) in &p.plugin_dirs {
            if !path.is_dir() {
                return Err(ConfigError::invalid(format!(
                    "--plugin-dir (CIM_PLUGIN_DIRS) {name}={}: not a directory",
                    path.display()
                )));
            }
        }
        Ok(Settings { common, plugins: self.plugins })
    }

    fn common(settings: &Settings) -> &CommonSettings {
        &settings.common
    }

    fn run(settings: Settings, shutdown: Shutdown) -> impl Future<Output = anyhow::Result<()>> {
        run(settings, shutdown)
    }
}

pub fn definition() -> ServiceDef {
    ServiceDef {
        component: COMPONENT,
        version: env!("CARGO_PKG_VERSION"),
        description: "Plugin host: sandboxed WebAssembly and native plugins",
        capabilities: vec!["plugin.wasm".to_string(), "plugin.route".to_string()],
    }
}

/// Runs the service until `shutdown` completes.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let args = settings.plugins;
    Service::new(definition())
        .setup(move |ctx| async move {
            let host = Host::start(ctx, &args).await?;
            endpoints(host)
        })
        .run(settings.common, shutdown)
        .await
}

fn endpoints(host: Arc<Host>) -> anyhow::Result<Vec<Endpoint>> {
    use plugin::{cmd, command, qry, query};
    Ok(Endpoints::new(host)
        .add(cmd::PUSH, command(cmd::PUSH)?, |h, m| async move { h.push(m).await })
        .add(cmd::REMOVE, command(cmd::REMOVE)?, |h, m| async move { h.remove(m).await })
        .add(cmd::INVOKE, command(cmd::INVOKE)?, |h, m| async move { h.route(m).await })
        .add(qry::LIST, query(qry::LIST)?, |h, m| async move { h.list(m).await })
        .add(qry::STATS, query(qry::STATS)?, |h, _m| async move { Ok(Reply::proto(&h.stats())) })
        .build())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn sizes_and_directories_parse() {
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
        assert_eq!(parse_dir("data=/srv/data").unwrap(), ("data".into(), PathBuf::from("/srv/data")));
        assert!(parse_dir("nodir").is_err());
        assert!(parse_dir("a.b=/x").is_err());
    }

    #[test]
    fn flags_have_defaults() {
        let c =
            Args::try_parse_from(["plugin-host", "--plugin-parallelism", "2", "--plugin-dir", "data=/tmp"]).unwrap();
        assert_eq!(c.plugins.parallelism(), 2);
        assert_eq!(c.plugins.plugin_max_memory, 64 << 20);
        assert_eq!(c.plugins.policy().directories["data"], PathBuf::from("/tmp"));
        assert!(Args::try_parse_from(["plugin-host", "--plugin-parallelism", "0"]).is_err());
        assert!(c.validate().is_ok());
    }

    fn validate(args: &[&str]) -> Result<Settings, String> {
        Args::validate_args(args)
    }

    #[test]
    fn refusals_name_the_flag() {
        for (args, flag) in [
            (&["--plugin-max-memory", "1KiB"][..], "--plugin-max-memory"),
            (&["--plugin-max-fuel", "0"][..], "--plugin-max-fuel"),
            (&["--plugin-max-timeout", "0s"][..], "--plugin-max-timeout"),
            (&["--plugin-max-module", "0"][..], "--plugin-max-module"),
            (&["--plugin-dir", "data=/no/such/dir/here"][..], "--plugin-dir"),
        ] {
            let e = validate(args).unwrap_err();
            assert!(e.contains(flag), "{args:?}: {e}");
        }
    }
}
