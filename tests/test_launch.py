"""`launch.py` as users run it: listing, bad input, interruption and resuming.

Each case is a subprocess (JAX's import time each), so the cases are few.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_fixtures import write_mnist_idx

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config.num_units=4", "--config.batch_size=8", "--config.eval_batch_size=16", "--config.reading_digits=1",
        "--config.warmup_steps=1", "--config.progress_bar=false"]


def launch(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, **kwargs)


def assert_one_line_error(process: subprocess.CompletedProcess, *fragments: str) -> None:
    assert process.returncode != 0
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("launch.py: error: "), process.stderr
    assert "Traceback" not in process.stderr + process.stdout
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("data")
    write_mnist_idx(str(directory), num_train=64, num_test=16)
    return str(directory)


def test_list_shows_every_mnist_experiment():
    process = launch("--list")
    assert process.returncode == 0, process.stderr
    names = {line.split()[0] for line in process.stdout.splitlines() if line.strip()}
    assert {"bilstm_mnist", "lstm_mnist", "gru_mnist", "lstm3_mnist", "gru3_mnist", "lstm_gru_mnist",
            "bilstm3_mnist"} <= names


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--experiment=no_such_experiment"], ["unknown experiment 'no_such_experiment'", "bilstm_mnist"]),
        (["--config.no_such_field=3"], ["unknown config field 'no_such_field'"]),
        (["--config.batch_size=many"], ["--config.batch_size=many"]),
        (["--experiment=sine_lstm", "--mode=sample"], ["'sine_lstm' supports --mode=train|eval, not --mode=sample"]),
        (["--experiment=bench_unroll", "--resume"], ["'bench_unroll' does not resume"]),
    ],
    ids=["unknown-experiment", "unknown-field", "ill-typed-value", "unsupported-mode", "not-resumable"],
)
def test_bad_flags_fail_with_one_line(args, fragments):
    assert_one_line_error(launch(*args), *fragments)


def test_bad_runs_fail_with_one_line(data_dir, tmp_path):
    """Missing data, nothing to resume, an unwritable workdir: all before training."""
    (tmp_path / "a_file").write_text("")
    assert_one_line_error(launch(f"--data_dir={tmp_path / 'nothing'}", f"--workdir={tmp_path / 'w'}"),
                          "does not exist")
    assert_one_line_error(launch(f"--data_dir={data_dir}", f"--workdir={tmp_path / 'w'}", "--resume", *TINY),
                          "no checkpoint")
    assert_one_line_error(launch(f"--data_dir={data_dir}", f"--workdir={tmp_path / 'a_file' / 'run'}", *TINY),
                          "cannot write")


def test_sigint_saves_a_checkpoint_and_resume_finishes(data_dir, tmp_path):
    workdir = tmp_path / "run"
    args = [f"--data_dir={data_dir}", f"--workdir={workdir}", "--experiment=lstm_mnist", *TINY,
            "--config.log_every_steps=1", "--config.checkpoint_every_steps=0"]
    process = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args, "--config.num_steps=100000"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().strip()) and process.poll() is None:
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, stderr
    assert "stopped by SIGINT" in stderr and "Traceback" not in stderr
    stopped_at = json.loads((workdir / "results.json").read_text())["steps"]
    printed = json.loads(stdout)  # stdout is the results, stopped or not
    assert (printed["stop_reason"], printed["steps"]) == ("SIGINT", stopped_at)
    assert os.listdir(workdir / "checkpoints") == [str(stopped_at)]

    resumed = launch(*args, f"--config.num_steps={stopped_at + 2}", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    results = json.loads((workdir / "results.json").read_text())
    assert results["steps"] == stopped_at + 2 and results["stop_reason"] == "done"
    assert (workdir / "reading.png").exists()


def test_experiment_and_overrides_are_read_from_flagfiles_and_one_dash_flags(tmp_path):
    """absl accepts `--flagfile=F` and `-experiment=X`: the config must be X's, and the
    `--config.*` lines of F are checked like those of the command line."""
    flagfile = tmp_path / "flags"
    flagfile.write_text("--experiment=sine_lstm\n--config.window=7\n--config.no_such_field=1\n")
    assert_one_line_error(launch(f"--flagfile={flagfile}"), "unknown config field 'no_such_field'",
                          "'sine_lstm'", "num_points")
    assert_one_line_error(launch("-experiment=sine_lstm", "--config.window=7", "--mode=eval",
                                 f"--workdir={tmp_path / 'none'}"), "no checkpoint in")


SINE_TINY = ["--experiment=sine_lstm", "--config.num_points=600", "--config.num_units=4", "--config.window=10",
             "--config.batch_size=16", "--config.warmup_steps=1", "--config.log_every_steps=2",
             "--config.progress_bar=false"]


def test_eval_and_resume_use_the_trained_config_and_refuse_other_model_fields(tmp_path):
    workdir = f"--workdir={tmp_path / 'run'}"
    trained = launch(*SINE_TINY, workdir, "--config.num_steps=4", "--config.eval_every_steps=2")
    assert trained.returncode == 0, trained.stderr
    assert json.loads(trained.stdout)["steps"] == 4, "stdout is the results alone; progress goes to stderr"
    assert "step 2 (epoch" in trained.stderr
    assert_one_line_error(launch("--experiment=sine_lstm", workdir, "--mode=eval", "--config.window=50"),
                          "--config.window=50 differs", "(10,", "--mode=eval", "eval_batch_size")
    assert_one_line_error(launch("--experiment=sine_lstm", workdir, "--resume", "--config.num_units=8"),
                          "--config.num_units=8 differs", "--resume", "num_steps")
    # No model fields repeated: they come from config.json; num_steps may change.
    resumed = launch("--experiment=sine_lstm", workdir, "--resume", "--config.num_steps=6", "--config.window=10")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == 6
    # The run records its experiment; another one (or the default, when --experiment is
    # left out) is refused, as is setting the record by hand.
    assert json.loads((tmp_path / "run" / "config.json").read_text())["experiment"] == "sine_lstm"
    assert_one_line_error(launch(workdir, "--mode=eval"), "was not trained by --experiment=bilstm_mnist",
                          "it holds a run of --experiment=sine_lstm")
    assert_one_line_error(launch("--experiment=char_lm", workdir, "--resume"), "--experiment=sine_lstm")
    assert_one_line_error(launch("--experiment=sine_lstm", "--config.experiment=x"), "choose it with --experiment")


def test_a_run_from_before_the_experiment_record_is_checked_by_its_fields(tmp_path):
    from experiments import registry
    from experiments.trained_run import TrainedRun

    # A sine run's config.json with a field the experiment has dropped since.
    sine = registry.get("sine_lstm").get_config()
    (tmp_path / "config.json").write_text(json.dumps({**sine.to_dict(), "dropped_since": 1}))
    run = TrainedRun.read(str(tmp_path))
    run.check_experiment("sine_lstm", sine)
    assert "dropped_since" not in run.merged(sine, keep=())
    with pytest.raises(ValueError, match=r"its config.json lacks fields of 'char_lm' \(bptt_steps, "):
        run.check_experiment("char_lm", registry.get("char_lm").get_config())


def test_the_bench_runs_through_launch(tmp_path):
    process = launch("--experiment=bench_unroll", "--config.shapes=2x3x3x4", "--config.methods=scan",
                     "--config.peers=", "--config.modes=forward", "--config.rounds=1", "--config.calls=1",
                     "--config.warmup=0", "--config.peak_matmul_size=64", "--config.peak_bandwidth_mib=0",
                     "--config.plots=false", f"--workdir={tmp_path}")
    assert process.returncode == 0, process.stderr
    assert "B=2 T=3 I=3 H=4 forward" in json.loads(process.stdout)["fastest"]


def experiment_names() -> list[str]:
    sys.path.insert(0, str(ROOT))
    from experiments import registry

    return registry.names()


@pytest.mark.parametrize("name", experiment_names())
def test_helpfull_lists_every_config_field_as_the_shell_argument_that_sets_its_default(name):
    from absl import flags
    from ml_collections import config_flags

    from experiments import registry
    from launch import config_help

    config = registry.get(name).get_config()
    config.experiment = name  # launch records it; the listing leaves it out (--experiment sets it)
    listed = config_help(name, config).splitlines()[1:]
    # What a shell passes on for the listed words, e.g. --config.sample.prompt=$'ROMEO:\n'.
    printed = subprocess.run(["bash", "-c", 'printf "%s\\0" ' + " ".join(listed)], capture_output=True, check=True)
    argv = printed.stdout.decode().split("\0")[:-1]
    assert len(argv) == len(listed)
    flag_values, argv = flags.FlagValues(), ["launch.py", *argv]
    config_flags.DEFINE_config_dict("config", registry.get(name).get_config(), flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    overrides = config_flags.get_override_values(flag_values["config"])
    expected = {path: value for path, value in flat(config.to_dict()).items() if path != "experiment"}
    assert set(overrides) == set(expected)  # every field listed once, nested ones by their dotted path
    assert flat(flag_values.config.to_dict()) == expected


def flat(tree: dict, prefix: str = "") -> dict:
    return {path: value for key, child in tree.items()
            for path, value in (flat(child, f"{prefix}{key}.") if isinstance(child, dict)
                                else {prefix + key: child}).items()}


def test_helpfull_shows_the_listing():
    assert "--config.sample.prompt=$'ROMEO:\\n'" in launch("--experiment=char_lm", "--helpfull").stdout


def test_an_override_of_a_list_field_must_have_the_trained_length(tmp_path):
    from experiments.trained_run import TrainedRun

    (tmp_path / "config.json").write_text(json.dumps({"sizes": [8, 8, 8], "rate": 0.5}))
    run = TrainedRun.read(str(tmp_path))
    run.check_overrides({"sizes": (8, 8, 8), "rate": 0.5}, (), "--resume")  # the trained values
    for sizes in ((8, 8), (8, 8, 8, 8)):  # equal as far as zip() reads them
        with pytest.raises(ValueError, match=r"--config\.sizes=.* differs"):
            run.check_overrides({"sizes": sizes}, (), "--resume")


def test_os_errors_are_worded_by_kind():
    import launch

    missing = FileNotFoundError(2, "No such file or directory", "/w/config.json")
    assert launch.os_error_message(missing, "/w") == "/w/config.json does not exist."
    blocked = NotADirectoryError(20, "Not a directory", "/f/run")
    assert launch.os_error_message(blocked, "/f/run").startswith("cannot write to --workdir=/f/run: Not a directory")
    assert launch.os_error_message(PermissionError(13, "Permission denied", "/w/x"), "/w").startswith(
        "permission denied: /w/x")
    assert launch.os_error_message(FileNotFoundError("our own message."), "/w") == "our own message."
