// The CIM web UI's service worker: keeps the application shell (the page and its hashed
// assets) so the UI opens offline. API responses are never cached: they carry a token's view.
"use strict";

const CACHE = "cim-shell-v1";

// The page, and every asset it references, so the first visit already works offline.
async function precache() {
  const cache = await caches.open(CACHE);
  const page = await fetch("/", { cache: "no-cache" });
  if (!page.ok) throw new Error(`the page answered ${page.status}`);
  const html = await page.clone().text();
  const assets = [...html.matchAll(/"(\/assets\/[^"]+)"/g)].map((m) => m[1]);
  await cache.put("/", page);
  await cache.addAll(["/manifest.webmanifest", "/icon.svg", ...assets]);
}

self.addEventListener("install", (event) => {
  event.waitUntil(precache().then(() => self.skipWaiting()));
});

self.addEventListener("activate", (event) => {
  event.waitUntil(
    caches
      .keys()
      .then((keys) => Promise.all(keys.filter((k) => k !== CACHE).map((k) => caches.delete(k))))
      .then(() => self.clients.claim()),
  );
});

// After a new page is fetched, assets it no longer references are dropped.
async function keepShell(response) {
  const cache = await caches.open(CACHE);
  await cache.put("/", response.clone());
  const html = await response.text();
  for (const req of await cache.keys()) {
    const path = new URL(req.url).pathname;
    if (path.startsWith("/assets/") && !html.includes(path)) await cache.delete(req);
  }
}

self.addEventListener("fetch", (event) => {
  const req = event.request;
  const url = new URL(req.url);
  if (req.method !== "GET" || url.origin !== self.location.origin || url.pathname.startsWith("/api/")) return;
  if (req.mode === "navigate" || url.pathname === "/" || url.pathname === "/index.html") {
    // Network first: a new build is picked up at once; the cached page when offline.
    event.respondWith(
      fetch(req)
        .then((r) => {
          if (r.ok) event.waitUntil(keepShell(r.clone()));
          return r;
        })
        .catch(() => caches.match("/").then((r) => r || Response.error())),
    );
    return;
  }
  if (url.pathname.startsWith("/assets/")) {
    // Hashed names never change content: cache first.
    event.respondWith(
      caches.match(req).then(
        (hit) =>
          hit ||
          fetch(req).then((r) => {
            if (r.ok) {
              const copy = r.clone();
              event.waitUntil(caches.open(CACHE).then((c) => c.put(req, copy)));
            }
            return r;
          }),
      ),
    );
  }
});
