"""Tests of rnnlab.data: IDX parsing, data-directory resolution, text splits,
the character vocabulary, stream batching, and the TensorFlow Datasets path.

Only the tests named `test_tfds_*` import TensorFlow Datasets (and TensorFlow).
"""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

import data_fixtures
from rnnlab.data import (
    DATA_DIR_ENV,
    DataError,
    Vocabulary,
    load_mnist,
    load_text_splits,
    normalise_images,
    split_sizes,
    stream_batches,
)
from rnnlab.data import errors as data_errors
from rnnlab.data import sine as sine_data
from rnnlab.data.mnist import IDX_FILES


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


@pytest.fixture()
def mnist_dir(tmp_path):
    written = data_fixtures.write_mnist_idx(tmp_path, num_train=20, num_test=12, seed=3)
    return tmp_path, written


def _path(root, split: str, kind: str) -> str:
    image_name, label_name = IDX_FILES[split]
    return os.path.join(root, "mnist", image_name if kind == "images" else label_name)


def _rewrite(path: str, transform) -> None:
    with gzip.open(path, "rb") as f:
        data = f.read()
    data_fixtures.write_file(path, transform(data))


# ---------------------------------------------------------------- MNIST, IDX files


@pytest.mark.parametrize("split", ["train", "test"])
def test_idx_round_trip(mnist_dir, split):
    root, written = mnist_dir
    loaded = load_mnist(split, data_dir=str(root))
    assert loaded.images.dtype == np.uint8 and loaded.labels.dtype == np.int32
    assert loaded.images.shape == written[split].images.shape
    np.testing.assert_array_equal(loaded.images, written[split].images)
    np.testing.assert_array_equal(loaded.labels, written[split].labels)


@pytest.mark.parametrize("count", [1, 7, 301])
def test_any_header_count_loads(tmp_path, count):
    written = data_fixtures.write_mnist_idx(tmp_path, num_train=count, num_test=2)
    loaded = load_mnist("train", data_dir=str(tmp_path))
    assert loaded.images.shape == (count, 28, 28)
    np.testing.assert_array_equal(loaded.images, written["train"].images)


def test_uncompressed_files_load(mnist_dir):
    root, written = mnist_dir
    for kind in ("images", "labels"):
        gz_path = _path(root, "test", kind)
        with gzip.open(gz_path, "rb") as f:
            data = f.read()
        os.remove(gz_path)
        data_fixtures.write_file(gz_path[: -len(".gz")], data)
    loaded = load_mnist("test", data_dir=str(root))
    np.testing.assert_array_equal(loaded.images, written["test"].images)
    np.testing.assert_array_equal(loaded.labels, written["test"].labels)


def _bad_magic(data: bytes) -> bytes:
    return b"\x00\x00\x08\x01" + data[4:]


def _set_count(count: int):
    return lambda data: data[:4] + np.array([count], ">u4").tobytes() + data[8:]


@pytest.mark.parametrize(
    "kind, transform, message",
    [
        ("images", _bad_magic, "magic number 2049, expected 2051"),
        ("labels", lambda d: b"\x00\x00\x08\x03" + d[4:], "magic number 2051, expected 2049"),
        ("images", lambda d: d[:-5], "bytes"),
        ("labels", lambda d: d[:-1], "bytes"),
        ("images", lambda d: d + b"\x00", "bytes"),
        ("images", lambda d: d[:10], "header"),
        ("images", _set_count(21), "the header says 21"),
        ("images", lambda d: d[:8] + np.array([27], ">u4").tobytes() + d[12:], "27x28"),
        ("labels", lambda d: d[:-1] + b"\x0a", "label 10"),
    ],
)
def test_malformed_idx_names_file(mnist_dir, kind, transform, message):
    root, _ = mnist_dir
    path = _path(root, "train", kind)
    _rewrite(path, transform)
    with pytest.raises(DataError, match=message) as info:
        load_mnist("train", data_dir=str(root))
    assert path in str(info.value)


