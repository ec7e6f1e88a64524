//! `cimctl pipeline` (apply, ls, show, rm, start) and `cimctl run` (ls, show, cancel, retry):
//! the pipeline engine's commands and queries, with run progress as it happens (`--watch`).

use std::{collections::BTreeMap, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result, anyhow};
use cim_events::pipeline::{
    self as pl, ApplyReply, PipelineInfo, PipelineList, RunInfo, RunList, RunRef, RunsRequest, StartRequest,
};
use serde::Serialize;

#[derive(clap::Args, Debug)]
pub struct Conn {
    /// NATS server URL(s), comma-separated.
    #[arg(long, global = true, env = "CIM_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// NATS credentials file (JWT + NKey seed).
    #[arg(long, global = true, env = "CIM_NATS_CREDS")]
    nats_creds: Option<PathBuf>,
    /// Timeout of each request, in seconds.
    #[arg(long, global = true, default_value_t = 15.0)]
    timeout: f64,
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct PipelineArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    command: PipelineCommand,
}

#[derive(clap::Subcommand, Debug)]
enum PipelineCommand {
    /// Validate a definition (a JSON file, `-` for stdin) and make it the pipeline's new version.
    Apply {
        /// The definition: a JSON file (see docs/pipelines.md), or `-` for stdin.
        file: PathBuf,
    },
    /// Every pipeline with its version and run counts.
    #[command(alias = "list")]
    Ls,
    /// One pipeline's current definition.
    Show {
        /// The pipeline's name.
        name: String,
    },
    /// Stop starting runs of a pipeline (running ones finish).
    #[command(alias = "remove")]
    Rm {
        /// The pipeline's name.
        name: String,
        /// Why, recorded with the removal.
        #[arg(long, default_value = "removed with cimctl")]
        reason: String,
    },
    /// Start a run by hand.
    Start {
        /// The pipeline's name.
        name: String,
        /// The unit the run is about.
        #[arg(long)]
        unit: Option<String>,
        /// A parameter KEY=VALUE (repeatable), read by steps as `param.<key>`.
        #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_kv)]
        params: Vec<(String, String)>,
        /// Follow the run until it ends (exit 1 if it fails or is cancelled).
        #[arg(long)]
        watch: bool,
    },
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    command: RunCommand,
}

#[derive(clap::Subcommand, Debug)]
enum RunCommand {
    /// Runs, newest first.
    #[command(alias = "list")]
    Ls {
        /// Only runs of this pipeline.
        #[arg(long)]
        pipeline: Option<String>,
        /// Only runs in this state.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(pl::RUN_STATES))]
        state: Option<String>,
        /// Only runs about this unit.
        #[arg(long)]
        unit: Option<String>,
        /// At most N runs.
        #[arg(long, value_name = "N", default_value_t = 50)]
        limit: u32,
    },
    /// One run, step by step (`--watch`: until it ends).
    Show {
        /// The run's id.
        run_id: String,
        /// Follow the run until it ends (exit 1 if it fails or is cancelled).
        #[arg(long)]
        watch: bool,
    },
    /// Cancel a run that has not ended.
    Cancel {
        /// The run's id.
        run_id: String,
        /// Why, recorded with the cancellation.
        #[arg(long, default_value = "cancelled with cimctl")]
        reason: String,
    },
    /// Run a failed or cancelled run again from its failed step.
    Retry {
        /// The run's id.
        run_id: String,
        /// Why, recorded with the retry.
        #[arg(long, default_value = "retried with cimctl")]
        reason: String,
        /// Follow the run until it ends (exit 1 if it fails or is cancelled).
        #[arg(long)]
        watch: bool,
    },
}

/// The engine's refusal in a person's words: its definition parser speaks serde.
fn refusal_words(msg: &str) -> String {
    match msg.strip_prefix("definition does not parse: ") {
        Some(why) => format!("pipeline definition: {}", crate::error::json_words(why)),
        None => msg.to_string(),
    }
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("{s:?} is not key=value"))
}

/// The longest one attempt of a repeatable request waits for its answer.
const ATTEMPT: Duration = Duration::from_secs(3);

struct Client {
    nats: async_nats::Client,
    timeout: Duration,
    json: bool,
}

impl Client {
    async fn connect(c: &Conn) -> Result<Client> {
        let nats = crate::conn::connect("cimctl", &c.nats_url, c.nats_creds.as_deref(), None).await?;
        Ok(Client { nats, timeout: Duration::from_secs_f64(c.timeout), json: c.json })
    }

