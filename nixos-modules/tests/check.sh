#!/usr/bin/env bash
# What can be checked of the Nix deployment on a machine without nixpkgs (see docs/deploy.md,
# "Verified here / unverified"):
#
#   1. every .nix file parses (nix-instantiate --parse);
#   2. with NIXPKGS_LIB=<nixpkgs>/lib: the modules and the flake's wiring evaluate against
#      ./stubs.nix; the rendered units pass `systemd-analyze verify`, the rendered nats
#      configs pass `nats-server -t`, and the options refuse what they should;
#   3. with --live as well: the example topology (3 hub nodes + a leaf, on loopback) runs on
#      real nats-servers, and a service binary started with the environment of its rendered
#      unit becomes ready, creates R3 streams on the hub and R1 on the leaf, and exits 0 on
#      SIGTERM. Binaries come from CIM_BIN_DIR (default target/debug; build them first).
#
# Usage: nixos-modules/tests/check.sh [--live]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
live=false
[[ ${1:-} == --live ]] && live=true
fail=0
say() { printf '%s\n' "$*"; }
bad() { say "FAIL: $*"; fail=1; }

command -v nix-instantiate >/dev/null || { say "nix-instantiate not found (Debian: apt-get install nix-bin)"; exit 2; }

# 1. Parse.
files=$(cd "$repo" && { echo flake.nix; find nixos-modules containers -name '*.nix'; } | sort)
n=0
for f in $files; do
    if nix-instantiate --parse "$repo/$f" >/dev/null 2>"${TMPDIR:-/tmp}/cim-nix-parse.err"; then
        n=$((n + 1))
    else
        bad "parse $f"; cat "${TMPDIR:-/tmp}/cim-nix-parse.err"
    fi
done
say "parse: $n of $(echo "$files" | wc -w) files ok"

if [[ -z ${NIXPKGS_LIB:-} ]]; then
    say "NIXPKGS_LIB not set: skipping evaluation (point it at a nixpkgs lib/ directory)"
    exit $fail
fi

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# Stand-in package: bin/<name> for ExecStart= (real binaries for --live, else stubs).
bindir=${CIM_BIN_DIR:-$repo/target/debug}
mkdir -p "$work/pkg/bin"
for name in $(nix-instantiate --eval --json "$repo/nixos-modules/service-names.nix" | tr -d '[]"' | tr ',' ' ') cimctl; do
    if [[ -x $bindir/$name ]]; then
        ln -s "$bindir/$name" "$work/pkg/bin/$name"
    else
        printf '#!/bin/sh\nexit 0\n' >"$work/pkg/bin/$name"; chmod +x "$work/pkg/bin/$name"
    fi
done

evaluate() { # $1 = natsHasHostOption
    nix-instantiate --eval --strict --json \
        --arg lib "import $NIXPKGS_LIB" --arg pkgDir "\"$work/pkg\"" --arg natsHasHostOption "$1" \
        "$here/eval.nix"
}

# 2. Evaluate, render, verify.
evaluate false >"$work/eval.json" || { bad "evaluation"; exit 1; }
evaluate true >"$work/eval-host.json" || bad "evaluation with a services.nats.host option"
python3 - "$work" <<'EOF' || fail=1
import json, os, sys
work = sys.argv[1]
d = json.load(open(f"{work}/eval.json"))
h = json.load(open(f"{work}/eval-host.json"))
ok = True
if d["systems"] != h["systems"]:
    print("FAIL: output differs when services.nats has a `host` option"); ok = False
for name, system in d["systems"].items():
    out = f"{work}/out/{name}"
    os.makedirs(out, exist_ok=True)
    for unit, text in system["units"].items():
        if unit.startswith("cim-"):
            open(f"{out}/{unit}.service", "w").write(text)
    if system["nats"]:
        open(f"{out}/nats.conf", "w").write(system["nats"])
for case, refused in d["refused"].items():
    if not refused:
        print(f"FAIL: option check {case}"); ok = False
