//! `cimctl iu`: information units from the command line, through `cim-iu-client`.
//!
//! Output is readable lines and tables, or with `--json` one JSON document per command on
//! stdout (field names as in `iu.proto`). Progress bars go to stderr, only when it is a
//! terminal. Errors are one line on stderr and exit status 1; a malformed argument (a unit id
//! that is no UUID, say) exits 64 before anything connects.
//!
//! The command line is here, its values in `parse`, printing in `render`, the progress bar
//! in `progress` and downloads in `get`.

mod get;
mod parse;
mod progress;
mod render;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use cim_iu_client::{
    IuClient,
    json::ToJson,
    proto::{
        CommandHeader, CreateUnit, DeleteUnit, GetUnit, Link, LinkUnit, ListUnits, NewVersion, RegisterType,
        SetAttributes, TagUnit, UnlinkUnit, UntagUnit,
    },
};
use parse::{
    ByteRange, GetTarget, parse_get_target, parse_kv, parse_link, parse_range, parse_seconds, parse_time_ms,
    parse_unit_id,
};
use progress::Bar;
use render::{format_ms, human_size, put_json, result_line, table, unit_json, unit_text, units_table};
use serde_json::Value;

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
        /// The file to upload.
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
        /// The unit (a UUID).
        #[arg(value_parser = parse_unit_id)]
        id: String,
        /// The file to upload.
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
        /// A unit id (a UUID) or a CID (bafkrei…).
        #[arg(value_name = "ID_OR_CID", value_parser = parse_get_target)]
        target: GetTarget,
        /// Write to FILE (atomically, after verification) instead of stdout.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Only bytes START..END (END exclusive), or START- to the end.
        #[arg(long, value_name = "START-END", value_parser = parse_range)]
        range: Option<ByteRange>,
        /// The content as of this unit version.
        #[arg(long, value_name = "V", alias = "version")]
        at_version: Option<u64>,
    },
    /// List units, newest state, filtered.
    Ls {
        /// Only units of this unit type.
        #[arg(long = "type", value_name = "UNIT_TYPE")]
        unit_type: Option<String>,
        /// Only units with this tag.
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
    /// Show a unit: metadata, tags, attributes, links (to and from it), versions, provenance.
    Show {
        /// The unit (a UUID).
        #[arg(value_parser = parse_unit_id)]
        id: String,
        /// As of this version.
        #[arg(long, value_name = "V", conflicts_with = "at_time")]
        at_version: Option<u64>,
        /// As of this time (RFC 3339 or milliseconds since the epoch).
        #[arg(long, value_name = "TIME", value_parser = parse_time_ms)]
        at_time: Option<i64>,
    },
    /// A unit's history: every event, oldest first.
    History {
        /// The unit (a UUID).
        #[arg(value_parser = parse_unit_id)]
        id: String,
    },
    /// A unit's links, outgoing and incoming.
    Links {
        /// The unit (a UUID).
        #[arg(value_parser = parse_unit_id)]
        id: String,
    },
    /// Add tags to a unit.
    Tag {
        /// The unit (a UUID).
        #[arg(value_parser = parse_unit_id)]
        id: String,
        /// The tags to add.
        #[arg(required = true)]
        tags: Vec<String>,
        #[command(flatten)]
        m: MutateArgs,
    },
    /// Remove tags from a unit.
    Untag {
        /// The unit (a UUID).
        #[arg(value_parser = parse_unit_id)]
        id: String,
        /// The tags to remove.
        #[arg(required = true)]
        tags: Vec<String>,
        #[command(flatten)]
        m: MutateArgs,
    },
    /// Set (k=v) and remove (--remove k) attributes of a unit.
    Attr {
        /// The unit (a UUID).
        #[arg(value_parser = parse_unit_id)]
        id: String,
        /// Attributes to set.
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
        /// The unit the link starts from (a UUID).
        #[arg(value_parser = parse_unit_id)]
        id: String,
        /// What the link means, e.g. derived-from or cites.
        kind: String,
        /// The unit the link points to (a UUID).
        #[arg(value_parser = parse_unit_id)]
        target: String,
        #[command(flatten)]
        m: MutateArgs,
    },
    /// Remove the link KIND from unit ID to TARGET.
    Unlink {
        /// The unit the link starts from (a UUID).
        #[arg(value_parser = parse_unit_id)]
        id: String,
        /// The link's kind.
        kind: String,
        /// The link's target, as `iu show` lists it.
        target: String,
        #[command(flatten)]
        m: MutateArgs,
    },
    /// Delete a unit (a tombstone; its history stays).
    Rm {
        /// The unit (a UUID).
        #[arg(value_parser = parse_unit_id)]
        id: String,
        /// Why, recorded in the unit's history.
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
        /// The unit type's name.
        name: String,
        /// A file holding the type's JSON schema (for the attributes).
        schema_file: PathBuf,
        #[command(flatten)]
        m: MutateArgs,
    },
    /// Show unit type NAME and its schema.
    Show {
        /// The unit type's name.
        name: String,
    },
}

async fn connect(c: &ConnArgs) -> Result<IuClient> {
    let client = crate::conn::connect("cimctl", &c.nats_url, c.nats_creds.as_deref(), None).await?;
    let iu = match &c.js_domain {
        Some(d) if !d.is_empty() => IuClient::with_domain(client, d),
        _ => IuClient::new(client),
    };
    let timeout = Duration::from_secs_f64(c.timeout);
    // A command line run follows others (a tag, then a show): it reads what the log holds,
    // not what the projection has applied so far.
    Ok(iu.latest().timeout(timeout).commit_timeout(timeout.max(cim_iu_client::DEFAULT_COMMIT_TIMEOUT)))
}

