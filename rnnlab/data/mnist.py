"""MNIST from the four classic IDX files in `DIR/mnist/`, or from TensorFlow Datasets.

    train = load_mnist("train", data_dir="/path/to/DIR")   # images uint8 [N, 28, 28]
    x = normalise_images(train.images)                      # float32 [N, 28, 28] in [0, 1]

IDX files are parsed here with numpy; any image count in the header is accepted.
"""

from __future__ import annotations

import gzip
import os
import zlib
from typing import NamedTuple

import numpy as np

from rnnlab.data.errors import DataError, load_tfds_split, missing_path_error, resolve_data_dir

MNIST_SPLITS = ("train", "test")
# (images file, labels file) of each split, as found in DIR/mnist/.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049
IMAGE_SIZE = 28
NUM_CLASSES = 10

_LAYOUT = "mnist/" + ", mnist/".join(name for pair in IDX_FILES.values() for name in pair)


class MnistSplit(NamedTuple):
    """One MNIST split.

    Attributes:
      images: uint8 [N, 28, 28], pixel values 0..255.
      labels: int32 [N], digit classes 0..9.
    """

    images: np.ndarray
    labels: np.ndarray


def load_mnist(split: str, data_dir: str | None = None, tfds_data_dir: str | None = None) -> MnistSplit:
    """Load an MNIST split.

    Looks in `data_dir`, else in `$RNNLAB_DATA_DIR`, for `mnist/` with the IDX files
    (gzip-compressed, or uncompressed under the same name without `.gz`); with
    neither set, loads the split with TensorFlow Datasets.

    Args:
      split: "train" or "test".
      data_dir: the local data directory DIR holding `DIR/mnist/`.
      tfds_data_dir: TensorFlow Datasets' cache directory, used only without a
        local data directory.

    Returns:
      MnistSplit with images uint8 [N, 28, 28] and labels int32 [N].

    Raises:
      ValueError: unknown split.
      DataError: missing or malformed files, or TFDS could not provide the data.
    """
    if split not in MNIST_SPLITS:
        raise ValueError(f"split must be one of {MNIST_SPLITS}, got {split!r}")
    local_dir = resolve_data_dir(data_dir)
    if local_dir is None:
        return _load_tfds(split, tfds_data_dir)
    return _load_idx(os.path.join(local_dir, "mnist"), split)


def normalise_images(images: np.ndarray) -> np.ndarray:
    """Scale uint8 pixels [..., 28, 28] to float32 in [0, 1] (same shape)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixel values, got dtype {images.dtype}")
    return images.astype(np.float32) / np.float32(255)


def _load_tfds(split: str, tfds_data_dir: str | None) -> MnistSplit:
    features = load_tfds_split("mnist", split, tfds_data_dir, _LAYOUT)
    images = features["image"].reshape(-1, IMAGE_SIZE, IMAGE_SIZE).astype(np.uint8)
    return MnistSplit(images, features["label"].astype(np.int32))


def _load_idx(mnist_dir: str, split: str) -> MnistSplit:
    if not os.path.isdir(mnist_dir):
        raise missing_path_error(mnist_dir, _LAYOUT)
    image_name, label_name = IDX_FILES[split]
    image_path = _find_file(mnist_dir, image_name)
    label_path = _find_file(mnist_dir, label_name)
    images = _parse_images(_read(image_path), image_path)
    labels = _parse_labels(_read(label_path), label_path)
    if len(images) != len(labels):
        raise DataError(
            f"{image_path} holds {len(images)} images but {label_path} holds "
            f"{len(labels)} labels; expected one label per image."
        )
    return MnistSplit(images, labels)


def _find_file(mnist_dir: str, gz_name: str) -> str:
    """The path of `gz_name` in `mnist_dir`, or of its uncompressed twin."""
    gz_path = os.path.join(mnist_dir, gz_name)
    plain_path = gz_path[: -len(".gz")]
    for path in (gz_path, plain_path):
        if os.path.isfile(path):
            return path
    raise missing_path_error(f"{gz_path} (or uncompressed {plain_path})", _LAYOUT)


def _read(path: str) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read it ({type(exc).__name__}: {exc}).") from None


def _parse_header(data: bytes, path: str, magic: int, num_dims: int, kind: str) -> tuple[int, ...]:
    """Check the magic number and return the dimension sizes of an IDX file."""
    header_bytes = 4 * (1 + num_dims)
    if len(data) < header_bytes:
        raise DataError(
            f"{path}: {len(data)} bytes, shorter than the {header_bytes}-byte header "
            f"of an IDX {kind} file."
        )
    fields = np.frombuffer(data, dtype=">u4", count=1 + num_dims)
    if fields[0] != magic:
        raise DataError(f"{path}: magic number {fields[0]}, expected {magic} (IDX {kind}).")
    return tuple(int(size) for size in fields[1:])


def _check_length(
    data: bytes, path: str, header_bytes: int, count: int, item_bytes: int, what: str
) -> None:
    expected = header_bytes + count * item_bytes
    if len(data) != expected:
        raise DataError(
            f"{path}: the header says {count} {what}, i.e. {expected} bytes, "
            f"but the file holds {len(data)} bytes."
        )


def _parse_images(data: bytes, path: str) -> np.ndarray:
    """IDX image file bytes -> uint8 [N, 28, 28]."""
    count, rows, cols = _parse_header(data, path, IMAGE_MAGIC, 3, "images")
    if (rows, cols) != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{path}: images are {rows}x{cols}, expected {IMAGE_SIZE}x{IMAGE_SIZE}.")
    _check_length(data, path, 16, count, rows * cols, f"images of {rows}x{cols}")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, rows, cols).copy()


def _parse_labels(data: bytes, path: str) -> np.ndarray:
    """IDX label file bytes -> int32 [N]."""
    (count,) = _parse_header(data, path, LABEL_MAGIC, 1, "labels")
    _check_length(data, path, 8, count, 1, "labels")
    labels = np.frombuffer(data, dtype=np.uint8, offset=8).astype(np.int32)
    if count and labels.max() >= NUM_CLASSES:
        raise DataError(f"{path}: label {labels.max()} found, expected classes 0..{NUM_CLASSES - 1}.")
    return labels
