"""Twins of ``torch.nn.RNN`` and ``torch.nn.RNNCell`` on :func:`fused_rnn.elman_rnn`.

:class:`RNN` and :class:`RNNCell` compute exactly what torch's modules compute, the Elman cell
``h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)`` with ``act`` = tanh or relu, with the same
constructor, parameter names, initialisation, ``state_dict``, ``forward`` and errors; only the
recurrence runs on the fused kernels. Not to be confused with :class:`fused_rnn.FusedRNN`, the
course's cell ``tanh(W_h (h_{t-1} + relu(W_in x_t + b_in)) + b_h)`` stacked.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .dispatch import check_backend
from .function import elman_rnn
from .reference import elman_reference


def _autocasting(device: torch.device) -> bool:
    # torch's RNN modules skip their dtype checks under autocast; elman_rnn casts the inputs.
    return device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)


def _elman(x, weights, h0, nonlinearity, lengths, backend):
    """One layer, one direction: :func:`elman_rnn` on ``x [B, T, I]``. An empty result (an empty
    batch, or hidden size 0, which ``nn.RNNCell`` allows) has nothing to fuse and elman_rnn
    refuses it: the reference loop gives torch's empty results, on every backend."""
    if x.shape[0] == 0 or weights[1].shape[0] == 0:
        return elman_reference(x, *weights, h0, nonlinearity=nonlinearity)
    return elman_rnn(x, *weights, h0, nonlinearity=nonlinearity, lengths=lengths, backend=backend)


def _reversal_index(lengths: torch.Tensor, T: int, device) -> torch.Tensor:
    """``[B, T]`` time indices that reverse each sequence within its own length and leave the
    padding where it is, so that the reverse direction starts at each sequence's own last
    element, as PyTorch's does for packed input."""
    t = torch.arange(T, device=device)
    lengths = lengths.to(device)[:, None]
    return torch.where(t < lengths, lengths - 1 - t, t)


def _reverse_in_time(x: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
    """``x [B, T, F]`` reversed in time, within each sequence's length given its
    :func:`_reversal_index` (None: all T long). Its own inverse."""
    if index is None:
        return x.flip(1)
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[2]))


# proj_size left out: torch.nn.RNN refuses the keyword whatever its value (even 0).
_NOT_GIVEN = object()


