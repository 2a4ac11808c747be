"""The XLA backend: the block loop in plain JAX, on any device, for every keyword.

- ``_entry``: ``attend``, the kernel layout and padding, and the compiled-program cache;
- ``_loop``: the online softmax over a block mask's lists and its recomputing VJP;
- ``_block_sizes``: the block sizes it picks (a cost model on XLA:CPU).
"""

from ._block_sizes import default_block_sizes
from ._entry import attend

__all__ = ["attend", "default_block_sizes"]
