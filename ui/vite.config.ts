// Builds the UI into crates/ui-gateway/src/ui/dist, which ui-gateway embeds in its binary.
// Hashed file names under assets/ (served immutable); no inline scripts or styles (the
// gateway's Content-Security-Policy allows none).

import preact from "@preact/preset-vite";
import tailwindcss from "@tailwindcss/vite";
import { defineConfig } from "vite";

export default defineConfig({
  plugins: [preact(), tailwindcss()],
  build: {
    outDir: "../crates/ui-gateway/src/ui/dist",
    emptyOutDir: true,
    assetsDir: "assets",
    assetsInlineLimit: 0,
    modulePreload: { polyfill: false },
    sourcemap: false,
    target: "es2022",
  },
  server: {
    // `npm run dev` against a gateway on its default port.
    proxy: { "/api": "http://127.0.0.1:8480" },
  },
});
