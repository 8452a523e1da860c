"""Twins of ``torch.nn.RNN`` and ``torch.nn.RNNCell`` on :func:`fused_rnn.elman_rnn`, and the
layer-stacking base they share with the LSTM's and GRU's twins (``gated_rnn.py``).

:class:`RNN` and :class:`RNNCell` compute exactly what torch's modules compute, the Elman cell
``h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)`` (tanh or relu), with the same
constructor, parameter names, initialisation, ``state_dict``, ``forward`` and errors; only the
recurrence runs on the fused kernels. Not to be confused with :class:`fused_rnn.FusedRNN`, the
course's cell ``tanh(W_h (h_{t-1} + relu(W_in x_t + b_in)) + b_h)`` stacked.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .dispatch import check_backend
from .function import elman_rnn
from .reference import elman_reference


def _autocasting(device: torch.device) -> bool:
    # torch's RNN modules skip their dtype checks under autocast; the functions cast the inputs.
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


# proj_size left out: torch.nn.RNN and GRU refuse the keyword whatever its value (even 0).
_NOT_GIVEN = object()


class StackedRNNBase(nn.RNNBase):
    """torch's ``RNNBase.forward`` for every twin: the input forms, torch's checks, the layers and
    directions, dropout between layers, and the results' forms. A twin gives its state's parts
    (``_state_parts``, ``_state_sizes``, ``_result_state``) and runs one layer-direction
    (``_run_layer``)."""

    _DIM_ERROR = "RNN: Expected input to be 2D or 3D, got {}D tensor instead"
    _STATE_MESSAGES: Tuple[str, ...] = ("Expected hidden size {}, got {}",)  # per state part
    _PACKED_CHECKED = True  # torch checks packed input in Python (ValueError for its dtype)

    def _state_sizes(self) -> tuple:  # the last dimension of each part of the state
        return (self.hidden_size,)

    def _state_parts(self, hx) -> tuple:  # the parts of ``hx`` as the user passes it
        return (hx,)

    def _result_state(self, parts: tuple):  # the final state as torch returns it, from its parts
        return parts[0]

    def _run_layer(self, x: torch.Tensor, k: int, state: Optional[tuple], lengths):
        """Layer-direction ``k`` on ``x [B, T, F]`` from ``state`` (its parts ``[B, *]``, or None:
        zeros): ``(output [B, T, F'], final state's parts)``."""
        raise NotImplementedError

    @staticmethod
    def _torch_config(module: nn.RNNBase) -> dict:
        return dict(input_size=module.input_size, hidden_size=module.hidden_size, num_layers=module.num_layers,
                    bias=module.bias, batch_first=module.batch_first, dropout=module.dropout,
                    bidirectional=module.bidirectional)

    @classmethod
    def from_torch(cls, module: nn.RNNBase, backend: str = "auto"):
        """The twin of ``module`` holding its very Parameter objects (so an optimizer holding them
        keeps working, and device and dtype carry over) and its training mode."""
        _require_twin_source(module, cls)
        with warnings.catch_warnings():  # module's constructor already warned about its dropout
            warnings.simplefilter("ignore")
            twin = cls(**cls._torch_config(module), device="meta", backend=backend)
        for name in module._flat_weights_names:
            setattr(twin, name, getattr(module, name))
        twin._init_flat_weights()
        return twin.train(module.training)

    def flatten_parameters(self) -> None:
        """A no-op, kept so that code written for torch's modules runs: the kernels read the
        weights where they are."""

    def _layer_weights(self, k: int) -> dict:
        """Layer-direction ``k``'s parameters by kind: ``weight_ih``, ``weight_hh``, and
        ``bias_ih``, ``bias_hh`` (with bias), ``weight_hr`` (with proj_size)."""
        return {name.split("_l")[0]: getattr(self, name) for name in self._all_weights[k]}

    def _check_forward_args(self, seq: torch.Tensor, state: Optional[tuple], packed: bool) -> None:
        """torch's checks, with its exception types, on time-major ``seq [T, B, I]``."""
        weight = self.weight_ih_l0
        casting = _autocasting(seq.device)
        if seq.dtype != weight.dtype and not casting:
            # torch's LSTM leaves packed input to ATen, which raises a RuntimeError
            error = ValueError if self._PACKED_CHECKED or not packed else RuntimeError
            raise error(f"RNN input dtype ({seq.dtype}) does not match weight dtype ({weight.dtype}). "
                        f"Convert input: input.to({weight.dtype}), or convert model: model.to({seq.dtype})")
        if seq.shape[2] != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                               f"got {seq.shape[2]}")
        if seq.shape[0] == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if state is not None:
            layers = self.num_layers * (2 if self.bidirectional else 1)
            for part, size, message in zip(state, self._state_sizes(), self._STATE_MESSAGES):
                self.check_hidden_size(part, (layers, seq.shape[1], size), message)
            for part in state:
                if part.dtype != seq.dtype and not casting:
                    raise RuntimeError(f"hx dtype ({part.dtype}) does not match input dtype ({seq.dtype})")

    def forward(self, input, hx=None):
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            # Padded [T, B, I], in the packed (sorted, longest first) order of the batch.
            seq, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes))
            state, batched = None if hx is None else self._state_parts(hx), True
            if state is not None and sorted_indices is not None:  # permuted, then checked, as torch does
                state = tuple(part.index_select(1, sorted_indices) for part in state)
        else:
            if input.dim() not in (2, 3):
                raise ValueError(self._DIM_ERROR.format(input.dim()))
            batched = input.dim() == 3
            state = None if hx is None else self._state_parts(hx)
            if state is not None and any(part.dim() != input.dim() for part in state):
                raise RuntimeError(_state_dim_error(state, input.dim()))
            if not batched:
                input = input.unsqueeze(0 if self.batch_first else 1)
                state = None if state is None else tuple(part.unsqueeze(1) for part in state)
            seq, lengths = (input.transpose(0, 1) if self.batch_first else input), None
        self._check_forward_args(seq, state, packed)

        # Between layers the sequence is time-major [T, B, D * H], as in ATen's RNNs: on the CPU
        # the same seed then draws the same dropout masks as torch's modules (for unpacked input).
        directions = 2 if self.bidirectional else 1
        reversal = (_reversal_index(lengths, seq.shape[0], seq.device)
                    if directions == 2 and lengths is not None else None)
        finals = []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                seq = F.dropout(seq.contiguous(), self.dropout)
            x = seq.transpose(0, 1)  # the functions are batch first: [B, T, F], a view
            outputs = []
            for direction in range(directions):
                k = layer * directions + direction
                reverse = direction == 1
                out, final = self._run_layer(_reverse_in_time(x, reversal) if reverse else x, k,
                                             None if state is None else tuple(part[k] for part in state), lengths)
                outputs.append((_reverse_in_time(out, reversal) if reverse else out).transpose(0, 1))
                finals.append(final)
            seq = torch.cat(outputs, dim=2) if directions == 2 else outputs[0]
        parts = tuple(torch.stack(finals_of_part) for finals_of_part in zip(*finals))

        if packed:
            output = PackedSequence(pack_padded_sequence(seq, lengths).data, batch_sizes, sorted_indices,
                                    unsorted_indices)
            if unsorted_indices is not None:
                parts = tuple(part.index_select(1, unsorted_indices) for part in parts)
            return output, self._result_state(parts)
        output = seq.transpose(0, 1) if self.batch_first else seq
        if not batched:
            output = output.squeeze(0 if self.batch_first else 1)
            parts = tuple(part.squeeze(1) for part in parts)
        return output.contiguous(), self._result_state(parts)  # contiguous, as torch's (code calls .view)


