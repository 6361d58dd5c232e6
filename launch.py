"""Runs an rnnlab experiment.

    python launch.py --experiment=bilstm_mnist [--workdir=DIR] [--config.FIELD=VALUE ...]
                     [--mode=train|eval|sample] [--resume] [--data_dir=DIR]
                     [--tfds_data_dir=DIR]
                     [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]
    python launch.py --list

`--config.FIELD` overrides any field of the chosen experiment's config (see
`--helpfull` for the fields and their defaults). Mistakes in the input (an unknown
experiment or config field, a bad value, missing data, no checkpoint to resume) end
with one line on stderr and exit status 1. A run stopped by SIGINT/SIGTERM saves a
checkpoint and exits with 128 + the signal number; `--resume` continues it (a second
Ctrl-C stops at once, without saving).

`--mode=eval|sample` and `--resume` rebuild the model and its data from the run's
`config.json`, not from the command line (`--experiment` must name the experiment
the run was trained with, which `config.json` records, and `--data_dir` must be given
again): every field keeps its trained value unless
given again, and a `--config.FIELD` whose value differs from the trained one is
refused, except the fields that only shape an evaluation
(`experiments.common.EVAL_FIELDS`: eval_batch_size, sample.*, ...) and, on resume,
how long and how often it trains, logs, evaluates and saves
(`experiments.common.RESUME_FIELDS`: num_steps, time_budget_s, ...).

Several hosts: run the same command on every host, one process each, adding
`--coordinator_address=HOST0:PORT --num_processes=N --process_id=I` (I = 0 on HOST0)
and a `--workdir` that every host sees; see docs/scaling.md.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import signal
import sys
from typing import NoReturn, Optional, Sequence

from absl import app, flags, logging

DEFAULT_EXPERIMENT = "bilstm_mnist"
PROGRAM = os.path.basename(sys.argv[0]) if sys.argv else "launch.py"

flags.DEFINE_string("experiment", DEFAULT_EXPERIMENT, "Name of the experiment to run (see --list).")
flags.DEFINE_string("workdir", None, "Directory for config, metrics, checkpoints and plots; default runs/<experiment>.")
flags.DEFINE_bool("list", False, "List the experiments with one-line descriptions and exit.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "train; eval or sample from the newest checkpoint.")
flags.DEFINE_bool("resume", False, "Continue training from the newest checkpoint in --workdir.")
flags.DEFINE_string("data_dir", None, "Directory with the data files (default: $RNNLAB_DATA_DIR, then TFDS).")
flags.DEFINE_string("tfds_data_dir", None, "TensorFlow Datasets data directory.")
flags.DEFINE_string("coordinator_address", None,
                    "Multi-process runs: HOST:PORT of process 0, the same for every process (docs/scaling.md).")
flags.DEFINE_integer("num_processes", None, "Multi-process runs: how many processes (one per host).", lower_bound=1)
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index, 0 to num_processes - 1.",
                     lower_bound=0)
flags.DEFINE_bool("reuse_host_memory", True,
                  "Reuse freed host memory (glibc) instead of returning it to the system, so that XLA:CPU's "
                  "per-call temporaries cost no page faults; runs JAX's CPU computations on the calling thread "
                  "(rnnlab.host_memory).")
FLAGS = flags.FLAGS


def fail(message: str) -> NoReturn:
    """Ends the program with one line on stderr and exit status 1."""
    first_line = str(message).strip().splitlines()[0] if str(message).strip() else "unknown error"
    print(f"{PROGRAM}: error: {first_line}", file=sys.stderr)
    sys.exit(1)


def expand_flagfiles(argv: Sequence[str]) -> list[str]:
    """`argv` with every `--flagfile=F` replaced by F's flags, as absl expands them, so
    that the experiment and the `--config.*` overrides inside a flagfile are seen."""
    try:
        return FLAGS.read_flags_from_files(list(argv), force_gnu=False)
    except flags.Error as error:
        fail(str(error).replace("ERROR:: ", ""))


def _flag_arguments(argv: Sequence[str]) -> list[str]:
    """The arguments of `argv` that absl reads as flags: up to a bare `--`."""
    arguments = list(argv[1:])
    return arguments[:arguments.index("--")] if "--" in arguments else arguments


def experiment_from_argv(argv: Sequence[str]) -> str:
    """The value of `--experiment` in `argv` (flagfiles expanded; one or two dashes,
    `=VALUE` or a separate VALUE; the last one wins, as with absl), read before absl
    parses the flags because the config flag depends on it."""
    name = DEFAULT_EXPERIMENT
    arguments = _flag_arguments(argv)
    for index, arg in enumerate(arguments):
        match = re.fullmatch(r"--?experiment(=(.*))?", arg, re.DOTALL)
        if match and match.group(1) is not None:
            name = match.group(2)
        elif match and index + 1 < len(arguments):
            name = arguments[index + 1]
    return name


def config_override_paths(argv: Sequence[str]) -> list[str]:
    """The config fields that `argv` overrides (`--config.PATH=VALUE`, `-config.PATH`,
    `--noconfig.PATH` for booleans), as config_flags reads them."""
    paths = []
    for arg in _flag_arguments(argv):
        match = re.match(r"--?(no)?config\.([^=]+)", arg)
        if match:
            paths.append(match.group(2))
    return paths


def list_experiments() -> str:
    """One line per experiment: name and description."""
    from experiments import registry

    width = max(len(name) for name in registry.names())
    return "\n".join(f"{name:<{width}}  {registry.get(name).description}" for name in registry.names())


def config_help(experiment: str, config) -> str:
    """`--helpfull`'s text for `--config`: every field of `config` (nested ones by
    their dotted path) as the shell argument that sets it to its default value."""
    from rnnlab.train import flat_fields

    fields = flat_fields(config.to_dict())
    lines = [f"--config.{path}={shell_word(value)}" for path, value in sorted(fields.items())
             if path != "experiment"]  # set by --experiment
    return "\n".join([f"The config of --experiment={experiment}; override a field with --config.FIELD=VALUE. "
                      "Fields and their defaults, as shell arguments:", *lines])


def shell_word(value) -> str:
    """`value` as a shell word that config_flags parses back to it: strings as they
    are, other values as Python literals; quoted where the shell needs it (in double
    quotes when that reads easier than single ones; `$'...'`, bash's quoting with
    escapes, for control characters such as a newline)."""
    text = value if isinstance(value, str) else repr(value)
    if not text.isprintable():
        return "$'" + text.encode("unicode_escape").decode("ascii").replace("'", "\\'") + "'"
    if "'" in text and not re.search(r'["$`!]|\\(["$`\\]|$)', text):
        return f'"{text}"'  # double quotes keep it as written, single quotes included
    return shlex.quote(text)


def check_config_overrides(argv: Sequence[str], config, experiment: str) -> None:
    """Fails with one line if a `--config.FIELD` of `argv` names no field of `config`,
    or names `experiment` (which `--experiment` sets)."""
    for path in config_override_paths(argv):
        if path == "experiment":
            fail("--config.experiment records the experiment of a run; choose it with --experiment.")
        node = config
        for part in path.split("."):
            if not hasattr(node, "keys") or part not in node:
                fail(f"unknown config field {path!r} for experiment {experiment!r}; its fields: "
                     f"{', '.join(sorted(config.keys()))}")
            node = node[part]


def os_error_message(error: OSError, workdir: str) -> str:
    """One line for an `OSError` of a run, worded by its kind: messages of our own as
    they are, a missing file as missing, a workdir that cannot be written as such."""
    if error.errno is None:  # raised with a message of ours
        return str(error)
    path = error.filename or workdir
    if isinstance(error, FileNotFoundError):
        return f"{path} does not exist."
    if isinstance(error, PermissionError):
        return f"permission denied: {path} (check --workdir={workdir} and --data_dir)."
    if isinstance(error, (NotADirectoryError, FileExistsError, IsADirectoryError)) or error.errno in (
            errno.ENOSPC, errno.EROFS, errno.EDQUOT):
        return f"cannot write to --workdir={workdir}: {error.strerror}: {path}"
    return f"I/O error on {path}: {error.strerror or error}"


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's parsing, with errors reported as one line."""
    try:
        return FLAGS(argv)
    except flags.Error as error:
        fail(error)


