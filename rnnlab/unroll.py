"""Running a cell over sequences: `lax.scan`, a static Python loop, or an associative scan.

Every method gives the same numbers; they differ in compile time, run time and memory.

Semantics follow TF1's `dynamic_rnn` / `static_rnn`:
  * `lengths[b]`: for `t >= lengths[b]` the output is zero and the state is carried
    through unchanged, so the final state is the state after step `lengths[b] - 1`.
  * `reverse=True` reverses only the valid prefix of each sequence (like
    `tf.reverse_sequence`) and puts the outputs back in the original time order.
  * `resets[b, t]` (episode starts in a stream, as in reinforcement learning): just
    before step `t`, example `b`'s state becomes the cell's default initial state
    (`cell.initial_state(params)`), keeping its dropout keys; past `lengths[b]` a
    reset does nothing.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rnnlab.cells.base import Array, Params, PRNGKey, RNNCell, State
from rnnlab.linear_unroll import linear_unroll
from rnnlab.wrappers import with_dropout_keys_of

METHODS = ("scan", "static", "associative")

_RNG_OR_INITIAL_STATE = (
    "rng draws the initial state (e.g. dropout keys), so pass either rng or initial_state; "
    "build a state with keys with batched_initial_state(..., rng), or give a carried state "
    "new keys with new_dropout_keys(state, rng)."
)


def unroll(
    cell: RNNCell,
    params: Params,
    inputs: Array,
    *,
    initial_state: Optional[State] = None,
    lengths: Optional[Array] = None,
    resets: Optional[Array] = None,
    method: str = "scan",
    unroll: int = 1,
    reverse: bool = False,
    time_major: bool = False,
    rng: Optional[PRNGKey] = None,
    remat: bool = False,
    hoist: Optional[bool] = None,
    block_size: Optional[int] = None,
    fused: Optional[bool] = None,
) -> tuple[Array, State]:
    """Runs `cell` over a batch of sequences.

    Args:
      cell: the cell; it steps one example and is vmapped over the batch here.
      params: the cell's params.
      inputs: `[B, T, I]`, or `[T, B, I]` when `time_major`.
      initial_state: the batched state (every leaf with a leading `[B]` axis). Default:
        `cell.initial_state` for every example, drawn with `rng` when given.
      lengths: optional integer `[B]`, each in `[0, T]`.
      resets: optional bool `[B, T]` (`[T, B]` when `time_major`): where
        `resets[b, t]`, example `b`'s state is replaced, just before step `t`, by
        `cell.initial_state(params)` (not by `initial_state`, which may be a state
        carried from the previous window; every layer of a stack is reset), so a
        window of a stream can hold the ends and starts of episodes. Dropout and
        zoneout keys are kept from the running state, so their masks go on as without
        the reset. Steps at `t >= lengths[b]` ignore it. Not with `reverse`; cells with
        a fused scan then run the step's autodiff loop (`fused=True` is refused), and
        `log_space` cells the associative scan in linear space (as accurate here).
      method: `"scan"` (`jax.lax.scan`), `"static"` (a Python loop: one graph node per
        step, slow to compile for long sequences) or `"associative"`
        (`jax.lax.associative_scan`, for cells with a `linear_recurrence`).
      unroll: steps per loop iteration for `"scan"` (`lax.scan(unroll=...)`), and in the
        blocks of `"associative"`. On a GPU, 4-16 made the LSTM's train step 1.3-1.4x
        faster (docs/benchmarks.md); on CPU 1 is best.
      reverse: run from the last valid step to the first.
      time_major: layout of `inputs` and of the returned outputs.
      rng: PRNG key for cells with randomness (dropout), used to draw the initial
        state; `None` is deterministic. Random cells keep their keys in the state, so
        with `initial_state` (e.g. carried across windows) pass no `rng`.
      remat: wrap the step in `jax.checkpoint` to save memory on long sequences
        (recomputes the step on the backward pass).
      hoist: compute the input projection of all steps in one matmul before the loop
        when the cell allows it. Changes rounding only. For a cell with a
        `linear_recurrence` and `method="scan"`, hoisting leaves only the elementwise
        update `h = a⊙h + b` in the loop: the coefficients, the readout and the
        parameter gradients are computed for all steps at once (`remat` is then moot).
        `None` (default) hoists linear recurrences everywhere, and other cells on
        GPU/TPU but not on CPU (where autodiff of the step ran 1.3-2x faster with the
        projection in the loop, and the fused scans were level either way;
        docs/benchmarks.md).
      block_size: for `"associative"`: the scan runs in blocks of this many steps, all
        blocks at once, joined by an associative scan over the blocks (a two-level
        parallel scan, `2·block_size + log(T / block_size)` sequential steps); `1` is
        `jax.lax.associative_scan` over every step. `None` (default): about `sqrt(T)`
        on CPU, where its train step measured 1.1-1.4x faster than with `1`
        (docs/benchmarks.md), and `1` on GPU/TPU and for `log_space` cells (the
        log-space form runs only with `1`).
      fused: for `"scan"`, run a cell that has a `fused_scan` (`lstm`, any options;
        `gru`; `basic_rnn`) by it:
        the same loop with a hand-written backward pass that computes the weight
        gradients after the loop, in one matmul each (and, with `hoist`, the input
        projection before it). `None` (default): whenever the step is not
        rematerialised and there are no `resets` (a train step on 2 CPU cores measured
        1.03-1.48x faster at seven shapes, 0.9x at B=128, T=28, H=128; on an H200 GPU,
        hoisted, 1.48-1.55x; docs/benchmarks.md); `True`: require it; `False`: autodiff of the step. The
        fused scan is differentiated in reverse mode only (`jax.grad`, `jax.vjp`,
        nested, and `jax.hessian`); for `jax.jvp` or `jax.jacfwd` straight through the
        unroll pass `fused=False`.

    Returns:
      `(outputs, final_state)`: outputs `[B, T, O]` (or `[T, B, O]`), zero past each
      length; `final_state` batched like `initial_state`.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 1:
        raise ValueError(f"unroll must be a positive integer, got {unroll!r}.")
    if fused and (method != "scan" or remat):
        raise ValueError(
            f"fused=True runs method='scan' without remat, got method={method!r}, remat={remat!r}."
        )
    if resets is not None and reverse:
        raise ValueError("resets mark episode starts in forward time; they cannot be used with reverse=True.")
    if resets is not None and fused:
        raise ValueError("resets run the step's autodiff loop, not the fused scan: pass fused=None or False.")
    if block_size is not None:
        if method != "associative":
            raise ValueError(f"block_size applies to method='associative' only, got method={method!r}.")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer or None, got {block_size!r}.")
    xs = _to_time_major(inputs, time_major)
    num_steps, batch_size = xs.shape[0], xs.shape[1]
    lengths = check_lengths(lengths, batch_size, num_steps)
    resets = _check_resets(resets, batch_size, num_steps, time_major)
    if not isinstance(cell, RNNCell):
        raise TypeError(f"cell must be an rnnlab RNNCell (e.g. rnnlab.cells.lstm(128)), got {type(cell).__name__}.")
    if initial_state is not None and rng is not None:
        raise ValueError(_RNG_OR_INITIAL_STATE)
    try:
        if initial_state is None:
            initial_state = batched_initial_state(cell, params, batch_size, rng)
        else:
            _check_batched_state(initial_state, batch_size)
        initial_state = _state_for_steps(cell, params, initial_state, xs)
    except (TypeError, KeyError, AttributeError):  # e.g. a missing param or a matmul of mismatched shapes:
        # name the params that do not fit, if some do not
        check_params(cell, params, xs.shape[-1])
        raise
    # After the cell's own checks, whose messages say more (e.g. of the input size); this
    # catches params the step ignores, e.g. those of another form of the cell.
    check_params(cell, params, xs.shape[-1])

    if reverse:
        xs = _reverse_time_major(xs, lengths)
    if method == "associative":
        ys, final = linear_unroll(
            cell, params, xs, initial_state, lengths, resets=resets, parallel=True, unroll=unroll,
            block_size=block_size,
        )
    elif cell.layers is not None:
        ys, final = _unroll_layerwise(
            cell.layers, params, xs, initial_state, lengths, resets, method, unroll, remat, hoist, fused
        )
    else:
        ys, final = _unroll_single(
            cell, params, xs, initial_state, lengths, resets, method, unroll, remat, hoist, fused
        )
    if reverse:
        ys = _reverse_time_major(ys, lengths)
    return (ys if time_major else jnp.swapaxes(ys, 0, 1)), final


