"""Character-level text: tiny-shakespeare splits, a character vocabulary, and
stream batching for truncated backpropagation through time.

    splits = load_text_splits(data_dir="/path/to/DIR")        # train/validation/test str
    vocab = Vocabulary.from_text(splits["train"])
    inputs, targets = stream_batches(vocab.encode(splits["train"]), batch_size=32, num_steps=100)
    # inputs, targets: int32 [num_windows, 32, 100]
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from rnnlab.data.errors import DataError, load_tfds_split, missing_path_error, resolve_data_dir

TEXT_SPLITS = ("train", "validation", "test")
_LAYOUT = "tiny_shakespeare/input.txt"
# The shortest corpus whose three `split_sizes` are all non-empty.
_MIN_CHARS = 11


def split_sizes(num_chars: int) -> tuple[int, int, int]:
    """(train, validation, test) lengths of a corpus of `num_chars` characters.

    The rule of TensorFlow Datasets' tiny_shakespeare: train is the first
    floor(0.9 * n) characters, validation the first half (rounded down) of the rest,
    test what remains. For the 1,115,394-character corpus that is
    1,003,854 / 55,770 / 55,770. Integer arithmetic here gives the same sizes as
    TFDS's float expressions `int(n * 0.9)`, `int(rest * 0.5)`.
    """
    if num_chars < 0:
        raise ValueError(f"num_chars must be >= 0, got {num_chars}")
    train = num_chars * 9 // 10
    validation = (num_chars - train) // 2
    return train, validation, num_chars - train - validation


def split_text(text: str) -> dict[str, str]:
    """Cut a corpus into contiguous train/validation/test parts by `split_sizes`."""
    train, validation, _ = split_sizes(len(text))
    return {
        "train": text[:train],
        "validation": text[train : train + validation],
        "test": text[train + validation :],
    }


def load_text_splits(data_dir: str | None = None, tfds_data_dir: str | None = None) -> dict[str, str]:
    """The tiny-shakespeare train/validation/test texts.

    Reads `DIR/tiny_shakespeare/input.txt` (UTF-8) from `data_dir`, else from
    `$RNNLAB_DATA_DIR`, and splits it with `split_text`; with neither set, loads
    TensorFlow Datasets' tiny_shakespeare, whose splits are the same.

    Args:
      data_dir: the local data directory DIR.
      tfds_data_dir: TensorFlow Datasets' cache directory, used only without a
        local data directory.

    Returns:
      {"train": str, "validation": str, "test": str}.

    Raises:
      DataError: missing, empty or undecodable file, a corpus too short for three
        non-empty splits, or TFDS could not provide it.
    """
    local_dir = resolve_data_dir(data_dir)
    if local_dir is None:
        return {split: _load_tfds(split, tfds_data_dir) for split in TEXT_SPLITS}
    path = os.path.join(local_dir, _LAYOUT)
    if os.path.isdir(path):
        raise DataError(f"{path} is a directory, expected the text file {_LAYOUT}.")
    if not os.path.isfile(path):
        raise missing_path_error(path, _LAYOUT)
    return _split_corpus(_read_text(path), path)


def _read_text(path: str) -> str:
    """The contents of `path`; DataError names the file when it is not UTF-8."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 text ({exc}).") from None


def _split_corpus(text: str, path: str) -> dict[str, str]:
    """`split_text(text)`; DataError names `path` when the text is empty or a split would be."""
    if not text:
        raise DataError(f"{path}: the file is empty, expected a text corpus.")
    splits = split_text(text)
    empty = [split for split in TEXT_SPLITS if not splits[split]]
    if empty:
        raise DataError(
            f"{path}: {len(text)} characters leave the {' and '.join(empty)} "
            f"split{'s' if len(empty) > 1 else ''} empty; "
            f"the corpus needs at least {_MIN_CHARS} characters."
        )
    return splits


