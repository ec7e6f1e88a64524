//! The plugin contract: how a plugin version is named, invoked and announced, the plugin host's
//! commands, queries, events and buckets. Payloads are in `proto/cim/plugin/v1/plugin.proto`;
//! the wire contract for plugin authors is `docs/plugins.md`.
//!
//! ```text
//! cim.plg.<name>.<version-token>.invoke     InvokeRequest -> InvokeReply (whoever runs the plugin)
//! cim.plg.<name>.<version-token>.announce   PluginAnnounced (core NATS, periodic)
//! cim.cmd.plugin.invoke                     InvokeRequest routed by name[@version] or capability
//! cim.evt.plugin.plugin.<name>.<action>     PluginPushed / PluginRemoved
//! ```
//!
//! Subject tokens cannot hold `.`, so a version appears in subjects as its *version token*:
//! `.` becomes `_` (`1.2.0` → `1_2_0`). Versions never contain `_`, so the mapping is reversible.

use crate::{Component, ContractError, subject, token::validate_token};

const C: Component = Component::PluginHost;

/// Second token of plugin invocation and announcement subjects.
pub const KIND: &str = "plg";

/// Object store bucket of plugin modules (`name@version`, plus `upload.<uuid>` while pushing).
pub const ARTIFACTS_BUCKET: &str = "cim_plugin_artifacts";
/// Prefix of modules being pushed.
pub const UPLOAD_PREFIX: &str = "upload.";
/// KV bucket purpose of plugin references (`cim_plugin_references`).
pub const KV_REFERENCES: &str = "references";

/// The aggregate of plugin events: one per plugin name.
pub const AGGREGATE: &str = "plugin";

/// Runtimes a plugin can have.
pub const RUNTIME_WASM: &str = "wasm";
pub const RUNTIME_NATIVE: &str = "native";

/// Event actions.
pub mod action {
    pub const PUSHED: &str = "pushed";
    pub const REMOVED: &str = "removed";
}

/// Command endpoints (`cim.cmd.plugin.<name>`).
pub mod cmd {
    pub const PUSH: &str = "push";
    pub const REMOVE: &str = "remove";
    pub const INVOKE: &str = "invoke";
    pub const ALL: [&str; 3] = [PUSH, REMOVE, INVOKE];
}

/// Query endpoints (`cim.qry.plugin.<name>`).
pub mod qry {
    pub const LIST: &str = "list";
    pub const STATS: &str = "stats";
    pub const ALL: [&str; 2] = [LIST, STATS];
}

/// Metadata keys the host sets on replies.
pub mod meta {
    /// Captured standard error of a failed WebAssembly plugin (truncated).
    pub const STDERR: &str = "cim-stderr";
}

/// Checks a plugin name: `[a-z0-9][a-z0-9-]*`, 1-64 characters.
pub fn validate_name(name: &str) -> Result<(), ContractError> {
    crate::token::validate_slug("plugin name", name)
}

/// Checks a plugin version: 1-64 characters of `[0-9A-Za-z.+-]`, not starting or ending with
/// `.`, no empty dot-separated part (so semver fits, and the version token is reversible).
pub fn validate_version(version: &str) -> Result<(), ContractError> {
    let bad = |reason| ContractError::InvalidToken {
        what: "plugin version",
        value: version.escape_debug().to_string(),
        reason,
    };
    if version.is_empty() || version.len() > 64 {
        return Err(bad("must be 1-64 characters"));
    }
    if !version.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'-')) {
        return Err(bad("only 0-9, A-Z, a-z, '.', '+' and '-' are allowed"));
    }
    if version.split('.').any(str::is_empty) {
        return Err(bad("empty part between dots"));
    }
    Ok(())
}