def _unroll_layerwise(layers, params, xs, initial_state, lengths, resets, method, unroll, remat, hoist, fused):
    """Runs a stack one layer at a time: each layer reads the whole output of the last
    (and is reset at the same steps)."""
    finals = []
    for layer, layer_params, layer_state in zip(layers, params, initial_state):
        xs, final = _unroll_single(
            layer, layer_params, xs, layer_state, lengths, resets, method, unroll, remat, hoist, fused
        )
        finals.append(final)
    return xs, tuple(finals)


def _runs_fused(cell: RNNCell, method: str, remat: bool, fused: Optional[bool]) -> bool:
    """Whether `unroll` runs `cell` by its fused scan."""
    return fused is not False and cell.fused_scan is not None and method == "scan" and not remat


def _unroll_single(cell, params, xs, state, lengths, resets, method, unroll, remat, hoist, fused):
    """The sequential loop over time-major `xs: [T, B, I]` for one (non-stacked) cell;
    `resets` is bool `[T, B]` or `None`."""
    if fused and cell.fused_scan is None:
        raise ValueError(
            f"fused=True: {cell.name} has no fused scan (lstm and gru with tanh, and basic_rnn "
            "with tanh or relu have one)."
        )
    if hoist is None:
        hoist = cell.linear_recurrence is not None or jax.default_backend() != "cpu"
    if hoist and method == "scan" and cell.linear_recurrence is not None:
        return linear_unroll(cell, params, xs, state, lengths, resets=resets, parallel=False, unroll=unroll)
    if resets is None and _runs_fused(cell, method, remat, fused) and xs.shape[0] > 0:
        return cell.fused_scan(params, xs, state, lengths, unroll, hoist and cell.can_hoist)
    if hoist and cell.can_hoist:
        zs = cell.input_projection(params, xs)
        step_fn = cell.projected_step
    else:
        zs, step_fn = xs, cell.step
    batched_step = jax.vmap(step_fn, in_axes=(None, 0, 0))
    default = None if resets is None else batched_initial_state(cell, params, xs.shape[1])

    def body(state, inputs_t):
        z_t, t, reset_t = inputs_t
        entering = state if resets is None else _reset(reset_t, default, state)
        new_state, y_t = batched_step(params, entering, z_t)
        if lengths is not None:
            valid = t < lengths
            new_state = jax.tree.map(lambda n, o: _where_batch(valid, n, o), new_state, state)
            y_t = _where_batch(valid, y_t, jnp.zeros_like(y_t))
        return new_state, y_t

    if remat:
        body = jax.checkpoint(body)
    step_inputs = (zs, jnp.arange(xs.shape[0]), resets)
    if method == "scan" or xs.shape[0] == 0:  # zero steps: scan gives [0, B, O] outputs
        return_state, ys = jax.lax.scan(body, state, step_inputs, unroll=unroll)
        return ys, return_state
    outputs = []
    for t in range(xs.shape[0]):
        state, y_t = body(state, jax.tree.map(lambda leaf: leaf[t], step_inputs))
        outputs.append(y_t)
    return jnp.stack(outputs), state


