"""Python plugins under the plugin contract: the SDK's limits against a real nats-server, and
the shipped csv-stats pipeline through the real pipeline engine and plugin host, including the
plugin process killed in the middle of an invocation and started again, and bad input."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request

import nats
import pytest

from cim import Client, Output, Plugin, InvalidInput, PluginFailed, subjects
from cim import _subjects as T
from cim.envelope import Envelope
from cim.examples.csv_stats import summarize
from cim.proto import plugin_pb2 as pb

from conftest import PYTHON, ROOT, Cim, eventually, free_port, run


@pytest.fixture(scope="module")
def nats_only():
    cim = Cim([])
    try:
        run(cim.start())
        yield cim
    finally:
        cim.close()


async def invoke(nc, name: str, version: str, data: bytes = b"", timeout_ms: int = 0, metadata=None, raw: bytes | None = None, wait: float = 30):
    req = pb.InvokeRequest(input=data, timeout_ms=timeout_ms)
    req.metadata.update(metadata or {})
    msg = await nc.request(subjects.plugin_invoke(name, version), raw if raw is not None else req.SerializeToString(), timeout=wait)
    reply = pb.InvokeReply()
    reply.ParseFromString(msg.data)
    return reply, (msg.headers or {})


# ---- the SDK ----


def test_the_sdk_serves_the_contract_with_its_limits(nats_only):
    p = Plugin("py-limits", "0.1.0", capabilities=["test.limits"], timeout=5.0, max_output=1024, concurrency=2, queue=0)

    @p.handler
    def handle(data: bytes, metadata: dict[str, str]):
        what = metadata.get("do", "echo")
        if what == "echo":
            return Output(data, {"size": str(len(data))})
        if what == "sleep":
            time.sleep(float(metadata["seconds"]))
            return b"woke"
        if what == "big":
            return b"x" * 2048
        if what == "badmeta":
            return b"", {"n": 1}
        if what == "refuse":
            raise InvalidInput("Not what I expected:\n line 2")
        if what == "fail":
            raise PluginFailed("backend unreachable")
        if what == "own-timeout":
            raise TimeoutError("the database did not answer")
        raise ZeroDivisionError("division by zero")

    async def main():
        nc = await nats.connect(nats_only.url)
        announcements = []
        got = asyncio.Event()

        async def on_announce(msg):
            announcements.append(msg)
            got.set()

        await nc.subscribe(T.PLUGIN_ALL_ANNOUNCEMENTS, cb=on_announce)
        serving = await p.serve(nc, announce_ms=200)
        health = await serving.listen_health(f"127.0.0.1:{free_port()}")
        try:
            ok, headers = await invoke(nc, "py-limits", "0.1.0", b"hello")
            assert ok.status == pb.STATUS_OK and ok.output == b"hello" and ok.metadata["size"] == "5"
            assert (ok.plugin, ok.version, ok.runtime) == ("py-limits", "0.1.0", T.PLUGIN_RUNTIME_NATIVE)
            assert ok.digest.startswith("sha256:") and "Nats-Service-Error-Code" not in headers

            late, headers = await invoke(nc, "py-limits", "0.1.0", metadata={"do": "sleep", "seconds": "3"}, timeout_ms=300)
            assert late.status == pb.STATUS_DEADLINE_EXCEEDED and headers["Nats-Service-Error-Code"] == "504"
            assert "300 ms" in late.error.message

            big, headers = await invoke(nc, "py-limits", "0.1.0", metadata={"do": "big"})
            assert big.status == pb.STATUS_MALFORMED_OUTPUT and "2048 bytes" in big.error.message and big.output == b""
            meta, _ = await invoke(nc, "py-limits", "0.1.0", metadata={"do": "badmeta"})
            assert meta.status == pb.STATUS_MALFORMED_OUTPUT
            refused, headers = await invoke(nc, "py-limits", "0.1.0", metadata={"do": "refuse"})
            assert refused.status == pb.STATUS_INVALID_INPUT and headers["Nats-Service-Error-Code"] == "400"
            assert refused.error.message == "Not what I expected: line 2"  # one line
            failed, _ = await invoke(nc, "py-limits", "0.1.0", metadata={"do": "fail"})
            assert failed.status == pb.STATUS_PLUGIN_FAILED and failed.error.message == "backend unreachable"
            crashed, headers = await invoke(nc, "py-limits", "0.1.0", metadata={"do": "crash"})
            assert crashed.status == pb.STATUS_TRAPPED and "ZeroDivisionError" in crashed.error.message
            assert headers["Nats-Service-Error-Code"] == "500"
            # the handler's own TimeoutError is its crash, not the deadline
            own, _ = await invoke(nc, "py-limits", "0.1.0", metadata={"do": "own-timeout"})
            assert own.status == pb.STATUS_TRAPPED and "TimeoutError: the database did not answer" in own.error.message
            garbage, headers = await invoke(nc, "py-limits", "0.1.0", raw=b"\xff\xff\xff")
            assert garbage.status == pb.STATUS_BAD_REQUEST and "undecodable" in garbage.error.message

            # two slow ones hold both workers, nothing may queue: the third is refused, not lost
            slow = [asyncio.create_task(invoke(nc, "py-limits", "0.1.0", metadata={"do": "sleep", "seconds": "1.5"})) for _ in range(2)]
            await eventually(lambda: serving.in_flight == 2, "two invocations running", 30)
            busy, headers = await invoke(nc, "py-limits", "0.1.0")
            assert busy.status == pb.STATUS_UNAVAILABLE and headers["Nats-Service-Error-Code"] == "503"
            assert all(r.status == pb.STATUS_OK for r, _ in await asyncio.gather(*slow))

            await asyncio.wait_for(got.wait(), 30)
            a = announcements[-1]
            env = Envelope.from_headers(a.headers)
            assert env.type == "cim.plugin.announced" and env.is_root
            ann = pb.PluginAnnounced()
            ann.ParseFromString(a.data)
            assert (ann.name, ann.version, ann.runtime, ann.every_ms) == ("py-limits", "0.1.0", T.PLUGIN_RUNTIME_NATIVE, 200)
            assert ann.subject == subjects.plugin_invoke("py-limits", "0.1.0") and list(ann.capabilities) == ["test.limits"]

            def get(path):
                with urllib.request.urlopen(f"http://{health}{path}", timeout=5) as r:
                    return r.status, r.read().decode()

            # (in a thread: the health server runs on this event loop)
            assert (await asyncio.to_thread(get, "/livez"))[0] == 200
            assert (await asyncio.to_thread(get, "/readyz"))[0] == 200
            status, metrics = await asyncio.to_thread(get, "/metrics")
            assert 'status="STATUS_DEADLINE_EXCEEDED"} 1' in metrics and 'status="STATUS_OK"' in metrics
        finally:
            await serving.stop(grace=5)
            await nc.close()

    run(main())


def test_an_async_handler_is_cancelled_at_its_deadline():
    p = Plugin("py-async", "1.0.0", timeout=0.2)
    state = {"cancelled": False}

    @p.handler
    async def slow(data: bytes, metadata: dict[str, str]):
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            state["cancelled"] = True
            raise
        return b"never"

    async def main():
        reply = await p.invoke(pb.InvokeRequest(input=b"x").SerializeToString())
        assert reply.status == pb.STATUS_DEADLINE_EXCEEDED and "200 ms" in reply.error.message
        await eventually(lambda: state["cancelled"], "the handler is cancelled", 10)
        fast = await p.invoke(pb.InvokeRequest(input=b"x", timeout_ms=50).SerializeToString())
        assert fast.status == pb.STATUS_DEADLINE_EXCEEDED and "50 ms" in fast.error.message

    run(main())


def test_the_csv_summary_is_right_and_refuses_bad_tables():
    s = summarize("city;price;note\nOslo;1.5;\nRome;9;x\nOslo;1.5;\n")
    assert s["rows"] == 3
    city, price, note = s["columns"]
    assert city == {"name": "city", "count": 3, "missing": 0, "type": "text", "distinct": 2, "top": [["Oslo", 2], ["Rome", 1]]}
    assert (price["type"], price["min"], price["max"], price["mean"], price["median"], price["sum"]) == ("number", 1.5, 9.0, 4.0, 1.5, 12.0)
    assert (note["count"], note["missing"]) == (1, 2)
    for bad, why in [
        ("", "empty input"),
        ("a,b,c\n1,2,3\n1,2\n", "line 3: 2 cells, the header has 3"),
        ("a,a\n1,2\n", "column 'a' twice"),
        ("a,,c\n1,2,3\n", "empty column name"),
    ]:
        with pytest.raises(InvalidInput, match=why):
            summarize(bad)


# ---- the shipped pipeline, through the real services ----

PIPELINE = ROOT / "examples" / "pipelines" / "csv-stats.json"


def start_csv_plugin(cim, health_port: int):
    return cim.spawn(
        [PYTHON, "-m", "cim.examples.csv_stats", "--nats-url", cim.url, "--announce-ms", "300", "--health-listen", f"127.0.0.1:{health_port}"],
        name="csv-stats",
    )


async def wait_runs(c: Client, unit_id: str, what: str, done, timeout: float = 120):
    async def check():
        reply = await c.request_json(subjects.query("pipeline", "runs"), {"pipeline": "csv-stats", "unit_id": unit_id})
        runs = reply["runs"]
        return runs if runs and done(runs) else None

    return await eventually(check, what, timeout)


def table(rows: int) -> str:
    lines = ["region,units,price,product"]
    for i in range(rows):
        lines.append(f"{['north', 'south', 'east'][i % 3]},{i % 17},{(i * 7919) % 1000 / 10},p{i % 5}")
    return "\n".join(lines) + "\n"


def test_csv_stats_pipeline_runs_a_python_plugin_survives_its_crash_and_reports_bad_input(cim_pipelines):
    cim = cim_pipelines
    health = free_port()
    plugin = start_csv_plugin(cim, health)

    async def main():
        c = await Client.connect(cim.url, latest=True, timeout=30)
        try:
            # the plugin host hears the Python plugin announce itself, so the pipeline applies
            async def listed():
                msg = await c._request(subjects.query("plugin", "list"), pb.ListPlugins(name="csv-stats").SerializeToString(), 5)
                reply = pb.ListReply()
                reply.ParseFromString(msg.data)
                return [p for p in reply.plugins if p.version == "1.0.0" and p.state == "ready" and p.runtime == T.PLUGIN_RUNTIME_NATIVE]

            await eventually(listed, "the plugin host lists csv-stats@1.0.0", 90)
            with urllib.request.urlopen(f"http://127.0.0.1:{health}/readyz", timeout=5) as r:
                assert r.status == 200
            applied = await c.request_json(subjects.command("pipeline", "apply"), {"definition": json.loads(PIPELINE.read_text())})
            assert applied["name"] == "csv-stats" and applied["version"] >= 1

            # 1. a CSV unit gets its statistics, as a JSON unit linked to it
            text = table(500)
            content = await c.put_content(text.encode())
            unit = await c.create(content.cid, name="sales.csv", media_type="text/csv")
            runs = await wait_runs(c, unit.unit_id, "a completed run", lambda r: r[0]["state"] in ("completed", "failed"))
            assert runs[0]["state"] == "completed", runs[0]
            u = await c.get(unit.unit_id)
            assert (u.attributes["rows"], u.attributes["columns"]) == ("500", "4")
            links = await c.links(unit.unit_id)
            [summary_id] = [l.source for l in links.incoming if l.kind == "stats-of"]
            summary = await c.get(summary_id)
            assert summary.name == "sales.csv.stats.json" and summary.media_type == "application/json" and "csv-stats" in summary.tags
            assert json.loads(await c.get_bytes(summary.cid)) == summarize(text)

            # routed by the plugin host by capability, like any plugin
            routed = await c._request(
                subjects.command("plugin", "invoke"), pb.InvokeRequest(capability="table.stats", input=b"a,b\n1,x\n").SerializeToString(), 30
            )
            r = pb.InvokeReply()
            r.ParseFromString(routed.data)
            assert (r.status, r.plugin, r.runtime) == (pb.STATUS_OK, "csv-stats", T.PLUGIN_RUNTIME_NATIVE), r
            assert json.loads(r.output)["rows"] == 1

            # 2. the plugin dies holding an invocation: the step is retried and the restarted
            #    plugin finishes the run. Stopped first, it receives the request and cannot
            #    answer before it is killed, whatever the machine's load.
            nc = c.nc
            seen = asyncio.Event()

            async def spy(msg):
                seen.set()

            sub = await nc.subscribe(subjects.plugin_invoke("csv-stats", "1.0.0"), cb=spy)
            os.kill(plugin.pid, signal.SIGSTOP)
            crash_text = table(2000)
            crash_unit = await c.create((await c.put_content(crash_text.encode())).cid, name="crash.csv", media_type="text/csv")
            await asyncio.wait_for(seen.wait(), 120)
            plugin.kill()
            await sub.unsubscribe()
            plugin.start()
            runs = await wait_runs(c, crash_unit.unit_id, "the run after the crash", lambda r: r[0]["state"] in ("completed", "failed"), 180)
            run_info = runs[0]
            assert run_info["state"] == "completed", run_info
            detail = await c.request_json(subjects.query("pipeline", "run"), {"run_id": run_info["run_id"]})
            [stats_step] = [s for s in detail["steps"] if s["step"] == "stats"]
            assert stats_step["attempts"] >= 2, stats_step
            crash_links = await c.links(crash_unit.unit_id)
            [crash_summary] = [l.source for l in crash_links.incoming if l.kind == "stats-of"]
            assert json.loads(await c.get_bytes((await c.get(crash_summary)).cid))["rows"] == 2000

            # 3. bad input: the run fails with the plugin's reason, at once (no retries)
            bad = await c.create((await c.put_content(b"id,name,score\n1,ann,3\n2,bob\n")).cid, name="bad.csv", media_type="text/csv")
            runs = await wait_runs(c, bad.unit_id, "the failed run", lambda r: r[0]["state"] in ("completed", "failed"))
            assert runs[0]["state"] == "failed", runs[0]
            assert "invalid_input" in runs[0]["error"] and "line 3: 2 cells, the header has 3" in runs[0]["error"], runs[0]
            detail = await c.request_json(subjects.query("pipeline", "run"), {"run_id": runs[0]["run_id"]})
            [bad_step] = [s for s in detail["steps"] if s["step"] == "stats"]
            assert bad_step["attempts"] == 1, bad_step
            assert not [l for l in (await c.links(bad.unit_id)).incoming if l.kind == "stats-of"]

            # and straight to the plugin: bytes that are not text
            reply, headers = await invoke(nc, "csv-stats", "1.0.0", b"\xff\xfe\x00binary")
            assert reply.status == pb.STATUS_INVALID_INPUT and headers["Nats-Service-Error-Code"] == "400"
            assert reply.error.message.startswith("not utf-8 text")
        finally:
            await c.close()

    run(main())