/// Fails, naming the file once, unless `file` can be opened for reading.
fn readable(file: &std::path::Path) -> Result<()> {
    std::fs::File::open(file).map(drop).with_context(|| format!("cannot read {}", file.display()))
}

pub(super) fn print(json: bool, value: impl FnOnce() -> Value, text: impl FnOnce() -> String) {
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
    // A file that cannot be read is said before anything connects.
    match &args.command {
        IuCommand::Put { file, .. } | IuCommand::Version { file, .. } => readable(file)?,
        IuCommand::Type(TypeCommand::Register { schema_file, .. }) => readable(schema_file)?,
        _ => {}
    }
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
        IuCommand::Get { target, output, range, at_version } => {
            get::get(&iu, json, target, output.as_deref(), range, at_version).await?;
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
                min_sequence: 0,
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
            let past = at_version.is_some() || at_time.is_some();
            let query = GetUnit {
                unit_id: id.clone(),
                at_version: at_version.unwrap_or(0),
                at_time_ms: at_time.unwrap_or(0),
                min_sequence: 0,
            };
            // Incoming links are kept for the present only.
            let (unit, links) = if past {
                (iu.get_unit(query).await?, None)
            } else {
                let (unit, links) = tokio::join!(iu.get_unit(query), iu.links(&id));
                (unit?, Some(links?))
            };
            let incoming = links.as_ref().map(|l| l.incoming.as_slice());
            print(json, || unit_json(&unit, incoming), || unit_text(&unit, incoming));
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
                return Err(crate::error::usage("nothing to change: give K=V pairs and/or --remove K"));
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
                .with_context(|| format!("cannot read the schema {}", schema_file.display()))?;
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{parse::UNIT_ID_EXAMPLE as U, *};

    #[derive(Parser, Debug)]
    struct TestCli {
        #[command(flatten)]
        iu: IuArgs,
    }

    #[test]
    fn command_line_parses() {
        let link = format!("derived-from={U}");
        let cli = TestCli::try_parse_from([
            "t", "put", "f.txt", "--tag", "a", "--tag", "b", "--attr", "k=v", "--link", &link, "--expect", "3",
            "--json",
        ])
        .unwrap();
        assert!(cli.iu.json);
        match cli.iu.command {
            IuCommand::Put { tags, attrs, links, m, .. } => {
                assert_eq!(tags, ["a", "b"]);
                assert_eq!(attrs, [("k".to_string(), "v".to_string())]);
                assert_eq!(links[0].target, U);
                assert_eq!(m.expect, 3);
                assert_eq!(m.header().unwrap().expected_version, 3);
            }
            other => panic!("{other:?}"),
        }
        let cli = TestCli::try_parse_from(["t", "get", U, "-o", "x", "--range", "1-5"]).unwrap();
        assert!(matches!(cli.iu.command, IuCommand::Get { range: Some(ByteRange { start: 1, end: Some(5) }), .. }));
        assert!(TestCli::try_parse_from(["t", "tag", U]).is_err());
        assert!(TestCli::try_parse_from(["t", "get", U, "--range", "9-1"]).is_err());
        assert!(TestCli::try_parse_from(["t", "ls", "--since", "nope"]).is_err());
        let cli = TestCli::try_parse_from(["t", "type", "register", "doc", "s.json", "--expect", "1"]).unwrap();
        assert!(matches!(cli.iu.command, IuCommand::Type(TypeCommand::Register { .. })));
    }

    #[test]
    fn a_malformed_unit_id_is_a_usage_error_saying_what_an_id_looks_like() {
        for args in [
            vec!["t", "show", "some-unit"],
            vec!["t", "tag", "u1", "x"],
            vec!["t", "rm", "a.b"],
            vec!["t", "history", "nope"],
            vec!["t", "link", U, "cites", "nope"],
            vec!["t", "get", "nope"],
        ] {
            let e = TestCli::try_parse_from(&args).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{args:?}");
            assert!(e.to_string().contains(&format!("a UUID such as {U}")), "{args:?}: {e}");
        }
        // Unlinking takes the target as `iu show` lists it, whatever it is.
        assert!(TestCli::try_parse_from(["t", "unlink", U, "cites", "legacy-id"]).is_ok());
    }

    #[test]
    fn show_and_get_name_a_version_the_same_way() {
        let cli = TestCli::try_parse_from(["t", "show", U, "--at-version", "2"]).unwrap();
        assert!(matches!(cli.iu.command, IuCommand::Show { at_version: Some(2), .. }));
        let cli = TestCli::try_parse_from(["t", "get", U, "--at-version", "2"]).unwrap();
        assert!(matches!(cli.iu.command, IuCommand::Get { at_version: Some(2), .. }));
        // The old spelling still works, unlisted.
        let cli = TestCli::try_parse_from(["t", "get", U, "--version", "3"]).unwrap();
        assert!(matches!(cli.iu.command, IuCommand::Get { at_version: Some(3), .. }));
        let mut cmd = <TestCli as clap::CommandFactory>::command();
        let help = cmd.find_subcommand_mut("get").unwrap().render_long_help().to_string();
        assert!(help.contains("--at-version <V>") && !help.contains("--version"), "{help}");
    }
}
