//! Configuration every service shares: flags with an environment variable each (`CIM_*`),
//! parsed purely and validated before anything connects. Invalid configuration exits with 64.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use cim_events::{Component, Tier, token::validate_token};
use clap::{Args, Parser};

/// Exit code for invalid configuration (sysexits `EX_USAGE`).
pub const EXIT_CONFIG: i32 = 64;

/// Options common to all seven services. Service crates flatten this into their own `Cli`;
/// service-specific options are named `--<service>-<option>` / `CIM_<SERVICE>_<OPTION>`.
#[derive(Args, Clone, Debug)]
pub struct CommonArgs {
    /// NATS server URL(s), comma-separated (nats://, tls://, ws://).
    #[arg(long, env = "CIM_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,

    /// NATS credentials file (JWT + NKey seed) of this service's identity.
    #[arg(long, env = "CIM_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,

    /// JetStream domain to use (a leaf node's own domain, or the hub's).
    #[arg(long, env = "CIM_JS_DOMAIN")]
    pub js_domain: Option<String>,

    /// Where the service runs: leaf (streams R1) or cluster (streams R3).
    #[arg(long, env = "CIM_TIER", default_value = "leaf", value_parser = parse_tier)]
    pub tier: Tier,

    /// Address of the health and metrics HTTP endpoint (/livez, /readyz, /metrics). Port 0
    /// picks a free port; the service announces the one it got.
    #[arg(long, env = "CIM_HTTP_LISTEN", default_value = "127.0.0.1:0")]
    pub http_listen: SocketAddr,

    /// Instance id; unique per running instance. Default: <component>-<random>.
    #[arg(long, env = "CIM_INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// Node (host) name this instance reports. Default: the host name.
    #[arg(long, env = "CIM_NODE")]
    pub node: Option<String>,

    /// How long in-flight work may take to finish after SIGTERM/SIGINT (e.g. 10s, 500ms).
    #[arg(long, env = "CIM_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Interval of heartbeats and readiness checks (e.g. 5s).
    #[arg(long, env = "CIM_HEARTBEAT_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,

    /// How long a command may be retried with the same request id and be answered, not carried
    /// out again: the duplicate window of the service's event streams (e.g. 24h, 10m).
    #[arg(long, env = "CIM_RETRY_HORIZON", default_value = "24h", value_parser = parse_duration)]
    pub retry_horizon: Duration,

    /// Most requests handled at once by this instance; more wait in NATS (back-pressure).
    #[arg(long, env = "CIM_MAX_IN_FLIGHT", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_in_flight: u32,
}

/// The configuration after validation, with defaults resolved.
#[derive(Clone, Debug)]
pub struct CommonSettings {
    pub component: Component,
    pub nats_urls: Vec<String>,
    pub nats_creds: Option<PathBuf>,
    pub js_domain: Option<String>,
    pub tier: Tier,
    pub http_listen: SocketAddr,
    pub instance_id: String,
    pub node: String,
    pub shutdown_grace: Duration,
    pub heartbeat_interval: Duration,
    pub retry_horizon: Duration,
    pub max_in_flight: usize,
}

impl CommonSettings {
    /// The NATS URLs with any `user:password@` replaced, for logs.
    pub fn redacted_urls(&self) -> Vec<String> {
        self.nats_urls.iter().map(|u| redact_url(u)).collect()
    }
}

/// `nats://user:secret@host:4222` → `nats://***@host:4222`.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// Why a configuration was refused; printed as one line before exiting with 64.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl ConfigError {
    /// A refusal naming the flag (and its variable) and what is wrong with it.
    pub fn invalid(message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid(message.into())
    }
}

impl CommonArgs {
    /// Validates and resolves defaults. Pure apart from checking that a credentials file can be
    /// read and reading the host name.
    pub fn settings(&self, component: Component) -> Result<CommonSettings, ConfigError> {
        let bad = |m: String| ConfigError::Invalid(m);
        let nats_urls: Vec<String> =
            self.nats_url.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        if nats_urls.is_empty() {
            return Err(bad("--nats-url (CIM_NATS_URL) is empty".into()));
        }
        for url in &nats_urls {
            check_nats_url(url).map_err(|e| bad(format!("--nats-url (CIM_NATS_URL) {:?}: {e}", redact_url(url))))?;
        }
        if let Some(creds) = &self.nats_creds {
            std::fs::File::open(creds)
                .map_err(|e| bad(format!("--nats-creds (CIM_NATS_CREDS) {}: {e}", creds.display())))?;
        }
        if let Some(domain) = &self.js_domain {
            validate_token("JetStream domain", domain).map_err(|e| bad(e.to_string()))?;
        }
        let instance_id = match &self.instance_id {
            Some(id) => id.clone(),
            None => format!("{}-{}", component.token(), &uuid::Uuid::new_v4().simple().to_string()[..12]),
        };
        validate_token("instance id", &instance_id)
            .map_err(|e| bad(format!("--instance-id (CIM_INSTANCE_ID): {e}")))?;
        let node = match &self.node {
            Some(n) => n.clone(),
            None => hostname(),
        };
        validate_token("node", &node).map_err(|e| bad(format!("--node (CIM_NODE): {e}")))?;
        if self.shutdown_grace.is_zero() {
            return Err(bad("--shutdown-grace (CIM_SHUTDOWN_GRACE) must be more than 0".into()));
        }
        if self.heartbeat_interval < Duration::from_millis(100) {
            return Err(bad("--heartbeat-interval (CIM_HEARTBEAT_INTERVAL) must be at least 100ms".into()));
        }
        if self.retry_horizon < Duration::from_secs(1) {
            return Err(bad("--retry-horizon (CIM_RETRY_HORIZON) must be at least 1s".into()));
        }
        Ok(CommonSettings {
            component,
            nats_urls,
            nats_creds: self.nats_creds.clone(),
            js_domain: self.js_domain.clone(),
            tier: self.tier,
            http_listen: self.http_listen,
            instance_id,
            node,
            shutdown_grace: self.shutdown_grace,
            heartbeat_interval: self.heartbeat_interval,
            retry_horizon: self.retry_horizon,
            max_in_flight: self.max_in_flight as usize,
        })
    }
}

