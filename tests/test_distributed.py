"""Data parallelism: 8 devices and 2 processes train like one device.

The multi-device cases run this file as a script in a subprocess, because the number
of host devices (`XLA_FLAGS=--xla_force_host_platform_device_count=N`) and
`jax.distributed.initialize` must be set up before JAX starts:

    python tests/test_distributed.py eight OUT_JSON DATA_DIR WORKDIR
    python tests/test_distributed.py process PROCESS_ID PORT OUT_JSON DATA_DIR WORKDIR

The model is the `lstm_mnist` experiment shrunk to 4 units, on generated IDX data,
wrapped so that the carry records the example ids of the last batch (which device
holds which rows) and the batch's sharding is reported when the step is traced.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORKER_TIMEOUT_S = 240
NUM_TRAIN, NUM_TEST = 64, 37  # 37: not a multiple of the eval batch (16) nor of the device count (8)
OVERRIDES = dict(num_units="4", batch_size=16, eval_batch_size=16, num_steps=6, warmup_steps=1, learning_rate=0.01,
                 log_every_steps=1, checkpoint_every_steps=0, reading_digits=0, progress_bar=False)


def make_config():
    from experiments import mnist

    config = mnist.get_config("lstm")
    config.update(OVERRIDES)
    return config


def load_data(data_dir: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Train and test splits with an extra "index" array (the example id)."""
    from experiments import mnist

    splits = []
    for split in ("train", "test"):
        data = mnist.load_split(split, data_dir, None)
        data["index"] = np.arange(len(data["label"]), dtype=np.int32)
        splits.append(data)
    return splits[0], splits[1]


def recording_task(config, shardings: Optional[list] = None):
    """The MNIST task; its carry is the ids of the batch last seen ([B] int32, split like
    the batch), and `shardings` receives `(sharding, shape)` of every traced image batch."""
    import jax
    import jax.numpy as jnp

    from experiments import mnist
    from rnnlab import train

    task, _ = mnist.make_task(config)

    def loss(params, carry, batch, rng):
        if shardings is not None:
            shape = batch["image"].shape
            jax.debug.inspect_array_sharding(batch["image"], callback=lambda s: shardings.append((s, shape)))
        value, (_, metrics) = task.loss(params, None, batch, rng)
        return value, (batch["index"], metrics)

    return train.Task(task.init_params, loss, lambda batch_size: jnp.full((batch_size,), -1, jnp.int32))


def _tolist(tree: Any) -> Any:
    import jax

    return jax.tree.map(lambda leaf: np.asarray(leaf).tolist(), tree)


def _shards(array) -> list[dict[str, Any]]:
    """Where the rows of a batch-like array live: one entry per addressable shard."""
    return [
        {"device": shard.device.id, "process": shard.device.process_index, "start": shard.index[0].start or 0,
         "stop": shard.index[0].stop if shard.index[0].stop is not None else array.shape[0],
         "rows": np.asarray(shard.data).tolist()}
        for shard in array.addressable_shards
    ]


def _run_and_report(workdir: str, data_dir: str) -> dict[str, Any]:
    """Trains on the current devices; everything the tests compare, as JSON."""
    import jax

    from rnnlab import distributed, train

    config = make_config()
    json_writes: list[str] = []  # the files this process writes with train.write_json
    write_json = train.write_json

    def recording_write_json(path: str, value: Any) -> None:
        json_writes.append(os.path.basename(path))
        write_json(path, value)

    train.write_json = recording_write_json
    shardings: list = []
    task = recording_task(config, shardings)
    train_data, test_data = load_data(data_dir)
    result = train.train(task, config, workdir, train_data, {"test": test_data})
    state = result.state
    step = 2  # any step: process_batch puts this process's rows of it on its devices
    ids = distributed.batch_rows(step, num_rows=NUM_TRAIN, batch_size=config.batch_size, seed=config.seed,
                                 shuffle=config.shuffle)
    batch = distributed.process_batch(train_data, step, batch_size=config.batch_size, seed=config.seed,
                                      shuffle=config.shuffle)
    rows = distributed.process_rows(config.batch_size)
    me = jax.process_index()
    agreement = {  # process 1 saw SIGTERM, process 0 nothing: both must stop, for that reason
        "stop": distributed.agreed_stop_reason("SIGTERM" if me == 1 else "done"),
        "any": distributed.any_process(me == 1),
        "broadcast": int(distributed.broadcast_from_main(np.int32(10 * me + 3))),
    }
    return {
        "agreement": agreement,
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "params": _tolist(state.params),
        "params_replicated": all(leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == jax.device_count()
                                 for leaf in jax.tree.leaves(state.params)),
        "carry_shards": _shards(state.carry),
        "last_batch_ids": distributed.batch_rows(config.num_steps - 1, num_rows=NUM_TRAIN,
                                                 batch_size=config.batch_size, seed=config.seed,
                                                 shuffle=config.shuffle).tolist(),
        "traced_batches": [{"shape": list(shape), "shard_rows": s.shard_shape(shape)[0],
                            "devices": len(s.device_set), "replicated": s.is_fully_replicated}
                           for s, shape in shardings],
        "process_rows": [rows.start, rows.stop],
        "batch_ids": ids.tolist(),
        "batch_index_shards": _shards(batch["index"]),
        "results": result.results,
        "json_writes": json_writes,
        "evaluate": (train.evaluate(task, state.params, test_data, config.eval_batch_size)
                     if jax.process_count() == 1 else None),
    }


