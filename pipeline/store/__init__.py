"""Storage of results: the result writer, block sinks, the file layout and every on-disk name.

``ResultWriter`` owns a result from opening to finishing (see ``pipeline.store.writer``);
``pipeline.store.names`` lists every file and directory it creates.
"""

from .blocks import InPlaceSink, ShardSink
from .layout import Metadata, compression_options
from .names import ResultNames, probe_marker
from .statistics import BlockStats, block_stats
from .writer import ResultWriter, RunLock, check_destination

__all__ = [
    "BlockStats",
    "InPlaceSink",
    "Metadata",
    "ResultNames",
    "ResultWriter",
    "RunLock",
    "ShardSink",
    "block_stats",
    "check_destination",
    "compression_options",
    "probe_marker",
]