fn check_nats_url(url: &str) -> Result<(), String> {
    let (scheme, rest) = url.split_once("://").ok_or("expected scheme://host:port")?;
    if !matches!(scheme, "nats" | "tls" | "ws" | "wss") {
        return Err(format!("unsupported scheme {scheme:?} (nats, tls, ws, wss)"));
    }
    let host_port = rest.rsplit('@').next().unwrap_or(rest).trim_end_matches('/');
    if host_port.is_empty() {
        return Err("missing host".into());
    }
    if let Some((host, port)) = host_port.rsplit_once(':')
        && !host.ends_with(']')
        && (host.is_empty() || port.parse::<u16>().is_err())
    {
        return Err(format!("bad host:port {host_port:?}"));
    }
    url.parse::<async_nats::ServerAddr>().map_err(|e| e.to_string())?;
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().replace(['.', ' '], "-"))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

fn parse_tier(s: &str) -> Result<Tier, String> {
    s.parse::<Tier>().map_err(|e| e.to_string())
}

/// Parses `250ms`, `10s`, `2m`, `1h` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration like 500ms, 10s, 2m"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    Ok(d)
}

/// Parses the command line (and environment) of a service binary. `--help` and `--version`
/// print and exit 0; anything invalid prints one line naming the problem and exits 64.
pub fn parse_or_exit<T: Parser>() -> T {
    match T::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                std::process::exit(0);
            }
            eprintln!("{}", one_line(&e.to_string()));
            std::process::exit(EXIT_CONFIG);
        }
    }
}

/// Collapses clap's multi-line error into one line.
fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        common: CommonArgs,
    }

    fn parse(args: &[&str]) -> Result<CommonSettings, String> {
        let cli = Cli::try_parse_from(std::iter::once("svc").chain(args.iter().copied()))
            .map_err(|e| one_line(&e.to_string()))?;
        cli.common.settings(Component::Registry).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_usable() {
        let s = parse(&[]).unwrap();
        assert_eq!(s.nats_urls, vec!["nats://127.0.0.1:4222"]);
        assert_eq!(s.tier, Tier::Leaf);
        assert!(s.instance_id.starts_with("registry-"));
        assert_eq!(s.shutdown_grace, Duration::from_secs(10));
        assert_eq!(s.max_in_flight, 64);
    }

    #[test]
    fn flags_are_read() {
        let s = parse(&[
            "--nats-url",
            "nats://a:1, nats://b:2",
            "--tier",
            "cluster",
            "--instance-id",
            "r-1",
            "--node",
            "n1",
            "--shutdown-grace",
            "250ms",
            "--js-domain",
            "leaf1",
        ])
        .unwrap();
        assert_eq!(s.nats_urls, vec!["nats://a:1", "nats://b:2"]);
        assert_eq!(s.tier, Tier::Cluster);
        assert_eq!(s.instance_id, "r-1");
        assert_eq!(s.shutdown_grace, Duration::from_millis(250));
        assert_eq!(s.js_domain.as_deref(), Some("leaf1"));
    }

    #[test]
    fn bad_values_are_named() {
        let cases: &[(&[&str], &str)] = &[
            (&["--tier", "edge"], "edge"),
            (&["--nats-url", "http://x:1"], "unsupported scheme"),
            (&["--nats-url", "nats://x:notaport"], "host:port"),
            (&["--nats-url", " , "], "empty"),
            (&["--instance-id", "a.b"], "instance id"),
            (&["--node", "has space"], "node"),
            (&["--shutdown-grace", "0s"], "more than 0"),
            (&["--shutdown-grace", "10 parsecs"], "unit"),
            (&["--http-listen", "nowhere"], "http-listen"),
            (&["--max-in-flight", "0"], "max-in-flight"),
            (&["--nats-creds", "/nonexistent/x.creds"], "nats-creds"),
            (&["--js-domain", "a>b"], "wildcard"),
            (&["--no-such-flag"], "no-such-flag"),
        ];
        for (args, want) in cases {
            let err = parse(args).unwrap_err();
            assert!(err.contains(want), "{args:?}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }

    #[test]
    fn passwords_in_urls_never_reach_logs_or_errors() {
        assert_eq!(redact_url("nats://svc:s3cret@h:4222"), "nats://***@h:4222");
        assert_eq!(redact_url("nats://h:4222"), "nats://h:4222");
        let err = parse(&["--nats-url", "nats://svc:s3cret@h:notaport"]).unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
        let s = parse(&["--nats-url", "nats://svc:s3cret@h:4222"]).unwrap();
        assert!(!format!("{:?}", s.redacted_urls()).contains("s3cret"));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("x").is_err());
    }
}
