// Operations (admin): the `cimctl status` picture — desired against running per service,
// readiness of each instance, nodes with their lifecycle state, and why the system is not
// converging — refreshed by the registry's events.

import { useEffect, useState } from "preact/hooks";
import { client, type Status } from "../api";
import { ErrorBanner, LiveDot, PageTitle, StateBadge, When, td, th } from "../components/ui";
import { humanSize, stateLabel } from "../format";
import { useDebounced, useLiveEvents } from "../live";

export function Operations() {
  const [status, setStatus] = useState<Status | null>(null);
  const [error, setError] = useState("");
  const load = () =>
    client
      .status()
      .then((s) => {
        setStatus(s);
        setError("");
      })
      .catch((e: Error) => setError(e.message));
  useEffect(() => {
    void load();
  }, []);
  const refresh = useDebounced(() => void load(), 500);
  const live = useLiveEvents("registry", "", refresh);

  if (!status) return error ? <ErrorBanner error={error} /> : <p class="text-slate-700">Loading…</p>;

  const running = (service: string) =>
    status.instances.filter((i) => (i.service === service || i.component === service) && stateLabel(i.state) !== "gone");
  const services = [
    ...new Set([...status.desired.map((d) => d.service), ...status.instances.map((i) => i.service)]),
  ].sort();

  return (
    <>
      <PageTitle extra={<LiveDot state={live} />}>Operations</PageTitle>
      <ErrorBanner error={error} />
      <p
        data-testid="converged"
        data-converged={String(status.converged)}
        class={`mb-4 rounded px-3 py-2 font-medium ${status.converged ? "bg-green-100 text-green-900" : "bg-amber-100 text-amber-900"}`}
      >
        {status.converged
          ? "Converged: everything desired is running."
          : `Not converging: ${status.problems.length} problem${status.problems.length === 1 ? "" : "s"}.`}
        {status.desired_is_default && " (Desired replicas are the defaults: none were set.)"}
      </p>
      {status.problems.length > 0 && (
        <section aria-labelledby="problems-h" class="mb-6">
          <h2 id="problems-h" class="mb-2 font-semibold">
            Why not converging
          </h2>
          <ul data-testid="problems" class="list-disc pl-6 text-sm">
            {status.problems.map((p, i) => (
              <li key={i}>
                <b>{p.subject}</b>: {p.reason}
              </li>
            ))}
          </ul>
        </section>
      )}
      <section aria-labelledby="services-h" class="mb-6">
        <h2 id="services-h" class="mb-2 font-semibold">
          Services: desired and running
        </h2>
        <div class="overflow-x-auto rounded bg-white shadow-sm">
          <table class="w-full text-sm" data-testid="services-table">
            <thead>
              <tr>
                {["Service", "Desired", "Running", "Instances"].map((h) => (
                  <th key={h} scope="col" class={th}>
                    {h}
                  </th>
                ))}
              </tr>
            </thead>
            <tbody>
              {services.map((s) => {
                const desired = status.desired.find((d) => d.service === s)?.replicas;
                const inst = running(s);
                const short = desired !== undefined && inst.length < desired;
                return (
                  <tr key={s} data-testid="service-row" data-service={s}>
                    <td class={`${td} font-medium`}>{s}</td>
                    <td class={td}>{desired ?? "—"}</td>
                    <td class={`${td} ${short ? "font-semibold text-red-800" : ""}`}>{inst.length}</td>
                    <td class={td}>
                      <ul class="flex flex-col gap-1">
                        {inst.map((i) => (
                          <li key={i.instance_id} class="flex flex-wrap items-center gap-2">
                            <StateBadge state={i.state} />
                            <span class="font-mono text-xs">{i.instance_id}</span>
                            <span class="text-xs text-slate-700">
                              v{i.version} on {i.node || "?"}, since <When ms={i.changed_ms} />
                              {i.incompatible && " — incompatible contract version"}
                            </span>
                          </li>
                        ))}
                      </ul>
                    </td>
                  </tr>
                );
              })}
            </tbody>
          </table>
        </div>
      </section>
      <section aria-labelledby="nodes-h">
        <h2 id="nodes-h" class="mb-2 font-semibold">
          Nodes
        </h2>
        <div class="overflow-x-auto rounded bg-white shadow-sm">
          <table class="w-full text-sm" data-testid="nodes-table">
            <thead>
              <tr>
                {["Node", "State", "Capacity", "JetStream server", "Changed"].map((h) => (
                  <th key={h} scope="col" class={th}>
                    {h}
                  </th>
                ))}
              </tr>
            </thead>
            <tbody>
              {status.nodes.length === 0 && (
                <tr>
                  <td colSpan={5} class={td}>
                    No nodes enrolled (<code>cimctl node enroll</code>).
                  </td>
                </tr>
              )}
              {status.nodes.map((n) => (
                <tr key={n.name} data-testid="node-row">
                  <td class={`${td} font-medium`}>{n.name}</td>
                  <td class={td}>
                    <StateBadge state={n.state} />
                    {n.reason && <p class="text-xs text-slate-700">{n.reason}</p>}
                  </td>
                  <td class={td}>
                    {n.cpus} CPUs, {humanSize(n.memory_bytes)} ({humanSize(n.reserved_bytes)} reserved)
                  </td>
                  <td class={td}>{n.jetstream_server || "—"}</td>
                  <td class={td}>
                    <When ms={n.changed_ms} />
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
        <p class="mt-2 text-sm text-slate-700">
          Draining and scheduling nodes is done with <code>cimctl node</code>; the gateway does not offer it yet.
        </p>
      </section>
    </>
  );
}
