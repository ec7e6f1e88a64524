// How values read to a person: sizes in KiB/MiB, times relative to now (the exact time in a
// tooltip), registry states without their enum prefixes.

export function humanSize(bytes: number): string {
  if (!Number.isFinite(bytes) || bytes < 0) return "—";
  if (bytes < 1024) return `${bytes} B`;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let v = bytes / 1024;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v < 10 ? v.toFixed(1) : Math.round(v)} ${units[i]}`;
}

export function relativeTime(ms: number, now = Date.now()): string {
  if (!ms) return "—";
  const s = Math.round((now - ms) / 1000);
  const future = s < 0;
  const a = Math.abs(s);
  const say = (n: number, unit: string) => {
    const text = `${n} ${unit}${n === 1 ? "" : "s"}`;
    return future ? `in ${text}` : `${text} ago`;
  };
  if (a < 10) return "just now";
  if (a < 60) return say(a, "second");
  if (a < 3600) return say(Math.floor(a / 60), "minute");
  if (a < 86400) return say(Math.floor(a / 3600), "hour");
  if (a < 86400 * 30) return say(Math.floor(a / 86400), "day");
  return new Date(ms).toLocaleDateString();
}

export const absoluteTime = (ms: number) => (ms ? new Date(ms).toLocaleString() : "");

/** `INSTANCE_RUNNING` → `running`, `NODE_DRAINING` → `draining`. */
export function stateLabel(s: string): string {
  return s.replace(/^(INSTANCE|NODE|STATE)_/, "").toLowerCase().replace(/_/g, " ");
}

export function duration(us: number): string {
  if (us < 1000) return `${us} µs`;
  if (us < 1_000_000) return `${(us / 1000).toFixed(1)} ms`;
  return `${(us / 1_000_000).toFixed(2)} s`;
}

export const shortId = (id: string, n = 10) => (id.length > n ? `${id.slice(0, n)}…` : id);

/** The last token of an event type or subject: `cim.iu.unit.tagged.v1` → `tagged`. */
export function eventAction(type: string): string {
  const parts = type.split(".").filter((p) => !/^v\d+$/.test(p));
  return parts[parts.length - 1] ?? type;
}
