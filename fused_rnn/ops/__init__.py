"""Kernels, one module per backend, each with the same two entry points:

``rnn_fwd(proj, ids, w_h, b_h, h0, allow_tf32) -> ws``: the state workspace ``[B, T+1, H]``
(``ws[:, 0] = h0``, ``ws[:, t+1] = h_t``) in :func:`workspace_dtype`;
``rnn_bwd(grad_out, grad_h_n, ws, proj, ids, w_h, has_bias, allow_tf32)
-> (grad_proj, grad_w_h, grad_b_h, grad_h0)``.

Imported lazily by fused_rnn.function.
"""
import torch


def workspace_dtype(dtype: torch.dtype) -> torch.dtype:
    """State and accumulation: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32
