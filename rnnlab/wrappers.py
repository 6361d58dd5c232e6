"""Combinators: functions that take cells and return cells.

* `stack`: TF1's `MultiRNNCell`, layers of any cell types and widths.
* `dropout`: TF1's `DropoutWrapper`, with input/output/state keep probabilities and
  variational (one mask per sequence) dropout.
* `zoneout`: zoneout (Krueger et al., 2016): each state unit keeps its previous value
  with some probability, with the dropout keys of `dropout`.
* `residual`: TF1's `ResidualWrapper`, output `x + cell(x)`; a linear recurrence stays one
  (`method="associative"` still applies).
* `trainable_initial_state`: the initial state as a parameter, learned with the others.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from rnnlab.cells.base import Array, LinearRecurrence, Params, PRNGKey, RNNCell, State, is_real_number


def stack(cells: Sequence[RNNCell]) -> RNNCell:
    """Stacks cells: layer `l` reads layer `l-1`'s output, the stack outputs the last.

    Params: a tuple with one entry per layer. State: a tuple with one state per layer.
    `rnnlab.unroll` runs a stack layer by layer, which gives the same numbers as
    stepping all layers together and lets it hoist every layer's input projection.
    """
    cells = tuple(cells)
    if not cells:
        raise ValueError("stack needs at least one cell, got an empty sequence.")
    for index, cell in enumerate(cells):
        if not isinstance(cell, RNNCell):
            raise TypeError(f"stack: cells[{index}] must be an RNNCell, got {type(cell).__name__}.")
    name = "stack(" + ", ".join(cell.name for cell in cells) + ")"

    def per_layer(values: Sequence[Any], what: str) -> Sequence[Any]:
        """`values` (params or states), checked to have one entry per layer."""
        if not isinstance(values, (tuple, list)) or len(values) != len(cells):
            got = f"{len(values)}" if isinstance(values, (tuple, list)) else f"a {type(values).__name__}"
            raise ValueError(f"{name}: {what} must be a tuple with one entry per layer ({len(cells)}), got {got}.")
        return values

    def init(key: PRNGKey, input_size: int) -> tuple[Params, ...]:
        params = []
        for cell, layer_key in zip(cells, jax.random.split(key, len(cells))):
            params.append(cell.init(layer_key, input_size))
            input_size = cell.output_size
        return tuple(params)

    def initial_state(params: Sequence[Params], rng: Optional[PRNGKey] = None) -> tuple[State, ...]:
        rngs = [None] * len(cells) if rng is None else list(jax.random.split(rng, len(cells)))
        return tuple(cell.initial_state(p, r) for cell, p, r in zip(cells, per_layer(params, "params"), rngs))

    def steps_above(params, states, y, first_state):
        new_states = [first_state]
        for cell, layer_params, layer_state in zip(cells[1:], params[1:], states[1:]):
            layer_state, y = cell.step(layer_params, layer_state, y)
            new_states.append(layer_state)
        return tuple(new_states), y

    def step(params, states, x):
        params, states = per_layer(params, "params"), per_layer(states, "state")
        first_state, y = cells[0].step(params[0], states[0], x)
        return steps_above(params, states, y, first_state)

    def input_projection(params, x):
        return cells[0].input_projection(params[0], x)

    def projected_step(params, states, z):
        params, states = per_layer(params, "params"), per_layer(states, "state")
        first_state, y = cells[0].projected_step(params[0], states[0], z)
        return steps_above(params, states, y, first_state)

    hoistable = cells[0].can_hoist
    return RNNCell(
        init=init,
        initial_state=initial_state,
        step=step,
        output_size=cells[-1].output_size,
        name=name,
        input_projection=input_projection if hoistable else None,
        projected_step=projected_step if hoistable else None,
        layers=cells,
    )


class DropoutState(NamedTuple):
    """State of a `dropout` or `zoneout` cell: the wrapped cell's state and the key.

    `key` is `None` in evaluation (no dropout; zoneout's expectation form). For
    variational dropout it stays fixed for the whole sequence, so every step draws the
    same masks from it; otherwise each step splits it. Both wrappers share this state so
    that `new_dropout_keys`, `without_dropout_keys`, `unroll(..., rng=key)` and the
    Flax modules' `"dropout"` stream serve either one.
    """

    cell: State
    key: Optional[PRNGKey]


def _keyed_initial_state(cell: RNNCell, params: Params, rng: Optional[PRNGKey] = None) -> DropoutState:
    """The initial state of a `dropout` or `zoneout` wrapper of `cell`: the cell's, and
    a key split from `rng` (`None` without one: evaluation)."""
    if rng is None:
        return DropoutState(cell.initial_state(params), None)
    cell_rng, wrapper_rng = jax.random.split(rng)
    return DropoutState(cell.initial_state(params, cell_rng), wrapper_rng)


def _keep_probability(value: float, name: str) -> float:
    if not is_real_number(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be a keep probability in (0, 1], got {value!r}.")
    return float(value)


def inverted_dropout(key: PRNGKey, x: Array, keep: float) -> Array:
    """Inverted dropout of the elements of `x`: keeps each with probability `keep` and
    scales it by 1/keep, zeroes the rest; `keep == 1` returns `x`."""
    if keep == 1.0:
        return x
    mask = jax.random.bernoulli(key, keep, jnp.shape(x))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


def _drop_state(key: PRNGKey, state: State, keep: float) -> State:
    """Drops every floating-point state leaf except LSTM memory cells (fields named `c`),
    as TF1 does; PRNG keys in the state (of dropout cells inside) are left alone."""
    if keep == 1.0:
        return state
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    keys = jax.random.split(key, max(len(leaves), 1))
    droppable = lambda path, leaf: jnp.issubdtype(leaf.dtype, jnp.inexact) and not _is_memory_cell(path)
    dropped = [
        inverted_dropout(leaf_key, leaf, keep) if droppable(path, leaf) else leaf
        for (path, leaf), leaf_key in zip(leaves, keys)
    ]
    return jax.tree_util.tree_unflatten(treedef, dropped)


def _is_memory_cell(path: Any) -> bool:
    last = path[-1] if path else None
    return getattr(last, "name", None) == "c"


def dropout(
    cell: RNNCell,
    *,
    input_keep: float = 1.0,
    output_keep: float = 1.0,
    state_keep: float = 1.0,
    variational: bool = False,
) -> RNNCell:
    """TF1's `DropoutWrapper`: dropout on the cell's input, output and new state.

    Randomness is explicit: `initial_state(params, rng)` stores a key in the state, and
    `rnnlab.unroll(..., rng=key)` passes one per example. With `rng=None` (evaluation)
    the wrapper is the identity. Without `variational`, every step draws new masks;
    with it, every step of a sequence reuses the same masks (Gal & Ghahramani, 2016).
    State dropout skips LSTM memory cells `c`, like TF1's default state filter.

    Params: the wrapped cell's. State: `DropoutState(cell, key)`.
    """
    input_keep = _keep_probability(input_keep, "input_keep")
    output_keep = _keep_probability(output_keep, "output_keep")
    state_keep = _keep_probability(state_keep, "state_keep")
    name = f"dropout({cell.name}, in={input_keep}, out={output_keep}, state={state_keep}" + (
        ", variational)" if variational else ")"
    )

    def step_keys(key: PRNGKey) -> tuple[PRNGKey, tuple[PRNGKey, PRNGKey, PRNGKey]]:
        """The key to carry on and the (input, output, state) keys of this step."""
        if variational:
            return key, tuple(jax.random.split(key, 3))
        next_key, *this_step = jax.random.split(key, 4)
        return next_key, tuple(this_step)

    def wrap(inner_step, drop_input: bool):
        def wrapped(params: Params, state: DropoutState, x: Array) -> tuple[DropoutState, Array]:
            if state.key is None:
                new_cell_state, y = inner_step(params, state.cell, x)
                return DropoutState(new_cell_state, None), y
            next_key, (in_key, out_key, state_key) = step_keys(state.key)
            if drop_input:
                x = inverted_dropout(in_key, x, input_keep)
            new_cell_state, y = inner_step(params, state.cell, x)
            new_cell_state = _drop_state(state_key, new_cell_state, state_keep)
            return DropoutState(new_cell_state, next_key), inverted_dropout(out_key, y, output_keep)

        return wrapped

    hoistable = cell.can_hoist and input_keep == 1.0
    return RNNCell(
        init=cell.init,
        initial_state=functools.partial(_keyed_initial_state, cell),
        step=wrap(cell.step, drop_input=True),
        output_size=cell.output_size,
        name=name,
        input_projection=cell.input_projection if hoistable else None,
        projected_step=wrap(cell.projected_step, drop_input=False) if hoistable else None,
    )


def _zoneout_rate(value: float, name: str) -> float:
    if not is_real_number(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a zoneout rate (a float in [0, 1)), got {value!r}.")
    return float(value)


def _zoneout_state(key: Optional[PRNGKey], previous: State, candidate: State, rate: float, memory_rate: float) -> State:
    """Mixes every floating-point leaf of `candidate` with the same leaf of `previous`:
    with a key, each unit keeps its previous value with probability `rate`
    (`memory_rate` for LSTM memory cells `c`); without one, the expectation
    `rate * previous + (1 - rate) * candidate`. Other leaves (the PRNG keys of dropout
    cells inside) are the candidate's."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(candidate)
    previous_leaves = treedef.flatten_up_to(previous)
    keys = [None] * len(leaves) if key is None else jax.random.split(key, max(len(leaves), 1))
    mixed = []
    for (path, new), old, leaf_key in zip(leaves, previous_leaves, keys):
        leaf_rate = memory_rate if _is_memory_cell(path) else rate
        if leaf_rate == 0.0 or not jnp.issubdtype(new.dtype, jnp.inexact):
            mixed.append(new)
        elif leaf_key is None:
            mixed.append(leaf_rate * old + (1.0 - leaf_rate) * new)
        else:
            keep_previous = jax.random.bernoulli(leaf_key, leaf_rate, jnp.shape(new))
            mixed.append(jnp.where(keep_previous, old, new))
    return jax.tree_util.tree_unflatten(treedef, mixed)


def zoneout(cell: RNNCell, rate: float, *, memory_rate: Optional[float] = None) -> RNNCell:
    """Zoneout (Krueger et al., 2016, "Zoneout: Regularizing RNNs by Randomly Preserving
    Hidden Activations", arXiv:1606.01305): units of the state randomly keep their
    previous values instead of being updated.

    In training, every unit of every floating-point leaf of the new state is, at every
    step and independently, its previous value with probability `rate` and the wrapped
    cell's new value otherwise: `new = mask * previous + (1 - mask) * candidate` with
    `mask ~ Bernoulli(rate)` per unit, drawn fresh at each step. LSTM memory cells (the
    state fields named `c`, as `dropout` finds them) use `memory_rate` instead (`None`:
    `rate`). In evaluation (no key) the new state is the expectation,
    `rate * previous + (1 - rate) * candidate`. The PRNG keys of dropout cells inside
    are carried on, never mixed.

    The output `y` is the wrapped cell's output as the cell returns it, not recomputed
    from the zoned-out state (as in the zoneout authors' own code); so for every cell,
    in training and in evaluation, `y` can differ from the state carried on (read the
    final state, not the last output, for what the next step sees).

    Randomness is that of `dropout`: `initial_state(params, rng)` stores a key (`None`
    without one, for evaluation) and `rnnlab.unroll(..., rng=key)` passes one per
    example; `new_dropout_keys` and `without_dropout_keys` apply as they do to dropout.
    The wrapped cell's input projection is kept, so the unroll can still hoist it.

    Args:
      cell: the cell to wrap; `x: [input_size]`, `y: [cell.output_size]`.
      rate: the probability that a unit keeps its previous value, a float in [0, 1)
        (1 would freeze the state forever); 0 is the wrapped cell.
      memory_rate: the same for LSTM memory cells `c`; `None` means `rate`. A
        different value for a cell whose state has no `c` is refused (`ValueError` at
        the first step).

    Params: the wrapped cell's. State: `DropoutState(cell, key)`.
    """
    rate = _zoneout_rate(rate, "rate")
    memory_rate = rate if memory_rate is None else _zoneout_rate(memory_rate, "memory_rate")
    name = f"zoneout({cell.name}, rate={rate}" + (f", memory_rate={memory_rate})" if memory_rate != rate else ")")

    def _check_memory_rate(cell_state: State) -> None:
        paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(cell_state)[0]]
        if memory_rate != rate and not any(_is_memory_cell(path) for path in paths):
            raise ValueError(f"{name}: memory_rate applies to LSTM memory cells (state fields named c), and "
                             f"{cell.name} has none; drop memory_rate.")

    def wrap(inner_step: Callable[[Params, State, Array], tuple[State, Array]]):
        def wrapped(params: Params, state: DropoutState, x: Array) -> tuple[DropoutState, Array]:
            _check_memory_rate(state.cell)
            candidate, y = inner_step(params, state.cell, x)
            if state.key is None:
                return DropoutState(_zoneout_state(None, state.cell, candidate, rate, memory_rate), None), y
            next_key, step_key = jax.random.split(state.key)
            return DropoutState(_zoneout_state(step_key, state.cell, candidate, rate, memory_rate), next_key), y

        return wrapped

    return RNNCell(
        init=cell.init,
        initial_state=functools.partial(_keyed_initial_state, cell),
        step=wrap(cell.step),
        output_size=cell.output_size,
        name=name,
        input_projection=cell.input_projection if cell.can_hoist else None,
        projected_step=wrap(cell.projected_step) if cell.can_hoist else None,
    )


