// Live events of one component (picked from the components that are running) with an
// optional subject filter.

import { useEffect, useState } from "preact/hooks";
import { client, type LiveEvent } from "../api";
import { ErrorBanner, LiveDot, PageTitle, button, input, td, th } from "../components/ui";
import { useLiveEvents } from "../live";

/** The newest events kept on the page. */
const KEEP = 200;

export function Events() {
  const [components, setComponents] = useState<string[]>([]);
  const [component, setComponent] = useState("iu");
  const [filterDraft, setFilterDraft] = useState("");
  const [filter, setFilter] = useState("");
  const [events, setEvents] = useState<LiveEvent[]>([]);
  const [error, setError] = useState("");

  useEffect(() => {
    client
      .components()
      .then((c) => {
        const names = [...new Set(c.instances.map((i) => i.component))].sort();
        setComponents(names);
        if (names.length && !names.includes(component)) setComponent(names[0]);
      })
      .catch((e: Error) => setError(e.message));
  }, []);

  const live = useLiveEvents(component, filter, (e) => setEvents((list) => [e, ...list].slice(0, KEEP)));

  return (
    <>
      <PageTitle extra={<LiveDot state={live} />}>Live events</PageTitle>
      <form
        class="mb-4 flex flex-wrap items-end gap-3 text-sm"
        onSubmit={(e) => {
          e.preventDefault();
          setEvents([]);
          setFilter(filterDraft.trim());
        }}
      >
        <label class="flex flex-col">
          <span class="mb-1 font-medium">Component</span>
          <select
            data-testid="event-component"
            class={input}
            value={component}
            onChange={(e) => {
              setEvents([]);
              setFilter("");
              setFilterDraft("");
              setComponent((e.target as HTMLSelectElement).value);
            }}
          >
            {(components.length ? components : [component]).map((c) => (
              <option key={c}>{c}</option>
            ))}
          </select>
        </label>
        <label class="flex flex-col">
          <span class="mb-1 font-medium">Subject filter (optional, wildcards * and &gt;)</span>
          <input
            data-testid="event-filter"
            class={`${input} w-80 font-mono`}
            value={filterDraft}
            placeholder={events[0] ? events[0].subject.split(".").slice(0, 4).join(".") + ".>" : ""}
            onInput={(e) => setFilterDraft((e.target as HTMLInputElement).value)}
          />
        </label>
        <button type="submit" class={button}>
          Apply
        </button>
      </form>
      {live === "error" && filter && <ErrorBanner error={`The gateway refused the filter ${filter}: it must be a subject of this component's events.`} />}
      <ErrorBanner error={error} />
      <div class="overflow-x-auto rounded bg-white shadow-sm">
        <table class="w-full text-sm" data-testid="events-table">
          <thead>
            <tr>
              {["#", "Subject", "Type", "Source", "Time"].map((h) => (
                <th key={h} scope="col" class={th}>
                  {h}
                </th>
              ))}
            </tr>
          </thead>
          <tbody>
            {events.length === 0 && (
              <tr>
                <td colSpan={5} class={td}>
                  Waiting for the next event…
                </td>
              </tr>
            )}
            {events.map((e) => (
              <tr key={e.seq} data-testid="event-row">
                <td class={td}>{e.seq}</td>
                <td class={`${td} break-all font-mono text-xs`}>{e.subject}</td>
                <td class={td}>{e.type}</td>
                <td class={td}>{e.source}</td>
                <td class={`${td} whitespace-nowrap`}>{e.time ? new Date(e.time).toLocaleTimeString() : ""}</td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
    </>
  );
}
