// One unit: formatted metadata, tags (writers add them with the version they saw), a versions
// timeline with download and a metadata diff, the link graph, provenance as a readable chain,
// and the runs that touched it. Kept live by the unit's own events.

import { useEffect, useState } from "preact/hooks";
import {
  ApiError,
  canWrite,
  client,
  type HistoryEntry,
  type Provenance,
  type RunInfo,
  type Unit,
  type WhoAmI,
} from "../api";
import { LinkGraph } from "../components/LinkGraph";
import { ErrorBanner, Notice, PageTitle, StateBadge, TimelineDot, When, button, buttonQuiet, input, link } from "../components/ui";
import { absoluteTime, eventAction, humanSize, shortId } from "../format";
import { useDebounced, useLiveEvents } from "../live";
import { runHref } from "../route";

export function UnitPage({ id, me }: { id: string; me: WhoAmI }) {
  const [unit, setUnit] = useState<Unit | null>(null);
  const [history, setHistory] = useState<HistoryEntry[]>([]);
  const [runs, setRuns] = useState<RunInfo[] | null>(null);
  const [runsError, setRunsError] = useState("");
  const [error, setError] = useState("");

  const load = async (minSequence = 0) => {
    try {
      const [u, h] = await Promise.all([
        client.unit(id, 0, minSequence),
        client.history(id),
      ]);
      setUnit(u);
      setHistory(h.entries);
      setError("");
    } catch (e) {
      setError((e as ApiError).status === 404 ? `There is no unit ${id}.` : (e as Error).message);
    }
    client
      .runs(new URLSearchParams({ unit_id: id, limit: "50" }))
      .then((r) => {
        setRuns(r.runs);
        setRunsError("");
      })
      .catch((e: Error) => setRunsError(e.message));
  };

  useEffect(() => {
    void load();
  }, [id]);

  const refresh = useDebounced(() => void load(), 200);
  // Links are written by the unit at their source: any unit's link event may change the graph.
  const [graphEpoch, setGraphEpoch] = useState(0);
  const redrawGraph = useDebounced(() => setGraphEpoch((n) => n + 1), 500);
  const live = useLiveEvents("iu", "", (e) => {
    if (e.subject.split(".").includes(id)) refresh();
    if (/(^|\.)(linked|unlinked|deleted)$/.test(e.subject)) redrawGraph();
  });

  if (error) return <ErrorBanner error={error} />;
  if (!unit) return <p class="text-slate-700">Loading…</p>;

  return (
    <>
      <PageTitle
        extra={
          <a class={button} href={client.contentUrl(id)} data-testid="download" download={unit.name}>
            Download
          </a>
        }
      >
        <span data-testid="unit-name">{unit.name}</span>
        {unit.deleted && <span class="ml-2 rounded bg-red-100 px-2 text-sm text-red-900">deleted</span>}
      </PageTitle>
      <div class="grid gap-6 lg:grid-cols-2">
        <section aria-labelledby="meta-h" class="rounded bg-white p-4 shadow-sm">
          <h2 id="meta-h" class="mb-3 font-semibold">
            About
          </h2>
          <dl data-testid="unit-meta" class="grid grid-cols-[max-content_1fr] gap-x-4 gap-y-1 text-sm">
            <Row label="Unit id" value={unit.unit_id} mono testid="meta-unit-id" />
            <Row label="Media type" value={unit.media_type} />
            <Row label="Unit type" value={unit.unit_type || "—"} />
            <Row label="Size" value={`${humanSize(unit.size)} (${unit.size.toLocaleString()} bytes)`} testid="meta-size" />
            <Row label="Version" value={`v${unit.version}`} testid="meta-version" />
            <Row label="Content id" value={unit.cid} mono />
            <dt class="font-medium text-slate-700">Created</dt>
            <dd>
              <When ms={unit.created_ms} /> {unit.created_by && <By p={unit.created_by} />}
            </dd>
            <dt class="font-medium text-slate-700">Updated</dt>
            <dd>
              <When ms={unit.updated_ms} /> {unit.updated_by && <By p={unit.updated_by} />}
            </dd>
          </dl>
          <h3 class="mb-1 mt-4 font-semibold">Attributes</h3>
          {Object.keys(unit.attributes).length === 0 ? (
            <p class="text-sm text-slate-700">None.</p>
          ) : (
            <dl data-testid="attributes" class="grid grid-cols-[max-content_1fr] gap-x-4 gap-y-1 text-sm">
              {Object.entries(unit.attributes).map(([k, v]) => (
                <Row key={k} label={k} value={v} />
              ))}
            </dl>
          )}
          <Tags unit={unit} me={me} onChanged={(seq) => void load(seq)} />
        </section>
        <Versions unit={unit} />
      </div>
      <section aria-labelledby="graph-h" class="mt-6 rounded bg-white p-4 shadow-sm">
        <h2 id="graph-h" class="mb-3 font-semibold">
          Links
        </h2>
        <LinkGraph id={unit.unit_id} name={unit.name} epoch={`${unit.version}.${graphEpoch}`} />
      </section>
      <div class="mt-6 grid gap-6 lg:grid-cols-2">
        <section aria-labelledby="prov-h" class="rounded bg-white p-4 shadow-sm">
          <h2 id="prov-h" class="mb-3 flex items-center gap-2 font-semibold">
            Provenance <span class="text-xs font-normal text-slate-700">({live})</span>
          </h2>
          <ol data-testid="provenance" class="flex flex-col gap-3 border-l-2 border-slate-300 pl-4 text-sm">
            {history.map((h) => (
              <li key={h.sequence} data-testid="provenance-entry" data-action={eventAction(h.event_type)} class="relative">
                <TimelineDot offset="-left-[23px] top-1.5" />
                <p>
                  <b>v{h.version}</b> <span class="font-medium">{eventAction(h.event_type)}</span>
                  {h.summary && <span class="text-slate-700"> — {h.summary}</span>}
                </p>
                {h.provenance && <ProvenanceLine p={h.provenance} runs={runs ?? []} />}
              </li>
            ))}
          </ol>
        </section>
        <section aria-labelledby="runs-h" class="rounded bg-white p-4 shadow-sm">
          <h2 id="runs-h" class="mb-3 font-semibold">
            Runs that touched it
          </h2>
          {runsError ? (
            <Notice>Runs cannot be shown: {runsError}</Notice>
          ) : runs === null ? (
            <p class="text-sm text-slate-700">Loading…</p>
          ) : runs.length === 0 ? (
            <p class="text-sm text-slate-700">No pipeline ran on this unit.</p>
          ) : (
            <ul data-testid="unit-runs" class="flex flex-col gap-2 text-sm">
              {runs.map((r) => (
                <li key={r.run_id} class="flex flex-wrap items-center gap-2">
                  <StateBadge state={r.state} />
                  <a class={link} href={runHref(r.run_id)}>
                    {r.pipeline} v{r.pipeline_version}
                  </a>
                  <span class="text-slate-700">
                    {r.trigger}, <When ms={r.updated_ms} />
                  </span>
                </li>
              ))}
            </ul>
          )}
        </section>
      </div>
    </>
  );
}

