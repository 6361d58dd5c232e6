"""Character language model on tiny-shakespeare: embedding -> recurrent stack -> softmax.

Training reads `batch_size` contiguous streams of the training text cut into windows
of `bptt_steps` characters; the recurrent state is carried from one window of a
stream to the next (truncated BPTT: the carry of `rnnlab.train`). Evaluation runs over
the whole validation and test texts the same way, with `eval_batch_size` streams, and
reports the exact mean over every character: `loss` in nats/char and
`bits_per_char`. At the end of training `samples.txt` holds generated text.

    python launch.py --experiment=char_lm --data_dir=DIR --workdir=runs/char_lm
    python launch.py --experiment=char_lm --mode=sample --workdir=runs/char_lm \
        --config.sample.prompt="ROMEO:" --config.sample.temperature=0.8
    python launch.py --experiment=char_lm --mode=eval --workdir=runs/char_lm

The workdir holds, besides what `rnnlab.train.train` writes, `vocab.json` (the
characters in id order), `samples.txt` and `curves.png`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import rnnlab
from rnnlab import distributed, plots, sample, train
from rnnlab.cells.base import Array, Params, PRNGKey, RNNCell, check_positive_int
from rnnlab.data import text as text_data
from rnnlab.metrics import read_metrics
from rnnlab.wrappers import inverted_dropout

from experiments import common, registry

CELL_TYPES = ("rnn", "indrnn", "gru", "lstm", "ln_lstm")
VOCAB_FILE = "vocab.json"
SAMPLES_FILE = "samples.txt"
EVAL_SPLITS = {"val": "validation", "test": "test"}  # results key prefix -> text split
MODES = ("train", "eval", "sample")  # what `run` supports

Carry = tuple[Any, ...]  # one batched state per layer


def get_config() -> ml_collections.ConfigDict:
    """The default `char_lm` config: 2 x GRU(384), up to 1000 steps of 32 x 128
    characters (4 epochs) in a 14-minute budget; validation <= 1.60 nats/char within
    15 minutes on a 2-core CPU.

    Model fields:
      cell: the recurrent cell of every layer, one of `CELL_TYPES` ("ln_lstm" is the
        layer-normalised LSTM, "indrnn" the IndRNN with ReLU and `|u| <= 1`).
      num_layers: depth of the recurrent stack.
      width: units per layer.
      embed_dim: size of the character embedding.
      dropout_keep: keep probability in (0, 1] of the embedding and of every layer's
        output in training (1.0: no dropout).
      gru_reset_after: with `cell="gru"`, use the cuDNN "reset after" form (one fused
        recurrent matmul per step) instead of TF1's.
      unroll: steps per `lax.scan` iteration.
    Data fields:
      bptt_steps: window length of truncated BPTT (characters per row).
      eval_batch_size (a training field): the number of streams an evaluation split is
        cut into; every stream starts from a zero state, so fewer streams mean fewer
        cold starts.
    Sampling fields (`sample.*`, used at the end of training and by `--mode=sample`):
      prompt: text the state is warmed on before generating (non-empty, characters of
        the vocabulary).
      num_chars: characters generated per sample.
      num_samples: samples generated in parallel.
      temperature: softmax temperature; 0 is greedy decoding.
      top_k: sample among the k most likely characters; 0 means all.
      seed: seeds the sampler.
    Training fields: see `rnnlab.train.default_config`; `shuffle` must stay False
    (the windows of a stream must be read in order for the carried state). The
    learning rate decays over at most `num_steps`; with `time_budget_s`, a slower
    machine gets a shorter schedule (`fit_schedule_to_budget`). `log_every_steps` is
    small because the host runs ahead of the device between logs (its only syncs):
    the budget can be overrun by up to that many steps.
    """
    config = common.base_config(
        batch_size=32,
        eval_batch_size=16,
        num_steps=1000,
        shuffle=False,
        learning_rate=5e-3,
        warmup_steps=100,
        final_lr_fraction=0.02,
        grad_clip_norm=1.0,
        log_every_steps=10,
        eval_every_steps=400,
        checkpoint_every_steps=400,
        time_budget_s=14 * 60.0,
    )
    config.cell = "gru"
    config.num_layers = 2
    config.width = 384
    config.embed_dim = 64
    config.dropout_keep = 0.9
    config.gru_reset_after = True
    config.unroll = 1
    config.bptt_steps = 128
    config.sample = ml_collections.ConfigDict(
        dict(prompt="ROMEO:\n", num_chars=500, num_samples=3, temperature=0.8, top_k=0, seed=0)
    )
    return config


def get_fast_config() -> ml_collections.ConfigDict:
    """`char_lm_fast`: 1 x GRU(256), up to 3000 steps of 32 x 64 characters at a high
    learning rate, ended (with the schedule fitted to it) by a 100 s training budget;
    validation 1.45 nats/char in 107 s of wall time on an idle 2-core CPU."""
    config = get_config()
    config.num_layers = 1
    config.width = 256
    config.dropout_keep = 1.0
    config.bptt_steps = 64
    config.num_steps = 3000
    config.learning_rate = 1e-2
    config.warmup_steps = 50
    config.time_budget_s = 100.0
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 0
    config.sample.num_chars = 300
    return config


def get_large_config() -> ml_collections.ConfigDict:
    """`char_lm_large`: 3 x LSTM(768) with strong dropout, about 40 epochs of 64 x 256
    characters, for a GPU (or patience), aiming at validation <= 1.45 nats/char.
    Not run to the end: the depth, width and dropout follow published char-LSTM
    settings, not a search here; `metrics.jsonl` shows whether it overfits."""
    config = get_config()
    config.cell = "lstm"
    config.num_layers = 3
    config.width = 768
    config.embed_dim = 128
    config.dropout_keep = 0.6
    config.batch_size = 64
    config.bptt_steps = 256
    config.num_steps = 2500
    config.learning_rate = 2e-3
    config.warmup_steps = 200
    config.time_budget_s = 0.0
    config.log_every_steps = 50
    config.eval_every_steps = 250
    config.checkpoint_every_steps = 250
    return config


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises a one-line `ValueError` naming a model or data field of `config` out of
    range; `run` calls it before it reads data or writes to the workdir. (`sample.*`
    needs the vocabulary: `check_sample_options`.)"""
    if config.shuffle:
        raise ValueError("config.shuffle must be False: the carried state needs the windows of a stream in order.")
    if config.cell not in CELL_TYPES:
        raise ValueError(f"config.cell: unknown cell type {config.cell!r}; choose from {', '.join(CELL_TYPES)}.")
    for name in ("num_layers", "width", "embed_dim", "unroll", "bptt_steps"):
        check_positive_int(config[name], f"config.{name}")
    common.check_keep_probability(config, "dropout_keep")


