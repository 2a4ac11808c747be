"""``jax.vmap`` over many named axes at once, described by a pattern string."""

__all__: list[str] = []