class RNN(nn.RNNBase):
    """``torch.nn.RNN`` (the Elman cell, tanh or relu) on the fused kernels: a drop-in twin.

    Same constructor, parameters (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``,
    ``bias_hh_l0``, ..., ``..._reverse``), initialisation, ``state_dict`` keys, repr, ``forward``
    (``[T, B, I]``, ``[B, T, I]`` with ``batch_first``, unbatched ``[T, I]``, or a
    ``PackedSequence``; returns ``(output, h_n [num_layers * num_directions, B, H])``) and errors
    as ``torch.nn.RNN``; see its documentation. Outputs and gradients equal torch's to rounding.

    Extra keyword ``backend``: see :func:`fused_rnn.elman_rnn`. ``RNN.from_torch(module)`` wraps
    an existing ``nn.RNN``'s own parameters. The keyword ``proj_size`` raises torch's ValueError,
    whatever its value, as ``nn.RNN`` does.

    It shares ``nn.RNNBase`` with ``nn.RNN`` but is not an ``nn.RNN`` instance: ``torch.compile``
    refuses to trace those, and traces this one. ``flatten_parameters()`` is a no-op (there is no
    cuDNN weight buffer). In training mode, dropout between layers draws the same masks as
    ``nn.RNN`` from the same seed on the CPU for unpacked input; elsewhere (packed input, cuDNN)
    masks of the same distribution.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, device=None, dtype=None, *,
                 proj_size=_NOT_GIVEN, backend: str = "auto"):
        if proj_size is not _NOT_GIVEN:  # torch checks it first, before the nonlinearity
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        modes = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}
        if nonlinearity not in modes:
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        check_backend(backend)
        super().__init__(modes[nonlinearity], input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, 0, device, dtype)
        self.nonlinearity = nonlinearity
        self.backend = backend

    @classmethod
    def from_torch(cls, module: nn.RNN, backend: str = "auto") -> "RNN":
        """The twin of ``module`` holding its very Parameter objects (so an optimizer holding them
        keeps working, and device and dtype carry over) and its training mode."""
        _require_twin_source(module, nn.RNN, "RNN")
        with warnings.catch_warnings():  # module's constructor already warned about its dropout
            warnings.simplefilter("ignore")
            twin = cls(module.input_size, module.hidden_size, module.num_layers, module.nonlinearity,
                       module.bias, module.batch_first, module.dropout, module.bidirectional,
                       device="meta", backend=backend)
        for name in module._flat_weights_names:
            setattr(twin, name, getattr(module, name))
        twin._init_flat_weights()
        return twin.train(module.training)

    def flatten_parameters(self) -> None:
        """A no-op, kept so that code written for ``nn.RNN`` runs: the kernels read the weights
        where they are."""

    def _layer_weights(self, k: int):
        """``(w_ih, w_hh, b_ih, b_hh)`` of layer-direction ``k`` (biases None without bias)."""
        weights = [getattr(self, name) for name in self._all_weights[k]]
        return tuple(weights) if self.bias else (weights[0], weights[1], None, None)

    def _check_forward_args(self, seq: torch.Tensor, hx: Optional[torch.Tensor]) -> None:
        """torch.nn.RNN's checks, with its exception types, on time-major ``seq [T, B, I]``."""
        weight = self.weight_ih_l0
        if seq.dtype != weight.dtype and not _autocasting(seq.device):
            raise ValueError(f"RNN input dtype ({seq.dtype}) does not match weight dtype ({weight.dtype}). "
                             f"Convert input: input.to({weight.dtype}), or convert model: model.to({seq.dtype})")
        if seq.shape[2] != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                               f"got {seq.shape[2]}")
        if seq.shape[0] == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if hx is not None:
            expected = (self.num_layers * (2 if self.bidirectional else 1), seq.shape[1], self.hidden_size)
            self.check_hidden_size(hx, expected)
            if hx.dtype != seq.dtype and not _autocasting(seq.device):
                raise RuntimeError(f"hx dtype ({hx.dtype}) does not match input dtype ({seq.dtype})")

    def forward(self, input, hx: Optional[torch.Tensor] = None):
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            # Padded [T, B, I], in the packed (sorted, longest first) order of the batch.
            seq, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes))
            self._check_forward_args(seq, hx)
            if hx is not None and sorted_indices is not None:
                hx = hx.index_select(1, sorted_indices)
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"RNN: Expected input to be 2D or 3D, got {input.dim()}D tensor instead")
            batched = input.dim() == 3
            if hx is not None and hx.dim() != input.dim():
                raise RuntimeError(f"For {'batched 3-D' if batched else 'unbatched 2-D'} input, hx should "
                                   f"also be {input.dim()}-D but got {hx.dim()}-D tensor")
            if not batched:
                input = input.unsqueeze(0 if self.batch_first else 1)
                hx = hx.unsqueeze(1) if hx is not None else None
            seq, lengths = (input.transpose(0, 1) if self.batch_first else input), None
            self._check_forward_args(seq, hx)

        # Between layers the sequence is time-major [T, B, D * H], as in ATen's RNN: on the CPU
        # the same seed then draws the same dropout masks as torch.nn.RNN (for unpacked input).
        directions = 2 if self.bidirectional else 1
        reversal = (_reversal_index(lengths, seq.shape[0], seq.device)
                    if directions == 2 and lengths is not None else None)
        finals = []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                seq = F.dropout(seq.contiguous(), self.dropout)
            x = seq.transpose(0, 1)  # elman_rnn is batch first: [B, T, F], a view
            outputs = []
            for direction in range(directions):
                k = layer * directions + direction
                reverse = direction == 1
                out, h_n = _elman(_reverse_in_time(x, reversal) if reverse else x, self._layer_weights(k),
                                  hx[k] if hx is not None else None, self.nonlinearity, lengths, self.backend)
                outputs.append((_reverse_in_time(out, reversal) if reverse else out).transpose(0, 1))
                finals.append(h_n)
            seq = torch.cat(outputs, dim=2) if directions == 2 else outputs[0]
        h_n = torch.stack(finals)

        if packed:
            output = PackedSequence(pack_padded_sequence(seq, lengths).data, batch_sizes, sorted_indices,
                                    unsorted_indices)
            return output, (h_n.index_select(1, unsorted_indices) if unsorted_indices is not None else h_n)
        output = seq.transpose(0, 1) if self.batch_first else seq
        if not batched:
            output, h_n = output.squeeze(0 if self.batch_first else 1), h_n.squeeze(1)
        return output.contiguous(), h_n  # contiguous, as torch's (code calls .view on it)


