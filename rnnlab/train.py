"""A generic training loop for rnnlab models: one jitted step, data on the device.

A model is trained through a `Task`, three pure functions:

    task = Task(
        init_params=lambda key: ...,                 # -> params pytree
        loss=lambda params, carry, batch, rng: ...,  # -> (loss, (new_carry, metrics))
        init_carry=lambda batch_size: ...,           # -> carry pytree (default: None)
    )
    result = train(task, config, workdir, train_data, {"test": test_data})

* `train_data` and every eval split are pytrees of arrays sharing a leading example
  axis `[N, ...]` (e.g. `{"image": uint8 [N, 28, 28], "label": int32 [N]}`). They are
  put on the device once; each step slices or gathers its batch inside `jit`.
* `loss(params, carry, batch, rng)`: `batch` is `train_data` with `N` replaced by the
  batch size `B`. `rng` is a PRNG key in training and `None` in evaluation, which must
  then be deterministic. It returns the scalar loss to minimise and
  `(new_carry, metrics)`, where `metrics` maps names to PER-EXAMPLE values `[B]` (e.g.
  `{"loss": [B], "accuracy": [B]}`); training logs their batch means, evaluation their
  exact means over a whole split.
* The carry is state handed from one batch to the next: for truncated BPTT, the RNN
  state of `B` text streams (every leaf with a leading `[B]` axis). It is reset to
  `init_carry(B)` at the start of every epoch and of every evaluation. Tasks without
  one leave `init_carry` at its default, which returns `None`.

Data order (deterministic for a given `config.seed`):
* `config.shuffle=True`: epoch `e` visits the rows in a permutation drawn from
  `(seed, e)`; its last `N % B` rows are skipped in that epoch (a different
  remainder every epoch).
* `config.shuffle=False`: batch `i` of every epoch is rows `[i*B, (i+1)*B)`. For
  truncated BPTT over `B` streams, put window `w` of stream `s` at row `w*B + s`, so
  that the carry of row `s` flows from window to window.

Parallelism: a `jax.sharding.Mesh` over `jax.devices()` with one axis `"data"`; the
batch and the carry are sharded along it, params and optimiser state replicated. On
one device this is plain single-device training. `B` must divide by the device count.
Several processes (hosts; see `rnnlab.distributed` and docs/scaling.md) run the same
call on the same data: they stop together (signals and the time budget are agreed at
every log step), checkpoint together, and only process 0 writes logs and results.

The workdir receives:
  `config.json`; `metrics.jsonl` (one JSON object per line: `step`, `split` ("train"
  or an eval split's name), the metric means, and for "train" `learning_rate`,
  `grad_norm`, `steps_per_second`); TensorBoard event files; `checkpoints/` (orbax,
  atomic, the newest `config.keep_checkpoints` kept) holding params, optimiser state,
  step, schedule length, PRNG key and carry, so that `resume=True` continues exactly
  where the run stopped; `results.json` (see `train`).

The loop ends after `config.num_steps` steps (or `config.num_epochs` epochs), when the
wall-clock budget `config.time_budget_s` runs out (then it still evaluates), on
SIGINT/SIGTERM (it saves a checkpoint and returns), or on a non-finite loss (it raises
`NonFiniteLossError`, leaving the last good checkpoint in place). With a budget and
`config.fit_schedule_to_budget`, the learning-rate schedule is shortened from the
measured step time so that its decay ends with the budget (see `default_config`). A
resumed run keeps to the budget of the whole run and continues its schedule.

The config fields read here, with their defaults, are in `default_config()`.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import time
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rnnlab import checkpoint as checkpoint_lib
from rnnlab import distributed
from rnnlab import metrics as metrics_lib
from rnnlab.cells.base import Array, Params, PRNGKey
from rnnlab.checkpoint import CheckpointError

Batch = Any  # a pytree of arrays with a leading batch axis [B, ...]
Carry = Any  # a pytree of arrays with a leading batch axis [B, ...], or None
Data = Any  # a pytree of arrays with a leading example axis [N, ...]
Metrics = dict[str, Array]  # name -> per-example values [B]
LossFn = Callable[[Params, Carry, Batch, Optional[PRNGKey]], tuple[Array, tuple[Carry, Metrics]]]
EvalHook = Callable[[int, Params, dict[str, dict[str, float]]], None]

__all__ = [
    "CheckpointError",
    "NonFiniteLossError",
    "Task",
    "TrainResult",
    "TrainState",
    "data_mesh",
    "default_config",
    "evaluate",
    "learning_rate",
    "make_optimizer",
    "num_params",
    "num_rows",
    "restore_params",
    "train",
    "weight_decay_mask",
    "write_json",
]


def _no_carry(batch_size: int) -> None:
    del batch_size
    return None


class Task(NamedTuple):
    """What `train` needs to know about a model.

    Attributes:
      init_params: `(key) -> params`, a pytree of float arrays.
      loss: `(params, carry, batch, rng) -> (loss, (new_carry, metrics))`; see the
        module docstring. Must be traceable (it runs under `jit`).
      init_carry: `(batch_size) -> carry`, the carry at the start of an epoch or of an
        evaluation; every leaf `[batch_size, ...]`. Default: no carry (`None`).
    """

    init_params: Callable[[PRNGKey], Params]
    loss: LossFn
    init_carry: Callable[[int], Carry] = _no_carry


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and updates; all of it is checkpointed.

    Attributes:
      step: int32 scalar, the number of optimiser steps taken.
      total_steps: int32 scalar, the length of the learning-rate schedule.
      params: the model's params.
      opt_state: the optax state of `make_optimizer`.
      carry: the carry after the last step (see `Task.init_carry`).
      rng: uint32 `[2]`, the run's PRNG key; step `n` draws from `fold_in(rng, n)`.
    """

    step: Array
    total_steps: Array
    params: Params
    opt_state: Any
    carry: Carry
    rng: Array


