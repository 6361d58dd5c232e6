"""The classic synthetic long-memory tasks: the adding problem and copy memory.

Both ask a recurrent model to keep a few inputs over a long stretch of distractors.
Their examples are generated when a run starts, from NumPy's
`np.random.default_rng((config.data_seed, SPLIT_STREAMS[split]))`: fixed training,
validation and test sets, the same for every run with that seed and, since each row
depends on its own draws only, a set of `n` examples is the first `n` rows of a larger one.

* `adding` (Hochreiter & Schmidhuber 1997, in the form of Le et al. 2015 and Arjovsky
  et al. 2016): `seq_len` steps of 2 channels, values uniform in [0, 1) and a marker
  that is 1 at two steps, one drawn uniformly from the first half (steps
  `[0, seq_len // 2)`) and one from the second, 0 elsewhere. The target is the sum of
  the two marked values, read from the model's last output through a linear head;
  the loss is the squared error. Always predicting 1 (the mean target) has MSE 1/6,
  the `baseline_loss` of `results.json`. `within_tolerance` is the fraction of
  examples predicted within `config.tolerance` (0.04) of their target: a model that
  has solved the task (an MSE far below the baseline) gets nearly all of them, one
  predicting 1 about 8%.
* `copy_memory` (Arjovsky et al. 2016): tokens 0 (blank), 1..8 (the symbols), 9 (the
  delimiter). The input holds `copy_length` (10) random symbols, then `delay - 1`
  blanks (Arjovsky's T), the delimiter and 10 more blanks, `delay + 20` steps in all;
  the target is blank everywhere except at the last 10 steps, which hold the 10
  symbols in order. The loss is the cross-entropy at every step (its mean over the
  steps per example); `accuracy` is the fraction of the 10 recalled symbols predicted
  right. Predicting blanks and then the uniform distribution over the 8 symbols has
  `10 log(8) / (delay + 20)`, the `baseline_loss`, and an accuracy of 1/8.

The model, for `config.cell` in `CELL_TYPES`:
* "rnn", "indrnn", "gru", "lstm", "ln_lstm" (`experiments.char_lm.make_cell`): `num_layers`
  stacked cells of `num_units` over the inputs (copy memory's tokens one-hot), then a
  linear head on every step's output.
* "lru", "min_gru", "rg_lru" (`experiments.linear_blocks`): the residual blocks
  of the LRU paper (Orvieto et al. 2023): a linear encoder to `num_units`, then
  `num_layers` blocks `x + GLU(GELU(cell(LayerNorm(x))))`, then the linear head. A
  linear recurrence alone cannot multiply a value by its marker; the blocks can.
`config.unroll_method` runs every cell: "scan" (`lax.scan`, the default, fastest on
CPU), "static", or for the linear cells "associative" (`lax.associative_scan`, for
GPU/TPU).

The workdir holds what `rnnlab.train.train` writes (`val_*` and `test_*` metrics),
`baseline_loss` added to `results.json`, and `curves.png`. The defaults take about a
minute on a 2-core CPU. `adding` trains an LSTM(64) on T = 100 for 5000 steps: test
MSE 0.00045 against the baseline's 0.167, 96% within 0.04. `copy_memory` trains one LRU
block (width 64, N = 64) on T = 100 for 2000 steps: test cross-entropy 3e-6 against
0.173, every symbol recalled (an LSTM(64) stayed at the baseline, 0.1737 and 14%, for
3000 steps: `--config.cell=lstm --config.num_steps=3000`).

    python launch.py --experiment=adding --workdir=runs/adding
    python launch.py --experiment=copy_memory --workdir=runs/copy_memory
    python launch.py --experiment=adding --mode=eval --workdir=runs/adding

The long-memory setting, T = 1000, with the LRU's eigenvalues initialised nearer the
unit circle (with the default ring [0.9, 0.999], copy memory reached only 37% in 2000
steps); fewer training examples keep the training set of 1000-step sequences small. On
a GPU add `--config.unroll_method=associative`. On a 2-core CPU, copy memory took 3.7
minutes to recall 99.997% of the test symbols (cross-entropy 5e-6 against 0.020); the
adding problem, cut to `--config.num_steps=1500` (5 minutes), reached a test MSE of
0.021 against 0.167, still falling:

    python launch.py --experiment=copy_memory --workdir=runs/copy_lru_1000 \
        --config.delay=1000 --config.num_train_examples=20000 \
        --config.r_min=0.99 --config.r_max=0.9999
    python launch.py --experiment=adding --workdir=runs/adding_lru_1000 \
        --config.cell=lru --config.num_layers=2 --config.seq_len=1000 \
        --config.num_train_examples=20000 --config.r_min=0.99 --config.r_max=0.9999
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import rnnlab
from rnnlab import distributed, plots, train
from rnnlab.cells.base import Array, Params, PRNGKey, check_positive_int
from rnnlab.metrics import read_metrics
from rnnlab.unroll import METHODS

from experiments import common, registry
from experiments.char_lm import CELL_TYPES as CHAR_LM_CELL_TYPES
from experiments.char_lm import make_cell
from experiments.linear_blocks import LINEAR_CELL_TYPES, apply_dense, dense, make_linear_cell, residual_blocks

STACKED_CELLS = CHAR_LM_CELL_TYPES
LINEAR_CELLS = LINEAR_CELL_TYPES
CELL_TYPES = STACKED_CELLS + LINEAR_CELLS
SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}
"""Each split's examples come from `np.random.default_rng((data_seed, stream))`."""
BLANK = 0  # copy memory's blank token; the symbols are 1..num_symbols, the delimiter num_symbols + 1