class RNNCell(nn.RNNCell):
    """``torch.nn.RNNCell`` (one Elman step, tanh or relu) on the fused kernels: a drop-in twin.

    Same constructor, parameters (``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``),
    initialisation, ``state_dict``, repr, ``forward(input [B, I] or [I], hx=None) -> h'`` and
    errors as ``torch.nn.RNNCell``, plus the keyword ``backend`` (see
    :func:`fused_rnn.elman_rnn`). ``RNNCell.from_torch(module)`` wraps an existing cell's own
    parameters.

    A loop of single steps gains little from fusion: where the whole sequence is at hand,
    :class:`RNN` runs all of its steps in one call.
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 device=None, dtype=None, *, backend: str = "auto"):
        check_backend(backend)
        super().__init__(input_size, hidden_size, bias, nonlinearity, device, dtype)
        self.backend = backend

    @classmethod
    def from_torch(cls, module: nn.RNNCell, backend: str = "auto") -> "RNNCell":
        """The twin of ``module`` holding its very Parameter objects (so an optimizer holding them
        keeps working, and device and dtype carry over) and its training mode."""
        _require_twin_source(module, nn.RNNCell, "RNNCell")
        twin = cls(module.input_size, module.hidden_size, module.bias, module.nonlinearity,
                   device="meta", backend=backend)
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            setattr(twin, name, getattr(module, name))  # the biases are None in both without bias
        return twin.train(module.training)

    def forward(self, input: torch.Tensor, hx: Optional[torch.Tensor] = None) -> torch.Tensor:
        if input.dim() not in (1, 2):
            raise ValueError(f"RNNCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None and hx.dim() not in (1, 2):
            raise ValueError(f"RNNCell: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        if hx is not None and hx.dim() != input.dim():
            raise RuntimeError(f"RNNCell: Expected hidden to be {input.dim()}D like the input, got {hx.dim()}D")
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
            hx = hx.unsqueeze(0) if hx is not None else None
        self._check_forward_args(input, hx)
        weights = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        _, h = _elman(input.unsqueeze(1), weights, hx, self.nonlinearity, None, self.backend)
        return h if batched else h.squeeze(0)

    def _check_forward_args(self, x: torch.Tensor, hx: Optional[torch.Tensor]) -> None:
        """torch.nn.RNNCell's checks, with its exception types, on ``x [B, I]``: sizes first, then
        dtypes, in torch's order (its sizes are checked before its GEMM refuses the dtypes)."""
        if self.nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        if x.shape[1] != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {x.shape[1]} expected {self.input_size}")
        if hx is not None:
            if hx.shape[0] != x.shape[0]:
                raise RuntimeError(f"Input batch size {x.shape[0]} doesn't match hidden0 batch size {hx.shape[0]}")
            if hx.shape[1] != self.hidden_size:
                raise RuntimeError(f"hidden0 has inconsistent hidden_size: got {hx.shape[1]}, "
                                   f"expected {self.hidden_size}")
        casting = _autocasting(x.device)
        if x.dtype != self.weight_ih.dtype and not casting:
            raise RuntimeError(f"RNNCell input dtype ({x.dtype}) does not match weight dtype "
                               f"({self.weight_ih.dtype})")
        if hx is not None and hx.dtype != x.dtype and not casting:
            raise RuntimeError(f"hx dtype ({hx.dtype}) does not match input dtype ({x.dtype})")


def _require_twin_source(module: nn.Module, kind: type, name: str) -> None:
    """TypeError saying why, unless ``module`` is a ``torch.nn.<name>`` its twin replaces exactly."""
    problem = torch_rnn_mismatch(module)
    if problem is not None or not isinstance(module, kind):
        raise TypeError(f"{name}.from_torch takes a torch.nn.{name}, got {type(module).__name__}"
                        + (f": {problem}" if problem else ""))


def torch_rnn_mismatch(module: nn.Module) -> Optional[str]:
    """None when ``module`` is a ``torch.nn.RNN`` or ``torch.nn.RNNCell`` that a fused twin can
    replace exactly; else why not."""
    if isinstance(module, (RNN, RNNCell)):
        return "it is fused already"
    kind = next((k for k in (nn.RNN, nn.RNNCell) if isinstance(module, k)), None)
    if kind is None:
        return (f"{type(module).__name__} has no fused twin: only torch.nn.RNN and torch.nn.RNNCell "
                f"(the Elman cell) have one")
    if type(module).forward is not kind.forward:
        return f"its class {type(module).__name__} overrides forward"
    names = (module._flat_weights_names if kind is nn.RNN
             else ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if module.bias else []))
    held = [name for name, p in module._parameters.items() if p is not None]
    if sorted(held) != sorted(names) or module._modules or module._buffers:
        return f"it holds parameters, buffers or submodules beyond {kind.__name__}'s own (a parametrization?)"
    return None


def from_torch(module: nn.Module, backend: str = "auto") -> nn.Module:
    """The fused twin (:class:`RNN` or :class:`RNNCell`) of a ``torch.nn.RNN`` or
    ``torch.nn.RNNCell``, holding the same Parameter objects; TypeError saying why for anything
    else."""
    return (RNN if isinstance(module, nn.RNNBase) else RNNCell).from_torch(module, backend)
