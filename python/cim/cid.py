"""Content identifiers, byte for byte those of ``crates/cim-events/src/cid.rs``.

CIDv1, codec ``raw`` (0x55), multihash sha2-256 (0x12, 32 bytes), written in multibase base32
lower-case without padding (prefix ``b``), e.g. ``bafkrei…`` (59 characters). The digest is the
SHA-256 of the content, which is also what the JetStream object store records for every object
(``SHA-256=<base64url>``): a CID is checked against the store's metadata without reading the
content, and against the bytes while they stream.
"""

from __future__ import annotations

import base64
import hashlib

from .errors import BadRequest

_PREFIX = bytes([0x01, 0x55, 0x12, 0x20])
_DIGEST_LEN = 32


def from_sha256(digest: bytes) -> str:
    """The CID of content whose SHA-256 is ``digest``."""
    if len(digest) != _DIGEST_LEN:
        raise ValueError("a sha-256 digest has 32 bytes")
    return "b" + base64.b32encode(_PREFIX + digest).decode().rstrip("=").lower()


def of(data: bytes) -> str:
    """The CID of ``data``."""
    return from_sha256(hashlib.sha256(data).digest())


def digest(cid: str) -> bytes:
    """The SHA-256 digest a CID names; ``BadRequest`` when it is not one of ours."""
    if not isinstance(cid, str) or not cid.startswith("b"):
        raise BadRequest(f"invalid CID {cid!r}: expected multibase base32 (prefix 'b')")
    body = cid[1:]
    if body != body.lower() or not body:
        raise BadRequest(f"invalid CID {cid!r}: not lower-case base32")
    try:
        raw = base64.b32decode(body.upper() + "=" * (-len(body) % 8))
    except Exception:
        raise BadRequest(f"invalid CID {cid!r}: not base32") from None
    if len(raw) != len(_PREFIX) + _DIGEST_LEN or raw[: len(_PREFIX)] != _PREFIX:
        raise BadRequest(f"invalid CID {cid!r}: not CIDv1 raw sha2-256")
    if from_sha256(raw[len(_PREFIX) :]) != cid:
        raise BadRequest(f"invalid CID {cid!r}: not in canonical form")
    return raw[len(_PREFIX) :]


def to_object_digest(cid: str) -> str:
    """The object store's spelling of the CID's digest, ``SHA-256=<base64url>``."""
    return "SHA-256=" + base64.urlsafe_b64encode(digest(cid)).decode()


def from_object_digest(text: str) -> str:
    """The CID of an object whose store metadata records digest ``text``."""
    if not text or not text.upper().startswith("SHA-256="):
        raise ValueError(f"object digest {text!r} is not SHA-256")
    b64 = text[len("SHA-256=") :]
    raw = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))
    return from_sha256(raw)


class Hasher:
    """Streaming hasher that yields the CID of everything fed to it."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, data: bytes) -> None:
        self._h.update(data)

    def cid(self) -> str:
        return from_sha256(self._h.digest())
