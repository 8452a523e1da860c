"""fused_rnn: vanilla (Elman) RNN recurrences as fused kernels, all time steps in one launch.

The course's char-RNN cell ``h_t = tanh(W_h (h_{t-1} + relu(W_in e(x_t) + b_in)) + b_h)``
(:func:`fused_rnn`, :class:`FusedRNN`, :class:`FusedCharLoopModel`) and ``torch.nn.RNN``'s own
``h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)`` (:func:`elman_rnn`, :class:`RNN`,
:class:`RNNCell`); :func:`convert` swaps either into existing code.
"""
from .convert import convert
from .dispatch import BackendInfo, backends
from .function import elman_rnn, fused_rnn, gru, lstm
from .modules import FusedCharLoopModel, FusedRNN
from .reference import CharLoopModel, elman_reference, rnn_reference
from .rnn import RNN, RNNCell

__all__ = ["fused_rnn", "elman_rnn", "lstm", "gru", "rnn_reference", "elman_reference", "backends", "BackendInfo", "CharLoopModel",
           "FusedCharLoopModel", "FusedRNN", "convert", "RNN", "RNNCell"]
__version__ = "0.1.0"
