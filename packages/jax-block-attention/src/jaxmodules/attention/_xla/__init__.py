"""The XLA backend: the block loop in plain JAX, on any device, for every keyword.

Its modules, in the order a call goes through them:

- ``_entry``: ``attend`` (the entry point: the kernel layout and padding, one compiled
  program per static configuration) and ``call_problem`` (it takes every call);
- ``_loop``: the online softmax over a block mask's lists and its recomputing VJP;
- ``_block_sizes``: ``block_sizes``, its default block sizes (a cost model on XLA:CPU).
"""

from ._block_sizes import block_sizes
from ._entry import attend, call_problem

__all__ = ["attend", "block_sizes", "call_problem"]
