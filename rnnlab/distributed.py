"""Data-parallel training over several processes (hosts), and the helpers that put
each process's share of a batch on its own devices.

One process, any number of local devices (a GPU node, or CPU devices forced with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`): nothing to call. The mesh of
`rnnlab.train` spans `jax.devices()`; the batch is split along its "data" axis.

Several processes (one per host, each driving its local devices): every process calls

    rnnlab.distributed.initialize(coordinator_address="host0:1234", num_processes=N, process_id=i)

before anything touches a device (creating an array, `jax.devices()`, a jitted call).
Then `jax.devices()` lists the devices of all processes, the same mesh spans them, and
each jitted step runs as one program over all of them (the gradient all-reduce crosses
hosts). Every process runs the same Python program on the same config.

Where the data comes from. `rnnlab.train` keeps the whole (small) training set on
every device and gathers each step's batch inside `jit`; the batch is constrained to
be split along "data", so each device gathers and computes only its own rows. With
several processes every process loads the same full dataset and `jax.device_put`
places it on its own devices (it checks that the processes agree). For data that does
not fit on a device, the batch has to come from the host instead: `process_rows` says
which rows of a global batch this process's devices hold, `batch_rows` lists the
example ids of the batch of step `n` in `rnnlab.train`'s data order, and
`process_shard` / `process_batch` turn this process's rows, read by this process
alone, into one global `jax.Array` sharded along "data"
(`jax.make_array_from_process_local_data`). On one process these are
`jax.device_put(batch, NamedSharding(mesh, P("data")))`: the same code runs
everywhere.

Decisions that must be the same on every process (stop on a signal or a time budget,
the schedule length fitted to the budget) go through `agreed_stop_reason`,
`any_process` and `broadcast_from_main`: a process that stops stepping while the
others go on leaves them waiting in the next all-reduce until JAX's heartbeat timeout
ends them all. Only process 0 should write logs and result files
(`is_main_process`); checkpoints are written by all processes together (orbax), into a
directory every host sees.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

__all__ = [
    "DATA_AXIS",
    "STOP_REASONS",
    "agreed_stop_reason",
    "any_process",
    "batch_rows",
    "batch_sharding",
    "broadcast_from_main",
    "data_mesh",
    "initialize",
    "is_main_process",
    "process_batch",
    "process_rows",
    "process_shard",
    "replicated",
    "shard_global_batch",
]

_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[^\s:\[\]]+):(\d{1,5})$")


def initialize(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    *,
    local_device_ids: Optional[Union[int, Sequence[int]]] = None,
    initialization_timeout: int = 300,
) -> bool:
    """Joins this process to a multi-process JAX run (`jax.distributed.initialize`).

    Call it once in every process, before anything touches a device. All three
    arguments None: a single-process run, nothing is done (JAX's automatic cluster
    detection for Slurm, Open MPI or Cloud TPU is not attempted; call
    `jax.distributed.initialize()` yourself for that).

    Args:
      coordinator_address: "host:port" of process 0, reachable from every process;
        process 0 listens on that port.
      num_processes: how many processes take part (usually one per host).
      process_id: this process's index in `[0, num_processes)`; 0 is the coordinator.
      local_device_ids: the local devices this process drives (default: all, as
        JAX decides), e.g. one process per GPU with `local_device_ids=[i]`.
      initialization_timeout: seconds to wait for all processes to connect.

    Returns:
      True when the distributed system was initialised, False for the no-op.

    Raises:
      ValueError: only some of the three arguments given, or a bad value (the
        message names what is missing or wrong).
      RuntimeError: from JAX, when called twice or after a device was used.
    """
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    missing = [name for name, value in given.items() if value is None]
    if len(missing) == len(given):
        return False
    if missing:
        raise ValueError(
            f"a multi-process run needs coordinator_address, num_processes and process_id together; "
            f"missing {', '.join(missing)} (given: "
            f"{', '.join(f'{name}={value!r}' for name, value in given.items() if value is not None)})."
        )
    if not isinstance(coordinator_address, str) or not _ADDRESS.match(coordinator_address.strip()):
        raise ValueError(f"coordinator_address must be 'host:port' (e.g. '10.0.0.1:1234'), got {coordinator_address!r}.")
    if isinstance(num_processes, bool) or not isinstance(num_processes, (int, np.integer)) or num_processes < 1:
        raise ValueError(f"num_processes must be a positive integer, got {num_processes!r}.")
    if (isinstance(process_id, bool) or not isinstance(process_id, (int, np.integer))
            or not 0 <= process_id < num_processes):
        raise ValueError(f"process_id must be an integer in [0, num_processes={num_processes}), got {process_id!r}.")
    port = int(coordinator_address.strip().rsplit(":", 1)[1])
    if not 0 < port < 65536:
        raise ValueError(f"coordinator_address has an invalid port {port}.")
    jax.distributed.initialize(
        coordinator_address=coordinator_address.strip(),
        num_processes=int(num_processes),
        process_id=int(process_id),
        local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout,
    )
    return True


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes logs and result files."""
    return jax.process_index() == 0