function Row({ label, value, mono, testid }: { label: string; value: string; mono?: boolean; testid?: string }) {
  return (
    <>
      <dt class="font-medium text-slate-700">{label}</dt>
      <dd data-testid={testid} class={`break-all ${mono ? "font-mono text-xs" : ""}`}>
        {value}
      </dd>
    </>
  );
}

function By({ p }: { p: Provenance }) {
  return <span class="text-slate-700">by {p.source || "unknown"}</span>;
}

function ProvenanceLine({ p, runs }: { p: Provenance; runs: RunInfo[] }) {
  const run = runs.find((r) => r.correlation_id === p.correlation_id);
  return (
    <p class="text-slate-700">
      from <b>{p.source || "an unknown source"}</b>,{" "}
      <time title={absoluteTime(p.time_ms)}>
        <When ms={p.time_ms} />
      </time>
      {run && (
        <>
          , during run{" "}
          <a class={link} href={runHref(run.run_id)}>
            {shortId(run.run_id)}
          </a>{" "}
          of {run.pipeline}
        </>
      )}
      <br />
      <span class="text-xs">
        correlation <code>{p.correlation_id || "—"}</code>
        {p.causation_id && (
          <>
            {" "}
            · caused by <code>{p.causation_id}</code>
          </>
        )}
      </span>
    </p>
  );
}