def _reset(reset: Array, default: State, state: State) -> State:
    """The batched `state` with example `b` replaced by `default`'s where `reset [B]`,
    keeping the dropout keys of `state` (see `with_dropout_keys_of`)."""
    target = with_dropout_keys_of(default, state)
    return jax.tree.map(lambda new, old: _where_batch(reset, new, old), target, state)


def _where_batch(valid: Array, new: Array, old: Array) -> Array:
    """`where(valid[b], new[b], old[b])` for arrays with a leading batch axis."""
    return jnp.where(valid.reshape(valid.shape + (1,) * (new.ndim - 1)), new, old)


def batched_initial_state(
    cell: RNNCell, params: Params, batch_size: int, rng: Optional[PRNGKey] = None
) -> State:
    """`cell.initial_state` for `batch_size` examples (leaves get a leading `[B]` axis).

    With `rng`, every example gets its own key (e.g. its own dropout masks).
    """
    if rng is None:
        state = cell.initial_state(params)
        return jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (batch_size,) + jnp.shape(leaf)), state)
    keys = jax.random.split(rng, batch_size)
    return jax.vmap(lambda key: cell.initial_state(params, key))(keys)


def reverse_sequence(xs: Array, lengths: Optional[Array], *, time_major: bool = False) -> Array:
    """Reverses the first `lengths[b]` steps of each sequence, like `tf.reverse_sequence`.

    Args:
      xs: `[B, T, ...]`, or `[T, B, ...]` with `time_major=True` (as in `unroll`).
      lengths: integer `[B]` or `None` (reverse everything). Values are checked to lie
        in `[0, T]` when concrete; traced values above `T` count as `T` (as in `unroll`).
      time_major: the layout of `xs`.
    Returns:
      `xs`' layout; steps at `t >= lengths[b]` stay where they are. Applying it twice
      gives back `xs`.
    """
    layout = "[T, B, ...]" if time_major else "[B, T, ...]"
    if jnp.ndim(xs) < 2:
        raise ValueError(f"reverse_sequence needs xs of shape {layout}, got shape {tuple(jnp.shape(xs))}.")
    if time_major:
        return _reverse_time_major(xs, lengths)
    return jnp.swapaxes(_reverse_time_major(jnp.swapaxes(xs, 0, 1), lengths), 0, 1)


