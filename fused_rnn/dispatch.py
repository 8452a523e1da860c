"""Backend dispatch: which backend runs a call (``backends()``, ``"auto"``'s choice, the
differentiation modes only the reference loop follows), and the kernel module of each."""
from __future__ import annotations

import importlib
import warnings
from typing import NamedTuple, Optional

import torch
import torch.autograd.forward_ad as forward_ad
from torch._functorch.pyfunctorch import TransformType, retrieve_all_functorch_interpreters

from .ops import cpu_ext, loop

BACKENDS = ("auto", "triton", "cpu", "reference")
CPU_DTYPES = (torch.float32, torch.float64)


def check_backend(backend: str) -> str:
    """Refuses an unknown backend name (modules call it when they are built, not at first use)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


class BackendInfo(NamedTuple):
    available: bool
    devices: tuple  # device types it runs on
    note: str  # why it is (not) available


class TritonImport(NamedTuple):
    """The Triton op module, or why it does not import (exactly one is set)."""
    module: Optional[object]
    error: Optional[str]


def _triton_import() -> TritonImport:
    try:
        return TritonImport(importlib.import_module("fused_rnn.ops.triton_rnn"), None)
    except Exception as exc:  # ImportError, or a broken triton install
        return TritonImport(None, f"{type(exc).__name__}: {exc}")


@torch.compiler.assume_constant_result
def _triton_import_error() -> Optional[str]:
    """Why the Triton op module does not import, or None. A constant to torch.compile: backend
    resolution runs inside a traced fused_rnn, where importlib cannot be traced."""
    return _triton_import().error


def backends() -> dict:
    """What each backend needs and whether it can run here: ``{name: BackendInfo}``.

    Asking about ``"cpu"`` builds the C++ extension if it was not built at install time.
    """
    info = {"reference": BackendInfo(True, ("cpu", "cuda"), "plain PyTorch loop, any device, any dtype")}
    reason = cpu_ext.unavailable_reason()
    info["cpu"] = BackendInfo(reason is None, ("cpu",),
                              reason or "C++ extension loaded; float32 and float64")
    triton_import = _triton_import()
    if triton_import.module is None:
        info["triton"] = BackendInfo(False, (), f"triton does not import: {triton_import.error}")
    else:
        mod = triton_import.module
        devices = ("cuda",) + (("cpu",) if mod.INTERPRET else ())
        cuda = torch.cuda.is_available()
        note = "CUDA is available" if cuda else "no CUDA device"
        if mod.INTERPRET:
            note += "; TRITON_INTERPRET=1: CPU tensors run through the (slow) interpreter"
        if mod.self_check.summary():
            note += f"; first-use self-check: {mod.self_check.summary()}"
        info["triton"] = BackendInfo(cuda or mod.INTERPRET, devices, note)
    return info


_warned_fallback = set()


def _warn_fallback_once(device_type: str, reason: str) -> None:
    """One warning per device type when ``"auto"`` runs the reference loop for want of a kernel."""
    if device_type not in _warned_fallback:
        _warned_fallback.add(device_type)
        warnings.warn(f"fused_rnn: falling back to the reference loop: {reason}", stacklevel=4)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that will run: "triton", "cpu" or "reference"; raises for an impossible ask."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            error = _triton_import_error()
            if error is None:
                return "triton"
            _warn_fallback_once("cuda", f"triton does not import ({error})")
        elif device.type == "cpu" and dtype in CPU_DTYPES:
            reason = cpu_ext.unavailable_reason()
            if reason is None:
                return "cpu"
            _warn_fallback_once("cpu", reason)
        return "reference"
    if backend == "cpu":
        if device.type != "cpu":
            raise RuntimeError(f"backend='cpu' runs on CPU tensors, got {device.type} tensors; "
                               f"use backend='auto'")
        if dtype not in CPU_DTYPES:
            raise RuntimeError(f"backend='cpu' supports float32 and float64, got {dtype}; "
                               f"use backend='reference' or convert the inputs")
        cpu_ext.load()  # raises RuntimeError saying how to fix a failed build
    elif backend == "triton" and _triton_import_error() is not None:
        raise RuntimeError(f"backend='triton' needs triton ({_triton_import_error()}); pip install triton")
    return backend


def kernels(backend: str):
    """The module with ``rnn_fwd`` and ``rnn_bwd`` for a fused backend."""
    return cpu_ext if backend == "cpu" else _triton_import().module


def gated_kernels(backend: str):
    """The module with ``gated_fwd`` and ``gated_bwd`` (the LSTM's and GRU's) for a fused backend:
    the C++ extension's, or the Triton kernels of `ops/triton_gated.py` (imported on first use,
    as the vanilla ones: defining kernels costs import time). Anything else: the reference loop
    at the kernels' interface."""
    if backend == "triton":
        return importlib.import_module("fused_rnn.ops.triton_gated")
    return cpu_ext if backend == "cpu" else loop


def fused_limit(inputs) -> Optional[str]:
    """The differentiation mode active for these inputs that the fused kernels cannot follow (they
    are custom ops with a reverse-mode rule only), or None."""
    if torch.compiler.is_compiling():
        return None
    forward = "forward-mode AD (torch.func.jvp, jacfwd, hessian; torch.autograd.forward_ad)"
    if forward_ad._current_level >= 0 and any(
            forward_ad.unpack_dual(t).tangent is not None for t in inputs if t is not None):
        return forward
    if torch._C._functorch.maybe_current_level() is not None:
        kinds = {interpreter.key() for interpreter in retrieve_all_functorch_interpreters()}
        if TransformType.Jvp in kinds:
            return forward
        if TransformType.Grad in kinds:
            return "torch.func's reverse-mode transforms (grad, vjp, jacrev)"
    return None


def backend_for(backend: str, weight: torch.Tensor, inputs) -> str:
    """The backend that runs: ``backend`` resolved for ``weight``'s device and dtype, or the
    reference loop under a differentiation mode the fused kernels cannot follow (``"auto"``; an
    explicitly asked fused backend raises then)."""
    resolved = resolve_backend(backend, weight.device, weight.dtype)
    limit = fused_limit(inputs) if resolved != "reference" else None
    if limit is None:
        return resolved
    if backend != "auto":
        raise RuntimeError(f"fused_rnn: backend={backend!r} does not support {limit}; "
                           f"use backend='reference' (backend='auto' switches to it)")
    return "reference"
