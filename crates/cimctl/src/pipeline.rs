//! `cimctl pipeline` (apply, ls, show, rm, start) and `cimctl run` (ls, show, cancel, retry):
//! the pipeline engine's commands and queries, with run progress as it happens (`--watch`).

use std::{collections::BTreeMap, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result, bail};
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
    Apply { file: PathBuf },
    /// Every pipeline with its version and run counts.
    #[command(alias = "list")]
    Ls,
    /// One pipeline's current definition.
    Show { name: String },
    /// Stop starting runs of a pipeline (running ones finish).
    #[command(alias = "remove")]
    Rm {
        name: String,
        #[arg(long, default_value = "removed with cimctl")]
        reason: String,
    },
    /// Start a run by hand.
    Start {
        name: String,
        /// The unit the run is about.
        #[arg(long)]
        unit: Option<String>,
        /// Parameters, read by steps as `param.<key>`.
        #[arg(long = "param", value_parser = parse_kv)]
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
        #[arg(long)]
        pipeline: Option<String>,
        /// queued, running, completed, failed or cancelled
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        unit: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// One run, step by step (`--watch`: until it ends).
    Show {
        run_id: String,
        #[arg(long)]
        watch: bool,
    },
    /// Cancel a run that has not ended.
    Cancel {
        run_id: String,
        #[arg(long, default_value = "cancelled with cimctl")]
        reason: String,
    },
    /// Run a failed or cancelled run again from its failed step.
    Retry {
        run_id: String,
        #[arg(long, default_value = "retried with cimctl")]
        reason: String,
        #[arg(long)]
        watch: bool,
    },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("{s:?} is not key=value"))
}

struct Client {
    nats: async_nats::Client,
    timeout: Duration,
    json: bool,
}

impl Client {
    async fn connect(c: &Conn) -> Result<Client> {
        let mut opts = async_nats::ConnectOptions::new().name("cimctl");
        if let Some(creds) = &c.nats_creds {
            opts = opts
                .credentials_file(creds)
                .await
                .with_context(|| format!("reading NATS credentials {}", creds.display()))?;
        }
        let urls: Vec<&str> = c.nats_url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
        let nats = opts.connect(urls).await.with_context(|| format!("connecting to NATS at {}", c.nats_url))?;
        Ok(Client { nats, timeout: Duration::from_secs_f64(c.timeout), json: c.json })
    }

    async fn call<Req: Serialize, Rep: serde::de::DeserializeOwned>(&self, subject: String, body: &Req) -> Result<Rep> {
        let body = serde_json::to_vec(body)?;
        let reply = tokio::time::timeout(self.timeout, self.nats.request(subject.clone(), body.into()))
            .await
            .with_context(|| format!("{subject}: no answer within {:?} (is pipeline-engine running?)", self.timeout))?
            .with_context(|| format!("{subject}: is pipeline-engine running?"))?;
        if let Some(h) = &reply.headers
            && let Some(code) = h.get("Nats-Service-Error-Code")
        {
            let msg = h.get("Nats-Service-Error").map(|v| v.to_string()).unwrap_or_default();
            bail!("{code}: {msg}");
        }
        serde_json::from_slice(&reply.payload).with_context(|| format!("{subject}: reply is not the expected JSON"))
    }

    async fn run_info(&self, run_id: &str) -> Result<RunInfo> {
        self.call(pl::query(pl::qry::RUN)?, &RunRef { run_id: run_id.to_string(), reason: String::new() }).await
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
    }
    if !r.units.is_empty() {
        println!("  units {}", r.units.join(", "));
    }
    if !r.error.is_empty() {
        println!("  error: {}", r.error);
    }
}

pub async fn pipeline(args: PipelineArgs) -> Result<ExitCode> {
    let c = Client::connect(&args.conn).await?;
    match args.command {
        PipelineCommand::Apply { file } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading the definition from stdin")?
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?
            };
            let definition: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))?;
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
            };
            let r: RunRef = c.call(pl::command(pl::cmd::START)?, &req).await?;
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