def data_mesh() -> Mesh:
    """A one-axis mesh `("data",)` over all devices of all processes (`jax.devices()`
    lists them grouped by process, so each process's rows of a batch are contiguous)."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Optional[Mesh] = None) -> NamedSharding:
    """Split along the leading (batch) axis over the mesh's "data" axis."""
    return NamedSharding(mesh or data_mesh(), PartitionSpec(DATA_AXIS))


def replicated(mesh: Optional[Mesh] = None) -> NamedSharding:
    """A full copy on every device of the mesh."""
    return NamedSharding(mesh or data_mesh(), PartitionSpec())


def _check_batch_size(batch_size: int, mesh: Mesh) -> None:
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1 or batch_size % mesh.size:
        raise ValueError(f"the batch size ({batch_size}) must be a positive multiple of the device count ({mesh.size}).")


def process_rows(batch_size: int, mesh: Optional[Mesh] = None) -> slice:
    """The rows `[start, stop)` of a global batch of `batch_size` rows that the devices
    of this process hold when the batch is split along "data".

    On one process: `slice(0, batch_size)`. Raises `ValueError` when `batch_size` does
    not divide by the device count, or when the mesh orders devices so that this
    process's rows are not contiguous (build it from `jax.devices()`).
    """
    mesh = mesh or data_mesh()
    _check_batch_size(batch_size, mesh)
    indices = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
    spans = sorted({index[0].indices(batch_size)[:2] for index in indices.values()})
    if not spans:
        raise ValueError("this process has no device in the mesh.")
    start, stop = spans[0][0], spans[-1][1]
    if sum(end - begin for begin, end in spans) != stop - start:
        raise ValueError(
            f"the devices of process {jax.process_index()} hold the non-contiguous rows {spans} of a batch; "
            "build the mesh from jax.devices(), which groups devices by process."
        )
    return slice(start, stop)


def process_shard(local_data: Any, mesh: Optional[Mesh] = None, batch_size: Optional[int] = None) -> Any:
    """Turns this process's rows of a batch into global arrays split along "data".

    Args:
      local_data: pytree of host arrays `[b, ...]`, rows `process_rows(batch_size)` of
        the global batch (on one process: the whole batch, `b == batch_size`).
      mesh: the device mesh (default: `data_mesh()`).
      batch_size: the global batch size `B`; default `b * processes`, i.e. every
        process feeds as many rows as it has devices in the mesh.

    Returns:
      The same pytree of `jax.Array`s `[B, ...]` with `NamedSharding(mesh, P("data"))`;
      each device holds `B / mesh.size` rows, and nothing crossed a host boundary.
    """
    mesh = mesh or data_mesh()
    sharding = batch_sharding(mesh)
    leaves = jax.tree.leaves(local_data)
    if not leaves:
        return local_data
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"every array of a batch must share one leading batch axis, got sizes {sizes}.")
    local_rows = sizes.pop()
    local_devices = sum(1 for device in mesh.devices.flat if device.process_index == jax.process_index())
    if batch_size is None:
        if not local_devices or local_rows % local_devices:
            raise ValueError(
                f"this process holds {local_rows} rows for its {local_devices} devices of the mesh; "
                "each device needs the same number of rows."
            )
        batch_size = local_rows // local_devices * mesh.size
    rows = process_rows(batch_size, mesh)
    if local_rows != rows.stop - rows.start:
        raise ValueError(
            f"process {jax.process_index()} must feed rows [{rows.start}, {rows.stop}) of the batch of {batch_size} "
            f"({rows.stop - rows.start} rows), got {local_rows}."
        )
    return jax.tree.map(
        lambda leaf: jax.make_array_from_process_local_data(sharding, np.asarray(leaf), (batch_size, *np.shape(leaf)[1:])),
        local_data,
    )


