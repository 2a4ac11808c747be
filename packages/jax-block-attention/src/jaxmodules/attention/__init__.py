"""Block-wise, linear-memory masked softmax attention in pure JAX."""

from ._attention import masked_attention_via_map

__all__ = ["masked_attention_via_map"]