class TrainResult(NamedTuple):
    """What `train` returns.

    Attributes:
      state: the final `TrainState`.
      results: the contents of `results.json` (see `train`).
    """

    state: TrainState
    results: dict[str, Any]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the step."""


def default_config() -> ml_collections.ConfigDict:
    """The training fields `train` reads, with their defaults.

    Fields:
      seed: seeds params, data order and per-step randomness.
      batch_size: training batch `B`; divisible by the number of devices.
      eval_batch_size: batch size of evaluation (the last batch is padded and masked).
      num_epochs: epochs to train, used when `num_steps` is 0.
      num_steps: optimiser steps to train; 0 means `num_epochs` epochs.
      shuffle: permute the rows every epoch (see the module docstring).
      optimizer: "adam" or "adamw".
      learning_rate: peak learning rate.
      lr_schedule: "cosine" (linear warmup from 0, then cosine decay to
        `learning_rate * final_lr_fraction` at the last step) or "constant" (after
        the warmup).
      warmup_steps: length of the linear warmup.
      final_lr_fraction: where the cosine decay ends, as a fraction of the peak.
      weight_decay: decoupled weight decay of "adamw" (scaled by the learning rate).
      weight_decay_exclude: a regular expression; params whose path (as
        `jax.tree_util.keystr` writes it, e.g. `['blocks'][0]['cell']['nu_log']`)
        matches it are not decayed. "" decays every param.
      b1, b2: Adam's moment decay rates.
      grad_clip_norm: clip gradients to this global norm; 0 disables.
      log_every_steps: how often training metrics are fetched, logged and checked for
        a non-finite loss (the only host syncs of the loop).
      eval_every_steps: evaluate every this many steps; 0 only at the end.
      checkpoint_every_steps: save every this many steps; 0 only at the end.
      keep_checkpoints: how many checkpoints to keep.
      time_budget_s: wall-clock seconds for the training loop (compilation and
        intermediate evaluations included; the final evaluation comes on top); when
        they run out, training stops and evaluates. 0 means no budget. It covers the
        whole run: a resumed run gets what is left after the seconds its checkpoint
        counted against it (summed over earlier resumes), and with nothing left it
        trains no step, stops with "time_budget" and evaluates.
      fit_schedule_to_budget: with a budget, re-plan the schedule's length at every
        log from the measured time per step, so that the decay ends when the budget
        does, never beyond the configured length. The number of steps then depends
        on the machine's speed (the data order and each step's randomness do not).
        A resume continues a schedule so shortened from the checkpoint's length (no
        jump back up the learning rate) and re-plans it against the rest of the
        budget; after a run that finished its shortened schedule, a resume with more
        budget starts a new schedule of the configured length, fitted likewise.
      progress_bar: show a tqdm bar (on stderr).
    """
    return ml_collections.ConfigDict(
        dict(
            seed=0,
            batch_size=128,
            eval_batch_size=1000,
            num_epochs=10,
            num_steps=0,
            shuffle=True,
            optimizer="adam",
            learning_rate=1e-3,
            lr_schedule="cosine",
            warmup_steps=100,
            final_lr_fraction=0.0,
            weight_decay=0.0,
            weight_decay_exclude="",
            b1=0.9,
            b2=0.999,
            grad_clip_norm=1.0,
            log_every_steps=50,
            eval_every_steps=0,
            checkpoint_every_steps=1000,
            keep_checkpoints=3,
            time_budget_s=0.0,
            fit_schedule_to_budget=True,
            progress_bar=True,
        )
    )


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The update direction of `config`'s optimiser, before the learning rate: optional
    global-norm clipping, Adam's scaling, and for "adamw" the decoupled weight decay.

    The train step multiplies the result by `-learning_rate(config, step, total)`,
    which makes the pair exactly `optax.adam` / `optax.adamw` on that schedule, while
    the schedule's length can change during a run (see `fit_schedule_to_budget`).
    """
    if config.optimizer not in ("adam", "adamw"):
        raise ValueError(f"config.optimizer must be 'adam' or 'adamw', got {config.optimizer!r}.")
    if config.lr_schedule not in ("cosine", "constant"):
        raise ValueError(f"config.lr_schedule must be 'cosine' or 'constant', got {config.lr_schedule!r}.")
    if config.grad_clip_norm < 0:
        raise ValueError(f"config.grad_clip_norm must be >= 0 (0 disables clipping), got {config.grad_clip_norm}.")
    parts = [optax.clip_by_global_norm(config.grad_clip_norm)] if config.grad_clip_norm else []
    parts.append(optax.scale_by_adam(b1=config.b1, b2=config.b2))
    if config.optimizer == "adamw":
        mask = weight_decay_mask(config.weight_decay_exclude)
        parts.append(optax.add_decayed_weights(config.weight_decay, mask=mask))
    return optax.chain(*parts)