def new_dropout_keys(state: State, rng: PRNGKey) -> State:
    """`state` with fresh keys, drawn from `rng`, in every `DropoutState` that has one.

    A state carried from one window of a stream to the next (truncated backpropagation
    through time) keeps its dropout keys, so variational dropout would apply the same
    masks to the whole stream; re-keying it between windows draws new masks per window,
    as TF1 does at every `session.run`. Works on one example's state and on batched
    states (every example gets its own key), on nested dropout cells, and on raw
    (`PRNGKey`) and typed (`jax.random.key`) keys alike; keys stay of their kind.
    """
    return _replace_dropout_keys(state, lambda key, key_rng: None if key is None else _keys_like(key, key_rng), rng)


def without_dropout_keys(state: State) -> State:
    """`state` with the key of every `DropoutState` set to `None`: the same cell state,
    run without dropout (e.g. to evaluate from a state carried from training)."""
    return _replace_dropout_keys(state, lambda key, key_rng: None, None)


def _replace_dropout_keys(
    state: State, new_key: Callable[[Optional[PRNGKey], Optional[PRNGKey]], Optional[PRNGKey]], rng: Optional[PRNGKey]
) -> State:
    """`state` with the key of every `DropoutState`, nested ones included, replaced by
    `new_key(key, key_rng)`; each gets its own `key_rng` drawn from `rng` (`None`
    without one)."""
    nodes, treedef = jax.tree.flatten(state, is_leaf=lambda node: isinstance(node, DropoutState))
    node_rngs = [None] * len(nodes) if rng is None else jax.random.split(rng, max(len(nodes), 1))
    replaced = []
    for node, node_rng in zip(nodes, node_rngs):
        if isinstance(node, DropoutState):
            inner_rng, key_rng = (None, None) if node_rng is None else jax.random.split(node_rng)
            node = DropoutState(_replace_dropout_keys(node.cell, new_key, inner_rng), new_key(node.key, key_rng))
        replaced.append(node)
    return jax.tree.unflatten(treedef, replaced)


