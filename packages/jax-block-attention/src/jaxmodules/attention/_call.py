"""One call's checked arguments as every backend sees them: its score changes and their
arrays (built once), and its block mask planned with a backend's block sizes (built once
per block-size rule and platform). A prebuilt block mask whose block sizes a kernel does
not tile is re-planned for that kernel from what it keeps (its ``mask_fn`` program, band
and offset): the same mask on other blocks."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from ._block_mask import BlockMask, make_block_mask
from ._checks import CheckedArguments
from ._elementwise import trace_score_mod
from ._plan import BlockSizes, plan_block_mask
from ._scores import Operands, ScoreConfig, bias_axes

# Whether a kernel tiles a (query block, key block) pair as it is.
Fits = Callable[[tuple[int, int]], bool]


def any_blocks(block_size: tuple[int, int]) -> bool:
    """The block-size rule of a backend that takes every pair."""
    return True


@dataclass
class Call:
    """A checked call with 4-D inputs, for the backends' ``refusal`` and ``run``."""

    args: CheckedArguments
    return_lse: bool
    scores: ScoreConfig = field(init=False)
    operands: Operands = field(init=False)
    _planned: dict[Any, BlockMask] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        args = self.args
        program, consts = (None, ()) if args.score_mod is None else trace_score_mod(args.score_mod)
        self.scores = ScoreConfig(
            soft_cap=args.soft_cap,
            score=program,
            bias=None if args.bias is None else bias_axes(args.bias.shape),
            dropout_rate=0.0 if args.dropout is None else args.dropout.rate,
        )
        bsz, heads = args.q.shape[0], args.q.shape[2]
        seeds = None if args.dropout is None else args.dropout.seeds(bsz, heads)
        self.operands = Operands(args.bias, consts, seeds)

    @property
    def empty(self) -> bool:
        """No batch rows, queries or keys: every backend returns zeros."""
        q, k = self.args.q, self.args.k
        return q.shape[0] == 0 or q.shape[1] == 0 or k.shape[1] == 0

    @property
    def needs_lse(self) -> bool:
        """Whether the caller needs the log-sum-exp (asked for, or to add the sinks)."""
        return self.return_lse or self.args.sinks is not None

    @property
    def scale(self) -> Any:
        d = self.args.q.shape[-1]
        return self.args.scale if self.args.scale is not None else 1.0 / math.sqrt(d)

    @property
    def head_dim(self) -> int:
        """The larger of the query's and the value's head dimension."""
        return max(self.args.q.shape[-1], self.args.v.shape[-1])

    def empty_result(self) -> tuple[jax.Array, jax.Array]:
        q, v = self.args.q, self.args.v
        out = jnp.zeros((*q.shape[:3], v.shape[-1]), q.dtype)
        lse = jnp.full((q.shape[0], q.shape[2], q.shape[1]), -jnp.inf, jnp.float32)
        return out, lse

    def run_on_block_mask(
        self,
        attend: Callable[..., tuple[Any, Any]],
        block_sizes: BlockSizes,
        fits: Fits,
        platform: str,
        **options: Any,
    ) -> tuple[Any, Any]:
        """``(out, lse)`` by a backend's ``attend(q, k, v, block_mask, scale, scores,
        operands, **options)`` on the block mask planned for it (see ``block_mask``); an
        empty call gives the empty result without calling it."""
        if self.empty:
            return self.empty_result()
        block_mask = self.block_mask(block_sizes, fits, platform)
        a = self.args
        return attend(a.q, a.k, a.v, block_mask, self.scale, self.scores, self.operands, **options)

    def block_mask(self, block_sizes: BlockSizes, fits: Fits, platform: str) -> BlockMask:
        """The call's block mask for a backend whose default block sizes are
        ``block_sizes`` (given the platform) and which tiles the pairs ``fits`` takes: a
        given block mask as it is when it fits, else re-planned with the default sizes;
        otherwise planned from the mask arguments (an explicit ``block_size`` is kept,
        for the backend to refuse if it cannot tile it)."""
        key = (block_sizes, fits, platform)
        if key not in self._planned:
            sizes = partial(block_sizes, platform=platform)
            args = self.args
            given = args.block_mask
            d, dv = args.q.shape[-1], args.v.shape[-1]
            if given is not None and not fits(given.block_size):
                args = replace(args, block_mask=replan(given, sizes, head_dim=d, value_dim=dv))
            self._planned[key] = plan_block_mask(args, sizes, head_dim=d, value_dim=dv)
        return self._planned[key]


def replan(
    block_mask: BlockMask, block_sizes: BlockSizes, *, head_dim: int, value_dim: int
) -> BlockMask:
    """``block_mask`` on the blocks ``block_sizes`` chooses for its shape: the same mask
    (its ``mask_fn`` program, band and offset) classified again on other blocks."""
    batch, heads, q_len, k_len = block_mask.shape
    blocks = block_sizes(
        q_len=q_len,
        k_len=k_len,
        batch=batch,
        q_heads=heads,
        head_dim=head_dim,
        value_dim=value_dim,
        is_causal=block_mask.is_causal,
        window=block_mask.window,
    )
    return make_block_mask(
        block_mask.program,
        block_mask.mask_consts,
        block_mask.shape,
        blocks,
        block_mask.is_causal,
        block_mask.window,
        block_mask.q_offset,
    )
