"""Block-wise, linear-memory masked softmax attention in JAX."""

from ._api import masked_attention_via_map
from ._block_mask import BlockMask, create_block_mask

__all__ = ["BlockMask", "create_block_mask", "masked_attention_via_map"]