def _load_tfds(split: str, tfds_data_dir: str | None) -> str:
    # Each tiny_shakespeare split is a single example holding the whole text.
    texts = load_tfds_split("tiny_shakespeare", split, tfds_data_dir, _LAYOUT)["text"]
    return "".join(text.decode("utf-8") for text in texts)


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """A character vocabulary: id i stands for `chars[i]`.

    Build it from the training text with `from_text` (ids follow sorted character
    order); store it with `to_json` and restore it with `from_json`, so a model
    checkpoint can carry the vocabulary it was trained with.
    """

    chars: tuple[str, ...]
    _ids: dict[str, int] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        chars = tuple(self.chars)
        if not chars:
            raise ValueError("a vocabulary needs at least one character")
        not_single = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if not_single:
            raise ValueError(
                f"vocabulary entries must be single characters, got {not_single!r}"
            )
        if len(set(chars)) != len(chars):
            raise ValueError(f"vocabulary characters must be unique, got {chars!r}")
        object.__setattr__(self, "chars", chars)
        object.__setattr__(self, "_ids", {c: i for i, c in enumerate(chars)})

    @classmethod
    def from_text(cls, text: str) -> Vocabulary:
        """The sorted unique characters of `text`."""
        return cls(tuple(sorted(set(text))))

    @classmethod
    def from_json(cls, chars: Sequence[str]) -> Vocabulary:
        """Inverse of `to_json`."""
        return cls(tuple(chars))

    def to_json(self) -> list[str]:
        """The characters in id order, a JSON-serialisable list."""
        return list(self.chars)

    @property
    def size(self) -> int:
        """The number of characters (ids run 0..size-1)."""
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """`text` -> int32 [len(text)] ids; ValueError names characters not in the vocabulary."""
        unknown = set(text) - self._ids.keys()
        if unknown:
            raise ValueError(f"text contains characters outside the vocabulary: {sorted(unknown)!r}")
        return np.fromiter(map(self._ids.__getitem__, text), dtype=np.int32, count=len(text))

    def decode(self, ids: np.ndarray | Sequence[int]) -> str:
        """Integer ids [T] -> the string of their characters."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(
                f"expected a 1-D array of integer ids, got shape {ids.shape} dtype {ids.dtype}"
            )
        bad = ids[(ids < 0) | (ids >= self.size)]
        if bad.size:
            raise ValueError(f"ids outside 0..{self.size - 1}: {sorted(set(bad.tolist()))}")
        return "".join(self.chars[i] for i in ids.tolist())


def stream_batches(ids: np.ndarray, batch_size: int, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut a token sequence into windows for truncated BPTT with carried state.

    The sequence is cut into `batch_size` contiguous streams of
    `L = len(ids) // batch_size` tokens (stream b is `ids[b*L : (b+1)*L]`; the last
    `len(ids) % batch_size` tokens are dropped). Each stream is read in
    `num_windows = (L - 1) // num_steps` consecutive windows, so window w + 1 of
    stream b continues exactly where window w of stream b ends, and a trainer can
    carry the recurrent state from one window to the next. A stream's last
    `L - 1 - num_windows * num_steps` tokens are left out.

    Args:
      ids: integer token ids [T].
      batch_size: the number of streams B.
      num_steps: the window length (unroll length) S.

    Returns:
      (inputs, targets), both int32 [num_windows, B, S], with
      `inputs[w, b, s] = stream_b[w*S + s]` and `targets[w, b, s] = stream_b[w*S + s + 1]`.

    Raises:
      ValueError: non-positive sizes, ids not 1-D integers, or fewer than
        `batch_size * (num_steps + 1)` ids.
    """
    ids = np.asarray(ids)
    if batch_size <= 0 or num_steps <= 0:
        raise ValueError(f"batch_size and num_steps must be positive, got {batch_size} and {num_steps}")
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be 1-D integers, got shape {ids.shape} dtype {ids.dtype}")
    stream_len = len(ids) // batch_size
    num_windows = (stream_len - 1) // num_steps
    if num_windows < 1:
        raise ValueError(
            f"{len(ids)} ids are too few for batch_size={batch_size} and num_steps={num_steps}: "
            f"need at least batch_size * (num_steps + 1) = {batch_size * (num_steps + 1)}"
        )
    streams = ids[: batch_size * stream_len].reshape(batch_size, stream_len).astype(np.int32)
    used = num_windows * num_steps

    def windows(start: int) -> np.ndarray:
        block = streams[:, start : start + used].reshape(batch_size, num_windows, num_steps)
        return np.ascontiguousarray(block.transpose(1, 0, 2))

    return windows(0), windows(1)
