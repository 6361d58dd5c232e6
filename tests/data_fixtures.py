"""Tiny on-disk datasets in rnnlab's local data layout, for tests.

    data = write_mnist_idx(tmp_path)      # tmp_path/mnist/*.gz; returns the arrays written
    text = write_text_corpus(tmp_path)    # tmp_path/tiny_shakespeare/input.txt; returns the text
    load_mnist("train", data_dir=str(tmp_path))
"""

from __future__ import annotations

import gzip
import os
import random

import numpy as np

from rnnlab.data.mnist import IDX_FILES, IMAGE_MAGIC, LABEL_MAGIC, NUM_CLASSES, MnistSplit
from rnnlab.data.text import split_sizes

# Speakers and lines in tiny-shakespeare's layout ("NAME:\nline\nline\n\n").
_SPEAKERS = ("First Citizen", "Second Citizen", "MENENIUS", "All", "VOLUMNIA")
_LINES = (
    "Before we proceed any further, hear me speak.",
    "Speak, speak.",
    "You are all resolved rather to die than to famish?",
    "We know't, we know't.",
    "Let us kill him; and we'll have corn at our own price.",
    "Is't a verdict?",
    "No more talking on't: let it be done. Away, away!",
    "Why, masters, my good friends, mine honest neighbours,",
    "Would you undo yourselves? Quick, the jewel is gone!",
)


def idx_images_bytes(images: np.ndarray) -> bytes:
    """uint8 [N, rows, cols] -> an uncompressed IDX image file (magic 2051)."""
    images = np.asarray(images, dtype=np.uint8)
    header = np.array([IMAGE_MAGIC, *images.shape], dtype=">u4")
    return header.tobytes() + images.tobytes()


def idx_labels_bytes(labels: np.ndarray) -> bytes:
    """Integer labels [N] in 0..255 -> an uncompressed IDX label file (magic 2049)."""
    labels = np.asarray(labels, dtype=np.uint8)
    header = np.array([LABEL_MAGIC, len(labels)], dtype=">u4")
    return header.tobytes() + labels.tobytes()


def write_file(path: str, data: bytes) -> None:
    """Write `data` to `path`, gzip-compressed when the name ends in .gz."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)


def write_mnist_idx(
    directory: str | os.PathLike, num_train: int = 64, num_test: int = 32, seed: int = 0
) -> dict[str, MnistSplit]:
    """Write random MNIST-shaped IDX files to `directory/mnist/`.

    Returns:
      {"train": MnistSplit, "test": MnistSplit}: the arrays written, images uint8
      [N, 28, 28] and labels int32 [N] (labels cycle through all ten classes first).
    """
    rng = np.random.default_rng(seed)
    written = {}
    for split, count in (("train", num_train), ("test", num_test)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = np.arange(count, dtype=np.int32) % NUM_CLASSES
        rng.shuffle(labels)
        image_name, label_name = IDX_FILES[split]
        write_file(os.path.join(directory, "mnist", image_name), idx_images_bytes(images))
        write_file(os.path.join(directory, "mnist", label_name), idx_labels_bytes(labels))
        written[split] = MnistSplit(images, labels)
    return written


def shakespeare_like_text(num_chars: int, seed: int = 0) -> str:
    """A `num_chars`-character text laid out like tiny-shakespeare.

    It opens with every speaker and every line once and needs `num_chars` large
    enough (526 or more) for that opening to lie in the training split, so the
    validation and test splits use no character missing from the training split.
    """
    # There are more lines than speakers, so the opening names every speaker.
    opening = "".join(
        f"{_SPEAKERS[i % len(_SPEAKERS)]}:\n{line}\n\n" for i, line in enumerate(_LINES)
    )
    train_chars, _, _ = split_sizes(num_chars)
    if train_chars < len(opening):
        raise ValueError(
            f"num_chars={num_chars} is too small: the first 90% must hold {len(opening)} chars"
        )
    rng = random.Random(seed)
    parts, length = [opening], len(opening)
    while length < num_chars:
        lines = rng.choices(_LINES, k=rng.randint(1, 4))
        block = f"{rng.choice(_SPEAKERS)}:\n" + "".join(f"{line}\n" for line in lines) + "\n"
        parts.append(block)
        length += len(block)
    return "".join(parts)[:num_chars]


def write_text_corpus(directory: str | os.PathLike, num_chars: int = 5_000, seed: int = 0) -> str:
    """Write `shakespeare_like_text(num_chars, seed)` to `directory/tiny_shakespeare/input.txt`.

    Returns the text written.
    """
    text = shakespeare_like_text(num_chars, seed)
    path = os.path.join(directory, "tiny_shakespeare", "input.txt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return text
