"""The rnnlab side of the benchmark: cells, data, the classifier, and the compiled
forward and train-step programs for each unroll method.

The model is a one-layer RNN classifier: `rnnlab.unroll` (or `rnnlab.bidirectional`)
over `[B, T, I]` inputs, a linear head on the output at the last valid step, softmax
cross-entropy. The train step is forward + backward + Adam (optax), jitted as a whole,
with the params and optimiser state donated and carried from call to call.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rnnlab
from rnnlab.bench.config import MethodSpec, Shape, Workload
from rnnlab.bench.timing import Program, compile_jax, jax_program
from rnnlab.cells.base import Params, RNNCell

LEARNING_RATE = 1e-3

CELLS: dict[str, tuple[str, dict[str, Any]]] = {
    "lstm": ("lstm", {}),
    "ln_lstm": ("lstm", {"layer_norm": True}),
    "lstmp": ("lstm", {"peepholes": True, "cell_clip": 3.0}),
    "gru": ("gru", {}),
    "gru_reset_after": ("gru", {"reset_after": True}),
    "basic_rnn": ("basic_rnn", {}),
    "indrnn": ("indrnn", {}),
    "min_gru": ("min_gru", {}),
    "min_lstm": ("min_lstm", {}),
    "min_gru_log": ("min_gru", {"log_space": True}),
    "min_lstm_log": ("min_lstm", {"log_space": True}),
    "lru": ("lru", {}),
    "rg_lru": ("rg_lru", {}),
}
"""Benchmark cell name -> (factory in `rnnlab.cells`, keyword arguments). `lru` gets
`state_size = num_units` and needs `input_size == num_units`; `lstmp` (TF1's
`LSTMCell` with peepholes, cell clipping and a projection, as in speech models) gets
`num_proj = num_units // 2`."""


class CellUnavailable(Exception):
    """The cell's factory is not (yet) part of `rnnlab.cells`."""


class Data(NamedTuple):
    """A fixed batch: inputs `x: [B, T, I]`, integer `labels: [B]`, `lengths: [B]`."""

    x: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray


