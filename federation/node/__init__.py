"""A county's node: keeps the county's records, publishes tokens, receives match alerts.

The node runs beside the county's case-management system. Plaintext records stay in its own
DuckDB file; only keyed tokens under random pseudonyms go to the matcher, signed; signed match
alerts come back and are shown re-identified to the county's own records.

* :mod:`~federation.node.store`: the DuckDB tables (records, outbox, alerts, feedback, loads).
* :mod:`~federation.node.ingest`: load an export, publish what changed since the last load.
* :mod:`~federation.node.publisher`: send the outbox to the matcher until acknowledged.
* :mod:`~federation.node.rotate`: re-tokenise every record under a new key epoch.
* :mod:`~federation.node.app`: the HTTP API, and :func:`run` to serve it.

Start a node with ``run(load_settings(NodeSettings, Path("node.toml")))``, or build the app with
:func:`create_app` to serve it some other way.
"""

from federation.node.app import create_app, run
from federation.node.ingest import IngestReport, ingest_file
from federation.node.publisher import Publisher, publish_pending
from federation.node.store import NodeStore

__all__ = [
    "IngestReport",
    "NodeStore",
    "Publisher",
    "create_app",
    "ingest_file",
    "publish_pending",
    "run",
]
