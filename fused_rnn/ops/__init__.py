"""Kernels, one module per backend, each with the same two entry points:

``rnn_fwd(proj, ids, w_h, b_h, h0, allow_tf32, cell) -> states`` in
:func:`workspace_dtype`, in the backend's layout (:func:`output_view` gives the ``[B, T, H]`` view
of ``h_1..h_T``);
``rnn_bwd(grad_out [B, T, H], grad_h_n, states, h0, proj, ids, w_h, has_bias, allow_tf32,
cell) -> (grad_proj, grad_w_h, grad_b_h, grad_h0)``; ``h0`` None means zeros (a backend
may then skip work whose only use is ``grad_h0``, returning zeros or None); ``grad_h_n`` None
means zeros too.

``cell`` (a cell's name, `fused_rnn.cells`) switches the step inside the same kernels:

    course       h_t = tanh((h_{t-1} + relu(p_t)) W_h^T + b_h)     p = proj (rows by ids, or dense)
    elman_tanh   h_t = tanh(h_{t-1} W_h^T + q_t)                   q = proj, dense, biases folded in
    elman_relu   h_t = relu(h_{t-1} W_h^T + q_t)                   (no ids, no b_h)

For the cells whose input enters after the product (elman) the backward's ``grad_proj`` is ``dz`` (``dL/dq``), ``grad_w_h`` is
``sum_t dz_t^T h_{t-1}`` and ``grad_b_h`` None; ``q`` is laid out as :func:`elman_q_time_major` says.
The cpu backend's two also take ``w_in`` for those cells: then ``proj`` is the dense input
``x [B, T, I]`` and ``b_h`` the bias that folds into ``q = x W_in^T + b_h``, formed inside the
time loop; ``rnn_bwd`` then returns ``(grad_x, grad_w_h, grad_b_h, grad_h0, grad_w_in, None)`` (the
cpu backend's always returns six entries, None for inputs not given). For
the course cell with token ``ids`` they take ``w_in`` and ``b_in``: then ``proj`` is the embedding
``[V, E]`` and the ``[V, H]`` table ``U = E W_in^T + b_in`` is formed inside (``E``'s rows of tokens
absent from ``ids`` read as zeros); ``rnn_bwd`` then returns ``(grad_embedding, grad_w_h, grad_b_h,
grad_h0, grad_w_in, grad_b_in)``.

The gated cells (``lstm``, ``gru``; ``cells.GATED``) have two entry points of their own, all
tensors time-major (every step one contiguous ``[B, ...]`` block):

``gated_fwd(q [T, B, G*H], w_hh [G*H, P], b_hh, h0 [B, P], c0 [B, H], w_hr [P, H], allow_tf32,
cell, keep_saved=True) -> (out [T, B, P], cs, saved [T, B, 4H])``, all in :func:`workspace_dtype`: ``out`` the states
``h_1..h_T``, ``cs`` the LSTM's ``c_1..c_T`` (``[T, B, H]``; the GRU: an empty tensor), ``saved``
what the backward reads (the LSTM's activated gates i, f, g, o; the GRU's r, z, n and
``a_n = h_{t-1} W_hn^T + b_hn``). ``q`` holds ``x W_ih^T`` plus the biases that fold into it (both
for the LSTM, ``b_ih`` for the GRU); ``b_hh [3H]`` (the GRU's, added to the product) or None;
``h0``, ``c0`` None: zeros; ``w_hr`` the LSTM's projection (``proj_size``) or None (``P = H``).
``keep_saved=False``: no backward follows (inference), and a backend may skip writing ``saved``.

``gated_bwd(grad_out [T, B, P], grad_cs [T, B, H] or None, out, cs, saved, q, w_hh, b_hh, h0, c0,
w_hr, allow_tf32, cell) -> (grad_q, grad_w_hh, grad_b_hh, grad_h0, grad_c0, grad_w_hr)``: ``grad_q``
the gradient at ``q`` (``[T, B, G*H]``), None for each input that was None (``h0``/``c0`` None: a
backend may return None or zeros).

The cpu backend's two also take ``w_ih`` and ``b_ih``: then ``q`` is the dense input
``x [B, T, I]`` and ``q = x W_ih^T + b_ih`` is formed inside the time loop; ``gated_bwd`` then
returns ``grad_x`` in ``grad_q``'s place and ``grad_w_ih``, ``grad_b_ih`` after ``grad_w_hr``.

Called by the custom ops in fused_rnn/recurrence_op.py and fused_rnn/gated_op.py.
"""
import torch

from .. import cells


def elman_q_time_major(backend: str, cell) -> bool:
    """Whether ``proj`` is time-major ``[T, B, H]`` (the cpu backend's cells whose input enters
    after the product: each step's ``q_t`` one contiguous block, like its states, and so is
    ``dL/dq``) rather than ``[B, T, H]``."""
    return backend == "cpu" and not cells.get(cell).input_before_product


def workspace_dtype(dtype: torch.dtype) -> torch.dtype:
    """State and accumulation: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def states_shape(backend: str, B: int, T: int, H: int) -> tuple:
    """The layout of ``rnn_fwd``'s states. CPU: ``[T, B, H]``, ``h_1..h_T`` time-major (each
    step's states one contiguous block, which its GEMM writes in place). Triton: the ``[B, T+1, H]``
    workspace of v0.1, ``h0`` at ``[:, 0]``."""
    return (T, B, H) if backend == "cpu" else (B, T + 1, H)


def output_view(states: torch.Tensor, backend: str) -> torch.Tensor:
    """The ``[B, T, H]`` view of ``h_1..h_T`` in ``states`` (or of their gradient)."""
    return states.transpose(0, 1) if backend == "cpu" else states[:, 1:]