def make_cell(kind: str, width: int, gru_reset_after: bool = True) -> RNNCell:
    """One recurrent layer of `width` units of type `kind` (one of `CELL_TYPES`)."""
    from rnnlab.cells.gru import gru
    from rnnlab.cells.lstm import lstm

    if kind == "rnn":
        return rnnlab.cells.basic_rnn(width)
    if kind == "indrnn":  # |u| <= 1: a ReLU unit cannot grow its own state step after step
        return rnnlab.cells.indrnn(width, recurrent_max_abs=1.0)
    if kind == "gru":
        return gru(width, reset_after=gru_reset_after)
    if kind == "lstm":
        return lstm(width)
    if kind == "ln_lstm":
        return lstm(width, layer_norm=True)
    raise ValueError(f"config.cell: unknown cell type {kind!r}; choose from {', '.join(CELL_TYPES)}.")


class CharLM(NamedTuple):
    """The character LM as pure functions.

    Attributes:
      init: `(key) -> params` with `embed: [V, E]`, `rnn` (the stack's params) and
        `out: {w: [H, V], b: [V]}`.
      init_carry: `(batch_size) -> carry`, the zero state of every layer, each leaf
        `[B, ...]`.
      apply: `(params, carry, ids, rng=None) -> (logits, carry)` for `ids: int [B, T]`,
        `logits: [B, T, V]`; `rng` turns dropout on (training).
      vocab_size: `V`.
    """

    init: Callable[[PRNGKey], Params]
    init_carry: Callable[[int], Carry]
    apply: Callable[..., tuple[Array, Carry]]
    vocab_size: int