def adding_examples(num_examples: int, seq_len: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Examples of the adding problem (see the module docstring).

    Row `i` depends only on the `i`-th `seq_len + 2` uniform draws of `rng`: the values,
    then the two marker positions.

    Returns:
      `{"inputs": float32 [N, seq_len, 2]` (channel 0 the values, channel 1 the
      markers), `"target": float32 [N]}`.
    """
    draws = rng.random((num_examples, seq_len + 2))
    values = draws[:, :seq_len].astype(np.float32)
    half = seq_len // 2
    # u < 1, so floor(u * n) < n exactly in float64: positions in [0, half) and [half, seq_len).
    first = np.floor(draws[:, seq_len] * half).astype(np.int64)
    second = half + np.floor(draws[:, seq_len + 1] * (seq_len - half)).astype(np.int64)
    rows = np.arange(num_examples)
    markers = np.zeros_like(values)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    return {"inputs": np.stack([values, markers], axis=-1), "target": values[rows, first] + values[rows, second]}


def copy_examples(num_examples: int, delay: int, rng: np.random.Generator, num_symbols: int = 8,
                  copy_length: int = 10) -> dict[str, np.ndarray]:
    """Examples of copy memory (see the module docstring) with `L = delay + 2 * copy_length` steps.

    Tokens: `BLANK` (0), the symbols `1..num_symbols`, the delimiter `num_symbols + 1`.

    Returns:
      `{"inputs": int32 [N, L]` (the symbols, `delay - 1` blanks, the delimiter,
      `copy_length` blanks), `"targets": int32 [N, L]}` (`delay + copy_length` blanks,
      then the symbols).
    """
    symbols = rng.integers(1, num_symbols + 1, size=(num_examples, copy_length), dtype=np.int32)
    length = delay + 2 * copy_length
    inputs = np.full((num_examples, length), BLANK, np.int32)
    inputs[:, :copy_length] = symbols
    inputs[:, copy_length + delay - 1] = num_symbols + 1
    targets = np.full((num_examples, length), BLANK, np.int32)
    targets[:, -copy_length:] = symbols
    return {"inputs": inputs, "targets": targets}


def adding_baseline_loss() -> float:
    """The MSE of always predicting 1: the variance of the sum of two uniform values."""
    return 1.0 / 6.0


def copy_baseline_loss(delay: int, num_symbols: int = 8, copy_length: int = 10) -> float:
    """The per-step cross-entropy of predicting blanks, then the uniform distribution
    over the symbols at the `copy_length` recall steps."""
    return copy_length * math.log(num_symbols) / (delay + 2 * copy_length)


class Model(NamedTuple):
    """A recurrent stack with a linear head on every step.

    Attributes:
      init: `(key) -> params`.
      apply: `(params, inputs [B, T, I]) -> outputs [B, T, O]`.
    """

    init: Callable[[PRNGKey], Params]
    apply: Callable[[Params, Array], Array]


def build_model(config: ml_collections.ConfigDict, input_size: int, output_size: int) -> Model:
    """The model of `config` (see the module docstring) from `input_size` features per
    step to `output_size` outputs per step. It runs time-major inside."""
    if config.cell in LINEAR_CELLS:
        body_init, body_apply = _linear_blocks(config, input_size)
    else:
        body_init, body_apply = _stacked_cells(config, input_size)

    def init(key: PRNGKey) -> Params:
        body_key, head_key = jax.random.split(key)
        return {"body": body_init(body_key), "head": dense(head_key, config.num_units, output_size)}

    def apply(params: Params, inputs: Array) -> Array:
        features = body_apply(params["body"], jnp.swapaxes(inputs, 0, 1))  # [T, B, H]
        return jnp.swapaxes(apply_dense(params["head"], features), 0, 1)

    return Model(init, apply)


BodyFns = tuple[Callable[[PRNGKey], Params], Callable[[Params, Array], Array]]
"""`(init(key) -> params, apply(params, inputs [T, B, I]) -> features [T, B, H])`."""


def _stacked_cells(config: ml_collections.ConfigDict, input_size: int) -> BodyFns:
    """`num_layers` stacked cells of type `config.cell` over the inputs."""
    cell = rnnlab.stack([make_cell(config.cell, config.num_units) for _ in range(config.num_layers)])

    def apply(params: Params, inputs: Array) -> Array:
        return rnnlab.unroll(cell, params, inputs, method=config.unroll_method, time_major=True)[0]

    return (lambda key: cell.init(key, input_size)), apply


def _linear_blocks(config: ml_collections.ConfigDict, input_size: int) -> BodyFns:
    """The residual stack of `experiments.linear_blocks` around `make_linear_cell(config)`."""
    blocks = residual_blocks(make_linear_cell(config), input_size, config.unroll_method)

    def init(key: PRNGKey) -> Params:
        encoder_key, *block_keys = jax.random.split(key, 1 + config.num_layers)
        return blocks.init(encoder_key, block_keys)

    return init, blocks.apply


def adding_task(model: Model, tolerance: float) -> train.Task:
    """The task over `{"inputs": float32 [B, T, 2], "target": float32 [B]}`: the last
    step's output predicts the target. Per-example metrics: the squared error `loss`
    and `within_tolerance` (1 where the error is below `tolerance`)."""

    def loss(params: Params, carry: None, batch: dict[str, Array], rng: Optional[PRNGKey]):
        del rng
        error = model.apply(params, batch["inputs"])[:, -1, 0] - batch["target"]
        squared_error = jnp.square(error)
        within = (jnp.abs(error) < tolerance).astype(jnp.float32)
        return jnp.mean(squared_error), (carry, {"loss": squared_error, "within_tolerance": within})

    return train.Task(init_params=model.init, loss=loss)


def copy_task(model: Model, num_symbols: int, copy_length: int) -> train.Task:
    """The task over `{"inputs", "targets": int32 [B, L]}`, the inputs read one-hot.
    Per-example metrics: `loss`, the cross-entropy's mean over the `L` steps, and
    `accuracy`, the fraction of the last `copy_length` steps predicted right."""

    def loss(params: Params, carry: None, batch: dict[str, Array], rng: Optional[PRNGKey]):
        del rng
        logits = model.apply(params, jax.nn.one_hot(batch["inputs"], num_symbols + 2))  # [B, L, num_symbols + 1]
        cross_entropy = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]), axis=1)
        recalled = jnp.argmax(logits[:, -copy_length:], axis=-1) == batch["targets"][:, -copy_length:]
        accuracy = jnp.mean(recalled.astype(jnp.float32), axis=1)
        return jnp.mean(cross_entropy), (carry, {"loss": cross_entropy, "accuracy": accuracy})

    return train.Task(init_params=model.init, loss=loss)


class Problem(NamedTuple):
    """What distinguishes the two experiments.

    Attributes:
      defaults: its config fields beyond the shared ones, and its values of shared
        ones, applied over `get_config`'s.
      examples: `(config, num_examples, rng) -> data`.
      task: `(config) -> train.Task`.
      baseline_loss: `(config) -> float`.
    """

    defaults: dict[str, Any]
    examples: Callable[[ml_collections.ConfigDict, int, np.random.Generator], dict[str, np.ndarray]]
    task: Callable[[ml_collections.ConfigDict], train.Task]
    baseline_loss: Callable[[ml_collections.ConfigDict], float]


PROBLEMS = {
    "adding": Problem(
        defaults=dict(seq_len=100, tolerance=0.04, cell="lstm", num_steps=5000),
        examples=lambda config, n, rng: adding_examples(n, config.seq_len, rng),
        task=lambda config: adding_task(build_model(config, 2, 1), config.tolerance),
        baseline_loss=lambda config: adding_baseline_loss(),
    ),
    "copy_memory": Problem(
        defaults=dict(delay=100, num_symbols=8, copy_length=10, cell="lru", num_steps=2000),
        examples=lambda config, n, rng: copy_examples(n, config.delay, rng, config.num_symbols, config.copy_length),
        task=lambda config: copy_task(build_model(config, config.num_symbols + 2, config.num_symbols + 1),
                                      config.num_symbols, config.copy_length),
        baseline_loss=lambda config: copy_baseline_loss(config.delay, config.num_symbols, config.copy_length),
    ),
}


def get_config(name: str) -> ml_collections.ConfigDict:
    """The config of experiment `name` ("adding" or "copy_memory").

    Task fields:
      seq_len (adding): steps per sequence, >= 2.
      tolerance (adding): the error below which an example counts in `within_tolerance`.
      delay (copy_memory): Arjovsky's T; sequences are `delay + 2 * copy_length` steps.
      num_symbols, copy_length (copy_memory): the alphabet (8) and the symbols to copy (10).
    Model fields:
      cell: one of `CELL_TYPES`.
      num_units: the cells' width (the linear blocks' model width).
      num_layers: stacked cells, or residual blocks of the linear cells.
      state_size, r_min, r_max, max_phase: the LRU's complex state size and ring
        initialisation (`rnnlab.cells.lru`; `r_min`, `r_max` also set the RG-LRU's
        ring); other cells ignore them.
      unroll_method: "scan", "static", or for the linear cells (`LINEAR_CELLS`) "associative".
    Data fields:
      data_seed: seeds the generated examples (see `SPLIT_STREAMS`).
      num_train_examples, num_val_examples, num_test_examples: the sizes of the
        generated splits (`--mode=eval` may change `num_test_examples`).
    Training fields: see `rnnlab.train.default_config`.
    """
    config = common.base_config(
        batch_size=64,
        eval_batch_size=1000,
        learning_rate=2e-3,
        warmup_steps=100,
        grad_clip_norm=1.0,
        log_every_steps=100,
        eval_every_steps=500,
        checkpoint_every_steps=1000,
    )
    config.cell = "lstm"
    config.num_units = 64
    config.num_layers = 1
    config.state_size = 64
    config.r_min = 0.9
    config.r_max = 0.999
    config.max_phase = 2 * math.pi
    config.unroll_method = "scan"
    config.data_seed = 0
    config.num_train_examples = 100_000
    config.num_val_examples = 1000
    config.num_test_examples = 10_000
    config.update(PROBLEMS[name].defaults)
    return config


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises a one-line `ValueError` naming a field of `config` out of range; `run`
    calls it before it generates data or writes to the workdir. (The LRU checks
    `r_min`, `r_max` and `max_phase` itself, when the model is built.)"""
    if config.cell not in CELL_TYPES:
        raise ValueError(f"config.cell: unknown cell type {config.cell!r}; choose from {', '.join(CELL_TYPES)}.")
    methods = METHODS if config.cell in LINEAR_CELLS else tuple(m for m in METHODS if m != "associative")
    if config.unroll_method not in methods:
        raise ValueError(f"config.unroll_method must be one of {', '.join(map(repr, methods))} for cell "
                         f"{config.cell!r}, got {config.unroll_method!r}.")
    for name in ("num_units", "num_layers", "state_size", "num_train_examples", "num_val_examples",
                 "num_test_examples", "delay", "num_symbols", "copy_length"):
        if name in config:
            check_positive_int(config[name], f"config.{name}")
    if "seq_len" in config and (isinstance(config.seq_len, bool) or not isinstance(config.seq_len, int)
                                or config.seq_len < 2):
        raise ValueError(f"config.seq_len must be an integer >= 2 (a marker in each half), got {config.seq_len!r}.")
    if "tolerance" in config:
        common.check_positive_finite(config, "tolerance")
    common.check_non_negative_int(config, "data_seed")


