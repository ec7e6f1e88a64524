// The gateway's HTTP API as the UI uses it: typed responses (the shapes the OpenAPI document at
// /api/openapi.json gives), the token kept in sessionStorage, every error as an ApiError with
// the gateway's one-line message and status.

export type Role = "reader" | "writer" | "admin";

export interface WhoAmI {
  id: string;
  name: string;
  role: Role;
}

export interface Provenance {
  correlation_id: string;
  causation_id: string;
  source: string;
  time_ms: number;
}

export interface ContentVersion {
  cid: string;
  size: number;
  version: number;
  sequence: number;
  previous_cid: string;
  time_ms: number;
}

export interface Link {
  kind: string;
  target: string;
}

export interface Unit {
  unit_id: string;
  cid: string;
  size: number;
  name: string;
  media_type: string;
  unit_type: string;
  tags: string[];
  attributes: Record<string, string>;
  links: Link[];
  version: number;
  sequence: number;
  deleted: boolean;
  created_ms: number;
  updated_ms: number;
  versions: ContentVersion[];
  created_by: Provenance | null;
  updated_by: Provenance | null;
}

export interface UnitList {
  units: Unit[];
  next_page_token: string;
}

export interface HistoryEntry {
  version: number;
  sequence: number;
  event_type: string;
  provenance: Provenance | null;
  summary: string;
}

export interface Links {
  outgoing: { kind: string; target: string }[];
  incoming: { kind: string; source: string }[];
}

export interface CommandResult {
  unit_id: string;
  version: number;
  cid: string;
  replayed: boolean;
  sequence: number;
}

export interface RunCounts {
  queued: number;
  running: number;
  completed: number;
  failed: number;
  cancelled: number;
}

export interface PipelineInfo {
  name: string;
  version: number;
  digest: string;
  active: boolean;
  definition: PipelineDefinition;
  runs: RunCounts;
}

export interface PipelineDefinition {
  name?: string;
  description?: string;
  trigger?: { on?: string; [k: string]: unknown };
  steps?: { id?: string; name?: string; plugin?: string; builtin?: string; [k: string]: unknown }[];
  [k: string]: unknown;
}

export interface StepInfo {
  step: string;
  state: string;
  attempts: number;
  error?: string;
  /** While `waiting`: what the attempt waits for (no retry is spent meanwhile). */
  waiting_for?: string;
  metadata?: Record<string, string>;
  units?: string[];
  duration_us: number;
}

export interface RunInfo {
  run_id: string;
  pipeline: string;
  pipeline_version: number;
  state: string;
  trigger: string;
  trigger_subject?: string;
  unit_id?: string;
  correlation_id: string;
  requested_ms: number;
  updated_ms: number;
  outcome?: string;
  error?: string;
  steps: StepInfo[];
  units?: string[];
  params?: Record<string, string>;
  last_seq: number;
}

export interface Instance {
  instance_id: string;
  component: string;
  service: string;
  version: string;
  node: string;
  capabilities: string[];
  subjects: string[];
  http_addr: string;
  state: string;
  incompatible: boolean;
  registered_ms: number;
  changed_ms: number;
}

export interface NodeInfo {
  name: string;
  memory_bytes: number;
  reserved_bytes: number;
  cpus: number;
  labels: Record<string, string>;
  state: string;
  jetstream_server: string;
  changed_ms: number;
  reason: string;
}

export interface Status {
  instances: Instance[];
  nodes: NodeInfo[];
  desired: { service: string; replicas: number }[];
  desired_is_default: boolean;
  problems: { subject: string; reason: string }[];
  converged: boolean;
  registry_instance: string;
}

/** A message a component could not process, with the reason (not its payload). */
export interface DeadLetter {
  seq: number;
  time_ms: number;
  subject: string;
  original_subject: string;
  reason: string;
  type: string;
  correlation_id: string;
  size: number;
}

/** One event as the SSE stream sends it. */
export interface LiveEvent {
  seq: number;
  subject: string;
  type: string;
  id: string;
  time: string;
  source: string;
  correlation_id: string;
  size: number;
}

export class ApiError extends Error {
  constructor(
    message: string,
    readonly status: number,
  ) {
    super(message);
  }
}