def _worker(argv: list[str]) -> None:
    import faulthandler

    faulthandler.dump_traceback_later(WORKER_TIMEOUT_S, exit=True)  # a hang ends with every thread's stack
    sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]
    sys.modules.setdefault("torch", None)  # tensorboardX imports torch when present: 5 s we do not need
    mode = argv[0]
    if mode == "eight":
        out, data_dir, workdir = argv[1:]
    elif mode == "process":
        process_id, port, out, data_dir, workdir = argv[1:]
        from rnnlab import distributed

        # Before anything uses a device.
        assert distributed.initialize(f"127.0.0.1:{port}", 2, int(process_id), initialization_timeout=60)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    report = _run_and_report(workdir, data_dir)
    with open(out, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    _worker(sys.argv[1:])
    sys.exit(0)


# ----------------------------------------------------------------------------- tests

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import numpy_reference as ref  # noqa: E402
from data_fixtures import write_mnist_idx  # noqa: E402
from rnnlab import distributed, train  # noqa: E402


def _env(devices: int) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    return env


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("data")
    write_mnist_idx(str(directory), num_train=NUM_TRAIN, num_test=NUM_TEST, seed=3)
    return str(directory)


@pytest.fixture(scope="module")
def one_device(data_dir, tmp_path_factory) -> train.TrainResult:
    """The reference: the same run on a one-device mesh, in this process."""
    one = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "data_mesh", lambda: one)
        train_data, test_data = load_data(data_dir)
        return train.train(recording_task(make_config()), make_config(), str(tmp_path_factory.mktemp("one")),
                           train_data, {"test": test_data})


def _assert_params_close(actual, expected) -> None:
    """Within 1e-5 relative (the all-reduce sums the gradient in another order)."""
    actual = jax.tree.map(np.asarray, actual, is_leaf=lambda x: isinstance(x, list))
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e), rtol=1e-5, atol=1e-7)


def _assert_batch_split(report: dict, devices: int, batch_size: int) -> None:
    """The carry (= the ids of the last batch) lives on `devices` devices, each holding
    its `batch_size / devices` consecutive rows of that batch, in train.py's order
    (the addressable shards: all of them on one process, this process's on several)."""
    shards = report["carry_shards"]
    per_device = batch_size // devices
    for shard in shards:
        assert shard["start"] % per_device == 0 and shard["stop"] - shard["start"] == per_device
        assert shard["rows"] == report["last_batch_ids"][shard["start"]:shard["stop"]]


def numpy_eval(params, data) -> tuple[float, int]:
    """Mean cross-entropy (float64) and number of correct predictions of the
    unidirectional one-layer LSTM classifier over every example, in NumPy."""
    rnn = ref.to_float64(params["rnn"])
    w, b = (np.asarray(params["classifier"][name], np.float64) for name in ("w", "b"))
    losses, correct = [], 0
    for image, label in zip(data["image"], data["label"]):
        units = rnn["w_h"].shape[0]
        _, outputs = ref.run(ref.lstm_step, rnn, (np.zeros(units), np.zeros(units)), image / 255.0)
        logits = outputs[-1] @ w + b
        top2 = np.sort(logits)[-2:]
        assert top2[1] - top2[0] > 1e-4, "an (almost) tied prediction: pick another data seed"
        log_probs = logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
        losses.append(-log_probs[label])
        correct += int(np.argmax(logits) == label)
    return float(np.mean(losses)), correct


def test_initialize_arguments(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    assert distributed.initialize() is False and distributed.initialize(None, None, None) is False
    with pytest.raises(ValueError, match="missing num_processes, process_id"):
        distributed.initialize("10.0.0.1:1234")
    with pytest.raises(ValueError, match="missing coordinator_address"):
        distributed.initialize(None, 2, 0)
    for bad, match in [(("10.0.0.1", 2, 0), "host:port"), (("h:1234", 0, 0), "num_processes"),
                       (("h:1234", 2, 2), r"process_id .*\[0, num_processes=2\)"), (("h:99999", 2, 1), "port")]:
        with pytest.raises(ValueError, match=match):
            distributed.initialize(*bad)
    assert calls == []
    assert distributed.initialize("10.0.0.1:1234", 2, 1) is True
    assert calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1,
                          local_device_ids=None, initialization_timeout=300)]


