"""`python -m rnnlab.bench [--FIELD=VALUE ...] [--workdir=DIR]`: one flag per
`BenchConfig` field (see `--help`)."""

from __future__ import annotations

import argparse
import dataclasses
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
    for field in dataclasses.fields(BenchConfig):
        if field.type in (bool, "bool"):
            parser.add_argument(f"--{field.name}", type=_boolean, default=field.default)
        else:
            kind = {"int": int, "float": float}.get(str(field.type), str)
            parser.add_argument(f"--{field.name}", type=kind, default=field.default)
    args = vars(parser.parse_args(argv))
    workdir, reuse_host_memory = args.pop("workdir"), args.pop("reuse_host_memory")
    try:
        return BenchConfig(**args), workdir, reuse_host_memory
    except ValueError as error:
        parser.error(str(error))


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
