"""The envelope every CIM message carries in NATS headers (CloudEvents 1.0 binary mode plus
CIM's correlation and causation ids), as ``crates/cim-events/src/envelope.rs`` writes it.

Rule: a root message has id = correlation = causation; a message caused by another inherits
the parent's correlation id and takes the parent's id as causation. Ids are UUIDv7.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
import uuid
from dataclasses import dataclass

from . import _subjects as T

H = T.ENVELOPE_HEADERS


def uuid7() -> uuid.UUID:
    """A new UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then random bits."""
    ms = time.time_ns() // 1_000_000
    rand_a = int.from_bytes(os.urandom(2), "big") & 0xFFF
    rand_b = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    return uuid.UUID(int=value)


def schema_uri(type_name: str, version: int) -> str:
    return f"urn:cim:{type_name}:v{version}"


@dataclass(frozen=True)
class Envelope:
    id: str
    correlation_id: str
    causation_id: str
    type: str
    source: str
    time: str
    dataschema: str

    @staticmethod
    def root(type_name: str, version: int, source: str) -> "Envelope":
        i = str(uuid7())
        return Envelope(i, i, i, type_name, source, _now(), schema_uri(type_name, version))

    @staticmethod
    def caused_by(parent: "Envelope", type_name: str, version: int, source: str) -> "Envelope":
        return Envelope(
            str(uuid7()), parent.correlation_id, parent.id, type_name, source, _now(), schema_uri(type_name, version)
        )

    def headers(self) -> dict[str, str]:
        return {
            H["specversion"]: T.ENVELOPE_SPECVERSION,
            H["id"]: self.id,
            H["type"]: self.type,
            H["source"]: self.source,
            H["time"]: self.time,
            H["dataschema"]: self.dataschema,
            H["correlation"]: self.correlation_id,
            H["causation"]: self.causation_id,
            H["content_type"]: T.ENVELOPE_CONTENT_TYPE,
            H["msg_id"]: self.id,
        }

    @staticmethod
    def from_headers(headers: dict[str, str] | None) -> "Envelope":
        if not headers:
            raise ValueError("message has no envelope headers")
        try:
            return Envelope(
                headers[H["id"]],
                headers[H["correlation"]],
                headers[H["causation"]],
                headers[H["type"]],
                headers.get(H["source"], ""),
                headers.get(H["time"], ""),
                headers.get(H["dataschema"], ""),
            )
        except KeyError as e:
            raise ValueError(f"envelope header {e.args[0]} is missing") from None

    @property
    def is_root(self) -> bool:
        return self.id == self.correlation_id


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
