"""Which persistent split-H tiling runs a problem, or why none does.

The persistent kernels (`triton_persistent.py`; the LSTM's and GRU's: `triton_gated_persistent.py`,
their own tables below) need every program of the grid resident at once:
a program waits each step for its group's siblings. So a plan is a tiling plus the co-residency it
counts on: ``programs_per_sm`` programs of ``num_warps`` warps fit on one SM by the registers and
shared memory the compiled kernels use, and ``groups * col_blocks <= sm_count * programs_per_sm``. `fused_rnn.compile_check`
compiles every plan for a named GPU and fails if the compiler's numbers break that assumption
or spill. One function, :func:`plan_persistent`, is used by the launchers and by the check.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

# Per-SM limits of the GPUs the plans are made for (sm_80 and sm_90 share the register file
# and thread limits; shared memory differs): 64K registers, 2048 threads, 32 resident blocks.
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SHARED_PER_SM = {80: 167936, 86: 102400, 89: 102400, 90: 233472, 100: 233472, 120: 102400}
SHARED_PER_BLOCK = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
SHARED_RESERVED_PER_BLOCK = 1024  # the driver keeps 1 KB of shared memory per resident block


def shared_per_sm(arch: int) -> int:
    """Shared memory per SM of compute capability ``arch``; an unknown one gets the smallest."""
    return SHARED_PER_SM.get(arch, min(SHARED_PER_SM.values()))


def shared_per_block(arch: int) -> int:
    """The most shared memory one block may use on ``arch``; an unknown one gets the smallest."""
    return SHARED_PER_BLOCK.get(arch, min(SHARED_PER_BLOCK.values()))

# The one-gate persistent kernels form a step's [BLOCK_B, H] x [H, BLOCK_N] product as H_PAD / 32
# independent dots of K = 32, summed: one dot over all of H is a chain per output that waits on
# each operand load. Measured (benchmarks/step_probe.py, H200, fp32 IEEE, H=256, 16x16 4 warps,
# with the barrier): 7.33 -> 3.93 us a step at B=64, 11.13 -> 6.26 at B=256; K chunks of 16 the
# same, of 64 no gain; at H=512 16x32 4 warps, chunks of 128: 40 -> 24 us without the barrier (not
# in the table: that tiling spills 2 KB in bf16).
K_CHUNK = 32
ONE_DOT = 1 << 30  # a k_chunk no H_PAD reaches: the product as one dot


class Tiling(NamedTuple):
    """One persistent tiling and the co-residency a grid of it counts on."""
    block_b: int  # batch rows per group
    block_n: int  # columns (hidden units) per program
    warps: int
    per_sm: int  # programs per SM where H is a multiple of 16
    per_sm_odd: int  # where it is not (rows not 16-byte aligned: scalar loads, more registers); 0: not used
    # ptxas's maxnreg for the launch, where its own choice spills (None: its choice). A cap is
    # no cure-all: under one ptxas tends to take every register it may, and spills where it would
    # not have (the course's bf16 forward at H_PAD=1024: 24 bytes under 232-255, none and 150
    # registers without).
    max_registers: Optional[int] = None
    # K's chunk: the product runs as H_PAD / k_chunk independent chains (Plan.k_split)
    k_chunk: int = 0  # 0: K_CHUNK


# Tilings in order of preference, per padded H. Smaller column blocks spread a step over more
# SMs; a larger one is the fallback when the grid would not be resident. The kernels multiply in
# fp32 for fp32, bf16 and fp16 weights alike (half weights are upcast once, on chip), so one
# table serves all three. `python -m fused_rnn.compile_check` re-checks every plan against these
# assumptions. An H_PAD not in a table: the persistent path does not fit and the blocked kernels run.
#
# One gate (course, Elman), compiled for sm_90 (Triton 3.6, ptxas -v), the product's K in chunks
# of K_CHUNK unless a tiling says otherwise; the most registers over the cells and dtypes, fwd / bwd
# (odd H, not a multiple of 16, in brackets):
#   H<=64  16x16 4 warps under maxnreg 168: <= 100 / 88 (146 / 111)       -> 3 per SM (2)
#          (ptxas' own choice, 40, spilled 12 bytes in the fp16 Elman forward at H=16 on sm_80)
#   128    16x16 4 warps under maxnreg 255: 115 / 96 (192 / 156)          -> 2 (2)
#          (ptxas' own choice, 64, spilled 8-24 bytes in the bf16 backward; a cap of 128 spilled at H=100)
#   256    16x16 4 warps: 182 / 145 (227 / 154); 16x32: 168 / 160 (244 / 255) -> 2 (2)
#          (a cap of 168 for 3 per SM spilled 24 bytes in the backward)
#   512    16x16 8 warps, chunks of 64, maxnreg 255: 152 / 162 (226 / 174) -> 1 (1)
#          (ptxas' own choice, 128, spilled 8 bytes in the Elman forward at H=300 on sm_80)
#          16x32 4 warps, K whole, maxnreg 255: 255 / 244                 -> 2 (1)
#          (chunks of 128: 2 KB spilled in the bf16 forward; 16x16 8 warps under a cap of 128: 16-72 bytes)
#   1024   16x16 and 16x32 8 warps, chunks of 256: 195 / 128              -> 1 (none at H_PAD=1024)
# Spilled before the K chunks too, so left out: 32x16 at H=512, 16x64 (bwd) at H=256, 16x16 4 warps
# at H=1024; and bf16 tensor-core (mma) tiles with all of H as K: 250 registers at H=256, 500-1600
# bytes of spills at H=512.
_SMALL = [Tiling(16, 16, 4, 3, 2, 168), Tiling(16, 32, 4, 3, 2, 168)]
_ONE_GATE = {16: _SMALL, 32: _SMALL, 64: _SMALL,
             128: [Tiling(16, 16, 4, 2, 2, 255), Tiling(16, 32, 4, 2, 2, 255)],
             256: [Tiling(16, 16, 4, 2, 2), Tiling(16, 32, 4, 2, 2)],
             512: [Tiling(16, 16, 8, 1, 1, 255, k_chunk=64), Tiling(16, 32, 4, 2, 1, 255, k_chunk=ONE_DOT)],
             1024: [Tiling(16, 16, 8, 1, 0, k_chunk=256), Tiling(16, 32, 8, 1, 0, k_chunk=256)]}

# The LSTM (G = 4) and GRU (G = 3): G W_hh tiles [H_PAD, BLOCK_N] in shared memory, 4*H_PAD*(G*BLOCK_N
# + 16) bytes (LSTM 16x16: 20 KB at H_PAD=64, 80 KB at 256, 160 KB at 512; H_PAD=1024 does not fit).
# Compiled (Triton 3.6, ptxas -v) at H = 16, 32, 64, 128, 256, 512 and, not multiples of 16, at
# H = 13, 20, 50, 100, 200, 300: registers fwd / bwd (odd H in brackets) -> programs per SM, the
# lower of the two directions (and of H_PAD 16, 32, 64 for "<=64"; at 256 and 512 with each
# product as one dot, as all of them were then: in K chunks, below):
#   sm_90          LSTM                              GRU
#   <=64  16x16 4w 86/64 (96/76) -> 5 (5)            80/70 (104/72) -> 6 (4)
#         16x32 4w 114/71 (140/138) -> 4 (3)         120/72 (162/95) -> 4 (3)
#   128   16x16 8w 76/48 (80/60) -> 3 (3)            78/64 (80/64, without b_hh 84/64) -> 3 (2)
#         16x16 4w                                   140/80 (142/116, without b_hh 148) -> 3 (3)
#         16x32 4w 162/70 (168/153) -> 3 (3)         156/80 (166/127) -> 3 (3)
#   256   16x16 4w 166/96 (166/160) -> 2 (2)         156/150 (158/194) -> 3 (2)
#         16x16 8w 113/63 (113/80) -> 2 (2)          116/76 (140/80) -> 2 (1)
#   512   16x16 8w 128/108 (128/154) -> 1 (1)        128/128 (128/150) -> 1 (1)
#   sm_80
#   <=64  16x16 4w 108/64 (110/80) -> 4 (4)          106/72 (108/78; H=20 without b_hh: 8 B spilled)
#         16x16 8w                                   64/64 (80/64) -> 4 (3)
#         16x32 4w 128/64 (160/127) -> 4 (3)         128/72 (156/95) -> 4 (3)
#   128   16x16 8w 80/63 (80/64) -> 3 (3)            90/64 (90/64) -> 2 (2)
#         16x32 8w 124/60 (128/80) -> 2 (2)          126/64 (112/80) -> 2 (2)
#   256   16x16 4w 210/152 (254/168, 48 B spilled)   214/154 (233/168, 24 B spilled)
#                  -> 2 (-)                          -> 2 (-)
#         16x16 8w 178/64 (178/121) -> 1 (1)         172/80 (172/124) -> 1 (1)
#   512   16x16 8w 206/120 (255/183) -> 1 (1)        204/128 (221/218) -> 1 (1)
# (The GRU's forward without b_hh and the LSTM's backward without a gradient at c_t compile apart;
# python -m fused_rnn.compile_check checks them too.) Of 4 and 8 warps, the one that holds more
# programs (4 at a tie on sm_90 for the LSTM, measured below; 8 elsewhere: a thread computes one output
# instead of two). Left out:
# 16x32 from H_PAD=256 (sm_90 LSTM fwd: 16 B spilled at 8 warps, 41 KB at 4; GRU 8 B, 36 KB) and
# 16x16 4 warps at H_PAD=512 (3-60 KB spilled: ptxas falls back to 32 registers).
# The products (forward and backward) in K chunks of 32 on sm_90 from H_PAD=256 (below it one dot:
# chunked, the backward spilled or held fewer programs), registers fwd / bwd (odd H in brackets):
#   256   LSTM 16x16 4w 255 / 168, GRU 254 / 167: by the arithmetic 2 per SM, planned for 1 (B <= 128)
#         until a GPU has launched them at 2: at the register file's edge, where the GRU's 8-warp
#         tiling failed its cooperative launch at a planned 2 (below). Larger B: the one-dot tilings
#         measured at B=256. Odd H: one dot (the chunked bf16/fp16 LSTM forward spilled 16 bytes).
#   512   LSTM 16x16 8w 255 / 167 (255 / 189), GRU 250 / 177 (254 / 204) -> 1
# (chunks of 64 at H_PAD=256, 4 warps: ~1.2 KB spilled in the forward). On sm_80 the chunked
# forward spilled 40-192 bytes at H_PAD=256 and 512: one dot there, both directions.
# Measured on an H200 (benchmarks/tune_persistent.py, fp32, T=512, H=256): the LSTM's 16x16 tiles
# at 4 warps against 8: forward 11.5 / 19.8 ms at B=64, 21.5 / 38.9 at B=256 (so 4 warps, not 8 at
# a tie); the GRU's 16x16 8 warps at B=256 (2 per SM) failed its cooperative launch ("too
# many resources"): 1 per SM. (That run's fwd+bwd times had the backward on the blocked kernels:
# the persistent backward, chunked or not, is yet to be timed.) The bf16 forwards, checked later: the LSTM's at odd H <= 64 holds 4 per SM on sm_90 and spilled 8 bytes
# under 16x16 on sm_80 (odd H there take 16x32); the GRU's at H=64 holds 5 on sm_90.
_LSTM_SM90 = {**dict.fromkeys((16, 32, 64), [Tiling(16, 16, 4, 5, 4, k_chunk=ONE_DOT),
                                              Tiling(16, 32, 4, 4, 3, k_chunk=ONE_DOT)]),
              128: [Tiling(16, 16, 8, 3, 3, k_chunk=ONE_DOT), Tiling(16, 32, 4, 3, 3, k_chunk=ONE_DOT)],
              256: [Tiling(16, 16, 4, 1, 0), Tiling(16, 16, 4, 2, 2, k_chunk=ONE_DOT)],
              512: [Tiling(16, 16, 8, 1, 1)]}
_GRU_SM90 = {**dict.fromkeys((16, 32, 64), [Tiling(16, 16, 4, 5, 4, k_chunk=ONE_DOT),
                                             Tiling(16, 32, 4, 4, 3, k_chunk=ONE_DOT)]),
             128: [Tiling(16, 16, 4, 3, 3, k_chunk=ONE_DOT), Tiling(16, 32, 4, 3, 3, k_chunk=ONE_DOT)],
             256: [Tiling(16, 16, 4, 1, 0), Tiling(16, 16, 4, 3, 0, k_chunk=ONE_DOT),
                   Tiling(16, 16, 8, 1, 1, k_chunk=ONE_DOT)],
             512: [Tiling(16, 16, 8, 1, 1)]}
_LSTM_SM80 = {**dict.fromkeys((16, 32, 64), [Tiling(16, 16, 4, 4, 0, k_chunk=ONE_DOT),
                                              Tiling(16, 32, 4, 4, 3, k_chunk=ONE_DOT)]),
              128: [Tiling(16, 16, 8, 3, 3, k_chunk=ONE_DOT), Tiling(16, 32, 8, 2, 2, k_chunk=ONE_DOT)],
              256: [Tiling(16, 16, 4, 2, 0, k_chunk=ONE_DOT), Tiling(16, 16, 8, 1, 1, k_chunk=ONE_DOT)],
              512: [Tiling(16, 16, 8, 1, 1, k_chunk=ONE_DOT)]}
_GRU_SM80 = {**dict.fromkeys((16, 32, 64), [Tiling(16, 16, 8, 4, 3, k_chunk=ONE_DOT),
                                             Tiling(16, 32, 4, 4, 3, k_chunk=ONE_DOT)]),
             128: [Tiling(16, 16, 8, 2, 2, k_chunk=ONE_DOT), Tiling(16, 32, 8, 2, 2, k_chunk=ONE_DOT)],
             256: [Tiling(16, 16, 4, 2, 0, k_chunk=ONE_DOT), Tiling(16, 16, 8, 1, 1, k_chunk=ONE_DOT)],
             512: [Tiling(16, 16, 8, 1, 1, k_chunk=ONE_DOT)]}
# By (gates, 90 or 80): sm_90 and newer take sm_90's table, older GPUs sm_80's (its ptxas takes
# more registers for the gated kernels); the shared memory per SM is each arch's own (below).
_TABLES = {(1, 90): _ONE_GATE, (1, 80): _ONE_GATE, (4, 90): _LSTM_SM90, (4, 80): _LSTM_SM80,
           (3, 90): _GRU_SM90, (3, 80): _GRU_SM80}


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def k_split(h_pad: int, k_chunk: int = 0) -> int:
    """How many chunks of ``k_chunk`` (0: K_CHUNK) a product's K = H_PAD runs in."""
    return max(1, h_pad // (k_chunk or K_CHUNK))


def padded_h(H: int) -> int:
    """H rounded up to the power of two (at least 16) the persistent tables are keyed by."""
    return max(16, _next_power_of_2(H))


def programs_per_sm(registers: int, shared: int, num_warps: int, arch: int = 90) -> int:
    """How many programs of this kernel one SM holds at once, by registers, shared memory,
    threads and the block limit (the occupancy calculator's arithmetic)."""
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256  # allocated in units of 256 per warp
    by_registers = REGISTERS_PER_SM // (regs_per_warp * num_warps)
    by_warps = MAX_WARPS_PER_SM // num_warps
    by_shared = shared_per_sm(arch) // (shared + SHARED_RESERVED_PER_BLOCK)
    return max(0, min(by_registers, by_warps, by_shared, MAX_BLOCKS_PER_SM))


@dataclass(frozen=True)
class Plan:
    """A persistent tiling, or (``fits=False``) the reason there is none."""
    fits: bool
    reason: str = ""
    block_b: int = 0  # batch rows per group
    block_n: int = 0  # output columns per program
    h_pad: int = 0  # H rounded up to a power of two (tl.arange), masked inside the kernel
    num_warps: int = 4
    precision: str = "ieee"  # tl.dot input_precision
    groups: int = 0  # grid axis 0
    col_blocks: int = 0  # grid axis 1: programs per group (the barrier's arrival count)
    programs_per_sm: int = 0  # co-residency the grid counts on (0: stepwise, no barrier)
    max_registers: Optional[int] = None  # the launch's maxnreg (Tiling.max_registers)
    k_split: int = 1  # the product's K in this many chunks (K_CHUNK)

    @property
    def grid(self) -> tuple:
        return (self.groups, self.col_blocks)


    def describe(self) -> str:
        if not self.fits:
            return f"does not fit: {self.reason}"
        return (f"{self.block_b}x{self.block_n} of H_PAD={self.h_pad}, {self.num_warps} warps, "
                f"K in {self.k_split}, {self.precision}, grid {self.groups}x{self.col_blocks}")


def shared_bytes(block_b: int, block_n: int, h_pad: int, gates: int = 1) -> int:
    """Shared memory the kernels take (what the compiler reported for every tiling above and
    below): the fp32 W_h slice, one [H_PAD, BLOCK_N] tile per gate, and one fp32 operand tile
    [BLOCK_B, H_PAD] (the gated backward multiplies one gate at a time through it)."""
    return 4 * h_pad * (gates * block_n + block_b)


def plan_persistent(B: int, H: int, dtype: torch.dtype, sm_count: Optional[int], *,
                    allow_tf32: bool = False, stepwise: bool = False, arch: int = 90,
                    gates: int = 1, projection: bool = False) -> Plan:
    """The persistent tiling for a ``[B, H]`` state in ``dtype`` on a GPU with ``sm_count`` SMs
    of compute capability ``arch`` (90: H100/H200, 80: A100; it sets the shared memory per SM),
    for a cell of ``gates`` gates (1: `triton_persistent.py`; the LSTM's 4 and the GRU's 3:
    `triton_gated_persistent.py`); ``projection``: the LSTM's proj_size, which has no persistent
    kernel.

    ``stepwise=True`` (the interpreter: one launch per step, no barrier, no co-residency): the
    smallest tiles, for every float dtype, so tests see many groups and column blocks.
    Otherwise the first tiling of the table whose whole grid is resident at once; none: a Plan
    with ``fits=False`` and the reason (the blocked kernels run).
    """
    if B < 1 or H < 1:
        raise ValueError(f"B and H must be >= 1, got B={B}, H={H}")
    if (gates, 90) not in _TABLES:
        raise ValueError(f"gates must be one of {sorted({g for g, _ in _TABLES})}, got {gates}")
    if projection:
        return Plan(False, "proj_size has no persistent kernel (the blocked kernels project)")
    h_pad = padded_h(H)
    if stepwise:
        precision = "tf32" if (dtype == torch.float32 and allow_tf32) else "ieee"
        return Plan(True, "stepwise", 16, 16, h_pad, 4, precision, -(-B // 16), -(-H // 16), 0,
                    k_split=k_split(h_pad))
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        # fp64 is there for gradcheck: the blocked kernels run it on a GPU
        return Plan(False, f"no persistent tiling for {dtype}")
    if dtype == torch.float32 and allow_tf32:
        # tf32x3 tiles spilled at H=256 and 512 in the compile probe; TF32 is opt-in
        return Plan(False, "allow_tf32 has no persistent tiling yet")
    tilings = _TABLES[(gates, 90 if arch >= 90 else 80)].get(h_pad)
    if tilings is None:
        return Plan(False, f"H={H} (padded {h_pad}) has no tiling that keeps W_h on chip"
                           + (f" for {gates} gates" if gates > 1 else ""))
    if sm_count is None or sm_count < 1:
        raise ValueError(f"sm_count must be a positive int for a persistent plan, got {sm_count}")
    smem_per_sm, smem_per_block = shared_per_sm(arch), shared_per_block(arch)
    for tiling in tilings:
        block_b, block_n, warps = tiling.block_b, tiling.block_n, tiling.warps
        shared = shared_bytes(block_b, block_n, h_pad, gates)
        per_sm = tiling.per_sm_odd if H % 16 else tiling.per_sm
        if block_n > h_pad or shared > smem_per_block or per_sm < 1:
            continue
        per_sm = min(per_sm, smem_per_sm // (shared + SHARED_RESERVED_PER_BLOCK))
        groups, col_blocks = -(-B // block_b), -(-H // block_n)
        if groups * col_blocks <= sm_count * per_sm:
            return Plan(True, "", block_b, block_n, h_pad, warps, "ieee", groups, col_blocks, per_sm,
                        tiling.max_registers, k_split(h_pad, tiling.k_chunk))
    if H % 16 and not any(t.per_sm_odd for t in tilings):
        return Plan(False, f"H={H} is not a multiple of 16: its tilings at H_PAD={h_pad} spill")
    block_b, block_n = tilings[-1].block_b, tilings[-1].block_n
    need = -(-B // block_b) * -(-H // block_n)
    return Plan(False, f"B={B}, H={H} needs {need} resident programs with the largest tiling "
                       f"({block_b}x{block_n}); {sm_count} SMs hold fewer")
