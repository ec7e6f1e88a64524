"""Native CIM plugins in Python: serve a plugin name and version under the same NATS contract
and limits as the Rust native plugins and the WebAssembly ones (``docs/plugins.md``), so a
pipeline step names a Python plugin exactly like any other (``"plugin": "name@version"``).

::

    from cim.plugin import Plugin, InvalidInput

    plugin = Plugin("word-count", "1.0.0", capabilities=["text.count"])

    @plugin.handler
    def count(data: bytes, metadata: dict[str, str]):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidInput(f"not utf-8 text: {e}")
        return str(len(text.split())).encode(), {"words": str(len(text.split()))}

    if __name__ == "__main__":
        plugin.main()   # --nats-url / CIM_NATS_URL, --announce-ms, --health-listen, ...

The contract, as served here:

- **Invoke**: queue-subscribed to the version's invoke subject with its queue group; every
  request is an ``InvokeRequest`` and gets an ``InvokeReply``, also on failure (with the
  ``Nats-Service-Error-Code`` / ``Nats-Service-Error`` headers). An undecodable request is
  ``STATUS_BAD_REQUEST``; :class:`InvalidInput` is ``STATUS_INVALID_INPUT``;
  :class:`PluginFailed` is ``STATUS_PLUGIN_FAILED``; any other exception is
  ``STATUS_TRAPPED`` (the plugin crashed), with the exception in one line.
- **Deadline**: the smaller of the caller's ``timeout_ms`` and the plugin's ``timeout``; past
  it the caller gets ``STATUS_DEADLINE_EXCEEDED``. A synchronous handler runs in a worker
  thread that Python cannot stop: it keeps its worker until it returns, so the plugin's
  ``concurrency`` bounds what runaway handlers can hold; an ``async def`` handler is cancelled.
- **Output bounds**: at most ``max_output`` bytes (8 MiB, as for WebAssembly plugins), at most
  256 metadata entries of UTF-8 strings; anything else is ``STATUS_MALFORMED_OUTPUT``.
- **Back-pressure**: ``concurrency`` invocations run at once and ``queue`` more wait; beyond
  that the answer is ``STATUS_UNAVAILABLE`` ("saturated"), as the plugin host does.
- **Announce**: a ``PluginAnnounced`` (runtime ``native``, the digest of the plugin's source
  file) with the CIM envelope, when serving starts and every ``announce_ms``.
- **Health**: with ``--health-listen ADDR`` an HTTP server answers ``/livez``, ``/readyz``
  (200 only while connected to NATS and subscribed) and ``/metrics`` (Prometheus text).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import inspect
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import nats

from . import _subjects as T
from . import subjects as S
from .envelope import Envelope
from .proto import plugin_pb2 as pb

#: Output bounds, as for WebAssembly plugins (docs/plugins.md).
MAX_OUTPUT = 8 * 1024 * 1024
MAX_METADATA = 256
_ANNOUNCED = "PluginAnnounced"

_CODES = {
    pb.STATUS_BAD_REQUEST: "400",
    pb.STATUS_NOT_FOUND: "404",
    pb.STATUS_INVALID_INPUT: "400",
    pb.STATUS_PLUGIN_FAILED: "500",
    pb.STATUS_TRAPPED: "500",
    pb.STATUS_OUT_OF_FUEL: "500",
    pb.STATUS_DEADLINE_EXCEEDED: "504",
    pb.STATUS_OUT_OF_MEMORY: "500",
    pb.STATUS_MALFORMED_OUTPUT: "500",
    pb.STATUS_UNAVAILABLE: "503",
}


class InvalidInput(Exception):
    """The plugin looked at the input and refused it (``STATUS_INVALID_INPUT``)."""


class PluginFailed(Exception):
    """The plugin failed in a way of its own (``STATUS_PLUGIN_FAILED``)."""


@dataclass
class Output:
    """What a handler may return (or just ``bytes``, or ``(bytes, metadata)``)."""

    data: bytes = b""
    metadata: dict[str, str] = field(default_factory=dict)


def _one_line(text: str) -> str:
    line = " ".join(str(text).split())
    return line[:1000]


def _announce_type() -> tuple[str, int]:
    for type_name, (module, message, version) in T.PAYLOADS.items():
        if module == "plugin_pb2" and message == _ANNOUNCED:
            return type_name, version
    raise RuntimeError("the generated table has no PluginAnnounced payload")


class Plugin:
    """One plugin version and its handler."""

    def __init__(
        self,
        name: str,
        version: str,
        *,
        capabilities: list[str] | tuple[str, ...] = (),
        description: str = "",
        timeout: float = 30.0,
        max_output: int = MAX_OUTPUT,
        concurrency: int = 4,
        queue: int = 16,
    ) -> None:
        self.name = S.plugin_name(name)
        self.version = S.plugin_version(version)
        self.capabilities = list(capabilities)
        self.description = description
        self.timeout = timeout
        self.max_output = max_output
        self.concurrency = max(1, concurrency)
        self.queue = max(0, queue)
        self.digest = ""
        self._handler: Callable[..., Any] | None = None
        # set while serving (bounded worker threads); None: asyncio's default executor
        self._executor = None

    def handler(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Registers ``fn(data: bytes, metadata: dict) -> bytes | (bytes, dict) | Output``
        (plain or ``async def``). The plugin's digest is that of ``fn``'s source file."""
        self._handler = fn
        try:
            source = inspect.getsourcefile(fn)
            with open(source, "rb") as f:
                self.digest = "sha256:" + hashlib.sha256(f.read()).hexdigest()
        except (TypeError, OSError):
            self.digest = ""
        return fn

    @property
    def reference(self) -> str:
        return f"{self.name}@{self.version}"

    # ---- one invocation (pure apart from the handler) ----

    async def invoke(self, raw: bytes) -> pb.InvokeReply:
        """Answers one raw ``InvokeRequest``."""
        started = time.perf_counter()
        req = pb.InvokeRequest()
        try:
            req.ParseFromString(raw)
        except Exception as e:
            return self._fail(pb.STATUS_BAD_REQUEST, f"undecodable invoke request: {e}", started)
        if self._handler is None:
            return self._fail(pb.STATUS_UNAVAILABLE, "no handler registered", started)
        deadline = self.timeout
        if req.timeout_ms:
            deadline = min(deadline, req.timeout_ms / 1000.0)
        metadata = dict(req.metadata)
        try:
            if inspect.iscoroutinefunction(self._handler):
                running = asyncio.ensure_future(self._handler(req.input, metadata))
            else:
                loop = asyncio.get_running_loop()
                running = loop.run_in_executor(self._executor, self._handler, req.input, metadata)
            # asyncio.wait leaves a worker thread's future alone when the deadline passes
            done, _ = await asyncio.wait((running,), timeout=deadline)
            if not done:
                running.cancel()  # cancels a coroutine; a thread runs on, holding its worker
                return self._fail(pb.STATUS_DEADLINE_EXCEEDED, f"did not finish within {deadline * 1000:.0f} ms", started)
            result = running.result()
        except InvalidInput as e:
            return self._fail(pb.STATUS_INVALID_INPUT, _one_line(str(e)) or "invalid input", started)
        except PluginFailed as e:
            return self._fail(pb.STATUS_PLUGIN_FAILED, _one_line(str(e)) or "plugin failed", started)
        except Exception as e:
            return self._fail(pb.STATUS_TRAPPED, _one_line(f"plugin raised {type(e).__name__}: {e}"), started)
        return self._ok(result, started)

    def _reply(self, status: int, started: float) -> pb.InvokeReply:
        return pb.InvokeReply(
            status=status,
            plugin=self.name,
            version=self.version,
            digest=self.digest,
            runtime=T.PLUGIN_RUNTIME_NATIVE,
            duration_us=int((time.perf_counter() - started) * 1e6),
        )

    def _fail(self, status: int, message: str, started: float) -> pb.InvokeReply:
        r = self._reply(status, started)
        r.error.status = status
        r.error.message = message
        return r

    def _ok(self, result: Any, started: float) -> pb.InvokeReply:
        if isinstance(result, Output):
            data, meta = result.data, result.metadata
        elif isinstance(result, tuple) and len(result) == 2:
            data, meta = result
        else:
            data, meta = result, {}
        if isinstance(data, str):
            data = data.encode("utf-8")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            return self._fail(pb.STATUS_MALFORMED_OUTPUT, f"output is a {type(data).__name__}, not bytes", started)
        data = bytes(data)
        if len(data) > self.max_output:
            return self._fail(
                pb.STATUS_MALFORMED_OUTPUT, f"output of {len(data)} bytes is larger than the limit of {self.max_output}", started
            )
        if not isinstance(meta, dict):
            return self._fail(pb.STATUS_MALFORMED_OUTPUT, f"metadata is a {type(meta).__name__}, not a dict", started)
        if len(meta) > MAX_METADATA:
            return self._fail(pb.STATUS_MALFORMED_OUTPUT, f"{len(meta)} metadata entries, at most {MAX_METADATA}", started)
        for k, v in meta.items():
            if not isinstance(k, str) or not isinstance(v, str):
                return self._fail(pb.STATUS_MALFORMED_OUTPUT, f"metadata entry {k!r} is not a string pair", started)
        r = self._reply(pb.STATUS_OK, started)
        r.output = data
        r.metadata.update(meta)
        return r

    # ---- serving ----

    async def serve(self, nc, *, announce_ms: int = 5000, instance_id: str | None = None) -> "Serving":
        """Serves on an open NATS connection until :meth:`Serving.stop`."""
        if self._handler is None:
            raise RuntimeError(f"plugin {self.reference} has no handler: decorate one with @plugin.handler")
        s = Serving(self, nc, announce_ms, instance_id or f"{self.name}-{uuid.uuid4().hex}")
        await s.start()
        return s

    def main(self, argv: list[str] | None = None) -> None:
        """Command line: connect, serve until SIGTERM/SIGINT, then finish in-flight work."""
        p = argparse.ArgumentParser(description=f"CIM plugin {self.reference}: {self.description}")
        p.add_argument("--nats-url", default=os.environ.get("CIM_NATS_URL", "nats://127.0.0.1:4222"), help="NATS URL(s), comma-separated (CIM_NATS_URL)")
        p.add_argument("--nats-creds", default=os.environ.get("CIM_NATS_CREDS"), help="NATS credentials file (CIM_NATS_CREDS)")
        p.add_argument("--announce-ms", type=int, default=int(os.environ.get("CIM_PLUGIN_ANNOUNCE_MS", "5000")), help="announcement period (CIM_PLUGIN_ANNOUNCE_MS)")
        p.add_argument("--health-listen", default=os.environ.get("CIM_PLUGIN_HEALTH_LISTEN"), help="HOST:PORT of /livez, /readyz, /metrics (CIM_PLUGIN_HEALTH_LISTEN)")
        p.add_argument("--shutdown-grace", type=float, default=5.0, help="seconds to finish in-flight work on SIGTERM")
        args = p.parse_args(argv)
        try:
            asyncio.run(self._main(args))
        except KeyboardInterrupt:
            pass

    async def _main(self, args) -> None:
        servers = [u.strip() for u in args.nats_url.split(",") if u.strip()]
        opts: dict[str, Any] = {
            "servers": servers,
            "name": f"plugin/{self.reference}",
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5,
            "allow_reconnect": True,
        }
        if args.nats_creds:
            opts["user_credentials"] = args.nats_creds
        while True:
            try:
                nc = await nats.connect(**opts)
                break
            except Exception as e:
                print(f"plugin {self.reference}: cannot connect to {args.nats_url} ({e}); retrying", file=sys.stderr)
                await asyncio.sleep(1.0)
        serving = await self.serve(nc, announce_ms=args.announce_ms)
        health = None
        if args.health_listen:
            health = await serving.listen_health(args.health_listen)
        print(f"plugin {self.reference}: serving {serving.subject}" + (f", health on http://{health}" if health else ""), file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await serving.stop(grace=args.shutdown_grace)
        await nc.drain()


class Serving:
    """A plugin being served on a connection."""

    def __init__(self, plugin: Plugin, nc, announce_ms: int, instance_id: str) -> None:
        self.plugin = plugin
        self.nc = nc
        self.announce_ms = max(100, int(announce_ms))
        self.instance_id = instance_id
        self.subject = S.plugin_invoke(plugin.name, plugin.version)
        self.counts: dict[str, int] = {}
        self.in_flight = 0
        self._sub = None
        self._tasks: set[asyncio.Task] = set()
        self._announcer: asyncio.Task | None = None
        self._health = None
        self._slots = asyncio.Semaphore(plugin.concurrency)
        self._waiting = 0
        from concurrent.futures import ThreadPoolExecutor

        plugin._executor = ThreadPoolExecutor(max_workers=plugin.concurrency, thread_name_prefix=f"plugin-{plugin.name}")

    async def start(self) -> None:
        group = S.plugin_queue_group(self.plugin.name, self.plugin.version)
        self._sub = await self.nc.subscribe(self.subject, queue=group, cb=self._on_request)
        await self.nc.flush()
        await self.announce()
        self._announcer = asyncio.create_task(self._announce_loop())

    def announcement(self) -> pb.PluginAnnounced:
        p = self.plugin
        return pb.PluginAnnounced(
            name=p.name,
            version=p.version,
            digest=p.digest,
            capabilities=p.capabilities,
            runtime=T.PLUGIN_RUNTIME_NATIVE,
            subject=self.subject,
            instance_id=self.instance_id,
            description=p.description,
            every_ms=self.announce_ms,
        )

    async def announce(self) -> None:
        type_name, version = _announce_type()
        env = Envelope.root(type_name, version, f"/native/{self.instance_id}")
        await self.nc.publish(
            S.plugin_announce(self.plugin.name, self.plugin.version),
            self.announcement().SerializeToString(),
            headers=env.headers(),
        )

    async def _announce_loop(self) -> None:
        while True:
            await asyncio.sleep(self.announce_ms / 1000.0)
            try:
                if self.nc.is_connected:
                    await self.announce()
            except Exception as e:  # a reconnect in progress: the next period tries again
                print(f"plugin {self.plugin.reference}: announce failed: {e}", file=sys.stderr)

    async def _on_request(self, msg) -> None:
        task = asyncio.create_task(self._handle(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, msg) -> None:
        started = time.perf_counter()
        if self._slots.locked() and self._waiting >= self.plugin.queue:
            reply = self.plugin._fail(pb.STATUS_UNAVAILABLE, f"saturated: {self.plugin.concurrency} running and {self._waiting} queued; retry later", started)
        else:
            self._waiting += 1
            async with self._slots:
                self._waiting -= 1
                self.in_flight += 1
                try:
                    reply = await self.plugin.invoke(msg.data)
                finally:
                    self.in_flight -= 1
        name = pb.Status.Name(reply.status)
        self.counts[name] = self.counts.get(name, 0) + 1
        if not msg.reply:
            return
        headers = None
        if reply.status != pb.STATUS_OK:
            headers = {"Nats-Service-Error-Code": _CODES.get(reply.status, "500"), "Nats-Service-Error": reply.error.message}
        try:
            await self.nc.publish(msg.reply, reply.SerializeToString(), headers=headers)
        except Exception as e:
            print(f"plugin {self.plugin.reference}: reply failed: {e}", file=sys.stderr)

    @property
    def ready(self) -> bool:
        return self._sub is not None and self.nc.is_connected

    async def stop(self, grace: float = 5.0) -> None:
        """Stops taking requests, finishes those in flight within ``grace`` seconds."""
        if self._announcer:
            self._announcer.cancel()
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:
                pass
            self._sub = None
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        if self._health is not None:
            self._health.close()
        self.plugin._executor.shutdown(wait=False, cancel_futures=True)

    # ---- health over HTTP (stdlib only) ----

    async def listen_health(self, addr: str) -> str:
        host, _, port = addr.rpartition(":")
        self._health = await asyncio.start_server(self._on_http, host or "127.0.0.1", int(port))
        h, p = self._health.sockets[0].getsockname()[:2]
        return f"{h}:{p}"

    async def _on_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = (await asyncio.wait_for(reader.readline(), 5)).decode("latin-1").split()
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            path = line[1] if len(line) > 1 else "/"
            if path == "/livez":
                status, body = 200, "ok\n"
            elif path == "/readyz":
                status, body = (200, "ready\n") if self.ready else (503, "not ready: not connected or not subscribed\n")
            elif path == "/metrics":
                status, body = 200, self.metrics()
            else:
                status, body = 404, "not found\n"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            data = body.encode()
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {len(data)}\r\nconnection: close\r\n\r\n".encode() + data
            )
            await writer.drain()
        except Exception:
            pass
        finally:
            writer.close()

    def metrics(self) -> str:
        labels = f'plugin="{self.plugin.name}",version="{self.plugin.version}"'
        lines = ["# TYPE cim_plugin_invocations_total counter"]
        for status, n in sorted(self.counts.items()):
            lines.append(f'cim_plugin_invocations_total{{{labels},status="{status}"}} {n}')
        lines.append("# TYPE cim_plugin_in_flight gauge")
        lines.append(f"cim_plugin_in_flight{{{labels}}} {self.in_flight}")
        return "\n".join(lines) + "\n"