def main(argv: Sequence[str]) -> None:
    from ml_collections import config_flags

    from experiments import common, registry
    from rnnlab import distributed, host_memory
    from rnnlab.train import NonFiniteLossError

    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS["verbosity"].present:  # orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    if FLAGS.list:
        print(list_experiments())
        return
    if FLAGS.reuse_host_memory:  # before the first JAX computation
        host_memory.reuse_freed_memory()
    try:  # before anything touches a device
        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    except ValueError as error:
        fail(error)
    experiment = registry.get(FLAGS.experiment)
    workdir = FLAGS.workdir or os.path.join("runs", experiment.name)
    try:
        common.check_mode(experiment.name, FLAGS.mode, experiment.modes)
    except ValueError as error:
        fail(error)
    if FLAGS.resume and not experiment.resumable:
        fail(f"experiment {experiment.name!r} does not resume; run it again without --resume.")
    config = FLAGS.config
    if FLAGS.mode != "train" or FLAGS.resume:  # the run's config.json, with the overrides that may change
        overrides = config_flags.get_override_values(FLAGS["config"])
        try:
            config = common.command_line_config(config, workdir, experiment.name, overrides, FLAGS.mode, FLAGS.resume)
        except ValueError as error:
            fail(error)
    try:
        results = experiment.run(
            config,
            workdir,
            mode=FLAGS.mode,
            resume=FLAGS.resume,
            data_dir=FLAGS.data_dir,
            tfds_data_dir=FLAGS.tfds_data_dir,
        )
    except OSError as error:
        fail(os_error_message(error, workdir))
    except (ValueError, NonFiniteLossError) as error:
        fail(error)
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        print(f"{PROGRAM}: interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    print(json.dumps(results, indent=2, sort_keys=True))  # also when stopped: stop_reason says so
    stop = results.get("stop_reason")
    if stop in ("SIGINT", "SIGTERM"):
        print(f"{PROGRAM}: stopped by {stop} at step {results['steps']}; the checkpoint is saved, continue with "
              f"--resume --workdir={workdir}", file=sys.stderr)
        sys.exit(128 + int(getattr(signal, stop)))


def run(argv: Optional[list[str]] = None) -> None:
    """The entry point: picks the experiment, defines `--config` from its default
    config, then hands over to absl."""
    from ml_collections import config_flags

    from experiments import registry

    argv = expand_flagfiles(sys.argv if argv is None else argv)
    name = experiment_from_argv(argv)
    if "--list" not in argv and name not in registry.names():
        fail(f"unknown experiment {name!r}; known experiments: {', '.join(registry.names())} (see --list)")
    experiment = registry.get(name if name in registry.names() else DEFAULT_EXPERIMENT)
    config = experiment.get_config()
    if experiment.resumable or set(experiment.modes) != {"train"}:
        config.experiment = name  # recorded in config.json, so that eval and resume can check it
    check_config_overrides(argv, config, name)
    try:  # config_flags applies the --config.* overrides of sys.argv here
        config_flags.DEFINE_config_dict("config", config, config_help(experiment.name, config), sys_argv=argv)
    except (flags.Error, ValueError, TypeError, KeyError, AttributeError) as error:
        fail(f"bad --config override: {error}")
    FLAGS["config"].default_as_str = None  # the help lists the defaults field by field
    app.run(main, argv=argv, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