def with_dropout_keys_of(state: State, running: State) -> State:
    """`state` (e.g. a cell's initial state, its `DropoutState` keys `None`) with the key of
    every `DropoutState`, nested ones included, taken from `running` (a state of the same
    cell), and its other leaves cast to `running`'s dtypes: an episode reset starts from
    the initial state but keeps the masks, and a learned initial state takes the keys
    drawn for the sequence (`trainable_initial_state`)."""
    is_dropout = lambda node: isinstance(node, DropoutState)
    nodes, treedef = jax.tree.flatten(state, is_leaf=is_dropout)
    kept = [
        DropoutState(with_dropout_keys_of(node.cell, run.cell), run.key) if is_dropout(node) else node.astype(run.dtype)
        for node, run in zip(nodes, treedef.flatten_up_to(running))
    ]
    return jax.tree.unflatten(treedef, kept)


def _keys_like(keys: PRNGKey, rng: PRNGKey) -> PRNGKey:
    """New keys from `rng` with the shape and kind (raw or typed) of `keys`."""
    typed = jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
    shape = keys.shape if typed else keys.shape[:-1]
    fresh = jax.random.split(rng, shape)
    fresh_typed = jnp.issubdtype(fresh.dtype, jax.dtypes.prng_key)
    if typed and not fresh_typed:
        return jax.random.wrap_key_data(fresh)
    if fresh_typed and not typed:
        return jax.random.key_data(fresh)
    return fresh


