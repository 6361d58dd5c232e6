"""`python -m rnnlab.bench [--FIELD=VALUE ...] [--workdir=DIR]`: one flag per
`BenchConfig` field (see `--help`)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Optional, Sequence

from rnnlab.bench import BenchConfig, run_benchmark


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[BenchConfig, Optional[str]]:
    parser = argparse.ArgumentParser(prog="python -m rnnlab.bench", description=__doc__)
    parser.add_argument("--workdir", default="bench_results", help="where results.json, report.md and plots go")
    for field in dataclasses.fields(BenchConfig):
        if field.type in (bool, "bool"):
            parser.add_argument(f"--{field.name}", type=lambda v: v.lower() in ("1", "true", "yes"), default=field.default)
        else:
            kind = {"int": int, "float": float}.get(str(field.type), str)
            parser.add_argument(f"--{field.name}", type=kind, default=field.default)
    args = vars(parser.parse_args(argv))
    workdir = args.pop("workdir")
    try:
        return BenchConfig(**args), workdir
    except ValueError as error:
        parser.error(str(error))


def main(argv: Optional[Sequence[str]] = None) -> None:
    config, workdir = parse_args(argv)
    run_benchmark(config, workdir)


if __name__ == "__main__":
    main()
