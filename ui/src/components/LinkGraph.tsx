// The links of a unit two hops out (incoming and outgoing), drawn by a D3 force simulation:
// typed, directed edges, every node a link to its unit, zoom and pan, nodes draggable.

import { drag } from "d3-drag";
import {
  forceCollide,
  forceLink,
  forceManyBody,
  forceSimulation,
  type SimulationLinkDatum,
  type SimulationNodeDatum,
} from "d3-force";
import { select } from "d3-selection";
import { zoom, zoomIdentity } from "d3-zoom";
import { useEffect, useRef, useState } from "preact/hooks";
import { client } from "../api";
import { unitHref } from "../route";
import { ErrorBanner, buttonQuiet, link } from "./ui";

/** At most this many units are drawn (the unit, its neighbours, theirs). */
const MAX_NODES = 60;

interface GNode extends SimulationNodeDatum {
  id: string;
  name: string;
  hop: number;
}

interface GEdge extends SimulationLinkDatum<GNode> {
  source: string | GNode;
  target: string | GNode;
  kind: string;
}

export interface Neighbourhood {
  nodes: GNode[];
  edges: { source: string; target: string; kind: string }[];
  truncated: boolean;
}

/** Walks links two hops out from `id`, then looks up every unit's name. */
export async function neighbourhood(id: string, rootName: string): Promise<Neighbourhood> {
  const hops = new Map<string, number>([[id, 0]]);
  const edges = new Map<string, { source: string; target: string; kind: string }>();
  let truncated = false;
  const visit = async (unit: string, hop: number) => {
    const l = await client.links(unit);
    const add = (source: string, target: string, kind: string, other: string) => {
      if (!hops.has(other)) {
        if (hops.size >= MAX_NODES) {
          truncated = true;
          return;
        }
        hops.set(other, hop + 1);
      }
      edges.set(`${source}|${kind}|${target}`, { source, target, kind });
    };
    for (const o of l.outgoing) add(unit, o.target, o.kind, o.target);
    for (const i of l.incoming) add(i.source, unit, i.kind, i.source);
  };
  await visit(id, 0);
  const firstHop = [...hops].filter(([, h]) => h === 1).map(([u]) => u);
  await Promise.all(firstHop.map((u) => visit(u, 1).catch(() => undefined)));
  const names = new Map<string, string>([[id, rootName]]);
  await Promise.all(
    [...hops.keys()]
      .filter((u) => u !== id)
      .map((u) =>
        client
          .unit(u)
          .then((x) => names.set(u, x.name))
          .catch(() => undefined),
      ),
  );
  return {
    nodes: [...hops].map(([u, hop]) => ({ id: u, name: names.get(u) ?? u, hop })),
    edges: [...edges.values()],
    truncated,
  };
}

/** Simulation steps computed before the graph is first drawn. */
const PRE_TICKS = 200;
const WIDTH = 800;
const HEIGHT = 420;
const COLOURS = ["#1e3a8a", "#2563eb", "#93c5fd"];

