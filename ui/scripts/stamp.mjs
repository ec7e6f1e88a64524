// The bundle stamp: the SHA-256 of the UI's sources (every file under ui/ but node_modules
// and dot files) and of the built bundle, written next to the bundle after `npm run build`.
// `cargo xtask tidy` computes the same two hashes and fails when they differ: the committed
// bundle was not built from the committed sources. Keep this in step with
// crates/xtask/src/tidy.rs (`tree_hash`).
//
// Hash: for each file in byte order of its path relative to the root ('/' separated):
// path, NUL, decimal length, NUL, contents.

import { createHash } from "node:crypto";
import { readdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join, relative, sep } from "node:path";
import { fileURLToPath } from "node:url";

const ui = join(dirname(fileURLToPath(import.meta.url)), "..");
const bundle = join(ui, "..", "crates", "ui-gateway", "src", "ui", "dist");
const stampFile = join(ui, "..", "crates", "ui-gateway", "src", "ui", "bundle.stamp");

function files(dir, out = []) {
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    if (e.name.startsWith(".") || e.name === "node_modules") continue;
    const p = join(dir, e.name);
    if (e.isDirectory()) files(p, out);
    else if (e.isFile()) out.push(p);
  }
  return out;
}

export function treeHash(root) {
  const entries = files(root).map((p) => [relative(root, p).split(sep).join("/"), p]);
  entries.sort(([a], [b]) => Buffer.compare(Buffer.from(a), Buffer.from(b)));
  const h = createHash("sha256");
  for (const [rel, p] of entries) {
    const data = readFileSync(p);
    h.update(`${rel}\0${data.length}\0`);
    h.update(data);
  }
  return h.digest("hex");
}

const stamp = () =>
  "# written by `npm --prefix ui run build`; checked by `cargo xtask tidy`\n" +
  `sources ${treeHash(ui)}\nbundle ${treeHash(bundle)}\n`;

if (process.argv[2] === "write") {
  writeFileSync(stampFile, stamp());
  console.log(`wrote ${relative(join(ui, ".."), stampFile)}`);
} else {
  process.stdout.write(stamp());
}
