"""Platform ingest: MQTT uplinks from gateways -> deduplicated readings in a store.

`IngestWorker` subscribes (MQTT 5 shared subscription) and stores; `open_store`
opens the SQLite (embedded default) or PostgreSQL store by URL.
"""

from agent.ingest.store import Store, StoreCounts, open_store
from agent.ingest.worker import IngestCounters, IngestWorker, run_ingest

__all__ = [
    "IngestCounters",
    "IngestWorker",
    "Store",
    "StoreCounts",
    "open_store",
    "run_ingest",
]
