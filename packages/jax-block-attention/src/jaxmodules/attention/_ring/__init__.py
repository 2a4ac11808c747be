"""Ring attention: context parallelism over one mesh axis with ``shard_map`` and
collective permutes.

- ``_layout``: which sequence chunks each device holds (natural, zigzag, balanced), the
  exchange between those orders, and the per-device work they lead to;
- ``_steps``: the ring on one device's chunks, forward and backward steps under one
  custom VJP;
- ``_entry``: ``ring_attention`` itself: argument checks and the ``shard_map``.
"""

from ._entry import ring_attention
from ._layout import from_zigzag, ring_block_counts, to_zigzag, zigzag_order

__all__ = ["from_zigzag", "ring_attention", "ring_block_counts", "to_zigzag", "zigzag_order"]
