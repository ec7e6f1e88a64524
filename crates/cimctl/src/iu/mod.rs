//! `cimctl iu`: information units from the command line, through `cim-iu-client`.
//!
//! Output is readable lines and tables, or with `--json` one JSON document per command on
//! stdout (field names as in `iu.proto`). Progress bars go to stderr, only when it is a
//! terminal. Errors are one line on stderr and exit status 1.

use std::{
    io::IsTerminal,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use cim_iu_client::{
    IuClient, Progress,
    json::ToJson,
    proto::{
        CommandHeader, CommandResult, ContentCommitted, CreateUnit, DeleteUnit, GetUnit, Link, LinkUnit, ListUnits,
        NewVersion, RegisterType, SetAttributes, TagUnit, Unit, UnlinkUnit, UntagUnit,
    },
};
use serde_json::{Value, json};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

#[derive(clap::Args, Debug)]
pub struct IuArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Print machine-readable JSON on stdout (one document per command).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: IuCommand,
}

#[derive(clap::Args, Debug)]
struct ConnArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(long, global = true, env = "CIM_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// NATS credentials file (JWT + NKey seed).
    #[arg(long, global = true, env = "CIM_NATS_CREDS")]
    nats_creds: Option<PathBuf>,
    /// JetStream domain of the content object store (e.g. a leaf node's).
    #[arg(long, global = true, env = "CIM_JS_DOMAIN")]
    js_domain: Option<String>,
    /// Timeout of each request, in seconds (commits of uploads get at least 60).
    #[arg(long, global = true, default_value_t = 10.0, value_parser = parse_seconds)]
    timeout: f64,
}

/// Options of every command that changes something.
#[derive(clap::Args, Debug, Clone, Default)]
struct MutateArgs {
    /// Expected current version of the unit (optimistic concurrency); 0 = don't check.
    #[arg(long, value_name = "VERSION", default_value_t = 0)]
    expect: u64,
    /// Request id making a retry of this command idempotent (default: a fresh UUIDv7).
    #[arg(long, value_name = "ID")]
    request_id: Option<String>,
}

impl MutateArgs {
    fn header(&self) -> Option<CommandHeader> {
        Some(CommandHeader { request_id: self.request_id.clone().unwrap_or_default(), expected_version: self.expect })
    }
}

