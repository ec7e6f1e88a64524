//! The integration hub's declarative configuration file (JSON): webhook sources, each with its
//! own endpoint, secret (from a file or the environment), tolerance, size limit and target;
//! outbound subscriptions and their allow-list ([`allow`]); the PostgreSQL, MQTT and S3 import
//! connectors. Loading is pure apart from reading the secrets, and refuses anything unclear.
//! A library of its own so that `cimctl integration add` checks a file exactly as the hub
//! does without linking the hub.

pub mod allow;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("invalid hub configuration: {0}")]
    Invalid(String),
    #[error("webhook source {source_name:?}: {reason}")]
    Source { source_name: String, reason: String },
    #[error("connector {name:?}: {reason}")]
    Connector { name: String, reason: String },
    #[error("subscription {name:?}: {reason}")]
    Subscription { name: String, reason: String },
}

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubFile {
    #[serde(default)]
    pub webhooks: Vec<WebhookFile>,
    /// Addresses outbound deliveries may reach: CIDR blocks (`10.0.0.0/8`, `::1/128`) or single
    /// addresses. Nothing else is contacted, whatever a URL, a DNS answer or a redirect says.
    #[serde(default)]
    pub outbound_allow: Vec<String>,
    #[serde(default)]
    pub subscriptions: Vec<SubscriptionFile>,
    #[serde(default)]
    pub postgres: Vec<PostgresFile>,
    #[serde(default)]
    pub mqtt: Vec<MqttFile>,
    #[serde(default)]
    pub s3_import: Vec<S3ImportFile>,
}

/// An S3 bucket whose new objects become units.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3ImportFile {
    pub name: String,
    /// `http://host:port` of the S3 service (path-style addressing).
    pub endpoint: String,
    #[serde(default = "default_region")]
    pub region: String,
    pub bucket: String,
    #[serde(default)]
    pub prefix: String,
    #[serde(default)]
    pub access_key_env: Option<String>,
    #[serde(default)]
    pub access_key_file: Option<PathBuf>,
    #[serde(default)]
    pub secret_key_env: Option<String>,
    #[serde(default)]
    pub secret_key_file: Option<PathBuf>,
    /// How often the bucket is listed, in milliseconds (default 5000).
    #[serde(default = "default_s3_poll")]
    pub poll_ms: u64,
    #[serde(default)]
    pub tags: Vec<String>,
}

fn default_region() -> String {
    "us-east-1".to_string()
}
fn default_s3_poll() -> u64 {
    5000
}

/// An S3 import ready to run.
#[derive(Clone)]
pub struct S3Import {
    pub name: String,
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub prefix: String,
    pub access_key: String,
    pub secret_key: String,
    pub poll: Duration,
    pub tags: Vec<String>,
}

impl std::fmt::Debug for S3Import {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Import")
            .field("name", &self.name)
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("secret_key", &"<redacted>")
            .finish()
    }
}

/// An MQTT connector.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttFile {
    pub name: String,
    pub host: String,
    #[serde(default = "default_mqtt_port")]
    pub port: u16,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub password_env: Option<String>,
    /// Topic filters whose messages become events.
    #[serde(default)]
    pub subscribe: Vec<String>,
    /// Events published to a topic.
    #[serde(default)]
    pub publish: Option<MqttPublishFile>,
}

fn default_mqtt_port() -> u16 {
    1883
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttPublishFile {
    pub filter: String,
    pub topic: String,
    #[serde(default)]
    pub deliver: Deliver,
}

/// An MQTT connector ready to run.
#[derive(Clone)]
pub struct Mqtt {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub credentials: Option<(String, String)>,
    pub subscribe: Vec<String>,
    pub publish: Option<MqttPublish>,
}

impl std::fmt::Debug for Mqtt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mqtt").field("name", &self.name).field("host", &self.host).field("port", &self.port).finish()
    }
}

#[derive(Clone, Debug)]
pub struct MqttPublish {
    pub filter: String,
    pub stream: String,
    pub topic: String,
    pub deliver: Deliver,
}

