"""The residual stack of the LRU paper (Orvieto et al. 2023) around a linear recurrence.

A linear encoder `I -> H`, then `num_layers` blocks
`x + dropout(GLU(GELU(cell(LayerNorm(x)))))`, time-major throughout (the unroll then
needs no transposes of the `[B, T, H]` activations, which XLA:CPU fuses into slow
strided copies: with the associative scan a pixel-MNIST train step measured 1057 ms
batch-major against 602 ms time-major). A linear recurrence alone cannot multiply its
inputs together; the GLU between blocks can. The pixel-MNIST and synthetic-memory
experiments put their own heads on it.

The LRU paper trains the recurrence's `ν_log, θ_log, γ_log` (`LRU_RECURRENT_KEYS`)
with a smaller learning rate. `rnnlab.train` has one learning rate for all params, so
with `recurrent_lr_factor != 1` the blocks store these three as
`value / recurrent_lr_factor` and multiply them back before use: Adam's step is
invariant to the gradient's scale, so the values then move `recurrent_lr_factor` times
as fast as the other params.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections

import rnnlab
from rnnlab.cells.base import Array, Params, PRNGKey, RNNCell
from rnnlab.cells.griffin import rg_lru
from rnnlab.cells.linear import lru, min_gru
from rnnlab.wrappers import inverted_dropout

LINEAR_CELL_TYPES = ("lru", "min_gru", "rg_lru")
LRU_RECURRENT_KEYS = ("nu_log", "theta_log", "gamma_log")


def make_linear_cell(config: ml_collections.ConfigDict) -> RNNCell:
    """The recurrence of one block: `lru(H, N, r_min, r_max, max_phase)`, `min_gru(H)`
    or `rg_lru(H, min_radius=r_min, max_radius=r_max)` for `config.cell` in
    `LINEAR_CELL_TYPES` and `H = config.num_units`."""
    if config.cell == "lru":
        return lru(config.num_units, config.state_size, r_min=config.r_min, r_max=config.r_max,
                   max_phase=config.max_phase)
    if config.cell == "rg_lru":
        return rg_lru(config.num_units, min_radius=config.r_min, max_radius=config.r_max)
    return min_gru(config.num_units)


def dense(key: PRNGKey, fan_in: int, fan_out: int) -> Params:
    """A linear layer's params: `w: [fan_in, fan_out]` Glorot uniform, `b: [fan_out]` zeros."""
    return {"w": jax.nn.initializers.glorot_uniform()(key, (fan_in, fan_out)), "b": jnp.zeros((fan_out,))}


def apply_dense(params: Params, x: Array) -> Array:
    """`x·w + b` for `x: [..., fan_in]`."""
    return x @ params["w"] + params["b"]


def layer_norm(params: Params, x: Array) -> Array:
    """LayerNorm over the last axis of `x: [..., H]`, with scale and bias `[H]`."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    variance = jnp.var(x, axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(variance + 1e-5) * params["scale"] + params["bias"]


def dropout(rng: Optional[PRNGKey], rate: float, x: Array) -> Array:
    """Inverted dropout of `x` at drop rate `rate`; the identity without `rng` or at 0."""
    return x if rng is None else inverted_dropout(rng, x, 1.0 - rate)


def _scale_recurrent(cell_params: Params, factor: float) -> Params:
    """`cell_params` with `LRU_RECURRENT_KEYS` multiplied by `factor`."""
    return {name: value * factor if name in LRU_RECURRENT_KEYS else value for name, value in cell_params.items()}


class ResidualBlocks(NamedTuple):
    """The encoder and blocks as pure functions.

    Attributes:
      init: `(encoder_key, block_keys) -> {"encoder", "blocks"}`, one key per block.
      apply: `(params, x [T, B, I], rng=None) -> [T, B, H]`; `rng` draws the blocks'
        dropout (training), `None` runs without.
    """

    init: Callable[[PRNGKey, Sequence[PRNGKey]], Params]
    apply: Callable[..., Array]


def residual_blocks(
    cell: RNNCell,
    input_size: int,
    method: str,
    *,
    dropout_rate: float = 0.0,
    recurrent_lr_factor: float = 1.0,
) -> ResidualBlocks:
    """The encoder and blocks around `cell`.

    Args:
      cell: the blocks' recurrence, of width `H = cell.output_size` (its input size is
        `H` too).
      input_size: `I`, the features per step the encoder reads.
      method: `rnnlab.unroll`'s method for every block.
      dropout_rate: drop rate after every block's GLU, when `apply` gets an `rng`.
      recurrent_lr_factor: the learning-rate factor of the LRU's `LRU_RECURRENT_KEYS`
        (module docstring); other cells have none of them.

    `init` takes the encoder's key and the blocks' keys apart, so that a model can
    split one key among them and its own layers in the order it always has (the
    pixel-MNIST models keep their parameters, and results, seed for seed).
    """
    width, factor = cell.output_size, recurrent_lr_factor

    def init_block(key: PRNGKey) -> Params:
        cell_key, value_key, gate_key = jax.random.split(key, 3)
        return {
            "norm": {"scale": jnp.ones((width,)), "bias": jnp.zeros((width,))},
            "cell": _scale_recurrent(cell.init(cell_key, width), 1.0 / factor),
            "glu_value": dense(value_key, width, width),
            "glu_gate": dense(gate_key, width, width),
        }

    def init(encoder_key: PRNGKey, block_keys: Sequence[PRNGKey]) -> Params:
        return {"encoder": dense(encoder_key, input_size, width), "blocks": [init_block(key) for key in block_keys]}

    def block(params: Params, x: Array, rng: Optional[PRNGKey]) -> Array:
        normed = layer_norm(params["norm"], x)
        y, _ = rnnlab.unroll(cell, _scale_recurrent(params["cell"], factor), normed, method=method, time_major=True)
        y = jax.nn.gelu(y)
        y = apply_dense(params["glu_value"], y) * jax.nn.sigmoid(apply_dense(params["glu_gate"], y))
        return x + dropout(rng, dropout_rate, y)

    def apply(params: Params, x: Array, rng: Optional[PRNGKey] = None) -> Array:
        x = apply_dense(params["encoder"], x)
        num_blocks = len(params["blocks"])
        rngs = [None] * num_blocks if rng is None else list(jax.random.split(rng, num_blocks))
        for block_params, block_rng in zip(params["blocks"], rngs):
            x = block(block_params, x, block_rng)
        return x

    return ResidualBlocks(init, apply)
