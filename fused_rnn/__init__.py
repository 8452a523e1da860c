"""fused_rnn: vanilla (Elman) RNN recurrences as fused kernels, all time steps in one launch.

The course's char-RNN cell ``h_t = tanh(W_h (h_{t-1} + relu(W_in e(x_t) + b_in)) + b_h)``
(:func:`fused_rnn`, :class:`FusedRNN`, :class:`FusedCharLoopModel`) and ``torch.nn.RNN``'s own
``h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)`` (:func:`elman_rnn`, :class:`RNN`,
:class:`RNNCell`); torch's LSTM and GRU cells (:func:`lstm`, :func:`gru`, :class:`LSTM`,
:class:`GRU`, :class:`LSTMCell`, :class:`GRUCell`); :func:`convert` swaps them into existing code.
"""
from .convert import convert
from .dispatch import BackendInfo, backends
from .function import elman_rnn, fused_rnn, gru, lstm
from .modules import FusedCharLoopModel, FusedRNN
from .reference import CharLoopModel, elman_reference, rnn_reference
from .gated_rnn import GRU, LSTM, GRUCell, LSTMCell
from .rnn import RNN, RNNCell

# Read from the objects: a cell's name is spelled out only in its spec (tests/test_architecture.py).
__all__ = [obj.__name__ for obj in (fused_rnn, elman_rnn, lstm, gru, rnn_reference, elman_reference, backends,
                                    BackendInfo, CharLoopModel, FusedCharLoopModel, FusedRNN, convert, RNN,
                                    RNNCell, LSTM, GRU, LSTMCell, GRUCell)]
__version__ = "0.1.0"
