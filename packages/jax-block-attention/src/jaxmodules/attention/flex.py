"""PyTorch FlexAttention's interface over this package's attention.

Code written for ``torch.nn.attention.flex_attention`` ports by changing its imports and
the way it makes arrays: the same names, argument order, ``(B, H, L, E)`` layout,
``score_mod(score, b, h, q_idx, kv_idx)`` and ``mask_mod(b, h, q_idx, kv_idx)``
signatures and results. Everything here is a thin layer over
[`masked_attention_via_map`][jaxmodules.attention.masked_attention_via_map] and
[`create_block_mask`][jaxmodules.attention.create_block_mask]: the block mask it makes is
the package's [`BlockMask`][jaxmodules.attention.BlockMask] and works with every other
entry point.

Differences from PyTorch:

- ``mask_mod`` and ``score_mod`` are traced once on scalar int32 indices (and a float32
  score) and vectorized with ``jax.vmap``: write them with ``jnp`` operations, as in
  PyTorch, where they are also traced element-wise. There is no ``torch.compile`` step:
  the first call compiles, eager or under ``jax.jit``.
- A block mask made with ``B=None`` (or ``H=None``) is refused for a ``mask_mod`` that
  reads ``b`` (or ``h``) when the inputs have several batch rows (heads): PyTorch
  classifies the blocks for ``b = 0`` alone and may skip blocks another row needs.
- ``kernel_options``: see [`flex_attention`][jaxmodules.attention.flex.flex_attention].
- ``BlockMask.sparsity()`` is a fraction (PyTorch: a percentage) and
  ``BlockMask.to_dense()`` the element-wise mask (PyTorch: one entry per block).
"""

from __future__ import annotations

import inspect
import numbers
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._api import masked_attention_via_map
from ._block_mask import BlockMask
from ._elementwise import trace_mask_fn, trace_score_mod
from ._normalize import positive_int
from ._plan import create_block_mask as _create_block_mask

__all__ = [
    "AuxOutput",
    "AuxRequest",
    "BlockMask",
    "and_masks",
    "create_block_mask",
    "create_mask",
    "flex_attention",
    "noop_mask",
    "or_masks",
]

_DEFAULT_BLOCK_SIZE = 128


class AuxRequest(NamedTuple):
    """Which auxiliary outputs ``flex_attention(..., return_aux=...)`` returns.

    Attributes:
        lse: The log-sum-exp of each row's scores, ``(B, H, L)`` float32.
        max_scores: PyTorch's per-row maximum score; not computed here (asking for it
            raises ``ValueError``).
    """

    lse: bool = False
    max_scores: bool = False


class AuxOutput(NamedTuple):
    """The auxiliary outputs of ``flex_attention(..., return_aux=...)``; a field not
    asked for is ``None``.

    Attributes:
        lse: ``(B, H, L)`` float32 log-sum-exp, ``-inf`` for a row with no visible key.
        max_scores: Always ``None`` (not computed here).
    """

    lse: jax.Array | None = None
    max_scores: jax.Array | None = None


