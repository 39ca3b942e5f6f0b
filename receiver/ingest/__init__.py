"""The ingest path, one module per step a delivery takes:

signature.py  verify the raw bytes (and sign, for tests and outbound hooks)
payloads.py   parse and validate the three wire shapes into plain run patches
archive.py    what the archive keeps about a request
merge.py      the merge rules, as a pure fold
store.py      the write path's SQL for a batch of deliveries: archive, fingerprints, merged rows
batcher.py    group commit: the deliveries in flight in a worker share one transaction
pipeline.py   the journey end to end: receive, store_parsed, replay
"""

from receiver.ingest.archive import ArchiveEntry, RawDelivery, archive_entry, kept_headers
from receiver.ingest.pipeline import (
    archive_rejection,
    receive,
    replay,
    replayable_rejections,
    store_parsed,
)
from receiver.ingest.store import StoreResult

__all__ = [
    "ArchiveEntry",
    "RawDelivery",
    "StoreResult",
    "archive_entry",
    "archive_rejection",
    "kept_headers",
    "receive",
    "replay",
    "replayable_rejections",
    "store_parsed",
]
