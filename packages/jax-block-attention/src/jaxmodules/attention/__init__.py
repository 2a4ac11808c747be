"""Block-wise, linear-memory masked softmax attention in JAX."""

from ._api import dot_product_attention, masked_attention_via_map
from ._block_mask import BlockMask, create_block_mask

__all__ = ["BlockMask", "create_block_mask", "dot_product_attention", "masked_attention_via_map"]
