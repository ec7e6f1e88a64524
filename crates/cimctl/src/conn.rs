//! Connecting to NATS, one way for every cimctl command: the error names the URL tried and,
//! when nothing answers there, says how to point cimctl at a running CIM (`--nats-url`,
//! `CIM_NATS_URL`, or the URL `cimctl up` wrote into its data directory).

use std::{
    error::Error as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, anyhow};
use async_nats::ConnectErrorKind;

/// How long to wait for a server that accepts the TCP connection but does not answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects as `name` to the comma-separated `urls`; `request_timeout` replaces the client's
/// default (10 s) for requests.
pub async fn connect(
    name: &str,
    urls: &str,
    creds: Option<&Path>,
    request_timeout: Option<Duration>,
) -> Result<async_nats::Client> {
    connect_with_inbox(name, urls, creds, request_timeout, None).await
}

/// [`connect`] with replies arriving below `inbox_prefix` (instead of `_INBOX`), where an
/// identity limited to its own inboxes may read them.
pub async fn connect_with_inbox(
    name: &str,
    urls: &str,
    creds: Option<&Path>,
    request_timeout: Option<Duration>,
    inbox_prefix: Option<&str>,
) -> Result<async_nats::Client> {
    let mut opts = async_nats::ConnectOptions::new().name(name).connection_timeout(CONNECT_TIMEOUT);
    if let Some(prefix) = inbox_prefix {
        opts = opts.custom_inbox_prefix(prefix);
    }
    if let Some(t) = request_timeout {
        opts = opts.request_timeout(Some(t));
    }
    if let Some(creds) = creds {
        opts = opts
            .credentials_file(creds)
            .await
            .with_context(|| format!("cannot read the NATS credentials file {}", creds.display()))?;
    }
    let list: Vec<&str> = urls.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
    if list.is_empty() {
        return Err(crate::error::Usage("no NATS URL given: set --nats-url or CIM_NATS_URL".into()).into());
    }
    // A dead address can take the whole connection timeout per attempt; bound the lot.
    match tokio::time::timeout(CONNECT_TIMEOUT * 2, opts.connect(list)).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(anyhow!(connect_failure(urls, e.kind(), &cause(&e), &data_dir()))),
        Err(_) => Err(anyhow!(connect_failure(urls, ConnectErrorKind::TimedOut, "timed out", &data_dir()))),
    }
}

/// The innermost cause of a connection error in a person's words ("connection refused"),
/// without the kind's own label or the OS error number.
fn cause(e: &async_nats::ConnectError) -> String {
    let mut source: Option<&dyn std::error::Error> = e.source();
    let mut text = e.kind().to_string();
    while let Some(s) = source {
        text = s.to_string();
        source = s.source();
    }
    crate::error::tidy(&text).to_lowercase()
}

