"""fancy_vmap against hand-written nested jax.vmap, transformations, pytrees and errors."""

from __future__ import annotations

import functools
import re
from collections import Counter
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmodules.vectorize import fancy_vmap


def normal(seed: int, *shape: int) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape)


def assert_close(actual: Any, expected: Any) -> None:
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for a, e in zip(
        jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected), strict=True
    ):
        assert a.shape == e.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-5)


def seed_fn(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
    """Per element: a (5,), b (7,), c (): the corrected Example 2 function."""
    return a * jnp.sum(b**2) + c


# (function, format strings, argument shapes, hand-written nest)
CASES = [
    (
        lambda a, b: a * b,
        ["i, j -> i j", "out[i, j] = f(A[i], B[j])", "i j <- i, j"],
        [(3,), (4,)],
        jax.vmap(jax.vmap(lambda a, b: a * b, in_axes=(None, 0)), in_axes=(0, None)),
    ),
    (
        seed_fn,
        [
            "i : j, : j, i -> : i j",
            ": i j <- i : j, : j, i",
            "out[:, i, j] = f(A[i, :, j], B[:, j], C[i])",
            "f(A[i : j], B[: j], C[i]) -> out[: i j]",
        ],
        [(3, 5, 4), (7, 4), (3,)],
        jax.vmap(
            jax.vmap(seed_fn, in_axes=(1, 1, None), out_axes=1), in_axes=(0, None, 0), out_axes=1
        ),
    ),
    (
        # j outermost because the output names it first; the fn axis goes last.
        lambda x, w: x @ w,
        ["i :, : : j -> j i", "y[j, i] = f(x[i, :], w[:, :, j])"],
        [(3, 4), (4, 5, 2)],
        jax.vmap(jax.vmap(lambda x, w: x @ w, in_axes=(0, None)), in_axes=(None, 2)),
    ),
    (
        lambda x, y: jnp.sin(x) * y,
        ["b ... t, t b -> ... t b", "o[..., t, b] = f(x[b, ..., t], y[t, b])"],
        [(2, 3, 4, 5), (5, 2)],
        jax.vmap(
            jax.vmap(lambda x, y: jnp.sin(x) * y, in_axes=(0, 0), out_axes=-1),
            in_axes=(-1, 0),
            out_axes=-2,
        ),
    ),
    (
        lambda x: jnp.cumsum(x),
        ["n : -> : n", "c[:, n] = cumsum(x[n, :])"],
        [(3, 6)],
        jax.vmap(jnp.cumsum, in_axes=0, out_axes=1),
    ),
]


@pytest.mark.parametrize(("fn", "fmts", "shapes", "hand"), CASES)
def test_matches_hand_written_nested_vmap(fn: Any, fmts: list[str], shapes: Any, hand: Any) -> None:
    args = [normal(seed, *shape) for seed, shape in enumerate(shapes)]
    expected = hand(*args)
    for fmt in fmts:
        assert_close(fancy_vmap(fn, fmt)(*args), expected)


def primitives(fn: Any, *args: Any) -> list[str]:
    return [eqn.primitive.name for eqn in jax.make_jaxpr(fn)(*args).jaxpr.eqns]


@pytest.mark.parametrize(("fn", "fmts", "shapes", "hand"), CASES)
def test_jaxpr_has_the_same_equations_as_the_hand_written_nest(
    fn: Any, fmts: list[str], shapes: Any, hand: Any
) -> None:
    args = [normal(seed, *shape) for seed, shape in enumerate(shapes)]
    expected = primitives(hand, *args)
    for fmt in fmts:
        ours = primitives(fancy_vmap(fn, fmt), *args)
        assert len(ours) == len(expected)
        assert Counter(ours) == Counter(expected)


def test_seed_example_jaxpr_equation_count_and_no_extra_transposes() -> None:
    args = [normal(0, 3, 5, 4), normal(1, 7, 4), normal(2, 3)]
    hand = jax.vmap(
        jax.vmap(seed_fn, in_axes=(1, 1, None), out_axes=1), in_axes=(0, None, 0), out_axes=1
    )
    ours = jax.make_jaxpr(fancy_vmap(seed_fn, "i : j, : j, i -> : i j"))(*args).jaxpr
    reference = jax.make_jaxpr(hand)(*args).jaxpr
    assert len(ours.eqns) == len(reference.eqns)
    for name in ("transpose", "reshape", "copy", "copy_p"):
        count = sum(eqn.primitive.name == name for eqn in ours.eqns)
        assert count == sum(eqn.primitive.name == name for eqn in reference.eqns)


# ---------------------------------------------------------------- the seed README, verbatim

SEED_EXAMPLE_1 = """
from jaxmodules.vectorize import fancy_vmap
import jax.numpy as jnp

# Example 1: Simple outer product pattern
# output[i, j] = fn(A[i], B[j])
def multiply(a, b):
    return a * b

vectorized = fancy_vmap(multiply, "i, j -> i j")
vectorized = fancy_vmap(multiply, "output[i, j] = multiply(A[i], B[j])") # same as previous line
A = jnp.array([1, 2, 3])
B = jnp.array([4, 5])
result = vectorized(A, B)  # shape: (3, 2)
"""

SEED_EXAMPLE_2 = """
# Example 2: Complex mapping with unmapped dimensions
# output[:, i, j] = fn(A[i, :, j], B[:, j], C[i])
def complex_fn(a, b, c):
    return jnp.sum(a) + jnp.sum(b) + c

vectorized = fancy_vmap(complex_fn, "i : j, : j, i -> : i j")
vectorized = fancy_vmap(complex_fn, "output[:, i, j] = complex_fn(A[i, :, j], B[:, j], C[i])") # same as previous line
A = jnp.array([1, 2, 3])
A = jnp.ones((3, 5, 4))  # (i=3, :, j=4)
B = jnp.ones((7, 4))     # (:, j=4)
C = jnp.ones(3)          # (i=3)
result = vectorized(A, B, C)  # shape: (5, 3, 4) - 5 comes from unmapped dimension
"""  # noqa: E501


def test_seed_readme_example_1_runs_verbatim() -> None:
    namespace: dict[str, Any] = {}
    exec(SEED_EXAMPLE_1, namespace)
    result = namespace["result"]
    assert result.shape == (3, 2)
    np.testing.assert_array_equal(np.asarray(result), np.outer([1, 2, 3], [4, 5]))


EXAMPLE_2_ERROR = (
    "output pattern {!r} has 1 ':' for the axes of fn's own output, so fn must return"
    " rank 1 for each element, but the output has shape () of rank 0"
)


def test_seed_readme_example_2_raises_the_output_rank_error_verbatim() -> None:
    namespace: dict[str, Any] = {}
    exec(SEED_EXAMPLE_1, namespace)
    message = EXAMPLE_2_ERROR.format("output[:, i, j]")
    with pytest.raises(ValueError, match=re.escape(message)):
        exec(SEED_EXAMPLE_2, namespace)
    # The einsum-like spelling on the line before gives the same error.
    vectorized = fancy_vmap(namespace["complex_fn"], "i : j, : j, i -> : i j")
    with pytest.raises(ValueError, match=re.escape(EXAMPLE_2_ERROR.format(": i j"))) as info:
        vectorized(namespace["A"], namespace["B"], namespace["C"])
    assert info.value.args[0].splitlines()[-2].strip() == "i : j, : j, i -> : i j"


@pytest.mark.parametrize(
    "fmt", ["i : j, : j, i -> : i j", "output[:, i, j] = complex_fn(A[i, :, j], B[:, j], C[i])"]
)
def test_seed_readme_example_2_corrected(fmt: str) -> None:
    def complex_fn(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
        return a + jnp.sum(b) + c

    A, B, C = normal(0, 3, 5, 4), normal(1, 7, 4), normal(2, 3)
    result = fancy_vmap(complex_fn, fmt)(A, B, C)
    assert result.shape == (5, 3, 4)
    expected = np.zeros((5, 3, 4))
    for i in range(3):
        for j in range(4):
            expected[:, i, j] = np.asarray(A)[i, :, j] + np.asarray(B)[:, j].sum() + C[i]
    np.testing.assert_allclose(np.asarray(result), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- output placement


@pytest.mark.parametrize(
    ("out_pattern", "expected_shape", "hand_out_axes"),
    [
        (": i j :", (2, 3, 4, 5), (1, 1)),  # the ':' take fn's axes in order
        ("... i j", (2, 5, 3, 4), (-2, -1)),
        ("i ... j", (3, 2, 5, 4), (0, -1)),
        ("i j", (3, 4, 2, 5), (0, 0)),  # neither: fn's axes follow the named axes
        ("i j ...", (3, 4, 2, 5), (0, 0)),
        (": i ... j", (2, 3, 5, 4), (1, -1)),
    ],
)
def test_fn_output_axes_fill_colons_or_ellipsis(
    out_pattern: str, expected_shape: tuple[int, ...], hand_out_axes: tuple[int, int]
) -> None:
    def fn(x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.outer(x, y)  # (2, 5) per element

    x, y = normal(0, 3, 2), normal(1, 4, 5)
    hand = jax.vmap(
        jax.vmap(fn, in_axes=(None, 0), out_axes=hand_out_axes[1]),
        in_axes=(0, None),
        out_axes=hand_out_axes[0],
    )
    result = fancy_vmap(fn, f"i :, j : -> {out_pattern}")(x, y)
    assert result.shape == expected_shape
    assert_close(result, hand(x, y))


# ---------------------------------------------------------------- pytrees, kwargs, tuples


def test_pattern_applies_to_every_leaf_of_pytree_arguments_and_outputs() -> None:
    def layer(params: dict[str, jax.Array], x: jax.Array) -> dict[str, jax.Array]:
        h = params["w"] @ x + params["b"]
        return {"h": h, "norm": jnp.linalg.norm(h)}

    params = {"w": normal(0, 4, 3, 5), "b": normal(1, 4, 3)}  # 4 models
    x = normal(2, 6, 5)  # 6 inputs
    hand = jax.vmap(jax.vmap(layer, in_axes=(None, 0)), in_axes=(0, None))
    expected = hand(params, x)
    assert_close(fancy_vmap(layer, "m ..., n : -> m n ...")(params, x), expected)
    assert_close(
        fancy_vmap(layer, "out[m, n] = layer(params[m, ...], x[n, :])")(params, x), expected
    )


def test_whole_arguments_may_be_any_object_and_kwargs_pass_unmapped() -> None:
    def fn(x: jax.Array, config: dict[str, Any], *, scale: jax.Array, mode: str) -> jax.Array:
        assert mode == "affine" and config["name"] == "layer"  # plain Python values arrive
        return x * scale + config["shift"]

    x, scale, shift = normal(0, 3, 4), normal(1, 4), normal(2, 4)
    config = {"name": "layer", "shift": shift}
    result = fancy_vmap(fn, "y[i, :] = fn(x[i, :], config)")(x, config, scale=scale, mode="affine")
    hand = jax.vmap(functools.partial(fn, config=config, scale=scale, mode="affine"))(x)
    assert_close(result, hand)
    einsum = fancy_vmap(fn, "i :, ... -> i :")(x, config, scale=scale, mode="affine")
    assert_close(einsum, hand)


class Pair(NamedTuple):
    total: jax.Array
    diff: jax.Array


@pytest.mark.parametrize("container", [tuple, list, Pair])
def test_tuple_outputs_take_one_pattern_each(container: Any) -> None:
    def fn(a: jax.Array, b: jax.Array) -> Any:
        parts = (a[:, None] + b, jnp.sum(a) - b)  # (2, 3) and (3,) per element
        return container(*parts) if container is Pair else container(parts)

    a, b = normal(0, 4, 2), normal(1, 5, 3)
    result = fancy_vmap(fn, "i :, j : -> : i : j, j : i")(a, b)
    assert type(result) is container
    inner = jax.vmap(lambda a, b: tuple(fn(a, b)), in_axes=(None, 0), out_axes=(2, 0))
    hand = jax.vmap(inner, in_axes=(0, None), out_axes=(1, 2))(a, b)
    assert result[0].shape == (2, 4, 3, 5) and result[1].shape == (5, 3, 4)
    assert_close(tuple(result), hand)


def test_single_output_pattern_applies_to_every_leaf_of_a_tuple_output() -> None:
    def fn(a: jax.Array) -> tuple[jax.Array, jax.Array]:
        return jnp.sin(a), jnp.cos(a)

    x = normal(0, 3, 4)
    result = fancy_vmap(fn, "i j -> j i")(x)
    assert_close(result, (jnp.sin(x).T, jnp.cos(x).T))


def test_no_named_axes_calls_fn_directly() -> None:
    x = normal(0, 3)
    assert_close(fancy_vmap(jnp.sin, "... -> ...")(x), jnp.sin(x))
    assert_close(fancy_vmap(lambda: x, "out = f()")(), x)


def test_wrapper_keeps_the_metadata_of_fn() -> None:
    def my_kernel(a: jax.Array) -> jax.Array:
        """Doubles."""
        return 2 * a

    wrapped = fancy_vmap(my_kernel, "i -> i")
    assert wrapped.__name__ == "my_kernel"
    assert wrapped.__doc__ == "Doubles."
    assert wrapped.__wrapped__ is my_kernel  # type: ignore[attr-defined]


# ---------------------------------------------------------------- collectives and meshes


def test_named_axes_are_vmap_axis_names_for_collectives() -> None:
    def normalize(a: jax.Array, b: jax.Array) -> jax.Array:
        total = jax.lax.psum(a * b, "j")
        return a * b / total + jax.lax.pmax(a, "i")

    a, b = jnp.exp(normal(0, 3)), jnp.exp(normal(1, 4))
    result = fancy_vmap(normalize, "i, j -> i j")(a, b)
    outer = np.outer(np.asarray(a), np.asarray(b))
    expected = outer / outer.sum(axis=1, keepdims=True) + np.asarray(a).max()
    np.testing.assert_allclose(np.asarray(result), expected, rtol=1e-5)


def test_spmd_axis_name_maps_a_named_axis_onto_a_mesh_axis() -> None:
    devices = np.array(jax.devices())
    mesh = Mesh(devices, ("data",))

    def fn(x: jax.Array, w: jax.Array) -> jax.Array:
        y = jax.lax.with_sharding_constraint(x * w, NamedSharding(mesh, P()))
        return y.sum(-1)

    x, w = normal(0, 2 * devices.size, 3, 4), normal(1, 3, 4)
    ours = fancy_vmap(fn, "b s :, s : -> b s", spmd_axis_name={"b": "data"})
    hand = jax.vmap(jax.vmap(fn), in_axes=(0, None), spmd_axis_name="data")
    ours_jaxpr, hand_jaxpr = jax.make_jaxpr(ours)(x, w), jax.make_jaxpr(hand)(x, w)
    assert str(ours_jaxpr) == str(hand_jaxpr)
    assert "'data'" in str(ours_jaxpr)  # the mesh axis reached the sharding constraint
    assert_close(jax.jit(ours)(x, w), (x * w).sum(-1))


def test_spmd_axis_name_is_checked() -> None:
    with pytest.raises(ValueError, match=re.escape("spmd_axis_name names axis 'k', which pattern")):
        fancy_vmap(jnp.sin, "i j -> i j", spmd_axis_name={"k": "data"})
    with pytest.raises(TypeError, match="spmd_axis_name must map axis names"):
        fancy_vmap(jnp.sin, "i j -> i j", spmd_axis_name="data")  # type: ignore[arg-type]


# ---------------------------------------------------------------- transformations


def test_works_under_jit_grad_and_eval_shape() -> None:
    A, B, C = normal(0, 3, 5, 4), normal(1, 7, 4), normal(2, 3)
    vectorized = fancy_vmap(seed_fn, "i : j, : j, i -> : i j")
    hand = jax.vmap(
        jax.vmap(seed_fn, in_axes=(1, 1, None), out_axes=1), in_axes=(0, None, 0), out_axes=1
    )
    assert_close(jax.jit(vectorized)(A, B, C), hand(A, B, C))

    def loss(f: Any) -> Any:
        return lambda *args: jnp.sum(jnp.tanh(f(*args)))

    assert_close(
        jax.grad(loss(vectorized), argnums=(0, 1, 2))(A, B, C),
        jax.grad(loss(hand), argnums=(0, 1, 2))(A, B, C),
    )
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (A, B, C)]
    out = jax.eval_shape(vectorized, *shapes)
    assert out.shape == (5, 3, 4) and out.dtype == jnp.float32


def test_nested_fancy_vmap_matches_a_flat_one() -> None:
    def inner(a: jax.Array, b: jax.Array) -> jax.Array:
        return fancy_vmap(lambda x, y: jnp.dot(x, y), "j :, : -> j")(a, b)

    a, b = normal(0, 3, 4, 5), normal(1, 3, 5)
    nested = fancy_vmap(inner, "i : :, i : -> i :")(a, b)
    flat = fancy_vmap(lambda x, y: jnp.dot(x, y), "i j :, i : -> i j")(a, b)
    assert_close(nested, flat)
    assert_close(jax.jit(fancy_vmap(inner, "i ..., i : -> i ..."))(a, b), flat)


# ---------------------------------------------------------------- call-time errors


def error_line(info: Any) -> str:
    return str(info.value).splitlines()[0]


def test_wrong_argument_count() -> None:
    vectorized = fancy_vmap(lambda a, b: a * b, "i, j -> i j")
    message = "the pattern describes 2 positional argument(s), but the function was called with 3"
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        vectorized(jnp.ones(3), jnp.ones(2), jnp.ones(2))
    assert str(info.value).splitlines()[-1].strip() == "^^^^"  # under 'i, j'


def test_arrays_passed_as_keywords_are_never_mapped_and_the_message_says_so() -> None:
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
    vectorized = fancy_vmap(lambda a, b: a * b, "out[i, :] = f(A[i, :], B[i, :])")
    message = "keyword arguments are never mapped (they reach fn as they are), and 'b' came"
    with pytest.raises(ValueError, match=re.escape(message)):
        vectorized(x, b=y)
    np.testing.assert_allclose(vectorized(x, y), x * y)  # positionally, it maps both
    # A keyword that is no array (a flag) is fine, and adds nothing to the count message.
    with pytest.raises(ValueError, match=r"called with 1\n"):
        fancy_vmap(lambda a, b, scale=1: a * b, "i, i -> i")(x, scale=2)


@pytest.mark.parametrize(
    ("fmt", "shapes", "message"),
    [
        (
            "i : j, : j, i -> : i j",
            [(3, 5), (7, 4), (3,)],
            "argument 0 with pattern 'i : j' has shape (3, 5) of rank 2, but its pattern needs"
            " rank 3",
        ),
        (
            "out[:, i, j] = f(A[i, :, j], B[:, j], C[i])",
            [(3, 5, 4), (7, 4), (3, 1)],
            "argument 2 'C[i]' has shape (3, 1) of rank 2, but its pattern needs rank 1",
        ),
        (
            "i : ... j, i -> i j",
            [(3, 4), (3,)],
            "argument 0 with pattern 'i : ... j' has shape (3, 4) of rank 2, but its pattern"
            " needs rank at least 3",
        ),
    ],
)
def test_argument_rank_must_fit_its_pattern(fmt: str, shapes: Any, message: str) -> None:
    vectorized = fancy_vmap(lambda *args: args[-1], fmt)
    with pytest.raises(ValueError, match=re.escape(message)):
        vectorized(*[jnp.ones(s) for s in shapes])


def test_one_axis_bound_to_two_sizes_names_both_arguments() -> None:
    vectorized = fancy_vmap(seed_fn, "i : j, : j, i -> : i j")
    message = (
        "axis 'j' has size 4 in argument 0 with pattern 'i : j' (shape (3, 5, 4)) but size 6 in"
        " argument 1 with pattern ': j' (shape (7, 6))"
    )
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        vectorized(jnp.ones((3, 5, 4)), jnp.ones((7, 6)), jnp.ones(3))
    quoted, carets = str(info.value).splitlines()[-2:]
    assert carets.index("^") == quoted.index(": j, i") + 2  # under the second 'j'
    assert carets.count("^") == 1


def test_size_mismatch_between_leaves_of_one_pytree_names_the_leaves() -> None:
    vectorized = fancy_vmap(lambda p: p, "i -> i")
    message = "axis 'i' has size 3 in argument 0 with pattern 'i', leaf ['a'] (shape (3,)) but"
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        vectorized({"a": jnp.ones(3), "b": jnp.ones(4)})
    assert "size 4 in argument 0 with pattern 'i', leaf ['b'] (shape (4,))" in error_line(info)


def test_axis_without_any_array_to_size_it() -> None:
    with pytest.raises(ValueError, match="axis 'i' has no size: argument 0 holds no arrays"):
        fancy_vmap(lambda p, x: x, "i, ... -> i")({}, jnp.ones(3))


def test_non_array_leaf_in_a_mapped_argument_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"argument 0 with pattern 'i', leaf \['n'\] is a str"):
        fancy_vmap(lambda p: p, "i -> i")({"n": "name", "x": jnp.ones(3)})


@pytest.mark.parametrize(
    ("fmt", "returned", "message"),
    [
        (
            "i -> i :",
            jnp.ones((2, 2)),
            "output pattern 'i :' has 1 ':' for the axes of fn's own output, so fn must return"
            " rank 1 for each element, but the output has shape (2, 2) of rank 2",
        ),
        (
            "i -> : i ... :",
            jnp.ones(4),
            "output pattern ': i ... :' has 2 ':' for the axes of fn's own output, so fn must"
            " return rank at least 2 for each element, but the output has shape (4,) of rank 1",
        ),
        (
            "i -> i :",
            {"a": jnp.ones(2), "b": jnp.ones(())},
            "so fn must return rank 1 for each element, but the output, leaf ['b'] has shape ()",
        ),
        (
            "i -> i :, i",
            (jnp.ones(()), jnp.ones(())),
            "output pattern 'i :' has 1 ':' for the axes of fn's own output, so fn must return"
            " rank 1 for each element, but output 0 has shape () of rank 0",
        ),
    ],
)
def test_output_rank_must_fit_the_output_pattern(fmt: str, returned: Any, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        fancy_vmap(lambda x: returned, fmt)(jnp.ones(3))
    with pytest.raises(ValueError, match=re.escape(message)):
        jax.jit(fancy_vmap(lambda x: returned, fmt))(jnp.ones(3))


def test_tuple_output_patterns_need_a_tuple_of_that_length() -> None:
    vectorized = fancy_vmap(lambda x: (x, x, x), "i -> i, i")
    message = "the pattern has 2 output pattern(s), so fn must return a tuple of 2; it returned"
    with pytest.raises(ValueError, match=re.escape(message + " a tuple of length 3")):
        vectorized(jnp.ones(3))
    with pytest.raises(ValueError, match=re.escape(message + " a single array of shape (2,)")):
        fancy_vmap(lambda x: jnp.ones(2), "i -> i, i")(np.ones(3))


def test_bad_fn_and_non_array_outputs_are_type_errors() -> None:
    with pytest.raises(TypeError, match="fn must be callable, got str"):
        fancy_vmap("sin", "i -> i")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fn returned a str as the output"):
        fancy_vmap(lambda x: "text", "i -> i")(jnp.ones(3))


def test_malformed_pattern_fails_when_fancy_vmap_is_called() -> None:
    with pytest.raises(ValueError, match="output axis 'k' appears in no input pattern"):
        fancy_vmap(jnp.add, "i, j -> i j k")


def test_format_is_parsed_once_when_fancy_vmap_is_called(monkeypatch: pytest.MonkeyPatch) -> None:
    import jaxmodules.vectorize._core as core

    calls: list[str] = []
    real_parse = core.parse_pattern

    def counting_parse(fmt: str) -> Any:
        calls.append(fmt)
        return real_parse(fmt)

    monkeypatch.setattr(core, "parse_pattern", counting_parse)
    vectorized = fancy_vmap(jnp.multiply, "i, j -> i j")
    assert calls == ["i, j -> i j"]
    for seed in range(3):
        a, b = normal(seed, 3), normal(seed + 10, 2)
        assert_close(vectorized(a, b), jnp.outer(a, b))
    assert jax.jit(vectorized)(a, b).shape == (3, 2)
    assert calls == ["i, j -> i j"]