def make_cell(name: str, num_units: int) -> RNNCell:
    """The rnnlab cell called `name` in `CELLS`, `num_units` wide."""
    if name not in CELLS:
        raise ValueError(f"unknown cell {name!r}; cells are {', '.join(CELLS)}.")
    factory_name, kwargs = CELLS[name]
    factory = getattr(rnnlab.cells, factory_name, None)
    if factory is None:
        raise CellUnavailable(f"rnnlab.cells has no {factory_name!r}")
    if name == "lru":
        kwargs = dict(kwargs, state_size=num_units)
    if name == "lstmp":
        kwargs = dict(kwargs, num_proj=max(num_units // 2, 1))
    return factory(num_units, **kwargs)


def make_data(shape: Shape, num_classes: int, seed: int) -> Data:
    """Standard normal inputs, uniform labels, lengths uniform in `[ceil(T/2), T]`."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((shape.batch_size, shape.seq_len, shape.input_size), dtype=np.float32)
    labels = rng.integers(0, num_classes, shape.batch_size).astype(np.int32)
    lengths = rng.integers((shape.seq_len + 1) // 2, shape.seq_len + 1, shape.batch_size).astype(np.int32)
    return Data(x, labels, lengths)


INPUT_KERNELS = ("w_x", "B_re", "B_im")
"""The cells' weights that multiply the classifier's input `x`: a train step needs no
gradient of `x`, so their backward pass is one matmul (the weight gradient), not two."""


def cell_matmul_flops(cell_params: Params, batch_size: int, seq_len: int, mode: str = "forward") -> float:
    """Matmul FLOPs of one call of a cell over `[B, T, ·]` inputs. Forward: `2·B·T·K·N`
    for each 2-D weight `[K, N]` (for an LSTM `2·B·T·(I+H)·4H`). Train step: 3x that
    for a weight whose input depends on the params (the forward matmul, its input's
    gradient and its own), 2x for the input kernels (`INPUT_KERNELS`), whose input `x`
    needs no gradient; for an LSTM `2·B·T·(2·I + 3·H)·4H`, as `floor/lstm_matmuls`
    counts it. Elementwise work is not counted."""
    total = 0.0
    for path, leaf in jax.tree_util.tree_leaves_with_path(cell_params):
        if jnp.ndim(leaf) != 2:
            continue
        forward = 2.0 * batch_size * seq_len * int(np.prod(leaf.shape))
        if mode == "forward":
            total += forward
        else:
            total += forward * (2 if getattr(path[-1], "key", None) in INPUT_KERNELS else 3)
    return total


def workload_flops(workload: Workload, rnn_params: Params, shape: Shape, mode: str) -> float:
    """Matmul FLOPs of one call of the workload's RNN, forward or train step
    (`cell_matmul_flops`, summed over the directions). The head is not counted."""
    directions = rnn_params.values() if "bidirectional" in workload.variants else [rnn_params]
    return sum(cell_matmul_flops(p, shape.batch_size, shape.seq_len, mode) for p in directions)


def init_classifier(workload: Workload, cell: RNNCell, shape: Shape, num_classes: int, seed: int) -> Params:
    """`{"rnn": cell params ({"fw", "bw"} if bidirectional), "head": {"w", "b"}}`."""
    key_rnn, key_head = jax.random.split(jax.random.PRNGKey(seed))
    bidirectional = "bidirectional" in workload.variants
    if bidirectional:
        rnn_params = rnnlab.init_bidirectional(cell, cell, key_rnn, shape.input_size)
    else:
        rnn_params = cell.init(key_rnn, shape.input_size)
    features = cell.output_size * (2 if bidirectional else 1)
    head = {
        "w": jax.random.normal(key_head, (features, num_classes)) / np.sqrt(features),
        "b": jnp.zeros((num_classes,)),
    }
    return {"rnn": rnn_params, "head": head}


def _at_step(ys: jax.Array, steps: jax.Array) -> jax.Array:
    """`ys[b, steps[b]]` for batch-major `ys: [B, T, O]`."""
    return jnp.take_along_axis(ys, steps[:, None, None], axis=1)[:, 0]


def rnn_apply(
    cell: RNNCell, workload: Workload, method: MethodSpec, rnn_params: Params, x: jax.Array, lengths: jax.Array
) -> tuple[jax.Array, Any, jax.Array]:
    """Runs the RNN part of the classifier.

    Args:
      x: `[B, T, I]`, or `[T, B, I]` when the method says `time_major`.
      lengths: `[B]`, used with the `lengths` variant only.

    Returns:
      `(outputs, final_state, features)`: outputs in the layout of `x`, the features
      `[B, F]` the head reads (the output at the last valid step; bidirectional: the
      forward output there and the backward output at step 0).
    """
    options = method.kwargs
    time_major = options.get("time_major", False)
    lengths = lengths if "lengths" in workload.variants else None
    kwargs = dict(options, method=method.method, lengths=lengths)
    if "bidirectional" in workload.variants:
        outputs, final = rnnlab.bidirectional(cell, cell, rnn_params, x, **kwargs)
    else:
        outputs, final = rnnlab.unroll(cell, rnn_params, x, **kwargs)
    batch_major = jnp.swapaxes(outputs, 0, 1) if time_major else outputs
    width = cell.output_size
    if lengths is None:  # a static slice, as the peers read it (a gather cost 5-11% at shape A)
        forward_features = batch_major[:, -1, :width]
    else:
        forward_features = _at_step(batch_major[..., :width], lengths - 1)
    if "bidirectional" in workload.variants:
        features = jnp.concatenate([forward_features, batch_major[:, 0, width:]], axis=-1)
    else:
        features = forward_features
    return outputs, final, features


def classifier_loss(apply: Callable, params: Params, x, labels, lengths) -> jax.Array:
    """Mean softmax cross-entropy of the linear head on the RNN features."""
    _, _, features = apply(params["rnn"], x, lengths)
    logits = features @ params["head"]["w"] + params["head"]["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


class _Step(NamedTuple):
    """What `build_program` compiles: `fn(*args)`, the first `carry` args carried from
    call to call, `outputs_of` picking the checked arrays from its results; for a train
    step, `loss_and_grads(params, x, labels, lengths)` too."""

    fn: Callable
    args: tuple
    outputs_of: Callable[[Any], dict[str, Any]]
    carry: int = 0
    loss_and_grads: Optional[Callable] = None


def _step(cell: RNNCell, workload: Workload, method: MethodSpec, mode: str, params: Params, data: Data) -> _Step:
    """The forward pass or the train step of `workload` run with `method`, uncompiled."""
    apply = functools.partial(rnn_apply, cell, workload, method)
    time_major = method.kwargs.get("time_major", False)
    x = jnp.asarray(np.swapaxes(data.x, 0, 1) if time_major else data.x)
    lengths = jnp.asarray(data.lengths)
    params = jax.tree.map(jnp.array, params)  # a private copy: train steps donate it

    if mode == "forward":

        def forward(rnn_params, x, lengths):
            outputs, final, _ = apply(rnn_params, x, lengths)
            return outputs, final

        def outputs_of(results):
            outputs, final = results
            return {"outputs": jnp.swapaxes(outputs, 0, 1) if time_major else outputs, "final": final}

        return _Step(forward, (params["rnn"], x, lengths), outputs_of)

    optimizer = optax.adam(LEARNING_RATE)
    loss_and_grads = jax.value_and_grad(functools.partial(classifier_loss, apply))

    def train_step(params, opt_state, x, labels, lengths):
        loss, grads = loss_and_grads(params, x, labels, lengths)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    args = (params, optimizer.init(params), x, jnp.asarray(data.labels), lengths)
    return _Step(train_step, args, lambda r: {"loss": r[2]}, carry=2, loss_and_grads=loss_and_grads)


def build_program(
    cell: RNNCell, workload: Workload, method: MethodSpec, mode: str, params: Params, data: Data
) -> Program:
    """Compiles the forward pass or the train step of `workload` run with `method`.

    The checked outputs are batch-major whatever the method's layout: forward gives
    `"outputs"` and `"final"`, the train step the first step's `"loss"` and `"grads"`.
    """
    step = _step(cell, workload, method, mode, params, data)
    if mode == "forward":
        return jax_program(step.fn, step.args, step.outputs_of)
    # The gradients are checked from a separate, untimed call (before the timed step
    # takes the params): returning them from the timed step would add outputs the
    # peers' steps do not have (5-12% at shape A).
    params, _, x, labels, lengths = step.args
    grads = jax.tree.map(np.asarray, jax.jit(step.loss_and_grads)(params, x, labels, lengths)[1])
    program = jax_program(step.fn, step.args, step.outputs_of, step.carry)
    return program._replace(outputs={**program.outputs, "grads": grads})


def compile_seconds(
    cell: RNNCell, workload: Workload, method: MethodSpec, mode: str, params: Params, data: Data
) -> float:
    """How long `build_program`'s program takes to compile, without running it."""
    step = _step(cell, workload, method, mode, params, data)
    return compile_jax(step.fn, step.args, tuple(range(step.carry)))[1]


def peak_program(size: int) -> tuple[Program, float]:
    """A float32 `size x size` matmul and its FLOPs, the backend's peak reference."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    return jax_program(jnp.matmul, (a, a), lambda r: {}), 2.0 * size**3


def lstm_matmul_floor_program(shape: Shape, mode: str) -> tuple[Program, float]:
    """Only the matmuls of a one-layer LSTM of `shape`, chained as the recurrence
    chains them, and their FLOPs: the least an LSTM compiled for this backend spends
    on matmuls, to read the LSTM targets' (and peers') times against.

    Forward: the input projection of every step as one `[T·B, I] x [I, 4H]` matmul,
    then per step `h_t = Σ_gates (z_t + h_{t-1}·W_h)`, one `[B, H] x [H, 4H]` matmul
    (the sum over the four `[B, H]` gate blocks keeps every column in use). Train
    step: also the backward chain, per step `dh_{t-1} = (z_t + dh_t)·W_hᵀ`, one
    `[B, 4H] x [4H, H]` matmul, and the weight gradients `xsᵀ·dg` and `hsᵀ·dg` as one
    matmul each over the `T·B` rows. No gate activations, no head, no optimiser, no
    input gradient (a classifier's train step needs none).
    """
    batch, steps, inputs, units = shape.batch_size, shape.seq_len, shape.input_size, shape.num_units
    key_x, key_wx, key_wh = jax.random.split(jax.random.PRNGKey(3), 3)
    xs = jax.random.normal(key_x, (steps, batch, inputs), jnp.float32)
    w_x = jax.random.normal(key_wx, (inputs, 4 * units), jnp.float32) / np.sqrt(inputs)
    # Largest singular value about 0.75 (and 0.5 per gate block): both chains stay bounded.
    w_h = jax.random.normal(key_wh, (units, 4 * units), jnp.float32) * (0.25 / np.sqrt(units))

    def forward(w_x, w_h, xs):
        zs = xs @ w_x

        def step(h, z):
            h = jnp.sum((z + h @ w_h).reshape(batch, 4, units), axis=1)
            return h, h

        _, hs = jax.lax.scan(step, jnp.zeros((batch, units), jnp.float32), zs)
        return zs, hs

    def train(w_x, w_h, xs):
        zs, hs = forward(w_x, w_h, xs)

        def step(dh, z):
            dg = z + jnp.tile(dh, (1, 4))
            return dg @ w_h.T, dg

        _, dgs = jax.lax.scan(step, hs[-1], zs, reverse=True)
        hs_before = jnp.concatenate([jnp.zeros_like(hs[:1]), hs[:-1]])
        flat = lambda a: a.reshape(-1, a.shape[-1])
        return flat(xs).T @ flat(dgs), flat(hs_before).T @ flat(dgs)

    projection, recurrent = 2.0 * steps * batch * inputs * 4 * units, 2.0 * steps * batch * units * 4 * units
    if mode == "forward":
        return jax_program(lambda *a: forward(*a)[1], (w_x, w_h, xs), lambda r: {}), projection + recurrent
    return jax_program(train, (w_x, w_h, xs), lambda r: {}), 2 * projection + 3 * recurrent


def bandwidth_program(size_mib: int) -> tuple[Program, float]:
    """`a * x + y` over float32 vectors of `size_mib` MiB each and the bytes it moves
    (two reads and a write), the backend's memory-bandwidth reference: what a
    memory-bound elementwise recurrence can reach at best."""
    n = size_mib * 2**20 // 4
    x = jax.random.normal(jax.random.PRNGKey(1), (n,), jnp.float32)
    y = jax.random.normal(jax.random.PRNGKey(2), (n,), jnp.float32)
    return jax_program(lambda x, y: 1.0001 * x + y, (x, y), lambda r: {}), 3.0 * 4 * n


def skip_reason(cell: RNNCell, method: MethodSpec) -> Optional[str]:
    """Why `method` cannot run `cell`, or `None`."""
    if method.method == "associative" and cell.linear_recurrence is None:
        return f"{cell.name} is not a linear recurrence"
    return None