def test_image_label_count_mismatch(tmp_path):
    data_fixtures.write_mnist_idx(tmp_path, num_train=10)
    labels = np.zeros(9, np.int32)
    data_fixtures.write_file(_path(tmp_path, "train", "labels"), data_fixtures.idx_labels_bytes(labels))
    with pytest.raises(DataError, match="10 images .* 9 labels") as info:
        load_mnist("train", data_dir=str(tmp_path))
    assert _path(tmp_path, "train", "images") in str(info.value)
    assert _path(tmp_path, "train", "labels") in str(info.value)


def test_not_gzip_names_file(mnist_dir):
    root, _ = mnist_dir
    path = _path(root, "test", "images")
    with open(path, "wb") as f:
        f.write(b"not a gzip file at all")
    with pytest.raises(DataError, match="cannot read") as info:
        load_mnist("test", data_dir=str(root))
    assert path in str(info.value)


def test_missing_file_names_path_and_remedy(mnist_dir):
    root, _ = mnist_dir
    path = _path(root, "test", "labels")
    os.remove(path)
    with pytest.raises(DataError) as info:
        load_mnist("test", data_dir=str(root))
    message = str(info.value)
    assert path in message and "--data_dir" in message and DATA_DIR_ENV in message


def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match="TensorFlow Datasets") as info:
        load_mnist("train", data_dir=str(tmp_path / "nowhere"))
    assert os.path.join(str(tmp_path / "nowhere"), "mnist") in str(info.value)


def test_unknown_split(mnist_dir):
    with pytest.raises(ValueError, match="validation"):
        load_mnist("validation", data_dir=str(mnist_dir[0]))


def test_env_var_resolution(mnist_dir, monkeypatch, tmp_path_factory):
    root, written = mnist_dir
    monkeypatch.setenv(DATA_DIR_ENV, str(root))
    np.testing.assert_array_equal(load_mnist("test").labels, written["test"].labels)
    # An explicit data_dir wins over the environment variable.
    other = tmp_path_factory.mktemp("other")
    other_written = data_fixtures.write_mnist_idx(other, num_test=5, seed=9)
    from_other = load_mnist("test", data_dir=str(other))
    np.testing.assert_array_equal(from_other.labels, other_written["test"].labels)
    monkeypatch.setenv(DATA_DIR_ENV, str(other / "unset"))
    with pytest.raises(DataError, match="does not exist") as info:
        load_mnist("test")
    assert os.path.join(str(other / "unset"), "mnist") in str(info.value)


def test_normalise_images():
    images = np.array([[[0, 128, 255]]], np.uint8)
    scaled = normalise_images(images)
    assert scaled.dtype == np.float32 and scaled.shape == images.shape
    np.testing.assert_allclose(scaled, [[[0.0, 128 / 255, 1.0]]])
    with pytest.raises(ValueError, match="uint8"):
        normalise_images(scaled)


# ---------------------------------------------------------------- text splits


def test_split_sizes_follow_tiny_shakespeare_rule():
    assert split_sizes(1_115_394) == (1_003_854, 55_770, 55_770)
    # TFDS's own expressions, for every small length.
    for n in range(20_000):
        train = int(n * 0.9)
        validation = int((n - train) * 0.5)
        assert split_sizes(n) == (train, validation, n - train - validation)


def test_full_size_text_splits(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(1_115_394))
    path = tmp_path / "tiny_shakespeare" / "input.txt"
    path.parent.mkdir()
    path.write_text(text, encoding="utf-8")
    splits = load_text_splits(data_dir=str(tmp_path))
    sizes = {k: len(v) for k, v in splits.items()}
    assert sizes == {"train": 1_003_854, "validation": 55_770, "test": 55_770}
    assert splits["train"] + splits["validation"] + splits["test"] == text


