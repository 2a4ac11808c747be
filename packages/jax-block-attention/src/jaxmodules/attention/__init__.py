"""Block-wise, linear-memory masked softmax attention in pure JAX."""

__all__: list[str] = []
