// Drag-and-drop upload of several files, each streamed by its own XMLHttpRequest (the only
// browser API with upload progress), with per-file progress and cancel.

import { useRef, useState } from "preact/hooks";
import { errorMessage, storedToken, type CommandResult } from "../api";
import { humanSize } from "../format";
import { buttonQuiet, link } from "./ui";
import { unitHref } from "../route";

interface Item {
  key: number;
  name: string;
  size: number;
  loaded: number;
  state: "uploading" | "done" | "failed" | "cancelled";
  error?: string;
  unitId?: string;
  xhr?: XMLHttpRequest;
}

let nextKey = 1;

export function Upload({ onUploaded }: { onUploaded: (r: CommandResult) => void }) {
  const [items, setItems] = useState<Item[]>([]);
  const [over, setOver] = useState(false);
  const picker = useRef<HTMLInputElement>(null);

  const update = (key: number, patch: Partial<Item>) =>
    setItems((list) => list.map((i) => (i.key === key ? { ...i, ...patch } : i)));

  const start = (files: FileList | null) => {
    if (!files || files.length === 0) return;
    const batch = [...files];
    const single = batch.length === 1;
    for (const f of batch) {
      const key = nextKey++;
      const xhr = new XMLHttpRequest();
      xhr.open("POST", `/api/v1/units?name=${encodeURIComponent(f.name)}`);
      xhr.setRequestHeader("Authorization", `Bearer ${storedToken()}`);
      xhr.setRequestHeader("Content-Type", f.type || "application/octet-stream");
      xhr.upload.onprogress = (e) => update(key, { loaded: e.loaded });
      xhr.onload = () => {
        if (xhr.status === 201) {
          const r = JSON.parse(xhr.responseText) as CommandResult;
          update(key, { state: "done", loaded: f.size, unitId: r.unit_id, xhr: undefined });
          onUploaded(r);
          // One file dropped: open it when it is in; several: each row links to its unit.
          if (single) location.hash = unitHref(r.unit_id);
        } else {
          update(key, {
            state: "failed",
            error: errorMessage(xhr.status, xhr.statusText, xhr.responseText),
            xhr: undefined,
          });
        }
      };
      xhr.onerror = () => update(key, { state: "failed", error: "the upload was interrupted", xhr: undefined });
      xhr.onabort = () => update(key, { state: "cancelled", xhr: undefined });
      setItems((list) => [{ key, name: f.name, size: f.size, loaded: 0, state: "uploading", xhr }, ...list]);
      xhr.send(f);
    }
  };

  return (
    <section aria-labelledby="upload-heading" class="mb-6">
      <h2 id="upload-heading" class="sr-only">
        Upload
      </h2>
      <div
        data-testid="dropzone"
        onDragOver={(e) => {
          e.preventDefault();
          setOver(true);
        }}
        onDragLeave={() => setOver(false)}
        onDrop={(e) => {
          e.preventDefault();
          setOver(false);
          start(e.dataTransfer?.files ?? null);
        }}
        class={`flex flex-wrap items-center gap-3 rounded-lg border-2 border-dashed px-4 py-4 ${over ? "border-blue-600 bg-blue-50" : "border-slate-400 bg-white"}`}
      >
        <span class="text-slate-700">Drop files here to upload them, or</span>
        <button type="button" class={buttonQuiet} onClick={() => picker.current?.click()}>
          Choose files…
        </button>
        <input
          ref={picker}
          data-testid="file-input"
          aria-label="Files to upload"
          type="file"
          multiple
          class="sr-only"
          onChange={(e) => {
            const input = e.target as HTMLInputElement;
            start(input.files);
            input.value = "";
          }}
        />
      </div>
      {items.length > 0 && (
        <ul class="mt-3 flex flex-col gap-2" data-testid="uploads">
          {items.map((i) => (
            <li
              key={i.key}
              data-testid="upload-item"
              data-name={i.name}
              data-state={i.state}
              class="flex flex-wrap items-center gap-3 rounded bg-white px-3 py-2 shadow-sm"
            >
              <span class="min-w-0 flex-1 truncate font-medium">{i.name}</span>
              <progress
                aria-label={`Upload of ${i.name}`}
                max={Math.max(i.size, 1)}
                value={i.state === "done" ? Math.max(i.size, 1) : i.loaded}
                data-testid="upload-progress"
                class="h-2 w-40"
              />
              <span class="w-40 text-sm text-slate-700">
                {i.state === "uploading" && `${humanSize(i.loaded)} of ${humanSize(i.size)}`}
                {i.state === "done" && i.unitId && (
                  <a class={link} href={unitHref(i.unitId)} data-testid="upload-open">
                    uploaded · open
                  </a>
                )}
                {i.state === "cancelled" && "cancelled"}
              </span>
              {i.state === "uploading" && (
                <button type="button" class={buttonQuiet} onClick={() => i.xhr?.abort()}>
                  Cancel
                </button>
              )}
              {i.state === "failed" && (
                <span role="alert" class="basis-full text-sm text-red-800">
                  {i.error}
                </span>
              )}
            </li>
          ))}
        </ul>
      )}
    </section>
  );
}