def test_small_text_splits_and_layout(tmp_path, monkeypatch):
    text = data_fixtures.write_text_corpus(tmp_path, num_chars=1000)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    splits = load_text_splits()
    assert [len(splits[k]) for k in ("train", "validation", "test")] == [900, 50, 50]
    assert splits["train"] + splits["validation"] + splits["test"] == text
    assert text.startswith("First Citizen:\n") and ":\n" in text[500:] and "\n\n" in text[500:]
    vocab = Vocabulary.from_text(splits["train"])
    vocab.encode(splits["validation"])
    vocab.encode(splits["test"])


def test_text_corpus_too_small(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        data_fixtures.write_text_corpus(tmp_path, num_chars=100)


def test_missing_text_file(tmp_path):
    with pytest.raises(DataError, match="--data_dir") as info:
        load_text_splits(data_dir=str(tmp_path))
    assert os.path.join(str(tmp_path), "tiny_shakespeare", "input.txt") in str(info.value)


def _write_input_txt(root, text: str) -> str:
    path = root / "tiny_shakespeare" / "input.txt"
    path.parent.mkdir()
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_empty_text_file(tmp_path):
    path = _write_input_txt(tmp_path, "")
    with pytest.raises(DataError, match="the file is empty") as info:
        load_text_splits(data_dir=str(tmp_path))
    assert path in str(info.value)


@pytest.mark.parametrize(
    "num_chars, message", [(1, "the train and validation splits empty"), (10, "the validation split empty")]
)
def test_text_too_short_for_three_splits(tmp_path, num_chars, message):
    path = _write_input_txt(tmp_path, "a" * num_chars)
    with pytest.raises(DataError, match=message) as info:
        load_text_splits(data_dir=str(tmp_path))
    assert path in str(info.value) and "at least 11 characters" in str(info.value)


def test_shortest_text_gives_three_splits(tmp_path):
    _write_input_txt(tmp_path, "abcdefghijk")
    assert load_text_splits(data_dir=str(tmp_path)) == {"train": "abcdefghi", "validation": "j", "test": "k"}


def test_text_file_is_a_directory(tmp_path):
    path = tmp_path / "tiny_shakespeare" / "input.txt"
    path.mkdir(parents=True)
    with pytest.raises(DataError, match="is a directory") as info:
        load_text_splits(data_dir=str(tmp_path))
    assert str(path) in str(info.value)


def test_undecodable_text_file(tmp_path):
    path = tmp_path / "tiny_shakespeare" / "input.txt"
    path.parent.mkdir()
    path.write_bytes(b"ok \xff\xfe")
    with pytest.raises(DataError, match="UTF-8") as info:
        load_text_splits(data_dir=str(tmp_path))
    assert str(path) in str(info.value)


# ---------------------------------------------------------------- vocabulary


def test_vocabulary_round_trip():
    text = "Hark! who goes there?\nA friend."
    vocab = Vocabulary.from_text(text)
    assert vocab.chars == tuple(sorted(set(text))) and vocab.size == len(set(text))
    ids = vocab.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text),)
    assert vocab.decode(ids) == text
    restored = Vocabulary.from_json(json.loads(json.dumps(vocab.to_json())))
    assert restored == vocab
    np.testing.assert_array_equal(restored.encode(text), ids)
    assert vocab.encode("").shape == (0,) and vocab.decode([]) == ""


def test_vocabulary_errors():
    vocab = Vocabulary.from_text("abc")
    with pytest.raises(ValueError, match=r"\['Z', 'x'\]"):
        vocab.encode("abxcZ")
    with pytest.raises(ValueError, match="outside 0..2"):
        vocab.decode([0, 3])
    with pytest.raises(ValueError, match="outside 0..2"):
        vocab.decode([0, -1])  # not chars[-1], Python's last character
    with pytest.raises(ValueError, match="1-D"):
        vocab.decode([[0]])
    with pytest.raises(ValueError, match="unique"):
        Vocabulary.from_json(["a", "a"])
    with pytest.raises(ValueError, match="single characters"):
        Vocabulary.from_json(["ab"])
    with pytest.raises(ValueError, match="at least one"):
        Vocabulary.from_text("")


