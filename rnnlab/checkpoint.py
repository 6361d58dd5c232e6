"""Checkpoints of a training run: orbax's `CheckpointManager` over `workdir/checkpoints`.

Each checkpoint is a directory named by its step holding two items: "state", the
training state pytree (params, optimiser state, step, PRNG key, carry), and "meta", a
small JSON dict describing the data position (epoch, batch size, number of rows) so
that a resume with different data is refused. Orbax writes to a temporary directory
and renames it when complete, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the run (one-line message)."""


class Checkpointer:
    """Saves and restores the training state of one workdir.

    Args:
      workdir: the run's directory; checkpoints go to `workdir/checkpoints`.
      keep: how many of the newest checkpoints to keep.
      must_exist: open an existing directory without creating anything (for resuming,
        evaluation and sampling); raises `CheckpointError` when it does not exist.
    """

    def __init__(self, workdir: str, keep: int = 3, must_exist: bool = False):
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
        if must_exist and not os.path.isdir(self.directory):
            raise CheckpointError(f"no checkpoint in {self.directory} (the directory does not exist).")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not must_exist)
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> Optional[int]:
        """The step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Saves `state` (a pytree of arrays) and `meta` (JSON-able) as checkpoint `step`.

        Writing continues in the background; `close` waits for it.
        """
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict[str, Any]]:
        """Restores checkpoint `step` (default: the newest) into the structure, shapes,
        dtypes and shardings of `abstract_state` (a pytree of `jax.ShapeDtypeStruct`).

        Returns:
          `(state, meta)`.
        Raises:
          CheckpointError: no checkpoint, or one that cannot be read into that structure.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}.")
        # Checked before orbax reads anything: a failed read leaves its asynchronous
        # reads to die on a closed event loop, printing tracebacks to stderr.
        mismatch = self._mismatch(step, abstract_state)
        if mismatch:
            raise CheckpointError(
                f"the checkpoint of step {step} in {self.directory} does not match the model: {mismatch} "
                "(was it trained with another config?)"
            )
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as error:  # orbax raises many types for damaged or foreign files
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            reason = reason.split(" See full TensorStore details")[0]  # then a repr of a bound method
            older = [other for other in self._manager.all_steps() if other < step]
            recovery = (f"; to use step {max(older)}, delete {os.path.join(self.directory, str(step))}"
                        if older else "")
            raise CheckpointError(
                f"cannot restore the checkpoint of step {step} in {self.directory}: {reason}{recovery}"
            ) from error
        return restored["state"], dict(restored["meta"])

    def _mismatch(self, step: int, abstract_state: Any) -> str:
        """How the arrays stored in checkpoint `step` differ from `abstract_state`'s
        (names, stored vs requested shapes), or "" when they match or the checkpoint's
        metadata cannot be read (then `restore` reports what it finds)."""
        try:
            stored_tree = self._manager.item_metadata(step)["state"].tree
        except Exception:  # damaged or foreign metadata: left to restore's error
            return ""
        stored = _shapes(stored_tree)
        requested = _shapes(ocp.tree.serialize_tree(abstract_state, keep_empty_nodes=True))
        if not stored:
            return ""
        problems = []
        missing = sorted(set(requested) - set(stored), key=_params_first)
        unexpected = sorted(set(stored) - set(requested), key=_params_first)
        if missing:
            problems.append(f"the model has {_count(missing)} the checkpoint lacks ({_names(missing)})")
        if unexpected:
            problems.append(f"the checkpoint has {_count(unexpected)} the model lacks ({_names(unexpected)})")
        shapes = [f"{name} stored {stored[name]}, requested {requested[name]}"
                  for name in sorted(set(stored) & set(requested), key=_params_first) if tuple(stored[name]) != tuple(requested[name])]
        if shapes:
            problems.append(f"{_count(shapes)} differ in shape: {'; '.join(shapes[:4])}"
                            + (f"; and {len(shapes) - 4} more" if len(shapes) > 4 else ""))
        return "; ".join(problems)

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """`{"params.embed": shape, ...}` for the array leaves of a nested dict/list tree."""
    return {".".join(str(key) for key in path): tuple(leaf.shape)
            for path, leaf in ocp.tree.to_flat_dict(tree).items() if hasattr(leaf, "shape")}


def _params_first(name: str) -> tuple[bool, str]:
    """Sort key: the model's params before the optimiser state that mirrors them."""
    return (not name.startswith("params."), name)


def _count(items: list[str]) -> str:
    return f"{len(items)} array" + ("" if len(items) == 1 else "s")


def _names(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f", and {len(names) - shown} more" if len(names) > shown else "")


def abstract_like(tree: Any) -> Any:
    """`tree` with every array replaced by a `jax.ShapeDtypeStruct` (sharding kept)."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
