// Hash routes (`#/units/<id>`): the gateway serves one page, and a reload keeps the view.

import { useEffect, useState } from "preact/hooks";

export type Route =
  | { page: "units" }
  | { page: "unit"; id: string }
  | { page: "pipelines" }
  | { page: "run"; id: string }
  | { page: "operations" }
  | { page: "events" };

export function parseRoute(hash: string): Route {
  const parts = hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  switch (parts[0]) {
    case "units":
      return parts[1] ? { page: "unit", id: parts[1] } : { page: "units" };
    case "pipelines":
      return { page: "pipelines" };
    case "runs":
      return parts[1] ? { page: "run", id: parts[1] } : { page: "pipelines" };
    case "operations":
      return { page: "operations" };
    case "events":
      return { page: "events" };
    default:
      return { page: "units" };
  }
}

export const unitHref = (id: string) => `#/units/${encodeURIComponent(id)}`;
export const runHref = (id: string) => `#/runs/${encodeURIComponent(id)}`;

export function useRoute(): Route {
  const [route, setRoute] = useState(() => parseRoute(location.hash));
  useEffect(() => {
    const on = () => setRoute(parseRoute(location.hash));
    window.addEventListener("hashchange", on);
    return () => window.removeEventListener("hashchange", on);
  }, []);
  return route;
}
