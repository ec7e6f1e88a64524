//! Archive targets: where an S3-compatible bucket is and how to reach it, parsed from a
//! one-line spec; credentials come from a file or the environment and are never printed.

use std::fmt;
use std::path::PathBuf;

/// A bad target spec or unreadable credentials.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TargetError {
    #[error("archive target {0:?}: expected key=value pairs separated by commas")]
    Syntax(String),
    #[error(
        "archive target: unknown key {0:?} (known: name, endpoint, region, bucket, prefix, path-style, credentials-file, credentials-env, credentials, signing-key-file)"
    )]
    UnknownKey(String),
    #[error("archive target {target}: {key} is required")]
    Missing { target: String, key: &'static str },
    #[error("archive target {target}: {message}")]
    Invalid { target: String, message: String },
    #[error("archive target {target}: credentials: {message}")]
    Credentials { target: String, message: String },
    #[error("archive target name {0:?} is used twice")]
    Duplicate(String),
    #[error("--archive-required names {0:?}, which is not an --archive-target")]
    UnknownRequired(String),
}

/// Where a target's credentials come from. `Debug` never shows a secret or a session token.
#[derive(Clone, PartialEq)]
pub struct Credentials {
    source: CredentialSource,
}

/// The two kinds of [`Credentials`].
#[derive(Clone, PartialEq)]
pub enum CredentialSource {
    /// An access key pair, optionally with a session token (temporary credentials).
    Keys { access_key: String, secret_key: String, session_token: Option<String> },
    /// The AWS SDK's default chain: `AWS_*` variables, the shared config and credentials
    /// files (`AWS_PROFILE`), web identity, ECS and EC2 instance metadata. Resolved when the
    /// first request is signed, and refreshed by the SDK as it expires.
    DefaultChain,
}

impl Credentials {
    pub fn new(access_key: impl Into<String>, secret_key: impl Into<String>) -> Credentials {
        Credentials {
            source: CredentialSource::Keys {
                access_key: access_key.into(),
                secret_key: secret_key.into(),
                session_token: None,
            },
        }
    }

    /// The same keys with a session token (`aws_session_token`).
    pub fn with_session_token(mut self, token: impl Into<String>) -> Credentials {
        if let CredentialSource::Keys { session_token, .. } = &mut self.source {
            *session_token = Some(token.into());
        }
        self
    }

    /// The SDK's default credential chain.
    pub fn default_chain() -> Credentials {
        Credentials { source: CredentialSource::DefaultChain }
    }

    pub fn source(&self) -> &CredentialSource {
        &self.source
    }

    /// The access key id, when the keys are given explicitly.
    pub fn access_key(&self) -> Option<&str> {
        match &self.source {
            CredentialSource::Keys { access_key, .. } => Some(access_key),
            CredentialSource::DefaultChain => None,
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            CredentialSource::Keys { access_key, session_token, .. } => f
                .debug_struct("Credentials")
                .field("access_key", access_key)
                .field("secret_key", &"<redacted>")
                .field("session_token", &session_token.as_ref().map(|_| "<redacted>"))
                .finish(),
            CredentialSource::DefaultChain => f.write_str("Credentials(default chain)"),
        }
    }
}

impl fmt::Debug for CredentialSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&Credentials { source: self.clone() }, f)
    }
}

/// One S3-compatible bucket the archive is written to.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    /// Short name used in cursors, status and logs (`nas`, `wasabi`).
    pub name: String,
    /// `http(s)://host[:port]`.
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    /// Key prefix inside the bucket (empty, or ending in `/`), so several CIM installations can
    /// share one bucket.
    pub prefix: String,
    /// Path-style addressing (`endpoint/bucket/key`): MinIO and s3s-fs want it; Wasabi and AWS
    /// accept both.
    pub path_style: bool,
    pub credentials: Credentials,
    /// Where the archive's signing key comes from, when not from the secret access key (needed
    /// with `credentials=default`, whose keys rotate): a file of at least 16 bytes.
    pub signing_key_file: Option<PathBuf>,
}

