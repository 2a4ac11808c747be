"""A small decoder-only transformer in plain JAX, trained with optax.

The demo (``train_tiny_lm.py``) and the integration tests (``tests-integration/``) both
use this module, so the tests check exactly the code the demo runs.

Where the three jaxmodules packages come in:

* ``masked_attention_via_map`` computes every causal self-attention layer (or
  ``ring_attention`` with the sequence split over a mesh axis: context parallelism);
* ``fancy_vmap`` writes the per-example, per-head and per-token parts as functions of
  one example (one head, one token) and vectorizes them by pattern;
* ``emit`` reports two attention statistics per layer from inside the layer, under a
  ``scope`` per layer; ``collect`` around the loss gathers them as named ``Log``s, which
  come out of ``grad`` as auxiliary output. The step's own values (loss, gradient norm,
  learning rate) are ``Log``s it puts in the training state itself. All of them travel
  in the state through ``jit`` and ``lax.scan`` and come out by name.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxmodules.attention import masked_attention_via_map, ring_attention
from jaxmodules.logstate import Log, collect, emit, scope
from jaxmodules.vectorize import fancy_vmap

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Config:
    """Model and optimizer settings; hashable, so it can be a static argument of ``jit``."""

    vocab_size: int
    seq_len: int = 64
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    mlp_ratio: int = 4
    # Query and key block size of the block-wise attention; the entropy statistic looks
    # at the first query block only.
    block_size: int = 32
    # "block": masked_attention_via_map. "dense": jax.nn.dot_product_attention, the
    # reference the integration tests compare against.
    attention: str = "block"
    # Context parallelism: with a mesh (a jax.sharding.Mesh, hashable) the block-wise
    # attention runs as ring_attention with the sequence split over ``seq_axis`` (natural
    # order; the call balances the causal work itself) and, if given, the batch over
    # ``batch_axis``. None: one device's masked_attention_via_map (jit may still split
    # the batch over devices).
    mesh: Any = None
    seq_axis: str = "seq"
    batch_axis: str | None = None
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    total_steps: int = 1000
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class TrainState(NamedTuple):
    """Everything one training step reads and writes.

    The ``Log`` fields ``loss``, ``grad_norm`` and ``learning_rate`` are named by their
    path; ``model`` holds what the model emitted, by the names ``collect`` gave them:
    ``model.layers.<i>.attn.out_norm`` and ``model.layers.<i>.attn.entropy``.
    """

    params: Params
    opt_state: optax.OptState
    step: jax.Array
    loss: Log
    grad_norm: Log
    learning_rate: Log
    model: dict[str, Any]


# ----------------------------------------------------------------------------- model


def init_params(config: Config, key: jax.Array) -> Params:
    """Random initial parameters (GPT-2 style scales, residual projections scaled down)."""
    if config.d_model % config.n_heads:
        raise ValueError(
            f"d_model ({config.d_model}) must be a multiple of n_heads ({config.n_heads})"
        )
    d, h, e = config.d_model, config.n_heads, config.head_dim
    f = config.mlp_ratio * d
    residual_scale = 1.0 / math.sqrt(2 * config.n_layers)
    keys = iter(jax.random.split(key, 2 + 4 * config.n_layers))

    def normal(shape: tuple[int, ...], std: float) -> jax.Array:
        return std * jax.random.normal(next(keys), shape, jnp.float32)

    layers = [
        {
            "attn_norm": jnp.ones((d,)),
            "wqkv": normal((d, 3, h, e), 1.0 / math.sqrt(d)),
            "wo": normal((h, e, d), residual_scale / math.sqrt(d)),
            "mlp_norm": jnp.ones((d,)),
            "w_in": normal((d, f), 1.0 / math.sqrt(d)),
            "b_in": jnp.zeros((f,)),
            "w_out": normal((f, d), residual_scale / math.sqrt(f)),
            "b_out": jnp.zeros((d,)),
        }
        for _ in range(config.n_layers)
    ]
    return {
        # The embedding doubles as the output projection (tied weights).
        "embed": normal((config.vocab_size, d), 0.02),
        "pos": normal((config.seq_len, d), 0.02),
        "layers": layers,
        "final_norm": jnp.ones((d,)),
    }


def _rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def _causal_weights_one_head(q: jax.Array, k: jax.Array) -> jax.Array:
    """Dense causal softmax weights of one example and one head: (Lq, d), (Lk, d) -> (Lq, Lk)."""
    scores = q @ k.T / math.sqrt(q.shape[-1])
    visible = jnp.tril(jnp.ones(scores.shape, dtype=bool))
    return jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)


# (B, L, H, d) queries and keys -> (B, H, L, L) weights, one small function per example and head.
causal_attention_weights = fancy_vmap(_causal_weights_one_head, "b : h :, b : h : -> b h : :")


def _entropy(weights: jax.Array) -> jax.Array:
    """Entropy in nats of each row of attention weights (zero weights contribute nothing)."""
    safe = jnp.where(weights > 0, weights, 1.0)
    return -jnp.sum(weights * jnp.log(safe), axis=-1)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, config: Config) -> jax.Array:
    if config.attention == "block" and config.mesh is not None:
        return ring_attention(
            q,
            k,
            v,
            mesh=config.mesh,
            seq_axis=config.seq_axis,
            batch_axis=config.batch_axis,
            is_causal=True,
            block_size=config.block_size,
        )
    if config.attention == "block":
        return masked_attention_via_map(q, k, v, is_causal=True, block_size=config.block_size)
    if config.attention == "dense":
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)
    raise ValueError(f"attention must be 'block' or 'dense', got {config.attention!r}")


def _self_attention(
    layer: Params, x: jax.Array, config: Config, capture_weights: bool
) -> tuple[jax.Array, dict[str, Any]]:
    q, k, v = jnp.einsum("bld,dthe->tblhe", x, layer["wqkv"])  # each (B, L, H, head_dim)
    out = jnp.einsum("blhe,hed->bld", _attend(q, k, v, config), layer["wo"])

    # Statistics only: keep them out of the gradient. The entropy needs the attention
    # weights, which block-wise attention never forms, so recompute them densely for the
    # first query block alone (it sees only the first key block): a (block x block) softmax.
    block = min(config.block_size, q.shape[1])
    q0, k0, out0 = jax.lax.stop_gradient((q[:, :block], k[:, :block], out))
    first_block = causal_attention_weights(q0, k0)
    # Reported from here, where they are computed; outside collect these do nothing.
    emit("out_norm", jnp.mean(jnp.linalg.norm(out0, axis=-1)))
    emit("entropy", jnp.mean(_entropy(first_block)))
    stats: dict[str, Any] = {}
    if capture_weights:
        stats["weights"] = causal_attention_weights(q, k)
    return out, stats


def forward(
    params: Params, tokens: jax.Array, config: Config, *, capture_weights: bool = False
) -> tuple[jax.Array, dict[str, Any]]:
    """Next-token logits for ``tokens`` (B, L) with L <= seq_len, and per-layer extras.

    Each layer emits ``layers.<i>.attn.out_norm`` and ``layers.<i>.attn.entropy`` (for a
    surrounding ``collect``). The extras are ``{"layers": [{"attn": {...}}, ...]}``, empty
    unless ``capture_weights``: then each layer's dict holds the dense (B, H, L, L)
    attention weights (for plotting; do not use it for long sequences).
    """
    length = tokens.shape[1]
    x = params["embed"][tokens] + params["pos"][:length]
    layer_stats = []
    for i, layer in enumerate(params["layers"]):
        with scope(f"layers.{i}.attn"):
            attn_out, stats = _self_attention(
                layer, _rms_norm(x, layer["attn_norm"]), config, capture_weights
            )
        x = x + attn_out
        hidden = jax.nn.gelu(_rms_norm(x, layer["mlp_norm"]) @ layer["w_in"] + layer["b_in"])
        x = x + hidden @ layer["w_out"] + layer["b_out"]
        layer_stats.append({"attn": stats})
    logits = _rms_norm(x, params["final_norm"]) @ params["embed"].T
    return logits, {"layers": layer_stats}


def _token_nll(logits: jax.Array, target: jax.Array) -> jax.Array:
    """Negative log-likelihood of one target token under one row of logits."""
    return jax.nn.logsumexp(logits) - logits[target]


# (B, T, vocab) logits and (B, T) targets -> (B, T) losses.
token_nll = fancy_vmap(_token_nll, "b t :, b t -> b t")


def loss_fn(params: Params, batch: jax.Array, config: Config) -> tuple[jax.Array, dict[str, Any]]:
    """Mean next-token loss on ``batch`` (B, seq_len + 1) of token ids, and the model's
    extras; the model's emits are named ``model.layers.<i>.attn.<statistic>``."""
    with scope("model"):
        logits, stats = forward(params, batch[:, :-1], config)
    return jnp.mean(token_nll(logits, batch[:, 1:])), stats