/// A PostgreSQL connector. The connection string holds credentials, so it comes from a file or
/// the environment (`host=… user=… dbname=…` or `postgres://…`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresFile {
    pub name: String,
    #[serde(default)]
    pub url_file: Option<PathBuf>,
    #[serde(default)]
    pub url_env: Option<String>,
    /// Events → rows of a table.
    #[serde(default)]
    pub project: Option<ProjectFile>,
    /// Tables whose row changes become events (a trigger per table feeds the outbox).
    #[serde(default)]
    pub watch: Vec<String>,
    /// How often the outbox is read when it was empty, in milliseconds (default 200).
    #[serde(default = "default_poll")]
    pub poll_ms: u64,
}

fn default_poll() -> u64 {
    200
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectFile {
    pub filter: String,
    pub table: String,
    #[serde(default)]
    pub deliver: Deliver,
}

/// A PostgreSQL connector ready to run.
#[derive(Clone)]
pub struct Postgres {
    pub name: String,
    pub url: String,
    pub project: Option<Projection>,
    pub watch: Vec<String>,
    pub poll: Duration,
}

impl Postgres {
    /// `cim_outbox_<connector>`.
    pub fn outbox_table(&self) -> String {
        format!("cim_outbox_{}", self.name.replace('-', "_"))
    }
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres")
            .field("name", &self.name)
            .field("url", &"<redacted>")
            .field("watch", &self.watch)
            .finish()
    }
}