function Tags({ unit, me, onChanged }: { unit: Unit; me: WhoAmI; onChanged: (sequence: number) => void }) {
  const [tag, setTag] = useState("");
  const [error, setError] = useState("");
  const [conflict, setConflict] = useState(false);
  const [busy, setBusy] = useState(false);
  // The version the person saw when they started editing: a change by someone else meanwhile
  // is a conflict, not silently merged.
  const [seen, setSeen] = useState(unit.version);
  useEffect(() => {
    if (!tag) setSeen(unit.version);
  }, [unit.version]);

  const submit = async (e: Event) => {
    e.preventDefault();
    const tags = tag
      .split(",")
      .map((t) => t.trim())
      .filter(Boolean);
    if (tags.length === 0) {
      setError("Type a tag first (several: separate them with commas).");
      return;
    }
    setBusy(true);
    try {
      const r = await client.tag(unit.unit_id, tags, seen);
      setTag("");
      setError("");
      setConflict(false);
      setSeen(r.version);
      onChanged(r.sequence);
    } catch (err) {
      const e = err as ApiError;
      if (e.status === 409) {
        setConflict(true);
        setError(
          `Someone changed this unit since you opened it (you saw v${seen}; it is now v${unit.version > seen ? unit.version : "newer"}). ` +
            `Your tags were not added. Look at the change above, then choose “Continue with the new version” and add them again. (${e.message})`,
        );
      } else setError(e.message);
    } finally {
      setBusy(false);
    }
  };

  return (
    <div class="mt-4">
      <h3 class="mb-1 font-semibold">Tags</h3>
      <p data-testid="tags" class="mb-2 flex flex-wrap gap-1">
        {unit.tags.length === 0 && <span class="text-sm text-slate-700">None.</span>}
        {unit.tags.map((t) => (
          <span key={t} data-testid="tag" class="rounded bg-slate-200 px-2 py-0.5 text-sm text-slate-800">
            {t}
          </span>
        ))}
      </p>
      {canWrite(me.role) ? (
        <form onSubmit={submit} class="flex flex-wrap items-end gap-2">
          <label class="flex flex-col text-sm">
            <span class="mb-1 font-medium">Add tags (editing v{seen})</span>
            <input
              data-testid="tag-input"
              class={input}
              value={tag}
              placeholder="reviewed, 2026"
              onInput={(e) => setTag((e.target as HTMLInputElement).value)}
            />
          </label>
          <button type="submit" data-testid="tag-add" class={button} disabled={busy}>
            Add
          </button>
          {conflict && (
            <button
              type="button"
              data-testid="tag-reload"
              class={buttonQuiet}
              onClick={() => {
                setSeen(unit.version);
                setConflict(false);
                setError("");
              }}
            >
              Continue with the new version (v{unit.version})
            </button>
          )}
        </form>
      ) : (
        <p class="text-sm text-slate-700">Adding tags needs a writer token.</p>
      )}
      <ErrorBanner error={error} testid="tag-error" />
    </div>
  );
}

