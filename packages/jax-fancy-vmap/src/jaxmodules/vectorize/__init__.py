"""``jax.vmap`` over many named axes at once, described by a pattern string.

Examples:
    >>> import jax.numpy as jnp
    >>> from jaxmodules.vectorize import fancy_vmap
    >>> pairwise = fancy_vmap(lambda a, b: a - b, "i :, j : -> i j :")
    >>> pairwise(jnp.zeros((4, 3)), jnp.ones((5, 3))).shape
    (4, 5, 3)
"""

from ._core import fancy_vmap
from ._parse import AxisPattern, VmapPlan, parse_pattern

__all__ = ["AxisPattern", "VmapPlan", "fancy_vmap", "parse_pattern"]
