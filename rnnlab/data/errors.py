"""Where rnnlab's loaders find data, and the error they raise when they cannot.

A loader first looks in a local data directory (the `data_dir` argument, i.e. the
`--data_dir` flag, else the `RNNLAB_DATA_DIR` environment variable) and only when
neither is set falls back to TensorFlow Datasets, which needs network access the
first time a dataset is used.
"""

from __future__ import annotations

import os
import socket
import urllib.error

import numpy as np
from absl import logging

DATA_DIR_ENV = "RNNLAB_DATA_DIR"

# TFDS splits are read in chunks of this many examples and concatenated. A
# whole-split read (`batch_size=-1`) batches by `sys.maxsize` when the split size is
# unknown, as under `tfds.testing.mock_data`, which aborts TensorFlow 2.21.
_TFDS_CHUNK = 10_000


class DataError(ValueError):
    """A dataset is missing, malformed, or could not be obtained."""


def resolve_data_dir(data_dir: str | None) -> str | None:
    """The local data directory: `data_dir`, else `$RNNLAB_DATA_DIR`, else None.

    None means "no local copy: use TensorFlow Datasets". Empty strings count as unset.
    """
    return data_dir or os.environ.get(DATA_DIR_ENV) or None


def missing_path_error(path: str, layout: str) -> DataError:
    """The error for a missing file or directory `path` of a local data directory.

    Args:
      path: the path that does not exist.
      layout: the expected files relative to the data directory DIR, e.g.
        "tiny_shakespeare/input.txt".
    """
    return DataError(
        f"{path} does not exist. {_local_data_hint(layout)}, or leave both unset to "
        "download the data with TensorFlow Datasets (needs network access)."
    )


def _local_data_hint(layout: str) -> str:
    return f"Pass --data_dir DIR (or set {DATA_DIR_ENV}=DIR) where DIR holds {layout}"


def load_tfds_split(
    name: str, split: str, tfds_data_dir: str | None, layout: str
) -> dict[str, np.ndarray]:
    """Load one whole TFDS split as numpy arrays, one per feature.

    Imports TensorFlow Datasets (and, through it, TensorFlow) only when called.

    Args:
      name: the TFDS dataset name, e.g. "mnist".
      split: the TFDS split name, e.g. "train".
      tfds_data_dir: TFDS's own cache directory; None for TFDS's default.
      layout: the files a local data directory would hold instead, for the error
        message.

    Returns:
      A dict from feature name to an array whose leading axis indexes examples.

    Raises:
      DataError: TFDS is not installed, could not download the data or use its data
        directory (`tfds_data_dir`), or the split is empty.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as exc:
        raise DataError(
            f"No local data directory is set and tensorflow-datasets is not installed "
            f"({exc}). {_local_data_hint(layout)}."
        ) from None
    logging.warning(
        "No local data directory is set: reading '%s' %s through TensorFlow Datasets, which downloads it on "
        "first use (without network access that fails after TFDS's retries, a few minutes). %s to read "
        "local files.",
        name, split, _local_data_hint(layout),
    )
    try:
        dataset = tfds.load(name, split=split, batch_size=_TFDS_CHUNK, data_dir=tfds_data_dir)
        chunks = list(tfds.as_numpy(dataset))
    except (OSError, tfds.download.DownloadError) as exc:
        if _is_download_error(exc, tfds):
            raise DataError(
                f"No local data directory is set and TensorFlow Datasets could not download "
                f"'{name}' ({type(exc).__name__}: {exc}). {_local_data_hint(layout)}, "
                "or run with network access."
            ) from None
        where = f"--tfds_data_dir {tfds_data_dir}" if tfds_data_dir else "its default data directory"
        raise DataError(
            f"No local data directory is set and TensorFlow Datasets could not use {where} "
            f"for '{name}' ({type(exc).__name__}: {exc}); --tfds_data_dir must name a writable "
            f"directory. {_local_data_hint(layout)} to read local files instead."
        ) from None
    if not chunks:
        raise DataError(f"TensorFlow Datasets returned no examples for {name} split '{split}'.")
    return {key: np.concatenate([chunk[key] for chunk in chunks]) for key in chunks[0]}


def _is_download_error(exc: BaseException, tfds) -> bool:
    """Whether `exc`, raised by TFDS, is a failed download rather than a local file error."""
    network_errors: tuple[type[BaseException], ...] = (
        tfds.download.DownloadError,
        ConnectionError,
        TimeoutError,
        socket.gaierror,
        urllib.error.URLError,
    )
    try:
        import requests
    except ImportError:
        pass
    else:
        network_errors += (requests.exceptions.RequestException,)
    return isinstance(exc, network_errors)
