"""Kernels, one module per backend, each with the same two entry points:

``rnn_fwd(proj, ids, w_h, b_h, h0, allow_tf32) -> ws``: the state workspace in
:func:`workspace_dtype`, in the backend's layout (:func:`batch_major` gives the ``[B, T+1, H]``
view: ``[:, 0] = h0``, ``[:, t+1] = h_t``);
``rnn_bwd(grad_out [B, T, H], grad_h_n, ws, proj, ids, w_h, has_bias, has_h0, allow_tf32)
-> (grad_proj, grad_w_h, grad_b_h, grad_h0)``; ``has_h0`` False says that ``h0`` was zeros
(not given): a backend may then skip work whose only use is ``grad_h0`` (returning zeros).

Imported lazily by fused_rnn.function.
"""
import torch


def workspace_dtype(dtype: torch.dtype) -> torch.dtype:
    """State and accumulation: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def workspace_shape(backend: str, B: int, T: int, H: int) -> tuple:
    """The workspace's layout: time-major ``[T+1, B, H]`` on the CPU backend (each step's states
    one contiguous block, which its GEMMs write in place), ``[B, T+1, H]`` on the Triton backend."""
    return (T + 1, B, H) if backend == "cpu" else (B, T + 1, H)


def batch_major(ws: torch.Tensor, backend: str) -> torch.Tensor:
    """The ``[B, T+1, H]`` view of a workspace (or of its gradient) in ``backend``'s layout."""
    return ws.transpose(0, 1) if backend == "cpu" else ws