const TOKEN_KEY = "cim-token";

export function storedToken(): string {
  return sessionStorage.getItem(TOKEN_KEY) ?? "";
}

export function storeToken(token: string | null): void {
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** The message of an error response: the gateway's `error` field, else the status text. */
export function errorMessage(status: number, statusText: string, text: string): string {
  try {
    const body = JSON.parse(text) as { error?: unknown };
    if (typeof body.error === "string" && body.error) return body.error;
  } catch {
    // not JSON: a proxy in between, or the network
  }
  return text.trim() || statusText || `request failed with status ${status}`;
}

export async function api<T>(path: string, init: RequestInit = {}, token = storedToken()): Promise<T> {
  const headers = new Headers(init.headers);
  headers.set("Authorization", `Bearer ${token}`);
  if (init.body && !headers.has("Content-Type")) headers.set("Content-Type", "application/json");
  let r: Response;
  try {
    r = await fetch(path, { ...init, headers });
  } catch (e) {
    throw new ApiError(`the gateway cannot be reached (${(e as Error).message})`, 0);
  }
  const text = await r.text();
  if (!r.ok) throw new ApiError(errorMessage(r.status, r.statusText, text), r.status);
  return (text ? JSON.parse(text) : null) as T;
}

export const post = <T>(path: string, body: unknown) => api<T>(path, { method: "POST", body: JSON.stringify(body) });

const enc = encodeURIComponent;

export const client = {
  whoami: (token?: string) => api<WhoAmI>("/api/v1/whoami", {}, token),
  units: (q: URLSearchParams) => api<UnitList>(`/api/v1/units?${q}`),
  /** `atVersion`: the unit as it was then; `minSequence`: at least as new as that write. */
  unit: (id: string, atVersion = 0, minSequence = 0) => {
    const q = new URLSearchParams();
    if (atVersion) q.set("at_version", String(atVersion));
    if (minSequence) q.set("min_sequence", String(minSequence));
    return api<Unit>(`/api/v1/units/${enc(id)}${q.size ? `?${q}` : ""}`);
  },
  history: (id: string) => api<{ entries: HistoryEntry[] }>(`/api/v1/units/${enc(id)}/history`),
  links: (id: string) => api<Links>(`/api/v1/units/${enc(id)}/links`),
  tag: (id: string, tags: string[], expectedVersion: number) =>
    post<CommandResult>(`/api/v1/units/${enc(id)}/tags?expected_version=${expectedVersion}`, { tags }),
  link: (id: string, kind: string, target: string, expectedVersion: number) =>
    post<CommandResult>(`/api/v1/units/${enc(id)}/links?expected_version=${expectedVersion}`, { kind, target }),
  contentUrl: (id: string, version?: number) =>
    `/api/v1/units/${enc(id)}/content?${version ? `version=${version}&` : ""}access_token=${enc(storedToken())}`,
  pipelines: () => api<{ pipelines: PipelineInfo[] }>("/api/v1/pipelines"),
  startRun: (name: string, unitId: string) =>
    post<{ run_id: string }>(`/api/v1/pipelines/${enc(name)}/runs`, unitId ? { unit_id: unitId } : {}),
  runs: (q: URLSearchParams) => api<{ runs: RunInfo[] }>(`/api/v1/runs?${q}`),
  run: (id: string) => api<RunInfo>(`/api/v1/runs/${enc(id)}`),
  changeRun: (id: string, what: "cancel" | "retry", reason: string) =>
    post<RunInfo>(`/api/v1/runs/${enc(id)}/${what}`, reason ? { reason } : {}),
  deadLetters: (component: string, limit = 50) =>
    api<{ dead_letters: DeadLetter[] }>(`/api/v1/dead-letters?component=${enc(component)}&limit=${limit}`),
  components: () => api<{ instances: Instance[] }>("/api/v1/components"),
  status: () => api<Status>("/api/v1/status"),
  eventsUrl: (component: string, filter: string) => {
    const q = new URLSearchParams({ component, access_token: storedToken() });
    if (filter) q.set("filter", filter);
    return `/api/v1/events?${q}`;
  },
};

export const canWrite = (role: Role) => role === "writer" || role === "admin";
