"""Crashes and damaged checkpoints: SIGKILL at random moments and `--resume`, SIGTERM,
and a corrupted newest checkpoint.

The killed runs are this file run as a script (a small LSTM classifier on generated
MNIST-shaped IDX data, trained by `rnnlab.train.train`), which starts in a few seconds:

    python tests/test_fault_tolerance.py WORKDIR DATA_DIR [resume]

SIGTERM goes through `launch.py`, whose exit status it documents.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
UNITS, NUM_TRAIN, NUM_STEPS = 8, 40, 60  # 5 batches of 8 per epoch: 12 epochs, each in its own order
CONFIG = dict(batch_size=8, num_steps=NUM_STEPS, warmup_steps=2, learning_rate=0.01, log_every_steps=1,
              checkpoint_every_steps=3, keep_checkpoints=3, shuffle=True, seed=5, progress_bar=False)


def make_config(**overrides):
    from rnnlab import train

    config = train.default_config()
    config.update(CONFIG)
    config.update(overrides)
    return config


def make_task():
    """LSTM(8) over the 28 rows of an image, a linear classifier on the last output, and
    input dropout drawn from the step's PRNG key (so the key must resume exactly too)."""
    import jax
    import jax.numpy as jnp

    import rnnlab
    from rnnlab import train
    from rnnlab.cells.lstm import lstm

    cell = lstm(UNITS)

    def init_params(key):
        rnn_key, out_key = jax.random.split(key)
        return {"rnn": cell.init(rnn_key, 28), "w": 0.1 * jax.random.normal(out_key, (UNITS, 10)), "b": jnp.zeros(10)}

    def loss(params, carry, batch, rng):
        x = batch["image"].astype(jnp.float32) / 255.0
        if rng is not None:
            x = jnp.where(jax.random.bernoulli(rng, 0.9, x.shape), x / 0.9, 0.0)
        outputs, _ = rnnlab.unroll(cell, params["rnn"], x)
        logits = outputs[:, -1] @ params["w"] + params["b"]
        losses = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["label"][:, None], axis=-1)[:, 0]
        return jnp.mean(losses), (carry, {"loss": losses})

    return train.Task(init_params=init_params, loss=loss)


def load_data(data_dir: str) -> dict[str, np.ndarray]:
    from rnnlab.data.mnist import load_mnist

    split = load_mnist("train", data_dir=data_dir)
    return {"image": np.asarray(split.images, np.uint8), "label": np.asarray(split.labels, np.int32)}


def _flat_state(state) -> dict[str, np.ndarray]:
    """The checkpointed arrays of a `TrainState` by key path, for an npz file."""
    import jax

    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in
            jax.tree_util.tree_flatten_with_path((state.step, state.params, state.opt_state, state.rng))[0]}


if __name__ == "__main__":
    sys.modules.setdefault("torch", None)  # tensorboardX imports torch when present: 5 s we do not need
    from rnnlab import train

    workdir, data_dir, *flags = sys.argv[1:]
    result = train.train(make_task(), make_config(), workdir, load_data(data_dir), resume="resume" in flags)
    np.savez(os.path.join(workdir, "final_state.npz"), **_flat_state(result.state))
    sys.exit(0 if result.results["stop_reason"] == "done" else 3)


# ----------------------------------------------------------------------------- tests

import pytest  # noqa: E402

from data_fixtures import write_mnist_idx  # noqa: E402
from rnnlab import train  # noqa: E402
from rnnlab.metrics import read_metrics  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("data")
    write_mnist_idx(str(directory), num_train=NUM_TRAIN, num_test=16, seed=1)
    return str(directory)


@pytest.fixture(scope="module")
def worker_env(tmp_path_factory) -> dict[str, str]:
    """One CPU device, and a compilation cache shared by the module's workers: the
    first compiles the step, the resumed ones load it (the same executable)."""
    env = {key: value for key, value in os.environ.items() if key not in ("XLA_FLAGS",)}
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def _worker(workdir: Path, data_dir: str, env: dict[str, str], resume: bool) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, str(workdir), data_dir, *(["resume"] if resume else [])],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> str:
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr[-3000:]
    return stderr


