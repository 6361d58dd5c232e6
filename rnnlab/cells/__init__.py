"""Recurrent cells: each a factory returning an `RNNCell` of pure functions."""

from rnnlab.cells.base import LinearRecurrence, RNNCell
from rnnlab.cells.rnn import basic_rnn