def build_model(config: ml_collections.ConfigDict, vocab_size: int) -> CharLM:
    """The model of `config` (`cell`, `num_layers`, `width`, `embed_dim`,
    `dropout_keep`, `gru_reset_after`, `unroll`) over `vocab_size` characters.

    Dropout (training only) follows Zaremba et al. (2014): on the embedding and on
    every layer's output, never on the recurrent path. `rnnlab.unroll` runs the stack
    layer by layer and hoists each layer's input projection out of the scan.
    """
    if config.num_layers < 1:
        raise ValueError(f"config.num_layers must be >= 1, got {config.num_layers}.")
    layers = [make_cell(config.cell, config.width, config.gru_reset_after) for _ in range(config.num_layers)]
    cell = rnnlab.stack(layers)
    keep = float(config.dropout_keep)
    dropout_cell = rnnlab.stack([rnnlab.dropout(layer, output_keep=keep) for layer in layers]) if keep < 1 else None
    embed_dim, unroll = config.embed_dim, config.unroll

    def init(key: PRNGKey) -> Params:
        embed_key, rnn_key, out_key = jax.random.split(key, 3)
        return {
            "embed": jax.random.normal(embed_key, (vocab_size, embed_dim)),
            "rnn": cell.init(rnn_key, embed_dim),
            "out": {
                "w": jax.nn.initializers.glorot_uniform()(out_key, (cell.output_size, vocab_size)),
                "b": jnp.zeros((vocab_size,)),
            },
        }

    def init_carry(batch_size: int) -> Carry:
        shapes = jax.eval_shape(lambda key: cell.init(key, embed_dim), jax.random.PRNGKey(0))
        zero_params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return rnnlab.batched_initial_state(cell, zero_params, batch_size)

    def apply(params: Params, carry: Carry, ids: Array, rng: Optional[PRNGKey] = None) -> tuple[Array, Carry]:
        x = params["embed"][ids]  # [B, T, E]
        if rng is None or dropout_cell is None:
            ys, carry = rnnlab.unroll(cell, params["rnn"], x, initial_state=carry, unroll=unroll)
        else:
            embed_key, *layer_keys = jax.random.split(rng, 1 + len(layers))
            x = inverted_dropout(embed_key, x, keep)
            batch_size = ids.shape[0]
            state = tuple(
                rnnlab.DropoutState(layer_state, jax.random.split(key, batch_size))
                for layer_state, key in zip(carry, layer_keys)
            )
            ys, final = rnnlab.unroll(dropout_cell, params["rnn"], x, initial_state=state, unroll=unroll)
            carry = tuple(layer_state.cell for layer_state in final)
        return ys @ params["out"]["w"] + params["out"]["b"], carry

    return CharLM(init, init_carry, apply, vocab_size)


def make_task(model: CharLM) -> train.Task:
    """The training task over rows `{"inputs", "targets": int32 [B, T],
    "weights": float32 [B, T]}` (see `train_rows` and `eval_rows`).

    Per-row metrics: `loss = sum_t weights * cross_entropy` (nats) and
    `bits_per_char = loss / ln 2`; the weights make their mean over rows the mean over
    characters. The loss minimised is the mean of `loss` over the batch.
    """

    def loss(params: Params, carry: Carry, batch: dict[str, Array], rng: Optional[PRNGKey]):
        logits, carry = model.apply(params, carry, batch["inputs"], rng)
        cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])  # [B, T]
        per_row = jnp.sum(cross_entropy * batch["weights"], axis=1)
        return jnp.mean(per_row), (carry, {"loss": per_row, "bits_per_char": per_row / math.log(2.0)})

    return train.Task(init_params=model.init, loss=loss, init_carry=model.init_carry)


def train_rows(ids: np.ndarray, batch_size: int, bptt_steps: int) -> dict[str, np.ndarray]:
    """Training rows for truncated BPTT: window `w` of stream `s` at row `w * B + s`.

    Args:
      ids: int `[N]`, the encoded training text.
    Returns:
      `{"inputs", "targets": int32 [W * B, T], "weights": float32 [W * B, T] = 1/T}`.
    """
    inputs, targets = text_data.stream_batches(ids, batch_size, bptt_steps)  # [W, B, T]
    rows = inputs.shape[0] * batch_size
    return {
        "inputs": inputs.reshape(rows, bptt_steps),
        "targets": targets.reshape(rows, bptt_steps),
        "weights": np.full((rows, bptt_steps), 1.0 / bptt_steps, np.float32),
    }


