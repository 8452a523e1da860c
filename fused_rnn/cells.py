"""The recurrent cells, one spec each: the only place a cell's name is looked up.

Every cell shares one skeleton (design notes, section 2b): before the loop one GEMM ``q = x W^T + b``
over all ``B*T`` rows (for token input a ``[V, G*H]`` table gathered by id), per step one product
``[B, H] x [H, G*H]`` and a pointwise update, after the loop the weight gradients as large GEMMs.
A spec says what differs; each backend writes the cell's pointwise maths once (C++: the cell's
branch of the step, Triton: ``ops/triton_cells.py``, the oracle: ``reference.py``), switched at
compile time by :attr:`Cell.name`.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Cell:
    """What the kernels, the planner, the self-check and the dispatch need to know of a cell."""

    name: str  # the compile-time switch passed to every backend
    gates: int  # G: W_hh is [G*H, H]; the step's product yields G*H pre-activations per row
    input_before_product: bool  # True: h_t = act((h_{t-1} + f(p_t)) W^T + b) (the course's cell);
    # False: h_t = act(h_{t-1} W^T + q_t), the input added after the product (nn.RNN's)
    activation: str  # the state's nonlinearity: "tanh" or "relu"
    state: tuple = ("h",)  # the state carried from step to step: ("h",) or ("h", "c")
    saves: tuple = ("h",)  # what the forward keeps for the backward (the rest is recomputed);
    # the gated cells also keep per step ``saved_width * H`` values of their gates
    saved_width: int = 0
    token_input: bool = False  # may take token ids with a [V, H] projection table
    hidden_bias: bool = False  # takes b_h of its own (else every bias is folded into q)
    projection: bool = False  # may project its output h_t = m_t W_hr^T (the LSTM's proj_size)

    @property
    def gated(self) -> bool:
        """The LSTM and GRU: G > 1 gates, their own kernels (ops' ``gated_fwd``/``gated_bwd``)."""
        return self.gates > 1

    def __str__(self) -> str:
        return self.name


COURSE = Cell("course", gates=1, input_before_product=True, activation="tanh",
              token_input=True, hidden_bias=True)
ELMAN_TANH = Cell("elman_tanh", gates=1, input_before_product=False, activation="tanh")
ELMAN_RELU = Cell("elman_relu", gates=1, input_before_product=False, activation="relu")

# nn.LSTM's cell: gate rows i, f, g, o; both biases folded into q; saves c_t and the activated gates.
LSTM = Cell("lstm", gates=4, input_before_product=False, activation="tanh", state=("h", "c"),
            saves=("h", "c", "gates"), saved_width=4, projection=True)
# nn.GRU's cell: gate rows r, z, n; b_hh stays with the product (b_hn sits inside the reset gate);
# saves r, z, n and the product's n rows a_n (h W_hn^T + b_hn).
GRU = Cell("gru", gates=3, input_before_product=False, activation="tanh", saves=("h", "gates"),
           saved_width=4, hidden_bias=True)

VANILLA = (COURSE, ELMAN_TANH, ELMAN_RELU)  # one gate: the ops' rnn_fwd/rnn_bwd
GATED = (LSTM, GRU)
CELLS = {cell.name: cell for cell in VANILLA + GATED}


def get(name) -> Cell:
    """The spec of the cell ``name`` (a :class:`Cell` passes through); ``ValueError`` if unknown."""
    if isinstance(name, Cell):
        return name
    try:
        return CELLS[name]
    except (KeyError, TypeError):
        raise ValueError(f"cell must be one of {tuple(CELLS)}, got {name!r}") from None


def elman(nonlinearity: str) -> Cell:
    """nn.RNN's own cell with ``nonlinearity`` ("tanh" or "relu")."""
    for cell in VANILLA:
        if not cell.input_before_product and cell.activation == nonlinearity:
            return cell
    raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
