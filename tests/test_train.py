"""The training loop on toy tasks: exact resume, evaluation totals, carry, stopping."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tensorboardX.proto import event_pb2

from rnnlab import train
from rnnlab.checkpoint import CheckpointError
from rnnlab.metrics import MetricWriter, read_metrics

FEATURES, CLASSES = 5, 3
RESULT_KEYS = {"steps", "planned_steps", "epochs", "train_seconds", "num_params", "stop_reason", "devices"}


def toy_data(num_rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_rows, FEATURES)).astype(np.float32)
    return {"x": x, "y": (np.argmax(x[:, :CLASSES], axis=1)).astype(np.int32)}


def softmax_regression(dropout: float = 0.0) -> train.Task:
    """Softmax regression; in training, input dropout drawn from `rng`."""

    def init_params(key):
        return {"w": 0.1 * jax.random.normal(key, (FEATURES, CLASSES)), "b": jnp.zeros(CLASSES)}

    def loss(params, carry, batch, rng):
        x = batch["x"]
        if rng is not None and dropout:
            x = jnp.where(jax.random.bernoulli(rng, 1 - dropout, x.shape), x / (1 - dropout), 0.0)
        logits = x @ params["w"] + params["b"]
        losses = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], axis=1)[:, 0]
        correct = (jnp.argmax(logits, axis=1) == batch["y"]).astype(jnp.float32)
        return jnp.mean(losses), (carry, {"loss": losses, "accuracy": correct})

    return train.Task(init_params=init_params, loss=loss)


def config(**overrides):
    c = train.default_config()
    c.update(dict(batch_size=8, eval_batch_size=16, num_steps=12, warmup_steps=2, learning_rate=0.05,
                  log_every_steps=1, checkpoint_every_steps=0, progress_bar=False))
    c.update(overrides)
    return c


def test_resume_continues_exactly(tmp_path):
    """N steps, stop, resume M steps == N + M steps uninterrupted: params, optimiser
    state, PRNG (dropout) and data order (shuffled epochs) all continue."""
    task, data = softmax_regression(dropout=0.3), toy_data(36)
    c = config(num_steps=14, checkpoint_every_steps=5, keep_checkpoints=5)  # 4 steps per epoch
    reference = train.train(task, c, str(tmp_path / "ref"), data, {"test": data})
    assert sorted(os.listdir(tmp_path / "ref" / "checkpoints")) == ["10", "14", "5"]

    shutil.copytree(tmp_path / "ref", tmp_path / "resumed")
    for step in ("10", "14"):  # as if the run had stopped after step 5
        shutil.rmtree(tmp_path / "resumed" / "checkpoints" / step)
    resumed = train.train(task, c, str(tmp_path / "resumed"), data, {"test": data}, resume=True)

    assert int(resumed.state.step) == 14
    for name in ("params", "opt_state", "rng"):
        jax.tree.map(np.testing.assert_array_equal, getattr(resumed.state, name), getattr(reference.state, name))
    assert resumed.results["test_accuracy"] == reference.results["test_accuracy"]
    steps = [record["step"] for record in read_metrics(str(tmp_path / "resumed")) if record["split"] == "train"]
    assert steps == list(range(1, 15)), "the resumed run's log reads like one run"


def test_workdir_contents_and_results(tmp_path):
    result = train.train(softmax_regression(), config(eval_every_steps=5), str(tmp_path), toy_data(40), {"test": toy_data(20, 1)})
    assert RESULT_KEYS | {"test_loss", "test_accuracy"} <= set(result.results)
    assert result.results["stop_reason"] == "done" and result.results["steps"] == 12
    assert result.results["num_params"] == FEATURES * CLASSES + CLASSES
    assert json.loads((tmp_path / "results.json").read_text()) == pytest.approx(result.results)
    assert json.loads((tmp_path / "config.json").read_text())["batch_size"] == 8
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records if r["split"] == "test"] == [5, 10, 12]
    assert {"loss", "accuracy", "grad_norm", "learning_rate"} <= set(records[0])


def test_evaluate_counts_every_example_once():
    """11 rows in batches of 4: the padded last batch is masked out of the means."""
    task, data = softmax_regression(), toy_data(11)
    params = task.init_params(jax.random.PRNGKey(0))
    _, (_, per_example) = task.loss(params, None, data, None)
    expected = {name: float(np.mean(values)) for name, values in per_example.items()}
    assert train.evaluate(task, params, data, batch_size=4) == pytest.approx(expected, rel=1e-6)


def counting_task() -> train.Task:
    """The carry counts the batches seen since the last reset; metric "carry" reports it."""

    def loss(params, carry, batch, rng):
        carry = carry + 1
        return jnp.sum(params["w"] * batch["x"]) * 0.0, (carry, {"carry": carry.astype(jnp.float32)})

    return train.Task(init_params=lambda key: {"w": jnp.ones(())}, loss=loss,
                      init_carry=lambda batch_size: jnp.zeros((batch_size,), jnp.int32))


def test_carry_flows_through_batches_and_resets_each_epoch(tmp_path):
    data = {"x": np.arange(12, dtype=np.float32)}  # 3 batches of 4 per epoch
    train.train(counting_task(), config(batch_size=4, num_steps=7, shuffle=False), str(tmp_path), data)
    carries = [r["carry"] for r in read_metrics(str(tmp_path)) if r["split"] == "train"]
    assert carries == [1, 2, 3, 1, 2, 3, 1]
    assert train.evaluate(counting_task(), {"w": jnp.ones(())}, data, batch_size=4) == {"carry": 2.0}


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    data = toy_data(40)
    data["x"][28] = np.nan  # in batch 3 (rows 24..31): step 4
    c = config(num_steps=10, shuffle=False, checkpoint_every_steps=2)
    with pytest.raises(train.NonFiniteLossError, match=r"at step 4\b.*step 2"):
        train.train(softmax_regression(), c, str(tmp_path), data)
    params, step = train.restore_params(softmax_regression(), c, str(tmp_path))
    assert step == 2
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params))


def test_time_budget_stops_and_still_evaluates(tmp_path):
    result = train.train(softmax_regression(), config(num_steps=10_000, time_budget_s=1e-6), str(tmp_path),
                         toy_data(40), {"test": toy_data(20)})
    assert result.results["stop_reason"] == "time_budget"
    assert result.results["steps"] == 1 and "test_accuracy" in result.results


def test_resume_refuses_missing_or_corrupt_checkpoints_without_writing(tmp_path):
    task, data, c = softmax_regression(), toy_data(40), config(num_steps=3)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train.train(task, c, str(tmp_path / "empty"), data, resume=True)
    assert not (tmp_path / "empty").exists()

    train.train(task, c, str(tmp_path), data)
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train.train(task, c, str(tmp_path), data)
    with pytest.raises(CheckpointError, match="batch_size=8"):
        train.train(task, config(num_steps=3, batch_size=4), str(tmp_path), data, resume=True)

    for root, _, files in os.walk(tmp_path / "checkpoints" / "3" / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    before = {name: (tmp_path / name).read_bytes() for name in ("config.json", "metrics.jsonl", "results.json")}
    with pytest.raises(CheckpointError, match="cannot restore"):
        train.train(task, c, str(tmp_path), data, resume=True)
    assert before == {name: (tmp_path / name).read_bytes() for name in before}


def test_schedule_matches_optax_and_the_step_is_adam():
    c = config(learning_rate=0.3, warmup_steps=10, final_lr_fraction=0.1)
    reference = optax.warmup_cosine_decay_schedule(0.0, 0.3, 10, 110, end_value=0.03)
    steps = np.array([0, 5, 10, 37, 109, 110, 150])
    np.testing.assert_allclose(train.learning_rate(c, steps, 110), reference(steps), rtol=1e-5, atol=1e-7)

    c = config(optimizer="adamw", weight_decay=0.1, grad_clip_norm=0.0)
    params, grads = {"w": jnp.arange(3.0)}, {"w": jnp.array([0.5, -1.0, 2.0])}
    direction, _ = train.make_optimizer(c).update(grads, train.make_optimizer(c).init(params), params)
    adamw = optax.adamw(0.01, weight_decay=0.1)
    expected, _ = adamw.update(grads, adamw.init(params), params)
    np.testing.assert_allclose(-0.01 * direction["w"], expected["w"], rtol=1e-6)


def test_adam_steps_follow_global_norm_clipping():
    """Two steps by hand: the first gradient (norm 50) is scaled to norm 1 before Adam,
    which changes the direction of the second step too."""
    c = config(optimizer="adam", grad_clip_norm=1.0)
    optimizer = train.make_optimizer(c)
    params = {"w": jnp.zeros(2)}
    state = optimizer.init(params)
    m, v = np.zeros(2), np.zeros(2)
    for t, g in enumerate([np.array([30.0, 40.0]), np.array([0.3, -0.1])], start=1):
        direction, state = optimizer.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        g = g * min(1.0, 1.0 / np.linalg.norm(g))
        m, v = c.b1 * m + (1 - c.b1) * g, c.b2 * v + (1 - c.b2) * g * g
        expected = (m / (1 - c.b1**t)) / (np.sqrt(v / (1 - c.b2**t)) + 1e-8)
        np.testing.assert_allclose(direction["w"], expected, rtol=1e-4)


def test_every_step_draws_its_own_randomness(tmp_path):
    """The `rng` a task's loss gets differs at every step (new dropout masks)."""

    def loss(params, carry, batch, rng):
        draw = jax.random.uniform(rng)
        return 0.0 * jnp.sum(params["w"]), (carry, {"draw": jnp.full(batch["x"].shape[:1], draw)})

    task = train.Task(init_params=lambda key: {"w": jnp.ones(())}, loss=loss)
    train.train(task, config(num_steps=6), str(tmp_path), toy_data(16))
    draws = [record["draw"] for record in read_metrics(str(tmp_path)) if record["split"] == "train"]
    assert len(draws) == len(set(draws)) == 6