# ----------------------------------------------------------------------------- training


def global_norm(tree: Any) -> jax.Array:
    """The L2 norm of all leaves of ``tree`` taken together."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree)))


def make_schedule(config: Config) -> optax.Schedule:
    """Linear warm-up, then cosine decay to a tenth of the peak learning rate."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=max(config.total_steps, config.warmup_steps + 1),
        end_value=config.learning_rate / 10,
    )


def make_optimizer(config: Config) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adamw(make_schedule(config), b2=0.99, weight_decay=config.weight_decay),
    )


def _zero_logs(config: Config) -> dict[str, Any]:
    """Log fields with the shapes and dtypes a step writes, so the state's structure never
    changes (no retracing of the jitted step, a valid ``lax.scan`` carry)."""
    zero = jnp.zeros((), jnp.float32)
    # What collect returns for the model: its emits, in the order the layers make them.
    names = [
        f"model.layers.{i}.attn.{stat}"
        for i in range(config.n_layers)
        for stat in ("out_norm", "entropy")
    ]
    return {
        "loss": Log(zero),
        "grad_norm": Log(zero),
        "learning_rate": Log(zero),
        "model": OrderedDict((name, Log(zero, name=name)) for name in names),
    }


def init_state(config: Config, key: jax.Array) -> TrainState:
    params = init_params(config, key)
    return TrainState(
        params=params,
        opt_state=make_optimizer(config).init(params),
        step=jnp.zeros((), jnp.int32),
        **_zero_logs(config),
    )


