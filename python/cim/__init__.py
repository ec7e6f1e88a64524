"""CIM (Composable Information Machine) for Python: a client of the information-unit service
and an SDK for native plugins, on NATS JetStream and the ``cim-events`` contract.

- :class:`cim.client.Client` — content in and out (streamed, verified against its CID), unit
  commands with request ids and expected versions, queries, following events.
- :class:`cim.plugin.Plugin` — serve a plugin version under the plugin contract.
- :mod:`cim.errors` — the typed errors both raise.
- :mod:`cim.subjects` — names from the generated table; :mod:`cim.proto` — protobuf classes.

See docs/python.md.
"""

from . import cid, errors, subjects
from .client import Client, ContentRead, Event
from .errors import BadRequest, CimError, Conflict, Corrupt, Internal, NotFound, Timeout, Unavailable
from .plugin import InvalidInput, Output, Plugin, PluginFailed

__all__ = [
    "BadRequest", "CimError", "Client", "Conflict", "ContentRead", "Corrupt", "Event", "Internal",
    "InvalidInput", "NotFound", "Output", "Plugin", "PluginFailed", "Timeout", "Unavailable",
    "cid", "errors", "subjects",
]
