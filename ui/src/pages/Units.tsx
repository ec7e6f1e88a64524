// Units: search (name prefix, tag, type), a sortable and paged table, kept live by the
// information unit's events; upload for writers.

import { useEffect, useMemo, useState } from "preact/hooks";
import { canWrite, client, type Unit, type WhoAmI } from "../api";
import { Upload } from "../components/Upload";
import { ErrorBanner, LiveDot, Notice, PageTitle, When, button, buttonQuiet, input, link, td, th } from "../components/ui";
import { humanSize } from "../format";
import { useDebounced, useLiveEvents } from "../live";
import { unitHref } from "../route";

const PAGE_SIZE = 25;

type SortKey = "name" | "media_type" | "size" | "version" | "updated_ms";

interface Filters {
  name_prefix: string;
  tag: string;
  type: string;
}

export function Units({ me }: { me: WhoAmI }) {
  const [draft, setDraft] = useState<Filters>({ name_prefix: "", tag: "", type: "" });
  const [filters, setFilters] = useState<Filters>(draft);
  // Page tokens of the pages before this one (the first page's is "").
  const [pages, setPages] = useState<string[]>([""]);
  const [units, setUnits] = useState<Unit[]>([]);
  const [next, setNext] = useState("");
  const [error, setError] = useState("");
  const [loading, setLoading] = useState(true);
  const [sort, setSort] = useState<{ key: SortKey; asc: boolean }>({ key: "updated_ms", asc: false });
  const [minSequence, setMinSequence] = useState(0);

  const load = async (seq = minSequence) => {
    const q = new URLSearchParams({ page_size: String(PAGE_SIZE) });
    for (const [k, v] of Object.entries(filters)) if (v.trim()) q.set(k, v.trim());
    const token = pages[pages.length - 1];
    if (token) q.set("page_token", token);
    // Read what the last event announced, even from a replica that lags.
    if (seq) q.set("min_sequence", String(seq));
    try {
      const list = await client.units(q);
      setUnits(list.units);
      setNext(list.next_page_token);
      setError("");
    } catch (e) {
      setError((e as Error).message);
    } finally {
      setLoading(false);
    }
  };

  useEffect(() => {
    setLoading(true);
    void load();
  }, [filters, pages]);

  // The debounced refresh runs the newest render's load, so it asks for the newest sequence.
  const refresh = useDebounced(() => void load(), 250);
  const live = useLiveEvents("iu", "", (e) => {
    setMinSequence((s) => Math.max(s, e.seq));
    refresh();
  });

  const sorted = useMemo(() => {
    const list = [...units];
    const { key, asc } = sort;
    list.sort((a, b) => {
      const x = a[key];
      const y = b[key];
      const c = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
      return asc ? c : -c;
    });
    return list;
  }, [units, sort]);

  const header = (key: SortKey, label: string) => {
    const active = sort.key === key;
    return (
      <th scope="col" class={th} aria-sort={active ? (sort.asc ? "ascending" : "descending") : "none"}>
        <button
          type="button"
          data-testid={`sort-${key}`}
          class="inline-flex items-center gap-1 uppercase hover:text-blue-800"
          onClick={() => setSort({ key, asc: active ? !sort.asc : key === "name" || key === "media_type" })}
        >
          {label}
          <span aria-hidden="true">{active ? (sort.asc ? "▲" : "▼") : ""}</span>
        </button>
      </th>
    );
  };

  const field = (k: keyof Filters, label: string, placeholder: string) => (
    <label class="flex flex-col text-sm">
      <span class="mb-1 font-medium">{label}</span>
      <input
        data-testid={`search-${k}`}
        class={input}
        placeholder={placeholder}
        value={draft[k]}
        onInput={(e) => setDraft({ ...draft, [k]: (e.target as HTMLInputElement).value })}
      />
    </label>
  );

  return (
    <>
      <PageTitle extra={<LiveDot state={live} />}>Units</PageTitle>
      {canWrite(me.role) ? (
        <Upload onUploaded={(r) => setMinSequence((s) => Math.max(s, r.sequence))} />
      ) : (
        <Notice testid="upload-disabled">
          Uploading needs a writer token; yours has the role <b>{me.role}</b>.
        </Notice>
      )}
      <form
        class="mb-4 flex flex-wrap items-end gap-3"
        onSubmit={(e) => {
          e.preventDefault();
          setPages([""]);
          setFilters({ ...draft });
        }}
      >
        {field("name_prefix", "Name starts with", "report")}
        {field("tag", "Tag", "summary")}
        {field("type", "Unit type", "document")}
        <button type="submit" data-testid="search" class={button}>
          Search
        </button>
        <button
          type="button"
          class={buttonQuiet}
          onClick={() => {
            const empty = { name_prefix: "", tag: "", type: "" };
            setDraft(empty);
            setFilters(empty);
            setPages([""]);
          }}
        >
          Clear
        </button>
      </form>
      <ErrorBanner error={error} />
      <div class="overflow-x-auto rounded bg-white shadow-sm">
        <table class="w-full text-sm" data-testid="units-table" aria-busy={loading}>
          <caption class="sr-only">Units, {sort.asc ? "ascending" : "descending"} by {sort.key}</caption>
          <thead>
            <tr>
              {header("name", "Name")}
              {header("media_type", "Type")}
              {header("size", "Size")}
              {header("version", "Version")}
              <th scope="col" class={th}>
                Tags
              </th>
              {header("updated_ms", "Updated")}
            </tr>
          </thead>
          <tbody>
            {sorted.map((u) => (
              <tr key={u.unit_id} data-testid="unit-row" data-id={u.unit_id} class="hover:bg-slate-50">
                <td class={td}>
                  <a class={link} href={unitHref(u.unit_id)} data-testid="unit-link">
                    {u.name}
                  </a>
                </td>
                <td class={`${td} text-slate-700`}>{u.media_type}</td>
                <td class={`${td} whitespace-nowrap`} title={`${u.size} bytes`}>
                  {humanSize(u.size)}
                </td>
                <td class={td}>v{u.version}</td>
                <td class={td}>
                  {u.tags.map((t) => (
                    <span key={t} class="mr-1 inline-block rounded bg-slate-200 px-1.5 py-0.5 text-xs text-slate-800">
                      {t}
                    </span>
                  ))}
                </td>
                <td class={`${td} whitespace-nowrap`}>
                  <When ms={u.updated_ms} />
                </td>
              </tr>
            ))}
            {!loading && sorted.length === 0 && (
              <tr>
                <td colSpan={6} class={`${td} text-slate-700`} data-testid="units-empty">
                  No units match.
                </td>
              </tr>
            )}
          </tbody>
        </table>
      </div>
      <div class="mt-3 flex items-center gap-3 text-sm">
        <button
          type="button"
          class={buttonQuiet}
          disabled={pages.length < 2}
          onClick={() => setPages(pages.slice(0, -1))}
        >
          Previous
        </button>
        <span>Page {pages.length}</span>
        <button type="button" class={buttonQuiet} disabled={!next} onClick={() => setPages([...pages, next])}>
          Next
        </button>
        <span class="text-slate-700">Sorting orders the page shown; the search narrows all units.</span>
      </div>
    </>
  );
}
