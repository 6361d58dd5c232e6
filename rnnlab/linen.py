"""Flax `linen` adapters: use any rnnlab cell inside a `flax.linen` model.

    import flax.linen as nn
    import rnnlab
    from rnnlab.linen import RNN

    class Classifier(nn.Module):
        @nn.compact
        def __call__(self, x, lengths, train: bool):
            cell = rnnlab.dropout(rnnlab.cells.lstm(64), output_keep=0.8)
            ys, final = RNN(cell, return_state=True)(x, lengths=lengths, deterministic=not train)
            return nn.Dense(10)(final.cell.h)

    variables = Classifier().init(key, x, lengths, train=False)
    logits = Classifier().apply(variables, x, lengths, train=True, rngs={"dropout": key})

The modules are thin: the cell's params pytree (exactly what `cell.init` returns) is
ONE Flax parameter, `"cell"` (`"fw"` and `"bw"` for `Bidirectional`), and the call is
`rnnlab.unroll` / `rnnlab.bidirectional` with those params, so
`module.apply(variables, x)` equals
`rnnlab.unroll(cell, variables["params"]["cell"], x)[0]`.

Randomness: a cell draws random numbers (dropout) only when its `initial_state` gets a
key. When `deterministic` is false the modules take that key from Flax's `"dropout"`
RNG stream (`self.make_rng("dropout")`); when true, or when the cell has no randomness
at all, they pass `rng=None`, and `deterministic` may then be left out. A given
`initial_state` brings its own keys (`rnnlab.new_dropout_keys` gives a carried state
new ones), so no key is drawn for it; with `deterministic` true its keys are removed
(`rnnlab.wrappers.without_dropout_keys`), so a state carried from training is
evaluated without dropout. As with
`flax.linen.Dropout`, `deterministic` is given either to the constructor or at call
time, not both.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax

from rnnlab.cells.base import Array, Params, PRNGKey, RNNCell, State
from rnnlab.unroll import bidirectional as _bidirectional
from rnnlab.unroll import unroll as _unroll
from rnnlab.wrappers import without_dropout_keys


def uses_randomness(cell: RNNCell, params: Params) -> bool:
    """Whether `cell` draws random numbers, i.e. keeps something of an rng in its state.

    By the cell contract the only way randomness reaches `cell.step` is through the state
    built by `initial_state(params, rng)`; `rnnlab.dropout` stores a key there and `None`
    without one. So a cell is random iff its initial state's structure depends on
    whether a key is given. Evaluated abstractly (`jax.eval_shape`): costs no compute.
    """
    key = jax.random.PRNGKey(0)
    with_key = jax.eval_shape(lambda p, k: cell.initial_state(p, k), params, key)
    without_key = jax.eval_shape(lambda p: cell.initial_state(p), params)
    return jax.tree.structure(with_key) != jax.tree.structure(without_key)


def call_states_and_rng(
    dropout_on: bool, states: Sequence[Optional[State]], draw_key: Callable[[], PRNGKey]
) -> tuple[Sequence[Optional[State]], Optional[PRNGKey]]:
    """The initial states (one per direction, `None` where not given) and the rng that
    a module's call passes to the unroll: with dropout on, a key from `draw_key()`
    when some state is not given (a given state brings its own keys); with dropout
    off, no key, and the given states without their dropout keys, so that a state
    carried from training is evaluated without dropout. The rule of the linen and the
    NNX modules alike."""
    rng = draw_key() if dropout_on and any(state is None for state in states) else None
    if not dropout_on:
        states = tuple(None if state is None else without_dropout_keys(state) for state in states)
    return states, rng


class _RNNBase(nn.Module):
    """Helpers shared by `RNN` and `Bidirectional` (no fields of its own, so that each
    subclass lists its cells first and can be built as `RNN(cell, ...)`). Subclasses
    define `method`, `unroll`, `remat`, `hoist`, `block_size`, `fused` and
    `deterministic`."""

    def _dropout_on(self, cells_and_params: list[tuple[RNNCell, Params]], deterministic: Optional[bool]) -> bool:
        """Whether this call runs with dropout: some cell is random and `deterministic`
        (given once, to the constructor or at call time) is false."""
        if not any(uses_randomness(cell, params) for cell, params in cells_and_params):
            return False
        return not nn.merge_param("deterministic", self.deterministic, deterministic)

    def _unroll_options(self) -> dict[str, Any]:
        return dict(
            method=self.method,
            unroll=self.unroll,
            remat=self.remat,
            hoist=self.hoist,
            block_size=self.block_size,
            fused=self.fused,
        )


class RNN(_RNNBase):
    """Runs an rnnlab cell over a batch of sequences (`rnnlab.unroll`) as a Flax module.

    Attributes:
      cell: any `RNNCell` (stacks and wrappers included).
      method: `"scan"`, `"static"` or `"associative"` (see `rnnlab.unroll`).
      unroll: steps per `lax.scan` iteration.
      reverse: run each sequence's valid prefix backwards (outputs in original order).
      time_major: inputs and outputs are `[T, B, ...]` instead of `[B, T, ...]`.
      remat: checkpoint the step (recompute it on the backward pass).
      hoist: precompute the input projection of all steps when the cell allows it
        (`None`: as `rnnlab.unroll` decides per backend).
      block_size: blocks of the associative scan (see `rnnlab.unroll`).
      fused: run the cell's fused scan if it has one (see `rnnlab.unroll`).
      return_state: return `(outputs, final_state)` instead of `outputs`.
      deterministic: `True` disables dropout; may instead be given at call time.

    Params: `{"cell": cell.init(key, input_size)}` with `input_size = inputs.shape[-1]`.
    """

    cell: RNNCell
    method: str = "scan"
    unroll: int = 1
    reverse: bool = False
    time_major: bool = False
    remat: bool = False
    hoist: Optional[bool] = None
    block_size: Optional[int] = None
    fused: Optional[bool] = None
    return_state: bool = False
    deterministic: Optional[bool] = None

    @nn.compact
    def __call__(
        self,
        inputs: Array,
        *,
        lengths: Optional[Array] = None,
        initial_state: Optional[State] = None,
        resets: Optional[Array] = None,
        deterministic: Optional[bool] = None,
    ) -> Array | tuple[Array, State]:
        """Args: `inputs [B, T, I]` (or `[T, B, I]`), optional integer `lengths [B]`, an
        optional batched `initial_state`, optional bool `resets [B, T]` (or `[T, B]`;
        episode starts, see `rnnlab.unroll`), and `deterministic` unless set on the
        module.

        Returns: outputs `[B, T, O]` (zero past each length), or
        `(outputs, final_state)` with `return_state=True`.
        """
        if not isinstance(self.cell, RNNCell):
            raise TypeError(f"RNN.cell must be an rnnlab RNNCell, got {type(self.cell).__name__}.")
        input_size = inputs.shape[-1]
        params = self.param("cell", lambda key: self.cell.init(key, input_size))
        dropout_on = self._dropout_on([(self.cell, params)], deterministic)
        (initial_state,), rng = call_states_and_rng(dropout_on, (initial_state,), lambda: self.make_rng("dropout"))
        outputs, final = _unroll(
            self.cell,
            params,
            inputs,
            initial_state=initial_state,
            lengths=lengths,
            resets=resets,
            reverse=self.reverse,
            time_major=self.time_major,
            rng=rng,
            **self._unroll_options(),
        )
        return (outputs, final) if self.return_state else outputs


class Bidirectional(_RNNBase):
    """`rnnlab.bidirectional` (TF1's `bidirectional_dynamic_rnn`) as a Flax module.

    Attributes:
      cell_fw, cell_bw: the forward and backward cells (any widths and types).
      merge: `"concat"` (outputs `[B, T, O_fw + O_bw]`) or `"none"` (the pair).
      Others as in `RNN`; `return_state=True` returns `(outputs, (final_fw, final_bw))`.

    Params: `{"fw": cell_fw.init(...), "bw": cell_bw.init(...)}`, the layout
    `rnnlab.bidirectional` takes. Give the same cell object as `cell_fw` and `cell_bw`
    to run both directions in one loop where that is faster (see `rnnlab.bidirectional`).
    """

    cell_fw: RNNCell
    cell_bw: RNNCell
    merge: str = "concat"
    method: str = "scan"
    unroll: int = 1
    time_major: bool = False
    remat: bool = False
    hoist: Optional[bool] = None
    block_size: Optional[int] = None
    fused: Optional[bool] = None
    return_state: bool = False
    deterministic: Optional[bool] = None

    @nn.compact
    def __call__(
        self,
        inputs: Array,
        *,
        lengths: Optional[Array] = None,
        initial_states: tuple[Optional[State], Optional[State]] = (None, None),
        deterministic: Optional[bool] = None,
    ) -> Any:
        for name, cell in (("cell_fw", self.cell_fw), ("cell_bw", self.cell_bw)):
            if not isinstance(cell, RNNCell):
                raise TypeError(f"Bidirectional.{name} must be an rnnlab RNNCell, got {type(cell).__name__}.")
        input_size = inputs.shape[-1]
        params = {
            "fw": self.param("fw", lambda key: self.cell_fw.init(key, input_size)),
            "bw": self.param("bw", lambda key: self.cell_bw.init(key, input_size)),
        }
        dropout_on = self._dropout_on([(self.cell_fw, params["fw"]), (self.cell_bw, params["bw"])], deterministic)
        initial_states, rng = call_states_and_rng(dropout_on, initial_states, lambda: self.make_rng("dropout"))
        outputs, finals = _bidirectional(
            self.cell_fw,
            self.cell_bw,
            params,
            inputs,
            lengths=lengths,
            initial_states=initial_states,
            merge=self.merge,
            time_major=self.time_major,
            rng=rng,
            **self._unroll_options(),
        )
        return (outputs, finals) if self.return_state else outputs
