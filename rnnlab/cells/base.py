"""The cell abstraction: a recurrent cell is a small named tuple of pure functions.

A cell steps ONE example. Batching is `jax.vmap`; `rnnlab.unroll` does it for you.

    cell = rnnlab.cells.lstm(128)
    params = cell.init(key, input_size=28)     # pytree of arrays
    state = cell.initial_state(params)         # pytree for one example
    state, y = cell.step(params, state, x_t)   # x_t: [input_size] -> y: [output_size]

Cells may also split their step into a part that is linear in the input and a
recurrent rest (`input_projection` and `projected_step`). The unroll helpers use the
split to compute the input projection of every time step in one large matrix
multiply before the sequential loop ("hoisting"); `step` always equals
`projected_step(params, state, input_projection(params, x))`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

Array = jax.Array
PRNGKey = jax.Array
Params = Any  # a pytree (nested dicts) of arrays
State = Any  # a pytree of arrays for one example

InitFn = Callable[[PRNGKey, int], Params]
InitialStateFn = Callable[..., State]  # (params, rng: PRNGKey | None = None) -> State
StepFn = Callable[[Params, State, Array], tuple[State, Array]]
ProjectionFn = Callable[[Params, Array], Array]


class LinearRecurrence(NamedTuple):
    """The pieces of a cell whose update is `h_t = a_t * h_{t-1} + b_t`.

    Such a cell can be unrolled with `jax.lax.associative_scan` (`method="associative"`).

    Attributes:
      coefficients: `(params, x) -> (a, b)` for ONE time step of one example; `a` and
        `b` have the structure and shape of the state `h` and depend on `x` only.
      readout: `(params, h, x) -> y`, the output at a step from the new state and input.
      log_coefficients: optional `(params, x) -> (log_a, log_b)`, the logarithms of
        `coefficients` for cells whose `a` and `b` are positive. When set, the
        associative unroll scans in log space, which stays accurate over long sequences.
      constant_a: `a` depends on the params only, not on `x` (a time-invariant
        recurrence, like the LRU's `a = λ`). The unroll then computes `a` once and
        broadcasts it, instead of storing it for every step and example.
    """

    coefficients: Callable[[Params, Array], tuple[Any, Any]]
    readout: Callable[[Params, Any, Array], Array]
    log_coefficients: Optional[Callable[[Params, Array], tuple[Any, Any]]] = None
    constant_a: bool = False


class RNNCell(NamedTuple):
    """A recurrent cell as pure functions over pytree parameters and state.

    Attributes:
      init: `(key, input_size) -> params`.
      initial_state: `(params, rng=None) -> state` for one example. `rng` is used only by
        cells with randomness (dropout); `None` means deterministic (evaluation).
      step: `(params, state, x) -> (state, y)` with `x: [input_size]`, `y: [output_size]`.
      output_size: the size of `y`.
      name: a short description, e.g. `"lstm(128, peepholes)"`.
      input_projection: optional `(params, x) -> z`, the part of the step linear in `x`;
        applied to any leading batch/time axes of `x` at once.
      projected_step: optional `(params, state, z) -> (state, y)` consuming `z`.
      linear_recurrence: set by cells linear in their state (see `LinearRecurrence`).
      layers: set by `rnnlab.stack`: the stacked cells, which lets the unroll run the
        stack layer by layer (hoisting every layer's input projection); the state is
        then the tuple of the layers' states.
      fused_scan: optional `(params, xs [T, B, I], batched state, lengths [B] | None,
        unroll, hoist) -> (ys [T, B, O], final state)`, the whole `lax.scan` of `step` with a
        hand-written backward pass (`rnnlab.cells.lstm_scan`, `gru_scan`, `rnn_scan`);
        `rnnlab.unroll` runs it instead of `step` and of `input_projection` +
        `projected_step` (see its `fused` argument), so a cell whose step or its split
        is replaced (`cell._replace(step=...)`) must drop it too.
    """

    init: InitFn
    initial_state: InitialStateFn
    step: StepFn
    output_size: int
    name: str
    input_projection: Optional[ProjectionFn] = None
    projected_step: Optional[StepFn] = None
    linear_recurrence: Optional[LinearRecurrence] = None
    layers: Optional[tuple["RNNCell", ...]] = None
    fused_scan: Optional[Callable[..., tuple[Array, State]]] = None

    @property
    def can_hoist(self) -> bool:
        """Whether the unroll may precompute the input projection of all steps."""
        return self.input_projection is not None and self.projected_step is not None


def is_real_number(value: Any) -> bool:
    """Whether `value` is a real number, Python's or NumPy's; booleans are not numbers here."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real)


def is_positive_finite(value: Any) -> bool:
    """Whether `value` is a real number (see `is_real_number`), finite and > 0."""
    return is_real_number(value) and math.isfinite(value) and value > 0


def check_positive_int(value: Any, name: str) -> int:
    """Returns `value` as an int, raising `ValueError` unless it is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value


def check_input(x: Array, input_size: int, cell_name: str) -> None:
    """Raises a clear error unless `x` is one example's input of size `input_size`.

    Runs at trace time (shapes are static), so it costs nothing under `jit`.
    """
    if jnp.ndim(x) != 1:
        raise ValueError(
            f"{cell_name}.step expects one example's input of shape [input_size]="
            f"[{input_size}], got shape {tuple(jnp.shape(x))}. Batch with jax.vmap or "
            "use rnnlab.unroll."
        )
    if x.shape[0] != input_size:
        raise ValueError(
            f"{cell_name}: input has size {x.shape[0]} but the params were initialised "
            f"for input_size={input_size}."
        )


def hoistable_cell(
    name: str,
    output_size: int,
    init: InitFn,
    initial_state: InitialStateFn,
    input_projection: ProjectionFn,
    projected_step: StepFn,
    *,
    input_kernel: str = "w_x",
    linear_recurrence: Optional[LinearRecurrence] = None,
    fused_scan: Optional[Callable[..., tuple[Array, State]]] = None,
) -> RNNCell:
    """The `RNNCell` of a step split for hoisting. Its `step` is
    `projected_step(params, state, input_projection(params, x))`, with `x` checked
    against the input size of `params[input_kernel]` (`[input_size, ...]`)."""

    def step(params: Params, state: State, x: Array) -> tuple[State, Array]:
        check_input(x, params[input_kernel].shape[0], name)
        return projected_step(params, state, input_projection(params, x))

    return RNNCell(
        init=init,
        initial_state=initial_state,
        step=step,
        output_size=output_size,
        name=name,
        input_projection=input_projection,
        projected_step=projected_step,
        linear_recurrence=linear_recurrence,
        fused_scan=fused_scan,
    )


def affine_input_projection(params: Params, x: Array) -> Array:
    """`x·W_x + b` for `x: [..., I]`, `params["w_x"]: [I, G]`, `params["b"]: [G]`."""
    return x @ params["w_x"] + params["b"]


def zero_state(size: int, dtype_of: str) -> InitialStateFn:
    """`initial_state` for a state that is one `[size]` vector of zeros, in the dtype of
    `params[dtype_of]`."""

    def initial_state(params: Params, rng: Optional[PRNGKey] = None) -> Array:
        del rng
        return jnp.zeros((size,), params[dtype_of].dtype)

    return initial_state


def glorot_uniform(key: PRNGKey, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
    """Glorot/Xavier uniform, the default kernel initialiser of TF1 and Keras RNN cells."""
    return jax.nn.initializers.glorot_uniform()(key, shape, dtype)


def orthogonal(key: PRNGKey, shape: tuple[int, int], num_blocks: int = 1, dtype=jnp.float32) -> Array:
    """Orthogonal init, Keras' default for recurrent kernels (Saxe et al., 2014).

    A gated kernel `[R, num_blocks * H]` gets one orthogonal `[R, H]` block per gate.
    """
    rows, cols = shape
    if cols % num_blocks:
        raise ValueError(f"orthogonal: {cols} columns do not split into {num_blocks} blocks.")
    keys = jax.random.split(key, num_blocks)
    block_shape = (rows, cols // num_blocks)
    return jnp.concatenate([jax.nn.initializers.orthogonal()(k, block_shape, dtype) for k in keys], axis=1)