def weight_decay_mask(exclude: str) -> Optional[Callable[[Params], Any]]:
    """`params -> pytree of bools`, False for the params whose path matches the regular
    expression `exclude` (searched in `jax.tree_util.keystr(path)`); `None` for "".

    Raises `ValueError` for an invalid expression.
    """
    if not exclude:
        return None
    try:
        pattern = re.compile(exclude)
    except re.error as error:
        raise ValueError(f"config.weight_decay_exclude is not a valid regular expression ({error}): {exclude!r}.") from None

    def mask(params: Params) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: pattern.search(jax.tree_util.keystr(path)) is None, params
        )

    return mask


def learning_rate(config: ml_collections.ConfigDict, step: Array, total_steps: Array) -> Array:
    """The learning rate at `step` of a `total_steps` schedule (traceable in both).

    Linear warmup from 0 to `config.learning_rate` over `config.warmup_steps` (at most
    `total_steps - 1`), then constant or a cosine decay reaching
    `learning_rate * final_lr_fraction` at `total_steps`; the same values as
    `optax.warmup_cosine_decay_schedule` for a fixed length.
    """
    step = jnp.asarray(step, jnp.float32)
    total = jnp.maximum(jnp.asarray(total_steps, jnp.float32), 1.0)
    warmup = jnp.minimum(float(config.warmup_steps), total - 1.0)
    peak = config.learning_rate
    warming = peak * step / jnp.maximum(warmup, 1.0)
    if config.lr_schedule == "constant":
        after = jnp.asarray(peak, jnp.float32)
    else:
        progress = jnp.clip((step - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
        final = config.final_lr_fraction
        after = peak * (final + (1.0 - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
    return jnp.where(step < warmup, warming, after)


def num_params(params: Params) -> int:
    """The number of scalars in `params`."""
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(params)))


def data_mesh() -> Mesh:
    """A one-axis mesh `("data",)` over all devices."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def num_rows(data: Data) -> int:
    """The size `N` of the leading axis shared by every array of `data`."""
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree.leaves(data)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"every array of the data must share one leading example axis, got sizes {sizes}.")
    return sizes.pop()


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Constrains every array with a leading batch axis to be split along "data"."""
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding) if jnp.ndim(x) else x, tree)


def _check_batch_size(batch_size: int, mesh: Mesh, what: str) -> None:
    if batch_size < 1 or batch_size % mesh.size:
        raise ValueError(f"{what} ({batch_size}) must be a positive multiple of the device count ({mesh.size}).")


class _Plan(NamedTuple):
    """The fixed facts of one `train` call."""

    batch_size: int
    num_rows: int
    steps_per_epoch: int
    total_steps: int  # as configured; a time budget may shorten the schedule


_MINIMA = {"num_steps": 0, "num_epochs": 0, "warmup_steps": 0, "log_every_steps": 1, "eval_every_steps": 0,
           "checkpoint_every_steps": 0, "keep_checkpoints": 1, "time_budget_s": 0}
"""The smallest valid value of the config's counts and durations."""


def _check_config(config: ml_collections.ConfigDict) -> None:
    """Raises a one-line `ValueError` for a count or duration out of range (e.g.
    `log_every_steps=0`, a negative `num_steps` or `time_budget_s`)."""
    for name, minimum in _MINIMA.items():
        value = config[name]
        if not (isinstance(value, (int, float)) and value >= minimum):  # NaN fails too
            meaning = {"num_steps": " (0 means num_epochs epochs)", "eval_every_steps": " (0: only at the end)",
                       "checkpoint_every_steps": " (0: only at the end)", "time_budget_s": " (0: no budget)"}
            raise ValueError(f"config.{name} must be >= {minimum}{meaning.get(name, '')}, got {value!r}.")


def _plan(config: ml_collections.ConfigDict, train_data: Data, mesh: Mesh) -> _Plan:
    _check_config(config)
    _check_batch_size(config.batch_size, mesh, "config.batch_size")
    rows = num_rows(train_data)
    if rows < config.batch_size:
        raise ValueError(f"the training data has {rows} rows, fewer than one batch (batch_size={config.batch_size}).")
    steps_per_epoch = rows // config.batch_size
    total = config.num_steps if config.num_steps > 0 else config.num_epochs * steps_per_epoch
    if total < 1:
        raise ValueError("nothing to train: set config.num_steps or config.num_epochs to a positive value.")
    return _Plan(config.batch_size, rows, steps_per_epoch, total)


