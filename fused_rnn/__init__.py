"""fused_rnn: the vanilla (Elman) char-RNN recurrence as fused kernels.

``h_t = tanh(W_h (h_{t-1} + relu(W_in e(x_t) + b_in)) + b_h)`` over all time steps in one launch.
"""
from .function import BackendInfo, backends, elman_rnn, fused_rnn
from .modules import FusedCharLoopModel, FusedRNN
from .convert import convert  # noqa: E402 (after .modules, which it imports)
from .reference import CharLoopModel, elman_reference, rnn_reference
from .rnn import RNN, RNNCell

__all__ = ["fused_rnn", "elman_rnn", "rnn_reference", "elman_reference", "backends", "BackendInfo", "CharLoopModel",
           "FusedCharLoopModel", "FusedRNN", "convert", "RNN", "RNNCell"]
__version__ = "0.1.0"