def _reverse_time_major(xs: Array, lengths: Optional[Array]) -> Array:
    """`reverse_sequence` of time-major `xs: [T, B, ...]`."""
    if lengths is None:
        return jnp.flip(xs, axis=0)
    num_steps = xs.shape[0]
    lengths = jnp.minimum(check_lengths(lengths, xs.shape[1], num_steps), num_steps)
    t = jnp.arange(num_steps)[:, None]  # [T, 1]
    source = jnp.where(t < lengths[None, :], lengths[None, :] - 1 - t, t)  # [T, B]
    source = source.reshape(source.shape + (1,) * (xs.ndim - 2))
    return jnp.take_along_axis(xs, source, axis=0)


def check_lengths(lengths: Optional[Array], batch_size: int, num_steps: int) -> Optional[Array]:
    """Validates `lengths` (shape `[B]`, integer, values in `[0, T]`) and returns it as int32.

    Shapes and dtypes are checked at trace time; values are checked when `lengths` is a
    concrete array (not a tracer inside `jit`).
    """
    if lengths is None:
        return None
    if isinstance(lengths, (list, tuple)):
        lengths = np.asarray(lengths)
    if jnp.shape(lengths) != (batch_size,):
        raise ValueError(
            f"lengths must have shape [batch_size]=[{batch_size}], got shape {tuple(jnp.shape(lengths))}."
        )
    if not jnp.issubdtype(jnp.result_type(lengths), jnp.integer):
        raise TypeError(f"lengths must be an integer array, got dtype {jnp.result_type(lengths)}.")
    if not isinstance(lengths, jax.core.Tracer):
        values = np.asarray(lengths)
        if values.size and (values.min() < 0 or values.max() > num_steps):
            raise ValueError(
                f"lengths must lie in [0, T]=[0, {num_steps}], got values from {values.min()} to {values.max()}."
            )
    return jnp.asarray(lengths, jnp.int32)


def _check_resets(resets: Optional[Array], batch_size: int, num_steps: int, time_major: bool) -> Optional[Array]:
    """Validates `resets` (bool `[B, T]`, or `[T, B]` when `time_major`) at trace time and
    returns it time-major, `[T, B]`."""
    if resets is None:
        return None
    if isinstance(resets, (list, tuple)):
        resets = np.asarray(resets)
        resets = resets.astype(bool) if resets.size == 0 else resets  # `[[], []]` for T = 0 reads as float
    layout, shape = ("[T, B]", (num_steps, batch_size)) if time_major else ("[B, T]", (batch_size, num_steps))
    if jnp.shape(resets) != shape:
        raise ValueError(f"resets must have shape {layout}={list(shape)}, got shape {tuple(jnp.shape(resets))}.")
    if jnp.result_type(resets) != jnp.bool_:
        raise TypeError(f"resets must be a bool array, got dtype {jnp.result_type(resets)}.")
    return jnp.asarray(resets) if time_major else jnp.swapaxes(resets, 0, 1)


