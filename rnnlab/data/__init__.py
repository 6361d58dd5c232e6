"""rnnlab datasets: MNIST and tiny-shakespeare from a local directory or TFDS.

Local layout (pass `--data_dir DIR` or set `RNNLAB_DATA_DIR=DIR`):

    DIR/mnist/{train,t10k}-images-idx3-ubyte.gz, {train,t10k}-labels-idx1-ubyte.gz
    DIR/tiny_shakespeare/input.txt

Without a local directory the loaders use TensorFlow Datasets, imported only then.
"""

from rnnlab.data.errors import DATA_DIR_ENV, DataError, resolve_data_dir
from rnnlab.data.mnist import MnistSplit, load_mnist, normalise_images
from rnnlab.data.text import Vocabulary, load_text_splits, split_sizes, split_text, stream_batches

__all__ = [
    "DATA_DIR_ENV",
    "DataError",
    "MnistSplit",
    "Vocabulary",
    "load_mnist",
    "load_text_splits",
    "normalise_images",
    "resolve_data_dir",
    "split_sizes",
    "split_text",
    "stream_batches",
]