# ---------------------------------------------------------------- stream batching


@pytest.mark.parametrize("length, batch_size, num_steps", [(103, 4, 5), (1000, 7, 13), (12, 3, 3)])
def test_stream_batches_continuity(length, batch_size, num_steps):
    ids = np.random.default_rng(0).integers(0, 50, size=length)
    inputs, targets = stream_batches(ids, batch_size, num_steps)
    stream_len = length // batch_size
    num_windows = (stream_len - 1) // num_steps
    assert inputs.shape == targets.shape == (num_windows, batch_size, num_steps)
    assert inputs.dtype == targets.dtype == np.int32
    for b in range(batch_size):
        stream = ids[b * stream_len : (b + 1) * stream_len]
        # Windows of stream b, read in order, are one contiguous stretch of it.
        np.testing.assert_array_equal(inputs[:, b].reshape(-1), stream[: num_windows * num_steps])
        np.testing.assert_array_equal(targets[:, b].reshape(-1), stream[1 : num_windows * num_steps + 1])


def test_stream_batches_window_boundaries():
    inputs, targets = stream_batches(np.arange(200), batch_size=4, num_steps=6)
    np.testing.assert_array_equal(targets, inputs + 1)
    np.testing.assert_array_equal(inputs[1:, :, 0], inputs[:-1, :, -1] + 1)
    np.testing.assert_array_equal(inputs[0, :, 0], [0, 50, 100, 150])


def test_stream_batches_errors():
    with pytest.raises(ValueError, match="need at least batch_size \\* \\(num_steps \\+ 1\\) = 24"):
        stream_batches(np.arange(23), batch_size=4, num_steps=5)
    stream_batches(np.arange(24), batch_size=4, num_steps=5)
    for batch_size, num_steps in [(0, 5), (4, 0), (-1, 5)]:
        with pytest.raises(ValueError, match="positive"):
            stream_batches(np.arange(100), batch_size, num_steps)
    with pytest.raises(ValueError, match="1-D integers"):
        stream_batches(np.zeros((10, 10), np.int32), 2, 2)
    with pytest.raises(ValueError, match="1-D integers"):
        stream_batches(np.zeros(100, np.float32), 2, 2)


# ---------------------------------------------------------------- sine series


def test_sine_split_ends_with_the_series_whatever_the_rounding():
    series = np.arange(200_000, dtype=np.float32)
    splits = sine_data.split_series(series, (0.8, 0.1, 0.09999))  # sums to 0.99999
    np.testing.assert_array_equal(np.concatenate([splits[name] for name in sine_data.SPLITS]), series)


@pytest.mark.parametrize(
    "length, fractions, empty",
    [(1, (0.8, 0.1, 0.1), "validation and test"), (5, (0.8, 0.1, 0.1), "validation"), (9, (0.9, 0.05, 0.05), "test")],
)
def test_sine_split_of_a_short_series_raises(length, fractions, empty):
    with pytest.raises(ValueError, match=f"length {length} .* leaves {empty} empty"):
        sine_data.split_series(np.zeros(length, np.float32), fractions)


def test_sine_sizes_accept_numpy_integers_not_bools():
    series = sine_data.sine_series(np.int64(20), phases=(0.0,))
    np.testing.assert_array_equal(series, sine_data.sine_series(20, phases=(0.0,)))
    inputs, targets = sine_data.make_windows(series, np.int32(4))
    assert inputs.shape == (16, 4, 1) and targets.shape == (16,)
    for bad in (True, np.bool_(True), 2.0, np.int64(0)):
        with pytest.raises(ValueError, match="num_points must be a positive integer"):
            sine_data.sine_series(bad)
        with pytest.raises(ValueError, match="window must be a positive integer"):
            sine_data.make_windows(series, bad)


def test_sine_series_must_be_one_dimensional():
    series = np.zeros((50, 2), np.float32)
    with pytest.raises(ValueError, match=r"series must be 1-D \[N\], got shape \(50, 2\)"):
        sine_data.split_series(series)
    with pytest.raises(ValueError, match=r"series must be 1-D \[N\], got shape \(50, 2\)"):
        sine_data.make_windows(series, 4)


