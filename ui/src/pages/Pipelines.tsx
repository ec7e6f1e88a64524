// Pipelines (definitions, versions, run counts, manual start), runs (filtered list, each run's
// steps as a timeline, cancel and retry) and the engine's dead letters, kept live by the
// pipeline engine's events.

import { Fragment } from "preact";
import { useEffect, useState } from "preact/hooks";
import { canWrite, client, type DeadLetter, type RunInfo, type PipelineInfo, type WhoAmI } from "../api";
import { ErrorBanner, LiveDot, Notice, PageTitle, StateBadge, TimelineDot, When, button, buttonQuiet, input, link, td, th } from "../components/ui";
import { duration, shortId } from "../format";
import { useDebounced, useLiveEvents } from "../live";
import { runHref, unitHref } from "../route";

const RUN_STATES = ["queued", "running", "completed", "failed", "cancelled"];
const ENDED = ["completed", "failed", "cancelled"];

export function Pipelines({ me }: { me: WhoAmI }) {
  const [pipelines, setPipelines] = useState<PipelineInfo[] | null>(null);
  const [runs, setRuns] = useState<RunInfo[]>([]);
  const [pipeline, setPipeline] = useState("");
  const [state, setState] = useState("");
  const [error, setError] = useState("");
  const [open, setOpen] = useState("");
  const [deadLetters, setDeadLetters] = useState<DeadLetter[] | null>(null);
  const [deadError, setDeadError] = useState("");

  const load = async () => {
    const q = new URLSearchParams({ limit: "100" });
    if (pipeline) q.set("pipeline", pipeline);
    if (state) q.set("state", state);
    try {
      const [p, r] = await Promise.all([client.pipelines(), client.runs(q)]);
      setPipelines(p.pipelines);
      setRuns(r.runs);
      setError("");
    } catch (e) {
      setError((e as Error).message);
    }
    client
      .deadLetters("pipeline")
      .then((d) => {
        setDeadLetters(d.dead_letters);
        setDeadError("");
      })
      .catch((e: Error) => setDeadError(e.message));
  };
  useEffect(() => {
    void load();
  }, [pipeline, state]);
  const refresh = useDebounced(() => void load(), 300);
  const live = useLiveEvents("pipeline", "", refresh);

  return (
    <>
      <PageTitle extra={<LiveDot state={live} />}>Pipelines</PageTitle>
      <ErrorBanner error={error} />
      <div class="overflow-x-auto rounded bg-white shadow-sm">
        <table class="w-full text-sm" data-testid="pipelines-table">
          <thead>
            <tr>
              {["Pipeline", "Version", "Trigger", "Steps", "Queued", "Running", "Completed", "Failed", "Cancelled", ""].map(
                (h, i) => (
                  <th key={i} scope="col" class={th}>
                    {h || <span class="sr-only">Actions</span>}
                  </th>
                ),
              )}
            </tr>
          </thead>
          <tbody>
            {pipelines?.length === 0 && (
              <tr>
                <td colSpan={10} class={td}>
                  No pipelines yet. An admin applies one with <code>cimctl pipeline apply</code> or{" "}
                  <code>POST /api/v1/pipelines</code>.
                </td>
              </tr>
            )}
            {pipelines?.map((p) => (
              <tr key={p.name} data-testid="pipeline-row" data-name={p.name}>
                <td class={td}>
                  <button type="button" class={`${link} text-left`} onClick={() => setOpen(open === p.name ? "" : p.name)}>
                    {p.name}
                  </button>
                  {!p.active && <span class="ml-2 text-xs text-slate-700">(removed)</span>}
                  {typeof p.definition.description === "string" && (
                    <p class="text-xs text-slate-700">{p.definition.description}</p>
                  )}
                  {open === p.name && (
                    <pre class="mt-2 max-w-xl overflow-x-auto rounded bg-slate-100 p-2 text-xs">
                      {JSON.stringify(p.definition, null, 2)}
                    </pre>
                  )}
                </td>
                <td class={td}>
                  v{p.version}
                  <span class="block font-mono text-xs text-slate-700" title={p.digest}>
                    {shortId(p.digest, 12)}
                  </span>
                </td>
                <td class={td}>{String(p.definition.trigger?.on ?? "manual")}</td>
                <td class={td}>{p.definition.steps?.length ?? 0}</td>
                <td class={td}>{p.runs.queued}</td>
                <td class={td}>{p.runs.running}</td>
                <td class={td} data-testid="count-completed">
                  {p.runs.completed}
                </td>
                <td class={td}>{p.runs.failed}</td>
                <td class={td}>{p.runs.cancelled}</td>
                <td class={td}>{canWrite(me.role) && p.active && <StartRun name={p.name} />}</td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>

      <h2 class="mb-2 mt-8 text-lg font-semibold">Runs</h2>
      <div class="mb-3 flex flex-wrap items-end gap-3 text-sm">
        <label class="flex flex-col">
          <span class="mb-1 font-medium">Pipeline</span>
          <select class={input} value={pipeline} onChange={(e) => setPipeline((e.target as HTMLSelectElement).value)}>
            <option value="">any</option>
            {pipelines?.map((p) => (
              <option key={p.name}>{p.name}</option>
            ))}
          </select>
        </label>
        <label class="flex flex-col">
          <span class="mb-1 font-medium">State</span>
          <select class={input} value={state} onChange={(e) => setState((e.target as HTMLSelectElement).value)}>
            <option value="">any</option>
            {RUN_STATES.map((s) => (
              <option key={s}>{s}</option>
            ))}
          </select>
        </label>
      </div>
      <div class="overflow-x-auto rounded bg-white shadow-sm">
        <table class="w-full text-sm" data-testid="runs-table">
          <thead>
            <tr>
              {["Run", "Pipeline", "State", "Trigger", "Unit", "Steps", "Updated"].map((h) => (
                <th key={h} scope="col" class={th}>
                  {h}
                </th>
              ))}
            </tr>
          </thead>
          <tbody>
            {runs.length === 0 && (
              <tr>
                <td colSpan={7} class={td}>
                  No runs match.
                </td>
              </tr>
            )}
            {runs.map((r) => (
              <tr key={r.run_id} data-testid="run-row" data-id={r.run_id} data-unit={r.unit_id ?? ""}>
                <td class={td}>
                  <a class={`${link} font-mono`} href={runHref(r.run_id)} data-testid="run-link">
                    {shortId(r.run_id, 13)}
                  </a>
                </td>
                <td class={td}>
                  {r.pipeline} v{r.pipeline_version}
                </td>
                <td class={td}>
                  <StateBadge state={r.state} testid="run-state" />
                  {r.error && <p class="mt-1 max-w-xs text-xs text-red-800">{r.error}</p>}
                </td>
                <td class={td}>{r.trigger}</td>
                <td class={td}>
                  {r.unit_id && (
                    <a class={`${link} font-mono`} href={unitHref(r.unit_id)}>
                      {shortId(r.unit_id)}
                    </a>
                  )}
                </td>
                <td class={td}>
                  {r.steps.filter((s) => s.state === "completed" || s.state === "skipped").length}/{r.steps.length}
                </td>
                <td class={`${td} whitespace-nowrap`}>
                  <When ms={r.updated_ms} />
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>

      <h2 class="mb-2 mt-8 text-lg font-semibold">Dead letters</h2>
      <p class="mb-2 text-sm text-slate-700">
        Work the engine gave up on (a run that failed for good, a trigger it could not read), newest first.
      </p>
      {deadError ? (
        <Notice>Dead letters cannot be shown: {deadError}</Notice>
      ) : deadLetters?.length === 0 ? (
        <p class="text-sm text-slate-700">None.</p>
      ) : (
        <div class="overflow-x-auto rounded bg-white shadow-sm">
          <table class="w-full text-sm" data-testid="dead-letters">
            <thead>
              <tr>
                {["#", "Reason", "From", "When"].map((h) => (
                  <th key={h} scope="col" class={th}>
                    {h}
                  </th>
                ))}
              </tr>
            </thead>
            <tbody>
              {deadLetters?.map((d) => (
                <tr key={d.seq} data-testid="dead-letter">
                  <td class={td}>{d.seq}</td>
                  <td class={`${td} text-red-800`}>{d.reason || "(no reason recorded)"}</td>
                  <td class={`${td} break-all font-mono text-xs`}>{d.original_subject || d.subject}</td>
                  <td class={`${td} whitespace-nowrap`}>
                    <When ms={d.time_ms} />
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
    </>
  );
}

function StartRun({ name }: { name: string }) {
  const [asking, setAsking] = useState(false);
  const [unit, setUnit] = useState("");
  const [error, setError] = useState("");
  if (!asking)
    return (
      <button type="button" class={buttonQuiet} data-testid="start-run" onClick={() => setAsking(true)}>
        Start…
      </button>
    );
  return (
    <form
      class="flex flex-col gap-1"
      onSubmit={(e) => {
        e.preventDefault();
        client
          .startRun(name, unit.trim())
          .then((r) => (location.hash = runHref(r.run_id)))
          .catch((err: Error) => setError(err.message));
      }}
    >
      <label class="text-xs">
        Unit id (optional)
        <input class={`${input} block w-40`} value={unit} onInput={(e) => setUnit((e.target as HTMLInputElement).value)} />
      </label>
      <div class="flex gap-1">
        <button type="submit" class={button}>
          Start
        </button>
        <button type="button" class={buttonQuiet} onClick={() => setAsking(false)}>
          Cancel
        </button>
      </div>
      <ErrorBanner error={error} />
    </form>
  );
}

export function RunPage({ id, me }: { id: string; me: WhoAmI }) {
  const [run, setRun] = useState<RunInfo | null>(null);
  const [error, setError] = useState("");
  const [actionError, setActionError] = useState("");
  const load = () =>
    client
      .run(id)
      .then((r) => {
        setRun(r);
        setError("");
      })
      .catch((e: Error) => setError(e.message));
  useEffect(() => {
    void load();
  }, [id]);
  const refresh = useDebounced(() => void load(), 150);
  const live = useLiveEvents("pipeline", "", (e) => {
    if (e.subject.split(".").includes(id)) refresh();
  });

  const change = (what: "cancel" | "retry") =>
    client
      .changeRun(id, what, `from the web UI by ${me.name}`)
      .then((r) => {
        setRun(r);
        setActionError("");
      })
      .catch((e: Error) => setActionError(e.message));

  if (error) return <ErrorBanner error={error} />;
  if (!run) return <p class="text-slate-700">Loading…</p>;
  const ended = ENDED.includes(run.state);
  return (
    <>
      <PageTitle extra={<LiveDot state={live} />}>
        Run <span class="font-mono text-base">{run.run_id}</span>
      </PageTitle>
      <p class="mb-4 flex flex-wrap items-center gap-2">
        <StateBadge state={run.state} testid="run-detail-state" />
        <span>
          {run.pipeline} v{run.pipeline_version}, {run.trigger}
          {run.unit_id && (
            <>
              {" "}
              on{" "}
              <a class={link} href={unitHref(run.unit_id)} data-testid="run-unit">
                {shortId(run.unit_id)}
              </a>
            </>
          )}
          , requested <When ms={run.requested_ms} />, updated <When ms={run.updated_ms} />
        </span>
      </p>
      {run.error && <ErrorBanner error={`Failed: ${run.error}`} testid="run-error" />}
      {run.outcome && <Notice>Outcome: {run.outcome}</Notice>}
      {canWrite(me.role) ? (
        <div class="mb-4 flex gap-2">
          {!ended && (
            <button type="button" class={buttonQuiet} data-testid="run-cancel" onClick={() => void change("cancel")}>
              Cancel run
            </button>
          )}
          {(run.state === "failed" || run.state === "cancelled") && (
            <button type="button" class={buttonQuiet} data-testid="run-retry" onClick={() => void change("retry")}>
              Retry run
            </button>
          )}
        </div>
      ) : (
        <p class="mb-4 text-sm text-slate-700">Cancelling and retrying runs needs a writer token.</p>
      )}
      <ErrorBanner error={actionError} />
      <h2 class="mb-2 font-semibold">Steps</h2>
      <ol data-testid="run-steps" class="relative flex flex-col gap-4 border-l-2 border-slate-300 pl-6">
        {run.steps.map((s) => (
          <li key={s.step} data-testid="step" data-state={s.state} class="relative rounded bg-white p-3 shadow-sm">
            <TimelineDot state={s.state} offset="-left-[31px] top-4" />
            <p class="flex flex-wrap items-center gap-2">
              <b>{s.step}</b> <StateBadge state={s.state} testid="step-state" />
              <span class="text-sm text-slate-700">
                {s.attempts} attempt{s.attempts === 1 ? "" : "s"}
                {s.duration_us > 0 && `, ${duration(s.duration_us)}`}
              </span>
            </p>
            {s.error && <p class="mt-1 text-sm text-red-800">{s.error}</p>}
            {s.waiting_for && (
              <p data-testid="step-waiting" class="mt-1 text-sm text-slate-700">
                Waiting for {s.waiting_for}; no retry is spent while it waits.
              </p>
            )}
            {s.metadata && Object.keys(s.metadata).length > 0 && (
              <dl class="mt-1 grid grid-cols-[max-content_1fr] gap-x-3 text-xs">
                {Object.entries(s.metadata).map(([k, v]) => (
                  <Fragment key={k}>
                    <dt class="font-medium">{k}</dt>
                    <dd class="break-all">{v}</dd>
                  </Fragment>
                ))}
              </dl>
            )}
            {s.units?.map((u) => (
              <a key={u} class={`${link} mr-2 text-xs`} href={unitHref(u)}>
                unit {shortId(u)}
              </a>
            ))}
          </li>
        ))}
      </ol>
      <p class="mt-4 text-xs text-slate-700">
        correlation <code>{run.correlation_id}</code>
        {run.trigger_subject && (
          <>
            {" "}
            · triggered by <code>{run.trigger_subject}</code>
          </>
        )}
      </p>
    </>
  );
}
