"""The Python client of the information-unit service, interoperable byte for byte with the Rust
client (``crates/cim-iu-client``).

- **Content** goes straight to the JetStream object store content bucket in fixed-size chunks
  (128 KiB by default; memory does not grow with the size): an upload is written under
  ``upload.<uuidv7>`` in the object store's own layout and then committed by the service, which
  names it by its CID. A download reads the chunks through a pull consumer a few at a time,
  checks them against the CID (SHA-256) and the recorded size, and reports a mismatch to the
  service before raising :class:`~cim.errors.Corrupt`.
- **Commands** get a fresh UUIDv7 request id when the caller gives none, and are retried with
  that same id on timeout, no responders and 503, so a retry never writes twice.
- **Queries** return the protobuf messages of ``iu.proto``; they ask the projection to have
  reached the newest sequence this client wrote (read your writes).
- **Events**: :meth:`Client.follow` is an async iterator over a component's event stream,
  through a durable consumer (resumes where it stopped, acknowledged as you go) or an
  ephemeral one.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import importlib
import json
import os
import pathlib
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, BinaryIO, Iterable

import nats
import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from . import _subjects as T
from . import cid as cidlib
from . import errors as E
from . import subjects as S
from .envelope import Envelope, uuid7
from .proto import iu_pb2 as pb

DEFAULT_TIMEOUT = 10.0
DEFAULT_ATTEMPT_TIMEOUT = 2.0
DEFAULT_COMMIT_TIMEOUT = 60.0
DEFAULT_CHUNK_SIZE = 128 * 1024
#: Pauses between attempts of a retried request: 100ms, 200ms, 400ms, 800ms, 1.6s.
DEFAULT_RETRY_DELAYS = tuple(0.1 * (1 << i) for i in range(5))
#: Chunks a download holds at most at once (each one JetStream message).
DOWNLOAD_BATCH = 16
#: "Newest the log holds": the min_sequence of a client made with latest=True.
LATEST = (1 << 64) - 1

_ROLLUP = {"Nats-Rollup": "sub"}


@dataclass(frozen=True)
class ContentRead:
    cid: str
    size: int
    written: int


@dataclass(frozen=True)
class Event:
    """One event of a stream: its subject, stream sequence, envelope and decoded payload
    (``None`` for a type this package has no class for; ``data`` always holds the bytes)."""

    subject: str
    sequence: int
    envelope: Envelope | None
    type: str
    payload: Any
    data: bytes


def _payload_class(type_name: str):
    entry = T.PAYLOADS.get(type_name)
    if entry is None:
        return None
    module, message, _version = entry
    return getattr(importlib.import_module(f"cim.proto.{module}"), message)


def decode_event(subject: str, sequence: int, headers: dict | None, data: bytes) -> Event:
    try:
        env = Envelope.from_headers(headers)
    except ValueError:
        env = None
    type_name = env.type if env else ""
    cls = _payload_class(type_name)
    payload = None
    if cls is not None:
        payload = cls()
        payload.ParseFromString(data)
    return Event(subject, sequence, env, type_name, payload, data)


class Client:
    """Client of the information-unit service (and a follower of any component's events).

    ``Client.connect(url)`` opens its own connection; ``Client(nc)`` uses yours.
    """

    def __init__(
        self,
        nc,
        *,
        domain: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        attempt_timeout: float = DEFAULT_ATTEMPT_TIMEOUT,
        commit_timeout: float = DEFAULT_COMMIT_TIMEOUT,
        retry_delays: Iterable[float] = DEFAULT_RETRY_DELAYS,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        latest: bool = False,
        source: str | None = None,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream(domain=domain) if domain else nc.jetstream()
        self.timeout = timeout
        self.attempt_timeout = max(attempt_timeout, 0.01)
        self.commit_timeout = commit_timeout
        self.retry_delays = tuple(retry_delays)
        self.chunk_size = max(int(chunk_size), 1)
        self.latest = latest
        self.written = 0
        self.source = source or f"/python/{os.getpid()}"
        self._own = False

    @classmethod
    async def connect(cls, servers: str | list[str] = "nats://127.0.0.1:4222", *, creds: str | None = None, **kw) -> "Client":
        """Connects to NATS (comma-separated URLs allowed) and returns a client owning the connection."""
        if isinstance(servers, str):
            servers = [s.strip() for s in servers.split(",") if s.strip()]
        opts: dict[str, Any] = {"servers": servers, "name": "cim-python", "max_reconnect_attempts": -1}
        if creds:
            opts["user_credentials"] = creds
        try:
            nc = await nats.connect(**opts)
        except Exception as e:  # nats raises several kinds; all mean "cannot reach NATS"
            raise E.Unavailable(f"cannot connect to NATS at {','.join(servers)}: {e}") from e
        c = cls(nc, **kw)
        c._own = True
        return c

    async def close(self) -> None:
        if self._own:
            await self.nc.drain()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def min_sequence(self) -> int:
        """The stream sequence queries ask the projection to have reached."""
        return LATEST if self.latest else self.written

    def saw(self, sequence: int) -> None:
        """Makes queries reflect a write with stream sequence ``sequence`` (made elsewhere)."""
        self.written = max(self.written, int(sequence))

    # ---- transport ----

    async def _request(self, subject: str, body: bytes, timeout: float, headers: dict | None = None):
        try:
            msg = await self.nc.request(subject, body, timeout=timeout, headers=headers)
        except nats.errors.NoRespondersError:
            raise E.Unavailable(f"no service answers on {subject}") from None
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            raise E.Timeout(f"no reply on {subject} within {timeout:.1f}s") from None
        except nats.errors.Error as e:
            raise E.NatsError(f"request on {subject}: {e}") from e
        err = E.from_headers(msg.headers)
        if err is not None:
            raise err
        return msg

    async def _call(self, subject: str, body: bytes, *, idempotent: bool, timeout: float | None = None, headers=None):
        """One request and its retries: a repeatable request (a query, or a command with a
        request id) is sent in attempts of growing length within ``timeout``; any other waits
        the whole timeout and is repeated only when it certainly was not carried out."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        wait = min(self.attempt_timeout, timeout) if idempotent and self.retry_delays else timeout
        attempt = 0
        while True:
            left = deadline - time.monotonic()
            this = max(min(wait, left), 0.01)
            try:
                return await self._request(subject, body, this, headers)
            except (E.Unavailable, E.Timeout) as e:
                retryable = isinstance(e, E.Unavailable) or idempotent
                if not retryable or not self.retry_delays:
                    raise
                pause = self.retry_delays[min(attempt, len(self.retry_delays) - 1)]
                more = deadline - time.monotonic() > pause if idempotent else attempt < len(self.retry_delays)
                if not more:
                    raise
                await asyncio.sleep(pause)
                attempt += 1
                wait *= 2

    @staticmethod
    def _decode(cls, data: bytes):
        m = cls()
        try:
            m.ParseFromString(data)
        except Exception as e:
            raise E.Decode(f"reply is not a {cls.__name__}: {e}") from e
        return m

    # ---- content ----

    async def _object_info(self, name: str) -> dict:
        """The object's metadata as the content stream's leader has it (not a direct get a
        lagging replica could answer)."""
        subject = S.object_meta(T.IU_CONTENT_BUCKET, name)
        try:
            msg = await self.js.get_last_msg(T.IU_CONTENT_STREAM, subject)
        except nats.js.errors.NotFoundError:
            raise E.NotFound(f"content {name} is not stored") from None
        except nats.js.errors.ServiceUnavailableError as e:
            raise E.Unavailable(f"content bucket unavailable: {e}") from e
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            raise E.Timeout(f"looking up content {name}: no answer") from None
        except nats.js.errors.APIError as e:
            if getattr(e, "code", None) == 404 or "not found" in str(e).lower():
                raise E.NotFound(f"content {name} is not stored") from None
            raise E.NatsError(f"looking up content {name}: {e}") from e
        info = json.loads(msg.data)
        if info.get("deleted"):
            raise E.NotFound(f"content {name} is not stored (collected)")
        return info

    async def upload(self, source) -> tuple[str, int, str]:
        """Writes ``source`` into the content bucket as ``upload.<uuidv7>`` (not yet committed):
        returns ``(upload name, size, CID)``. ``source``: bytes, a path, a binary file object,
        or an (async) iterable of bytes; read ``chunk_size`` at a time."""
        name = T.IU_UPLOAD_PREFIX + str(uuid7())
        nuid = uuid.uuid4().hex
        chunks_subject = S.object_chunks(T.IU_CONTENT_BUCKET, nuid)
        hasher = cidlib.Hasher()
        size = 0
        chunks = 0
        try:
            async for chunk in _chunks(source, self.chunk_size):
                hasher.update(chunk)
                await self._publish(chunks_subject, chunk)
                size += len(chunk)
                chunks += 1
            digest_cid = hasher.cid()
            info = {
                "name": name,
                "description": None,
                "metadata": {},
                "headers": None,
                "options": {"max_chunk_size": self.chunk_size},
                "bucket": T.IU_CONTENT_BUCKET,
                "nuid": nuid,
                "size": size,
                "chunks": chunks,
                "mtime": _dt.datetime.now(_dt.timezone.utc).isoformat().replace("+00:00", "Z"),
                "digest": cidlib.to_object_digest(digest_cid),
            }
            await self._publish(S.object_meta(T.IU_CONTENT_BUCKET, name), json.dumps(info).encode(), _ROLLUP)
        except BaseException:
            try:
                await self.js.purge_stream(T.IU_CONTENT_STREAM, subject=chunks_subject)
            except Exception:
                pass
            raise
        return name, size, digest_cid

    async def _publish(self, subject: str, data: bytes, headers: dict | None = None) -> None:
        try:
            await self.js.publish(subject, data, timeout=self.timeout, stream=T.IU_CONTENT_STREAM, headers=headers)
        except nats.js.errors.NoStreamResponseError:
            raise E.Unavailable("the content bucket does not answer (is the information-unit service provisioned?)") from None
        except nats.errors.NoRespondersError:
            raise E.Unavailable("the content bucket does not answer (is the information-unit service provisioned?)") from None
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            raise E.Timeout(f"uploading: no acknowledgement within {self.timeout:.1f}s") from None
        except nats.js.errors.APIError as e:
            raise E.NatsError(f"uploading: {e}") from e

    async def commit(self, upload: str, size: int, cid: str | None) -> pb.ContentCommitted:
        """Asks the service to turn a finished upload into content addressed by its CID,
        surviving a service replaced mid-commit (a repeat that finds the upload gone — the
        first attempt committed it — is answered by the stored content itself)."""
        body = pb.CommitContent(upload=upload).SerializeToString()
        subject = S.command("iu", "commit")
        attempt = self.attempt_timeout + size / (32 << 20)
        deadline = time.monotonic() + max(self.commit_timeout, attempt)
        tried = False
        pause = 0.1
        while True:
            left = max(deadline - time.monotonic(), 0.01)
            try:
                msg = await self._request(subject, body, min(attempt, left))
                return self._decode(pb.ContentCommitted, msg.data)
            except E.NotFound:
                if not tried or not cid:
                    raise
                info = await self._object_info(cid)
                return pb.ContentCommitted(cid=cid, size=int(info.get("size", 0)), deduplicated=False)
            except (E.Timeout, E.Unavailable) as e:
                tried |= isinstance(e, E.Timeout)
                if deadline - time.monotonic() <= pause:
                    raise
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)

    async def put_content(self, source) -> pb.ContentCommitted:
        """Uploads ``source`` and commits it: the reply names its CID and whether the bytes were
        already stored. Memory stays bounded whatever the size."""
        name, size, cid = await self.upload(source)
        return await self.commit(name, size, cid)

    async def content_size(self, cid: str) -> int:
        cidlib.digest(cid)
        return int((await self._object_info(cid)).get("size", 0))

    async def iter_content(self, cid: str, *, _stats: dict | None = None) -> AsyncIterator[bytes]:
        """The bytes of content ``cid``, chunk by chunk, checked against the CID: the last
        step raises :class:`~cim.errors.Corrupt` (after reporting it) on a mismatch, so a
        consumer must discard what it got if the iteration does not finish."""
        cidlib.digest(cid)
        info = await self._object_info(cid)
        recorded = info.get("digest") or ""
        try:
            recorded_cid = cidlib.from_object_digest(recorded)
        except ValueError:
            recorded_cid = None
        if recorded_cid != cid:
            raise await self._corrupt(cid, f"the object store records digest {recorded or '(none)'} for it")
        size = int(info.get("size", 0))
        chunks = int(info.get("chunks", 0))
        if _stats is not None:
            _stats["size"] = size
        if chunks == 0:
            if size != 0:
                raise await self._corrupt(cid, f"it records {size} bytes in no chunks")
            if cidlib.of(b"") != cid:
                raise await self._corrupt(cid, "no bytes, and that is not its CID")
            return
        subject = S.object_chunks(T.IU_CONTENT_BUCKET, info["nuid"])
        config = ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=subject,
            inactive_threshold=60.0,
            mem_storage=True,
            num_replicas=1,
        )
        try:
            psub = await self.js.pull_subscribe(subject, stream=T.IU_CONTENT_STREAM, config=config)
        except Exception as e:
            raise E.NatsError(f"reading content {cid}: cannot open a consumer: {e}") from e
        hasher = cidlib.Hasher()
        pos = 0
        seen = 0
        try:
            while seen < chunks:
                batch = min(DOWNLOAD_BATCH, chunks - seen)
                try:
                    msgs = await psub.fetch(batch=batch, timeout=self.timeout)
                except (nats.errors.TimeoutError, asyncio.TimeoutError):
                    raise await self._corrupt_or_timeout(cid, subject, seen, chunks, pos, size)
                for m in msgs:
                    data = m.data
                    hasher.update(data)
                    pos += len(data)
                    seen += 1
                    if pos > size:
                        raise await self._corrupt(cid, f"its chunks hold more than the {size} bytes it records")
                    yield data
        finally:
            await _close_pull(self.js, psub, delete=True)
        if pos != size:
            raise await self._corrupt(cid, f"read {pos} bytes, the object records {size}")
        if hasher.cid() != cid:
            raise await self._corrupt(cid, f"its chunks do not match the recorded digest after {pos} bytes")

    async def _corrupt_or_timeout(self, cid, subject, seen, chunks, pos, size) -> E.CimError:
        try:
            info = await self.js.stream_info(T.IU_CONTENT_STREAM, subjects_filter=subject)
            stored = sum((info.state.subjects or {}).values())
        except Exception:
            stored = None
        if stored is not None and stored < chunks:
            return await self._corrupt(cid, f"{stored} of its {chunks} chunks are stored (the others were purged or lost)")
        return E.Timeout(f"reading content {cid}: no chunk arrived within {self.timeout:.1f}s after {pos} of {size} bytes")

    async def get_content(self, cid: str, sink, *, range: tuple[int, int] | None = None) -> ContentRead:
        """Streams content ``cid`` into ``sink`` (a path or a binary file object): all of it,
        or bytes ``start..end`` of ``range``. The whole content is always read and verified;
        on a mismatch :class:`~cim.errors.Corrupt` is raised (a path is then removed)."""
        path = None
        if isinstance(sink, (str, os.PathLike)):
            path = pathlib.Path(sink)
            out: BinaryIO = open(path, "wb")
        else:
            out = sink
        stats: dict = {}
        written = 0
        pos = 0
        try:
            start, end = 0, None
            async for chunk in self.iter_content(cid, _stats=stats):
                if end is None:
                    size = stats["size"]
                    start, end = range if range is not None else (0, size)
                    if not (0 <= start <= end <= size):
                        raise E.BadRequest(f"byte range {start}..{end} is not within content {cid} of {size} bytes")
                lo, hi = max(pos, start), min(pos + len(chunk), end)
                if lo < hi:
                    out.write(chunk[lo - pos : hi - pos])
                    written += hi - lo
                pos += len(chunk)
            if end is None and range is not None and range != (0, 0):
                raise E.BadRequest(f"byte range {range[0]}..{range[1]} is not within content {cid} of 0 bytes")
        except BaseException:
            if path is not None:
                out.close()
                path.unlink(missing_ok=True)
            raise
        if path is not None:
            out.close()
        else:
            getattr(out, "flush", lambda: None)()
        return ContentRead(cid, stats.get("size", 0), written)

    async def get_bytes(self, cid: str, *, range: tuple[int, int] | None = None) -> bytes:
        """Content ``cid`` in memory, verified (small content and tests)."""
        import io

        buf = io.BytesIO()
        await self.get_content(cid, buf, range=range)
        return buf.getvalue()

    async def _corrupt(self, cid: str, detail: str) -> E.Corrupt:
        try:
            await self.report_corrupt(cid, detail)
        except E.CimError:
            pass
        return E.Corrupt(cid, detail)

    async def report_corrupt(self, cid: str, detail: str) -> None:
        """Tells the service that bytes read for ``cid`` do not match it (it records the event)."""
        body = pb.ReportCorrupt(cid=cid, detail=detail).SerializeToString()
        await self._request(S.command("iu", "report_corrupt"), body, self.timeout)

    async def put_file(self, path, *, name: str | None = None, media_type: str | None = None, **create) -> tuple[pb.ContentCommitted, pb.CommandResult]:
        """Uploads the file at ``path`` and creates a unit of it (name: the file name; media
        type: a guess from the extension, else application/octet-stream)."""
        import mimetypes

        p = pathlib.Path(path)
        if not p.is_file():
            raise E.BadRequest(f"{p} is not a regular file")
        committed = await self.put_content(p)
        guessed = mimetypes.guess_type(p.name)[0] or "application/octet-stream"
        result = await self.create(committed.cid, name=name or p.name, media_type=media_type or guessed, **create)
        return committed, result

    # ---- commands ----

    async def execute(self, endpoint: str, command, *, caused_by: Envelope | None = None) -> pb.CommandResult:
        """Sends a command message (one of iu.proto's, with a ``header``): fills in a fresh
        UUIDv7 request id when it has none, and retries the very same request on timeout, no
        responders and 503."""
        if not command.header.request_id:
            command.header.request_id = str(uuid7())
        # on behalf of another message: the events written inherit its correlation id and
        # take its id as causation (the service reads the parent's envelope from the headers)
        headers = caused_by.headers() if caused_by is not None else None
        msg = await self._call(S.command("iu", endpoint), command.SerializeToString(), idempotent=True, headers=headers)
        result = self._decode(pb.CommandResult, msg.data)
        self.saw(result.sequence)
        return result

    @staticmethod
    def _header(request_id: str | None, expected_version: int) -> pb.CommandHeader:
        return pb.CommandHeader(request_id=request_id or "", expected_version=expected_version)

    async def create(
        self,
        cid: str,
        *,
        name: str = "",
        media_type: str = "",
        unit_type: str = "",
        tags: Iterable[str] = (),
        attributes: dict[str, str] | None = None,
        links: Iterable[tuple[str, str]] = (),
        request_id: str | None = None,
    ) -> pb.CommandResult:
        """Creates a unit of stored content ``cid``; ``links`` are ``(kind, target unit id)``;
        an empty media type is ``application/octet-stream``."""
        c = pb.CreateUnit(
            header=self._header(request_id, 0),
            cid=cid,
            name=name,
            media_type=media_type or "application/octet-stream",
            unit_type=unit_type,
            tags=list(tags),
        )
        c.attributes.update(attributes or {})
        c.links.extend(pb.Link(kind=k, target=t) for k, t in links)
        return await self.execute("create", c)

    async def new_version(self, unit_id: str, cid: str, *, name: str = "", media_type: str = "", expected_version: int = 0, request_id: str | None = None) -> pb.CommandResult:
        c = pb.NewVersion(header=self._header(request_id, expected_version), unit_id=unit_id, cid=cid, name=name, media_type=media_type)
        return await self.execute("new_version", c)

    async def tag(self, unit_id: str, tags: Iterable[str], *, expected_version: int = 0, request_id: str | None = None) -> pb.CommandResult:
        c = pb.TagUnit(header=self._header(request_id, expected_version), unit_id=unit_id, tags=list(tags))
        return await self.execute("tag", c)

    async def untag(self, unit_id: str, tags: Iterable[str], *, expected_version: int = 0, request_id: str | None = None) -> pb.CommandResult:
        c = pb.UntagUnit(header=self._header(request_id, expected_version), unit_id=unit_id, tags=list(tags))
        return await self.execute("untag", c)

    async def set_attributes(self, unit_id: str, set: dict[str, str] | None = None, remove: Iterable[str] = (), *, expected_version: int = 0, request_id: str | None = None) -> pb.CommandResult:
        c = pb.SetAttributes(header=self._header(request_id, expected_version), unit_id=unit_id, remove=list(remove))
        c.set.update(set or {})
        return await self.execute("set_attributes", c)

    async def link(self, unit_id: str, kind: str, target: str, *, expected_version: int = 0, request_id: str | None = None) -> pb.CommandResult:
        c = pb.LinkUnit(header=self._header(request_id, expected_version), unit_id=unit_id, link=pb.Link(kind=kind, target=target))
        return await self.execute("link", c)

    async def unlink(self, unit_id: str, kind: str, target: str, *, expected_version: int = 0, request_id: str | None = None) -> pb.CommandResult:
        c = pb.UnlinkUnit(header=self._header(request_id, expected_version), unit_id=unit_id, link=pb.Link(kind=kind, target=target))
        return await self.execute("unlink", c)

    async def delete(self, unit_id: str, *, reason: str = "", expected_version: int = 0, request_id: str | None = None) -> pb.CommandResult:
        c = pb.DeleteUnit(header=self._header(request_id, expected_version), unit_id=unit_id, reason=reason)
        return await self.execute("delete", c)

    async def register_type(self, name: str, schema_json: str, *, request_id: str | None = None) -> pb.CommandResult:
        """Registers unit type ``name`` with its attribute schema (a new registration is a new
        schema version; the format is in docs/information-units.md)."""
        c = pb.RegisterType(header=self._header(request_id, 0), name=name, schema_json=schema_json)
        return await self.execute("register_type", c)

    # ---- queries ----

    async def _query(self, endpoint: str, request, reply_cls):
        msg = await self._call(S.query("iu", endpoint), request.SerializeToString(), idempotent=True)
        return self._decode(reply_cls, msg.data)

    async def get(self, unit_id: str, *, at_version: int = 0, at_time_ms: int = 0) -> pb.Unit:
        return await self._query(
            "get", pb.GetUnit(unit_id=unit_id, at_version=at_version, at_time_ms=at_time_ms, min_sequence=self.min_sequence), pb.Unit
        )

    async def history(self, unit_id: str) -> pb.History:
        return await self._query("history", pb.GetHistory(unit_id=unit_id), pb.History)

    async def links(self, unit_id: str) -> pb.Links:
        return await self._query("links", pb.GetLinks(unit_id=unit_id, min_sequence=self.min_sequence), pb.Links)

    async def get_type(self, name: str) -> pb.UnitType:
        return await self._query("type", pb.GetType(name=name), pb.UnitType)

    async def validate(self, unit_type: str, attributes: dict[str, str]) -> pb.Validation:
        """Would ``attributes`` be accepted for ``unit_type``? Writes nothing."""
        q = pb.ValidateAttributes(unit_type=unit_type)
        q.attributes.update(attributes)
        return await self._query("validate", q, pb.Validation)

    async def status(self) -> pb.ProjectionStatus:
        """The projection's progress."""
        msg = await self._call(S.query("iu", "status"), b"", idempotent=True)
        return self._decode(pb.ProjectionStatus, msg.data)

    async def list(self, *, tag: str = "", unit_type: str = "", name_prefix: str = "", since_ms: int = 0, until_ms: int = 0, page_size: int = 0, page_token: str = "", include_deleted: bool = False) -> pb.UnitList:
        """One page of units matching the filters (``next_page_token`` empty on the last)."""
        q = pb.ListUnits(
            tag=tag, unit_type=unit_type, name_prefix=name_prefix, since_ms=since_ms, until_ms=until_ms,
            page_size=page_size, page_token=page_token, include_deleted=include_deleted, min_sequence=self.min_sequence,
        )
        return await self._query("list", q, pb.UnitList)

    async def list_all(self, **filters) -> AsyncIterator[pb.Unit]:
        """Every unit matching the filters, page after page."""
        token = ""
        while True:
            page = await self.list(page_token=token, **filters)
            for u in page.units:
                yield u
            token = page.next_page_token
            if not token:
                return

    # ---- events ----

    async def follow(
        self,
        component: str = "iu",
        *,
        filter: str | None = None,
        durable: str | None = None,
        deliver: str = "all",
        start_sequence: int | None = None,
        batch: int = 64,
        idle: float = 1.0,
    ) -> AsyncIterator[Event]:
        """Follows a component's event stream (``filter``: a subject filter within it, e.g.
        ``cim.subjects.unit_history(id)``; default every event of the component).

        With ``durable`` the consumer is durable: each event is acknowledged when the next one
        is asked for, so a follower that stops and comes back resumes after the last event it
        took (at least once). Without, an ephemeral consumer starts at ``deliver``: ``all``,
        ``new`` or ``start_sequence``. Survives service restarts (it only needs JetStream) and
        reconnects of the NATS connection.
        """
        stream = S.events_stream(component)
        subject = filter or S.events_of(component)
        policy = {"all": DeliverPolicy.ALL, "new": DeliverPolicy.NEW}.get(deliver)
        if start_sequence is not None:
            policy = DeliverPolicy.BY_START_SEQUENCE
        if policy is None:
            raise E.BadRequest(f"deliver must be 'all' or 'new', not {deliver!r}")
        config = ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT if durable else AckPolicy.NONE,
            deliver_policy=policy,
            opt_start_seq=start_sequence,
            filter_subject=subject,
            ack_wait=30.0,
            max_ack_pending=batch * 4 if durable else None,
            inactive_threshold=None if durable else 300.0,
        )
        if durable:
            S.token("durable consumer name", durable)
        psub = await self.js.pull_subscribe(subject, durable=durable, stream=stream, config=config)
        unacked: list = []
        try:
            while True:
                try:
                    msgs = await psub.fetch(batch=batch, timeout=idle)
                except (nats.errors.TimeoutError, asyncio.TimeoutError):
                    continue
                except nats.errors.ConnectionClosedError:
                    return
                except nats.js.errors.APIError:
                    # e.g. the server restarting: ask again after a pause
                    await asyncio.sleep(idle)
                    continue
                unacked = list(msgs)
                while unacked:
                    m = unacked[0]
                    seq = m.metadata.sequence.stream if m.metadata else 0
                    yield decode_event(m.subject, seq, m.headers, m.data)
                    # asked for the next one: this one is done
                    unacked.pop(0)
                    if durable:
                        await m.ack()
        finally:
            # what was fetched but not finished is handed back at once, not after the ack wait
            if durable:
                for m in unacked:
                    with contextlib.suppress(Exception):
                        await m.nak()
            # a durable consumer stays (that is the point); an ephemeral one goes now
            await _close_pull(self.js, psub, delete=not durable)

    # ---- any request/reply endpoint with JSON bodies (pipelines, hub) ----

    async def request_json(self, subject: str, body: Any, *, timeout: float | None = None, idempotent: bool = True) -> Any:
        msg = await self._call(subject, json.dumps(body).encode(), idempotent=idempotent, timeout=timeout)
        return json.loads(msg.data) if msg.data else None