def test_single_process_helpers_are_device_put(tmp_path):
    """On one process every helper is `device_put` along "data", and `batch_rows` is
    the order train.py's step gathers (checked through the recording carry)."""
    mesh = distributed.data_mesh()
    assert distributed.process_rows(8 * mesh.size, mesh) == slice(0, 8 * mesh.size)
    batch = {"x": np.arange(8.0 * mesh.size).reshape(-1, 1), "y": np.arange(8 * mesh.size)}
    sharded = distributed.shard_global_batch(batch, mesh)
    for name in batch:
        assert sharded[name].sharding == distributed.batch_sharding(mesh)
        np.testing.assert_array_equal(sharded[name], batch[name])
    with pytest.raises(ValueError, match="multiple of the device count"):
        distributed.process_rows(0)
    with pytest.raises(ValueError, match="must feed rows"):
        distributed.process_shard(batch, mesh, batch_size=16 * mesh.size)
    assert distributed.is_main_process()
    assert distributed.agreed_stop_reason("SIGTERM") == "SIGTERM" and distributed.any_process(False) is False
    assert distributed.broadcast_from_main({"a": 3}) == {"a": 3}
    with pytest.raises(ValueError, match="unknown stop reason"):
        distributed.agreed_stop_reason("bored")

    data = {"x": np.zeros((24, 1), np.float32), "index": np.arange(24, dtype=np.int32)}
    task = train.Task(lambda key: {"w": jnp.zeros(())}, lambda p, c, b, r: (p["w"] * 0.0, (b["index"], {"z": b["x"][:, 0]})),
                      lambda batch_size: jnp.zeros((batch_size,), jnp.int32))
    for shuffle, steps in ((True, 5), (False, 4)):  # 3 batches of 8 per epoch: step 4 is in epoch 1
        config = train.default_config()
        config.update(batch_size=8, num_steps=steps, shuffle=shuffle, seed=7, progress_bar=False)
        carry = train.train(task, config, str(tmp_path / f"shuffle_{shuffle}"), data).state.carry
        expected = distributed.batch_rows(steps - 1, num_rows=24, batch_size=8, seed=7, shuffle=shuffle)
        np.testing.assert_array_equal(carry, expected)
        np.testing.assert_array_equal(
            distributed.process_batch(data, steps - 1, batch_size=8, seed=7, shuffle=shuffle)["index"], expected)


def test_eight_devices_train_like_one(data_dir, one_device, tmp_path):
    """8 forced host devices: the batch is split 2 rows per device in train.py's order,
    params are replicated, params after 6 steps (across an epoch boundary) match one
    device, and evaluation over 37 examples (not a multiple of 16 = eval batch, nor of
    8 devices) gives the exact totals of a NumPy float64 pass over every example."""
    out = tmp_path / "report.json"
    started = time.monotonic()
    process = subprocess.run([sys.executable, __file__, "eight", str(out), data_dir, str(tmp_path / "run")],
                             capture_output=True, text=True, env=_env(8), timeout=300, cwd=ROOT)
    assert process.returncode == 0, process.stderr[-4000:]
    report = json.loads(out.read_text())
    print(f"8-device subprocess: {time.monotonic() - started:.1f} s")

    assert report["device_count"] == 8 and report["results"]["devices"] == 8
    assert report["params_replicated"]
    # Every traced batch (6 train steps: one trace; evaluation: one trace) is split in 8.
    assert report["traced_batches"] and all(
        t["devices"] == 8 and not t["replicated"] and t["shard_rows"] * 8 == t["shape"][0] for t in report["traced_batches"])
    _assert_batch_split(report, devices=8, batch_size=16)
    assert sorted(shard["start"] for shard in report["carry_shards"]) == list(range(0, 16, 2))
    assert len({shard["device"] for shard in report["carry_shards"]}) == 8
    np.testing.assert_array_equal(np.asarray(one_device.state.carry), report["last_batch_ids"])
    # process_batch: each device holds its own 2 rows of batch 2, read from the host.
    assert len({shard["device"] for shard in report["batch_index_shards"]}) == 8
    for shard in report["batch_index_shards"]:
        assert shard["stop"] - shard["start"] == 2
        assert shard["rows"] == report["batch_ids"][shard["start"]:shard["stop"]]

    _assert_params_close(report["params"], one_device.state.params)

    train_data, test_data = load_data(data_dir)
    loss, correct = numpy_eval(report["params"], test_data)
    for values in (report["evaluate"], {k[len("test_"):]: v for k, v in report["results"].items() if k.startswith("test_")}):
        assert round(values["accuracy"] * NUM_TEST) == correct
        assert values["accuracy"] == pytest.approx(correct / NUM_TEST, abs=1e-7)
        assert values["loss"] == pytest.approx(loss, rel=1e-5)
    assert report["results"]["test_loss"] == pytest.approx(one_device.results["test_loss"], rel=1e-5)