@pytest.fixture(scope="module")
def reference(data_dir, worker_env, tmp_path_factory) -> Path:
    """The uninterrupted run's workdir (with `final_state.npz`)."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    _finish(_worker(workdir, data_dir, worker_env, resume=False))
    return workdir


def _assert_same_run(workdir: Path, reference: Path) -> None:
    """Bitwise the same final state (step, params, optimiser state, PRNG key), and a log
    that reads like one run with the same loss at every step."""
    with np.load(workdir / "final_state.npz") as actual, np.load(reference / "final_state.npz") as expected:
        assert sorted(actual) == sorted(expected) and int(actual["[0]"]) == NUM_STEPS
        for key in expected:
            np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)
    records = [r for r in read_metrics(str(workdir)) if r["split"] == "train"]
    assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1)), "the log reads like one run"
    assert [r["loss"] for r in records] == [r["loss"] for r in read_metrics(str(reference)) if r["split"] == "train"]
    assert json.loads((workdir / "results.json").read_text())["steps"] == NUM_STEPS


def _latest_checkpoint(workdir: Path) -> Optional[int]:
    """The newest complete checkpoint (orbax renames a step's directory into place when
    the step is written; a half-written one is `STEP.orbax-checkpoint-tmp`)."""
    directory = workdir / "checkpoints"
    steps = [int(name) for name in os.listdir(directory) if name.isdigit()] if directory.is_dir() else []
    return max(steps, default=None)


def _last_logged_step(workdir: Path) -> int:
    try:
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:  # a line being written
            pass
    return max(steps)


def _tree_bytes(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()}


def test_sigkill_at_random_moments_then_resume_matches_uninterrupted_run(data_dir, worker_env, reference, tmp_path):
    """Three SIGKILLs, each at a seeded random step after the run wrote a new checkpoint
    plus a random delay (so mid-step, mid-log or mid-save), each followed by a resume;
    the finished run is bitwise the uninterrupted one."""
    rng = random.Random(20240607)
    workdir = tmp_path / "run"
    kills = []
    for attempt in range(3):
        start = _latest_checkpoint(workdir) or 0
        target = start + rng.randint(4, 10)  # a checkpoint comes every 3 steps
        delay = rng.uniform(0.0, 0.2)
        process = _worker(workdir, data_dir, worker_env, resume=attempt > 0)
        deadline = time.monotonic() + 120
        while not ((_latest_checkpoint(workdir) or 0) > start and _last_logged_step(workdir) >= target):
            assert process.poll() is None, f"the run ended before it was killed: {process.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.01)
        time.sleep(delay)
        assert process.poll() is None, "the run finished before it was killed; raise NUM_STEPS"
        process.kill()
        process.communicate()
        assert process.returncode == -signal.SIGKILL
        kills.append((start, _last_logged_step(workdir), _latest_checkpoint(workdir)))
    print("kills (resumed from, last logged, newest checkpoint):", kills,
          "left over:", sorted(name for name in os.listdir(workdir / "checkpoints") if not name.isdigit()))

    _finish(_worker(workdir, data_dir, worker_env, resume=True))
    _assert_same_run(workdir, reference)
    assert _latest_checkpoint(workdir) == NUM_STEPS


def test_corrupt_newest_checkpoint_fails_clearly_and_older_ones_survive(data_dir, worker_env, reference, tmp_path):
    """A truncated newest checkpoint: resuming raises CheckpointError naming its step and
    writes nothing (there is no automatic fallback). The recovery docs/scaling.md gives,
    deleting that step's directory, resumes from the previous checkpoint, even with a
    half-written `STEP.orbax-checkpoint-tmp` left by a crash mid-save, and ends bitwise
    where the uninterrupted run ends."""
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    checkpoints = workdir / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == [str(NUM_STEPS - 6), str(NUM_STEPS - 3), str(NUM_STEPS)]
    for path in (checkpoints / str(NUM_STEPS)).rglob("*"):
        if path.is_file() and path.stat().st_size > 1:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    before = _tree_bytes(workdir)
    process = _worker(workdir, data_dir, worker_env, resume=True)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 1
    assert re.search(rf"CheckpointError: cannot restore the checkpoint of step {NUM_STEPS} in \S*checkpoints", stderr), \
        stderr[-3000:]
    assert f"to use step {NUM_STEPS - 3}, delete {checkpoints / str(NUM_STEPS)}" in stderr, stderr[-3000:]
    assert _tree_bytes(workdir) == before, "a failed resume must not write anything"

    # Recovery: delete the damaged step. A crash while that step was being written again
    # would leave its temporary directory: orbax ignores it, then replaces it.
    shutil.move(checkpoints / str(NUM_STEPS), checkpoints / f"{NUM_STEPS}.orbax-checkpoint-tmp")
    (workdir / "final_state.npz").unlink()
    _finish(_worker(workdir, data_dir, worker_env, resume=True))
    assert sorted(os.listdir(checkpoints)) == sorted(str(NUM_STEPS - k) for k in (6, 3, 0))
    _assert_same_run(workdir, reference)


def test_sigterm_saves_a_checkpoint_and_exits_143(data_dir, tmp_path):
    """`launch.py` on SIGTERM: finishes the step, saves it, exits with 128 + 15 and one
    line on stderr; the checkpoint of that step restores."""
    workdir = tmp_path / "run"
    args = ["--experiment=lstm_mnist", f"--data_dir={data_dir}", f"--workdir={workdir}", "--config.num_units=4",
            "--config.batch_size=8", "--config.eval_batch_size=16", "--config.reading_digits=1",
            "--config.warmup_steps=1", "--config.progress_bar=false", "--config.log_every_steps=1",
            "--config.checkpoint_every_steps=0", "--config.num_steps=100000"]
    env = {key: value for key, value in os.environ.items() if key not in ("XLA_FLAGS",)}
    process = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while _last_logged_step(workdir) < 3:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    stopped_at = results["steps"]
    assert results["stop_reason"] == "SIGTERM" and stopped_at >= 3
    assert lines[0].startswith(f"launch.py: stopped by SIGTERM at step {stopped_at}; the checkpoint is saved")
    assert os.listdir(workdir / "checkpoints") == [str(stopped_at)]
    assert _last_logged_step(workdir) == stopped_at

    from experiments import mnist

    config = mnist.get_config("lstm")
    config.update(num_units="4", batch_size=8)
    _, step = train.restore_params(mnist.make_task(config)[0], config, str(workdir))
    assert step == stopped_at
