// The application shell: sign-in gate, navigation by role, and the page for the current route.

import { useEffect, useState } from "preact/hooks";
import { ApiError, client, storeToken, storedToken, type WhoAmI } from "./api";
import { ErrorBanner } from "./components/ui";
import { Events } from "./pages/Events";
import { Login } from "./pages/Login";
import { Operations } from "./pages/Operations";
import { Pipelines, RunPage } from "./pages/Pipelines";
import { UnitPage } from "./pages/Unit";
import { Units } from "./pages/Units";
import { useRoute } from "./route";

export function App() {
  const [me, setMe] = useState<WhoAmI | null>(null);
  const [checking, setChecking] = useState(() => storedToken() !== "");
  const [error, setError] = useState("");
  const route = useRoute();

  // A token kept from earlier in this tab is checked again: it may have been revoked.
  useEffect(() => {
    const token = storedToken();
    if (!token) return;
    client
      .whoami(token)
      .then(setMe)
      .catch((e: ApiError) => {
        if (e.status === 401) storeToken(null);
        setError(e.status === 401 ? "Your token is no longer valid; sign in again." : e.message);
      })
      .finally(() => setChecking(false));
  }, []);

  const signOut = () => {
    storeToken(null);
    setMe(null);
    location.hash = "";
  };

  if (checking) return <p class="p-6 text-slate-700">Checking your token…</p>;
  if (!me) {
    return (
      <Login
        initialError={error}
        onSignedIn={(who, token) => {
          storeToken(token);
          setError("");
          setMe(who);
        }}
      />
    );
  }

  const nav: [string, string, boolean][] = [
    ["#/units", "Units", route.page === "units" || route.page === "unit"],
    ["#/pipelines", "Pipelines", route.page === "pipelines" || route.page === "run"],
    ["#/events", "Events", route.page === "events"],
  ];
  if (me.role === "admin") nav.push(["#/operations", "Operations", route.page === "operations"]);

  return (
    <div class="min-h-screen bg-slate-50 text-slate-900">
      <a href="#main" class="sr-only focus:not-sr-only focus:absolute focus:left-2 focus:top-2 focus:bg-white focus:p-2">
        Skip to content
      </a>
      <header class="bg-slate-900 text-white">
        <div class="mx-auto flex max-w-6xl flex-wrap items-center gap-x-6 gap-y-2 px-4 py-3">
          <span class="text-lg font-bold tracking-tight">CIM</span>
          <nav aria-label="Main" class="flex flex-wrap gap-1">
            {nav.map(([href, label, current]) => (
              <a
                key={href}
                href={href}
                data-testid={`nav-${label.toLowerCase()}`}
                aria-current={current ? "page" : undefined}
                class={`rounded px-3 py-1.5 text-sm ${current ? "bg-white text-slate-900" : "text-slate-100 hover:bg-slate-700"}`}
              >
                {label}
              </a>
            ))}
          </nav>
          <div class="ml-auto flex items-center gap-3 text-sm">
            <span data-testid="who" data-role={me.role}>
              {me.name} <span class="rounded bg-slate-700 px-2 py-0.5 text-xs">{me.role}</span>
            </span>
            <button
              type="button"
              data-testid="sign-out"
              onClick={signOut}
              class="rounded border border-slate-400 px-3 py-1 text-slate-100 hover:bg-slate-700"
            >
              Sign out
            </button>
          </div>
        </div>
      </header>
      <main id="main" class="mx-auto max-w-6xl px-4 py-6">
        <ErrorBanner error={error} />
        {page(me)}
      </main>
    </div>
  );

  // A function, not a component defined in here: a component type made anew on each render
  // would remount the page (losing its state) whenever the shell renders.
  function page(me: WhoAmI) {
    switch (route.page) {
      case "units":
        return <Units me={me} />;
      case "unit":
        return <UnitPage key={route.id} id={route.id} me={me} />;
      case "pipelines":
        return <Pipelines me={me} />;
      case "run":
        return <RunPage key={route.id} id={route.id} me={me} />;
      case "events":
        return <Events />;
      case "operations":
        return me.role === "admin" ? (
          <Operations />
        ) : (
          <ErrorBanner error={`The operations page needs an admin token; yours has the role ${me.role}.`} />
        );
    }
  }
}
