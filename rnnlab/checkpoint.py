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
        self._manager = ocp.CheckpointManager(self.directory, options=options)

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
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as error:  # orbax raises many types for damaged or foreign files
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(
                f"cannot restore the checkpoint of step {step} in {self.directory}: {reason}"
            ) from error
        return restored["state"], dict(restored["meta"])

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any) -> Any:
    """`tree` with every array replaced by a `jax.ShapeDtypeStruct` (sharding kept)."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