function Versions({ unit }: { unit: Unit }) {
  const versions = [...unit.versions].sort((a, b) => b.version - a.version);
  // Until picked, the two newest versions (new versions arrive live).
  const [pickedFrom, setFrom] = useState<number | null>(null);
  const [pickedTo, setTo] = useState<number | null>(null);
  const from = pickedFrom ?? versions[1]?.version ?? 0;
  const to = pickedTo ?? versions[0]?.version ?? 0;
  const [diff, setDiff] = useState<[string, string, string][] | null>(null);
  const [error, setError] = useState("");

  const compare = async () => {
    try {
      const [a, b] = await Promise.all([client.unit(unit.unit_id, from), client.unit(unit.unit_id, to)]);
      const show = (v: unknown) => (typeof v === "object" ? JSON.stringify(v) : String(v));
      const fields: [string, unknown, unknown][] = [
        ["name", a.name, b.name],
        ["media type", a.media_type, b.media_type],
        ["unit type", a.unit_type, b.unit_type],
        ["size", humanSize(a.size), humanSize(b.size)],
        ["content id", a.cid, b.cid],
        ["tags", a.tags.join(", "), b.tags.join(", ")],
        ["attributes", a.attributes, b.attributes],
      ];
      setDiff(fields.filter(([, x, y]) => show(x) !== show(y)).map(([k, x, y]) => [k, show(x), show(y)]));
      setError("");
    } catch (e) {
      setError((e as Error).message);
    }
  };

  return (
    <section aria-labelledby="versions-h" class="rounded bg-white p-4 shadow-sm">
      <h2 id="versions-h" class="mb-3 font-semibold">
        Versions
      </h2>
      <ol data-testid="versions" class="flex flex-col gap-3 border-l-2 border-blue-300 pl-4 text-sm">
        {versions.map((v) => (
          <li key={v.version} data-testid="version" class="relative">
            <TimelineDot state="running" offset="-left-[23px] top-1.5" />
            <p>
              <b>v{v.version}</b> · {humanSize(v.size)} · <When ms={v.time_ms} /> ·{" "}
              <a class={link} href={client.contentUrl(unit.unit_id, v.version)} download>
                download v{v.version}
              </a>
            </p>
            <p class="font-mono text-xs break-all text-slate-700">{v.cid}</p>
          </li>
        ))}
      </ol>
      {versions.length > 1 && (
        <div class="mt-4 flex flex-wrap items-end gap-2 text-sm">
          <label class="flex flex-col">
            <span class="mb-1 font-medium">Compare</span>
            <select class={input} value={from} onChange={(e) => setFrom(Number((e.target as HTMLSelectElement).value))}>
              {versions.map((v) => (
                <option key={v.version} value={v.version}>
                  v{v.version}
                </option>
              ))}
            </select>
          </label>
          <label class="flex flex-col">
            <span class="mb-1 font-medium">with</span>
            <select class={input} value={to} onChange={(e) => setTo(Number((e.target as HTMLSelectElement).value))}>
              {versions.map((v) => (
                <option key={v.version} value={v.version}>
                  v{v.version}
                </option>
              ))}
            </select>
          </label>
          <button type="button" class={buttonQuiet} data-testid="compare" onClick={() => void compare()}>
            Show differences
          </button>
        </div>
      )}
      <ErrorBanner error={error} />
      {diff && (
        <table data-testid="diff" class="mt-3 w-full text-sm">
          <caption class="text-left font-medium">
            v{from} → v{to}: {diff.length === 0 ? "no differences in metadata" : `${diff.length} fields differ`}
          </caption>
          <tbody>
            {diff.map(([k, a, b]) => (
              <tr key={k}>
                <th scope="row" class="py-1 pr-2 text-left font-medium">
                  {k}
                </th>
                <td class="break-all bg-red-50 px-2 py-1 line-through">{a || "—"}</td>
                <td class="break-all bg-green-50 px-2 py-1">{b || "—"}</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
    </section>
  );
}