impl Target {
    /// Parses `name=nas,endpoint=http://nas:9000,region=us-east-1,bucket=cim,path-style=true,
    /// prefix=leaf1,credentials-file=/run/secrets/nas`. Credentials: `credentials-file=PATH`
    /// (AWS credentials file format: `aws_access_key_id`, `aws_secret_access_key`, optional
    /// `aws_session_token`), or `credentials-env=NAS` (`NAS_ACCESS_KEY_ID`,
    /// `NAS_SECRET_ACCESS_KEY`, optional `NAS_SESSION_TOKEN`), or `credentials=default` (the
    /// AWS SDK's default chain, resolved at the first request); with none of them,
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and optional `AWS_SESSION_TOKEN`.
    /// Virtual-hosted addressing (`path-style=false`) needs a DNS name as the endpoint's
    /// host (not an IP address or `localhost`). `env` looks up variables (injected for tests).
    pub fn parse(spec: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Target, TargetError> {
        let mut name = None;
        let mut endpoint = None;
        let mut region = None;
        let mut bucket = None;
        let mut prefix = String::new();
        let mut path_style = true;
        let mut cred_file = None;
        let mut signing_key_file: Option<PathBuf> = None;
        let mut cred_env = None;
        let mut cred_keyword: Option<String> = None;
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| TargetError::Syntax(part.to_string()))?;
            let v = v.trim().to_string();
            match k.trim() {
                "name" => name = Some(v),
                "endpoint" => endpoint = Some(v),
                "region" => region = Some(v),
                "bucket" => bucket = Some(v),
                "prefix" => prefix = v,
                "path-style" => {
                    path_style = match v.as_str() {
                        "true" | "yes" | "1" => true,
                        "false" | "no" | "0" => false,
                        _ => return Err(TargetError::Syntax(part.to_string())),
                    }
                }
                "credentials-file" => cred_file = Some(PathBuf::from(v)),
                "signing-key-file" => signing_key_file = Some(PathBuf::from(v)),
                "credentials-env" => cred_env = Some(v),
                "credentials" => cred_keyword = Some(v),
                other => return Err(TargetError::UnknownKey(other.to_string())),
            }
        }
        let name = name.ok_or(TargetError::Missing { target: "?".into(), key: "name" })?;
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(TargetError::Invalid { target: name, message: "name must be letters, digits, - or _".into() });
        }
        let missing = |key| TargetError::Missing { target: name.clone(), key };
        let endpoint = endpoint.ok_or_else(|| missing("endpoint"))?;
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(TargetError::Invalid {
                target: name,
                message: format!("endpoint {endpoint:?} must start with http:// or https://"),
            });
        }
        let endpoint = endpoint.trim_end_matches('/').to_string();
        let region = region.unwrap_or_else(|| "us-east-1".into());
        let bucket = bucket.ok_or_else(|| missing("bucket"))?;
        let prefix = match prefix.trim_matches('/') {
            "" => String::new(),
            p => format!("{p}/"),
        };
        let cred_default = match cred_keyword.as_deref() {
            None => false,
            Some("default") => true,
            Some(v) => {
                return Err(TargetError::Invalid {
                    target: name,
                    message: format!(
                        "credentials={v:?}: the only value is `default` (the AWS SDK's credential chain); use credentials-file or credentials-env for explicit keys"
                    ),
                });
            }
        };
        if cred_default && (cred_file.is_some() || cred_env.is_some()) {
            return Err(TargetError::Invalid {
                target: name,
                message: "give one of credentials=default, credentials-file, credentials-env".into(),
            });
        }
        let credentials = match (cred_file, cred_env) {
            (Some(_), Some(_)) => {
                return Err(TargetError::Invalid {
                    target: name,
                    message: "give credentials-file or credentials-env, not both".into(),
                });
            }
            _ if cred_default => Credentials::default_chain(),
            (Some(file), None) => {
                let text = std::fs::read_to_string(&file).map_err(|e| TargetError::Credentials {
                    target: name.clone(),
                    message: format!("cannot read {}: {e}", file.display()),
                })?;
                parse_credentials_file(&text).map_err(|m| TargetError::Credentials {
                    target: name.clone(),
                    message: format!("{}: {m}", file.display()),
                })?
            }
            (None, prefix_env) => {
                let p = prefix_env.map(|p| format!("{p}_")).unwrap_or_else(|| "AWS_".into());
                let get = |k: &str| env(&format!("{p}{k}")).filter(|v| !v.is_empty());
                match (get("ACCESS_KEY_ID"), get("SECRET_ACCESS_KEY"), get("SESSION_TOKEN")) {
                    (Some(a), Some(s), None) => Credentials::new(a, s),
                    (Some(a), Some(s), Some(t)) => Credentials::new(a, s).with_session_token(t),
                    _ => {
                        return Err(TargetError::Credentials {
                            target: name,
                            message: format!(
                                "{p}ACCESS_KEY_ID and {p}SECRET_ACCESS_KEY must be set (or use credentials=default for the AWS SDK's credential chain)"
                            ),
                        });
                    }
                }
            }
        };
        if cred_default && signing_key_file.is_none() {
            return Err(TargetError::Invalid {
                target: name,
                message: "credentials=default needs signing-key-file=PATH: the archive is signed with a key that must not change when the chain's credentials rotate".into(),
            });
        }
        let target = Target { name, endpoint, region, bucket, prefix, path_style, credentials, signing_key_file };
        target.signing_secret()?;
        target.check_addressing().map_err(|message| TargetError::Invalid { target: target.name.clone(), message })?;
        Ok(target)
    }

    /// The secret the archive key is derived from: the signing key file's contents, or the
    /// secret access key.
    pub fn signing_secret(&self) -> Result<Vec<u8>, TargetError> {
        let bad = |message: String| TargetError::Credentials { target: self.name.clone(), message };
        match (&self.signing_key_file, self.credentials.source()) {
            (Some(path), _) => {
                let bytes = std::fs::read(path).map_err(|e| bad(format!("signing key {}: {e}", path.display())))?;
                let trimmed = bytes.trim_ascii();
                if trimmed.len() < 16 {
                    return Err(bad(format!("signing key {}: shorter than 16 bytes", path.display())));
                }
                Ok(trimmed.to_vec())
            }
            (None, CredentialSource::Keys { secret_key, .. }) => Ok(secret_key.as_bytes().to_vec()),
            (None, CredentialSource::DefaultChain) => {
                Err(bad("credentials=default needs signing-key-file=PATH for the archive's signing key".into()))
            }
        }
    }

    /// The endpoint's host name or address, without scheme, port or brackets.
    pub fn host(&self) -> &str {
        let rest = self.endpoint.split_once("://").map_or(self.endpoint.as_str(), |(_, r)| r);
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        if let Some(v6) = authority.strip_prefix('[') {
            return v6.split(']').next().unwrap_or_default();
        }
        authority.split(':').next().unwrap_or_default()
    }

    /// The host requests go to: the endpoint's, or `bucket.host` when virtual-hosted.
    pub fn request_host(&self) -> String {
        if self.path_style { self.host().to_string() } else { format!("{}.{}", self.bucket, self.host()) }
    }

    /// Refuses what cannot work: virtual-hosted addressing (the bucket in the host name) on
    /// an endpoint given as an IP address or `localhost`, or with a bucket name that is not
    /// a DNS label.
    pub fn check_addressing(&self) -> Result<(), String> {
        let host = self.host();
        if host.is_empty() {
            return Err(format!("endpoint {:?} has no host", self.endpoint));
        }
        if self.path_style {
            return Ok(());
        }
        if host.parse::<std::net::IpAddr>().is_ok() || host.eq_ignore_ascii_case("localhost") {
            return Err(format!(
                "path-style=false puts the bucket into the host name, which cannot work with the endpoint host {host:?} (an IP address or localhost): use path-style=true"
            ));
        }
        let label_ok = !self.bucket.is_empty()
            && self.bucket.len() <= 63
            && self.bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !self.bucket.starts_with('-')
            && !self.bucket.ends_with('-');
        if !label_ok {
            return Err(format!(
                "path-style=false needs a bucket name that is one DNS label (lowercase letters, digits, -), not {:?}: use path-style=true",
                self.bucket
            ));
        }
        Ok(())
    }

    /// Parses a list of specs separated by `;` (or given one by one), refusing duplicate names.
    pub fn parse_all(specs: &[String], env: &dyn Fn(&str) -> Option<String>) -> Result<Vec<Target>, TargetError> {
        let mut out: Vec<Target> = Vec::new();
        for spec in specs.iter().flat_map(|s| s.split(';')).map(str::trim).filter(|s| !s.is_empty()) {
            let t = Target::parse(spec, env)?;
            if out.iter().any(|o| o.name == t.name) {
                return Err(TargetError::Duplicate(t.name));
            }
            out.push(t);
        }
        Ok(out)
    }
}