    async fn call<Req: Serialize, Rep: serde::de::DeserializeOwned>(&self, subject: String, body: &Req) -> Result<Rep> {
        let body = serde_json::to_vec(body)?;
        let reply = tokio::time::timeout(self.timeout, self.nats.request(subject.clone(), body.into()))
            .await
            .map_err(|_| crate::conn::no_answer("pipeline-engine", &subject, self.timeout))?
            .map_err(|e| crate::conn::request_failed("pipeline-engine", &subject, &e))?;
        if let Some(h) = &reply.headers
            && let Some(code) = h.get("Nats-Service-Error-Code")
        {
            let msg = h.get("Nats-Service-Error").map(|v| v.to_string()).unwrap_or_default();
            let refusal = format!("pipeline-engine refused ({code}): {}", refusal_words(&msg));
            if code.as_str() == "503" {
                return Err(crate::conn::NoAnswer(refusal).into());
            }
            return Err(anyhow!(refusal));
        }
        serde_json::from_slice(&reply.payload).with_context(|| format!("{subject}: reply is not the expected JSON"))
    }

    /// [`Client::call`] for a request that may be repeated (a query, a command with a request
    /// id): short attempts, repeated on no answer or no responders, within the timeout.
    async fn call_retrying<Req: Serialize, Rep: serde::de::DeserializeOwned>(
        &self,
        subject: String,
        body: &Req,
    ) -> Result<Rep> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut pause = Duration::from_millis(100);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let attempt = Client { nats: self.nats.clone(), timeout: left.min(ATTEMPT), json: self.json };
            match attempt.call(subject.clone(), body).await {
                Err(e) if left > ATTEMPT && crate::conn::is_retryable(&e) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                other => return other,
            }
        }
    }

    async fn run_info(&self, run_id: &str) -> Result<RunInfo> {
        self.call_retrying(pl::query(pl::qry::RUN)?, &RunRef { run_id: run_id.to_string(), reason: String::new() })
            .await
    }

    /// Prints the run whenever it changes until it ends; the exit code says how it ended.
    async fn watch(&self, run_id: &str) -> Result<ExitCode> {
        let mut last = None;
        loop {
            let run = self.run_info(run_id).await?;
            if last != Some(run.last_seq) {
                last = Some(run.last_seq);
                if self.json {
                    println!("{}", serde_json::to_string(&run)?);
                } else {
                    print_run(&run);
                }
            }
            if run.is_terminal() {
                return Ok(if run.state == "completed" { ExitCode::SUCCESS } else { ExitCode::FAILURE });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn print_run(r: &RunInfo) {
    println!(
        "run {}  pipeline {} v{}  {}{}",
        r.run_id,
        r.pipeline,
        r.pipeline_version,
        r.state,
        if r.outcome.is_empty() { String::new() } else { format!(" ({})", r.outcome) }
    );
    if !r.unit_id.is_empty() {
        println!("  unit {}  trigger {}  correlation {}", r.unit_id, r.trigger, r.correlation_id);
    }
    for s in &r.steps {
        let err = if s.error.is_empty() { String::new() } else { format!("  {}", s.error) };
        println!("  {:<20} {:<10} attempts {:<2} {:>8}us{}", s.step, s.state, s.attempts, s.duration_us, err);
        if !s.waiting_for.is_empty() {
            println!("  {:<20} waiting for {} (no retry is spent meanwhile)", "", s.waiting_for);
        }
    }
    if !r.units.is_empty() {
        println!("  units {}", r.units.join(", "));
    }
    if !r.error.is_empty() {
        println!("  error: {}", r.error);
    }
}

/// The definition in `file` (`-`: stdin), if it is a JSON object; the engine checks the rest.
fn read_definition(file: &std::path::Path) -> Result<serde_json::Value> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("cannot read the definition from stdin")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?
    };
    let definition =
        crate::error::parse_json(&text).map_err(|why| anyhow!("pipeline definition {}: {why}", file.display()))?;
    if !definition.is_object() {
        let found = crate::error::json_kind(&definition);
        return Err(anyhow!("pipeline definition {}: expected an object, found {found}", file.display()));
    }
    Ok(definition)
}

pub async fn pipeline(args: PipelineArgs) -> Result<ExitCode> {
    // A definition that cannot be right is refused before connecting.
    let definition = match &args.command {
        PipelineCommand::Apply { file } => Some(read_definition(file)?),
        _ => None,
    };
    let c = Client::connect(&args.conn).await?;
    match args.command {
        PipelineCommand::Apply { .. } => {
            let definition = definition.unwrap_or_default();
            let reply: ApplyReply = c.call(pl::command(pl::cmd::APPLY)?, &pl::ApplyRequest { definition }).await?;
            if c.json {
                println!("{}", serde_json::to_string(&reply)?);
            } else if reply.unchanged {
                println!("pipeline {} unchanged (version {})", reply.name, reply.version);
            } else {
                println!("pipeline {} applied as version {}", reply.name, reply.version);
            }
        }
        PipelineCommand::Ls => {
            let list: PipelineList = c.call(pl::query(pl::qry::LIST)?, &serde_json::json!({})).await?;
            if c.json {
                println!("{}", serde_json::to_string(&list)?);
            } else {
                println!(
                    "{:<24} {:>7} {:<8} {:>7} {:>7} {:>9} {:>6} {:>9}",
                    "PIPELINE", "VERSION", "STATE", "QUEUED", "RUNNING", "COMPLETED", "FAILED", "CANCELLED"
                );
                for p in &list.pipelines {
                    let r = &p.runs;
                    println!(
                        "{:<24} {:>7} {:<8} {:>7} {:>7} {:>9} {:>6} {:>9}",
                        p.name,
                        p.version,
                        if p.active { "active" } else { "removed" },
                        r.queued,
                        r.running,
                        r.completed,
                        r.failed,
                        r.cancelled
                    );
                }
            }
        }
        PipelineCommand::Show { name } => {
            let p: PipelineInfo = c.call(pl::query(pl::qry::GET)?, &pl::PipelineRef { name }).await?;
            if c.json {
                println!("{}", serde_json::to_string(&p)?);
            } else {
                println!(
                    "pipeline {} version {} ({}) {}",
                    p.name,
                    p.version,
                    if p.active { "active" } else { "removed" },
                    p.digest
                );
                println!("{}", serde_json::to_string_pretty(&p.definition)?);
            }
        }
        PipelineCommand::Rm { name, reason } => {
            let reply: ApplyReply = c.call(pl::command(pl::cmd::REMOVE)?, &pl::RemoveRequest { name, reason }).await?;
            if c.json {
                println!("{}", serde_json::to_string(&reply)?);
            } else {
                println!("pipeline {} removed (last version {})", reply.name, reply.version);
            }
        }
        PipelineCommand::Start { name, unit, params, watch } => {
            let req = StartRequest {
                pipeline: name,
                unit_id: unit.unwrap_or_default(),
                params: params.into_iter().collect::<BTreeMap<_, _>>(),
                request_id: uuid::Uuid::now_v7().to_string(),
            };
            // Retried with the same request id: an engine replaced meanwhile costs one attempt,
            // and the run is started once.
            let r: RunRef = c.call_retrying(pl::command(pl::cmd::START)?, &req).await?;
            if watch {
                return c.watch(&r.run_id).await;
            }
            if c.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("{}", r.run_id);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn run(args: RunArgs) -> Result<ExitCode> {
    let c = Client::connect(&args.conn).await?;
    match args.command {
        RunCommand::Ls { pipeline, state, unit, limit } => {
            let req = RunsRequest {
                pipeline: pipeline.unwrap_or_default(),
                state: state.unwrap_or_default(),
                unit_id: unit.unwrap_or_default(),
                limit,
            };
            let list: RunList = c.call(pl::query(pl::qry::RUNS)?, &req).await?;
            if c.json {
                println!("{}", serde_json::to_string(&list)?);
            } else {
                println!("{:<36} {:<20} {:<10} {:<12} UNIT", "RUN", "PIPELINE", "STATE", "STEPS");
                for r in &list.runs {
                    let done = r.steps.iter().filter(|s| s.state == "completed").count();
                    println!(
                        "{:<36} {:<20} {:<10} {:<12} {}",
                        r.run_id,
                        r.pipeline,
                        r.state,
                        format!("{done}/{}", r.steps.len()),
                        r.unit_id
                    );
                }
            }
        }
        RunCommand::Show { run_id, watch } => {
            if watch {
                return c.watch(&run_id).await;
            }
            let r = c.run_info(&run_id).await?;
            if c.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                print_run(&r);
            }
        }
        RunCommand::Cancel { run_id, reason } => {
            let r: RunInfo = c.call(pl::command(pl::cmd::CANCEL)?, &RunRef { run_id, reason }).await?;
            if c.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                print_run(&r);
            }
        }
        RunCommand::Retry { run_id, reason, watch } => {
            let r: RunInfo = c.call(pl::command(pl::cmd::RETRY)?, &RunRef { run_id: run_id.clone(), reason }).await?;
            if watch {
                return c.watch(&run_id).await;
            }
            if c.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                print_run(&r);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct TestCli {
        #[command(flatten)]
        run: RunArgs,
    }

    #[test]
    fn run_states_are_checked_as_the_http_api_checks_them() {
        for state in pl::RUN_STATES {
            let cli = TestCli::try_parse_from(["t", "ls", "--state", state]).unwrap();
            assert!(matches!(cli.run.command, RunCommand::Ls { state: Some(s), .. } if s == state));
        }
        let e = TestCli::try_parse_from(["t", "ls", "--state", "bogus"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::InvalidValue);
        assert!(e.to_string().contains("queued, running, completed, failed, cancelled"), "{e}");
    }

    #[test]
    fn the_engines_serde_wording_becomes_words() {
        assert_eq!(
            refusal_words("definition does not parse: invalid length 0, expected struct Definition with 6 elements"),
            "pipeline definition: expected an object, found an empty list"
        );
        assert_eq!(
            refusal_words("definition does not parse: missing field `steps`"),
            "pipeline definition: missing field `steps`"
        );
        assert_eq!(refusal_words("pipeline nope does not exist"), "pipeline nope does not exist");
    }
}