def residual(cell: RNNCell) -> RNNCell:
    """TF1's `ResidualWrapper`: output `x + y`; needs `input_size == cell.output_size`.

    Params and state: the wrapped cell's.
    """
    name = f"residual({cell.name})"

    def init(key: PRNGKey, input_size: int) -> Params:
        if input_size != cell.output_size:
            raise ValueError(
                f"{name}: input_size ({input_size}) must equal the cell's output_size "
                f"({cell.output_size}) to add the input to the output."
            )
        return cell.init(key, input_size)

    def step(params: Params, state: State, x: Array) -> tuple[State, Array]:
        state, y = cell.step(params, state, x)
        if jnp.shape(x) != jnp.shape(y):
            raise ValueError(
                f"{name}: the input {jnp.shape(x)} and the cell's output {jnp.shape(y)} must have "
                "the same shape to be added."
            )
        return state, x + y

    return RNNCell(
        init=init,
        initial_state=cell.initial_state,
        step=step,
        output_size=cell.output_size,
        name=name,
        linear_recurrence=_residual_recurrence(cell.linear_recurrence),
    )


def _residual_recurrence(recurrence: Optional[LinearRecurrence]) -> Optional[LinearRecurrence]:
    """A linear recurrence stays one under `residual`: only its readout gains `+ x`."""
    if recurrence is None:
        return None
    inner_readout = recurrence.readout

    def readout(params: Params, h: State, x: Array) -> Array:
        return x + inner_readout(params, h, x)

    return recurrence._replace(readout=readout)