print(f"refusals: {sum(d['refused'].values())} of {len(d['refused'])} as expected")
f = d["flake"]
print("flake packages:", " ".join(sorted(f["packages"]["x86_64-linux"])))
print("flake nixosModules:", " ".join(f["nixosModules"]))
print("flake nixosConfigurations:", " ".join(f"{k}({len(v['units'])} units)" for k, v in sorted(f["nixosConfigurations"].items())))
print("flake checks:", " ".join(f["checks"]["x86_64-linux"]))
print("flake devShell:", " ".join(f["devShell"]))
sys.exit(0 if ok else 1)
EOF

if command -v systemd-analyze >/dev/null; then
    units=("$work"/out/*/cim-*.service)
    for u in "${units[@]}"; do
        msg=$(systemd-analyze verify --man=no "$u" 2>&1) || true
        [[ -z $msg ]] || bad "systemd-analyze verify ${u#"$work"/out/}: $msg"
    done
    say "systemd-analyze verify: ${#units[@]} units checked"
else
    say "systemd-analyze not found: units not verified"
fi

if command -v nats-server >/dev/null; then
    confs=("$work"/out/*/nats.conf)
    for c in "${confs[@]}"; do
        nats-server -c "$c" -t >/dev/null 2>&1 || bad "nats-server -t ${c#"$work"/out/}: $(nats-server -c "$c" -t 2>&1)"
    done
    say "nats-server -t: ${#confs[@]} configs checked"
else
    say "nats-server not found: nats configs not checked"
fi

if ! $live; then exit $fail; fi

# 3. Live: the example topology on loopback.
for b in registry; do [[ -x $bindir/$b ]] || { bad "--live needs $bindir/$b (cargo build -p $b)"; exit 1; }; done
nix-instantiate --eval --strict --json --arg lib "import $NIXPKGS_LIB" --arg pkgDir "\"$work/pkg\"" \
    --arg base "\"$work/live\"" "$here/live.nix" >"$work/live.json"
mkdir -p "$work/live"
field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]][sys.argv[3]])' "$work/live.json" "$1" "$2"; }
for s in node1 node2 node3 leaf; do
    field "$s" nats >"$work/live/$s.conf"
    nats-server -c "$work/live/$s.conf" >"$work/live/$s.log" 2>&1 &
    pids+=($!)
done
for s in node1 node2 node3 leaf; do
    m=$(field "$s" monitor)
    for _ in $(seq 60); do curl -fs "http://$m/healthz" >/dev/null && break; sleep 0.5; done
    curl -fs "http://$m/healthz" >/dev/null || bad "nats $s not healthy: $(tail -3 "$work/live/$s.log")"
done
leafs=$(curl -s "http://$(field leaf monitor)/leafz" | python3 -c 'import json,sys; print(json.load(sys.stdin)["leafnodes"])')
[[ $leafs == 1 ]] || bad "leaf not connected to the hub (leafnodes=$leafs)"
say "live: hub of 3 and leaf healthy, leaf connected"

for s in node1 leaf; do
    field "$s" registryUnit | sed -n 's/^Environment="\(.*\)"$/\1/p' >"$work/live/$s.env"
    mapfile -t envs <"$work/live/$s.env"
    unit_exec=$(field "$s" registryUnit | sed -n 's/^ExecStart=//p')
    env -i HOME="$work" "${envs[@]}" "$unit_exec" >"$work/live/$s-registry.log" 2>&1 &
    pid=$!
    http=$(field "$s" registryHttp)
    for _ in $(seq 60); do curl -fs "http://$http/readyz" >/dev/null && break; sleep 0.5; done
    curl -fs "http://$http/readyz" >/dev/null || bad "registry ($s) not ready: $(tail -3 "$work/live/$s-registry.log")"
    replicas=$(curl -s "http://$(field "$s" monitor)/jsz?streams=true&config=true" | python3 -c '
import json, sys
d = json.load(sys.stdin)
print(sorted({s["config"]["num_replicas"] for a in d.get("account_details", []) for s in a.get("stream_detail", [])}))')
    want=$([[ $s == leaf ]] && echo "[1]" || echo "[3]")
    [[ $replicas == "$want" ]] || bad "registry ($s): stream replicas $replicas, want $want"
    kill -TERM "$pid"
    rc=0; wait "$pid" || rc=$?
    [[ $rc == 0 ]] || bad "registry ($s) exited $rc on SIGTERM"
    say "live: registry on $s ready, streams R${want//[\[\]]/}, SIGTERM -> exit $rc"
done
exit $fail