def eval_rows(ids: np.ndarray, batch_size: int, bptt_steps: int) -> dict[str, np.ndarray]:
    """Evaluation rows covering every character of `ids` exactly once.

    The `N - 1` (input, target) pairs are laid out as `B` contiguous streams of
    `W * T` pairs (the last stream zero-padded at its end) and cut into windows like
    `train_rows`. Weights are `W * B / (N - 1)` on real pairs and 0 on padding, so the
    mean over rows of `sum_t weights * loss` is the exact mean over all `N - 1`
    characters.
    """
    num_pairs = len(ids) - 1
    if num_pairs < 1:
        raise ValueError(f"an evaluation text needs at least 2 characters, got {len(ids)}.")
    num_windows = -(-num_pairs // (batch_size * bptt_steps))
    padded = batch_size * num_windows * bptt_steps

    def layout(values: np.ndarray) -> np.ndarray:
        streams = np.pad(values, (0, padded - num_pairs)).reshape(batch_size, num_windows, bptt_steps)
        return np.ascontiguousarray(streams.transpose(1, 0, 2).reshape(num_windows * batch_size, bptt_steps))

    ids = np.asarray(ids, np.int32)
    valid = layout(np.ones(num_pairs, np.float32))
    return {
        "inputs": layout(ids[:-1]),
        "targets": layout(ids[1:]),
        "weights": valid * np.float32(num_windows * batch_size / num_pairs),
    }


def load_corpus(data_dir: Optional[str], tfds_data_dir: Optional[str]) -> tuple[dict[str, str], text_data.Vocabulary]:
    """The train/validation/test texts and the vocabulary of all their characters."""
    splits = text_data.load_text_splits(data_dir=data_dir, tfds_data_dir=tfds_data_dir)
    return splits, text_data.Vocabulary.from_text("".join(splits.values()))


def generate(model: CharLM, params: Params, vocab: text_data.Vocabulary, options: ml_collections.ConfigDict) -> list[str]:
    """Samples of `options` (`config.sample`), each the prompt and its continuation."""
    continuations = sample.generate_text(
        model.apply,
        params,
        model.init_carry(options.num_samples),
        vocab,
        options.prompt,
        jax.random.PRNGKey(options.seed),
        options.num_chars,
        temperature=options.temperature,
        top_k=options.top_k or None,
    )
    return [options.prompt + continuation for continuation in continuations]


def check_sample_options(options: ml_collections.ConfigDict, vocab: text_data.Vocabulary) -> None:
    """Raises a one-line `ValueError` for `config.sample` options that `generate` would
    refuse, so that a typo fails before training rather than after it."""
    if not options.prompt:
        raise ValueError("config.sample.prompt is empty: give at least one character to start from.")
    unknown = sorted(set(options.prompt) - set(vocab.to_json()))
    if unknown:
        raise ValueError(f"config.sample.prompt has characters outside the vocabulary: {unknown!r}.")
    top_k = options.top_k
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= vocab.size:
        raise ValueError(f"config.sample.top_k must be an integer from 0 (all) to the vocabulary size "
                         f"{vocab.size}, got {top_k!r}.")
    for name in ("num_chars", "num_samples"):
        if isinstance(options[name], bool) or not isinstance(options[name], int) or options[name] < 1:
            raise ValueError(f"config.sample.{name} must be a positive integer, got {options[name]!r}.")
    try:  # the rules `generate` applies: a finite temperature >= 0, ...
        sample.check_options(options.temperature, top_k or None, options.num_chars)
    except ValueError as error:
        raise ValueError(f"config.sample: {error}") from None


def write_samples(path: str, texts: list[str], options: ml_collections.ConfigDict, step: int, mode: str = "w") -> None:
    """Writes (or appends, `mode="a"`) the samples with one header line each."""
    with open(path, mode, encoding="utf-8") as f:
        for index, text in enumerate(texts):
            f.write(f"=== step {step}, sample {index}, temperature {options.temperature}, "
                    f"top_k {options.top_k or 'all'} ===\n{text}\n\n")


def _load_vocab(workdir: str) -> text_data.Vocabulary:
    with open(os.path.join(workdir, VOCAB_FILE), encoding="utf-8") as f:
        return text_data.Vocabulary.from_json(json.load(f))


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    mode: str = "train",
    resume: bool = False,
    data_dir: Optional[str] = None,
    tfds_data_dir: Optional[str] = None,
    name: str = "char_lm",
) -> dict[str, Any]:
    """Trains, evaluates the newest checkpoint ("eval") or samples from it ("sample");
    see `registry.RunFn`.

    "train" writes what `rnnlab.train.train` writes (`results.json` with `val_loss`,
    `val_bits_per_char`, `test_loss`, `test_bits_per_char`), `vocab.json`, `curves.png`
    and `samples.txt`. "eval" writes `eval_results.json`. "sample" prints the samples
    on stderr, returns them (`launch.py` prints the results as JSON on stdout) and
    appends them to `samples.txt`. "eval", "sample" and `resume` rebuild the model
    from the run's `config.json`, taking only `common.EVAL_FIELDS` (`sample.*`,
    `eval_batch_size`, ...) / `common.RESUME_FIELDS` from `config`.
    """
    common.check_mode(name, mode, MODES)
    config = common.config_for_run(config, workdir, mode, resume)
    check_config(config)
    if mode == "train":
        return _train(config, workdir, resume, data_dir, tfds_data_dir)
    vocab = _load_vocab(workdir)
    if mode == "sample":
        check_sample_options(config.sample, vocab)
    model = build_model(config, vocab.size)
    params, step = train.restore_params(make_task(model), config, workdir)
    if mode == "sample":
        texts = generate(model, params, vocab, config.sample)
        if distributed.is_main_process():  # with several processes, only process 0 prints and writes
            for text in texts:  # for reading; stdout is one JSON document, which holds them too
                print(text, end="\n\n", file=sys.stderr)
            write_samples(os.path.join(workdir, SAMPLES_FILE), texts, config.sample, step, mode="a")
        return {"step": step, "samples": texts}
    splits, _ = load_corpus(data_dir, tfds_data_dir)
    results = {"step": step}
    for prefix, split in EVAL_SPLITS.items():
        rows = eval_rows(vocab.encode(splits[split]), config.eval_batch_size, config.bptt_steps)
        values = train.evaluate(make_task(model), params, rows, config.eval_batch_size)
        results.update({f"{prefix}_{metric}": value for metric, value in values.items()})
    if distributed.is_main_process():
        train.write_json(os.path.join(workdir, "eval_results.json"), results)
    return results