def shard_global_batch(batch: Any, mesh: Optional[Mesh] = None) -> Any:
    """`process_shard` for a batch every process holds in full: each process puts only
    its own rows on its own devices. On one process: `device_put` along "data"."""
    batch_size = {np.shape(leaf)[0] for leaf in jax.tree.leaves(batch)}
    if len(batch_size) != 1:
        raise ValueError(f"every array of a batch must share one leading batch axis, got sizes {batch_size}.")
    (batch_size,) = batch_size
    rows = process_rows(batch_size, mesh)
    return process_shard(jax.tree.map(lambda leaf: np.asarray(leaf)[rows], batch), mesh, batch_size)


def batch_rows(step: int, *, num_rows: int, batch_size: int, seed: int, shuffle: bool) -> np.ndarray:
    """The example ids (int `[batch_size]`) of the batch of step `step` (0-based) in
    `rnnlab.train`'s data order for `num_rows` examples: the epoch's permutation of
    `(seed, epoch)` when `shuffle`, else consecutive rows. Every process computes the
    same ids without talking to the others."""
    if batch_size < 1 or num_rows < batch_size:
        raise ValueError(f"need 1 <= batch_size ({batch_size}) <= num_rows ({num_rows}).")
    from rnnlab.train import _epoch_permutation  # the order train.py uses; lazily, no cycle

    epoch, index = divmod(int(step), num_rows // batch_size)
    start = index * batch_size
    if not shuffle:
        return np.arange(start, start + batch_size)
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        permutation = np.asarray(jax.jit(_epoch_permutation, static_argnums=(0, 2))(seed, epoch, num_rows))
    return permutation[start:start + batch_size]


def process_batch(
    data: Union[Any, Callable[[np.ndarray], Any]],
    step: int,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool,
    num_rows: Optional[int] = None,
    mesh: Optional[Mesh] = None,
) -> Any:
    """Batch `step` of `rnnlab.train`'s data order as global arrays split along "data",
    each process reading only the rows its devices hold.

    Args:
      data: a pytree of host arrays `[N, ...]`, or a function `ids -> pytree [len(ids), ...]`
        that reads the given examples (e.g. from this host's files).
      step: the 0-based step.
      batch_size, seed, shuffle: as in the training config.
      num_rows: `N`; required when `data` is a function.
      mesh: the device mesh (default: `data_mesh()`).
    """
    if callable(data):
        if num_rows is None:
            raise ValueError("process_batch: give num_rows when data is a function.")
        load = data
    else:
        sizes = {np.shape(leaf)[0] for leaf in jax.tree.leaves(data)}
        if len(sizes) != 1:
            raise ValueError(f"every array of the data must share one leading example axis, got sizes {sizes}.")
        num_rows = sizes.pop() if num_rows is None else num_rows
        load = lambda ids: jax.tree.map(lambda leaf: np.asarray(leaf)[ids], data)  # noqa: E731
    ids = batch_rows(step, num_rows=num_rows, batch_size=batch_size, seed=seed, shuffle=shuffle)
    return process_shard(load(ids[process_rows(batch_size, mesh)]), mesh, batch_size)


def any_process(flag: bool) -> bool:
    """True when `flag` is true on at least one process (a collective: every process
    must call it at the same point). On one process: `flag`, with no communication."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(bool(flag)))))


STOP_REASONS = ("done", "time_budget", "SIGTERM", "SIGINT")  # weakest first


def agreed_stop_reason(reason: str) -> str:
    """The strongest of the processes' stop reasons, one of `STOP_REASONS` ("done": go
    on), so that all processes stop at the same step and for the same reason (a
    collective). On one process: `reason`, with no communication."""
    if reason not in STOP_REASONS:
        raise ValueError(f"unknown stop reason {reason!r}; expected one of {STOP_REASONS}.")
    if jax.process_count() == 1:
        return reason
    from jax.experimental import multihost_utils

    codes = multihost_utils.process_allgather(np.asarray(STOP_REASONS.index(reason), np.int32))
    return STOP_REASONS[int(np.max(codes))]


def broadcast_from_main(value: Any) -> Any:
    """Process 0's `value` (a pytree of numbers or arrays) on every process (a
    collective). On one process: `value` unchanged."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(value))