def noop_mask(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> jax.Array:
    """The ``mask_mod`` under which every key is visible from every query.

    Args:
        b: Batch index.
        h: Head index.
        q_idx: Query index.
        kv_idx: Key index.

    Returns:
        A boolean scalar ``True``.

    Examples:
        >>> from jaxmodules.attention.flex import create_block_mask, noop_mask
        >>> create_block_mask(noop_mask, None, None, 64, 64, BLOCK_SIZE=32).sparsity()
        0.0
    """
    return jnp.ones((), jnp.bool_)


def _combined(mask_mods: tuple[Any, ...], name: str, *, every: bool) -> Callable[..., Any]:
    """The ``mask_mod`` behind ``and_masks`` (``every``) and ``or_masks``: starting
    from the answer for no masks, fold each mask in with ``&`` or ``|``."""
    for i, mask_mod in enumerate(mask_mods):
        if not callable(mask_mod):
            raise TypeError(
                f"{name} takes mask_mod functions (b, h, q_idx, kv_idx) -> bool; argument "
                f"{i} is a {type(mask_mod).__name__}: {mask_mod!r}"
            )

    def combined(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        visible = jnp.full((), every, jnp.bool_)
        for mask_mod in mask_mods:
            seen = mask_mod(b, h, q_idx, kv_idx)
            visible = (visible & seen) if every else (visible | seen)
        return visible

    return combined


def and_masks(*mask_mods: Callable[..., Any]) -> Callable[..., Any]:
    """The ``mask_mod`` that is ``True`` where every one of ``mask_mods`` is.

    Args:
        *mask_mods: Functions ``mask_mod(b, h, q_idx, kv_idx) -> bool``; none gives
            the mask under which everything is visible.

    Returns:
        A ``mask_mod(b, h, q_idx, kv_idx)``.

    Raises:
        TypeError: An argument that is not callable.

    Examples:
        >>> from jaxmodules.attention.flex import and_masks, create_mask
        >>> def causal(b, h, q_idx, kv_idx):
        ...     return q_idx >= kv_idx
        >>> def window(b, h, q_idx, kv_idx):
        ...     return q_idx - kv_idx <= 2
        >>> create_mask(and_masks(causal, window), None, None, 4, 4).astype(int)[0, 0]
        Array([[1, 0, 0, 0],
               [1, 1, 0, 0],
               [1, 1, 1, 0],
               [0, 1, 1, 1]], dtype=int32)
    """
    return _combined(mask_mods, "and_masks", every=True)


def or_masks(*mask_mods: Callable[..., Any]) -> Callable[..., Any]:
    """The ``mask_mod`` that is ``True`` where any one of ``mask_mods`` is.

    Args:
        *mask_mods: Functions ``mask_mod(b, h, q_idx, kv_idx) -> bool``; none gives
            the mask under which nothing is visible.

    Returns:
        A ``mask_mod(b, h, q_idx, kv_idx)``.

    Raises:
        TypeError: An argument that is not callable.

    Examples:
        >>> from jaxmodules.attention.flex import create_mask, or_masks
        >>> def causal(b, h, q_idx, kv_idx):
        ...     return q_idx >= kv_idx
        >>> def prefix(b, h, q_idx, kv_idx):
        ...     return kv_idx < 2
        >>> create_mask(or_masks(causal, prefix), None, None, 4, 4).astype(int)[0, 0]
        Array([[1, 1, 0, 0],
               [1, 1, 0, 0],
               [1, 1, 1, 0],
               [1, 1, 1, 1]], dtype=int32)
    """
    return _combined(mask_mods, "or_masks", every=False)


def _size(value: Any, name: str) -> int:
    """``B`` / ``H``: ``None`` (broadcast) is 1."""
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int or None (broadcast), got {value!r}")
    return int(value)


def _check_device(device: Any) -> None:
    if not (device is None or isinstance(device, (str, jax.Device))):
        raise TypeError(
            f"device must be None, a string or a jax.Device, got {type(device).__name__}: "
            f"{device!r}"
        )


def create_block_mask(
    mask_mod: Callable[..., Any],
    B: int | None,
    H: int | None,
    Q_LEN: int,
    KV_LEN: int,
    device: Any = None,
    BLOCK_SIZE: int | tuple[int, int] = _DEFAULT_BLOCK_SIZE,
    _compile: bool = False,
) -> BlockMask:
    """PyTorch's ``create_block_mask``: classify every block pair of ``mask_mod`` once.

    The result is this package's [`BlockMask`][jaxmodules.attention.BlockMask], so it
    also works with ``masked_attention_via_map(..., block_mask=...)`` and
    ``ring_attention``. It is a pytree: it can be built inside ``jax.jit`` from traced
    arrays (document ids) and passed through ``jit`` as an argument.

    Args:
        mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool``, ``True`` = visible, written
            element-wise with ``jnp`` operations (traced on scalar int32 indices and
            vectorized with ``jax.vmap``). It may close over arrays, traced ones too.
        B: Batch size, or ``None`` when the mask does not depend on ``b`` (then it is
            classified for ``b = 0`` and broadcast over the batch).
        H: Number of query heads, or ``None`` when the mask does not depend on ``h``.
        Q_LEN: Query length.
        KV_LEN: Key/value length.
        device: Accepted for PyTorch's signature. A ``jax.Device`` puts the mask's index
            arrays on it; ``None`` or a string (``"cuda"``, ``"cpu"``) leaves them where
            JAX puts arrays by default (they go to the inputs' device when used).
        BLOCK_SIZE: Positions per block, an int or a pair ``(Q_BLOCK, KV_BLOCK)``;
            clipped to the lengths. It is also the block size the attention computes
            with (a kernel that tiles only other sizes, such as ``"triton"``'s powers of
            two ``>= 16``, re-plans the mask for its own).
        _compile: Accepted and ignored: the mask is always built by compiled JAX code.

    Returns:
        A [`BlockMask`][jaxmodules.attention.BlockMask] of shape
        ``(B or 1, H or 1, Q_LEN, KV_LEN)``.

    Raises:
        TypeError: ``mask_mod`` not callable or not element-wise boolean ``jnp`` code,
            non-integer sizes, a ``device`` that is neither a string nor a
            ``jax.Device``.
        ValueError: Non-positive sizes.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jaxmodules.attention.flex import create_block_mask, flex_attention
        >>> def causal(b, h, q_idx, kv_idx):
        ...     return q_idx >= kv_idx
        >>> block_mask = create_block_mask(causal, None, None, 256, 256, BLOCK_SIZE=64)
        >>> block_mask.sparsity()  # the fraction of block pairs skipped
        0.375
        >>> q = k = v = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 256, 32))
        >>> out = flex_attention(q, k, v, block_mask=block_mask)
        >>> dense = jax.nn.dot_product_attention(
        ...     q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), is_causal=True
        ... ).swapaxes(1, 2)
        >>> bool(jnp.allclose(out, dense, atol=1e-5))
        True
    """
    if not callable(mask_mod):
        raise TypeError(
            "mask_mod must be a function (b, h, q_idx, kv_idx) -> bool, got "
            f"{type(mask_mod).__name__}: {mask_mod!r}"
        )
    _check_device(device)
    block_mask = _create_block_mask(
        mask_mod,
        _size(B, "B"),
        _size(H, "H"),
        positive_int(Q_LEN, "Q_LEN"),
        positive_int(KV_LEN, "KV_LEN"),
        block_size=BLOCK_SIZE,
    )
    if isinstance(device, jax.Device):
        block_mask = jax.device_put(block_mask, device)
    return block_mask


def create_mask(
    mod_fn: Callable[..., Any],
    B: int | None,
    H: int | None,
    Q_LEN: int,
    KV_LEN: int,
    device: Any = None,
) -> jax.Array:
    """PyTorch's ``create_mask``: the dense boolean mask of a ``mask_mod`` or ``score_mod``.

    Quadratic in the lengths: for inspection, tests and dense attention, not for long
    sequences (that is what ``create_block_mask`` is for).

    Args:
        mod_fn: A ``mask_mod(b, h, q_idx, kv_idx) -> bool``, or a
            ``score_mod(score, b, h, q_idx, kv_idx)`` (five parameters), whose mask is
            where it does not turn a score of 0 into ``-inf``.
        B: Batch size, or ``None`` for 1.
        H: Number of heads, or ``None`` for 1.
        Q_LEN: Query length.
        KV_LEN: Key/value length.
        device: As in ``create_block_mask``.

    Returns:
        A boolean array ``(B or 1, H or 1, Q_LEN, KV_LEN)``, ``True`` = visible.

    Raises:
        TypeError: ``mod_fn`` not callable or not element-wise ``jnp`` code, non-integer
            sizes.
        ValueError: Non-positive sizes.

    Examples:
        >>> from jaxmodules.attention.flex import create_mask
        >>> def causal(b, h, q_idx, kv_idx):
        ...     return q_idx >= kv_idx
        >>> create_mask(causal, None, None, 3, 3)[0, 0]
        Array([[ True, False, False],
               [ True,  True, False],
               [ True,  True,  True]], dtype=bool)
    """
    if not callable(mod_fn):
        raise TypeError(f"mod_fn must be a mask_mod or a score_mod, got {type(mod_fn).__name__}")
    _check_device(device)
    sizes = [
        positive_int(_size(B, "B"), "B"),
        positive_int(_size(H, "H"), "H"),
        positive_int(Q_LEN, "Q_LEN"),
        positive_int(KV_LEN, "KV_LEN"),
    ]
    grids = [
        jnp.arange(n, dtype=jnp.int32).reshape([n if a == i else 1 for a in range(4)])
        for i, n in enumerate(sizes)
    ]
    if _is_score_mod(mod_fn):
        program, consts = trace_score_mod(mod_fn)
        visible = ~jnp.isneginf(program.evaluate(consts, jnp.float32(0), *grids))
    else:
        program, consts = trace_mask_fn(mod_fn)
        visible = program.evaluate(consts, *grids)
    mask = jnp.broadcast_to(visible, tuple(sizes))
    return jax.device_put(mask, device) if isinstance(device, jax.Device) else mask


def _is_score_mod(fn: Callable[..., Any]) -> bool:
    """Five positional parameters make a ``score_mod``; PyTorch decides the same way."""
    try:
        inspect.signature(fn).bind(*range(5))
    except TypeError:
        return False
    except ValueError:
        return False  # no introspectable signature: taken as a mask_mod
    try:
        inspect.signature(fn).bind(*range(4))
    except TypeError:
        return True
    return False


def _as_bhle(x: Any, name: str) -> jax.Array:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        try:
            if x is None or isinstance(x, (str, bytes)):  # older jax makes them arrays
                raise TypeError("not array-like")
            x = jnp.asarray(x)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"{name} must be an array (B, H, L, E), got {type(x).__name__}: {err}"
            ) from None
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name} must have a floating dtype (float32, bfloat16, float16, ...), got "
            f"{x.dtype} with shape {tuple(x.shape)}"
        )
    if x.ndim != 4:
        raise ValueError(
            f"{name} must have rank 4 (B, H, L, E), PyTorch FlexAttention's layout; got "
            f"shape {tuple(x.shape)}"
        )
    return x


