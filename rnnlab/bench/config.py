"""What a benchmark run measures: `BenchConfig`, shapes and target specifications.

A *target* is one thing timed: an rnnlab workload run with one unroll method
(`"lstm/scan:unroll=4"`), a peer implementation (`"peer/flax_optimized_lstm"`), or the
matmul peak reference. Each is timed in two *modes*: `"forward"` (the unroll alone)
and `"train"` (forward + backward + Adam of a one-layer RNN classifier).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

MODES = ("forward", "train")
PEERS = ("flax_lstm", "flax_optimized_lstm", "haiku_lstm", "keras_lstm", "torch_lstm")
VARIANTS = ("lengths", "bidirectional")
UNROLL_OPTIONS = ("unroll", "hoist", "remat", "time_major", "block_size", "fused")
INTEGER_OPTIONS = ("unroll", "block_size")


class Shape(NamedTuple):
    """One problem size: batch `B`, sequence length `T`, input size `I`, width `H`."""

    batch_size: int
    seq_len: int
    input_size: int
    num_units: int

    @classmethod
    def parse(cls, text: str) -> "Shape":
        """`"BxTxIxH"`, e.g. `"64x100x64x256"`."""
        parts = text.strip().lower().split("x")
        if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"a shape is BxTxIxH with positive integers, got {text!r}.")
        return cls(*(int(p) for p in parts))

    def __str__(self) -> str:
        return f"B={self.batch_size} T={self.seq_len} I={self.input_size} H={self.num_units}"


class MethodSpec(NamedTuple):
    """An unroll method and its options, written `"scan:unroll=4,hoist=0"`.

    Attributes:
      method: `"scan"`, `"static"` or `"associative"` (`rnnlab.unroll`'s `method`).
      options: keyword arguments for `rnnlab.unroll` (`unroll`, `hoist`, `remat`,
        `fused`, `block_size`) and `time_major` (the benchmark then feeds time-major
        inputs).
    """

    method: str
    options: tuple[tuple[str, Any], ...]

    @classmethod
    def parse(cls, text: str) -> "MethodSpec":
        method, _, rest = text.strip().partition(":")
        if method not in ("scan", "static", "associative"):
            raise ValueError(
                f"unknown unroll method {method!r} in {text!r}; methods are scan, static and associative, "
                "options follow a colon (scan:unroll=4,hoist=0)."
            )
        options = []
        for item in filter(None, rest.split(",")):
            key, _, value = item.partition("=")
            integer = key in INTEGER_OPTIONS and value.isdigit() and int(value) >= 1
            if key not in UNROLL_OPTIONS or not (integer or (key not in INTEGER_OPTIONS and value in ("0", "1"))):
                raise ValueError(
                    f"method options are {', '.join(UNROLL_OPTIONS)}, with positive integers for "
                    f"{' and '.join(INTEGER_OPTIONS)} and 0/1 for the others, written after a colon "
                    f"(scan:unroll=4,hoist=0); got {item!r} in {text!r}."
                )
            options.append((key, int(value) if key in INTEGER_OPTIONS else value == "1"))
        return cls(method, tuple(options))

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)

    def __str__(self) -> str:
        rest = ",".join(f"{k}={int(v)}" for k, v in self.options)
        return f"{self.method}:{rest}" if rest else self.method


class Workload(NamedTuple):
    """An rnnlab cell and how it is run, written `"lstm"`, `"gru+lengths"` or
    `"lstm+bidirectional"`.

    Attributes:
      cell: a name in `rnnlab.bench.workloads.CELLS`.
      variants: `"lengths"` (per-example lengths, drawn in `[T/2, T]`, and the classifier
        reads the output at `length - 1`) and/or `"bidirectional"`.
    """

    cell: str
    variants: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> "Workload":
        cell, *variants = text.strip().split("+")
        for variant in variants:
            if variant not in VARIANTS:
                raise ValueError(f"unknown variant {variant!r} in {text!r}; known: {', '.join(VARIANTS)}.")
        return cls(cell, tuple(variants))

    def __str__(self) -> str:
        return "+".join((self.cell,) + self.variants)


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()] if text else []


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """A benchmark run. List fields are comma-separated strings, as on the command line.

    Attributes:
      cell: the workload swept over every method, e.g. `"lstm"`, `"gru"`, `"ln_lstm"`,
        `"basic_rnn"`, `"min_gru"`, `"lru"`, optionally with variants (`"lstm+lengths"`).
      methods: unroll methods for `cell`; the first is the reference every other is
        checked against, e.g. `"scan,scan:unroll=4,static,associative"`; a method's
        options follow it, comma-separated (`"scan,scan:fused=1,hoist=1"`).
      extra: more workloads timed with the first method only (to compare cells and
        variants at equal shape), e.g. `"gru,ln_lstm,lstm+bidirectional"`.
      peers: peer implementations (`PEERS`); `""` for none.
      modes: `"forward"`, `"train"` or both.
      batch_size, input_size, num_units, seq_lengths: the swept shapes.
      shapes: `"BxTxIxH,..."`; when set it replaces the sweep above.
      num_classes: classes of the classifier head.
      rounds: timing rounds; every target is timed `calls` times in each round, the
        targets taking turns (interleaved), so load on a shared machine hits all alike.
      calls: timed calls per target and round.
      warmup: untimed calls per target after the first (compiling) one.
      static_compile_budget_s: `static` is skipped at a length whose compile time,
        extrapolated from the shorter lengths of this run, would exceed this.
      static_max_seq_len: `static` is skipped above this length (0: no limit).
      rtol, atol: tolerances of the output check against the reference method.
      peak_matmul_size: `N` of the `N x N` float32 matmul timed as the peak reference.
      peak_bandwidth_mib: MiB per vector of the `a*x+y` timed as the memory-bandwidth
        reference (0: not timed).
      matmul_floor: when an LSTM is timed (a workload or a peer), also time
        `floor/lstm_matmuls`, only the matmuls of an LSTM of
        each shape, chained as the recurrence chains them: the least any LSTM
        compiled for this backend spends on them (rnnlab's, Flax's, Haiku's).
      seed: seeds parameters and data.
      plots: write the PNG plots.
      torch_threads: `torch.set_num_threads` for the PyTorch peer; 0 means
        `os.cpu_count()`.
    """

    cell: str = "lstm"
    methods: str = (
        "scan,scan:hoist=0,scan:hoist=1,scan:fused=0,scan:unroll=2,scan:unroll=4,static,"
        "associative,associative:block_size=1"
    )
    extra: str = ""
    peers: str = ",".join(PEERS)
    modes: str = ",".join(MODES)
    batch_size: int = 64
    input_size: int = 64
    num_units: int = 256
    seq_lengths: str = "28,100,300,1000"
    shapes: str = ""
    num_classes: int = 10
    rounds: int = 3
    calls: int = 2
    warmup: int = 1
    static_compile_budget_s: float = 60.0
    static_max_seq_len: int = 0
    rtol: float = 1e-4
    atol: float = 1e-5
    peak_matmul_size: int = 2048
    peak_bandwidth_mib: int = 64
    matmul_floor: bool = True
    seed: int = 0
    plots: bool = True
    torch_threads: int = 0

    def __post_init__(self) -> None:
        """Parses every list field once, so that a bad value fails here."""
        from rnnlab.bench.workloads import CELLS  # (workloads imports this module)

        _ = (self.workload, self.method_specs, self.extra_workloads, self.shape_list)
        for workload in [self.workload] + self.extra_workloads:
            if workload.cell not in CELLS:
                raise ValueError(f"unknown cell {workload.cell!r} in {workload}; cells are {', '.join(CELLS)}.")
        for mode in self.mode_list:
            if mode not in MODES:
                raise ValueError(f"unknown mode {mode!r}; modes are {', '.join(MODES)}.")
        for peer in self.peer_list:
            if peer not in PEERS:
                raise ValueError(f"unknown peer {peer!r}; peers are {', '.join(PEERS)}.")
        if not self.method_specs:
            raise ValueError("methods must name at least one unroll method.")
        if not self.mode_list:
            raise ValueError(f"modes must name at least one of {', '.join(MODES)}.")
        for name, items in (
            ("methods", [str(m) for m in self.method_specs]),
            ("cell and extra", [str(w) for w in [self.workload] + self.extra_workloads]),
            ("peers", self.peer_list),
            ("modes", self.mode_list),
        ):
            repeated = sorted({item for item in items if items.count(item) > 1})
            if repeated:
                raise ValueError(f"{name} name {', '.join(repeated)} more than once.")
        if not self.shapes:
            for name in ("batch_size", "input_size", "num_units"):
                if getattr(self, name) < 1:
                    raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("rtol", "atol", "static_max_seq_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if not self.static_compile_budget_s > 0:
            raise ValueError(f"static_compile_budget_s must be > 0, got {self.static_compile_budget_s}.")
        for name in ("rounds", "calls", "num_classes", "peak_matmul_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("warmup", "peak_bandwidth_mib"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if not self.shape_list:
            raise ValueError("no shapes: set seq_lengths or shapes.")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads must be >= 0, got {self.torch_threads}.")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "BenchConfig":
        """A config from a flat dict (e.g. an `ml_collections.ConfigDict.to_dict()`);
        unknown keys raise `ValueError`."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"unknown bench config fields: {', '.join(unknown)}.")
        return cls(**{key: _as_field(value) for key, value in values.items()})

    @property
    def workload(self) -> Workload:
        return Workload.parse(self.cell)

    @property
    def method_specs(self) -> list[MethodSpec]:
        return [MethodSpec.parse(m) for m in _split_methods(self.methods)]

    @property
    def extra_workloads(self) -> list[Workload]:
        return [Workload.parse(w) for w in _split(self.extra)]

    @property
    def peer_list(self) -> list[str]:
        return _split(self.peers)

    @property
    def mode_list(self) -> list[str]:
        return _split(self.modes)

    @property
    def shape_list(self) -> list[Shape]:
        if self.shapes:
            return [Shape.parse(s) for s in _split(self.shapes)]
        lengths = []
        for text in _split(self.seq_lengths):
            if not text.isdigit() or int(text) < 1:
                raise ValueError(f"seq_lengths are positive integers, got {text!r}.")
            lengths.append(int(text))
        return [Shape(self.batch_size, t, self.input_size, self.num_units) for t in lengths]


def _split_methods(text: str) -> list[str]:
    """Like `_split`, but an item `key=value` continues the method before it, so that
    `"scan,scan:fused=1,hoist=1"` is two methods, the second with two options."""
    methods: list[str] = []
    for item in _split(text):
        if methods and ":" not in item and "=" in item:
            methods[-1] += "," + item
        else:
            methods.append(item)
    return methods


def _as_field(value: Any) -> Any:
    """Config values as the dataclass stores them (tuples/lists become comma strings)."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return value


def target_name(workload: Workload, method: Optional[MethodSpec]) -> str:
    """`"lstm/scan:unroll=4"` for rnnlab targets."""
    return f"{workload}/{method}"
