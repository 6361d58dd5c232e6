"""Recurrent cells: each a factory returning an `RNNCell` of pure functions."""

from rnnlab.cells.base import LinearRecurrence, RNNCell
from rnnlab.cells.gru import gru
from rnnlab.cells.indrnn import indrnn
from rnnlab.cells.griffin import rg_lru
from rnnlab.cells.linear import lru, min_gru, min_lstm
from rnnlab.cells.lstm import LSTMState, lstm
from rnnlab.cells.rnn import basic_rnn

__all__ = [
    "LSTMState",
    "LinearRecurrence",
    "RNNCell",
    "basic_rnn",
    "gru",
    "indrnn",
    "lru",
    "lstm",
    "min_gru",
    "min_lstm",
    "rg_lru",
]