_LAYOUT_HINT = (
    "; these shapes fit with the heads and length axes swapped: flex_attention takes "
    "PyTorch's (B, H, L, E) layout, (B, L, H, E) is masked_attention_via_map's (or "
    "transpose with jnp.swapaxes(x, 1, 2))"
)


def _check_layout(q: Any, k: Any, v: Any, enable_gqa: Any) -> None:
    """Shapes in the ``(B, H, L, E)`` terms of PyTorch's messages; the core checks the
    rest (dtypes, block mask) again in its own terms. An error whose shapes would fit
    with the heads and length axes swapped says so."""
    if not isinstance(enable_gqa, (bool, np.bool_)):
        raise TypeError(f"enable_gqa must be a bool, got {enable_gqa!r}")
    try:
        _check_layout_rules(q, k, v, enable_gqa)
    except ValueError as err:

        def swapped(x: Any) -> Any:
            b, h, n, e = x.shape
            return jax.ShapeDtypeStruct((b, n, h, e), x.dtype)

        try:
            # GQA allowed: the layout is the first thing to fix.
            _check_layout_rules(swapped(q), swapped(k), swapped(v), True)
        except ValueError:
            raise err from None
        raise ValueError(f"{err}{_LAYOUT_HINT}") from None


def _check_block_mask_layout(q: jax.Array, k: jax.Array, block_mask: Any) -> None:
    """A block mask whose lengths are the inputs' head counts: (B, L, H, E) inputs."""
    if not isinstance(block_mask, BlockMask):
        return  # the core names what a block_mask must be
    lengths = tuple(block_mask.shape[2:])
    if lengths != (q.shape[2], k.shape[2]) and lengths == (q.shape[1], k.shape[1]):
        raise ValueError(
            f"block_mask was built for (Q_LEN, KV_LEN) = {lengths}, which are the head "
            f"counts of query {tuple(q.shape)} and key {tuple(k.shape)}; flex_attention "
            "takes PyTorch's (B, H, L, E) layout: are the inputs (B, L, H, E)? Transpose "
            "them with jnp.swapaxes(x, 1, 2), or call masked_attention_via_map"
        )


