// Entry point: renders the app and registers the service worker that keeps the shell offline.

import { render } from "preact";
import { App } from "./app";
import "./styles.css";

const root = document.getElementById("app");
if (root) render(<App />, root);

if ("serviceWorker" in navigator) {
  window.addEventListener("load", () => {
    navigator.serviceWorker.register("/sw.js").catch(() => {
      // without a service worker the app works, only not offline
    });
  });
}
