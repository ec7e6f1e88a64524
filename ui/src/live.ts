// Live events over Server-Sent Events: one EventSource per component, which resumes by itself
// after a reconnect (the browser sends Last-Event-ID).

import { useEffect, useRef, useState } from "preact/hooks";
import { client, type LiveEvent } from "./api";

export type LiveState = "connecting" | "live" | "reconnecting" | "error";

export function useLiveEvents(
  component: string,
  filter: string,
  onEvent: (e: LiveEvent) => void,
  enabled = true,
): LiveState {
  const [state, setState] = useState<LiveState>("connecting");
  const handler = useRef(onEvent);
  handler.current = onEvent;
  useEffect(() => {
    if (!enabled || !component) return;
    setState("connecting");
    const source = new EventSource(client.eventsUrl(component, filter));
    source.onopen = () => setState("live");
    source.onerror = () => setState(source.readyState === EventSource.CLOSED ? "error" : "reconnecting");
    source.addEventListener("cim", (m) => {
      try {
        handler.current(JSON.parse((m as MessageEvent<string>).data) as LiveEvent);
      } catch {
        // an undecodable event is skipped; the stream goes on
      }
    });
    return () => source.close();
  }, [component, filter, enabled]);
  return state;
}

/** Calls `fn` at most once per `ms`, after the last of a burst. */
export function useDebounced(fn: () => void, ms: number): () => void {
  const timer = useRef<number | undefined>(undefined);
  const latest = useRef(fn);
  latest.current = fn;
  useEffect(() => () => window.clearTimeout(timer.current), []);
  return () => {
    window.clearTimeout(timer.current);
    timer.current = window.setTimeout(() => latest.current(), ms);
  };
}