def _check_layout_rules(q: Any, k: Any, v: Any, enable_gqa: Any) -> None:
    shapes = f"query {tuple(q.shape)}, key {tuple(k.shape)}, value {tuple(v.shape)}"
    if k.shape[0] != v.shape[0] or k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(
            f"key and value must have the same batch size, heads and length (B, H, S), got {shapes}"
        )
    if k.shape[0] not in (1, q.shape[0]):
        raise ValueError(
            f"key and value must have the batch size of query (or 1, broadcast), got {shapes}"
        )
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"query and key must have the same head dimension E, got {shapes}")
    q_heads, kv_heads = q.shape[1], k.shape[1]
    if not enable_gqa and q_heads != kv_heads:
        raise ValueError(
            f"query and key/value must have the same number of heads, got Hq={q_heads} "
            f"and Hkv={kv_heads} ({shapes}); pass enable_gqa=True for grouped-query "
            "attention"
        )
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(
            f"with enable_gqa=True the number of query heads must be a multiple of the "
            f"number of key/value heads, got Hq={q_heads} and Hkv={kv_heads} ({shapes})"
        )


# PyTorch's documented kernel_options (FlexKernelOptions), each also with a "fwd_" or
# "bwd_" prefix; "implementation" is this package's own.
_TORCH_OPTIONS = frozenset(
    [
        "BLOCK_M",
        "BLOCK_N",
        "BLOCK_M1",
        "BLOCK_N1",
        "BLOCK_M2",
        "BLOCK_N2",
        "num_warps",
        "num_stages",
        "PRESCALE_QK",
        "ROWS_GUARANTEED_SAFE",
        "BLOCKS_ARE_CONTIGUOUS",
        "WRITE_DQ",
        "OUTPUT_LOGSUMEXP",
        "OUTPUT_MAX",
        "FORCE_USE_FLEX_ATTENTION",
        "USE_TMA",
        "BACKEND",
        "SPARSE_Q_BLOCK_SIZE",
        "SPARSE_KV_BLOCK_SIZE",
        "kpack",
        "matrix_instr_nonkdim",
        "waves_per_eu",
    ]
)