def _free_port() -> int:
    """A port free on IPv4 and IPv6 (the coordinator listens on both)."""
    with socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True) as server:
        return server.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(data_dir, tmp_path_factory) -> tuple[list[dict], Path]:
    """Two processes of 4 host devices each, joined by `distributed.initialize` on
    localhost (CPU collectives over gloo), training into one shared workdir."""
    tmp = tmp_path_factory.mktemp("two_processes")
    port = _free_port()
    outs = [tmp / f"report{i}.json" for i in range(2)]
    started = time.monotonic()
    processes = [subprocess.Popen([sys.executable, __file__, "process", str(i), str(port), str(outs[i]), data_dir,
                                   str(tmp / "run")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=_env(4), cwd=ROOT, start_new_session=True)
                 for i in range(2)]
    errors = []
    for process in processes:
        try:  # the workers dump their stacks and exit after WORKER_TIMEOUT_S
            errors.append(process.communicate(timeout=WORKER_TIMEOUT_S + 60)[1])
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            errors.append(process.communicate()[1])
    print(f"2-process run: {time.monotonic() - started:.1f} s")
    for process in processes:
        assert process.returncode == 0, "\n".join(f"process {i}: {e[-3000:]}" for i, e in enumerate(errors))
    return [json.loads(out.read_text()) for out in outs], tmp / "run"


def test_two_processes_train_like_one_device(two_processes, one_device):
    """2 processes x 4 devices: each process feeds (and holds) only its half of every
    batch, params are replicated on all 8 devices, and the result matches one device."""
    reports, workdir = two_processes
    for index, report in enumerate(reports):
        assert (report["process_index"], report["process_count"]) == (index, 2)
        assert (report["device_count"], report["local_device_count"]) == (8, 4)
        assert report["process_rows"] == [8 * index, 8 * index + 8]
        assert report["params_replicated"]
        # The carry: 4 local shards of 2 rows, this process's half of the last batch.
        assert {s["process"] for s in report["carry_shards"]} == {index}
        assert sorted((s["start"], s["stop"]) for s in report["carry_shards"]) == [
            (8 * index + 2 * d, 8 * index + 2 * d + 2) for d in range(4)]
        _assert_batch_split(report, devices=8, batch_size=16)
        for shard in report["batch_index_shards"]:
            assert 8 * index <= shard["start"] < shard["stop"] <= 8 * index + 8
            assert shard["rows"] == report["batch_ids"][shard["start"]:shard["stop"]]
        _assert_params_close(report["params"], one_device.state.params)
        assert report["results"]["test_loss"] == pytest.approx(one_device.results["test_loss"], rel=1e-5)
        assert report["results"]["test_accuracy"] == pytest.approx(one_device.results["test_accuracy"], abs=1e-7)
        assert report["agreement"] == {"stop": "SIGTERM", "any": True, "broadcast": 3}
    # Both processes saved one checkpoint together; it restores on one device.
    params, step = train.restore_params(recording_task(make_config()), make_config(), str(workdir))
    assert step == OVERRIDES["num_steps"]
    _assert_params_close(params, one_device.state.params)


def test_two_processes_log_once(two_processes):
    """The workdir reads like a one-process run: each step logged once."""
    _, workdir = two_processes
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == list(range(1, OVERRIDES["num_steps"] + 1))
    assert len([name for name in os.listdir(workdir) if name.startswith("events.out.tfevents")]) == 1


def test_two_processes_write_json_once(two_processes):
    """Only process 0 writes config.json and results.json (two writers would race on
    the same PATH.tmp), each once, and both files are complete JSON."""
    reports, workdir = two_processes
    assert [report["json_writes"] for report in reports] == [["config.json", "results.json"], []]
    assert not [name for name in os.listdir(workdir) if name.endswith(".tmp")]
    config = json.loads((workdir / "config.json").read_text())
    assert {name: config[name] for name in ("num_steps", "batch_size", "num_units")} == {
        name: OVERRIDES[name] for name in ("num_steps", "batch_size", "num_units")}
    assert json.loads((workdir / "results.json").read_text()) == reports[0]["results"]
