// Small shared pieces: error and notice banners, state badges, a page heading, a relative time.

import type { ComponentChildren } from "preact";
import { useEffect, useState } from "preact/hooks";
import { absoluteTime, relativeTime, stateLabel } from "../format";

export function ErrorBanner({ error, testid = "error" }: { error: string; testid?: string }) {
  if (!error) return null;
  return (
    <p role="alert" data-testid={testid} class="my-2 rounded border border-red-300 bg-red-50 px-3 py-2 text-red-800">
      {error}
    </p>
  );
}

export function Notice({ children, testid }: { children: ComponentChildren; testid?: string }) {
  return (
    <p data-testid={testid} class="my-2 rounded border border-slate-300 bg-slate-50 px-3 py-2 text-slate-700">
      {children}
    </p>
  );
}

const STATE_COLOURS: Record<string, string> = {
  completed: "bg-green-100 text-green-900",
  running: "bg-blue-100 text-blue-900",
  ready: "bg-green-100 text-green-900",
  active: "bg-green-100 text-green-900",
  retrying: "bg-amber-100 text-amber-900",
  queued: "bg-slate-200 text-slate-800",
  pending: "bg-slate-200 text-slate-800",
  waiting: "bg-slate-200 text-slate-800",
  failed: "bg-red-100 text-red-900",
  gone: "bg-red-100 text-red-900",
  cancelled: "bg-slate-200 text-slate-700",
  skipped: "bg-slate-200 text-slate-700",
  draining: "bg-amber-100 text-amber-900",
};

export function StateBadge({ state, testid }: { state: string; testid?: string }) {
  const label = stateLabel(state);
  return (
    <span
      data-testid={testid}
      data-state={label}
      class={`inline-block rounded px-2 py-0.5 text-xs font-medium ${STATE_COLOURS[label] ?? "bg-slate-200 text-slate-800"}`}
    >
      {label}
    </span>
  );
}

// One clock for every relative time on the page: "just now" becomes "2 minutes ago" without
// a reload.
const TICK_MS = 30_000;
const listeners = new Set<() => void>();
let ticker: number | undefined;

function useTick() {
  const [, setN] = useState(0);
  useEffect(() => {
    const on = () => setN((n) => n + 1);
    listeners.add(on);
    ticker ??= window.setInterval(() => listeners.forEach((l) => l()), TICK_MS);
    return () => {
      listeners.delete(on);
      if (listeners.size === 0) {
        window.clearInterval(ticker);
        ticker = undefined;
      }
    };
  }, []);
}

export function When({ ms }: { ms: number }) {
  useTick();
  return (
    <time dateTime={ms ? new Date(ms).toISOString() : undefined} title={absoluteTime(ms)}>
      {relativeTime(ms)}
    </time>
  );
}

export function PageTitle({ children, extra }: { children: ComponentChildren; extra?: ComponentChildren }) {
  return (
    <div class="mb-4 flex flex-wrap items-center gap-3">
      <h1 class="text-xl font-semibold text-slate-900">{children}</h1>
      {extra}
    </div>
  );
}

export function LiveDot({ state }: { state: string }) {
  const colour = state === "live" ? "bg-green-600" : state === "error" ? "bg-red-600" : "bg-amber-500";
  return (
    <span data-testid="live-state" data-state={state} class="inline-flex items-center gap-1 text-sm text-slate-700">
      <span aria-hidden="true" class={`inline-block h-2 w-2 rounded-full ${colour}`} />
      {state === "live" ? "live" : state}
    </span>
  );
}

export const button =
  "rounded bg-blue-700 px-3 py-1.5 text-sm font-medium text-white hover:bg-blue-800 focus:outline-none focus-visible:ring-2 focus-visible:ring-blue-500 focus-visible:ring-offset-2 disabled:cursor-not-allowed disabled:bg-slate-400";
export const buttonQuiet =
  "rounded border border-slate-400 bg-white px-3 py-1.5 text-sm text-slate-800 hover:bg-slate-100 focus:outline-none focus-visible:ring-2 focus-visible:ring-blue-500 disabled:cursor-not-allowed disabled:text-slate-500";
export const input =
  "rounded border border-slate-400 px-2 py-1.5 text-sm focus:border-blue-600 focus:outline-none focus:ring-1 focus:ring-blue-600";
export const link = "text-blue-800 underline decoration-blue-300 underline-offset-2 hover:decoration-blue-800";
export const th = "border-b border-slate-300 px-2 py-2 text-left text-xs font-semibold uppercase tracking-wide text-slate-700";
export const td = "border-b border-slate-200 px-2 py-2 align-top";

const DOT_COLOURS: Record<string, string> = {
  completed: "bg-green-600",
  skipped: "bg-slate-400",
  running: "bg-blue-600",
  retrying: "bg-amber-500",
  waiting: "bg-slate-500",
  failed: "bg-red-600",
  cancelled: "bg-slate-500",
};

/** The marker of a timeline entry on the list's left border; `offset` places it (the entry is `relative`). */
export function TimelineDot({ state = "", offset }: { state?: string; offset: string }) {
  return (
    <span
      aria-hidden="true"
      class={`absolute ${offset} h-3 w-3 rounded-full border-2 border-white ${DOT_COLOURS[state] ?? "bg-slate-500"}`}
    />
  );
}