#[derive(clap::Subcommand, Debug)]
enum IuCommand {
    /// Upload FILE and create a unit of it.
    Put {
        file: PathBuf,
        /// Unit name (default: the file name).
        #[arg(long)]
        name: Option<String>,
        /// Media type (default: guessed from the extension, else application/octet-stream).
        #[arg(long)]
        media_type: Option<String>,
        /// Unit type (its registered schema validates the attributes).
        #[arg(long = "type", value_name = "UNIT_TYPE")]
        unit_type: Option<String>,
        /// A tag (repeatable).
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        /// An attribute k=v (repeatable).
        #[arg(long = "attr", value_name = "K=V", value_parser = parse_kv)]
        attrs: Vec<(String, String)>,
        /// A link kind=target-unit-id (repeatable).
        #[arg(long = "link", value_name = "KIND=TARGET", value_parser = parse_link)]
        links: Vec<Link>,
        #[command(flatten)]
        m: MutateArgs,
    },
    /// Upload FILE as the new version of unit ID.
    Version {
        id: String,
        file: PathBuf,
        /// New name (default: unchanged).
        #[arg(long)]
        name: Option<String>,
        /// New media type (default: unchanged).
        #[arg(long)]
        media_type: Option<String>,
        #[command(flatten)]
        m: MutateArgs,
    },
    /// Download a unit's content (or content by CID), verified against its CID.
    Get {
        /// A unit id or a CID (bafkrei…).
        target: String,
        /// Write to FILE (atomically, after verification) instead of stdout.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Only bytes START..END (END exclusive), or START- to the end.
        #[arg(long, value_name = "START-END", value_parser = parse_range)]
        range: Option<ByteRange>,
        /// The content as of this unit version.
        #[arg(long, value_name = "V")]
        version: Option<u64>,
    },
    /// List units, newest state, filtered.
    Ls {
        #[arg(long = "type", value_name = "UNIT_TYPE")]
        unit_type: Option<String>,
        #[arg(long)]
        tag: Option<String>,
        /// Name prefix.
        #[arg(long)]
        prefix: Option<String>,
        /// Updated at or after this time (RFC 3339 or milliseconds since the epoch).
        #[arg(long, value_parser = parse_time_ms)]
        since: Option<i64>,
        /// Updated before this time (RFC 3339 or milliseconds since the epoch).
        #[arg(long, value_parser = parse_time_ms)]
        until: Option<i64>,
        /// Include deleted units.
        #[arg(long)]
        deleted: bool,
        /// At most N units.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
    },
    /// Show a unit: metadata, tags, attributes, links, versions, provenance.
    Show {
        id: String,
        /// As of this version.
        #[arg(long, value_name = "V", conflicts_with = "at_time")]
        at_version: Option<u64>,
        /// As of this time (RFC 3339 or milliseconds since the epoch).
        #[arg(long, value_name = "TIME", value_parser = parse_time_ms)]
        at_time: Option<i64>,
    },
    /// A unit's history: every event, oldest first.
    History { id: String },
    /// A unit's links, outgoing and incoming.
    Links { id: String },
    /// Add tags to a unit.
    Tag {
        id: String,
        #[arg(required = true)]
        tags: Vec<String>,
        #[command(flatten)]
        m: MutateArgs,
    },
    /// Remove tags from a unit.
    Untag {
        id: String,
        #[arg(required = true)]
        tags: Vec<String>,
        #[command(flatten)]
        m: MutateArgs,
    },
    /// Set (k=v) and remove (--remove k) attributes of a unit.
    Attr {
        id: String,
        #[arg(value_name = "K=V", value_parser = parse_kv)]
        set: Vec<(String, String)>,
        /// Remove attribute K (repeatable).
        #[arg(long, value_name = "K")]
        remove: Vec<String>,
        #[command(flatten)]
        m: MutateArgs,
    },
    /// Link unit ID to unit TARGET with KIND.
    Link {
        id: String,
        kind: String,
        target: String,
        #[command(flatten)]
        m: MutateArgs,
    },
    /// Remove the link KIND from unit ID to TARGET.
    Unlink {
        id: String,
        kind: String,
        target: String,
        #[command(flatten)]
        m: MutateArgs,
    },
    /// Delete a unit (a tombstone; its history stays).
    Rm {
        id: String,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        m: MutateArgs,
    },
    /// Unit types: register a schema, show one.
    #[command(subcommand)]
    Type(TypeCommand),
    /// The service's projection status (checkpoint, lag, units).
    Status,
}

#[derive(clap::Subcommand, Debug)]
enum TypeCommand {
    /// Register unit type NAME with the JSON schema in SCHEMA_FILE.
    Register {
        name: String,
        schema_file: PathBuf,
        #[command(flatten)]
        m: MutateArgs,
    },
    /// Show unit type NAME and its schema.
    Show { name: String },
}

/// `--range`: START-END (END exclusive) or START- (to the end).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: Option<u64>,
}

impl ByteRange {
    /// The range as `(start, end_exclusive)` within content of `size` bytes.
    fn resolve(self, size: u64) -> (u64, u64) {
        (self.start, self.end.unwrap_or(size).max(self.start))
    }
}

fn parse_range(s: &str) -> Result<ByteRange, String> {
    let (a, b) = s.split_once('-').ok_or_else(|| format!("{s:?}: expected START-END or START-"))?;
    let num = |x: &str| x.trim().parse::<u64>().map_err(|_| format!("{s:?}: {x:?} is not a byte offset"));
    let start = num(a)?;
    let end = if b.trim().is_empty() { None } else { Some(num(b)?) };
    if end.is_some_and(|end| end < start) {
        return Err(format!("{s:?}: END is before START"));
    }
    Ok(ByteRange { start, end })
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("{s:?}: expected KEY=VALUE")),
    }
}

