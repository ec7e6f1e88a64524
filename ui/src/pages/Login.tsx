// Sign in with an API token; explains where tokens come from.

import { useState } from "preact/hooks";
import { ApiError, client, type WhoAmI } from "../api";
import { ErrorBanner, button, input } from "../components/ui";

export function Login({
  onSignedIn,
  initialError,
}: {
  onSignedIn: (me: WhoAmI, token: string) => void;
  initialError: string;
}) {
  const [token, setToken] = useState("");
  const [error, setError] = useState(initialError);
  const [busy, setBusy] = useState(false);

  const submit = async (e: Event) => {
    e.preventDefault();
    const t = token.trim();
    if (!t) {
      setError("Paste a token first.");
      return;
    }
    setBusy(true);
    try {
      onSignedIn(await client.whoami(t), t);
    } catch (err) {
      const e = err as ApiError;
      setError(e.status === 401 ? `The gateway refused this token: ${e.message}.` : e.message);
    } finally {
      setBusy(false);
    }
  };

  return (
    <main class="flex min-h-screen items-start justify-center bg-slate-100 px-4 py-12">
      <div class="w-full max-w-lg rounded-lg bg-white p-6 shadow">
        <h1 class="mb-1 text-2xl font-semibold">Sign in to CIM</h1>
        <p class="mb-4 text-slate-700">The web UI acts with an API token of the gateway.</p>
        <form onSubmit={submit} class="flex flex-col gap-3">
          <label for="token" class="text-sm font-medium">
            API token
          </label>
          <input
            id="token"
            data-testid="token"
            type="password"
            autoComplete="off"
            spellcheck={false}
            placeholder="cimt_…"
            value={token}
            onInput={(e) => setToken((e.target as HTMLInputElement).value)}
            class={`${input} font-mono`}
          />
          <ErrorBanner error={error} testid="login-error" />
          <button type="submit" data-testid="sign-in" disabled={busy} class={button}>
            {busy ? "Checking…" : "Sign in"}
          </button>
        </form>
        <h2 class="mt-6 text-sm font-semibold">No token yet?</h2>
        <p class="mt-1 text-sm text-slate-700">An operator creates one on a machine that reaches NATS:</p>
        <pre class="mt-2 overflow-x-auto rounded bg-slate-900 p-3 text-sm text-slate-100">
          cimctl token create --name alice --role writer
        </pre>
        <p class="mt-2 text-sm text-slate-700">
          It prints the token once. Roles: <b>reader</b> browses and downloads, <b>writer</b> also uploads, tags and
          runs pipelines, <b>admin</b> also sees operations and applies pipelines. <code>cimctl token ls</code> lists
          tokens, <code>cimctl token revoke &lt;id&gt;</code> stops one within a second.
        </p>
      </div>
    </main>
  );
}
