"""Typed errors, mirroring the Rust client's ``IuError`` and the services' error codes.

A service answers a failed request with the NATS micro-protocol headers
``Nats-Service-Error-Code`` and ``Nats-Service-Error``; :func:`from_code` maps them the same
way ``crates/cim-iu-client/src/error.rs`` does: 400/422 → :class:`BadRequest`, 404 →
:class:`NotFound`, 409/412 → :class:`Conflict`, 503 → :class:`Unavailable`, 500 and anything
unknown → :class:`Internal`, other 4xx → :class:`BadRequest`.
"""

from __future__ import annotations


class CimError(Exception):
    """Anything a CIM call can fail with. ``code`` is the service error code, if any."""

    code: int | None = None


class BadRequest(CimError):
    """The request was refused: invalid input, failed validation, unknown type, ..."""

    code = 400


class NotFound(CimError):
    """The unit, type, content, upload, pipeline or run does not exist."""

    code = 404


class Conflict(CimError):
    """Optimistic concurrency failed: the expected version is stale."""

    code = 409


class Unavailable(CimError):
    """Nobody answered (no responders) or the service said 503; worth retrying later."""

    code = 503


class Timeout(CimError):
    """No reply in time: the request may or may not have been carried out."""


class Internal(CimError):
    """The service failed (500, or an error code this client does not know)."""

    code = 500


class Corrupt(CimError):
    """Bytes read for a CID do not match it (the corruption has been reported to the service)."""

    def __init__(self, cid: str, detail: str) -> None:
        super().__init__(f"content {cid} is corrupt: {detail}")
        self.cid = cid
        self.detail = detail


class NatsError(CimError):
    """A NATS or JetStream operation failed."""


class Decode(CimError):
    """A reply did not decode as the expected protobuf message."""


def from_code(code: str, message: str) -> CimError:
    """The error a service error code and message stand for."""
    try:
        c = int(str(code).strip())
    except ValueError:
        return Internal(f"{message} (code {code})")
    if c in (400, 422):
        return BadRequest(message)
    if c == 404:
        return NotFound(message)
    if c in (409, 412):
        return Conflict(message)
    if c == 503:
        return Unavailable(message)
    if c == 500:
        return Internal(message)
    if 400 <= c < 500:
        return BadRequest(f"{message} (code {c})")
    return Internal(f"{message} (code {code})")


def from_headers(headers: dict | None) -> CimError | None:
    """The service error a reply carries in its headers, if any."""
    if not headers:
        return None
    code = headers.get("Nats-Service-Error-Code")
    if code is None:
        return None
    message = headers.get("Nats-Service-Error") or f"error code {code}"
    return from_code(code, message)
