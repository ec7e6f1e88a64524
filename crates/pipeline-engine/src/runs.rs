//! The run worker: run work items (`requested`, `retried`) from the shared durable consumer
//! `pipeline-runs`, each worked on until it is done: the run is read from its events, a
//! concurrency slot taken, its remaining steps run in order with retries and backoff, a
//! cancellation honoured mid-step, and a failed run's work item dead-lettered.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, DeliverPolicy, pull},
};
use cim_events::{
    Envelope,
    pipeline::{self as pl, action},
    proto::{
        iu::Unit,
        pipeline::{RunCompleted, RunFailed, RunStarted, StepCompleted, StepFailed, StepStarted, StepWaiting},
    },
    subject,
};
use futures::StreamExt;

use crate::{
    definition::Definition,
    engine::{Engine, Publish, one_line},
    slots::Lease,
    state::{Run, RunEvent, RunEventError},
    steps::{MAX_STEP_OUTPUT, StepError},
};

/// A step whose information-unit service or JetStream is away is run again after this pause,
/// doubling up to the maximum, without spending a retry, for up to the patience (a restart or
/// a leader election takes seconds); after that its failures count as usual.
const UNAVAILABLE_POLL: Duration = Duration::from_millis(200);
const UNAVAILABLE_POLL_MAX: Duration = Duration::from_secs(2);
const UNAVAILABLE_PATIENCE: Duration = Duration::from_secs(120);
/// At most this many `step_waiting` events per attempt (one per distinct reason).
const MAX_WAIT_NOTES: u32 = 8;

/// What recording a wait did.
enum Noted {
    /// The run's new last sequence.
    Written(u64),
    /// Nothing written (already said, or JetStream is away).
    Skipped,
    /// Someone else wrote to the run (a cancel): read it again.
    RunChanged,
}

/// The `step_waiting` events one attempt has written.
#[derive(Default)]
struct WaitNotes {
    last: String,
    count: u32,
}

/// Why a run could not be read from its events.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LoadError {
    /// One of its events has no valid envelope or does not decode: the run can never be worked
    /// on, so its work item goes to the dead letters.
    #[error("{0}")]
    Poison(String),
    /// Reading failed, or an event is of a kind this engine does not know (a newer engine may):
    /// try again later.
    #[error("{0}")]
    Retry(String),
}

/// What happened to a run work item.
pub(crate) enum Outcome {
    /// Finished (completed, failed, cancelled, or already done): ack.
    Done,
    /// The run's history moved under us: read it again.
    Reload,
    /// Cannot start now (no concurrency slot): redeliver later.
    Later(Duration),
}