def _initial_state(task: Task, config: ml_collections.ConfigDict, total_steps: int, mesh: Mesh) -> TrainState:
    """The state before step 0, on the mesh: params from `seed`, fresh optimiser state
    and carry; built by one jitted function (initialising op by op compiles every op)."""
    optimizer = make_optimizer(config)

    def init(seed_key: PRNGKey) -> TrainState:
        init_key, rng = jax.random.split(seed_key)
        params = task.init_params(init_key)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            total_steps=jnp.asarray(total_steps, jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            carry=task.init_carry(config.batch_size),
            rng=rng,
        )

    seed_key = jax.random.PRNGKey(config.seed)
    shapes = jax.eval_shape(init, seed_key)
    shardings = jax.tree.map(lambda _: _replicated(mesh), shapes).replace(
        carry=jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec("data")), shapes.carry)
    )
    return jax.jit(init, out_shardings=shardings)(seed_key)


def _epoch_permutation(seed: int, epoch: Array, num_rows: int) -> Array:
    """The order of the rows in `epoch`: `[num_rows]` int32, from `(seed, epoch)` only."""
    data_key = jax.random.fold_in(jax.random.PRNGKey(seed), 0x5EED)
    return jax.random.permutation(jax.random.fold_in(data_key, epoch), num_rows)


def _make_train_step(task: Task, config: ml_collections.ConfigDict, plan: _Plan, mesh: Mesh):
    """`step(state, data, permutation) -> (state, logged)`, jitted, `state` donated.

    `permutation` is the current epoch's row order (unused without shuffling); `logged`
    holds scalar means for the log.
    """
    optimizer = make_optimizer(config)
    batch_size = plan.batch_size

    def step(state: TrainState, data: Data, permutation: Array) -> tuple[TrainState, dict[str, Array]]:
        index = state.step % plan.steps_per_epoch
        start = index * batch_size
        if config.shuffle:
            rows = jax.lax.dynamic_slice_in_dim(permutation, start, batch_size)
            batch = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), data)
        else:
            batch = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, batch_size), data)
        batch = _shard_batch(batch, mesh)
        fresh = task.init_carry(batch_size)
        carry = jax.tree.map(lambda new, old: jnp.where(index == 0, new, old), fresh, state.carry)
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, (carry, metrics)), grads = jax.value_and_grad(task.loss, has_aux=True)(
            state.params, carry, batch, rng
        )
        direction, opt_state = optimizer.update(grads, state.opt_state, state.params)
        lr = learning_rate(config, state.step, state.total_steps)
        params = jax.tree.map(lambda p, d: p - lr * d, state.params, direction)
        logged = {name: jnp.mean(value) for name, value in metrics.items()}
        logged.update(loss=loss, grad_norm=optax.tree.norm(grads), learning_rate=lr)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, carry=_shard_batch(carry, mesh)
        )
        return new_state, logged

    return jax.jit(step, donate_argnums=0)


