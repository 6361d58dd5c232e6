"""Presenting results: the text table, `results.json`, `report.md` and the PNG plots."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any, Optional

from rnnlab.bench.runner import Result

COLUMNS = ("target", "compile s", "median ms", "min-max ms", "IQR ms", "GFLOP/s", "% peak", "x best peer", "check", "note")


def _num(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ms(value: float) -> str:
    """A time in ms with the decimals its size needs: `108.7`, `9.84`, `0.781`."""
    return f"{value:.{1 if abs(value) >= 10 else 2 if abs(value) >= 1 else 3}f}"


def _row(r: Result) -> list[str]:
    t = r.time_ms
    check = "-" if r.check is None else ("ok" if r.check["passed"] else "FAIL") + (
        f" {r.check['max_abs_diff']:.1e}" if r.check.get("max_abs_diff") is not None else ""
    )
    return [
        r.target,
        _num(r.compile_s, 2),
        _ms(t.median) if t else r.status,
        f"{_ms(t.min)}-{_ms(t.max)}" if t else "",
        _ms(t.q75 - t.q25) if t else "",
        _num(r.gflops),
        _num(r.fraction_of_peak * 100 if r.fraction_of_peak is not None else None),
        _num(r.speedup_vs_best_peer, 2),
        check,
        r.note,
    ]


def _groups(results: list[Result]) -> dict[tuple, list[Result]]:
    """Results per (shape, mode), timed ones fastest first, then the others."""
    groups: dict[tuple, list[Result]] = defaultdict(list)
    for r in results:
        groups[(tuple(r.shape), r.mode)].append(r)
    for rows in groups.values():
        rows.sort(key=lambda r: (r.time_ms is None, r.time_ms.median if r.time_ms else 0.0))
    return groups


def _title(rows: list[Result], mode: str) -> str:
    what = "forward pass" if mode == "forward" else "train step (forward + backward + Adam)"
    return f"{rows[0].shape}: {what}"


def summary(results: list[Result]) -> list[str]:
    """Per shape and mode: the swept workload's reference target (the first of its
    methods that built, noted `reference`) against each peer, as the peer's time over
    rnnlab's (> 1: rnnlab is faster), and the time of the LSTM's matmuls alone when
    they were timed."""
    lines = []
    for (_, mode), rows in _groups(results).items():
        reference = next(  # the swept workload's: its targets come before the extra workloads'
            (r for r in results if r.kind == "rnnlab" and r.shape == rows[0].shape and r.mode == mode
             and r.note == "reference"),
            None,
        )
        if reference is None or not reference.time_ms:
            continue
        peers = [r for r in rows if r.kind == "peer" and r.time_ms]
        ratios = ", ".join(f"{p.target.split('/')[1]} {p.time_ms.median / reference.time_ms.median:.2f}x" for p in peers)
        if not peers:
            versus = "no peers timed"
        elif reference.target.split("/")[0] == "lstm":
            versus = f"speed vs peers (peer time / rnnlab time): {ratios}"
        else:  # the peers run a plain LSTM, not the swept workload
            versus = f"time of the LSTM peers / this time (not the same work): {ratios}"
        floor = next((r for r in rows if r.kind == "floor" and r.time_ms), None)
        floor_text = f"; the LSTM's matmuls alone {_ms(floor.time_ms.median)} ms" if floor else ""
        lines.append(f"{rows[0].shape} {mode}: {reference.target} {_ms(reference.time_ms.median)} ms; {versus}{floor_text}")
    return lines


def text_table(results: list[Result]) -> str:
    """Fixed-width tables, one per shape and mode, then the summary."""
    blocks = []
    for (_, mode), rows in _groups(results).items():
        table = [list(COLUMNS)] + [_row(r) for r in rows]
        widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS) - 1)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1] for line in table]
        blocks.append(_title(rows, mode) + "\n" + "\n".join(line.rstrip() for line in lines))
    return "\n\n".join(blocks + ["\n".join(summary(results))])


def markdown_tables(results: list[Result]) -> str:
    blocks = []
    for (_, mode), rows in _groups(results).items():
        lines = [f"### {_title(rows, mode)}", "", "| " + " | ".join(COLUMNS) + " |",
                 "|" + "|".join("---" for _ in COLUMNS) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "/") for cell in _row(r)) + " |" for r in rows]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def markdown_report(payload: dict[str, Any], results: list[Result], plots: list[str]) -> str:
    env = payload["environment"]
    lines = [
        "# rnnlab unroll benchmark",
        "",
    ]
    if not payload["complete"]:
        lines += ["**Incomplete: written after a shape of a run still in progress (or stopped).**", ""]
    lines += [
        f"Backend `{env['backend']}` ({env['processor']}, {env['cpu_count']} cores), jax {env['jax']}, "
        f"flax {env['flax']}, haiku {env['haiku']}, torch {env['torch']}. "
        f"Load average at start {env['load_average_start'][0]:.1f}, at end {env['load_average_end'][0]:.1f} "
        "(a shared machine: compare rows of one table, which were timed interleaved). "
        + ("Freed host memory reused (`rnnlab.host_memory`)." if env.get("host_memory_reused")
           else "Host memory allocator as the system sets it."),
        "",
        "Times are per call: median over all timed calls, min-max and interquartile range; "
        "compile is trace + lower + XLA compile of the first call, reported apart. "
        "GFLOP/s counts the matmul FLOPs of the recurrent work (forward `2·B·T·Σ K·N` over "
        "the cell's `[K, N]` weights; a train step 3x that, 2x for the input kernels, whose input needs "
        "no gradient); `% peak` is against the "
        "float32 matmul timed in the same rounds (its best call); `x best peer` > 1 is faster than the fastest peer. "
        "`peak/memory` is the memory-bandwidth reference (`a*x+y`, its best call, GB/s in the note): the "
        "limit of elementwise work such as a linear recurrence's scan. `floor/lstm_matmuls` runs only the "
        "matmuls of an LSTM of the shape, chained as the recurrence chains them: no LSTM compiled for this "
        "backend takes less.",
        "",
        "Config: `" + json.dumps(payload["config"], sort_keys=True) + "`",
        "",
        "## Summary",
        "",
    ] + [f"- {line}" for line in summary(results)] + [
        "",
        "## Tables",
        "",
        markdown_tables(results),
    ]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def write_plots(results: list[Result], workdir: str) -> list[str]:
    """`time_forward.png`, `time_train.png` (median time vs T, log-log, min-max bars) and
    `compile.png` (compile seconds vs T, log y). Returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    timed = [r for r in results if r.time_ms and r.kind != "peak"]
    for mode in sorted({r.mode for r in timed}):
        fig, ax = plt.subplots(figsize=(8, 5))
        colors = _colors(r.target for r in timed)
        for target in dict.fromkeys(r.target for r in timed if r.mode == mode):
            rows = sorted((r for r in timed if r.mode == mode and r.target == target), key=lambda r: r.shape.seq_len)
            medians = [r.time_ms.median for r in rows]
            spread = [[m - r.time_ms.min for m, r in zip(medians, rows)], [r.time_ms.max - m for m, r in zip(medians, rows)]]
            ax.errorbar([r.shape.seq_len for r in rows], medians, yerr=spread, marker="o", capsize=3,
                        color=colors[target], label=target)
        _finish(ax, "sequence length T", "time per call (ms)", f"{mode}: median time vs T (bars: min-max)", loglog=True)
        name = f"time_{mode}.png"
        fig.savefig(os.path.join(workdir, name), dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(name)
    compiled = [r for r in results if r.compile_s is not None and r.kind not in ("peak", "floor")]
    if compiled:
        fig, ax = plt.subplots(figsize=(8, 5))
        colors = _colors(r.target for r in compiled)
        for (target, mode), points in _compile_series(compiled).items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", color=colors[target], linestyle="-" if mode == "train" else "--",
                    label=f"{target} [{mode}]")
        _finish(ax, "sequence length T", "compile time (s)", "compile time vs T (solid: train, dashed: forward)",
                loglog=True)
        fig.savefig(os.path.join(workdir, "compile.png"), dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append("compile.png")
    return written


def _colors(targets) -> dict[str, Any]:
    """One colour per target, the same in every plot of a run."""
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(targets))
    cmap = plt.get_cmap("tab20")
    return {name: cmap(index % cmap.N) for index, name in enumerate(names)}


def _compile_series(results: list[Result]) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(T, compile seconds) points per (target, mode), in increasing T."""
    series: dict = defaultdict(list)
    for r in sorted(results, key=lambda r: r.shape.seq_len):
        series[(r.target, r.mode)].append((r.shape.seq_len, r.compile_s))
    return series


def _finish(ax, xlabel: str, ylabel: str, title: str, loglog: bool) -> None:
    if loglog:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def write_outputs(payload: dict[str, Any], results: list[Result], workdir: str, plots: bool) -> dict[str, str]:
    """Writes `results.json`, the plots and `report.md` into `workdir`; returns their paths."""
    os.makedirs(workdir, exist_ok=True)
    paths = {"results": os.path.join(workdir, "results.json"), "report": os.path.join(workdir, "report.md")}
    with open(paths["results"], "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
    names = write_plots(results, workdir) if plots else []
    with open(paths["report"], "w") as f:
        f.write(markdown_report(payload, results, names))
    paths.update({name: os.path.join(workdir, name) for name in names})
    return paths
