"""Subjects and names, filled in from the generated table (``_subjects.py``) with their tokens
checked the way ``crates/cim-events`` checks them. Nothing in this package spells a name."""

from __future__ import annotations

import base64
import re

from . import _subjects as T
from .errors import BadRequest

_TOKEN_BAD = re.compile(r"[.*>\s]")
_PLUGIN_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
_PLUGIN_VERSION = re.compile(r"^[0-9A-Za-z.+-]{1,64}$")


def token(what: str, value: str) -> str:
    """A subject token: 1-128 printable ASCII characters without '.', '*', '>' or whitespace."""
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= 128
        or _TOKEN_BAD.search(value)
        or not value.isascii()
        or not value.isprintable()
    ):
        raise BadRequest(f"invalid {what} {value!r}: a subject token is 1-128 printable ASCII characters without '.', '*', '>' or whitespace")
    return value


def plugin_name(name: str) -> str:
    if not isinstance(name, str) or not _PLUGIN_NAME.match(name):
        raise BadRequest(f"invalid plugin name {name!r}: [a-z0-9][a-z0-9-]*, at most 64 characters")
    return name


def plugin_version(version: str) -> str:
    if not isinstance(version, str) or not _PLUGIN_VERSION.match(version) or "" in version.split("."):
        raise BadRequest(f"invalid plugin version {version!r}: 1-64 characters of [0-9A-Za-z.+-], no empty part between dots")
    return version


def version_token(version: str) -> str:
    """The subject token of a plugin version: '.' becomes '_'."""
    return plugin_version(version).replace(".", "_")


def command(component: str, endpoint: str) -> str:
    try:
        return T.COMMANDS[component][endpoint]
    except KeyError:
        raise BadRequest(f"no command {endpoint!r} of component {component!r}") from None


def query(component: str, endpoint: str) -> str:
    try:
        return T.QUERIES[component][endpoint]
    except KeyError:
        raise BadRequest(f"no query {endpoint!r} of component {component!r}") from None


def describe(component: str) -> str:
    return T.COMPONENTS[component]["describe"]


def events_stream(component: str) -> str:
    return T.COMPONENTS[component]["events_stream"]


def events_of(component: str) -> str:
    return T.COMPONENTS[component]["events"]


def unit_event(unit_id: str, action: str) -> str:
    return T.IU_UNIT_EVENT.format(unit_id=token("unit id", unit_id), action=token("action", action))


def unit_action(action: str) -> str:
    """One kind of event across all units (e.g. every ``created``)."""
    return T.IU_UNIT_EVENT.format(unit_id="*", action=token("action", action))


def unit_history(unit_id: str) -> str:
    return T.IU_UNIT_HISTORY.format(unit_id=token("unit id", unit_id))


def object_chunks(bucket: str, nuid: str) -> str:
    return T.OBJECT_CHUNKS.format(bucket=token("bucket", bucket), nuid=token("object nuid", nuid))


def object_meta(bucket: str, name: str) -> str:
    b64 = base64.urlsafe_b64encode(name.encode()).decode()
    return T.OBJECT_META.format(bucket=token("bucket", bucket), name_b64=b64)


def plugin_invoke(name: str, version: str) -> str:
    return T.PLUGIN_INVOKE.format(name=plugin_name(name), version_token=version_token(version))


def plugin_announce(name: str, version: str) -> str:
    return T.PLUGIN_ANNOUNCE.format(name=plugin_name(name), version_token=version_token(version))


def plugin_queue_group(name: str, version: str) -> str:
    return T.PLUGIN_QUEUE_GROUP.format(name=plugin_name(name), version_token=version_token(version))


def run_event(run_id: str, action: str) -> str:
    return T.PIPELINE_RUN_EVENT.format(run_id=token("run id", run_id), action=token("action", action))


def parse_event(subject: str) -> tuple[str, str, str, str]:
    """``(component, aggregate, id, action)`` of an event subject (shape of the unit template)."""
    parts = subject.split(".")
    shape = T.IU_UNIT_EVENT.split(".")
    if len(parts) != len(shape) or parts[:2] != shape[:2]:
        raise BadRequest(f"{subject!r} is not an event subject")
    return parts[2], parts[3], parts[4], parts[5]
