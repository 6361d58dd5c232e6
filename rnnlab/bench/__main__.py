"""`python -m rnnlab.bench [--FIELD=VALUE ...] [--workdir=DIR]`: times rnnlab's unroll
methods and peer frameworks; one flag per `BenchConfig` field, described below.
docs/benchmarks.md has example commands."""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Optional, Sequence

from rnnlab import host_memory
from rnnlab.bench import BenchConfig, run_benchmark

REUSE_HOST_MEMORY_HELP = (
    "reuse freed host memory (glibc), so that XLA:CPU's per-call temporaries and PyTorch's tensors "
    "cost no page faults; applies to every framework timed, and runs JAX's CPU computations on the calling "
    "thread (rnnlab.host_memory)"
)


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[BenchConfig, str, bool]:
    """`(config, workdir, reuse_host_memory)` from the command line."""
    parser = argparse.ArgumentParser(prog="python -m rnnlab.bench", description=__doc__)
    parser.add_argument("--workdir", default="bench_results", help="where results.json, report.md and plots go")
    parser.add_argument("--reuse_host_memory", type=_boolean, default=True, help=REUSE_HOST_MEMORY_HELP)
    descriptions = field_descriptions()
    for field in dataclasses.fields(BenchConfig):
        help_text = descriptions.get(field.name, "") + " (default: %(default)r)"
        if field.type in (bool, "bool"):
            parser.add_argument(f"--{field.name}", type=_boolean, default=field.default, help=help_text)
        else:
            kind = {"int": int, "float": float}.get(str(field.type), str)
            parser.add_argument(f"--{field.name}", type=kind, default=field.default, help=help_text)
    args = vars(parser.parse_args(argv))
    workdir, reuse_host_memory = args.pop("workdir"), args.pop("reuse_host_memory")
    try:
        return BenchConfig(**args), workdir, reuse_host_memory
    except ValueError as error:
        parser.error(str(error))


def field_descriptions() -> dict[str, str]:
    """Each `BenchConfig` field's description, from the `Attributes:` section of its
    docstring (an entry may describe several fields: `rtol, atol: ...`)."""
    section = BenchConfig.__doc__.split("Attributes:", 1)[1]
    descriptions = {}
    for names, text in re.findall(r"^ {6}([a-z_][a-z_, ]*): (.*?)(?=^ {6}[a-z_][a-z_, ]*: |\Z)", section, re.M | re.S):
        for name in names.split(","):
            descriptions[name.strip()] = " ".join(text.split()).replace("`", "")
    return descriptions


def _boolean(text: str) -> bool:
    """A flag value: `1`, `true`, `yes` or `0`, `false`, `no` (any case)."""
    value = text.lower()
    if value not in ("1", "true", "yes", "0", "false", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value in ("1", "true", "yes")


def main(argv: Optional[Sequence[str]] = None) -> None:
    config, workdir, reuse_host_memory = parse_args(argv)
    if reuse_host_memory:  # before the first JAX computation
        host_memory.reuse_freed_memory()
    run_benchmark(config, workdir)


if __name__ == "__main__":
    main()
