"""The Python tests' fixture: a nats-server of their own (a free port on loopback, a temporary
store directory, JetStream) and the real CIM service binaries from the workspace's
``target/debug`` (``cargo build --workspace --bins``; ``CIM_BIN_DIR`` points elsewhere), started
as ``integration-tests/tests/it/common.rs`` starts them, waited for until they answer describe
and ``/readyz``, and killed at the end (and when this process dies). Never the system NATS.

Waits are polls with generous deadlines (the machine may be loaded); nothing sleeps a fixed time.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import nats
import pytest

from cim import subjects as S
from cim.proto import runtime_pb2

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN_DIR = pathlib.Path(os.environ.get("CIM_BIN_DIR") or ROOT / "target" / "debug")
READY = 90.0


def _die_with_parent() -> None:
    """Child processes get SIGKILL when the test process dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary(name: str) -> pathlib.Path:
    p = BIN_DIR / name
    if not p.exists():
        pytest.fail(f"{p} is missing: build the binaries first with `cargo build --workspace --bins` (`cargo xtask test` does)")
    return p


async def eventually(check, what: str, timeout: float = 60.0):
    """Calls ``check`` (sync or async) until it returns a truthy value without raising; the
    last failure is reported when the deadline passes."""
    deadline = time.monotonic() + timeout
    pause = 0.05
    last: object = None
    while True:
        try:
            value = check()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
            last = f"returned {value!r}"
        except Exception as e:  # noqa: BLE001 - reported below
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s (last: {last})")
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.5)


class Proc:
    """A child process logging into a temporary file."""

    def __init__(self, argv: list[str], env: dict | None = None, name: str = "") -> None:
        self.argv = argv
        self.env = env
        self.name = name or pathlib.Path(argv[0]).name
        self.log = tempfile.NamedTemporaryFile(prefix=f"cim-py-{self.name}-", suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        env = dict(os.environ)
        env.update(self.env or {})
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, env=env, preexec_fn=_die_with_parent
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: a crash, nothing finished."""
        if self.running():
            self.proc.kill()
            self.proc.wait(30)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period."""
        if self.running():
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)

    def output(self) -> str:
        try:
            return pathlib.Path(self.log.name).read_text(errors="replace")[-20000:]
        except OSError:
            return ""


async def _quiet(e) -> None:
    """nats-py logs every failed connection attempt; a poll reports its own last failure."""


class NatsServer:
    def __init__(self, tmp: pathlib.Path) -> None:
        self.port = free_port()
        self.store = tmp / "jetstream"
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc = Proc(["nats-server", "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store)], name="nats-server")

    async def wait_ready(self) -> None:
        async def up():
            nc = await nats.connect(
                self.url, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False, error_cb=_quiet
            )
            try:
                await nc.jetstream().account_info()
            finally:
                await nc.close()
            return True

        try:
            await eventually(up, "nats-server ready", READY)
        except AssertionError as e:
            raise AssertionError(f"{e}\nlog:\n{self.proc.output()}") from None


class Service:
    """One CIM service binary against the fixture's NATS."""

    def __init__(self, name: str, component: str, url: str, args: list[str] = ()) -> None:
        self.name = name
        self.component = component
        argv = [str(binary(name)), "--nats-url", url, "--heartbeat-interval", "200ms", "--shutdown-grace", "5s", *args]
        self.proc = Proc(argv, env={"RUST_LOG": "info"}, name=name)

    async def wait_ready(self, nc) -> None:
        async def ready():
            msg = await nc.request(S.describe(self.component), b"", timeout=2)
            if msg.headers and msg.headers.get("Nats-Service-Error-Code"):
                raise RuntimeError(f"describe: {msg.headers}")
            d = runtime_pb2.DescribeReply()
            d.ParseFromString(msg.data)
            addr = d.service.http_addr
            with urllib.request.urlopen(f"http://{addr}/readyz", timeout=2) as r:
                return r.status == 200

        try:
            await eventually(ready, f"{self.name} ready", READY)
        except AssertionError as e:
            raise AssertionError(f"{e}\nlog of {self.name}:\n{self.proc.output()}") from None

    def kill(self) -> None:
        self.proc.kill()

    def stop(self) -> None:
        self.proc.stop()

    def restart(self) -> None:
        self.proc.stop()
        self.proc.start()


SERVICES = {
    "iu": "information-unit",
    "registry": "registry",
    "pipeline": "pipeline-engine",
    "plugin": "plugin-host",
}


class Cim:
    """A nats-server and the services a test module asks for."""

    def __init__(self, components: list[str]) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="cim-py-")
        self.nats = NatsServer(pathlib.Path(self.tmp.name))
        self.url = self.nats.url
        self.components = components
        self.services: dict[str, Service] = {}
        self.extra: list[Proc] = []

    async def start(self) -> "Cim":
        await self.nats.wait_ready()
        for c in self.components:
            self.services[c] = Service(SERVICES[c], c, self.url)
        nc = await nats.connect(self.url)
        try:
            for s in self.services.values():
                await s.wait_ready(nc)
        finally:
            await nc.close()
        return self

    async def restart(self, component: str) -> None:
        self.services[component].restart()
        await self.wait_ready(component)

    async def wait_ready(self, component: str) -> None:
        nc = await nats.connect(self.url)
        try:
            await self.services[component].wait_ready(nc)
        finally:
            await nc.close()

    def spawn(self, argv: list[str], env: dict | None = None, name: str = "") -> Proc:
        """Another process of the test (e.g. a plugin), killed with the fixture."""
        p = Proc(argv, env=env, name=name)
        self.extra.append(p)
        return p

    def close(self) -> None:
        for p in self.extra:
            p.kill()
        for s in self.services.values():
            s.kill()
        self.nats.proc.kill()
        self.tmp.cleanup()


def run(coro):
    """Runs a test's coroutine (the tests are plain functions: no asyncio plugin needed)."""
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def cim_iu():
    cim = Cim(["iu"])
    try:
        run(cim.start())
        yield cim
    finally:
        cim.close()


@pytest.fixture(scope="module")
def cim_pipelines():
    cim = Cim(["iu", "plugin", "pipeline"])
    try:
        run(cim.start())
        yield cim
    finally:
        cim.close()


PYTHON = sys.executable
