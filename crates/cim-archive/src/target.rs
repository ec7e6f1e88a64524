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
        "archive target: unknown key {0:?} (known: name, endpoint, region, bucket, prefix, path-style, credentials-file, credentials-env)"
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

/// An access key pair. `Debug` and `Display` never show the secret.
#[derive(Clone, PartialEq)]
pub struct Credentials {
    access_key: String,
    secret_key: String,
}

impl Credentials {
    pub fn new(access_key: impl Into<String>, secret_key: impl Into<String>) -> Credentials {
        Credentials { access_key: access_key.into(), secret_key: secret_key.into() }
    }
    pub fn access_key(&self) -> &str {
        &self.access_key
    }
    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials").field("access_key", &self.access_key).field("secret_key", &"<redacted>").finish()
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
}

impl Target {
    /// Parses `name=nas,endpoint=http://nas:9000,region=us-east-1,bucket=cim,path-style=true,
    /// prefix=leaf1,credentials-file=/run/secrets/nas` (or `credentials-env=NAS`, which reads
    /// `NAS_ACCESS_KEY_ID` and `NAS_SECRET_ACCESS_KEY`; with neither, `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY`). `env` looks up variables (injected for tests).
    pub fn parse(spec: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Target, TargetError> {
        let mut name = None;
        let mut endpoint = None;
        let mut region = None;
        let mut bucket = None;
        let mut prefix = String::new();
        let mut path_style = true;
        let mut cred_file = None;
        let mut cred_env = None;
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
                "credentials-env" => cred_env = Some(v),
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
        let credentials = match (cred_file, cred_env) {
            (Some(_), Some(_)) => {
                return Err(TargetError::Invalid {
                    target: name,
                    message: "give credentials-file or credentials-env, not both".into(),
                });
            }
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
                match (get("ACCESS_KEY_ID"), get("SECRET_ACCESS_KEY")) {
                    (Some(a), Some(s)) => Credentials::new(a, s),
                    _ => {
                        return Err(TargetError::Credentials {
                            target: name,
                            message: format!("{p}ACCESS_KEY_ID and {p}SECRET_ACCESS_KEY must be set"),
                        });
                    }
                }
            }
        };
        Ok(Target { name, endpoint, region, bucket, prefix, path_style, credentials })
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

/// `aws_access_key_id = …` / `aws_secret_access_key = …` lines (the AWS credentials file
/// format; `[profile]` headers and `#` comments are ignored, the first values win).
fn parse_credentials_file(text: &str) -> Result<Credentials, String> {
    let mut access = None;
    let mut secret = None;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else { continue };
        let v = v.trim().to_string();
        match k.trim().to_ascii_lowercase().as_str() {
            "aws_access_key_id" | "access_key_id" => access = access.or(Some(v)),
            "aws_secret_access_key" | "secret_access_key" => secret = secret.or(Some(v)),
            _ => {}
        }
    }
    match (access, secret) {
        (Some(a), Some(s)) if !a.is_empty() && !s.is_empty() => Ok(Credentials::new(a, s)),
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
}
