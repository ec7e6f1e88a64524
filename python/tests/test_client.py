"""The client against a real information-unit service: content round trips (100 MiB, bounded
memory, and with the Rust client both ways), commands with conflicts and idempotent retries,
queries, and following events across a service restart."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import resource
import subprocess
import tempfile
import time

import pytest

from cim import Client, cid, errors, subjects
from cim import _subjects as T
from cim.proto import iu_pb2

from conftest import binary, eventually, run

MiB = 1024 * 1024


# ---- no server ----


def test_cids_are_those_of_cim_events():
    # the vectors of crates/cim-events/src/cid.rs
    assert cid.of(b"") == "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
    assert cid.of(b"hello world") == "bafkreifzjut3te2nhyekklss27nh3k72ysco7y32koao5eei66wof36n5e"
    c = cid.of(b"x")
    assert cid.from_object_digest(cid.to_object_digest(c)) == c
    for bad in ["", "b", "Bafk", "zabc", "bafkrei!", "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"]:
        with pytest.raises(errors.BadRequest):
            cid.digest(bad)


def test_subjects_come_from_the_table_and_check_tokens():
    assert subjects.unit_event("u1", "created") == T.IU_UNIT_EVENT.format(unit_id="u1", action="created")
    assert subjects.version_token("1.2.0") == "1_2_0"
    assert subjects.plugin_invoke("csv-stats", "1.0.0").endswith(".csv-stats.1_0_0.invoke")
    for bad in ["", "a.b", "*", ">", "a b"]:
        with pytest.raises(errors.BadRequest):
            subjects.unit_event(bad, "created")
    for bad in ["Bad", "-x", "a_b"]:
        with pytest.raises(errors.BadRequest):
            subjects.plugin_invoke(bad, "1.0.0")
    with pytest.raises(errors.BadRequest):
        subjects.plugin_invoke("ok", "1..0")


def test_error_codes_map_like_the_rust_client():
    assert isinstance(errors.from_code("409", "stale"), errors.Conflict)
    assert isinstance(errors.from_code("412", "stale"), errors.Conflict)
    assert isinstance(errors.from_code("404", "x"), errors.NotFound)
    assert isinstance(errors.from_code("422", "x"), errors.BadRequest)
    assert isinstance(errors.from_code("413", "x"), errors.BadRequest)
    assert isinstance(errors.from_code("503", "x"), errors.Unavailable)
    assert isinstance(errors.from_code("abc", "x"), errors.Internal)
    assert errors.from_headers({"Nats-Service-Error-Code": "409", "Nats-Service-Error": "expected 3"}).args[0] == "expected 3"
    assert errors.from_headers({}) is None


# ---- content ----


class Generated:
    """A file-like source of ``size`` pseudo-random bytes, made as they are read (never held)."""

    def __init__(self, size: int, seed: int) -> None:
        self.left = size
        self.rng = random.Random(seed)
        self.hash = cid.Hasher()

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        block = self.rng.randbytes(n)
        self.left -= n
        self.hash.update(block)
        return block


class HashingSink:
    def __init__(self) -> None:
        self.hash = cid.Hasher()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return len(data)


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_content_round_trip_of_100_mib_in_bounded_memory(cim_iu):
    async def main():
        c = await Client.connect(cim_iu.url, commit_timeout=180, timeout=60)
        try:
            before = max_rss_mib()
            src = Generated(100 * MiB, seed=20)
            t0 = time.monotonic()
            committed = await c.put_content(src)
            put_s = time.monotonic() - t0
            assert committed.cid == src.hash.cid()
            assert committed.size == 100 * MiB
            sink = HashingSink()
            t0 = time.monotonic()
            read = await c.get_content(committed.cid, sink)
            get_s = time.monotonic() - t0
            assert (read.size, read.written, sink.size) == (100 * MiB, 100 * MiB, 100 * MiB)
            assert sink.hash.cid() == committed.cid
            grown = max_rss_mib() - before
            print(f"100 MiB: put {put_s:.1f}s ({100 / put_s:.0f} MiB/s), get {get_s:.1f}s ({100 / get_s:.0f} MiB/s), peak RSS grew {grown:.1f} MiB")
            # the content is 100 MiB; a client holding it would grow by at least that
            assert grown < 40, f"peak RSS grew by {grown:.1f} MiB"
            # a range, and the same bytes again: stored once
            part = await c.get_bytes(committed.cid, range=(5 * MiB + 3, 5 * MiB + 1003))
            assert len(part) == 1000
            again = await c.put_content(b"small")
            assert (await c.put_content(b"small")).deduplicated
            assert await c.get_bytes(again.cid) == b"small"
        finally:
            await c.close()

    run(main())


def test_bad_content_requests_are_typed_errors(cim_iu):
    async def main():
        c = await Client.connect(cim_iu.url, timeout=10)
        try:
            with pytest.raises(errors.BadRequest):
                await c.get_bytes("not-a-cid")
            with pytest.raises(errors.NotFound):
                await c.get_bytes(cid.of(b"never stored " + os.urandom(8)))
            stored = await c.put_content(b"range test")
            with pytest.raises(errors.BadRequest):
                await c.get_bytes(stored.cid, range=(5, 500))
            with pytest.raises(errors.BadRequest):
                await c.create("bafkreinotacid")
            with pytest.raises(errors.NotFound):
                await c.get(str(__import__("uuid").uuid4()))
        finally:
            await c.close()

    run(main())


def test_bytes_that_do_not_match_their_cid_are_refused_and_reported(cim_iu):
    async def main():
        c = await Client.connect(cim_iu.url, timeout=10)
        try:
            # an object named by the CID of other bytes, written behind the service's back
            claimed = cid.of(b"what the name promises")
            nuid = os.urandom(8).hex()
            await c.js.publish(subjects.object_chunks(T.IU_CONTENT_BUCKET, nuid), b"something else entirely")
            meta = {
                "name": claimed, "bucket": T.IU_CONTENT_BUCKET, "nuid": nuid, "size": 23, "chunks": 1,
                "digest": cid.to_object_digest(claimed), "metadata": {},
            }
            await c.js.publish(subjects.object_meta(T.IU_CONTENT_BUCKET, claimed), json.dumps(meta).encode(), headers={"Nats-Rollup": "sub"})
            reported = []

            async def on_event(msg):
                reported.append(msg)

            sub = await c.nc.subscribe(T.IU_CONTENT_EVENT.format(cid=claimed, action="corrupted"), cb=on_event)
            with pytest.raises(errors.Corrupt) as e:
                await c.get_bytes(claimed)
            assert e.value.cid == claimed and "do not match" in e.value.detail
            await eventually(lambda: reported, "the corruption is recorded as an event", 30)
            await sub.unsubscribe()
        finally:
            await c.close()

    run(main())


def cimctl(cim, *args: str) -> str:
    out = subprocess.run(
        [str(binary("cimctl")), *args],
        env={**os.environ, "CIM_NATS_URL": cim.url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, f"cimctl {' '.join(args)}: {out.stderr}"
    return out.stdout


def test_units_put_from_python_read_from_rust_and_back(cim_iu):
    async def main():
        c = await Client.connect(cim_iu.url, latest=True)
        try:
            data = os.urandom(3 * MiB + 17)  # several chunks and a short last one
            committed, created = await c.put_file(_tmp_file(data, ".bin"), name="from-python.bin", tags=["py"])
            with tempfile.TemporaryDirectory() as d:
                out = os.path.join(d, "copy.bin")
                cimctl(cim_iu, "iu", "get", created.unit_id, "-o", out)
                with open(out, "rb") as f:
                    assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
            rust_data = os.urandom(2 * MiB + 5)
            put = json.loads(cimctl(cim_iu, "iu", "--json", "put", _tmp_file(rust_data, ".dat"), "--tag", "rust"))
            unit_id = put["result"]["unit_id"]
            unit = await c.get(unit_id)
            assert "rust" in unit.tags
            assert unit.cid == cid.of(rust_data)
            assert await c.get_bytes(unit.cid) == rust_data
        finally:
            await c.close()

    run(main())


def _tmp_file(data: bytes, suffix: str) -> str:
    f = tempfile.NamedTemporaryFile(suffix=suffix, delete=False)
    f.write(data)
    f.close()
    return f.name


# ---- commands ----


def test_commands_with_conflicts_and_idempotent_retries(cim_iu):
    async def main():
        c = await Client.connect(cim_iu.url)
        other = await Client.connect(cim_iu.url)  # another process retrying with the same id
        try:
            content = await c.put_content(b"version one")
            rid = "py-create-" + os.urandom(6).hex()
            first = await c.create(content.cid, name="doc.txt", media_type="text/plain", tags=["draft"], attributes={"author": "ann"}, request_id=rid)
            assert first.version == 1 and not first.replayed
            retry = await other.create(content.cid, name="doc.txt", media_type="text/plain", tags=["draft"], attributes={"author": "ann"}, request_id=rid)
            assert retry.unit_id == first.unit_id and retry.replayed and retry.version == 1

            tagged = await c.tag(first.unit_id, ["reviewed"], expected_version=1)
            assert tagged.version == 2
            with pytest.raises(errors.Conflict):
                await c.tag(first.unit_id, ["late"], expected_version=1)
            v2 = await c.put_content(b"version two")
            versioned = await c.new_version(first.unit_id, v2.cid, expected_version=2)
            assert versioned.version == 3
            with pytest.raises(errors.Conflict):
                await c.new_version(first.unit_id, v2.cid, expected_version=2)

            target = await c.create((await c.put_content(b"target")).cid, name="target.txt")
            await c.link(first.unit_id, "derived-from", target.unit_id)
            unit = await c.get(first.unit_id)
            assert unit.version == 4 and unit.cid == v2.cid
            assert sorted(unit.tags) == ["draft", "reviewed"]
            assert [(l.kind, l.target) for l in unit.links] == [("derived-from", target.unit_id)]
            assert [v.cid for v in unit.versions] == [content.cid, v2.cid]
            old = await c.get(first.unit_id, at_version=1)
            assert old.cid == content.cid and old.version == 1
            links = await c.links(target.unit_id)
            assert [(l.kind, l.source) for l in links.incoming] == [("derived-from", first.unit_id)]
            history = await c.history(first.unit_id)
            assert [e.version for e in history.entries] == [1, 2, 3, 4]

            found = [u.unit_id async for u in c.list_all(tag="reviewed")]
            assert first.unit_id in found and target.unit_id not in found
            page = await c.list(name_prefix="doc", page_size=1)
            assert len(page.units) <= 1

            # unit types: attributes checked against the type's schema (docs/information-units.md)
            schema = json.dumps({"attributes": {"pages": {"type": "integer", "min": 1, "required": True}}})
            await c.register_type("py-report", schema)
            assert (await c.get_type("py-report")).name == "py-report"
            assert (await c.validate("py-report", {"pages": "12"})).valid
            bad = await c.validate("py-report", {})
            assert not bad.valid and bad.problems
            with pytest.raises(errors.BadRequest):
                await c.create(content.cid, name="typed", unit_type="py-report", attributes={})
            status = await c.status()
            assert status.stream_last_sequence >= unit.sequence

            with pytest.raises(errors.BadRequest):
                await c.tag(first.unit_id, ["not a tag"])
            with pytest.raises(errors.NotFound):
                await c.tag(str(__import__("uuid").uuid4()), ["x"])
        finally:
            await c.close()
            await other.close()

    run(main())


def test_a_command_sent_while_the_service_is_down_is_carried_out_once(cim_iu):
    async def main():
        c = await Client.connect(cim_iu.url, timeout=120, latest=True)
        try:
            content = await c.put_content(b"written across a restart")
            cim_iu.services["iu"].kill()
            rid = "py-restart-" + os.urandom(6).hex()
            pending = asyncio.create_task(c.create(content.cid, name="restart.txt", request_id=rid))
            await asyncio.sleep(0)  # the request is out, nobody answers: retried with the same id
            cim_iu.services["iu"].proc.start()
            result = await pending
            again = await c.create(content.cid, name="restart.txt", request_id=rid)
            assert again.unit_id == result.unit_id and again.replayed
            units = [u.unit_id async for u in c.list_all(name_prefix="restart.txt")]
            assert units == [result.unit_id]
        finally:
            await c.close()
        await cim_iu.wait_ready("iu")

    run(main())


# ---- events ----


def test_following_events_survives_a_service_restart_and_resumes_durably(cim_iu):
    async def main():
        c = await Client.connect(cim_iu.url, timeout=60)
        durable = "py-follow-" + os.urandom(4).hex()
        created_filter = subjects.unit_action("created")
        try:
            events = c.follow("iu", filter=created_filter, durable=durable, deliver="new")
            first_event = asyncio.ensure_future(events.__anext__())
            await asyncio.sleep(0)
            a = await c.create((await c.put_content(b"follow a")).cid, name="a")
            ev = await asyncio.wait_for(first_event, 60)
            assert ev.type == "cim.iu.unit.created" and ev.payload.unit_id == a.unit_id
            assert ev.envelope is not None and ev.envelope.type == ev.type

            await cim_iu.restart("iu")
            b = await c.create((await c.put_content(b"follow b")).cid, name="b")
            ev = await asyncio.wait_for(events.__anext__(), 60)
            assert ev.payload.unit_id == b.unit_id and ev.sequence > 0
            await events.aclose()  # stops with b taken but not acknowledged: it comes again

            d = await c.create((await c.put_content(b"follow d")).cid, name="d")
            async with contextlib.aclosing(c.follow("iu", filter=created_filter, durable=durable)) as again:
                got = [await asyncio.wait_for(again.__anext__(), 60) for _ in range(2)]
            assert [e.payload.unit_id for e in got] == [b.unit_id, d.unit_id]
            assert isinstance(got[1].payload, iu_pb2.UnitCreated)
        finally:
            await c.close()

    run(main())