fn parse_link(s: &str) -> Result<Link, String> {
    match s.split_once('=') {
        Some((k, t)) if !k.trim().is_empty() && !t.trim().is_empty() => {
            Ok(Link { kind: k.trim().to_string(), target: t.trim().to_string() })
        }
        _ => Err(format!("{s:?}: expected KIND=TARGET")),
    }
}

fn parse_time_ms(s: &str) -> Result<i64, String> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let t = OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| format!("{s:?}: expected an RFC 3339 time such as 2024-05-01T12:00:00Z ({e})"))?;
    Ok((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("{s:?}: expected a positive number of seconds")),
    }
}

/// RFC 3339 of milliseconds since the epoch; "-" for 0.
fn format_ms(ms: i64) -> String {
    if ms == 0 {
        return "-".into();
    }
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}

/// 1536 → "1.5 KiB".
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Columns padded to their widest cell; the last column is not padded.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len() - 1;
        let mut l = String::new();
        for (i, cell) in cells.into_iter().enumerate() {
            if i == last {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

fn result_line(verb: &str, r: &CommandResult) -> String {
    let mut s = format!("{verb} {} version {}", r.unit_id, r.version);
    if !r.cid.is_empty() {
        s.push_str(&format!(" cid {}", r.cid));
    }
    if r.replayed {
        s.push_str(" (replayed: already done)");
    }
    s
}

fn put_json(c: &ContentCommitted, r: &CommandResult) -> Value {
    json!({ "content": c.to_json(), "result": r.to_json() })
}

fn units_table(units: &[Unit]) -> String {
    let rows: Vec<Vec<String>> = units
        .iter()
        .map(|u| {
            vec![
                u.unit_id.clone(),
                u.version.to_string(),
                human_size(u.size),
                if u.unit_type.is_empty() { "-".into() } else { u.unit_type.clone() },
                format_ms(u.updated_ms),
                if u.deleted { format!("{} (deleted)", u.name) } else { u.name.clone() },
                u.tags.join(","),
            ]
        })
        .collect();
    table(&["ID", "VERSION", "SIZE", "TYPE", "UPDATED", "NAME", "TAGS"], &rows)
}

fn unit_text(u: &Unit) -> String {
    let dash = |s: &str| if s.is_empty() { "-".to_string() } else { s.to_string() };
    let mut out = String::new();
    let mut kv = |k: &str, v: String| out.push_str(&format!("{k:<12}{v}\n"));
    kv("unit", u.unit_id.clone());
    kv("name", dash(&u.name));
    kv("media type", dash(&u.media_type));
    kv("unit type", dash(&u.unit_type));
    kv("cid", dash(&u.cid));
    kv("size", format!("{} ({} bytes)", human_size(u.size), u.size));
    kv("version", u.version.to_string());
    if u.deleted {
        kv("deleted", "yes".into());
    }
    for (label, ms, by) in [("created", u.created_ms, &u.created_by), ("updated", u.updated_ms, &u.updated_by)] {
        let mut v = format_ms(ms);
        if let Some(p) = by {
            if !p.source.is_empty() {
                v.push_str(&format!(" by {}", p.source));
            }
            if !p.correlation_id.is_empty() {
                v.push_str(&format!(" (correlation {})", p.correlation_id));
            }
        }
        kv(label, v);
    }
    kv("tags", if u.tags.is_empty() { "-".into() } else { u.tags.join(", ") });
    let mut attrs: Vec<_> = u.attributes.iter().collect();
    attrs.sort();
    if attrs.is_empty() {
        kv("attributes", "-".into());
    } else {
        out.push_str("attributes\n");
        for (k, v) in attrs {
            out.push_str(&format!("  {k} = {v}\n"));
        }
    }
    if u.links.is_empty() {
        out.push_str(&format!("{:<12}-\n", "links"));
    } else {
        out.push_str("links\n");
        for l in &u.links {
            out.push_str(&format!("  {} -> {}\n", l.kind, l.target));
        }
    }
    if !u.versions.is_empty() {
        out.push_str("versions\n");
        for v in &u.versions {
            out.push_str(&format!("  {:<8}{}  {}  {}\n", v.version, format_ms(v.time_ms), v.cid, human_size(v.size)));
        }
    }
    out
}

/// A progress bar on stderr when it is a terminal; nothing otherwise.
struct Bar(Option<indicatif::ProgressBar>);

impl Bar {
    fn new(message: &str) -> Bar {
        if !std::io::stderr().is_terminal() {
            return Bar(None);
        }
        let bar = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
        bar.set_message(message.to_string());
        Bar(Some(bar))
    }
}

impl Progress for Bar {
    fn start(&mut self, total: Option<u64>) {
        let Some(bar) = &self.0 else { return };
        let template = match total {
            Some(t) => {
                bar.set_length(t);
                "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}"
            }
            None => "{msg} {spinner} {bytes} {binary_bytes_per_sec}",
        };
        if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
    }
    fn update(&mut self, done: u64) {
        if let Some(bar) = &self.0 {
            bar.set_position(done);
        }
    }
    fn finish(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

async fn connect(c: &ConnArgs) -> Result<IuClient> {
    let mut opts = async_nats::ConnectOptions::new().name("cimctl");
    if let Some(creds) = &c.nats_creds {
        opts = opts
            .credentials_file(creds)
            .await
            .with_context(|| format!("reading NATS credentials {}", creds.display()))?;
    }
    let urls: Vec<&str> = c.nats_url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
    let client = opts.connect(urls).await.with_context(|| format!("connecting to NATS at {}", c.nats_url))?;
    let iu = match &c.js_domain {
        Some(d) if !d.is_empty() => IuClient::with_domain(client, d),
        _ => IuClient::new(client),
    };
    let timeout = Duration::from_secs_f64(c.timeout);
    Ok(iu.timeout(timeout).commit_timeout(timeout.max(cim_iu_client::DEFAULT_COMMIT_TIMEOUT)))
}

fn print(json: bool, value: impl FnOnce() -> Value, text: impl FnOnce() -> String) {
    if json {
        println!("{}", value());
    } else {
        let t = text();
        print!("{t}");
        if !t.ends_with('\n') {
            println!();
        }
    }
}

pub async fn run(args: IuArgs) -> Result<ExitCode> {
    let iu = connect(&args.conn).await?;
    let json = args.json;
    match args.command {
        IuCommand::Put { file, name, media_type, unit_type, tags, attrs, links, m } => {
            let template = CreateUnit {
                header: m.header(),
                cid: String::new(),
                name: name.unwrap_or_default(),
                media_type: media_type.unwrap_or_default(),
                unit_type: unit_type.unwrap_or_default(),
                tags,
                attributes: attrs.into_iter().collect(),
                links,
            };
            let mut bar = Bar::new("upload");
            let (c, r) = iu.put_file(&file, template, &mut bar).await?;
            drop(bar);
            print(
                json,
                || put_json(&c, &r),
                || {
                    let mut s = result_line("created unit", &r);
                    s.push_str(&format!(" size {}", human_size(c.size)));
                    if c.deduplicated {
                        s.push_str(" (content was already stored)");
                    }
                    s
                },
            );
        }
        IuCommand::Version { id, file, name, media_type, m } => {
            let template = NewVersion {
                header: m.header(),
                unit_id: id,
                cid: String::new(),
                name: name.unwrap_or_default(),
                media_type: media_type.unwrap_or_default(),
            };
            let mut bar = Bar::new("upload");
            let (c, r) = iu.new_version_from_file(&file, template, &mut bar).await?;
            drop(bar);
            print(
                json,
                || put_json(&c, &r),
                || {
                    let mut s = result_line("new version of", &r);
                    s.push_str(&format!(" size {}", human_size(c.size)));
                    s
                },
            );
        }
        IuCommand::Get { target, output, range, version } => {
            get(&iu, json, &target, output.as_deref(), range, version).await?;
        }
        IuCommand::Ls { unit_type, tag, prefix, since, until, deleted, limit } => {
            let query = ListUnits {
                unit_type: unit_type.unwrap_or_default(),
                tag: tag.unwrap_or_default(),
                name_prefix: prefix.unwrap_or_default(),
                since_ms: since.unwrap_or(0),
                until_ms: until.unwrap_or(0),
                page_size: limit.map_or(0, |l| l.clamp(1, 1000) as u32),
                page_token: String::new(),
                include_deleted: deleted,
            };
            let mut units = Vec::new();
            let mut pages = iu.pages(query);
            while let Some(page) = pages.next_page().await? {
                units.extend(page);
                if limit.is_some_and(|l| units.len() >= l) {
                    break;
                }
            }
            if let Some(l) = limit {
                units.truncate(l);
            }
            print(json, || units.to_json(), || units_table(&units));
        }
        IuCommand::Show { id, at_version, at_time } => {
            let unit = iu
                .get_unit(GetUnit {
                    unit_id: id,
                    at_version: at_version.unwrap_or(0),
                    at_time_ms: at_time.unwrap_or(0),
                })
                .await?;
            print(json, || unit.to_json(), || unit_text(&unit));
        }
        IuCommand::History { id } => {
            let h = iu.history(&id).await?;
            print(
                json,
                || h.to_json(),
                || {
                    let rows: Vec<Vec<String>> = h
                        .entries
                        .iter()
                        .map(|e| {
                            let p = e.provenance.clone().unwrap_or_default();
                            vec![e.version.to_string(), format_ms(p.time_ms), e.event_type.clone(), e.summary.clone()]
                        })
                        .collect();
                    table(&["VERSION", "TIME", "EVENT", "SUMMARY"], &rows)
                },
            );
        }
        IuCommand::Links { id } => {
            let l = iu.links(&id).await?;
            print(
                json,
                || l.to_json(),
                || {
                    let mut rows: Vec<Vec<String>> =
                        l.outgoing.iter().map(|x| vec!["out".into(), x.kind.clone(), x.target.clone()]).collect();
                    rows.extend(l.incoming.iter().map(|x| vec!["in".into(), x.kind.clone(), x.source.clone()]));
                    table(&["DIRECTION", "KIND", "UNIT"], &rows)
                },
            );
        }
        IuCommand::Tag { id, tags, m } => {
            let r = iu.tag(TagUnit { header: m.header(), unit_id: id, tags }).await?;
            print(json, || r.to_json(), || result_line("tagged", &r));
        }
        IuCommand::Untag { id, tags, m } => {
            let r = iu.untag(UntagUnit { header: m.header(), unit_id: id, tags }).await?;
            print(json, || r.to_json(), || result_line("untagged", &r));
        }
        IuCommand::Attr { id, set, remove, m } => {
            if set.is_empty() && remove.is_empty() {
                bail!("nothing to change: give K=V pairs and/or --remove K");
            }
            let r = iu
                .set_attributes(SetAttributes {
                    header: m.header(),
                    unit_id: id,
                    set: set.into_iter().collect(),
                    remove,
                })
                .await?;
            print(json, || r.to_json(), || result_line("updated attributes of", &r));
        }
        IuCommand::Link { id, kind, target, m } => {
            let r = iu.link(LinkUnit { header: m.header(), unit_id: id, link: Some(Link { kind, target }) }).await?;
            print(json, || r.to_json(), || result_line("linked", &r));
        }
        IuCommand::Unlink { id, kind, target, m } => {
            let r =
                iu.unlink(UnlinkUnit { header: m.header(), unit_id: id, link: Some(Link { kind, target }) }).await?;
            print(json, || r.to_json(), || result_line("unlinked", &r));
        }
        IuCommand::Rm { id, reason, m } => {
            let r =
                iu.delete(DeleteUnit { header: m.header(), unit_id: id, reason: reason.unwrap_or_default() }).await?;
            print(json, || r.to_json(), || result_line("deleted", &r));
        }
        IuCommand::Type(TypeCommand::Register { name, schema_file, m }) => {
            let schema_json = std::fs::read_to_string(&schema_file)
                .with_context(|| format!("reading schema {}", schema_file.display()))?;
            let r = iu.register_type(RegisterType { header: m.header(), name, schema_json }).await?;
            print(json, || r.to_json(), || result_line("registered type", &r));
        }
        IuCommand::Type(TypeCommand::Show { name }) => {
            let t = iu.get_type(&name).await?;
            print(
                json,
                || t.to_json(),
                || {
                    let schema = serde_json::from_str::<Value>(&t.schema_json)
                        .and_then(|v| serde_json::to_string_pretty(&v))
                        .unwrap_or_else(|_| t.schema_json.clone());
                    format!("type    {}\nversion {}\nschema\n{schema}\n", t.name, t.version)
                },
            );
        }
        IuCommand::Status => {
            let s = iu.status().await?;
            print(
                json,
                || s.to_json(),
                || {
                    format!(
                        "stream last sequence  {}\ncheckpoint            {}\nlag                   {}\nrebuilding            {}\nunits                 {}\n",
                        s.stream_last_sequence,
                        s.checkpoint,
                        s.lag,
                        if s.rebuilding { "yes" } else { "no" },
                        s.units
                    )
                },
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `get`: resolve the CID, stream it (verified) to stdout or atomically to a file.
async fn get(
    iu: &IuClient,
    json: bool,
    target: &str,
    output: Option<&Path>,
    range: Option<ByteRange>,
    version: Option<u64>,
) -> Result<()> {
    let (cid, size) = if target.parse::<cim_events::Cid>().is_ok() {
        if version.is_some() {
            bail!("--version applies to a unit id, not to a CID");
        }
        let size = match range {
            Some(ByteRange { end: None, .. }) => Some(iu.content_size(target).await?),
            _ => None,
        };
        (target.to_string(), size)
    } else {
        let unit = iu
            .get_unit(GetUnit { unit_id: target.to_string(), at_version: version.unwrap_or(0), at_time_ms: 0 })
            .await?;
        if unit.cid.is_empty() {
            bail!("unit {target} has no content");
        }
        (unit.cid, Some(unit.size))
    };
    let range = range.map(|r| r.resolve(size.unwrap_or(u64::MAX)));
    let mut bar = Bar::new("download");
    let read = match output {
        None => {
            let stdout = tokio::io::stdout();
            match iu.get_content(&cid, range, stdout, &mut bar).await {
                Ok(read) => read,
                // The reader went away (`cimctl iu get X | head`): not an error of ours.
                Err(cim_iu_client::IuError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
        Some(path) => {
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let file_name =
                path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "content".into());
            // 0666 less the umask, like any file this user creates (tempfile's default is 0600).
            let tmp = tempfile::Builder::new()
                .prefix(&format!(".{file_name}."))
                .suffix(".part")
                .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
                .tempfile_in(&dir)
                .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
            let mut file = tokio::fs::File::from_std(tmp.reopen().context("opening the temporary file")?);
            // On any error `tmp` is dropped and the temporary file removed.
            let read = iu.get_content(&cid, range, &mut file, &mut bar).await?;
            file.sync_all().await.context("syncing the downloaded file")?;
            drop(file);
            tmp.persist(path).with_context(|| format!("renaming the download to {}", path.display()))?;
            read
        }
    };
    drop(bar);
    if let Some(path) = output {
        print(
            json,
            || json!({ "cid": read.cid, "size": read.size, "written": read.written, "path": path.display().to_string() }),
            || format!("wrote {} ({}) of {} to {}", human_size(read.written), read.written, read.cid, path.display()),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct TestCli {
        #[command(flatten)]
        iu: IuArgs,
    }

    #[test]
    fn ranges_parse() {
        assert_eq!(parse_range("0-100").unwrap(), ByteRange { start: 0, end: Some(100) });
        assert_eq!(parse_range("5-").unwrap(), ByteRange { start: 5, end: None });
        assert_eq!(parse_range("7-7").unwrap(), ByteRange { start: 7, end: Some(7) });
        for bad in ["", "5", "-5", "a-b", "10-5", "1-2-3", "1.5-2"] {
            assert!(parse_range(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_range("5-").unwrap().resolve(100), (5, 100));
        assert_eq!(parse_range("200-").unwrap().resolve(100), (200, 200));
        assert_eq!(parse_range("1-3").unwrap().resolve(100), (1, 3));
    }

    #[test]
    fn key_values_and_links_parse() {
        assert_eq!(parse_kv("a=b").unwrap(), ("a".into(), "b".into()));
        assert_eq!(parse_kv("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert_eq!(parse_kv("a=").unwrap(), ("a".into(), String::new()));
        assert!(parse_kv("=b").is_err());
        assert!(parse_kv("ab").is_err());
        assert_eq!(parse_link("derived-from=u1").unwrap(), Link { kind: "derived-from".into(), target: "u1".into() });
        assert!(parse_link("kind=").is_err());
        assert!(parse_link("=t").is_err());
    }

    #[test]
    fn times_parse_and_format() {
        assert_eq!(parse_time_ms("1970-01-01T00:00:01.5Z").unwrap(), 1500);
        assert_eq!(parse_time_ms("2024-05-01T12:00:00+02:00").unwrap(), 1_714_557_600_000);
        assert_eq!(parse_time_ms("1234").unwrap(), 1234);
        assert!(parse_time_ms("yesterday").is_err());
        assert_eq!(format_ms(1500), "1970-01-01T00:00:01.5Z");
        assert_eq!(format_ms(0), "-");
    }

    #[test]
    fn sizes_and_tables_render() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(1 << 30), "1.0 GiB");
        let t = table(&["A", "BB"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    BB\nxyz  1\n");
    }

    #[test]
    fn outputs_render() {
        let r = CommandResult { unit_id: "u1".into(), version: 4, cid: "bafk".into(), replayed: true };
        assert_eq!(result_line("tagged", &r), "tagged u1 version 4 cid bafk (replayed: already done)");
        let c = ContentCommitted { cid: "bafk".into(), size: 3, deduplicated: false };
        let v = put_json(&c, &r);
        assert_eq!(v["content"]["size"], 3);
        assert_eq!(v["result"]["unit_id"], "u1");
        let u = Unit {
            unit_id: "u1".into(),
            name: "n".into(),
            size: 2048,
            tags: vec!["a".into(), "b".into()],
            ..Default::default()
        };
        let t = units_table(std::slice::from_ref(&u));
        assert!(t.starts_with("ID"));
        assert!(t.contains("u1") && t.contains("2.0 KiB") && t.contains("a,b"));
        let s = unit_text(&u);
        assert!(s.contains("unit        u1\n"));
        assert!(s.contains("tags        a, b\n"));
    }

    #[test]
    fn command_line_parses() {
        let cli = TestCli::try_parse_from([
            "t",
            "put",
            "f.txt",
            "--tag",
            "a",
            "--tag",
            "b",
            "--attr",
            "k=v",
            "--link",
            "derived-from=u0",
            "--expect",
            "3",
            "--json",
        ])
        .unwrap();
        assert!(cli.iu.json);
        match cli.iu.command {
            IuCommand::Put { tags, attrs, links, m, .. } => {
                assert_eq!(tags, ["a", "b"]);
                assert_eq!(attrs, [("k".to_string(), "v".to_string())]);
                assert_eq!(links[0].target, "u0");
                assert_eq!(m.expect, 3);
                assert_eq!(m.header().unwrap().expected_version, 3);
            }
            other => panic!("{other:?}"),
        }
        let cli = TestCli::try_parse_from(["t", "get", "u1", "-o", "x", "--range", "1-5"]).unwrap();
        assert!(matches!(cli.iu.command, IuCommand::Get { range: Some(ByteRange { start: 1, end: Some(5) }), .. }));
        assert!(TestCli::try_parse_from(["t", "tag", "u1"]).is_err());
        assert!(TestCli::try_parse_from(["t", "get", "u1", "--range", "9-1"]).is_err());
        assert!(TestCli::try_parse_from(["t", "ls", "--since", "nope"]).is_err());
        let cli = TestCli::try_parse_from(["t", "type", "register", "doc", "s.json", "--expect", "1"]).unwrap();
        assert!(matches!(cli.iu.command, IuCommand::Type(TypeCommand::Register { .. })));
    }
}
