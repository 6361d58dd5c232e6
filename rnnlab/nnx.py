"""Flax NNX adapters: use any rnnlab cell inside an `nnx.Module`.

    from flax import nnx
    import rnnlab
    import rnnlab.nnx

    class Classifier(nnx.Module):
        def __init__(self, input_size: int, *, rngs: nnx.Rngs):
            cell = rnnlab.dropout(rnnlab.cells.lstm(64), output_keep=0.8)
            self.rnn = rnnlab.nnx.RNN(cell, input_size, return_state=True, rngs=rngs)
            self.head = nnx.Linear(64, 10, rngs=rngs)

        def __call__(self, x, lengths):
            _, final = self.rnn(x, lengths=lengths)
            return self.head(final.cell.h)

    model = Classifier(28, rngs=nnx.Rngs(params=0, dropout=1))
    model.train()                      # dropout on (model.eval() turns it off)
    logits = model(x, lengths)         # x: [B, T, 28], lengths: [B] -> [B, 10]

The modules are thin. Their params are made at construction, `cell.init(rngs.params(),
input_size)`, and kept in that pytree's own structure with every array in an
`nnx.Param` (attribute `cell_params`; `{"fw": ..., "bw": ...}` for `Bidirectional`),
so `nnx.state`, `nnx.grad`, `nnx.jit` and `nnx.Optimizer(..., wrt=nnx.Param)` see them.
`module.params` gives the plain arrays, and the call is `rnnlab.unroll` /
`rnnlab.bidirectional` with them: `module(x)` equals
`rnnlab.unroll(cell, module.params, x)[0]`.

Randomness follows `rnnlab.linen`: a cell draws random numbers (dropout) only when its
initial state gets a key. When `deterministic` is false the modules draw that key from
the `"dropout"` stream of the `rngs` given at construction (or from `rngs` given at
call time); when true, or when the cell has no randomness at all, they pass `rng=None`.
A cell without randomness needs no `deterministic` at all. As with `nnx.Dropout`, `deterministic` is
set at construction, by `model.train()` / `model.eval()` or `nnx.view`, or at call time,
which wins. A given `initial_state` brings its own keys (`rnnlab.new_dropout_keys`), so
no key is drawn for it; with `deterministic` true its keys are removed
(`rnnlab.wrappers.without_dropout_keys`), evaluating a state carried from training
without dropout.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
from flax import nnx

from rnnlab.cells.base import Array, Params, PRNGKey, RNNCell, State
from rnnlab.linen import call_states_and_rng, uses_randomness
from rnnlab.unroll import bidirectional as _bidirectional
from rnnlab.unroll import unroll as _unroll

# Call-time sources of the dropout key: an `nnx.Rngs` (its "dropout" stream), a
# stream, or a key.
DropoutRngs = Union[nnx.Rngs, nnx.RngStream, PRNGKey]

# the keyword arguments of `rnnlab.unroll` that the modules pass through as given
_UNROLL_OPTIONS = frozenset(inspect.signature(_unroll).parameters) - {
    "cell", "params", "inputs", "initial_state", "lengths", "resets", "time_major", "rng"
}


def _check_cell(owner: str, name: str, cell: Any) -> None:
    """Raises a one-line `TypeError` unless `cell` (the argument `owner.name`) is an `RNNCell`."""
    if not isinstance(cell, RNNCell):
        raise TypeError(f"{owner}.{name} must be an rnnlab RNNCell, got {type(cell).__name__}.")


def _check_options(owner: str, options: dict[str, Any], allowed: frozenset[str]) -> None:
    """Raises a one-line `TypeError` for keyword arguments of `owner` outside `allowed`."""
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"{owner} got unknown unroll options {unknown}; it takes {sorted(allowed)}.")


def _check_rngs(owner: str, rngs: Any) -> None:
    """Raises a one-line `TypeError` unless `rngs` is an `nnx.Rngs`."""
    if not isinstance(rngs, nnx.Rngs):
        raise TypeError(f"{owner} takes rngs=nnx.Rngs(...) (params, and dropout for a cell with dropout), "
                        f"got {type(rngs).__name__}.")


def _dropout_stream(rngs: nnx.Rngs) -> Optional[nnx.RngStream]:
    """A stream of its own forked from `rngs`' "dropout" stream (or its default one);
    `None` when `rngs` has neither."""
    try:
        return rngs["dropout"].fork()
    except KeyError:
        return None


class _Adapter(nnx.Module):
    """What `RNN` and `Bidirectional` share: the params and options they hold, the
    params view and the dropout rules."""

    def _hold(self, params: Params, random: bool, rngs: nnx.Rngs, input_size: int, return_state: bool,
              time_major: bool, deterministic: Optional[bool], unroll_options: dict[str, Any]) -> None:
        """Keeps the constructor's arguments; `params` as `nnx.Param`s, and a dropout
        stream of its own when some cell is `random`."""
        self.input_size = input_size
        self.return_state = return_state
        self.time_major = time_major
        self.deterministic = deterministic
        self.unroll_options = unroll_options
        self.cell_params = nnx.data(jax.tree.map(nnx.Param, params))
        self.random = random
        self.rngs = nnx.data(_dropout_stream(rngs) if random else None)

    @property
    def params(self) -> Params:
        """The params as plain arrays, in the structure `cell.init` returns."""
        return jax.tree.map(lambda v: v.get_value(), self.cell_params, is_leaf=lambda x: isinstance(x, nnx.Variable))

    def set_view(self, deterministic: Optional[bool] = None) -> None:
        """Lets `nnx.view(model, deterministic=...)` set `deterministic`."""
        if deterministic is not None:
            self.deterministic = deterministic

    def _check_inputs(self, inputs: Array) -> None:
        shape = jnp.shape(inputs)
        if len(shape) == 3 and shape[-1] != self.input_size:
            raise ValueError(
                f"{type(self).__name__} was built with input_size={self.input_size}, got inputs of shape "
                f"{tuple(shape)} (last axis {shape[-1]})."
            )

    def _dropout_on(self, deterministic: Optional[bool]) -> bool:
        """Whether this call runs with dropout: some cell is random and `deterministic`
        (the call's, else the module's) is false."""
        if not self.random:
            return False
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic is None:
            raise ValueError(
                f"{type(self).__name__} holds a cell with dropout but `deterministic` is not set: pass "
                "deterministic=True/False to the constructor or the call, call model.train() / "
                "model.eval(), or use nnx.view(model, deterministic=...)."
            )
        return not deterministic

    def _dropout_key(self, rngs: Optional[DropoutRngs]) -> PRNGKey:
        """A dropout key from the call's `rngs`, else from the module's stream; a
        one-line `ValueError` when neither has a "dropout" stream."""
        source = self.rngs if rngs is None else rngs
        if isinstance(source, nnx.Rngs):
            try:
                source = source["dropout"]
            except KeyError:
                source = None
        if source is None:
            raise ValueError(
                f"{type(self).__name__} runs with dropout (deterministic=False) but has no \"dropout\" rng "
                "stream: construct it with rngs=nnx.Rngs(params=..., dropout=...), pass rngs= to the "
                "call, or set deterministic=True."
            )
        return source() if isinstance(source, nnx.RngStream) else source


class RNN(_Adapter):
    """Runs an rnnlab cell over a batch of sequences (`rnnlab.unroll`) as an NNX module.

    Args:
      cell: any `RNNCell` (stacks and wrappers included).
      input_size: `I`, the size of the inputs' last axis.
      rngs: `rngs.params()` draws the params; a cell with dropout also keeps a stream
        forked from `rngs`' `"dropout"` stream (or its default one) for its keys.
      return_state: return `(outputs, final_state)` instead of `outputs`.
      time_major: inputs and outputs are `[T, B, ...]` instead of `[B, T, ...]`.
      deterministic: `True` disables dropout; may instead be set later or per call.
      unroll_options: passed to `rnnlab.unroll`: `method`, `unroll`, `reverse`,
        `remat`, `hoist`, `block_size`, `fused`.

    Attributes:
      cell_params: `cell.init(...)`'s pytree with every array in an `nnx.Param`.
      params: the same as plain arrays (read only).
    """

    def __init__(
        self,
        cell: RNNCell,
        input_size: int,
        *,
        rngs: nnx.Rngs,
        return_state: bool = False,
        time_major: bool = False,
        deterministic: Optional[bool] = None,
        **unroll_options: Any,
    ) -> None:
        _check_cell("RNN", "cell", cell)
        _check_rngs("RNN", rngs)
        _check_options("RNN", unroll_options, _UNROLL_OPTIONS)
        self.cell = cell
        params = cell.init(rngs.params(), input_size)
        self._hold(params, uses_randomness(cell, params), rngs, input_size, return_state, time_major, deterministic,
                   unroll_options)

    def __call__(
        self,
        inputs: Array,
        *,
        lengths: Optional[Array] = None,
        initial_state: Optional[State] = None,
        resets: Optional[Array] = None,
        deterministic: Optional[bool] = None,
        rngs: Optional[DropoutRngs] = None,
    ) -> Array | tuple[Array, State]:
        """Args: `inputs [B, T, I]` (or `[T, B, I]`), optional integer `lengths [B]`, an
        optional batched `initial_state`, optional bool `resets [B, T]` (or `[T, B]`;
        episode starts, see `rnnlab.unroll`), `deterministic` to override the module's,
        and `rngs` to draw the dropout key from instead of the module's stream.

        Returns: outputs `[B, T, O]` (zero past each length), or
        `(outputs, final_state)` with `return_state=True`.
        """
        self._check_inputs(inputs)
        dropout_on = self._dropout_on(deterministic)
        (initial_state,), rng = call_states_and_rng(dropout_on, (initial_state,), lambda: self._dropout_key(rngs))
        outputs, final = _unroll(
            self.cell,
            self.params,
            inputs,
            initial_state=initial_state,
            lengths=lengths,
            resets=resets,
            time_major=self.time_major,
            rng=rng,
            **self.unroll_options,
        )
        return (outputs, final) if self.return_state else outputs


class Bidirectional(_Adapter):
    """`rnnlab.bidirectional` (TF1's `bidirectional_dynamic_rnn`) as an NNX module.

    Args:
      cell_fw, cell_bw: the forward and backward cells (any widths and types).
      input_size: `I`, the size of the inputs' last axis.
      merge: `"concat"` (outputs `[B, T, O_fw + O_bw]`) or `"none"` (the pair).
      Others as in `RNN` (no `reverse`); `return_state=True` returns
      `(outputs, (final_fw, final_bw))`.

    Attributes:
      cell_params: `{"fw": cell_fw.init(...), "bw": cell_bw.init(...)}`, the layout
        `rnnlab.bidirectional` takes, with every array in an `nnx.Param`.
      params: the same as plain arrays (read only).

    Give the same cell object as `cell_fw` and `cell_bw` to run both directions in one
    loop where that is faster (see `rnnlab.bidirectional`).
    """

    def __init__(
        self,
        cell_fw: RNNCell,
        cell_bw: RNNCell,
        input_size: int,
        *,
        rngs: nnx.Rngs,
        merge: str = "concat",
        return_state: bool = False,
        time_major: bool = False,
        deterministic: Optional[bool] = None,
        **unroll_options: Any,
    ) -> None:
        _check_cell("Bidirectional", "cell_fw", cell_fw)
        _check_cell("Bidirectional", "cell_bw", cell_bw)
        _check_rngs("Bidirectional", rngs)
        _check_options("Bidirectional", unroll_options, _UNROLL_OPTIONS - {"reverse"})
        if merge not in ("concat", "none"):
            raise ValueError(f"merge must be 'concat' or 'none', got {merge!r}.")
        self.cell_fw, self.cell_bw, self.merge = cell_fw, cell_bw, merge
        params = {"fw": cell_fw.init(rngs.params(), input_size), "bw": cell_bw.init(rngs.params(), input_size)}
        random = uses_randomness(cell_fw, params["fw"]) or uses_randomness(cell_bw, params["bw"])
        self._hold(params, random, rngs, input_size, return_state, time_major, deterministic, unroll_options)

    def __call__(
        self,
        inputs: Array,
        *,
        lengths: Optional[Array] = None,
        initial_states: tuple[Optional[State], Optional[State]] = (None, None),
        deterministic: Optional[bool] = None,
        rngs: Optional[DropoutRngs] = None,
    ) -> Any:
        """Args as `RNN`'s, with one optional batched initial state per direction.

        Returns: outputs `[B, T, O_fw + O_bw]` (or the pair with `merge="none"`), or
        `(outputs, (final_fw, final_bw))` with `return_state=True`.
        """
        self._check_inputs(inputs)
        dropout_on = self._dropout_on(deterministic)
        initial_states, rng = call_states_and_rng(dropout_on, initial_states, lambda: self._dropout_key(rngs))
        outputs, finals = _bidirectional(
            self.cell_fw,
            self.cell_bw,
            self.params,
            inputs,
            lengths=lengths,
            initial_states=initial_states,
            merge=self.merge,
            time_major=self.time_major,
            rng=rng,
            **self.unroll_options,
        )
        return (outputs, finals) if self.return_state else outputs
