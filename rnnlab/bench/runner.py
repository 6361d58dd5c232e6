"""Runs a benchmark: builds every target for each shape, checks its outputs against the
reference, times all checked targets interleaved, and collects one `Result` per
(shape, target, mode)."""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import math
import os
import platform
from typing import Any, Callable, Optional

import jax
import numpy as np

import rnnlab
from rnnlab.bench import workloads
from rnnlab.bench.config import BenchConfig, MethodSpec, Shape, Workload, target_name
from rnnlab.bench.timing import Program, Stats, time_interleaved
from rnnlab.cells.base import Params, RNNCell

PEAK_TARGET = "peak/matmul"
BANDWIDTH_TARGET = "peak/memory"
FLOOR_TARGET = "floor/lstm_matmuls"
STATIC_MIN_EXPONENT = 1.0  # static compile time grows at least linearly in T
STATIC_MAX_EXPONENT = 3.0
STATIC_PROBE_LEN = 16  # a first static length above this is predicted from a compile at this length


@dataclasses.dataclass
class Result:
    """One target at one shape in one mode. `status` is `"ok"` (timed), `"skipped"`
    (not applicable, a missing peer, over the static compile budget), `"mismatch"`
    (outputs differ from the reference; not timed) or `"error"`; `note` says why."""

    target: str
    kind: str  # "rnnlab", "peer", "peak" or "floor"
    label: str
    mode: str
    shape: Shape
    status: str = "ok"
    note: str = ""
    compile_s: Optional[float] = None
    first_call_s: Optional[float] = None
    time_ms: Optional[Stats] = None
    flops: Optional[float] = None
    gflops: Optional[float] = None
    bytes_moved: Optional[float] = None
    gbytes_per_s: Optional[float] = None
    fraction_of_peak: Optional[float] = None
    speedup_vs_best_peer: Optional[float] = None
    check: Optional[dict[str, Any]] = None

    def to_json(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["shape"] = self.shape._asdict()
        record["time_ms"] = self.time_ms._asdict() if self.time_ms else None
        return record


def compare(outputs: dict, reference: dict, reference_name: str, rtol: float, atol: float) -> dict[str, Any]:
    """Checks the arrays both dicts have (`np.allclose` leaf by leaf, same shapes)."""
    keys = sorted(set(outputs) & set(reference))
    max_abs_diff, passed = 0.0, bool(keys)
    for key in keys:
        leaves, ref_leaves = jax.tree.leaves(outputs[key]), jax.tree.leaves(reference[key])
        if len(leaves) != len(ref_leaves):
            return {"reference": reference_name, "compared": keys, "max_abs_diff": None, "passed": False}
        for a, b in zip(leaves, ref_leaves):
            if a.shape != b.shape:
                return {"reference": reference_name, "compared": keys, "max_abs_diff": None, "passed": False}
            if a.size:
                max_abs_diff = max(max_abs_diff, float(np.max(np.abs(a - b))))
            passed = passed and bool(np.allclose(a, b, rtol=rtol, atol=atol))
    return {"reference": reference_name, "compared": keys, "max_abs_diff": max_abs_diff, "passed": passed}


def predict_static_compile(history: list[tuple[int, float]], seq_len: int) -> Optional[float]:
    """Extrapolates `static`'s compile time to `seq_len` from shorter lengths.

    With two or more points, the growth exponent of the last two (clamped to
    `[STATIC_MIN_EXPONENT, STATIC_MAX_EXPONENT]`); with one, linear growth.
    """
    if not history:
        return None
    t_last, c_last = history[-1]
    exponent = STATIC_MIN_EXPONENT
    if len(history) >= 2:
        t_prev, c_prev = history[-2]
        if t_last > t_prev and c_prev > 0 and c_last > 0:
            exponent = math.log(c_last / c_prev) / math.log(t_last / t_prev)
            exponent = min(max(exponent, STATIC_MIN_EXPONENT), STATIC_MAX_EXPONENT)
    return c_last * (seq_len / t_last) ** exponent


def environment() -> dict[str, Any]:
    """Versions and machine facts for the report (load average: the machine is shared)."""
    import flax
    import optax

    env = {
        "rnnlab": os.path.dirname(os.path.abspath(rnnlab.__file__)),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "python": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "host_memory_reused": rnnlab.host_memory.freed_memory_reused(),
        "load_average_start": list(os.getloadavg()),
    }
    for module, distribution in (("haiku", "dm-haiku"), ("torch", "torch")):
        try:  # the installed version, without paying for the import
            env[module] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            env[module] = None
    return env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


class _ShapeRun:
    """The targets of one shape: built and checked, then timed together."""

    def __init__(self, config: BenchConfig, shape: Shape, log: Callable[[str], None]):
        self.config, self.shape, self.log = config, shape, log
        self.data = workloads.make_data(shape, config.num_classes, config.seed)
        self.results: list[Result] = []
        self.programs: dict[tuple[str, str], Program] = {}

    def add(self, result: Result, build: Callable[[], Program], reference: Optional[tuple[str, dict]]) -> Optional[Program]:
        """Builds a target, checks it against `reference` (name, outputs), keeps it for
        timing if it passes, and records the result."""
        self.results.append(result)
        try:
            program = build()
        except ImportError as error:
            result.status, result.note = "skipped", f"not installed: {error}"
            return None
        except Exception as error:  # a failing target is reported, the others still run
            result.status, result.note = "error", f"{type(error).__name__}: {_first_line(error)}"
            return None
        result.compile_s, result.first_call_s = program.compile_s, program.first_call_s
        if reference is not None:
            result.check = compare(program.outputs, reference[1], reference[0], self.config.rtol, self.config.atol)
            if not result.check["passed"]:
                result.status = "mismatch"
                result.note = f"outputs differ from {reference[0]} (max abs diff {result.check['max_abs_diff']})"
                return None
        self.programs[(result.target, result.mode)] = program
        self.log(f"  built {result.target} [{result.mode}] compile {_fmt(result.compile_s)} s")
        return program

    def time_all(self) -> None:
        keys = list(self.programs)
        seconds = time_interleaved(
            {f"{t}|{m}": self.programs[(t, m)] for t, m in keys},
            self.config.rounds, self.config.calls, self.config.warmup,
        )
        by_key = {(r.target, r.mode): r for r in self.results}
        for target, mode in keys:
            by_key[(target, mode)].time_ms = Stats.of(seconds[f"{target}|{mode}"])
        self.programs.clear()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def run_shapes(
    config: BenchConfig,
    log: Callable[[str], None] = print,
    after_shape: Optional[Callable[[list[Result], list[Result]], None]] = None,
) -> list[Result]:
    """Builds, checks and times every target of `config` at every shape; after each shape
    calls `after_shape(that shape's results, all results so far)`."""
    static_history: dict[tuple[str, str], list[tuple[int, float]]] = {}
    results: list[Result] = []
    for shape in config.shape_list:
        log(f"shape {shape}")
        run = _ShapeRun(config, shape, log)
        peak_program, peak_flops = workloads.peak_program(config.peak_matmul_size)
        peak = Result(PEAK_TARGET, "peak", f"{config.peak_matmul_size}^3 float32 matmul", config.mode_list[0],
                      shape, flops=peak_flops)
        run.add(peak, lambda: peak_program, None)
        if config.peak_bandwidth_mib:
            bandwidth_program, moved = workloads.bandwidth_program(config.peak_bandwidth_mib)
            bandwidth = Result(BANDWIDTH_TARGET, "peak", f"a*x+y, 3 x {config.peak_bandwidth_mib} MiB float32",
                               config.mode_list[0], shape, bytes_moved=moved)
            run.add(bandwidth, lambda: bandwidth_program, None)
        if config.matmul_floor and _times_an_lstm(config):
            _add_floor(run)
        reference = _add_rnnlab(run, config.workload, config.method_specs, static_history)
        for workload in config.extra_workloads:
            _add_rnnlab(run, workload, config.method_specs[:1], static_history)
        _add_peers(run, reference if config.workload == Workload("lstm") else None, config.workload)
        log(f"  timing {len(run.programs)} programs: {config.rounds} rounds x {config.calls} calls")
        run.time_all()
        _derive(run.results, peak)
        results.extend(run.results)
        if after_shape is not None:
            after_shape(run.results, results)
    return results


def _add_rnnlab(
    run: _ShapeRun,
    workload: Workload,
    methods: list[MethodSpec],
    static_history: dict[tuple[str, str], list[tuple[int, float]]],
) -> dict[str, tuple[str, dict]]:
    """Adds `workload` with each method; the first method that builds is the reference
    of the others. Returns the reference (name, outputs) per mode."""
    config, shape = run.config, run.shape
    references: dict[str, tuple[str, dict]] = {}
    cell, params, unavailable = None, None, ""
    try:
        cell = workloads.make_cell(workload.cell, shape.num_units)
        params = workloads.init_classifier(workload, cell, shape, config.num_classes, config.seed)
    except Exception as error:  # e.g. a cell not in rnnlab.cells yet, or lru with I != H
        cell, unavailable = None, f"{type(error).__name__}: {_first_line(error)}"
    for mode in config.mode_list:
        for method in methods:
            name = target_name(workload, method)
            result = Result(name, "rnnlab", f"rnnlab {workload} {method}", mode, shape)
            if cell is None:
                result.status, result.note = "skipped", f"cell unavailable ({unavailable})"
                run.results.append(result)
                continue
            result.flops = workloads.workload_flops(workload, params["rnn"], shape, mode)
            reason = workloads.skip_reason(cell, method)
            if not reason and method.method == "static":
                probe = functools.partial(_static_probe, run, cell, workload, method, mode, params)
                reason = _static_skip(config, name, mode, shape, static_history, probe)
            if reason:
                result.status, result.note = "skipped", reason
                run.results.append(result)
                continue
            program = run.add(
                result,
                lambda: workloads.build_program(cell, workload, method, mode, params, run.data),
                references.get(mode),
            )
            if program is None:
                continue
            if mode not in references:
                references[mode] = (name, program.outputs)
                result.note = "reference"
            if method.method == "static":
                static_history.setdefault((name, mode), []).append((shape.seq_len, program.compile_s))
    return references


def _static_skip(
    config: BenchConfig,
    name: str,
    mode: str,
    shape: Shape,
    history: dict[tuple[str, str], list[tuple[int, float]]],
    probe: Callable[[], Optional[float]],
) -> Optional[str]:
    """Why `static` is skipped at `shape`, or None. Its compile time is extrapolated
    from the lengths compiled before in this run; with none, from a compile of
    `STATIC_PROBE_LEN` steps (`probe`), so that a long first length is never compiled
    blindly."""
    if config.static_max_seq_len and shape.seq_len > config.static_max_seq_len:
        return f"static unroll above T={config.static_max_seq_len} (static_max_seq_len)"
    points = history.setdefault((name, mode), [])
    probed = ""
    if not points and shape.seq_len > STATIC_PROBE_LEN:
        compile_s = probe()
        if compile_s is not None:
            points.append((STATIC_PROBE_LEN, compile_s))
            probed = " in a probe"
    predicted = predict_static_compile(points, shape.seq_len)
    if predicted is not None and predicted > config.static_compile_budget_s:
        measured = ", ".join(f"T={t}: {c:.1f} s" for t, c in points)
        return (f"predicted compile {predicted:.0f} s > budget {config.static_compile_budget_s:.0f} s "
                f"(measured{probed} {measured})")
    return None


def _static_probe(run: _ShapeRun, cell: RNNCell, workload: Workload, method: MethodSpec, mode: str,
                  params: Params) -> Optional[float]:
    """The compile time of `static` at `STATIC_PROBE_LEN` steps of `run`'s shape, or
    None when that fails (the real build then reports the error)."""
    shape = run.shape._replace(seq_len=STATIC_PROBE_LEN)
    run.log(f"  probing {target_name(workload, method)} [{mode}]: compile at T={STATIC_PROBE_LEN}")
    try:
        data = workloads.make_data(shape, run.config.num_classes, run.config.seed)
        return workloads.compile_seconds(cell, workload, method, mode, params, data)
    except Exception:  # the build at the real length reports the error
        return None


def _times_an_lstm(config: BenchConfig) -> bool:
    """Whether an LSTM is on the table (a workload or a peer), so that the LSTM's
    matmul floor means something."""
    workloads_timed = [config.workload, *config.extra_workloads]
    return bool(config.peer_list) or any(workloads.CELLS[w.cell][0] == "lstm" for w in workloads_timed)


def _add_floor(run: _ShapeRun) -> None:
    """Adds the matmuls of an LSTM of the shape alone (`workloads.lstm_matmul_floor_program`)."""
    for mode in run.config.mode_list:
        program, flops = workloads.lstm_matmul_floor_program(run.shape, mode)
        result = Result(FLOOR_TARGET, "floor", "the LSTM's matmuls alone", mode, run.shape, flops=flops,
                        note="matmuls only")
        run.add(result, lambda: program, None)


def _add_peers(run: _ShapeRun, references: Optional[dict[str, tuple[str, dict]]], swept: Workload) -> None:
    """Adds the peers, built from the weights rnnlab's `lstm` gets from the same seed;
    they are checked against the rnnlab reference when the swept workload is that LSTM,
    and otherwise noted as unchecked (they still run a plain LSTM)."""
    from rnnlab import bench_peers

    config, shape = run.config, run.shape
    if not config.peer_list:
        return
    lstm_workload = Workload("lstm")
    cell = workloads.make_cell("lstm", shape.num_units)
    params = workloads.init_classifier(lstm_workload, cell, shape, config.num_classes, config.seed)
    weights = bench_peers.LSTMWeights(
        **{k: np.asarray(v) for k, v in params["rnn"].items()},
        forget_bias=1.0,
        head_w=np.asarray(params["head"]["w"]),
        head_b=np.asarray(params["head"]["b"]),
    )
    flops = {mode: workloads.workload_flops(lstm_workload, params["rnn"], shape, mode) for mode in config.mode_list}
    for mode in config.mode_list:
        for peer in config.peer_list:
            result = Result(f"peer/{peer}", "peer", bench_peers.PEER_LABELS[peer], mode, shape, flops=flops[mode])
            if references is None:
                result.note = f"not checked: a plain LSTM, the swept workload is {swept}"
            run.add(
                result,
                lambda: bench_peers.build_peer(peer, mode, weights, run.data.x, run.data.labels, config.torch_threads),
                references.get(mode) if references else None,
            )


def _derive(results: list[Result], peak: Result) -> None:
    """GFLOP/s (at the median time), fraction of the matmul peak, and speed relative to
    the fastest peer. The peak is the matmul's BEST call: on a shared machine its
    median would understate what the backend can do."""
    peak_gflops = peak.flops / peak.time_ms.min / 1e6 if peak.time_ms else None
    if peak_gflops:
        peak.gflops, peak.fraction_of_peak = peak_gflops, 1.0
    for r in results:
        if r.bytes_moved and r.time_ms:  # the bandwidth reference, at its best call too
            r.gbytes_per_s = r.bytes_moved / r.time_ms.min / 1e6
            r.note = f"{r.gbytes_per_s:.1f} GB/s"
    best_peer: dict[str, float] = {}
    for r in results:
        if r.kind == "peer" and r.time_ms:
            best_peer[r.mode] = min(best_peer.get(r.mode, math.inf), r.time_ms.median)
    for r in results:
        if not r.time_ms or r.kind == "peak":
            continue
        if r.flops:
            r.gflops = r.flops / r.time_ms.median / 1e6
            r.fraction_of_peak = r.gflops / peak_gflops if peak_gflops else None
        if r.mode in best_peer:
            r.speedup_vs_best_peer = best_peer[r.mode] / r.time_ms.median