def trainable_initial_state(cell: RNNCell) -> RNNCell:
    """`cell` with a learned initial state: a parameter, trained with the others.

    Params: `{"cell": the cell's params, "initial_state": one example's state}`, the
    latter initialised to the cell's own initial state (zeros for most cells) and without
    dropout keys. `initial_state(params, rng)` returns that state with the dropout keys
    the cell draws from `rng`, so `rnnlab.unroll` starts every sequence from it when
    given no `initial_state`, and episode resets (`resets=`) restart from it.

    Everything else is the cell's own: its step, its hoisted input projection, its
    fused scan and its linear recurrence (`method="associative"` applies), so it unrolls
    as fast as the cell. A `stack` becomes the stack of its layers so wrapped (params: a
    tuple of the layers' `{"cell", "initial_state"}`), so that the unroll still runs it
    layer by layer.
    """
    if not isinstance(cell, RNNCell):
        raise TypeError(f"trainable_initial_state needs an rnnlab RNNCell, got {type(cell).__name__}.")
    if cell.layers is not None:
        return stack([trainable_initial_state(layer) for layer in cell.layers])
    name = f"trainable_initial_state({cell.name})"

    def init(key: PRNGKey, input_size: int) -> Params:
        params = cell.init(key, input_size)
        return {"cell": params, "initial_state": without_dropout_keys(cell.initial_state(params))}

    def initial_state(params: Params, rng: Optional[PRNGKey] = None) -> State:
        return with_dropout_keys_of(params["initial_state"], cell.initial_state(params["cell"], rng))

    def on_cell_params(fn: Optional[Callable[..., Any]]) -> Optional[Callable[..., Any]]:
        """`fn(params, ...)` of the cell, called with the wrapper's params."""
        return None if fn is None else lambda params, *args: fn(params["cell"], *args)

    recurrence = cell.linear_recurrence
    if recurrence is not None:
        recurrence = recurrence._replace(
            coefficients=on_cell_params(recurrence.coefficients),
            readout=on_cell_params(recurrence.readout),
            log_coefficients=on_cell_params(recurrence.log_coefficients),
        )
    return RNNCell(
        init=init,
        initial_state=initial_state,
        step=on_cell_params(cell.step),
        output_size=cell.output_size,
        name=name,
        input_projection=on_cell_params(cell.input_projection),
        projected_step=on_cell_params(cell.projected_step),
        linear_recurrence=recurrence,
        fused_scan=on_cell_params(cell.fused_scan),
    )