#[derive(Clone, Debug)]
pub struct Projection {
    pub filter: String,
    pub stream: String,
    pub table: String,
    pub deliver: Deliver,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionFile {
    pub name: String,
    /// Event subject filter, e.g. `cim.evt.iu.unit.*.created`.
    pub filter: String,
    /// `http://host[:port]/path`.
    pub url: String,
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    #[serde(default)]
    pub secret_env: Option<String>,
    /// Attempts before the event is dead-lettered (default 8).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// First retry delay in milliseconds; doubles per attempt, with jitter (default 500).
    #[serde(default = "default_backoff")]
    pub backoff_ms: u64,
    /// Longest retry delay in milliseconds (default 60000).
    #[serde(default = "default_max_backoff")]
    pub max_backoff_ms: u64,
    /// How long one attempt may take in milliseconds (default 10000).
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// `new` (default): events from now on; `all`: the stream's whole history first.
    #[serde(default)]
    pub deliver: Deliver,
}

fn default_attempts() -> u32 {
    8
}
fn default_backoff() -> u64 {
    500
}
fn default_max_backoff() -> u64 {
    60_000
}
fn default_timeout() -> u64 {
    10_000
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Deliver {
    #[default]
    New,
    All,
}

/// An outbound subscription ready to run; the secret is resolved to its key.
#[derive(Clone)]
pub struct Subscription {
    pub name: String,
    pub filter: String,
    /// The stream holding the filter's events.
    pub stream: String,
    pub url: String,
    pub key: Vec<u8>,
    pub max_attempts: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
    pub timeout: Duration,
    pub deliver: Deliver,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("name", &self.name)
            .field("filter", &self.filter)
            .field("url", &self.url)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Everything the configuration file declares.
#[derive(Debug, Default)]
pub struct Hub {
    pub sources: BTreeMap<String, Source>,
    pub allow: crate::allow::AllowList,
    pub subscriptions: BTreeMap<String, Subscription>,
    pub postgres: Vec<Postgres>,
    pub mqtt: Vec<Mqtt>,
    pub s3_import: Vec<S3Import>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookFile {
    pub name: String,
    /// A file holding the secret (`whsec_<base64>` or raw text).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// An environment variable holding the secret.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// `event` (default) or `unit`.
    #[serde(default)]
    pub target: Target,
    /// Largest accepted distance between `webhook-timestamp` and now, in seconds (default 300).
    #[serde(default = "default_tolerance")]
    pub tolerance_secs: u64,
    /// Largest accepted payload in bytes (default 1 MiB).
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// `json` (default: the payload must be a JSON document) or `any`.
    #[serde(default)]
    pub content: Content,
    /// Tags given to units created from this source (target `unit`).
    #[serde(default)]
    pub tags: Vec<String>,
}

/// The longest a signed delivery's timestamp may be away from now: the retry horizon's default.
pub const MAX_TOLERANCE_SECS: u64 = 86_400;

fn default_tolerance() -> u64 {
    300
}
fn default_max_body() -> usize {
    1024 * 1024
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// The payload becomes a `WebhookReceived` event in the hub's stream.
    #[default]
    Event,
    /// The payload becomes an information unit; the event records the unit and its CID.
    Unit,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Content {
    #[default]
    Json,
    Any,
}

/// A source ready to serve: the secret is resolved to its HMAC key.
#[derive(Clone)]
pub struct Source {
    pub name: String,
    pub key: Vec<u8>,
    pub target: Target,
    pub tolerance: Duration,
    pub max_body_bytes: usize,
    pub content: Content,
    pub tags: Vec<String>,
}

// The key never appears in Debug output, hence in logs.
impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("name", &self.name)
            .field("key", &"<redacted>")
            .field("target", &self.target)
            .field("tolerance", &self.tolerance)
            .field("max_body_bytes", &self.max_body_bytes)
            .finish()
    }
}

/// A plain SQL identifier: lowercase letters, digits and `_`, not starting with a digit.
pub fn valid_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

/// Reads and validates the configuration file.
pub fn load(path: &Path) -> Result<Hub, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::Read { path: path.to_path_buf(), reason: e.to_string() })?;
    parse(&text, |name| std::env::var(name).ok(), |p| std::fs::read_to_string(p).map_err(|e| e.to_string()))
}

/// Checks configuration text without resolving secrets (they are read where the hub runs):
/// what `cimctl integration add` runs before it writes a file.
pub fn validate(text: &str) -> Result<Hub, ConfigError> {
    parse(text, |_| Some("placeholder".to_string()), |_| Ok("placeholder".to_string()))
}

/// Parses configuration text; `env` and `read` resolve secrets (injected for tests).
pub fn parse(
    text: &str,
    env: impl Fn(&str) -> Option<String>,
    read: impl Fn(&Path) -> Result<String, String>,
) -> Result<Hub, ConfigError> {
    let file: HubFile = serde_json::from_str(text).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    let secret_of = |file: &Option<PathBuf>, var: &Option<String>| -> Result<Vec<u8>, String> {
        let secret = match (file, var) {
            (Some(p), None) => read(p).map_err(|e| format!("cannot read secret_file {}: {e}", p.display()))?,
            (None, Some(v)) => env(v).ok_or_else(|| format!("environment variable {v} is not set"))?,
            _ => return Err("set exactly one of secret_file and secret_env".into()),
        };
        cim_events::hub::secret_key(&secret).map_err(|e| e.to_string())
    };
    let allow =
        crate::allow::AllowList::parse(&file.outbound_allow).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    let mut subscriptions = BTreeMap::new();
    for s in file.subscriptions {
        let bad = |reason: String| ConfigError::Subscription { name: s.name.clone(), reason };
        cim_events::hub::outbound_consumer(&s.name).map_err(|e| bad(e.to_string()))?;
        let stream = stream_of(&s.filter).map_err(bad)?;
        let url = crate::allow::check_url(&s.url, &allow).map_err(|e| bad(e.to_string()))?;
        let key = secret_of(&s.secret_file, &s.secret_env).map_err(bad)?;
        if s.max_attempts == 0 || s.timeout_ms == 0 {
            return Err(bad("max_attempts and timeout_ms must be more than 0".into()));
        }
        let sub = Subscription {
            name: s.name.clone(),
            filter: s.filter.clone(),
            stream,
            url,
            key,
            max_attempts: s.max_attempts,
            backoff: Duration::from_millis(s.backoff_ms),
            max_backoff: Duration::from_millis(s.max_backoff_ms.max(s.backoff_ms)),
            timeout: Duration::from_millis(s.timeout_ms),
            deliver: s.deliver,
        };
        if subscriptions.insert(s.name.clone(), sub).is_some() {
            return Err(bad("defined twice".into()));
        }
    }
    let mut postgres: Vec<Postgres> = Vec::new();
    for p in file.postgres {
        let bad = |reason: String| ConfigError::Connector { name: p.name.clone(), reason };
        cim_events::hub::projection_consumer(&p.name).map_err(|e| bad(e.to_string()))?;
        let url = match (&p.url_file, &p.url_env) {
            (Some(f), None) => {
                read(f).map_err(|e| bad(format!("cannot read url_file {}: {e}", f.display())))?.trim().to_string()
            }
            (None, Some(v)) => env(v).ok_or_else(|| bad(format!("environment variable {v} is not set")))?,
            _ => return Err(bad("set exactly one of url_file and url_env".into())),
        };
        let project = match p.project {
            Some(pr) => {
                if !valid_identifier(&pr.table) {
                    return Err(bad(format!("table {:?} is not a plain identifier ([a-z_][a-z0-9_]*)", pr.table)));
                }
                Some(Projection {
                    stream: stream_of(&pr.filter).map_err(bad)?,
                    filter: pr.filter,
                    table: pr.table,
                    deliver: pr.deliver,
                })
            }
            None => None,
        };
        if let Some(t) = p.watch.iter().find(|t| !valid_identifier(t)) {
            return Err(bad(format!("table {t:?} is not a plain identifier ([a-z_][a-z0-9_]*)")));
        }
        if postgres.iter().any(|o| o.name == p.name) {
            return Err(bad("defined twice".into()));
        }
        postgres.push(Postgres {
            name: p.name,
            url,
            project,
            watch: p.watch,
            poll: Duration::from_millis(p.poll_ms.max(10)),
        });
    }
    let mut mqtt: Vec<Mqtt> = Vec::new();
    for q in file.mqtt {
        let bad = |reason: String| ConfigError::Connector { name: q.name.clone(), reason };
        cim_events::hub::mqtt_consumer(&q.name).map_err(|e| bad(e.to_string()))?;
        let password = match (&q.password_file, &q.password_env) {
            (Some(f), None) => Some(
                read(f).map_err(|e| bad(format!("cannot read password_file {}: {e}", f.display())))?.trim().to_string(),
            ),
            (None, Some(v)) => Some(env(v).ok_or_else(|| bad(format!("environment variable {v} is not set")))?),
            (None, None) => None,
            _ => return Err(bad("set at most one of password_file and password_env".into())),
        };
        let credentials = match (q.username.clone(), password) {
            (Some(u), p) => Some((u, p.unwrap_or_default())),
            (None, None) => None,
            (None, Some(_)) => return Err(bad("a password needs a username".into())),
        };
        if q.subscribe.iter().any(|t| t.is_empty()) {
            return Err(bad("empty topic filter".into()));
        }
        let publish = match q.publish {
            Some(p) => {
                if p.topic.is_empty() || p.topic.contains(['+', '#']) {
                    return Err(bad(format!("publish topic {:?} must be a plain topic (no wildcards)", p.topic)));
                }
                Some(MqttPublish {
                    stream: stream_of(&p.filter).map_err(bad)?,
                    filter: p.filter,
                    topic: p.topic,
                    deliver: p.deliver,
                })
            }
            None => None,
        };
        if mqtt.iter().any(|o| o.name == q.name) {
            return Err(bad("defined twice".into()));
        }
        mqtt.push(Mqtt { name: q.name, host: q.host, port: q.port, credentials, subscribe: q.subscribe, publish });
    }
    let mut s3_import: Vec<S3Import> = Vec::new();
    for i in file.s3_import {
        let bad = |reason: String| ConfigError::Connector { name: i.name.clone(), reason };
        cim_events::hub::s3_imported(&i.name).map_err(|e| bad(e.to_string()))?;
        let value = |what: &str, f: &Option<PathBuf>, v: &Option<String>| -> Result<String, ConfigError> {
            match (f, v) {
                (Some(f), None) => Ok(read(f)
                    .map_err(|e| bad(format!("cannot read {what}_file {}: {e}", f.display())))?
                    .trim()
                    .to_string()),
                (None, Some(v)) => env(v).ok_or_else(|| bad(format!("environment variable {v} is not set"))),
                _ => Err(bad(format!("set exactly one of {what}_file and {what}_env"))),
            }
        };
        let access_key = value("access_key", &i.access_key_file, &i.access_key_env)?;
        let secret_key = value("secret_key", &i.secret_key_file, &i.secret_key_env)?;
        let endpoint_ok = url::Url::parse(&i.endpoint).is_ok_and(|u| u.scheme() == "http" && u.host_str().is_some());
        if !endpoint_ok {
            return Err(bad(format!("endpoint {:?} must be an http://host[:port] url", i.endpoint)));
        }
        if i.bucket.is_empty() || s3_import.iter().any(|o| o.name == i.name) {
            return Err(bad("needs a bucket and a unique name".into()));
        }
        s3_import.push(S3Import {
            name: i.name,
            endpoint: i.endpoint,
            region: i.region,
            bucket: i.bucket,
            prefix: i.prefix,
            access_key,
            secret_key,
            poll: Duration::from_millis(i.poll_ms.max(50)),
            tags: i.tags,
        });
    }
    let mut out = BTreeMap::new();
    for w in file.webhooks {
        let bad = |reason: String| ConfigError::Source { source_name: w.name.clone(), reason };
        cim_events::hub::webhook_event(&w.name).map_err(|e| bad(e.to_string()))?;
        let secret = match (&w.secret_file, &w.secret_env) {
            (Some(p), None) => read(p).map_err(|e| bad(format!("cannot read secret_file {}: {e}", p.display())))?,
            (None, Some(v)) => env(v).ok_or_else(|| bad(format!("environment variable {v} is not set")))?,
            _ => return Err(bad("set exactly one of secret_file and secret_env".into())),
        };
        let key = cim_events::hub::secret_key(&secret).map_err(|e| bad(e.to_string()))?;
        if w.max_body_bytes == 0 {
            return Err(bad("max_body_bytes must be more than 0".into()));
        }
        if w.tolerance_secs == 0 || w.tolerance_secs > MAX_TOLERANCE_SECS {
            return Err(bad(format!(
                "tolerance_secs must be between 1 and {MAX_TOLERANCE_SECS} (a day): a signature is a replayable \
                 credential for as long as its timestamp is accepted"
            )));
        }
        let source = Source {
            name: w.name.clone(),
            key,
            target: w.target,
            tolerance: Duration::from_secs(w.tolerance_secs),
            max_body_bytes: w.max_body_bytes,
            content: w.content,
            tags: w.tags,
        };
        if out.insert(w.name.clone(), source).is_some() {
            return Err(bad("defined twice".into()));
        }
    }
    Ok(Hub { sources: out, allow, subscriptions, postgres, mqtt, s3_import })
}

/// The event stream a filter reads: `cim.evt.<component>.…` lives in that component's stream.
/// The hub's own delivery log and subscription state are refused (a delivery would feed itself).
fn stream_of(filter: &str) -> Result<String, String> {
    let tokens: Vec<&str> = filter.split('.').collect();
    let ok_token = |t: &str| !t.is_empty() && !t.contains(char::is_whitespace);
    if tokens.len() < 3
        || tokens[0] != cim_events::subject::ROOT
        || tokens[1] != cim_events::subject::Kind::Event.token()
        || !tokens.iter().all(|t| ok_token(t))
    {
        return Err(format!(
            "filter {filter:?} is not an event subject filter ({}.{}.<component>.…, see docs/SUBJECTS.md)",
            cim_events::subject::ROOT,
            cim_events::subject::Kind::Event.token()
        ));
    }
    let component = cim_events::Component::parse(tokens[2]).map_err(|e| e.to_string())?;
    if component == cim_events::Component::IntegrationHub
        && tokens.get(3).is_some_and(|t| *t != cim_events::hub::WEBHOOK)
    {
        return Err("a subscription may read the hub's own webhook events only".into());
    }
    Ok(cim_events::resources::events_stream(component).name)
}

#[cfg(test)]
mod tests;