/** `epoch` changes when the links may have: the graph is walked again. */
export function LinkGraph({ id, name, epoch }: { id: string; name: string; epoch: string }) {
  const svgRef = useRef<SVGSVGElement>(null);
  const [data, setData] = useState<Neighbourhood | null>(null);
  const [error, setError] = useState("");
  const resetRef = useRef<() => void>(() => undefined);

  useEffect(() => {
    let current = true;
    neighbourhood(id, name)
      .then((d) => current && setData(d))
      .catch((e: Error) => current && setError(e.message));
    return () => {
      current = false;
    };
  }, [id, name, epoch]);

  useEffect(() => {
    const el = svgRef.current;
    if (!el || !data || data.edges.length === 0) return;
    const nodes: GNode[] = data.nodes.map((n) => ({ ...n }));
    const edges: GEdge[] = data.edges.map((e) => ({ ...e }));
    const svg = select(el);
    svg.selectAll("*").remove();
    svg
      .append("defs")
      .append("marker")
      .attr("id", "arrow")
      .attr("viewBox", "0 0 10 10")
      .attr("refX", 22)
      .attr("refY", 5)
      .attr("markerWidth", 7)
      .attr("markerHeight", 7)
      .attr("orient", "auto-start-reverse")
      .append("path")
      .attr("d", "M 0 0 L 10 5 L 0 10 z")
      .attr("fill", "#475569");
    const root = svg.append("g").attr("class", "graph-root");
    const lines = root
      .append("g")
      .selectAll("line")
      .data(edges)
      .join("line")
      .attr("class", "graph-edge")
      .attr("stroke", "#64748b")
      .attr("stroke-width", 1.5)
      .attr("marker-end", "url(#arrow)");
    const labels = root
      .append("g")
      .selectAll("text")
      .data(edges)
      .join("text")
      .attr("class", "edge-label")
      .attr("font-size", 11)
      .attr("fill", "#334155")
      .attr("stroke", "#ffffff")
      .attr("stroke-width", 3)
      .attr("paint-order", "stroke")
      .attr("text-anchor", "middle")
      .text((e) => e.kind);
    const node = root
      .append("g")
      .selectAll<SVGAElement, GNode>("a")
      .data(nodes)
      // Appended under an SVG group, "a" is an SVG link (focusable, keyboard-usable).
      .join((enter) => enter.append<SVGAElement>("a"))
      .attr("class", "graph-node")
      .attr("data-id", (n) => n.id)
      .attr("data-hop", (n) => n.hop)
      .attr("href", (n) => unitHref(n.id))
      .attr("aria-label", (n) => (n.hop === 0 ? `${n.name} (this unit)` : `Open ${n.name}`));
    node
      .append("circle")
      .attr("r", (n) => (n.hop === 0 ? 14 : 10))
      .attr("fill", (n) => COLOURS[n.hop] ?? COLOURS[2])
      .attr("stroke", "#0f172a")
      .attr("stroke-width", 1);
    node
      .append("text")
      .attr("x", 16)
      .attr("y", 4)
      .attr("font-size", 12)
      .attr("fill", "#0f172a")
      .attr("stroke", "#ffffff")
      .attr("stroke-width", 3)
      .attr("paint-order", "stroke")
      .text((n) => (n.name.length > 28 ? `${n.name.slice(0, 27)}…` : n.name));
    node.append("title").text((n) => `${n.name} (${n.id})`);

    const sim = forceSimulation(nodes)
      .force(
        "link",
        forceLink<GNode, GEdge>(edges)
          .id((n) => n.id)
          .distance(140),
      )
      .force("charge", forceManyBody().strength(-320))
      .force("collide", forceCollide(30));
    // The unit itself is pinned in the middle (a centring force would pull the rest onto it).
    const centre = nodes.find((n) => n.hop === 0);
    if (centre) {
      centre.fx = WIDTH / 2;
      centre.fy = HEIGHT / 2;
    }
    // Laid out before the first paint (no swirl of nodes from the middle); it keeps running
    // gently so that dragged units settle.
    sim.stop().tick(PRE_TICKS);
    const draw = () => {
      const p = (v: string | GNode, axis: "x" | "y") => (typeof v === "string" ? 0 : (v[axis] ?? 0));
      lines
        .attr("x1", (e) => p(e.source, "x"))
        .attr("y1", (e) => p(e.source, "y"))
        .attr("x2", (e) => p(e.target, "x"))
        .attr("y2", (e) => p(e.target, "y"));
      labels
        .attr("x", (e) => (p(e.source, "x") + p(e.target, "x")) / 2)
        .attr("y", (e) => (p(e.source, "y") + p(e.target, "y")) / 2 - 4);
      node.attr("transform", (n) => `translate(${n.x ?? 0},${n.y ?? 0})`);
    };
    draw();
    sim.on("tick", draw).alpha(0.05).restart();
    node.call(
      drag<SVGAElement, GNode>()
        .on("start", (e, n) => {
          if (!e.active) sim.alphaTarget(0.3).restart();
          n.fx = n.x;
          n.fy = n.y;
        })
        .on("drag", (e, n) => {
          n.fx = e.x;
          n.fy = e.y;
        })
        .on("end", (e, n) => {
          if (!e.active) sim.alphaTarget(0);
          if (n.hop !== 0) {
            n.fx = null;
            n.fy = null;
          }
        }),
    );
    const z = zoom<SVGSVGElement, unknown>()
      .scaleExtent([0.25, 4])
      .on("zoom", (e) => root.attr("transform", e.transform.toString()));
    svg.call(z);
    resetRef.current = () => svg.call(z.transform, zoomIdentity);
    return () => {
      sim.stop();
    };
  }, [data]);

  if (error) return <ErrorBanner error={`The link graph cannot be drawn: ${error}`} />;
  if (!data) return <p class="text-slate-700">Walking the links…</p>;
  if (data.edges.length === 0) return <p data-testid="graph-empty" class="text-slate-700">No links in or out.</p>;
  const names = new Map(data.nodes.map((n) => [n.id, n.name]));
  return (
    <div>
      <div class="mb-2 flex items-center gap-3 text-sm text-slate-700">
        <span>
          {data.nodes.length} units, {data.edges.length} links, two hops out
          {data.truncated ? ` (the first ${MAX_NODES} units)` : ""}. Scroll to zoom, drag to pan or move a unit.
        </span>
        <button type="button" class={buttonQuiet} onClick={() => resetRef.current()}>
          Reset view
        </button>
      </div>
      <svg
        ref={svgRef}
        data-testid="link-graph"
        viewBox={`0 0 ${WIDTH} ${HEIGHT}`}
        role="group"
        aria-label="Link graph"
        class="h-[420px] w-full rounded border border-slate-300 bg-white"
      />
      <details class="mt-2 text-sm">
        <summary class="cursor-pointer">Links as a list</summary>
        <ul data-testid="link-list" class="mt-1">
          {data.edges.map((e) => (
            <li key={`${e.source}|${e.kind}|${e.target}`}>
              <a class={link} href={unitHref(e.source)}>
                {names.get(e.source)}
              </a>{" "}
              — {e.kind} →{" "}
              <a class={link} href={unitHref(e.target)}>
                {names.get(e.target)}
              </a>
            </li>
          ))}
        </ul>
      </details>
    </div>
  );
}