def _train(config, workdir, resume, data_dir, tfds_data_dir) -> dict[str, Any]:
    splits, vocab = load_corpus(data_dir, tfds_data_dir)
    check_sample_options(config.sample, vocab)  # the samples come after training: check them before it
    model = build_model(config, vocab.size)
    task = make_task(model)
    train_data = train_rows(vocab.encode(splits["train"]), config.batch_size, config.bptt_steps)
    eval_data = {
        prefix: eval_rows(vocab.encode(splits[split]), config.eval_batch_size, config.bptt_steps)
        for prefix, split in EVAL_SPLITS.items()
    }
    if resume and os.path.exists(os.path.join(workdir, VOCAB_FILE)) and _load_vocab(workdir).to_json() != vocab.to_json():
        raise ValueError(f"the corpus's characters differ from those of {os.path.join(workdir, VOCAB_FILE)}, "
                         "which the run was trained on; resume it with the same data.")
    # vocab.json is written by train.train after its workdir checks: a refused run keeps the old one.
    result = train.train(task, config, workdir, train_data, eval_data, resume=resume,
                         may_change=common.RESUME_FIELDS, files={VOCAB_FILE: vocab.to_json()})
    if result.results["stop_reason"] in ("done", "time_budget"):
        texts = generate(model, result.state.params, vocab, config.sample)  # every process: params may span them
        if distributed.is_main_process():  # with several processes, only process 0 writes files
            plots.plot_training_curves(read_metrics(workdir), os.path.join(workdir, "curves.png"))
            write_samples(os.path.join(workdir, SAMPLES_FILE), texts, config.sample, result.results["steps"])
    return result.results


EXPERIMENTS = {
    "char_lm": ("Character LM on tiny-shakespeare: 2 x GRU(384), truncated BPTT, samples.", get_config),
    "char_lm_fast": ("Character LM for a 141 s CPU budget: 1 x GRU(256), 100 s of training.", get_fast_config),
    "char_lm_large": ("Character LM for a GPU: 3 x LSTM(768) with dropout, about 40 epochs.", get_large_config),
}

for _name, (_description, _get_config) in EXPERIMENTS.items():
    registry.register(_name, _description, _get_config, functools.partial(run, name=_name), modes=MODES)