/// Checks a capability: a dot-separated name like `text.normalize` (lowercase, digits, `-`).
pub fn validate_capability(cap: &str) -> Result<(), ContractError> {
    let bad =
        |reason| ContractError::InvalidToken { what: "capability", value: cap.escape_debug().to_string(), reason };
    if cap.is_empty() || cap.len() > 128 {
        return Err(bad("must be 1-128 characters"));
    }
    if !cap.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-')) {
        return Err(bad("only a-z, 0-9, '.' and '-' are allowed"));
    }
    if cap.split('.').any(str::is_empty) {
        return Err(bad("empty part between dots"));
    }
    Ok(())
}

/// The subject token of a version: `.` → `_`.
pub fn version_token(version: &str) -> Result<String, ContractError> {
    validate_version(version)?;
    Ok(version.replace('.', "_"))
}

/// The version back from its token.
pub fn version_from_token(token: &str) -> Result<String, ContractError> {
    let v = token.replace('_', ".");
    validate_version(&v)?;
    Ok(v)
}

/// `name@version`: how people and object names spell a plugin version.
pub fn reference(name: &str, version: &str) -> String {
    format!("{name}@{version}")
}

/// Splits `name[@version]`.
pub fn parse_reference(s: &str) -> Result<(String, Option<String>), ContractError> {
    let (name, version) = match s.split_once('@') {
        Some((n, v)) => (n, Some(v.to_string())),
        None => (s, None),
    };
    validate_name(name)?;
    if let Some(v) = &version {
        validate_version(v)?;
    }
    Ok((name.to_string(), version))
}

fn plg(name: &str, version: &str, what: &str) -> Result<String, ContractError> {
    validate_name(name)?;
    Ok(format!("{}.{KIND}.{name}.{}.{what}", subject::ROOT, version_token(version)?))
}

/// `cim.plg.<name>.<version-token>.invoke`: where one plugin version is invoked.
pub fn invoke_subject(name: &str, version: &str) -> Result<String, ContractError> {
    plg(name, version, "invoke")
}

/// `cim.plg.<name>.<version-token>.announce`.
pub fn announce_subject(name: &str, version: &str) -> Result<String, ContractError> {
    plg(name, version, "announce")
}

/// `cim.plg.*.*.announce`: every plugin announcement.
pub fn all_announcements() -> String {
    format!("{}.{KIND}.*.*.announce", subject::ROOT)
}

/// `cim.plg.*.*.invoke`: every invocation of every plugin version (what the plugin host serves
/// and routes to, and the pipeline engine sends).
pub fn all_invocations() -> String {
    format!("{}.{KIND}.*.*.invoke", subject::ROOT)
}

/// `cim.plg.<name>.*.invoke` and `cim.plg.<name>.*.announce`: the invocations and the
/// announcements of every version of one plugin, what the identity serving it may receive and
/// publish. `name` is a plugin name, or a placeholder token a deployment replaces by one.
pub fn every_version_of(name: &str) -> Result<(String, String), ContractError> {
    validate_token("plugin name", name)?;
    let of = |what: &str| format!("{}.{KIND}.{name}.*.{what}", subject::ROOT);
    Ok((of("invoke"), of("announce")))
}

/// Queue group of everything serving one plugin version.
pub fn queue_group(name: &str, version: &str) -> Result<String, ContractError> {
    validate_name(name)?;
    Ok(format!("cim-plg-{name}-{}", version_token(version)?))
}

/// Object name of a stored module: `name@version`.
pub fn artifact_object(name: &str, version: &str) -> Result<String, ContractError> {
    validate_name(name)?;
    validate_version(version)?;
    Ok(reference(name, version))
}

/// Object name of an upload in progress: `upload.<id>`.
pub fn upload_object(id: &str) -> Result<String, ContractError> {
    validate_token("upload id", id)?;
    Ok(format!("{UPLOAD_PREFIX}{id}"))
}

/// `cim.evt.plugin.plugin.<name>.<action>`.
pub fn event(name: &str, action: &str) -> Result<String, ContractError> {
    validate_name(name)?;
    subject::event(C, AGGREGATE, name, action)
}