def _known_option(name: str) -> bool:
    base = name.removeprefix("fwd_").removeprefix("bwd_")
    return name == "implementation" or base in _TORCH_OPTIONS


def _kernel_options(options: Any, block_mask: Any) -> tuple[Any, str | None]:
    """``(block_size, implementation)`` from ``kernel_options``."""
    if options is None:
        return None, None
    if not isinstance(options, Mapping):
        raise TypeError(f"kernel_options must be a dict or None, got {type(options).__name__}")
    for name in options:
        if not isinstance(name, str):
            raise TypeError(f"kernel_options keys must be strings, got {name!r}")
    unknown = sorted(name for name in options if not _known_option(name))
    if unknown:
        # A warning, not an error: PyTorch's eager path ignores unknown keys, and code
        # written for a newer PyTorch must keep running.
        warnings.warn(
            f"kernel_options: unknown key(s) {', '.join(map(repr, unknown))}, ignored. Known: "
            "PyTorch's (BLOCK_M, BLOCK_N, num_warps, num_stages, PRESCALE_QK, ... with their "
            "fwd_ / bwd_ forms) and 'implementation'",
            UserWarning,
            stacklevel=3,
        )
    implementation = options.get("implementation")
    if block_mask is not None:
        return None, implementation  # the block mask's block size is the kernel's
    # fwd_ names win over plain ones, as in PyTorch; one side given sets both.
    sizes = {}
    for side, names in (("q", ("fwd_BLOCK_M", "BLOCK_M")), ("k", ("fwd_BLOCK_N", "BLOCK_N"))):
        name = next((n for n in names if options.get(n) is not None), None)
        if name is not None:
            sizes[side] = positive_int(options[name], f"kernel_options[{name!r}]")
    if not sizes:
        return None, implementation
    return (sizes.get("q", sizes.get("k")), sizes.get("k", sizes.get("q"))), implementation