class _EvalSplit:
    """One eval split prepared once: padded to whole batches, on the device, with the
    jitted pass over all of it."""

    def __init__(self, task: Task, data: Data, batch_size: int, mesh: Mesh):
        _check_batch_size(batch_size, mesh, "the eval batch size")
        rows = num_rows(data)
        num_batches = -(-rows // batch_size)
        padding = num_batches * batch_size - rows
        padded = jax.tree.map(lambda x: np.concatenate([x, np.repeat(x[:1], padding, axis=0)]),
                              jax.tree.map(np.asarray, data))
        mask = np.arange(num_batches * batch_size) < rows
        self._data, self._mask = jax.device_put((padded, mask), _replicated(mesh))

        def run_all(params: Params, data: Data, mask: Array) -> dict[str, Array]:
            def batch_metrics(i: Array, carry: Carry) -> tuple[tuple[Data, Array], Carry, Metrics]:
                batch, weights = jax.tree.map(
                    lambda x: jax.lax.dynamic_slice_in_dim(x, i * batch_size, batch_size), (data, mask)
                )
                _, (carry, metrics) = task.loss(params, carry, _shard_batch(batch, mesh), None)
                return weights, carry, metrics

            def body(i, totals_and_carry):
                totals, carry = totals_and_carry
                weights, carry, metrics = batch_metrics(i, carry)
                totals = {name: totals[name] + jnp.sum(jnp.where(weights, value, 0.0)) for name, value in metrics.items()}
                return totals, carry

            carry = task.init_carry(batch_size)
            shapes = jax.eval_shape(lambda: batch_metrics(0, carry)[2])
            for name, shape in shapes.items():
                if shape.shape != (batch_size,):
                    raise ValueError(
                        f"metric {name!r} must hold one value per example, shape [{batch_size}], got {shape.shape}."
                    )
            zeros = {name: jnp.zeros((), jnp.float32) for name in shapes}
            totals, _ = jax.lax.fori_loop(0, num_batches, body, (zeros, carry))
            return {name: total / rows for name, total in totals.items()}

        self._run = jax.jit(run_all)

    def __call__(self, params: Params) -> dict[str, float]:
        values = jax.device_get(self._run(params, self._data, self._mask))
        return {name: float(value) for name, value in values.items()}


def evaluate(
    task: Task,
    params: Params,
    data: Data,
    batch_size: int,
    mesh: Optional[Mesh] = None,
) -> dict[str, float]:
    """The exact mean of every per-example metric of `task.loss` over all of `data`.

    Batches are taken in order, the carry threads through them starting from
    `task.init_carry(batch_size)`, and `rng=None`. The last batch is padded with
    copies of row 0 and the padding is masked out of the totals, so every example
    counts exactly once. The whole pass is one jitted loop with one host sync.

    Args:
      params: the model's params.
      data: pytree of arrays `[N, ...]`.
      batch_size: examples per batch (divisible by the device count).
      mesh: the device mesh (default: one over all devices).
    Returns:
      `{metric_name: mean over the N examples}`.
    """
    return _EvalSplit(task, data, batch_size, mesh or data_mesh())(params)


class _StopSignals:
    """While active, SIGINT and SIGTERM only record their name in `received`; a second
    SIGINT interrupts at once. Handlers are installed only from the main thread."""

    def __init__(self):
        self.received: Optional[str] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> "_StopSignals":
        try:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread: leave the signals alone
            pass
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def write_json(path: str, value: Any) -> None:
    """Writes `value` as JSON atomically (a temporary file renamed over `path`)."""
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(temporary, path)


def _format(values: Mapping[str, float]) -> str:
    return " ".join(f"{name} {value:.4g}" for name, value in sorted(values.items()))


RESUME_FIELDS = ("num_epochs", "num_steps", "time_budget_s", "fit_schedule_to_budget", "log_every_steps",
                 "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints", "eval_batch_size", "progress_bar")
"""The training fields a resumed run is expected to change: how long it goes on, how
often it logs, evaluates and saves, and how it evaluates."""


def train(
    task: Task,
    config: ml_collections.ConfigDict,
    workdir: str,
    train_data: Data,
    eval_data: Optional[Mapping[str, Data]] = None,
    *,
    resume: bool = False,
    on_eval: Optional[EvalHook] = None,
    files: Optional[Mapping[str, Any]] = None,
    may_change: Sequence[str] = RESUME_FIELDS,
) -> TrainResult:
    """Trains `task` on `train_data`, evaluating on every split of `eval_data`.

    Args:
      task: the model (see `Task`).
      config: training fields (see `default_config`); the whole config, model fields
        included, is written to `config.json`.
      workdir: where everything is written (created if missing).
      train_data: pytree of arrays `[N, ...]` (host or device arrays).
      eval_data: `{split_name: data}`, each like `train_data`, evaluated every
        `config.eval_every_steps` steps and at the end.
      resume: continue from the newest checkpoint in `workdir/checkpoints` (same step,
        optimiser state, schedule, carry, RNG and data order). The schedule's length
        follows the config (a changed num_steps or num_epochs takes effect), except
        where `fit_schedule_to_budget` had shortened it: then it continues from the
        checkpoint's length. A time budget is that of the whole run, less the
        seconds already counted against it (see `default_config`). Without a budget, a run stopped
        and resumed is bitwise identical to one left uninterrupted. Raises
        `CheckpointError` when there is none or it cannot be read, before writing
        anything. Without `resume`, a workdir that already holds checkpoints raises
        `CheckpointError`.
      on_eval: called after every evaluation as `on_eval(step, params, metrics)` with
        `metrics = {split: {name: value}}`, e.g. to write samples.
      files: `{file_name: value}`, more JSON files for the workdir (e.g. a
        vocabulary), written with `config.json` once the workdir has passed the checks
        above, so that a refused run never overwrites those of the run already there.
      may_change: with `resume`, the config fields (or subtrees, e.g. "sample") that
        may differ from the run's `config.json` without a `UserWarning` naming the
        changes; default `RESUME_FIELDS`, the run's length and intervals.

    Returns:
      `TrainResult(state, results)`. `results` (also written to `results.json`) has
      `steps`, `planned_steps` (the configured length), `epochs` (fractional),
      `train_seconds` (the training loop's wall time, compilation included, evaluation
      excluded, summed over the run and its resumes), `num_params`, `devices`,
      `stop_reason` ("done"; "time_budget" when the budget ended training or shortened
      its schedule; "SIGINT" or "SIGTERM"), and `"{split}_{metric}"` for the final
      evaluation of every split (none after a signal).

    Raises:
      NonFiniteLossError: the loss became NaN or infinite; the message names the step.
      CheckpointError: see `resume`.
      ValueError: inconsistent data or config (e.g. `B` not divisible by the device
        count, fewer rows than one batch).
      OSError: the workdir cannot be written.
    """
    mesh = data_mesh()
    plan = _plan(config, train_data, mesh)
    state = _initial_state(task, config, plan.total_steps, mesh)
    spent = _Spent()
    if resume:
        checkpointer = checkpoint_lib.Checkpointer(workdir, keep=config.keep_checkpoints, must_exist=True)
        state, spent = _restore_for_resume(checkpointer, state, config, plan)
    else:
        os.makedirs(workdir, exist_ok=True)
        checkpointer = checkpoint_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
        if checkpointer.latest_step() is not None:
            raise CheckpointError(
                f"{os.path.abspath(workdir)} already holds checkpoints (newest: step {checkpointer.latest_step()}); "
                "resume that run or choose another workdir."
            )
    main = distributed.is_main_process()  # with several processes, only process 0 writes logs and results
    config_json = json.loads(config.to_json_best_effort())
    if resume:
        _warn_of_config_changes(os.path.join(workdir, "config.json"), config_json, may_change)
    if main:
        write_json(os.path.join(workdir, "config.json"), config_json)
        for name, value in (files or {}).items():
            write_json(os.path.join(workdir, name), value)
    writer = metrics_lib.MetricWriter(workdir, resume_step=int(state.step) if resume else None) if main else _NoWriter()
    try:
        loop = _Loop(task, config, workdir, plan, mesh, train_data, eval_data or {}, checkpointer, writer, on_eval)
        return loop.run(state, spent)
    finally:
        writer.close()
        checkpointer.close()


def _warn_of_config_changes(path: str, config_json: dict[str, Any], may_change: Sequence[str]) -> None:
    """Warns when a resume changes fields of the run's `config.json` at `path` (which is
    then overwritten) outside `may_change` (names, or subtrees such as "sample"): the
    result is a different run from the one the checkpoints began, e.g. one with a new
    learning rate. Fields the file lacks (added to a config since) are not compared."""
    try:
        with open(path) as f:
            before = flat_fields(json.load(f))
    except (OSError, ValueError):
        return  # no readable record of the earlier config: nothing to compare
    after = flat_fields(config_json)
    changed = [f"{name}: {before[name]!r} -> {after[name]!r}" if name in after else f"{name}: {before[name]!r} -> unset"
               for name in sorted(before)
               if not is_field_within(name, may_change) and (name not in after or after[name] != before[name])]
    if changed and distributed.is_main_process():
        warnings.warn(f"resuming {os.path.dirname(os.path.abspath(path))} with a config that differs from its "
                      f"config.json in {'; '.join(changed)}", stacklevel=3)


def is_field_within(path: str, fields: Sequence[str]) -> bool:
    """Whether the dotted config `path` ("sample.temperature") is one of `fields` or
    lies inside one of them ("sample")."""
    return any(path == field or path.startswith(field + ".") for field in fields)


def flat_fields(tree: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a.b": value}` for the leaves of nested dicts (a config's `to_dict()`, or its
    JSON): every field by its dotted path."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {name: value for key, child in tree.items() for name, value in flat_fields(child, f"{prefix}{key}.").items()}


class _Spent(NamedTuple):
    """Seconds a run spent before a resume: training (evaluations excluded, as
    `train_seconds` reports it) and of the time budget (intermediate evaluations
    included, as the budget counts them)."""

    train_seconds: float = 0.0
    budget_seconds: float = 0.0


def _checkpoint_meta(config: ml_collections.ConfigDict, plan: _Plan, step: int,
                     spent: _Spent = _Spent()) -> dict[str, Any]:
    """What identifies the data position of a checkpoint besides its step, the time
    spent up to it (a resumed run reports the total and keeps to the rest of the
    budget), and the configured schedule length (to tell whether a budget shortened it)."""
    return {"step": step, "epoch": step / plan.steps_per_epoch, "batch_size": plan.batch_size,
            "num_rows": plan.num_rows, "seed": config.seed, "shuffle": config.shuffle,
            "train_seconds": spent.train_seconds, "budget_seconds": spent.budget_seconds,
            "time_budget_s": config.time_budget_s, "planned_steps": plan.total_steps}


def _restore_for_resume(checkpointer: checkpoint_lib.Checkpointer, state: TrainState,
                        config: ml_collections.ConfigDict, plan: _Plan) -> tuple[TrainState, _Spent]:
    """The newest checkpoint restored into `state`'s structure, checked against the
    run, and the seconds spent up to it.

    The schedule's length is the configured one (a changed num_steps or num_epochs takes
    effect), unless `fit_schedule_to_budget` had shortened it, something other than
    the budget (a signal) stopped that run, and this run fits it to a budget too: then
    the shortened schedule goes on (within the configured length), to be re-planned
    against the rest of the budget. A run that had used up its budget and gets more
    starts a schedule of the configured length, re-planned likewise."""
    restored, meta = checkpointer.restore(checkpoint_lib.abstract_like(state))
    expected = _checkpoint_meta(config, plan, int(restored.step))
    for key in ("batch_size", "num_rows", "seed", "shuffle"):
        if meta.get(key) != expected[key]:
            raise CheckpointError(
                f"the checkpoint of step {meta.get('step')} in {checkpointer.directory} was written with "
                f"{key}={meta.get(key)!r}, but this run has {key}={expected[key]!r}; resuming would not "
                "continue it exactly."
            )
    total, shortened_total = plan.total_steps, int(restored.total_steps)
    shortened = "planned_steps" in meta and shortened_total < meta["planned_steps"]  # older checkpoints: not known
    # Stopped by a signal: before the shortened schedule's end, with budget left.
    interrupted = (int(restored.step) < shortened_total
                   and meta.get("budget_seconds", 0.0) < meta.get("time_budget_s", 0.0))
    if config.time_budget_s and config.fit_schedule_to_budget and shortened and interrupted:
        total = min(shortened_total, plan.total_steps)
    restored = restored.replace(total_steps=jax.device_put(jnp.int32(total), restored.total_steps.sharding))
    train_seconds = float(meta.get("train_seconds", 0.0))
    return restored, _Spent(train_seconds, float(meta.get("budget_seconds", train_seconds)))


def _clock() -> float:
    """Seconds on a monotonic clock: the loop's one time source (tests replace it)."""
    return time.monotonic()


class _NoWriter:
    """The metric writer of the processes other than 0: they log nothing."""

    def write(self, step: int, split: str, values: Mapping[str, float]) -> None:
        del step, split, values

    def close(self) -> None:
        pass


class _Loop:
    """The host side of one `train` call: steps, logs, evaluations, checkpoints."""

    def __init__(self, task, config, workdir, plan, mesh, train_data, eval_data, checkpointer, writer, on_eval):
        self.config, self.workdir, self.plan, self.mesh = config, workdir, plan, mesh
        self.checkpointer, self.writer, self.on_eval = checkpointer, writer, on_eval
        self.data = jax.device_put(train_data, _replicated(mesh))
        self.evaluators = {
            split: _EvalSplit(task, split_data, config.eval_batch_size, mesh) for split, split_data in eval_data.items()
        }
        self.train_step = _make_train_step(task, config, plan, mesh)
        self.permute = jax.jit(lambda epoch: _epoch_permutation(config.seed, epoch, plan.num_rows))
        self.pending: list[tuple[int, dict[str, Array]]] = []  # (step, logged) not yet fetched
        self.eval_seconds = 0.0
        self.last_eval: dict[str, dict[str, float]] = {}

    def run(self, state: TrainState, spent: _Spent = _Spent()) -> TrainResult:
        """Trains from `state`; `spent`: the seconds before it (a resume), added to the
        reported training time and taken from the time budget."""
        config, plan = self.config, self.plan
        self.spent = spent
        self.state, self.step, self.total = state, int(state.step), int(state.total_steps)
        self.saved_step = self.step if self.checkpointer.latest_step() == self.step else None
        self.started = self.last_flush = _clock()
        self.steady: Optional[tuple[float, int]] = None  # (time, step) after the first log
        budget_spent = config.time_budget_s > 0 and spent.budget_seconds >= config.time_budget_s
        stop_reason = "time_budget" if budget_spent else "done"  # a resume with no budget left trains no step
        permutation, permutation_epoch = jnp.zeros((0,), jnp.int32), None
        self.bar = tqdm.tqdm(total=self.total, initial=self.step, unit="step", dynamic_ncols=True,
                             disable=not (config.progress_bar and distributed.is_main_process()), smoothing=0.1)
        with self.bar, _StopSignals() as signals:
            while stop_reason == "done" and self.step < self.total:
                epoch = self.step // plan.steps_per_epoch
                if config.shuffle and epoch != permutation_epoch:
                    permutation, permutation_epoch = self.permute(epoch), epoch
                self.state, logged = self.train_step(self.state, self.data, permutation)
                self.step += 1
                self.pending.append((self.step, logged))
                self.bar.update(1)
                if self.step % config.log_every_steps == 0:
                    self._flush()
                    self._fit_schedule_to_budget()
                stop_reason = self._stop_reason(signals)
                if stop_reason != "done":
                    break
                if config.eval_every_steps and self.step % config.eval_every_steps == 0 and self.step < self.total:
                    self._evaluate()
                if config.checkpoint_every_steps and self.step % config.checkpoint_every_steps == 0:
                    self._save()
            self._flush()
            jax.block_until_ready(self.state)
            train_seconds = self._train_seconds()
            if stop_reason == "done" and self.total < plan.total_steps:  # the budget shortened the schedule
                stop_reason = "time_budget"
            if self.saved_step != self.step:
                self._save()
            if stop_reason in ("done", "time_budget"):
                self._evaluate()
        results = {
            "steps": self.step,
            "planned_steps": plan.total_steps,
            "epochs": self.step / plan.steps_per_epoch,
            "train_seconds": train_seconds,
            "num_params": num_params(self.state.params),
            "devices": self.mesh.size,
            "stop_reason": stop_reason,
        }
        if stop_reason in ("done", "time_budget"):  # a signal skips the final evaluation: no stale figures
            for split, values in self.last_eval.items():
                results.update({f"{split}_{name}": value for name, value in values.items()})
        if distributed.is_main_process():
            write_json(os.path.join(self.workdir, "results.json"), results)
        return TrainResult(self.state, results)

    def _stop_reason(self, signals: _StopSignals) -> str:
        """Why to stop after this step: "SIGINT" or "SIGTERM" (received since the loop
        began), "time_budget", or "done" to go on. With several processes they decide
        together, at log steps only (a collective): one process stopping alone would
        leave the others waiting in the next step's all-reduce."""
        config = self.config
        reason = signals.received or "done"
        if reason == "done" and config.time_budget_s and self._budget_used() >= config.time_budget_s:
            reason = "time_budget"
        if jax.process_count() == 1:
            return reason
        if self.step % config.log_every_steps and self.step < self.total:
            return "done"
        return distributed.agreed_stop_reason(reason)

    def _flush(self) -> None:
        """Fetches the pending training metrics, checks the loss and logs the means."""
        if not self.pending:
            return
        fetched = jax.device_get([logged for _, logged in self.pending])
        for (step, _), logged in zip(self.pending, fetched):
            if not math.isfinite(logged["loss"]):
                latest = self.checkpointer.latest_step()
                kept = (f"The last good checkpoint (step {latest}) is kept in {self.checkpointer.directory}."
                        if latest is not None else "No checkpoint was saved before it, so there is nothing to resume.")
                raise NonFiniteLossError(f"the training loss is {logged['loss']} at step {step}; stopping. {kept}")
        now = _clock()
        means = {name: float(np.mean([logged[name] for logged in fetched])) for name in fetched[0]}
        means["learning_rate"] = float(fetched[-1]["learning_rate"])
        means["steps_per_second"] = len(fetched) / max(now - self.last_flush, 1e-9)
        self.writer.write(self.pending[-1][0], "train", means)
        self.bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{means['learning_rate']:.2g}", refresh=False)
        self.pending.clear()
        self.last_flush = now

    def _fit_schedule_to_budget(self) -> None:
        """Re-plans the schedule's length so that it ends with the time budget (what
        is left of it after a resume), from the time per step measured since the
        first log of this `train` call (compilation excluded)."""
        config = self.config
        if not (config.time_budget_s and config.fit_schedule_to_budget):
            return
        now = _clock()
        if self.steady is None:
            self.steady = (now, self.step)
            return
        seconds_per_step = (now - self.steady[0]) / max(self.step - self.steady[1], 1)
        remaining = config.time_budget_s - self._budget_used(now)
        total = int(np.clip(self.step + remaining / seconds_per_step, self.step + 1, self.plan.total_steps))
        total = int(distributed.broadcast_from_main(np.int32(total)))  # one schedule on every process
        if total != self.total:
            self.total = total
            self.state = self.state.replace(total_steps=jax.device_put(jnp.int32(total), _replicated(self.mesh)))
            self.bar.total = total
            self.bar.refresh()

    def _evaluate(self) -> None:
        if not self.evaluators:
            return
        self._flush()
        started = _clock()
        self.last_eval = {split: evaluate_split(self.state.params) for split, evaluate_split in self.evaluators.items()}
        seconds = _clock() - started
        self.eval_seconds += seconds
        for split, values in self.last_eval.items():
            self.writer.write(self.step, split, values)
            if distributed.is_main_process():  # on stderr, like the bar: stdout is left to the results
                self.bar.write(f"step {self.step} (epoch {self.step / self.plan.steps_per_epoch:.2f}) {split}: "
                               f"{_format(values)} [{seconds:.1f}s]", file=sys.stderr)
        if self.on_eval is not None:
            self.on_eval(self.step, self.state.params, self.last_eval)
        self.last_flush += _clock() - started  # keep evaluation out of steps_per_second

    def _budget_used(self, now: Optional[float] = None) -> float:
        """Seconds of the time budget used: before a resume, and this call's loop so far
        (its evaluations included)."""
        return self.spent.budget_seconds + (_clock() if now is None else now) - self.started

    def _train_seconds(self) -> float:
        """Training time so far, resumed parts included, evaluations excluded."""
        return self.spent.train_seconds + _clock() - self.started - self.eval_seconds

    def _save(self) -> None:
        self._flush()  # never checkpoint past a non-finite loss
        meta = _checkpoint_meta(self.config, self.plan, self.step, _Spent(self._train_seconds(), self._budget_used()))
        self.checkpointer.save(self.step, self.state, meta)
        self.saved_step = self.step


def restore_params(task: Task, config: ml_collections.ConfigDict, workdir: str) -> tuple[Params, int]:
    """The params and step of the newest checkpoint in `workdir`, e.g. for evaluation
    or sampling. Raises `CheckpointError` when there is none or it cannot be read."""
    state = _initial_state(task, config, 1, data_mesh())
    checkpointer = checkpoint_lib.Checkpointer(workdir, must_exist=True)
    try:
        restored, _ = checkpointer.restore(checkpoint_lib.abstract_like(state))
    finally:
        checkpointer.close()
    return restored.params, int(restored.step)