def make_train_step(config: Config) -> Callable[[TrainState, jax.Array], TrainState]:
    """``train_step(state, batch) -> state``: one optimizer step; jit it at the call site."""
    optimizer = make_optimizer(config)
    schedule = make_schedule(config)

    def loss_and_logs(params: Params, batch: jax.Array) -> tuple[jax.Array, Any]:
        (loss, _), logs = collect(loss_fn)(params, batch, config)
        return loss, logs

    def train_step(state: TrainState, batch: jax.Array) -> TrainState:
        # What the model emitted comes back through grad as auxiliary output.
        (loss, model_logs), grads = jax.value_and_grad(loss_and_logs, has_aux=True)(
            state.params, batch
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return TrainState(
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            step=state.step + 1,
            loss=Log(loss),
            grad_norm=Log(global_norm(grads)),
            # The rate this step used (optax counts from 0 as well).
            learning_rate=Log(jnp.asarray(schedule(state.step), jnp.float32)),
            model=model_logs,
        )

    return train_step


# ----------------------------------------------------------------------------- sampling


def generate(
    params: Params,
    prompt: jax.Array,
    key: jax.Array,
    *,
    config: Config,
    num_tokens: int,
    temperature: float = 1.0,
) -> jax.Array:
    """``prompt`` (P,) of token ids followed by ``num_tokens`` sampled ones.

    Each new token sees at most the last ``seq_len`` tokens. Jit it with ``config``,
    ``num_tokens`` and ``temperature`` static.
    """
    if prompt.ndim != 1 or prompt.shape[0] < 1:
        raise ValueError(f"prompt must be a non-empty 1-D array of token ids, got {prompt.shape}")
    window = config.seq_len
    total = prompt.shape[0] + num_tokens
    # At least one window long, so a window can always be sliced; unused positions are
    # never seen (causal attention).
    buffer = jnp.zeros((max(total, window),), jnp.int32).at[: prompt.shape[0]].set(prompt)

    def add_token(i: jax.Array, state: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        buffer, key = state
        last = prompt.shape[0] - 1 + i
        start = jnp.clip(last + 1 - window, 0, buffer.shape[0] - window)
        context = jax.lax.dynamic_slice(buffer, (start,), (window,))
        logits, _ = forward(params, context[None], config)
        key, subkey = jax.random.split(key)
        token = jax.random.categorical(subkey, logits[0, last - start] / temperature)
        return buffer.at[last + 1].set(token.astype(jnp.int32)), key

    buffer, _ = jax.lax.fori_loop(0, num_tokens, add_token, (buffer, key))
    return buffer[:total]