impl Engine {
    /// Run work items (`requested`, `retried`) from the shared durable consumer `pipeline-runs`.
    pub(crate) async fn run_worker(self: Arc<Self>) {
        let Some(consumer) = self.ctx.retry_until_stopped("the run consumer", || self.run_consumer()).await else {
            return;
        };
        loop {
            // Take only as much work as there are free run permits.
            let permit = tokio::select! {
                _ = self.ctx.stopping() => return self.idle().await,
                p = self.runs.acquire() => match p { Ok(p) => p, Err(_) => return },
            };
            drop(permit);
            let free = self.runs.available_permits().max(1);
            let batch = tokio::select! {
                _ = self.ctx.stopping() => return self.idle().await,
                b = consumer.fetch().max_messages(free).expires(Duration::from_secs(1)).messages() => b,
            };
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "run fetch failed; retrying");
                    if !self.ctx.pause(Duration::from_millis(500)).await {
                        return;
                    }
                    continue;
                }
            };
            while let Some(m) = batch.next().await {
                let Ok(m) = m else { continue };
                let Ok(permit) = self.runs.clone().acquire_owned().await else { return };
                let engine = self.clone();
                tokio::spawn(async move {
                    engine.work(m).await;
                    drop(permit);
                });
            }
        }
    }

    /// Waits until no run is in flight (a drained instance holds no work).
    async fn idle(&self) {
        let _ = self.runs.acquire_many(self.args.max_runs as u32).await;
    }

    async fn run_consumer(&self) -> anyhow::Result<jetstream::consumer::Consumer<pull::Config>> {
        let stream = self.js.get_stream(&self.events_stream).await?;
        let name = pl::run_consumer();
        let config = pull::Config {
            durable_name: Some(name.clone()),
            description: Some("pipeline run work items (every pipeline-engine instance)".into()),
            filter_subjects: vec![pl::run_action(action::REQUESTED)?, pl::run_action(action::RETRIED)?],
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.args.ack_wait,
            max_ack_pending: 10_000,
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        };
        Ok(stream.get_or_create_consumer(&name, config).await?)
    }

    /// Works on one run until it is done, keeping its work item alive meanwhile.
    async fn work(self: Arc<Self>, m: jetstream::Message) {
        let m = Arc::new(m);
        let keepalive = {
            let m = m.clone();
            let every = self.args.ack_wait / 3;
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let _ = m.ack_with(AckKind::Progress).await;
                }
            })
        };
        let outcome = self.work_on(&m).await;
        keepalive.abort();
        match outcome {
            Ok(Duration::ZERO) => {
                let _ = m.double_ack().await;
            }
            Ok(later) => {
                let _ = m.ack_with(AckKind::Nak(Some(later))).await;
            }
            Err(e) => {
                tracing::warn!(subject = %m.subject, error = %e, "run work failed; redelivering");
                let _ = m.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
            }
        }
    }

    /// Ok(ZERO) = done (ack), Ok(d) = try again after d, Err = redeliver soon.
    async fn work_on(&self, m: &jetstream::Message) -> Result<Duration, String> {
        let run_id = match subject::parse_event(&m.subject) {
            Ok(s) => s.id,
            Err(e) => {
                self.dead_letter(pl::DLQ_RUNS, m, &e.to_string(), 0).await?;
                return Ok(Duration::ZERO);
            }
        };
        for _ in 0..50 {
            let (run, request_env) = match self.load_run(&run_id).await {
                Ok(Some(r)) => r,
                Ok(None) => {
                    let reason = format!("run {run_id} has no requested event");
                    self.dead_letter(pl::DLQ_RUNS, m, &reason, 0).await?;
                    return Ok(Duration::ZERO);
                }
                Err(LoadError::Poison(reason)) => {
                    self.dead_letter(pl::DLQ_RUNS, m, &reason, 0).await?;
                    return Ok(Duration::ZERO);
                }
                Err(LoadError::Retry(e)) => return Err(e),
            };
            if run.info.is_terminal() {
                return Ok(Duration::ZERO);
            }
            let def = self.definition_of(&run).await;
            let Some(def) = def else {
                let error =
                    format!("pipeline {} version {} is not known", run.info.pipeline, run.info.pipeline_version);
                match self.fail(&run, &request_env, "-", &error, m).await {
                    Ok(()) => return Ok(Duration::ZERO),
                    Err(Publish::Conflict) => continue,
                    Err(Publish::Failed(e)) => return Err(e),
                }
            };
            // Held until the run is driven as far as it goes here.
            let _lease = match self.acquire_slot(&def, &run_id).await? {
                Lease::AllTaken => return Ok(Duration::from_millis(250)),
                lease @ (Lease::Unlimited | Lease::Held { .. }) => lease,
            };
            match self.drive(run, &request_env, &def, m).await? {
                Outcome::Done => return Ok(Duration::ZERO),
                Outcome::Reload => continue,
                Outcome::Later(d) => return Ok(d),
            }
        }
        Err(format!("run {run_id} keeps changing under this instance"))
    }

    /// A run's state, read from its events (the source of truth), with the envelope of its
    /// request (what every later event is caused by).
    pub(crate) async fn load_run(&self, run_id: &str) -> Result<Option<(Run, Envelope)>, LoadError> {
        let filter = pl::run_history(run_id).map_err(|e| LoadError::Retry(e.to_string()))?;
        let stream = self.js.get_stream(&self.events_stream).await.map_err(|e| LoadError::Retry(e.to_string()))?;
        let mut run = Run::default();
        let mut request_env = None;
        let mut seq = 1;
        loop {
            let msg = match stream.raw_message_builder().sequence(seq).next_by_subject(filter.clone()).send().await {
                Ok(m) => m,
                Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => break,
                Err(e) => return Err(LoadError::Retry(format!("reading run {run_id}: {e}"))),
            };
            seq = msg.sequence + 1;
            let env = Envelope::from_headers(&msg.headers)
                .map_err(|e| LoadError::Poison(format!("run {run_id} event {}: {e}", msg.sequence)))?;
            let act = msg.subject.rsplit('.').next().unwrap_or_default().to_string();
            let event = RunEvent::decode(&act, &msg.payload).map_err(|e| match e {
                RunEventError::Undecodable { .. } => LoadError::Poison(e.to_string()),
                RunEventError::Unknown(_) => LoadError::Retry(e.to_string()),
            })?;
            if matches!(event, RunEvent::Requested(_)) && request_env.is_none() {
                request_env = Some(env.clone());
            }
            run.apply(event, msg.sequence, env.time_ms(), &env.correlation_id().to_string());
        }
        Ok(request_env.map(|env| (run, env)))
    }

    /// Runs the run's remaining steps in order, recording each as events.
    #[allow(unused_assignments)] // the last event's sequence is not needed
    async fn drive(
        &self,
        mut run: Run,
        parent: &Envelope,
        def: &Definition,
        m: &jetstream::Message,
    ) -> Result<Outcome, String> {
        let run_id = run.info.run_id.clone();
        let mut seq = run.info.last_seq;
        macro_rules! record {
            ($act:expr, $payload:expr) => {
                match self.publish_run(&run_id, $act, &$payload, parent, seq).await {
                    Ok(s) => seq = s,
                    Err(Publish::Conflict) => return Ok(Outcome::Reload),
                    Err(Publish::Failed(e)) => return Err(e),
                }
            };
        }
        // Cancellation reaches a step in flight through the cancelled event itself.
        let mut cancelled = self
            .ctx
            .client()
            .subscribe(pl::run_event(&run_id, action::CANCELLED).map_err(|e| e.to_string())?)
            .await
            .map_err(|e| e.to_string())?;
        if run.started_by != self.ctx.settings().instance_id {
            record!(
                action::STARTED,
                RunStarted { run_id: run_id.clone(), instance_id: self.ctx.settings().instance_id.clone() }
            );
        }
        let mut unit: Option<Unit> = None;
        for step in def.all_steps() {
            if let Some(done) = run.outputs.get(&step.id) {
                if !done.passed {
                    record!(
                        action::COMPLETED,
                        RunCompleted {
                            run_id: run_id.clone(),
                            units: run.info.units.clone(),
                            outcome: format!("filtered: {}", step.id)
                        }
                    );
                    return Ok(Outcome::Done);
                }
                continue;
            }
            loop {
                let failures = run.failures.get(&step.id).copied().unwrap_or(0);
                let attempt = failures + 1;
                record!(
                    action::STEP_STARTED,
                    StepStarted {
                        run_id: run_id.clone(),
                        step: step.id.clone(),
                        attempt,
                        instance_id: self.ctx.settings().instance_id.clone()
                    }
                );
                let started = Instant::now();
                let timeout = Duration::from_millis(u64::from(step.timeout_ms()));
                // What the step needs being away (a restart, a leader election, a plugin nobody
                // serves yet) is waited for, up to UNAVAILABLE_PATIENCE, without spending a retry.
                // The wait is recorded (`step_waiting`, saying what is away) so that `cimctl run
                // show` and the UI tell a waiting run from a stuck one.
                let (waiting_tx, mut waiting_rx) = tokio::sync::watch::channel(String::new());
                let mut noted = WaitNotes::default();
                let (mut waited, mut pause) = (Duration::ZERO, UNAVAILABLE_POLL);
                let result = loop {
                    let attempt_run =
                        tokio::time::timeout(timeout, self.execute(step, &run, &mut unit, parent, &waiting_tx));
                    tokio::pin!(attempt_run);
                    let result = loop {
                        tokio::select! {
                            r = &mut attempt_run => break match r {
                                Ok(r) => r,
                                Err(_) => Err(StepError::transient(format!("step timed out after {}ms", step.timeout_ms()))),
                            },
                            _ = cancelled.next() => return Ok(Outcome::Reload),
                            Ok(()) = waiting_rx.changed() => {
                                let why = waiting_rx.borrow_and_update().clone();
                                match self.note_waiting(&run_id, &step.id, attempt, &why, &mut noted, parent, seq).await {
                                    Noted::Written(s) => seq = s,
                                    Noted::Skipped => {}
                                    Noted::RunChanged => return Ok(Outcome::Reload),
                                }
                            }
                        }
                    };
                    match result {
                        Err(e) if e.unavailable && waited + pause <= UNAVAILABLE_PATIENCE => {
                            tracing::info!(run = %run_id, step = %step.id, error = %e.message, "what the step needs is unavailable; waiting without spending a retry");
                            match self
                                .note_waiting(&run_id, &step.id, attempt, &e.message, &mut noted, parent, seq)
                                .await
                            {
                                Noted::Written(s) => seq = s,
                                Noted::Skipped => {}
                                Noted::RunChanged => return Ok(Outcome::Reload),
                            }
                            tokio::select! {
                                _ = tokio::time::sleep(pause) => {}
                                _ = cancelled.next() => return Ok(Outcome::Reload),
                                _ = self.ctx.stopping() => return Ok(Outcome::Later(Duration::from_millis(100))),
                            }
                            waited += pause;
                            pause = (pause * 2).min(UNAVAILABLE_POLL_MAX);
                        }
                        other => break other,
                    }
                };
                match result {
                    Ok(out) => {
                        if let Some(s) = out.seq {
                            seq = seq.max(s);
                        }
                        if out.output.len() > MAX_STEP_OUTPUT {
                            let e = format!(
                                "output of {} bytes is more than the {MAX_STEP_OUTPUT} a step may pass on",
                                out.output.len()
                            );
                            record!(
                                action::STEP_FAILED,
                                StepFailed {
                                    run_id: run_id.clone(),
                                    step: step.id.clone(),
                                    attempt,
                                    error: e.clone(),
                                    will_retry: false,
                                    retry_in_ms: 0
                                }
                            );
                            return match self.fail_at(&run_id, seq, parent, &step.id, &e, m).await {
                                Ok(()) => Ok(Outcome::Done),
                                Err(Publish::Conflict) => Ok(Outcome::Reload),
                                Err(Publish::Failed(e)) => Err(e),
                            };
                        }
                        let completed = StepCompleted {
                            run_id: run_id.clone(),
                            step: step.id.clone(),
                            attempt,
                            output: out.output,
                            metadata: out.metadata.into_iter().collect(),
                            units: out.units,
                            passed: out.passed,
                            duration_us: started.elapsed().as_micros() as u64,
                        };
                        record!(action::STEP_COMPLETED, completed);
                        run.apply(RunEvent::StepCompleted(completed), seq, 0, "");
                        if !run.outputs[&step.id].passed {
                            record!(
                                action::COMPLETED,
                                RunCompleted {
                                    run_id: run_id.clone(),
                                    units: run.info.units.clone(),
                                    outcome: format!("filtered: {}", step.id)
                                }
                            );
                            return Ok(Outcome::Done);
                        }
                        break;
                    }
                    Err(e) => {
                        let will_retry = !e.permanent && failures < step.retries();
                        let pause = step.backoff(attempt);
                        let failed = StepFailed {
                            run_id: run_id.clone(),
                            step: step.id.clone(),
                            attempt,
                            error: one_line(&e.message),
                            will_retry,
                            retry_in_ms: if will_retry { pause.as_millis() as u32 } else { 0 },
                        };
                        record!(action::STEP_FAILED, failed.clone());
                        run.apply(RunEvent::StepFailed(failed), seq, 0, "");
                        if !will_retry {
                            let why = if e.permanent {
                                e.message.clone()
                            } else {
                                format!("{} (after {attempt} attempts)", e.message)
                            };
                            return match self.fail_at(&run_id, seq, parent, &step.id, &why, m).await {
                                Ok(()) => Ok(Outcome::Done),
                                Err(Publish::Conflict) => Ok(Outcome::Reload),
                                Err(Publish::Failed(e)) => Err(e),
                            };
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(pause) => {}
                            _ = cancelled.next() => return Ok(Outcome::Reload),
                            _ = self.ctx.stopping() => return Ok(Outcome::Later(Duration::from_millis(100))),
                        }
                    }
                }
            }
        }
        record!(
            action::COMPLETED,
            RunCompleted { run_id: run_id.clone(), units: run.info.units.clone(), outcome: "completed".into() }
        );
        Ok(Outcome::Done)
    }

    /// Records that an attempt waits for `why` (once per distinct reason, at most
    /// MAX_WAIT_NOTES per attempt). A note that cannot be written (JetStream is what is away)
    /// is not an error: the wait goes on and the note is tried again with the next reason.
    #[allow(clippy::too_many_arguments)]
    async fn note_waiting(
        &self,
        run_id: &str,
        step: &str,
        attempt: u32,
        why: &str,
        noted: &mut WaitNotes,
        parent: &Envelope,
        seq: u64,
    ) -> Noted {
        if why.is_empty() || noted.last == why || noted.count >= MAX_WAIT_NOTES {
            return Noted::Skipped;
        }
        let note = StepWaiting {
            run_id: run_id.to_string(),
            step: step.to_string(),
            attempt,
            waiting_for: one_line(why),
            instance_id: self.ctx.settings().instance_id.clone(),
        };
        match self.publish_run(run_id, action::STEP_WAITING, &note, parent, seq).await {
            Ok(s) => {
                noted.last = why.to_string();
                noted.count += 1;
                Noted::Written(s)
            }
            Err(Publish::Conflict) => Noted::RunChanged,
            Err(Publish::Failed(e)) => {
                tracing::debug!(run = %run_id, step, error = %e, "could not record that the step waits");
                Noted::Skipped
            }
        }
    }

    async fn fail(
        &self,
        run: &Run,
        parent: &Envelope,
        step: &str,
        error: &str,
        m: &jetstream::Message,
    ) -> Result<(), Publish> {
        self.fail_at(&run.info.run_id, run.info.last_seq, parent, step, error, m).await
    }

    /// The run failed: dead-letter its work item with the reason, then record the failure (in
    /// this order, so a crash between the two repeats the dead letter, de-duplicated, rather
    /// than lose it).
    async fn fail_at(
        &self,
        run_id: &str,
        seq: u64,
        parent: &Envelope,
        step: &str,
        error: &str,
        m: &jetstream::Message,
    ) -> Result<(), Publish> {
        let reason = format!("run {run_id} failed at step {step}: {error}");
        self.dead_letter(pl::DLQ_RUNS, m, &reason, seq).await.map_err(Publish::Failed)?;
        self.publish_run(
            run_id,
            action::FAILED,
            &RunFailed { run_id: run_id.into(), step: step.into(), error: one_line(error) },
            parent,
            seq,
        )
        .await?;
        Ok(())
    }
}