def make_split(problem: Problem, config: ml_collections.ConfigDict, split: str) -> dict[str, np.ndarray]:
    """The `config.num_{split}_examples` examples of `split` ("train", "val" or "test")."""
    rng = np.random.default_rng((config.data_seed, SPLIT_STREAMS[split]))
    return problem.examples(config, config[f"num_{split}_examples"], rng)


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    mode: str = "train",
    resume: bool = False,
    data_dir: Optional[str] = None,
    tfds_data_dir: Optional[str] = None,
    name: str = "adding",
) -> dict[str, Any]:
    """Trains ("train") or evaluates the newest checkpoint ("eval"); see
    `registry.RunFn`. The data is generated, so `data_dir` and `tfds_data_dir` are
    unused. "train" adds `baseline_loss` to `results.json` and writes `curves.png`;
    "eval" writes `eval_results.json` (with `baseline_loss`). "eval" and `resume`
    build the model and the data from the run's `config.json`, taking only
    `common.EVAL_FIELDS` / `common.RESUME_FIELDS` from `config`."""
    del data_dir, tfds_data_dir
    common.check_mode(name, mode, ("train", "eval"))
    config = common.config_for_run(config, workdir, mode, resume)
    check_config(config)
    problem = PROBLEMS[name]
    task = problem.task(config)
    baseline = {"baseline_loss": problem.baseline_loss(config)}
    eval_data = {split: make_split(problem, config, split) for split in ("val", "test")}
    if mode == "eval":
        return common.evaluate_newest_checkpoint(task, config, workdir, eval_data, derived=lambda _: baseline)[1]
    result = train.train(task, config, workdir, make_split(problem, config, "train"), eval_data, resume=resume,
                         may_change=common.RESUME_FIELDS)
    results = result.results
    if results["stop_reason"] in ("done", "time_budget"):
        results.update(baseline)
        if distributed.is_main_process():  # with several processes, only process 0 writes files
            train.write_json(os.path.join(workdir, "results.json"), results)
            plots.plot_training_curves(read_metrics(workdir), os.path.join(workdir, "curves.png"))
    return results


EXPERIMENTS = {
    "adding": "Adding problem, T=100: LSTM(64) sums the two marked values of 100 (baseline MSE 1/6).",
    "copy_memory": "Copy memory, T=100: one LRU block recalls 10 symbols after 100 steps (Arjovsky et al. 2016).",
}

for _name, _description in EXPERIMENTS.items():
    registry.register(_name, _description, functools.partial(get_config, _name), functools.partial(run, name=_name))