def test_weight_decay_skips_the_params_matching_the_exclude_pattern():
    c = config(optimizer="adamw", weight_decay=0.1, grad_clip_norm=0.0, weight_decay_exclude=r"nu_log|\['b'\]")
    params = {"dense": {"w": jnp.arange(3.0), "b": jnp.ones(3)}, "cell": {"nu_log": jnp.full(3, 2.0)}}
    grads = jax.tree_util.tree_map(lambda p: jnp.array([0.5, -1.0, 2.0]), params)
    optimizer = train.make_optimizer(c)
    direction, _ = optimizer.update(grads, optimizer.init(params), params)
    hand_mask = {"dense": {"w": True, "b": False}, "cell": {"nu_log": False}}
    adamw = optax.adamw(0.01, weight_decay=0.1, mask=hand_mask)
    expected, _ = adamw.update(grads, adamw.init(params), params)
    for got, want in zip(jax.tree_util.tree_leaves(direction), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(-0.01 * got, want, rtol=1e-6)
    # The excluded params move exactly as with Adam, the others do not.
    adam_direction, _ = optax.adam(0.01).update(grads, optax.adam(0.01).init(params), params)
    np.testing.assert_allclose(expected["cell"]["nu_log"], adam_direction["cell"]["nu_log"], rtol=1e-6)
    assert not np.allclose(expected["dense"]["w"][1:], adam_direction["dense"]["w"][1:])


def test_invalid_weight_decay_exclude_pattern_is_a_clear_error():
    with pytest.raises(ValueError, match="weight_decay_exclude is not a valid regular expression"):
        train.make_optimizer(config(optimizer="adamw", weight_decay=0.1, weight_decay_exclude="nu_log|("))


def test_schedule_is_fitted_to_the_time_budget(tmp_path):
    """A budget far shorter than the configured run: the cosine decay is re-planned to
    end with the budget (or, on a stalled machine, the hard stop ends the loop)."""
    c = config(num_steps=10**7, time_budget_s=3.0, log_every_steps=20)
    result = train.train(softmax_regression(), c, str(tmp_path), toy_data(40))
    assert result.results["planned_steps"] == 10**7 and result.results["steps"] < 10**7
    # Ended by the re-planned schedule or by the hard stop: the budget either way.
    assert result.results["stop_reason"] == "time_budget"


def test_two_devices_train_like_one(tmp_path):
    """Data parallel over 2 (forced host) devices: the batch is split along "data",
    params replicated; the result matches the single-device run."""
    script = f"""
import json, sys
sys.path[:0] = {[str(Path(__file__).parent), str(Path(__file__).parents[1])]!r}
import jax, numpy as np
from test_train import config, softmax_regression, toy_data
from rnnlab import train
assert jax.device_count() == 2
result = train.train(softmax_regression(dropout=0.3), config(), sys.argv[1], toy_data(40), {{"test": toy_data(20)}})
print(json.dumps({{k: np.asarray(v).tolist() for k, v in result.state.params.items()}}))
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    process = subprocess.run([sys.executable, "-c", script, str(tmp_path / "two")], capture_output=True, text=True,
                             env=env, timeout=300)
    assert process.returncode == 0, process.stderr
    two = json.loads(process.stdout.strip().splitlines()[-1])
    one = train.train(softmax_regression(dropout=0.3), config(), str(tmp_path / "one"), toy_data(40), {"test": toy_data(20)})
    for name, value in one.state.params.items():
        np.testing.assert_allclose(two[name], value, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_of_another_model_is_one_clear_error_without_tracebacks(tmp_path, capfd):
    """Shapes are compared before orbax reads anything: the error names the arrays with
    their stored and requested shapes, and no orbax thread prints to stderr."""
    train.train(softmax_regression(), config(num_steps=2), str(tmp_path), toy_data(40))
    capfd.readouterr()
    wider = train.Task(init_params=lambda key: {"w": jnp.zeros((FEATURES, 7)), "b": jnp.zeros(7)},
                       loss=softmax_regression().loss)
    with pytest.raises(CheckpointError, match=r"does not match the model: 6 arrays differ in shape: "
                                              r"params.b stored \(3,\), requested \(7,\)") as error:
        train.restore_params(wider, config(), str(tmp_path))
    assert "strict" not in str(error.value)
    other = train.Task(init_params=lambda key: {"v": jnp.zeros(3)}, loss=softmax_regression().loss)
    with pytest.raises(CheckpointError, match=r"the model has 3 arrays the checkpoint lacks \(params.v, .*"
                                              r"the checkpoint has 6 arrays the model lacks \(params.b"):
        train.restore_params(other, config(), str(tmp_path))
    assert "Traceback" not in capfd.readouterr().err


def test_after_a_signal_results_carry_no_evaluation(tmp_path):
    """SIGINT after a periodic evaluation: results.json has no (stale) test figures."""
    def interrupt(step, params, metrics):
        os.kill(os.getpid(), signal.SIGINT)

    result = train.train(softmax_regression(), config(num_steps=50, eval_every_steps=2), str(tmp_path), toy_data(40),
                         {"test": toy_data(20)}, on_eval=interrupt)
    assert result.results["stop_reason"] == "SIGINT"
    assert not any(key.startswith("test_") for key in json.loads((tmp_path / "results.json").read_text()))


@pytest.mark.parametrize("field, value", [("log_every_steps", 0), ("num_steps", -5), ("keep_checkpoints", 0),
                                          ("time_budget_s", -1.0), ("eval_every_steps", -1)])
def test_out_of_range_counts_are_refused_before_anything_is_written(tmp_path, field, value):
    with pytest.raises(ValueError, match=rf"config.{field} must be >= "):
        train.train(softmax_regression(), config(**{field: value}), str(tmp_path / "run"), toy_data(40))
    assert not (tmp_path / "run").exists()


def test_non_finite_loss_before_any_checkpoint_says_there_is_none(tmp_path):
    data = toy_data(40)
    data["x"][:] = np.nan
    with pytest.raises(train.NonFiniteLossError, match="at step 1; .*No checkpoint was saved before it"):
        train.train(softmax_regression(), config(shuffle=False), str(tmp_path), data)


def test_resume_warns_of_config_changes_beyond_its_length_and_intervals(tmp_path):
    workdir, data = str(tmp_path), toy_data(40)
    train.train(softmax_regression(), config(num_steps=4), workdir, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a longer run, logged less often: no warning
        train.train(softmax_regression(), config(num_steps=6, log_every_steps=2), workdir, data, resume=True)
    with pytest.warns(UserWarning, match=r"config.json in learning_rate: 0.05 -> 0.01$"):
        train.train(softmax_regression(), config(num_steps=8, learning_rate=0.01), workdir, data, resume=True)
    assert json.loads((tmp_path / "config.json").read_text())["learning_rate"] == 0.01


def test_resuming_a_finished_run_or_a_cut_log_line(tmp_path):
    """Resuming a finished run keeps its train_seconds and logs no second test record;
    a last metrics line cut short by a crash is dropped; other bad lines name the file."""
    workdir, data, test = str(tmp_path), toy_data(40), {"test": toy_data(20)}
    first = train.train(softmax_regression(), config(num_steps=4), workdir, data, test).results
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "split": "tr')
    again = train.train(softmax_regression(), config(num_steps=4), workdir, data, test, resume=True).results
    assert again["train_seconds"] >= first["train_seconds"] and again["steps"] == 4
    assert [r["step"] for r in read_metrics(workdir) if r["split"] == "test"] == [4]
    more = train.train(softmax_regression(), config(num_steps=6), workdir, data, test, resume=True).results
    assert more["train_seconds"] > first["train_seconds"]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines[:2] + ["{oops"] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl line 3 is not a metrics record"):
        train.train(softmax_regression(), config(num_steps=8), workdir, data, test, resume=True)


def tensorboard_scalars(workdir: str, tag: str) -> dict[int, float]:
    """`{step: value}` of `tag` as TensorBoard shows it: the event files read in name
    order, a SessionLog START at step s dropping the values read before it at steps >= s."""
    scalars: dict[int, float] = {}
    for name in sorted(name for name in os.listdir(workdir) if name.startswith("events.out.tfevents")):
        data, i = (Path(workdir) / name).read_bytes(), 0
        while i < len(data):  # records: the length (uint64), its CRC, the event, its CRC
            (length,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + length])
            i += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                scalars = {step: value for step, value in scalars.items() if step < event.step}
            scalars.update({event.step: value.simple_value for value in event.summary.value if value.tag == tag})
    return scalars


def test_a_resumed_tensorboard_log_keeps_the_resume_step_and_drops_later_ones(tmp_path, monkeypatch):
    writer = MetricWriter(str(tmp_path))
    for step in range(1, 6):
        writer.write(step, "train", {"loss": float(step)})
    writer.close()
    # Event files are named by the second and the host: resumed on another host, the
    # run gets a second file without waiting for the next second.
    host = socket.gethostname()
    monkeypatch.setattr(socket, "gethostname", lambda: host + "-resumed")
    writer = MetricWriter(str(tmp_path), resume_step=3)
    for step in (4, 5):
        writer.write(step, "train", {"loss": 10.0 * step})
    writer.close()
    assert len([name for name in os.listdir(tmp_path) if name.startswith("events.out.tfevents")]) == 2
    assert tensorboard_scalars(str(tmp_path), "train/loss") == {1: 1.0, 2: 2.0, 3: 3.0, 4: 40.0, 5: 50.0}


class FakeClock:
    """Stands in for `train._clock`: every reading is `tick` seconds after the one
    before, so that a run's time follows the loop's progress, not the machine's speed."""

    def __init__(self, tick: float = 1e-3):
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def stop_at_first_eval(step, params, metrics):
    os.kill(os.getpid(), signal.SIGTERM)


def stopped_and_resumed(workdir: str, budget: float) -> tuple[dict, dict, list[float], int]:
    """A budgeted run stopped by SIGTERM at step 101 (after its first evaluation), a
    third of the way into its budget, then resumed: both results, the logged learning
    rates, and how many were logged before the stop."""
    data, test = toy_data(40), {"test": toy_data(20)}
    c = config(num_steps=10**6, time_budget_s=budget, eval_every_steps=100)
    first = train.train(softmax_regression(), c, workdir, data, test, on_eval=stop_at_first_eval).results
    assert first["stop_reason"] == "SIGTERM" and first["train_seconds"] < budget / 2
    logged = len([r for r in read_metrics(workdir) if r["split"] == "train"])
    resumed = train.train(softmax_regression(), c, workdir, data, test, resume=True).results
    rates = [r["learning_rate"] for r in read_metrics(workdir) if r["split"] == "train"]
    return first, resumed, rates, logged


def test_a_resumed_run_keeps_to_the_budget_of_the_whole_run(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "_clock", FakeClock(tick=1e-3))  # about 3 ms per step
    first, resumed, _, _ = stopped_and_resumed(str(tmp_path), budget=1.0)
    assert resumed["stop_reason"] == "time_budget" and resumed["steps"] > first["steps"]
    # the budget counts the first part's evaluation too, which train_seconds leaves out
    assert 0.95 <= resumed["train_seconds"] <= 1.05, "the budget covers the run, not each part"


def test_a_resumed_budgeted_run_continues_its_learning_rate_decay(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "_clock", FakeClock(tick=1e-3))
    _, _, rates, logged = stopped_and_resumed(str(tmp_path), budget=1.0)
    around = rates[logged - 1:logged + 5]  # the last rate before the stop, the first five after
    assert around[0] < 0.9 * config().learning_rate, "the stop came well into the decay"
    assert all(b <= a * (1 + 1e-6) for a, b in zip(around, around[1:])), f"the decay restarted: {around}"


def test_a_resume_with_the_budget_spent_stops_at_once_and_evaluates(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "_clock", FakeClock())
    workdir, data, test = str(tmp_path), toy_data(40), {"test": toy_data(20)}
    c = config(num_steps=10**6, time_budget_s=0.1, fit_schedule_to_budget=False)
    first = train.train(softmax_regression(), c, workdir, data, test).results
    assert first["stop_reason"] == "time_budget" and first["train_seconds"] >= 0.1
    logged = read_metrics(workdir)

    again = train.train(softmax_regression(), c, workdir, data, test, resume=True).results
    assert again["stop_reason"] == "time_budget" and again["steps"] == first["steps"]
    assert "test_accuracy" in again
    assert [r for r in read_metrics(workdir) if r["split"] == "train"] == [r for r in logged if r["split"] == "train"]


def test_a_budget_counts_intermediate_evaluations_across_a_resume(tmp_path, monkeypatch):
    """The budget includes intermediate evaluations (`train_seconds` does not): a run
    stopped by its budget and resumed with the same config trains no further step."""
    clock = FakeClock()
    monkeypatch.setattr(train, "_clock", clock)
    evaluate = train._EvalSplit.__call__

    def slow_evaluation(self, params):
        clock.now += 0.05
        return evaluate(self, params)

    monkeypatch.setattr(train._EvalSplit, "__call__", slow_evaluation)
    workdir, data, test = str(tmp_path), toy_data(40), {"test": toy_data(20)}
    c = config(num_steps=10**6, time_budget_s=1.0, fit_schedule_to_budget=False, eval_every_steps=20)
    first = train.train(softmax_regression(), c, workdir, data, test).results
    again = train.train(softmax_regression(), c, workdir, data, test, resume=True).results
    assert first["stop_reason"] == again["stop_reason"] == "time_budget"
    assert again["steps"] == first["steps"]


def test_more_budget_after_a_fitted_run_ended_trains_on(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "_clock", FakeClock())
    workdir, data = str(tmp_path), toy_data(40)
    first = train.train(softmax_regression(), config(num_steps=10**6, time_budget_s=0.5), workdir, data).results
    more = train.train(softmax_regression(), config(num_steps=10**6, time_budget_s=1.0), workdir, data,
                       resume=True).results
    assert first["stop_reason"] == more["stop_reason"] == "time_budget"
    assert more["steps"] > 1.5 * first["steps"]


def test_a_checkpoint_without_the_planned_length_resumes_to_the_configured_one(tmp_path):
    """Checkpoints written before the meta recorded `planned_steps`: a resume with a
    budget and a longer `num_steps` trains to it (the budget did not shorten them)."""
    workdir, data = str(tmp_path), toy_data(40)
    train.train(softmax_regression(), config(num_steps=4, time_budget_s=600), workdir, data)
    (meta_file,) = (tmp_path / "checkpoints" / "4" / "meta").glob("metadata")
    meta = json.loads(meta_file.read_text())
    del meta["planned_steps"]
    meta_file.write_text(json.dumps(meta))
    resumed = train.train(softmax_regression(), config(num_steps=10, time_budget_s=600), workdir, data,
                          resume=True).results
    assert (resumed["steps"], resumed["stop_reason"]) == (10, "done")


def test_a_field_is_within_a_list_by_name_or_subtree_not_by_prefix():
    assert train.is_field_within("sample", ("sample",))
    assert train.is_field_within("sample.temperature", ("num_steps", "sample"))
    assert not train.is_field_within("samples", ("sample",))  # a longer name, not a subtree
    assert not train.is_field_within("sample", ("sample.temperature",))  # the subtree holds more than the field
    assert not train.is_field_within("sample", ())


def test_resume_warnings_skip_the_fields_the_caller_allows_and_those_the_file_lacks(tmp_path):
    workdir, data = str(tmp_path), toy_data(40)
    train.train(softmax_regression(), config(num_steps=4), workdir, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train.train(softmax_regression(), config(num_steps=5, learning_rate=0.01), workdir, data, resume=True,
                    may_change=("num_steps", "learning_rate"))
        with_new_field = config(num_steps=6, learning_rate=0.01)
        with_new_field.added_since = 3  # a field config.json does not have
        train.train(softmax_regression(), with_new_field, workdir, data, resume=True)