/// `aws_access_key_id = …` / `aws_secret_access_key = …` / optional `aws_session_token = …`
/// lines (the AWS credentials file format; `[profile]` headers and `#`/`;` comments are
/// ignored, the first values win).
fn parse_credentials_file(text: &str) -> Result<Credentials, String> {
    let mut access = None;
    let mut secret = None;
    let mut token = None;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') || line.starts_with('[') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else { continue };
        let v = v.trim().to_string();
        match k.trim().to_ascii_lowercase().as_str() {
            "aws_access_key_id" | "access_key_id" => access = access.or(Some(v)),
            "aws_secret_access_key" | "secret_access_key" => secret = secret.or(Some(v)),
            "aws_session_token" | "session_token" => token = token.or(Some(v)),
            _ => {}
        }
    }
    match (access, secret) {
        (Some(a), Some(s)) if !a.is_empty() && !s.is_empty() => Ok(match token.filter(|t| !t.is_empty()) {
            Some(t) => Credentials::new(a, s).with_session_token(t),
            None => Credentials::new(a, s),
        }),
        _ => Err("needs aws_access_key_id and aws_secret_access_key".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str) -> Option<String> {
        match k {
            "NAS_ACCESS_KEY_ID" => Some("ak".into()),
            "NAS_SECRET_ACCESS_KEY" => Some("sk".into()),
            _ => None,
        }
    }

    #[test]
    fn parses_a_full_spec() {
        let t = Target::parse("name=nas,endpoint=http://nas:9000/,region=eu-1,bucket=cim,prefix=/leaf1/,path-style=false,credentials-env=NAS", &env).unwrap();
        assert_eq!(t.endpoint, "http://nas:9000");
        assert_eq!(t.prefix, "leaf1/");
        assert!(!t.path_style);
        assert_eq!(t.credentials, Credentials::new("ak", "sk"));
        assert!(!format!("{t:?}").contains("sk\""), "secret must not be printed: {t:?}");
    }

    #[test]
    fn refuses_bad_specs_with_clear_errors() {
        let e = Target::parse("name=a,endpoint=nas:9000,bucket=b,credentials-env=NAS", &env).unwrap_err();
        assert!(e.to_string().contains("must start with http"), "{e}");
        let e = Target::parse("name=a,endpoint=http://x,credentials-env=NAS", &env).unwrap_err();
        assert_eq!(e, TargetError::Missing { target: "a".into(), key: "bucket" });
        let e = Target::parse("name=a,endpoint=http://x,bucket=b", &env).unwrap_err();
        assert!(e.to_string().contains("AWS_ACCESS_KEY_ID"), "{e}");
        let e = Target::parse("name=a,colour=blue", &env).unwrap_err();
        assert!(matches!(e, TargetError::UnknownKey(_)));
        let e = Target::parse_all(&["name=a,endpoint=http://x,bucket=b,credentials-env=NAS;name=a,endpoint=http://y,bucket=c,credentials-env=NAS".into()], &env).unwrap_err();
        assert_eq!(e, TargetError::Duplicate("a".into()));
    }

    #[test]
    fn reads_an_aws_credentials_file() {
        let c = parse_credentials_file("[default]\n# c\naws_access_key_id = AK\naws_secret_access_key=SK\n").unwrap();
        assert_eq!(c, Credentials::new("AK", "SK"));
        assert!(parse_credentials_file("aws_access_key_id = AK\n").is_err());
    }

    #[test]
    fn reads_a_session_token_from_the_file_and_never_prints_it() {
        let c = parse_credentials_file(
            "[default]\n; c\naws_access_key_id = AK\naws_secret_access_key=SK\naws_session_token = TOKEN123\n",
        )
        .unwrap();
        assert_eq!(c, Credentials::new("AK", "SK").with_session_token("TOKEN123"));
        let shown = format!("{c:?}");
        assert!(!shown.contains("TOKEN123") && !shown.contains("SK\""), "{shown}");
        assert!(shown.contains("AK"), "{shown}");
    }

    #[test]
    fn reads_a_credentials_file_named_in_the_spec() {
        let dir = std::env::temp_dir().join(format!("cim-archive-creds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("nas");
        std::fs::write(&file, "[default]\naws_access_key_id=FAK\naws_secret_access_key=FSK\naws_session_token=FT\n")
            .unwrap();
        let spec = format!("name=nas,endpoint=http://nas:9000,bucket=cim,credentials-file={}", file.display());
        let t = Target::parse(&spec, &|_| None).unwrap();
        assert_eq!(t.credentials, Credentials::new("FAK", "FSK").with_session_token("FT"));
        let missing =
            format!("name=nas,endpoint=http://nas:9000,bucket=cim,credentials-file={}", dir.join("no").display());
        let e = Target::parse(&missing, &|_| None).unwrap_err();
        assert!(matches!(e, TargetError::Credentials { .. }) && e.to_string().contains("cannot read"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reads_a_session_token_from_the_environment() {
        let env = |k: &str| match k {
            "W_ACCESS_KEY_ID" => Some("ak".to_string()),
            "W_SECRET_ACCESS_KEY" => Some("sk".to_string()),
            "W_SESSION_TOKEN" => Some("t0k3n-value".to_string()),
            "AWS_ACCESS_KEY_ID" => Some("aws-ak".to_string()),
            "AWS_SECRET_ACCESS_KEY" => Some("aws-sk".to_string()),
            _ => None,
        };
        let t = Target::parse("name=w,endpoint=https://s3.wasabisys.com,bucket=cim,credentials-env=W", &env).unwrap();
        assert_eq!(t.credentials, Credentials::new("ak", "sk").with_session_token("t0k3n-value"));
        assert!(!format!("{t:?}").contains("t0k3n-value"), "{t:?}");
        let t = Target::parse("name=w,endpoint=https://s3.wasabisys.com,bucket=cim", &env).unwrap();
        assert_eq!(t.credentials, Credentials::new("aws-ak", "aws-sk"));
    }

    #[test]
    fn credentials_default_selects_the_sdk_chain_with_a_signing_key_file() {
        let spec = "name=aws,endpoint=https://s3.eu-west-1.amazonaws.com,region=eu-west-1,bucket=cim,path-style=false,credentials=default";
        let e = Target::parse(spec, &|_| None).unwrap_err();
        assert!(e.to_string().contains("needs signing-key-file"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "too short\n").unwrap();
        let e = Target::parse(&format!("{spec},signing-key-file={}", short.display()), &|_| None).unwrap_err();
        assert!(e.to_string().contains("shorter than 16 bytes"), "{e}");
        let key = dir.path().join("key");
        std::fs::write(&key, "a long enough archive signing key\n").unwrap();
        let t = Target::parse(&format!("{spec},signing-key-file={}", key.display()), &|_| None).unwrap();
        assert_eq!(t.credentials, Credentials::default_chain());
        assert_eq!(t.credentials.access_key(), None);
        assert_eq!(t.signing_secret().unwrap(), b"a long enough archive signing key");
        // The file, not the secret access key, when both are there.
        let t = Target::parse(
            &format!("name=a,endpoint=http://x,bucket=b,credentials-env=NAS,signing-key-file={}", key.display()),
            &env,
        )
        .unwrap();
        assert_eq!(t.signing_secret().unwrap(), b"a long enough archive signing key");
    }

    #[test]
    fn refuses_conflicting_or_unknown_credential_sources() {
        let e = Target::parse("name=a,endpoint=http://x,bucket=b,credentials=default,credentials-env=NAS", &env)
            .unwrap_err();
        assert!(e.to_string().contains("give one of credentials=default"), "{e}");
        let e = Target::parse("name=a,endpoint=http://x,bucket=b,credentials-file=/f,credentials-env=NAS", &env)
            .unwrap_err();
        assert!(e.to_string().contains("not both"), "{e}");
        let e = Target::parse("name=a,endpoint=http://x,bucket=b,credentials=instance", &env).unwrap_err();
        assert!(e.to_string().contains("the only value is `default`"), "{e}");
    }

    #[test]
    fn refuses_virtual_hosted_addressing_on_an_ip_endpoint() {
        for endpoint in ["http://127.0.0.1:9000", "http://10.1.2.3", "http://[::1]:9000", "http://localhost:9000"] {
            let spec = format!("name=a,endpoint={endpoint},bucket=b,path-style=false,credentials-env=NAS");
            let e = Target::parse(&spec, &env).unwrap_err();
            assert!(
                matches!(&e, TargetError::Invalid { .. }) && e.to_string().contains("use path-style=true"),
                "{endpoint}: {e}"
            );
            let spec = format!("name=a,endpoint={endpoint},bucket=b,path-style=true,credentials-env=NAS");
            assert!(Target::parse(&spec, &env).is_ok(), "{endpoint} with path-style=true");
        }
        let t = Target::parse(
            "name=a,endpoint=https://s3.example.com:8443/,bucket=b,path-style=false,credentials-env=NAS",
            &env,
        )
        .unwrap();
        assert_eq!((t.host(), t.request_host().as_str()), ("s3.example.com", "b.s3.example.com"));
    }

    #[test]
    fn refuses_virtual_hosted_addressing_of_a_bucket_that_is_no_dns_label() {
        let e = Target::parse(
            "name=a,endpoint=https://s3.example.com,bucket=My.Bucket,path-style=false,credentials-env=NAS",
            &env,
        )
        .unwrap_err();
        assert!(e.to_string().contains("DNS label"), "{e}");
    }
}