def _to_time_major(inputs: Array, time_major: bool) -> Array:
    if jnp.ndim(inputs) != 3:
        layout = "[T, B, I]" if time_major else "[B, T, I]"
        raise ValueError(
            f"inputs must have rank 3 ({layout}), got shape {tuple(jnp.shape(inputs))}. "
            "For a single sequence add a batch axis: inputs[None]."
        )
    return jnp.asarray(inputs) if time_major else jnp.swapaxes(inputs, 0, 1)


def _check_batched_state(state: State, batch_size: int) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != batch_size:
            raise ValueError(
                f"initial_state leaf {jax.tree_util.keystr(path)} must have a leading batch axis "
                f"of size {batch_size}, got shape {tuple(jnp.shape(leaf))}."
            )


def check_params(cell: RNNCell, params: Params, input_size: int) -> None:
    """Raises a `ValueError` naming the first param whose path or shape differs from
    what `cell.init(key, input_size)` returns (checked abstractly, at trace time).
    Dtypes may differ (e.g. bfloat16)."""
    try:
        expected = jax.eval_shape(lambda key: cell.init(key, input_size), jax.random.PRNGKey(0))
    except Exception:  # an init that cannot be traced abstractly: the step reports what it finds
        return
    shapes = {jax.tree_util.keystr(path): np.shape(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    wanted = {jax.tree_util.keystr(path): leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(expected)}
    where = f"params do not fit {cell.name} with input size {input_size}"
    problems = []
    if set(wanted) - set(shapes):
        problems.append(f"missing {', '.join(sorted(set(wanted) - set(shapes)))}")
    if set(shapes) - set(wanted):
        problems.append(f"unexpected {', '.join(sorted(set(shapes) - set(wanted)))}")
    if problems:
        raise ValueError(f"{where}: {'; '.join(problems)} (compare cell.init(key, {input_size})).")
    for name, shape in wanted.items():
        if tuple(shapes[name]) != tuple(shape):
            raise ValueError(f"{where}: {name or 'params'} has shape {tuple(shapes[name])}, expected {tuple(shape)}.")


def _state_for_steps(cell: RNNCell, params: Params, state: State, xs: Array) -> State:
    """`state`, checked against the cell's state and one step traced abstractly (so that
    shape errors surface with the cell's message), and cast to the dtypes that step
    returns: e.g. bfloat16 params give a bfloat16 state, which float32 inputs promote to
    float32. A scan's carry cannot change dtype, so every method starts from the
    promoted state (a Python loop would promote it at the first step anyway)."""
    one_state = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(jnp.shape(leaf)[1:], leaf.dtype), state)
    x = jax.ShapeDtypeStruct(xs.shape[2:], xs.dtype)
    expected = jax.eval_shape(cell.initial_state, params)  # without keys: comparable unless the cell is random
    if jax.tree.structure(expected) == jax.tree.structure(one_state):
        for (path, given), like in zip(jax.tree_util.tree_leaves_with_path(one_state), jax.tree.leaves(expected)):
            if given.shape != like.shape:
                raise ValueError(
                    f"initial_state leaf {_leaf_name(path)} must have shape [B] + {list(like.shape)} "
                    f"for {cell.name}, got [B] + {list(given.shape)}."
                )
    try:
        new_state, _ = jax.eval_shape(cell.step, params, one_state, x)
    except (TypeError, ValueError, AttributeError) as error:
        error.add_note(f"(raised by one step of {cell.name} on one example: state {_describe(one_state)}, input {_describe(x)})")
        raise
    if jax.tree.structure(new_state) != jax.tree.structure(one_state):
        raise TypeError(
            f"initial_state does not have the structure of {cell.name}'s state: got "
            f"{jax.tree.structure(one_state)}, the step returns {jax.tree.structure(new_state)}."
        )
    for (path, old), new in zip(jax.tree_util.tree_leaves_with_path(one_state), jax.tree.leaves(new_state)):
        if old.shape != new.shape:
            raise ValueError(
                f"{cell.name}: one step turns the state leaf {_leaf_name(path)} from {_describe(old)} into "
                f"{_describe(new)}; a state keeps its shape."
            )
    return jax.tree.map(lambda leaf, new: leaf if leaf.dtype == new.dtype else leaf.astype(new.dtype), state, new_state)


def _leaf_name(path: Any) -> str:
    """A state leaf's path as `rnnlab.unroll`'s messages name it."""
    return jax.tree_util.keystr(path) or "(the whole state)"


def _describe(tree: Any) -> str:
    """`dtype[shape]` of each leaf of `tree` (abstract values included)."""
    leaves = [f"{leaf.dtype}{list(leaf.shape)}" for leaf in jax.tree.leaves(tree)]
    return leaves[0] if len(leaves) == 1 else "(" + ", ".join(leaves) + ")"


def init_bidirectional(cell_fw: RNNCell, cell_bw: RNNCell, key: PRNGKey, input_size: int) -> Params:
    """Params `{"fw": ..., "bw": ...}` for `bidirectional`."""
    key_fw, key_bw = jax.random.split(key)
    return {"fw": cell_fw.init(key_fw, input_size), "bw": cell_bw.init(key_bw, input_size)}


def bidirectional(
    cell_fw: RNNCell,
    cell_bw: RNNCell,
    params: Params,
    inputs: Array,
    *,
    lengths: Optional[Array] = None,
    initial_states: tuple[Optional[State], Optional[State]] = (None, None),
    merge: str = "concat",
    time_major: bool = False,
    rng: Optional[PRNGKey] = None,
    **unroll_kwargs: Any,
) -> tuple[Any, tuple[State, State]]:
    """TF1's `bidirectional_dynamic_rnn`: a forward and a backward run over `inputs`.

    The backward run reverses each sequence's valid prefix only, and its outputs are put
    back in the original time order, so `outputs[:, t]` of both directions refer to
    step `t`. The backward direction's final state is its state after reading step 0.

    Passing one cell object for both directions (`bidirectional(cell, cell, ...)`, each
    with its own params) runs them in ONE loop, vmapped over a direction axis: half
    the sequential steps, with the same numbers as two loops. On CPU, a cell that runs
    its fused scan keeps two loops, which ran 0.97-1.23x the speed of one loop there,
    faster in most cases measured (docs/benchmarks.md).

    Args:
      params: `{"fw": ..., "bw": ...}` (see `init_bidirectional`).
      inputs: `[B, T, I]` (or `[T, B, I]` when `time_major`).
      initial_states: the batched initial state of each direction, or `None` for the
        cell's own, drawn with `rng` (which must then leave one to draw).
      merge: `"concat"` gives `[B, T, O_fw + O_bw]`; `"none"` gives the pair `(fw, bw)`.
      unroll_kwargs: passed to `unroll` (`method`, `unroll`, `remat`, `hoist`,
        `block_size`, `fused`; not `resets`).

    Returns:
      `(outputs, (final_fw, final_bw))`.
    """
    if merge not in ("concat", "none"):
        raise ValueError(f"merge must be 'concat' or 'none', got {merge!r}.")
    if not isinstance(params, Mapping) or set(params) != {"fw", "bw"}:
        got = sorted(map(str, params)) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(f"bidirectional params must be a dict with keys 'fw' and 'bw' (see init_bidirectional), got {got}.")
    if not isinstance(initial_states, (tuple, list)) or len(initial_states) != 2:
        got = f"length {len(initial_states)}" if isinstance(initial_states, (tuple, list)) else type(initial_states).__name__
        raise ValueError(f"initial_states must be a pair (state_fw, state_bw), either of them None, got {got}.")
    if rng is not None and all(state is not None for state in initial_states):
        raise ValueError(_RNG_OR_INITIAL_STATE)
    if unroll_kwargs.get("resets") is not None:
        raise ValueError(
            "bidirectional runs take no resets: episodes are defined in forward time, and the backward run "
            "reads each sequence from its end."
        )
    rng_fw, rng_bw = (None, None) if rng is None else tuple(jax.random.split(rng))
    rng_fw, rng_bw = (r if state is None else None for r, state in zip((rng_fw, rng_bw), initial_states))
    if cell_fw == cell_bw and _directions_in_one_loop(cell_fw, unroll_kwargs, initial_states, (rng_fw, rng_bw)):
        ys_fw, ys_bw, final_fw, final_bw = _fused_directions(
            cell_fw, params, inputs, lengths, initial_states, (rng_fw, rng_bw), time_major, unroll_kwargs
        )
    else:
        common = dict(lengths=lengths, time_major=time_major, **unroll_kwargs)
        ys_fw, final_fw = unroll(cell_fw, params["fw"], inputs, initial_state=initial_states[0], rng=rng_fw, **common)
        ys_bw, final_bw = unroll(
            cell_bw, params["bw"], inputs, initial_state=initial_states[1], rng=rng_bw, reverse=True, **common
        )
    outputs = jnp.concatenate([ys_fw, ys_bw], axis=-1) if merge == "concat" else (ys_fw, ys_bw)
    return outputs, (final_fw, final_bw)


def init_stacked_bidirectional(
    cells_fw: list[RNNCell], cells_bw: list[RNNCell], key: PRNGKey, input_size: int
) -> list[Params]:
    """Params for `stacked_bidirectional`: one `{"fw", "bw"}` dict per layer.

    Layer `l > 0` reads the concatenation of layer `l-1`'s forward and backward outputs.
    """
    _check_layer_lists(cells_fw, cells_bw)
    params = []
    for cell_fw, cell_bw, layer_key in zip(cells_fw, cells_bw, jax.random.split(key, len(cells_fw))):
        params.append(init_bidirectional(cell_fw, cell_bw, layer_key, input_size))
        input_size = cell_fw.output_size + cell_bw.output_size
    return params


def stacked_bidirectional(
    cells_fw: list[RNNCell],
    cells_bw: list[RNNCell],
    params: list[Params],
    inputs: Array,
    *,
    lengths: Optional[Array] = None,
    initial_states_fw: Optional[Sequence[Optional[State]]] = None,
    initial_states_bw: Optional[Sequence[Optional[State]]] = None,
    rng: Optional[PRNGKey] = None,
    **kwargs: Any,
) -> tuple[Array, tuple[tuple[State, ...], tuple[State, ...]]]:
    """TF1's `stack_bidirectional_dynamic_rnn`: bidirectional layers, each reading the
    concatenated forward and backward outputs of the layer below.

    Args:
      initial_states_fw, initial_states_bw: optional sequences with one batched state
        (or `None`: the cell's initial state, drawn with `rng`) per layer, as TF1's.
      kwargs: passed to every layer's `bidirectional` (`time_major`, `method`, ...).

    Returns:
      `(outputs [B, T, O_fw + O_bw] of the last layer, (finals_fw, finals_bw))` with one
      final state per layer in each tuple.
    """
    _check_layer_lists(cells_fw, cells_bw)
    num_layers = len(cells_fw)
    if len(params) != num_layers:
        raise ValueError(f"params has {len(params)} layers but the cell lists have {num_layers}.")
    for name in ("initial_states", "merge"):
        if name in kwargs:
            raise TypeError(
                f"stacked_bidirectional takes no {name!r}: layers are joined by concatenation, and "
                "initial states are given per layer as initial_states_fw / initial_states_bw."
            )
    states = []
    for name, given in (("initial_states_fw", initial_states_fw), ("initial_states_bw", initial_states_bw)):
        if given is None:
            given = [None] * num_layers
        if not isinstance(given, (list, tuple)) or len(given) != num_layers:
            raise ValueError(f"{name} must be a sequence with one state (or None) per layer ({num_layers}).")
        states.append(given)
    if rng is not None and all(state is not None for layer_states in states for state in layer_states):
        raise ValueError(_RNG_OR_INITIAL_STATE)
    rngs = [None] * num_layers if rng is None else list(jax.random.split(rng, num_layers))
    finals_fw, finals_bw = [], []
    outputs = inputs
    for cell_fw, cell_bw, layer_params, state_fw, state_bw, layer_rng in zip(cells_fw, cells_bw, params, *states, rngs):
        if state_fw is not None and state_bw is not None:
            layer_rng = None  # the layer draws nothing
        outputs, (final_fw, final_bw) = bidirectional(
            cell_fw,
            cell_bw,
            layer_params,
            outputs,
            lengths=lengths,
            initial_states=(state_fw, state_bw),
            rng=layer_rng,
            merge="concat",
            **kwargs,
        )
        finals_fw.append(final_fw)
        finals_bw.append(final_bw)
    return outputs, (tuple(finals_fw), tuple(finals_bw))


def _check_layer_lists(cells_fw: list[RNNCell], cells_bw: list[RNNCell]) -> None:
    if isinstance(cells_fw, RNNCell) or isinstance(cells_bw, RNNCell):  # a cell is a tuple too
        raise TypeError("cells_fw and cells_bw are lists with one cell per layer; for one layer pass [cell].")
    if not cells_fw or not cells_bw:
        raise ValueError("stacked_bidirectional needs at least one layer in cells_fw and cells_bw.")
    if len(cells_fw) != len(cells_bw):
        raise ValueError(
            f"cells_fw and cells_bw must have the same number of layers, got {len(cells_fw)} and {len(cells_bw)}."
        )


def _directions_in_one_loop(
    cell: RNNCell,
    unroll_kwargs: dict[str, Any],
    initial_states: tuple[Optional[State], Optional[State]],
    rngs: tuple[Optional[PRNGKey], Optional[PRNGKey]],
) -> bool:
    """Whether `bidirectional(cell, cell, ...)` runs both directions in one loop: not on
    CPU when the cell runs its fused scan, where two loops measured faster, nor when
    the two directions' states could differ in structure (one given, the other drawn)."""
    defaults = inspect.signature(unroll).parameters
    method, remat, fused = (unroll_kwargs.get(name, defaults[name].default) for name in ("method", "remat", "fused"))
    if _runs_fused(cell, method, remat, fused) and jax.default_backend() == "cpu":
        return False
    state_fw, state_bw = initial_states
    if state_fw is None and state_bw is None:  # both drawn: with keys or without, alike
        return (rngs[0] is None) == (rngs[1] is None)
    given_both = state_fw is not None and state_bw is not None
    return given_both and jax.tree.structure(state_fw) == jax.tree.structure(state_bw)


def _fused_directions(
    cell: RNNCell,
    params: Params,
    inputs: Array,
    lengths: Optional[Array],
    initial_states: tuple[Optional[State], Optional[State]],
    rngs: tuple[Optional[PRNGKey], Optional[PRNGKey]],
    time_major: bool,
    unroll_kwargs: dict[str, Any],
) -> tuple[Array, Array, State, State]:
    """Both directions of one cell in one loop: `unroll` vmapped over a leading
    direction axis (of size 2) of the params, the inputs (the backward copy reversed
    within each length) and the initial states.

    Returns:
      `(ys_fw, ys_bw, final_fw, final_bw)`, outputs in `inputs`' layout and time order.
    """
    xs = _to_time_major(inputs, time_major)
    num_steps, batch_size = xs.shape[0], xs.shape[1]
    lengths = check_lengths(lengths, batch_size, num_steps)
    states = [
        batched_initial_state(cell, params[d], batch_size, r) if s is None else s
        for d, s, r in zip(("fw", "bw"), initial_states, rngs)
    ]
    both = lambda a, b: jnp.stack([a, b])
    stacked_params = jax.tree.map(both, params["fw"], params["bw"])
    stacked_xs = jnp.stack([xs, _reverse_time_major(xs, lengths)])
    stacked_states = jax.tree.map(both, *states)

    def one_direction(p, x, s):
        return unroll(cell, p, x, initial_state=s, lengths=lengths, time_major=True, **unroll_kwargs)

    ys, finals = jax.vmap(one_direction)(stacked_params, stacked_xs, stacked_states)
    ys_fw, ys_bw = ys[0], _reverse_time_major(ys[1], lengths)
    if not time_major:
        ys_fw, ys_bw = jnp.swapaxes(ys_fw, 0, 1), jnp.swapaxes(ys_bw, 0, 1)
    return ys_fw, ys_bw, jax.tree.map(lambda f: f[0], finals), jax.tree.map(lambda f: f[1], finals)
