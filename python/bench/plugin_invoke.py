"""Benchmark: a Python plugin invocation against the same invocation of the Rust native plugin.

Both plugins do the same work — the SHA-256 of the input, as hex, with ``sha256`` and ``size``
metadata — behind the same contract: the Rust one is ``plugin-native-example`` (its own process),
the Python one is served by :class:`cim.plugin.Plugin` (its own process, started by this
script), once with a plain handler (run in a worker thread) and once with an ``async def`` one. A third responder, a bare nats-py request/reply echo without the SDK, separates the
cost of Python's NATS client from the SDK's. The client is the same for all (nats-py, one
connection), on a nats-server of the benchmark's own. Reported: the median and p99 latency of
sequential invocations and the throughput with 16 in flight, per input size, and the ratio
Python / Rust (ratios, because absolute figures drift on shared machines).

    python bench/plugin_invoke.py [--rounds 2000] [--bin-dir target/release]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import nats

HERE = pathlib.Path(__file__).resolve()
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT / "python"))

from cim import Output, Plugin, subjects  # noqa: E402
from cim.proto import plugin_pb2 as pb  # noqa: E402

PY_NAME, PY_ASYNC_NAME, RUST_NAME, ECHO_NAME, VERSION = "sha256-py", "sha256-py-async", "sha256", "echo-py", "1.0.0"

plugin = Plugin(PY_NAME, VERSION, capabilities=["checksum.sha256"], description="sha-256 digest of the input, as hex")


@plugin.handler
def sha256(data: bytes, metadata: dict[str, str]) -> Output:
    hexdigest = hashlib.sha256(data).hexdigest()
    return Output(hexdigest.encode(), {"sha256": hexdigest, "size": str(len(data))})


async_plugin = Plugin(PY_ASYNC_NAME, VERSION, capabilities=["checksum.sha256"], description="sha-256 digest of the input, as hex")


@async_plugin.handler
async def sha256_async(data: bytes, metadata: dict[str, str]) -> Output:
    """The same work in an ``async def`` handler: it runs on the event loop, no thread hop."""
    return sha256(data, metadata)


async def echo_server(url: str) -> None:
    """The baseline: decode, hash, encode, reply, with nats-py alone (no SDK)."""
    nc = await nats.connect(url)

    async def on(msg):
        req = pb.InvokeRequest()
        req.ParseFromString(msg.data)
        h = hashlib.sha256(req.input).hexdigest()
        r = pb.InvokeReply(status=pb.STATUS_OK, output=h.encode())
        r.metadata.update({"sha256": h, "size": str(len(req.input))})
        await msg.respond(r.SerializeToString())

    await nc.subscribe(subjects.plugin_invoke(ECHO_NAME, VERSION), queue=subjects.plugin_queue_group(ECHO_NAME, VERSION), cb=on)
    await asyncio.Event().wait()


async def _quiet(e) -> None:
    """Failed connection attempts while the server starts are expected."""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_answers(nc, name: str) -> None:
    req = pb.InvokeRequest(input=b"x").SerializeToString()
    deadline = time.monotonic() + 60
    while True:
        try:
            await nc.request(subjects.plugin_invoke(name, VERSION), req, timeout=2)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def measure(nc, name: str, data: bytes, rounds: int) -> dict:
    subject = subjects.plugin_invoke(name, VERSION)
    req = pb.InvokeRequest(input=data).SerializeToString()
    expect = hashlib.sha256(data).hexdigest().encode()
    for _ in range(min(100, rounds)):  # warm up
        await nc.request(subject, req, timeout=10)
    lat = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        msg = await nc.request(subject, req, timeout=10)
        lat.append(time.perf_counter() - t0)
        r = pb.InvokeReply()
        r.ParseFromString(msg.data)
        assert r.status == pb.STATUS_OK and r.output == expect, (name, r.status, r.error.message)
    inflight = 16
    total = rounds
    sem = asyncio.Semaphore(inflight)

    async def one():
        async with sem:
            await nc.request(subject, req, timeout=30)

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(total)))
    elapsed = time.perf_counter() - t0
    lat.sort()
    return {"median_us": statistics.median(lat) * 1e6, "p99_us": lat[int(len(lat) * 0.99) - 1] * 1e6, "per_s": total / elapsed}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--bin-dir", default=str(ROOT / "target" / "release"))
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="cim-bench-py-")
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    procs = [subprocess.Popen(["nats-server", "-a", "127.0.0.1", "-p", str(port), "-sd", tmp.name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        await asyncio.sleep(0)
        deadline = time.monotonic() + 30
        while True:
            try:
                nc = await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, error_cb=_quiet)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        rust = pathlib.Path(args.bin_dir) / "plugin-native-example"
        procs.append(subprocess.Popen([str(rust), "--nats-url", url, "--name", RUST_NAME, "--plugin-version", VERSION], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen([sys.executable, str(HERE), "--serve", url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen([sys.executable, str(HERE), "--serve-async", url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen([sys.executable, str(HERE), "--echo", url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        names = (RUST_NAME, PY_NAME, PY_ASYNC_NAME, ECHO_NAME)
        for name in names:
            await wait_answers(nc, name)
        print(f"plugin invocation, {args.rounds} sequential + {args.rounds} with 16 in flight; client nats-py; {rust.parent.name} Rust build")
        print("| input | plugin | median µs | p99 µs | invocations/s (16 in flight) | median ratio to Rust | throughput ratio to Rust |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for size in (1024, 256 * 1024):
            data = os.urandom(size)
            results = {n: await measure(nc, n, data, args.rounds) for n in names}
            base = results[RUST_NAME]
            label = {
                RUST_NAME: "Rust native (plugin-native-example)",
                PY_NAME: "Python, cim.plugin SDK, plain handler (worker thread)",
                PY_ASYNC_NAME: "Python, cim.plugin SDK, async def handler",
                ECHO_NAME: "Python, bare nats-py responder (no SDK)",
            }
            for n, r in results.items():
                print(
                    f"| {size // 1024} KiB | {label[n]} | {r['median_us']:.0f} | {r['p99_us']:.0f} | {r['per_s']:.0f} "
                    f"| {r['median_us'] / base['median_us']:.2f} | {r['per_s'] / base['per_s']:.2f} |"
                )
        await nc.close()
    finally:
        for p in procs[1:] + procs[:1]:
            p.kill()
            p.wait()
        tmp.cleanup()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        plugin.main(["--nats-url", sys.argv[2]])
    elif len(sys.argv) == 3 and sys.argv[1] == "--serve-async":
        async_plugin.main(["--nats-url", sys.argv[2]])
    elif len(sys.argv) == 3 and sys.argv[1] == "--echo":
        asyncio.run(echo_server(sys.argv[2]))
    else:
        asyncio.run(main())