/// Where `cimctl up` keeps its data here: `CIM_DATA_DIR`, else `.cim`.
fn data_dir() -> PathBuf {
    std::env::var_os("CIM_DATA_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".cim"))
}

/// The message for a failed connection to `urls`: what was tried, why it failed, what to do.
fn connect_failure(urls: &str, kind: ConnectErrorKind, why: &str, data_dir: &Path) -> String {
    let tried = redact(urls);
    match kind {
        ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => {
            format!("NATS at {tried} refused cimctl: {why}; give credentials with --nats-creds or CIM_NATS_CREDS")
        }
        ConnectErrorKind::ServerParse => format!("{tried} is not a NATS URL (nats://HOST:PORT): {why}"),
        ConnectErrorKind::Tls => format!("cannot connect to NATS at {tried}: {why}"),
        ConnectErrorKind::Dns | ConnectErrorKind::TimedOut | ConnectErrorKind::Io | ConnectErrorKind::MaxReconnects => {
            format!("nothing answers at {tried} ({why}); {}", nothing_answers_hint(urls, data_dir))
        }
    }
}

/// What to do when no NATS server answers at `tried`.
fn nothing_answers_hint(tried: &str, data_dir: &Path) -> String {
    let file = data_dir.join("nats.url");
    let written = std::fs::read_to_string(&file).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    match written {
        Some(url) if url != tried.trim() => format!(
            "`cimctl up` wrote {url} to {}: use it with --nats-url {url} or export CIM_NATS_URL={url}",
            file.display()
        ),
        Some(_) => format!(
            "{} names this URL, so the leaf node `cimctl up` started there is not running; start it again with `cimctl up`",
            file.display()
        ),
        None => format!(
            "start a leaf node with `cimctl up` (it writes its URL to {}), or point cimctl at a running CIM \
             with --nats-url or CIM_NATS_URL",
            file.display()
        ),
    }
}

/// A request to `service` on `subject` that got no reply: nothing answers there, or the
/// client gave up waiting.
pub fn request_failed(service: &str, subject: &str, e: &async_nats::RequestError) -> anyhow::Error {
    match e.kind() {
        async_nats::RequestErrorKind::NoResponders => {
            NoAnswer(format!("no {service} is running (nothing answers on {subject})")).into()
        }
        async_nats::RequestErrorKind::TimedOut => {
            NoAnswer(format!("no answer from {service} on {subject} in time")).into()
        }
        _ => anyhow!("request to {service} on {subject} failed: {e}"),
    }
}

/// No reply from `service` on `subject` within `timeout`.
pub fn no_answer(service: &str, subject: &str, timeout: Duration) -> anyhow::Error {
    NoAnswer(format!("no answer from {service} on {subject} within {timeout:?} (is it running?)")).into()
}

/// Nothing answered a request (or the service said it is unavailable): the same request may
/// be sent again if it is a query or carries a request id.
#[derive(Debug)]
pub struct NoAnswer(pub String);

impl std::fmt::Display for NoAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NoAnswer {}

/// True when `e` is a [`NoAnswer`].
pub fn is_retryable(e: &anyhow::Error) -> bool {
    e.downcast_ref::<NoAnswer>().is_some()
}

/// `service` refused a request with a NATS service error: `<service> refused (<code>): <why>`.
pub fn refused(service: &str, headers: Option<&async_nats::HeaderMap>) -> Option<anyhow::Error> {
    let h = headers?;
    let code = h.get("Nats-Service-Error-Code")?;
    let msg = h.get("Nats-Service-Error").map(|v| v.to_string()).unwrap_or_default();
    Some(anyhow!("{service} refused ({code}): {msg}"))
}

/// A URL list with any `user:password@` hidden.
pub fn redact(urls: &str) -> String {
    urls.split(',')
        .map(|url| match (url.find("://"), url.rfind('@')) {
            (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
            _ => url.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_connection_names_the_url_and_where_to_find_the_right_one() {
        let dir = tempfile::tempdir().unwrap();
        let msg = connect_failure("nats://127.0.0.1:4222", ConnectErrorKind::Io, "connection refused", dir.path());
        assert!(msg.starts_with("nothing answers at nats://127.0.0.1:4222 (connection refused); "), "{msg}");
        assert!(msg.contains("CIM_NATS_URL") && msg.contains("cimctl up"), "{msg}");
        assert!(msg.contains(&dir.path().join("nats.url").display().to_string()), "{msg}");

        std::fs::write(dir.path().join("nats.url"), "nats://127.0.0.1:4555\n").unwrap();
        let msg = connect_failure("nats://127.0.0.1:4222", ConnectErrorKind::Io, "connection refused", dir.path());
        assert!(msg.contains("export CIM_NATS_URL=nats://127.0.0.1:4555"), "{msg}");
        let msg = connect_failure("nats://127.0.0.1:4555", ConnectErrorKind::TimedOut, "timed out", dir.path());
        assert!(msg.contains("is not running"), "{msg}");
    }

    #[test]
    fn refused_credentials_point_at_credentials_and_passwords_stay_hidden() {
        let dir = tempfile::tempdir().unwrap();
        let msg = connect_failure(
            "nats://svc:secret@127.0.0.1:4222",
            ConnectErrorKind::AuthorizationViolation,
            "authorization violation",
            dir.path(),
        );
        assert!(msg.contains("nats://***@127.0.0.1:4222") && !msg.contains("secret"), "{msg}");
        assert!(msg.contains("CIM_NATS_CREDS") && !msg.contains("cimctl up"), "{msg}");
        assert_eq!(redact("nats://a:b@h:1,nats://h2:2"), "nats://***@h:1,nats://h2:2");
    }
}
