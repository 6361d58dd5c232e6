"""rnnlab: recurrent neural networks as pure JAX functions."""

from rnnlab import cells, host_memory
from rnnlab.cells.base import RNNCell
from rnnlab.cells.lstm import LSTMState
from rnnlab.unroll import (
    batched_initial_state,
    bidirectional,
    init_bidirectional,
    init_stacked_bidirectional,
    reverse_sequence,
    stacked_bidirectional,
    unroll,
)
from rnnlab.wrappers import (
    DropoutState,
    dropout,
    new_dropout_keys,
    residual,
    stack,
    trainable_initial_state,
    zoneout,
)

__all__ = [
    "DropoutState",
    "LSTMState",
    "RNNCell",
    "batched_initial_state",
    "bidirectional",
    "cells",
    "dropout",
    "host_memory",
    "init_bidirectional",
    "init_stacked_bidirectional",
    "new_dropout_keys",
    "residual",
    "reverse_sequence",
    "stack",
    "stacked_bidirectional",
    "trainable_initial_state",
    "unroll",
    "zoneout",
]

__version__ = "0.1.0"