async def _close_pull(js, psub, *, delete: bool) -> None:
    with contextlib.suppress(Exception):
        await psub.unsubscribe()
    if delete:
        with contextlib.suppress(Exception):
            await js.delete_consumer(psub._stream, psub._consumer)


async def _chunks(source, size: int) -> AsyncIterator[bytes]:
    """``source`` cut into chunks of exactly ``size`` bytes (the last one shorter)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        for i in range(0, len(data), size):
            yield data[i : i + size]
        return
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            async for c in _chunks(f, size):
                yield c
        return
    if hasattr(source, "read"):
        loop = asyncio.get_running_loop()
        while True:
            block = await loop.run_in_executor(None, _read_full, source, size)
            if not block:
                return
            yield block
            if len(block) < size:
                return
    pending = bytearray()
    if hasattr(source, "__aiter__"):
        async for piece in source:
            pending += piece
            while len(pending) >= size:
                yield bytes(pending[:size])
                del pending[:size]
    elif hasattr(source, "__iter__"):
        for piece in source:
            pending += piece
            while len(pending) >= size:
                yield bytes(pending[:size])
                del pending[:size]
    else:
        raise E.BadRequest(f"cannot upload a {type(source).__name__}: give bytes, a path, a binary file or an iterable of bytes")
    if pending:
        yield bytes(pending)


def _read_full(f, size: int) -> bytes:
    """Reads ``size`` bytes unless the end comes first (file objects may return less)."""
    parts = []
    left = size
    while left > 0:
        b = f.read(left)
        if not b:
            break
        parts.append(b)
        left -= len(b)
    return b"".join(parts)