/// `cim.evt.plugin.plugin.<name>.*`: one plugin's history (the optimistic-concurrency filter).
pub fn history(name: &str) -> Result<String, ContractError> {
    validate_name(name)?;
    subject::aggregate_filter(C, AGGREGATE, name)
}

/// `cim.evt.plugin.plugin.>`: every plugin event (what a host replays).
pub fn all_events() -> String {
    format!("{}.{}.{}.{AGGREGATE}.>", subject::ROOT, subject::Kind::Event.token(), C.token())
}

pub fn command(name: &str) -> Result<String, ContractError> {
    subject::command(C, name)
}

pub fn query(name: &str) -> Result<String, ContractError> {
    subject::query(C, name)
}

/// KV key of a reference: `<name>.<version-token>.<referrer>` (the referrer is a token).
pub fn reference_key(name: &str, version: &str, referrer: &str) -> Result<String, ContractError> {
    validate_name(name)?;
    validate_token("referrer", referrer)?;
    Ok(format!("{name}.{}.{referrer}", version_token(version)?))
}

/// Prefix of every reference key of one version.
pub fn reference_prefix(name: &str, version: &str) -> Result<String, ContractError> {
    validate_name(name)?;
    Ok(format!("{name}.{}.", version_token(version)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_and_names() {
        assert_eq!(invoke_subject("crc32", "1.0.0").unwrap(), "cim.plg.crc32.1_0_0.invoke");
        assert_eq!(announce_subject("crc32", "1.0.0-rc.1").unwrap(), "cim.plg.crc32.1_0_0-rc_1.announce");
        assert_eq!(all_announcements(), "cim.plg.*.*.announce");
        assert_eq!(queue_group("crc32", "2.1").unwrap(), "cim-plg-crc32-2_1");
        assert_eq!(event("crc32", action::PUSHED).unwrap(), "cim.evt.plugin.plugin.crc32.pushed");
        assert_eq!(history("crc32").unwrap(), "cim.evt.plugin.plugin.crc32.*");
        assert_eq!(all_events(), "cim.evt.plugin.plugin.>");
        assert_eq!(command(cmd::INVOKE).unwrap(), "cim.cmd.plugin.invoke");
        assert_eq!(query(qry::LIST).unwrap(), "cim.qry.plugin.list");
        assert_eq!(artifact_object("crc32", "1.0.0").unwrap(), "crc32@1.0.0");
        assert_eq!(upload_object("abc").unwrap(), "upload.abc");
        assert_eq!(reference_key("crc32", "1.0.0", "pipeline-p1").unwrap(), "crc32.1_0_0.pipeline-p1");
        assert_eq!(reference_prefix("crc32", "1.0.0").unwrap(), "crc32.1_0_0.");
        for c in cmd::ALL {
            command(c).unwrap();
        }
        for q in qry::ALL {
            query(q).unwrap();
        }
    }

    #[test]
    fn versions_round_trip_through_tokens() {
        for v in ["1", "1.2.3", "1.0.0-rc.1", "2.0.0+build.5", "0.1-alpha"] {
            assert_eq!(version_from_token(&version_token(v).unwrap()).unwrap(), v);
        }
        for bad in ["", "1..2", ".1", "1.", "1_2", "1 2", "1*", "v>", &"9".repeat(65)] {
            assert!(validate_version(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names_and_capabilities_are_checked() {
        validate_name("text-normalize").unwrap();
        for bad in ["", "Upper", "a.b", "-x", "a_b", "a b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        validate_capability("text.normalize").unwrap();
        for bad in ["", "Text", "a..b", ".a", "a b", "a*"] {
            assert!(validate_capability(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_reference("crc32@1.0.0").unwrap(), ("crc32".into(), Some("1.0.0".into())));
        assert_eq!(parse_reference("crc32").unwrap(), ("crc32".into(), None));
        assert!(parse_reference("crc32@").is_err());
        assert!(parse_reference("Bad@1").is_err());
    }
}