# ---------------------------------------------------------------- TensorFlow Datasets


def _tfds_examples(tfds, name: str, split: str, data_dir: str) -> list[dict]:
    """Every example of a TFDS split, read one at a time, as numpy."""
    return list(tfds.as_numpy(tfds.load(name, split=split, data_dir=data_dir)))


# chunk=4 < num_examples=6: the split is read in two chunks that must both be kept.
@pytest.mark.parametrize("chunk", [None, 4])
def test_tfds_mnist_mock(tmp_path, monkeypatch, chunk):
    tfds = pytest.importorskip("tensorflow_datasets")
    if chunk is not None:
        monkeypatch.setattr(data_errors, "_TFDS_CHUNK", chunk)
    with tfds.testing.mock_data(num_examples=6):
        for split in ("train", "test"):
            loaded = load_mnist(split, tfds_data_dir=str(tmp_path))
            expected = _tfds_examples(tfds, "mnist", split, str(tmp_path))
            assert loaded.images.shape == (6, 28, 28) and loaded.images.dtype == np.uint8
            assert loaded.labels.shape == (6,) and loaded.labels.dtype == np.int32
            expected_labels = [example["label"] for example in expected]
            assert len(set(expected_labels)) > 1  # so constant labels cannot pass
            np.testing.assert_array_equal(
                loaded.images, np.stack([example["image"][..., 0] for example in expected])
            )
            np.testing.assert_array_equal(loaded.labels, expected_labels)


def test_reading_through_tfds_says_so_first(tmp_path, caplog):
    # The download path can take minutes offline: the user is told before it starts.
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=2), caplog.at_level("WARNING"):
        load_mnist("test", tfds_data_dir=str(tmp_path))
    assert "No local data directory is set: reading 'mnist' test through TensorFlow Datasets" in caplog.text
    assert "Pass --data_dir DIR" in caplog.text


def test_tfds_tiny_shakespeare_mock(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    tf = pytest.importorskip("tensorflow")
    texts = {
        "train": "First Citizen:\nBefore we proceed any further, hear me speak.\n",
        "validation": "All:\nSpeak, speak.\n",
        "test": "MENENIUS:\nWhy, masters \u2014 my good friends?\n",
    }

    def as_dataset(self, split, **kwargs):
        """Mock of TFDS's `_as_dataset`: one example holding `split`'s own text."""
        return tf.data.Dataset.from_tensors({"text": tf.constant(texts[split].encode("utf-8"))})

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        splits = load_text_splits(tfds_data_dir=str(tmp_path))
    assert splits == texts


def test_tfds_offline_is_one_clear_error(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    requests = pytest.importorskip("requests")

    def offline_load(*args, **kwargs):
        raise requests.exceptions.ConnectionError("Failed to resolve 'storage.googleapis.com'")

    monkeypatch.setattr(tfds, "load", offline_load)
    for load, kwargs in ((load_mnist, {"split": "train"}), (load_text_splits, {})):
        with pytest.raises(DataError, match="could not download") as info:
            load(tfds_data_dir=str(tmp_path), **kwargs)
        assert "--data_dir" in str(info.value) and DATA_DIR_ENV in str(info.value)
        assert info.value.__cause__ is None and info.value.__suppress_context__


def test_tfds_data_dir_under_a_file_names_the_path(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    (tmp_path / "file").write_text("not a directory")
    tfds_data_dir = str(tmp_path / "file" / "tfds")
    with pytest.raises(DataError, match="could not use --tfds_data_dir") as info:
        load_mnist("train", tfds_data_dir=tfds_data_dir)
    message = str(info.value)
    assert tfds_data_dir in message and "NotADirectoryError" in message and "writable directory" in message
    assert "download" not in message and "network" not in message
    assert "--data_dir" in message and DATA_DIR_ENV in message
