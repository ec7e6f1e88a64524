//! How cimctl reports a failure: one line on stderr, `cimctl: <what went wrong>: <why>`, each
//! cause said once and without OS error numbers, JSON parser wording put in a person's words.
//! Usage mistakes (clap's refusals, a malformed value found later) exit 64.

use std::fmt;

/// Exit status of a usage mistake, as for clap's own refusals and every service's bad
/// configuration.
pub const EXIT_USAGE: u8 = 64;

/// A usage mistake found after the command line parsed: exits 64, like clap's refusals.
#[derive(Debug)]
pub struct Usage(pub String);

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// A usage mistake as an error (exit 64).
pub fn usage(why: impl Into<String>) -> anyhow::Error {
    Usage(why.into()).into()
}

/// The line to print for `e` (without the `cimctl: ` prefix): the causes joined by ": ", a
/// cause left out when the line already says it (many errors repeat their source's text).
pub fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = tidy(&cause.to_string());
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// The exit status for `e`: 64 for a usage mistake (a bad archive target spec is one), else 1.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if e.chain().any(|c| c.is::<Usage>() || c.is::<cim_archive::TargetError>()) { EXIT_USAGE } else { 1 }
}

/// `s` on one line, without the " (os error N)" an io::Error appends.
pub fn tidy(s: &str) -> String {
    let mut out = s.split_whitespace().collect::<Vec<_>>().join(" ");
    while let Some(start) = out.find(" (os error ") {
        match out[start..].find(')') {
            Some(end) => out.replace_range(start..start + end + 1, ""),
            None => break,
        }
    }
    out
}

/// Prints what clap has to say — help, the version, or a refusal in the house style — and
/// returns the exit status: 0 for help and version, 64 else (a command named without its
/// subcommand shows its help, and still exits 64).
pub fn report_clap(e: &clap::Error) -> u8 {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            0
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            EXIT_USAGE
        }
        _ => {
            eprint!("{}", clap_refusal(e));
            EXIT_USAGE
        }
    }
}