def _state_dim_error(state: tuple, dim: int) -> str:
    """torch's message for a state of other dimensions than the (unpacked) input's."""
    got = (f"{state[0].dim()}-D tensor" if len(state) == 1
           else "(" + ", ".join(f"{part.dim()}-D" for part in state) + ") tensors")
    return (f"For {'batched 3-D' if dim == 3 else 'unbatched 2-D'} input, {'hx' if len(state) == 1 else 'hx and cx'} "
            f"should also be {dim}-D but got {got}")


class RNN(StackedRNNBase):
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

    torch_class = nn.RNN  # the torch module it twins

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

    @staticmethod
    def _torch_config(module: nn.RNN) -> dict:
        return dict(StackedRNNBase._torch_config(module), nonlinearity=module.nonlinearity)

    def _run_layer(self, x, k, state, lengths):
        w = self._layer_weights(k)
        weights = (w["weight_ih"], w["weight_hh"], w.get("bias_ih"), w.get("bias_hh"))
        out, h_n = _elman(x, weights, None if state is None else state[0], self.nonlinearity, lengths,
                          self.backend)
        return out, (h_n,)


def cell_from_torch(cls, module: nn.RNNCellBase, backend: str, **config):
    """The cell twin ``cls`` of ``module`` holding its very Parameter objects (so an optimizer
    holding them keeps working, and device and dtype carry over) and its training mode."""
    _require_twin_source(module, cls)
    twin = cls(module.input_size, module.hidden_size, module.bias, **config, device="meta", backend=backend)
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        setattr(twin, name, getattr(module, name))  # the biases are None in both without bias
    return twin.train(module.training)