def _aux_request(return_lse: Any, return_aux: Any) -> tuple[bool, AuxRequest | None]:
    """Whether to compute the lse, and the ``return_aux`` request checked."""
    if not isinstance(return_lse, (bool, np.bool_)):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    if return_aux is None:
        return bool(return_lse), None
    if not isinstance(return_aux, AuxRequest):
        raise TypeError(
            f"return_aux must be an AuxRequest or None, got {type(return_aux).__name__}"
        )
    if return_lse:
        raise ValueError("pass either return_lse=True or return_aux=AuxRequest(lse=True)")
    if return_aux.max_scores:
        raise ValueError(
            "return_aux=AuxRequest(max_scores=True) is not supported: the kernels keep "
            "each row's running maximum only inside its log-sum-exp; ask for lse instead"
        )
    return bool(return_aux.lse), return_aux


def flex_attention(
    query: Any,
    key: Any,
    value: Any,
    score_mod: Callable[..., Any] | None = None,
    block_mask: BlockMask | None = None,
    scale: Any = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    kernel_options: Mapping[str, Any] | None = None,
    *,
    return_aux: AuxRequest | None = None,
) -> Any:
    """PyTorch's ``flex_attention``: softmax attention with a ``score_mod`` and a
    ``block_mask``, in the ``(B, H, L, E)`` layout, in linear memory.

    The same computation as
    [`masked_attention_via_map`][jaxmodules.attention.masked_attention_via_map] on the
    transposed arrays: block pairs the block mask leaves empty are skipped, full ones are
    computed without the mask, and the custom backward pass recomputes scores block by
    block. A query row with no visible key gives 0 (and ``lse = -inf``), as in PyTorch.

    Args:
        query: ``(B, Hq, L, E)``.
        key: ``(B, Hkv, S, E)``; ``B`` may be 1 (broadcast over the queries' batch).
        value: ``(B, Hkv, S, Ev)``.
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score``, element-wise on
            float32 scores (after scaling). Floating arrays it closes over, traced ones
            included, get gradients.
        block_mask: From [`create_block_mask`][jaxmodules.attention.flex.create_block_mask]
            (here or in ``jaxmodules.attention``), built for ``(L, S)``. ``None``: every
            key visible.
        scale: Factor for ``query @ key^T``, ``1 / sqrt(E)`` by default; a Python number
            or a float scalar array, which may be traced (a learnable temperature gets
            its gradient).
        enable_gqa: Allow ``Hq`` to be a multiple of ``Hkv`` (grouped-query attention);
            with ``False``, different head counts are an error, as in PyTorch.
        return_lse: Also return the log-sum-exp of each row's scores (natural log),
            ``(B, Hq, L)`` float32.
        kernel_options: PyTorch's kernel settings. What means something here:
            ``BLOCK_M`` / ``BLOCK_N`` (or ``fwd_BLOCK_M`` / ``fwd_BLOCK_N``) become the
            query / key block size when there is no ``block_mask`` (with one, its
            ``BLOCK_SIZE`` is the block size computed with); ``"implementation"`` (this
            package's own key) picks the backend: ``"xla"``, ``"triton"``, ``"cudnn"``
            or ``None``, as in ``masked_attention_via_map``. Every other key
            (``num_warps``, ``num_stages``, backward tile sizes, ``PRESCALE_QK``,
            ``ROWS_GUARANTEED_SAFE``, ``BACKEND``, ...) is accepted and ignored;
            a key PyTorch does not document either (a typo) is ignored with a
            warning that names it.
        return_aux: ``AuxRequest(lse=True)`` returns ``(out, AuxOutput(lse=...))``,
            PyTorch's newer form of ``return_lse``; ``max_scores`` is not supported.

    Returns:
        The output ``(B, Hq, L, Ev)`` in ``query``'s dtype; with ``return_lse=True`` the
        pair ``(out, lse)``; with ``return_aux`` the pair ``(out, AuxOutput)``.

    Raises:
        ValueError: Inputs that are not 4-D, shapes that do not fit, different head
            counts without ``enable_gqa``, a block mask built for other lengths (or with
            ``B=None`` / ``H=None`` for a ``mask_mod`` that reads ``b`` / ``h``), an
            unknown ``implementation``.
        TypeError: Non-floating inputs or scale, a non-callable ``score_mod``, a
            ``kernel_options`` that is not a dict.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jaxmodules.attention.flex import create_block_mask, flex_attention
        >>> def sliding_window(b, h, q_idx, kv_idx):
        ...     return (q_idx >= kv_idx) & (q_idx - kv_idx < 64)
        >>> def soft_cap(score, b, h, q_idx, kv_idx):
        ...     return 20.0 * jnp.tanh(score / 20.0)
        >>> block_mask = create_block_mask(sliding_window, None, None, 256, 256, BLOCK_SIZE=64)
        >>> kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
        >>> q = jax.random.normal(kq, (2, 8, 256, 32))
        >>> k = jax.random.normal(kk, (2, 2, 256, 32))
        >>> v = jax.random.normal(kv, (2, 2, 256, 32))
        >>> out, lse = flex_attention(
        ...     q, k, v, score_mod=soft_cap, block_mask=block_mask, enable_gqa=True,
        ...     return_lse=True,
        ... )
        >>> out.shape, lse.shape
        ((2, 8, 256, 32), (2, 8, 256))
    """
    q, k, v = _as_bhle(query, "query"), _as_bhle(key, "key"), _as_bhle(value, "value")
    _check_layout(q, k, v, enable_gqa)
    _check_block_mask_layout(q, k, block_mask)
    want_lse, aux = _aux_request(return_lse, return_aux)
    block_size, implementation = _kernel_options(kernel_options, block_mask)
    if k.shape[0] != q.shape[0]:
        k = jnp.broadcast_to(k, (q.shape[0], *k.shape[1:]))
        v = jnp.broadcast_to(v, (q.shape[0], *v.shape[1:]))
    result = masked_attention_via_map(
        jnp.swapaxes(q, 1, 2),
        jnp.swapaxes(k, 1, 2),
        jnp.swapaxes(v, 1, 2),
        score_mod=score_mod,
        block_mask=block_mask,
        scale=scale,
        block_size=block_size,
        return_lse=want_lse,
        implementation=implementation,
    )
    out, lse = result if want_lse else (result, None)
    out = jnp.swapaxes(out, 1, 2)
    if aux is not None:
        return out, AuxOutput(lse=lse)
    return (out, lse) if want_lse else out