/// clap's refusal in the house style: `cimctl: <message>` on one line, then clap's usage line
/// and its pointer to `--help`.
pub fn clap_refusal(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let rendered = rendered.strip_prefix("error: ").unwrap_or(&rendered);
    let (message, rest) = rendered.split_once("\n\n").unwrap_or((rendered, ""));
    let mut out = format!("cimctl: {}\n", tidy(message));
    for line in rest.lines().filter(|l| !l.trim().is_empty()) {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Parses a JSON document an operator wrote, with the problem in words: "empty document", or
/// "not JSON: <what and where>".
pub fn parse_json(text: &str) -> Result<serde_json::Value, String> {
    if text.trim().is_empty() {
        return Err("empty document".into());
    }
    serde_json::from_str(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => json_words(&e.to_string()),
        _ => format!("not JSON: {e}"),
    })
}

/// What a JSON value is, for "expected an object, found …".
pub fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "true or false",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(a) if a.is_empty() => "an empty list",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

/// serde's wording of a document of the wrong shape ("invalid length 0, expected struct
/// Definition with 6 elements", "invalid type: sequence, expected struct Step") in a person's
/// words; messages that already read well ("missing field `steps`") pass unchanged.
pub fn json_words(msg: &str) -> String {
    if let Some(rest) = msg.strip_prefix("invalid length ")
        && let Some((n, expected)) = rest.split_once(", expected ")
    {
        let found = if n.trim() == "0" { "an empty list".to_string() } else { format!("a list of {n}") };
        return format!("expected {}, found {found}", expected_words(expected));
    }
    if let Some(rest) = msg.strip_prefix("invalid type: ")
        && let Some((found, expected)) = rest.split_once(", expected ")
    {
        return format!("expected {}, found {}", expected_words(expected), found_words(found));
    }
    msg.to_string()
}

fn expected_words(expected: &str) -> String {
    let expected = expected.split(" at line ").next().unwrap_or(expected).trim();
    if expected.starts_with("struct ") || expected.starts_with("a map") || expected == "map" {
        "an object".into()
    } else if expected.starts_with("a sequence") || expected == "sequence" {
        "a list".into()
    } else if matches!(expected, "u8" | "u16" | "u32" | "u64" | "usize") {
        "a whole number, 0 or more".into()
    } else if matches!(expected, "i8" | "i16" | "i32" | "i64" | "isize") {
        "a whole number".into()
    } else if matches!(expected, "f32" | "f64") {
        "a number".into()
    } else {
        expected.into()
    }
}

fn found_words(found: &str) -> String {
    match found {
        "sequence" => "a list".into(),
        "map" => "an object".into(),
        "null" | "unit value" => "null".into(),
        f if f.starts_with("boolean") => "true or false".into(),
        f if f.starts_with("integer") || f.starts_with("floating point") => {
            format!("the number{}", f.split_once(' ').map(|x| x.1).unwrap_or(""))
        }
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context as _;

    #[test]
    fn each_cause_is_said_once_without_os_error_numbers() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let inner = anyhow::Error::new(io);
        let text = inner.to_string();
        // An error that repeats its source's text, wrapped in a context: said once.
        let e = Err::<(), _>(inner).context(format!("reading /x: {text}")).unwrap_err();
        let line = one_line(&e);
        assert_eq!(line, "reading /x: entity not found");
        let io = std::io::Error::from_raw_os_error(2);
        let e = Err::<(), _>(io).context("cannot read p.json").unwrap_err();
        assert_eq!(one_line(&e), "cannot read p.json: No such file or directory");
        assert_eq!(tidy("a\n  b (os error 111): c (os error 111)"), "a b: c");
        assert_eq!(exit_code(&e), 1);
        let e = anyhow::Error::new(Usage("bad".into())).context("checking");
        assert_eq!(exit_code(&e), EXIT_USAGE);
    }

    #[test]
    fn a_bad_archive_target_is_a_usage_mistake() {
        let spec = "name=nas,endpoint=http://127.0.0.1:9000,bucket=cim,path-style=false,credentials-env=X";
        let e = cim_archive::Target::parse(spec, &|_| Some("v".into())).unwrap_err();
        let e = anyhow::Error::new(e).context("archive status");
        assert_eq!(exit_code(&e), EXIT_USAGE);
        assert!(one_line(&e).contains("use path-style=true"), "{}", one_line(&e));
    }

    #[test]
    fn serde_wording_becomes_words() {
        assert_eq!(
            json_words("invalid length 0, expected struct Definition with 6 elements"),
            "expected an object, found an empty list"
        );
        assert_eq!(json_words("invalid type: sequence, expected struct Step"), "expected an object, found a list");
        assert_eq!(
            json_words("invalid type: string \"x\", expected u32"),
            "expected a whole number, 0 or more, found string \"x\""
        );
        assert_eq!(json_words("missing field `steps`"), "missing field `steps`");
        assert_eq!(parse_json(" \n").unwrap_err(), "empty document");
        assert!(parse_json("{ nope").unwrap_err().starts_with("not JSON: "));
        assert!(parse_json("[]").unwrap().is_array());
        assert_eq!(json_kind(&serde_json::json!([])), "an empty list");
    }

    #[test]
    fn clap_refusals_lead_with_one_cimctl_line() {
        let cmd = clap::Command::new("cimctl").arg(clap::Arg::new("id").required(true));
        let e = cmd.try_get_matches_from(["cimctl"]).unwrap_err();
        let text = clap_refusal(&e);
        let first = text.lines().next().unwrap();
        assert!(first.starts_with("cimctl: the following required arguments were not provided: <id>"), "{text}");
        assert!(text.contains("Usage: cimctl <id>"), "{text}");
    }
}
