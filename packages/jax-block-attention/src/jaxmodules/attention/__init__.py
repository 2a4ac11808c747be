"""Block-wise, linear-memory masked softmax attention in JAX."""

from . import flex
from ._api import dot_product_attention, masked_attention_via_map
from ._block_mask import BlockMask
from ._dispatch import DispatchDecision
from ._dropout import dropout_keep_mask
from ._explain import explain_dispatch
from ._flax import flax_dot_product_attention
from ._plan import create_block_mask
from ._ring import from_zigzag, ring_attention, ring_block_counts, to_zigzag, zigzag_order

__all__ = [
    "BlockMask",
    "DispatchDecision",
    "create_block_mask",
    "dot_product_attention",
    "dropout_keep_mask",
    "explain_dispatch",
    "flax_dot_product_attention",
    "flex",
    "from_zigzag",
    "masked_attention_via_map",
    "ring_attention",
    "ring_block_counts",
    "to_zigzag",
    "zigzag_order",
]