# torch 2.15's ATen checks each hidden state's dimensions before its sizes; 2.13 checks the batch
# size first and then raises an IndexError reading the hidden size of a 1-D state.
_HIDDEN_DIMS_FIRST = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 15)


def check_cell_args(cell: nn.RNNCellBase, x: torch.Tensor, state: tuple) -> None:
    """ATen's checks of torch's cells, in its order, with its exception types, on ``x [B, I]``
    and the state's parts (``(hx,)``, ``(hx, cx)``, or ``()``): sizes first, then dtypes (its
    sizes are checked before its GEMM refuses the dtypes)."""
    if x.shape[1] != cell.input_size:
        raise RuntimeError(f"input has inconsistent input_size: got {x.shape[1]} expected {cell.input_size}")
    for label, hx in enumerate(state):
        if _HIDDEN_DIMS_FIRST and hx.dim() != 2:
            raise RuntimeError(f"Expected 2D hidden{label} (batch x hidden_size), but got {hx.dim()}D tensor")
        if hx.shape[0] != x.shape[0]:
            raise RuntimeError(f"Input batch size {x.shape[0]} doesn't match hidden{label} batch size {hx.shape[0]}")
        if hx.size(1) != cell.hidden_size:  # an IndexError for a 1-D hx, as torch's
            raise RuntimeError(f"hidden{label} has inconsistent hidden_size: got {hx.shape[1]}, "
                               f"expected {cell.hidden_size}")
        if hx.dim() != 2:
            raise RuntimeError(f"Expected hidden{label} to be 2-D like the input, got {hx.dim()}-D")
    casting = _autocasting(x.device)
    if x.dtype != cell.weight_ih.dtype and not casting:
        raise RuntimeError(f"{cell.torch_class.__name__} input dtype ({x.dtype}) does not match weight dtype "
                           f"({cell.weight_ih.dtype})")
    for hx in state:
        if hx.dtype != x.dtype and not casting:
            raise RuntimeError(f"hx dtype ({hx.dtype}) does not match input dtype ({x.dtype})")


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

    torch_class = nn.RNNCell  # the torch module it twins

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 device=None, dtype=None, *, backend: str = "auto"):
        check_backend(backend)
        super().__init__(input_size, hidden_size, bias, nonlinearity, device, dtype)
        self.backend = backend

    @classmethod
    def from_torch(cls, module: nn.RNNCell, backend: str = "auto") -> "RNNCell":
        """The twin of ``module`` holding its very Parameter objects and its training mode."""
        _require_twin_source(module, cls)  # before reading its nonlinearity
        return cell_from_torch(cls, module, backend, nonlinearity=module.nonlinearity)

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
        if self.nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        check_cell_args(self, input, () if hx is None else (hx,))
        weights = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        _, h = _elman(input.unsqueeze(1), weights, hx, self.nonlinearity, None, self.backend)
        return h if batched else h.squeeze(0)


def _require_twin_source(module: nn.Module, twin_class: type) -> None:
    """TypeError saying why, unless ``module`` is the torch module ``twin_class`` replaces exactly."""
    kind = twin_class.torch_class
    problem = ("it is fused already" if isinstance(module, twin_class)
               else mismatch_with(module, kind) if isinstance(module, kind) else None)
    if problem is not None or not isinstance(module, kind):
        raise TypeError(f"{twin_class.__name__}.from_torch takes a torch.nn.{kind.__name__}, got "
                        f"{type(module).__name__}" + (f": {problem}" if problem else ""))


def mismatch_with(module: nn.Module, kind: type) -> Optional[str]:
    """None when ``module``, an instance of torch's ``kind`` (``nn.RNN``, ``nn.LSTMCell``, ...),
    computes what ``kind`` does with ``kind``'s own parameters, so that its twin replaces it
    exactly; else why not."""
    if type(module).forward is not kind.forward:
        return f"its class {type(module).__name__} overrides forward"
    names = (module._flat_weights_names if isinstance(module, nn.RNNBase)
             else ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if module.bias else []))
    held = [name for name, p in module._parameters.items() if p is not None]
    if sorted(held) != sorted(names) or module._modules or module._buffers:
        return f"it holds parameters, buffers or submodules beyond {kind.__name__}'s own (a parametrization?)"
    return None
