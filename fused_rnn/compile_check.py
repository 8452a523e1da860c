"""Compile every Triton kernel configuration the launchers would pick, for a named GPU, without one.

    python -m fused_rnn.compile_check --arch sm_90 --hidden-sizes 1,100,256,1024 \
        --dtypes fp32,bf16,fp16 [--batch-sizes 64,256] [--sm-count 132] [--cells course,elman_tanh,lstm] \
        [--families persistent,blocked]

For each (B, H, dtype, cell) it asks the planner for the persistent forward and backward tilings (and
says when they do not fit) and takes the blocked kernels' configuration, compiles each distinct
kernel for the target (Triton compiles for a named GPU on a CPU-only machine), reads registers,
spills and shared memory from the bundled ``ptxas -v``, and prints one markdown row per kernel.
It exits non-zero when a compile fails, shared memory passes the target's limit, a persistent
kernel spills (the planner counts on none), or the compiled kernel's registers and shared memory
hold fewer programs per SM than the plan's co-residency assumes, or its PTX lacks the barrier's
release arrival or acquire read (a relaxed barrier passes every interpreter test). The blocked
kernels' spills are reported, not failed: they have no co-residency to keep. The gated cells (lstm,
gru) have both families too (`ops/triton_gated_persistent.py`, `ops/triton_gated.py`), compiled
with and without each switch of their code; ``--families`` limits the run to one family.

TRITON_INTERPRET must not be set (the interpreter's kernels cannot be compiled).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import cells as cell_specs

# The dtypes the GPU kernels run, by the name that is also Triton's pointer type ("*fp32").
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
SM_COUNT = {80: 108, 90: 132}  # A100, H100/H200


@dataclass
class KernelConfig:
    """One kernel compiled with one set of constexprs: what the launchers would launch."""
    kernel: str  # "persistent_fwd", "persistent_bwd", "blocked_fwd", "blocked_bwd"; an elman cell's
    # kernels carry it in brackets: "blocked_fwd[elman_relu]"; the gated cells': "gated_fwd[lstm]"
    dtype: str
    B: int
    H: int
    config: str  # human-readable tiling
    fn: object = field(repr=False, default=None)
    signature: dict = field(repr=False, default_factory=dict)
    constexprs: dict = field(repr=False, default_factory=dict)
    num_warps: int = 4
    planned_programs_per_sm: int = 0  # 0: no co-residency assumed (blocked kernels)
    num_stages: int = 3  # Triton's default; the persistent launchers use triton_persistent.NUM_STAGES
    P: int = 0  # the gated kernels' projection width (proj_size, else H); 0: the kernel has no P
    max_registers: Optional[int] = None  # ptxas's maxnreg, as the plan launches it

    @property
    def family(self) -> str:
        """"persistent" or "blocked" (the token-table gradient runs with both: "blocked")."""
        return "persistent" if self.kernel.startswith("persistent") else "blocked"

    def key(self):
        """Configurations with equal keys compile to the same code: H (and P) enter only through
        their specialization (a constant when 1, divisible by 16 or not)."""
        return (self.fn.__name__, tuple(sorted(self.signature.items())),
                tuple(sorted(self.constexprs.items())), self.num_warps, self.num_stages, self.max_registers,
                self.H == 1, self.H % 16 == 0, self.P == 1, self.P % 16 == 0)


def _signature(fn, types: dict, H: int, constexprs: dict, P: int = 0):
    """Signature and divisibility attributes as the runtime specializes a launch: pointers are
    16-byte aligned, H (and P) are marked divisible by 16 when they are, and an int equal to 1 is
    a constant (B, T and the step bounds are not specialized: the kernels mark them
    do_not_specialize)."""
    signature, attrs = {}, {}
    sizes = {"H": H, "P": P}
    constexprs = dict(constexprs)
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = types.get(name, "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in sizes and sizes[name] == 1:
            constexprs[name] = 1
            signature[name] = "constexpr"
        else:
            signature[name] = "i32"
            if name in sizes and sizes[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def kernel_configs(B: int, H: int, dtype: torch.dtype, sm_count: int, arch: int = 90,
                   token_grad: bool = False, cell=cell_specs.COURSE) -> tuple[list, list]:
    """(configs, notes): the kernels the launchers would run for this problem and cell (a
    `cells.Cell` or its name): each input kind (token ids, dense) and, for a cell with a bias of
    its own, with and without it; and a note for each persistent kernel the planner says does not
    fit. ``token_grad``: also the deterministic token-table gradient kernel (it runs in the fp32
    workspace dtype whatever the inputs')."""
    from .ops import planner, triton_persistent, triton_rnn

    cell = cell_specs.get(cell)
    if cell.gated:
        return gated_kernel_configs(B, H, dtype, cell, arch, sm_count)
    tag = "" if cell == cell_specs.COURSE else f"[{cell.name}]"
    t = name = DTYPE_NAMES[dtype]
    inputs = (True, False) if cell.token_input else (False,)  # token ids, dense
    biases = (True, False) if cell.hidden_bias else (False,)
    configs, notes = [], []
    plan = planner.plan_persistent(B, H, dtype, sm_count, arch=arch)
    if plan.fits:
        tiling = dict(BLOCK_B=plan.block_b, BLOCK_N=plan.block_n, H_PAD=plan.h_pad, K_SPLIT=plan.k_split,
                      DOT_PRECISION=plan.precision, STEPWISE=False, CELL=cell.name)
        # The course: token input gathers rows of U, dense input reads P. The elman cells read
        # dense q with the biases in it.
        for tokens in inputs:
            fwd = dict(tiling, TOKENS=tokens, HAS_BIAS=cell.hidden_bias,
                       INPUT_BEFORE_PRODUCT=cell.input_before_product)
            configs.append(KernelConfig(
                "persistent_fwd" + ("" if tokens else "_dense") + tag, name, B, H, plan.describe(),
                triton_persistent.rnn_persistent_fwd_kernel,
                {"proj_ptr": f"*{t}", "ids_ptr": "*i64", "w_h_ptr": f"*{t}", "b_h_ptr": f"*{t}",
                 "arrivals_ptr": "*i32", "error_ptr": "*i32"}, fwd, plan.num_warps, plan.programs_per_sm,
                triton_persistent.NUM_STAGES, max_registers=plan.max_registers))
        configs.append(KernelConfig(
            "persistent_bwd" + tag, name, B, H, plan.describe(), triton_persistent.rnn_persistent_bwd_kernel,
            {"w_h_ptr": f"*{t}", "arrivals_ptr": "*i32", "error_ptr": "*i32"}, tiling,
            plan.num_warps, plan.programs_per_sm, triton_persistent.NUM_STAGES, max_registers=plan.max_registers))
    else:
        notes.append(f"{name} B={B} H={H}{tag}: persistent {plan.describe()}")
    block_b, block_n, block_k = triton_rnn.blocked_block_sizes(B, H, interpret=False)
    blocked = dict(BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k, DOT_PRECISION="ieee", CELL=cell.name)
    config = f"{block_b}x{block_n}x{block_k}, 4 warps"
    for tokens in inputs:
        for bias in biases:
            kind = ("" if tokens else "_dense") + ("" if bias or not cell.hidden_bias else "_nobias")
            configs.append(KernelConfig(
                "blocked_fwd" + kind + tag, name, B, H, config, triton_rnn.rnn_fwd_kernel,
                {"proj_ptr": f"*{t}", "ids_ptr": "*i64", "w_h_ptr": f"*{t}", "b_h_ptr": f"*{t}"},
                dict(blocked, TOKENS=tokens, HAS_BIAS=bias,
                     INPUT_BEFORE_PRODUCT=cell.input_before_product)))
    configs.append(KernelConfig(
        "blocked_bwd" + tag, name, B, H, config, triton_rnn.rnn_bwd_kernel, {"w_h_ptr": f"*{t}"}, blocked))
    if token_grad and cell.token_input:
        block_n = triton_rnn.token_grad_block_n(H)
        configs.append(KernelConfig(
            "token_table_grad", "fp32", B, H, f"16 rows x {block_n}, 4 warps",
            triton_rnn.token_table_grad_kernel, {"order_ptr": "*i64", "seg_start_ptr": "*i64"},
            dict(BLOCK_R=16, BLOCK_N=block_n)))
    return configs, notes


def gated_kernel_configs(B: int, H: int, dtype: torch.dtype, cell, arch: int = 90,
                         sm_count: int | None = None) -> tuple[list, list]:
    """(configs, notes) of the LSTM's or GRU's kernels as the launchers run them: the persistent
    ones (`ops/triton_gated_persistent.py`) where the planner plans them for ``sm_count`` SMs (the
    arch's default when None), else a note; the blocked ones (`ops/triton_gated.py`); each with
    and without what switches its code (the GRU's b_hh; the LSTM's gradient at c_t and, blocked
    only, its projection at P = H // 2)."""
    from .ops import planner, triton_gated, triton_gated_persistent, triton_persistent

    cell = cell_specs.get(cell)
    t = name = DTYPE_NAMES[dtype]
    lstm = "c" in cell.state
    weights = {"q_ptr": f"*{t}", "w_hh_ptr": f"*{t}", "b_hh_ptr": f"*{t}", "w_hr_ptr": f"*{t}"}
    biases = (True, False) if cell.hidden_bias else (False,)
    grads_cs = (True, False) if lstm else (False,)
    configs, notes = [], []
    plan = planner.plan_persistent(B, H, dtype, sm_count or SM_COUNT.get(arch, 108), arch=arch, gates=cell.gates)
    if plan.fits:
        tiling = dict(G=cell.gates, HAS_C=lstm, BLOCK_B=plan.block_b, BLOCK_N=plan.block_n, H_PAD=plan.h_pad,
                      K_SPLIT=plan.k_split, DOT_PRECISION=plan.precision, STEPWISE=False, CELL=cell.name)
        signature = dict(weights, arrivals_ptr="*i32", error_ptr="*i32")
        persistent = dict(num_warps=plan.num_warps, planned_programs_per_sm=plan.programs_per_sm,
                          num_stages=triton_persistent.NUM_STAGES, max_registers=plan.max_registers)
        for bias in biases:
            configs.append(KernelConfig(
                "persistent_fwd" + ("" if bias or not cell.hidden_bias else "_nobias") + f"[{cell.name}]", name, B, H,
                plan.describe(), triton_gated_persistent.gated_persistent_fwd_kernel, signature,
                dict(tiling, HAS_BIAS=bias), **persistent))
        for grad_cs in grads_cs:
            configs.append(KernelConfig(
                "persistent_bwd" + ("_grad_cs" if grad_cs else "") + f"[{cell.name}]", name, B, H, plan.describe(),
                triton_gated_persistent.gated_persistent_bwd_kernel, signature,
                dict(tiling, HAS_GRAD_CS=grad_cs, N_ROWS_SCALED=cell is cell_specs.GRU),
                **persistent))
    else:
        notes.append(f"{name} B={B} H={H}[{cell.name}]: persistent {plan.describe()}")
    for proj in (False, True) if cell.projection and H > 1 else (False,):
        P = H // 2 if proj else H
        tiles = triton_gated.gated_config(B, H, P, dtype, arch, interpret=False)
        config = f"{tiles.block_b}x{tiles.block_n}x{tiles.block_k}, 4 warps, {tiles.num_stages} stages"
        common = dict(G=cell.gates, HAS_C=lstm, BLOCK_B=tiles.block_b, BLOCK_N=tiles.block_n,
                      BLOCK_K=tiles.block_k, DOT_PRECISION="ieee", CELL=cell.name)
        tag = ("_proj" if proj else "") + f"[{cell.name}]"
        for bias in biases:
            configs.append(KernelConfig(
                "gated_fwd" + ("" if bias or not cell.hidden_bias else "_nobias") + tag, name, B, H,
                config + (f", P={P}" if proj else ""), triton_gated.gated_fwd_kernel, weights,
                dict(common, HAS_BIAS=bias, PROJ=proj), num_stages=tiles.num_stages, P=P))
        for grad_cs in grads_cs:
            configs.append(KernelConfig(
                "gated_bwd" + ("_grad_cs" if grad_cs else "") + tag, name, B, H,
                config + (f", P={P}" if proj else ""), triton_gated.gated_bwd_kernel, weights,
                dict(common, HAS_GRAD_CS=grad_cs, PROJ=proj, N_ROWS_SCALED=cell is cell_specs.GRU),
                num_stages=tiles.num_stages, P=P))
    return configs, notes


# The group barrier as the GPU runs it: a release arrival (this step's stores ordered before it)
# and acquire reads of the counter (the siblings' stores ordered before what follows). Only the
# compiled code can show a relaxed barrier: the interpreter's atomics are sequentially consistent.
_PTX_RELEASE = re.compile(r"\batom\.global\.gpu\.(?:release|acq_rel)\.add\b")
_PTX_ACQUIRE = re.compile(r"\b(?:ld|atom)\.global\.gpu\.(?:acquire|acq_rel)\b")
_PTXAS_USAGE = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_config(cfg: KernelConfig, arch: int) -> dict:
    """Compiles for sm_<arch>; returns registers, spill_bytes, shared_bytes and release_acquire
    (whether the PTX has a release atomic add and an acquire read, as the barrier needs)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    signature, constexprs, attrs = _signature(cfg.fn, cfg.signature, cfg.H, cfg.constexprs, cfg.P)
    src = ASTSource(fn=cfg.fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                                       "maxnreg": cfg.max_registers})
    ptx = compiled.asm["ptx"]
    gpu_name = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu_name}", path,
                              "-o", os.path.join(tmp, "kernel.cubin")],
                             capture_output=True, text=True, check=True).stderr
    spills = _PTXAS_SPILL.search(log)
    return {"registers": int(_PTXAS_USAGE.search(log).group(1)),
            "spill_bytes": int(spills.group(1)) + int(spills.group(2)) if spills else 0,
            "shared_bytes": int(compiled.metadata.shared),
            "release_acquire": bool(_PTX_RELEASE.search(ptx) and _PTX_ACQUIRE.search(ptx))}


def check(configs_by_problem, arch: int, out=sys.stdout) -> list:
    """Compiles every distinct kernel, prints the table; returns a list of failure messages."""
    from .ops import planner

    shared_limit = planner.shared_per_block(arch)
    print("| kernel | dtype | B | H | config | registers | spill_bytes | shared_bytes | programs_per_sm |",
          file=out)
    print("|---|---|---|---|---|---|---|---|---|", file=out)
    failures, cache = [], {}
    for cfg in configs_by_problem:
        key = cfg.key()
        if key not in cache:
            try:
                cache[key] = compile_config(cfg, arch)
            except Exception as exc:  # a compile failure is a finding, not a crash
                cache[key] = exc
        res = cache[key]
        label = f"{cfg.kernel} {cfg.dtype} B={cfg.B} H={cfg.H}"
        if isinstance(res, Exception):
            first = str(res).strip().splitlines()[0] if str(res).strip() else type(res).__name__
            print(f"| {cfg.kernel} | {cfg.dtype} | {cfg.B} | {cfg.H} | {cfg.config} | compile failed: "
                  f"{first[:80]} | | | |", file=out)
            failures.append(f"{label}: compile failed: {first}")
            continue
        per_sm = planner.programs_per_sm(res["registers"], res["shared_bytes"], cfg.num_warps, arch)
        print(f"| {cfg.kernel} | {cfg.dtype} | {cfg.B} | {cfg.H} | {cfg.config} | {res['registers']} | "
              f"{res['spill_bytes']} | {res['shared_bytes']} | {per_sm} |", file=out, flush=True)
        if res["shared_bytes"] > shared_limit:
            failures.append(f"{label}: {res['shared_bytes']} bytes of shared memory, sm_{arch} allows "
                            f"{shared_limit}")
        if cfg.planned_programs_per_sm:
            if res["spill_bytes"]:
                failures.append(f"{label}: spills {res['spill_bytes']} bytes; the planner counted on none")
            if per_sm < cfg.planned_programs_per_sm:
                failures.append(f"{label}: {per_sm} programs fit per SM, the plan assumes "
                                f"{cfg.planned_programs_per_sm}")
            if not res["release_acquire"]:
                failures.append(f"{label}: the barrier's PTX lacks a release arrival or an acquire read")
    return failures


def _ints(s):
    return [int(v) for v in s.split(",") if v.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_rnn.compile_check", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="sm_90", help="sm_90 (H100/H200) or sm_80 (A100)")
    parser.add_argument("--hidden-sizes", default="1,100,256,300,384,512,1000,1024", type=_ints)
    parser.add_argument("--dtypes", default="fp32,bf16,fp16")
    parser.add_argument("--batch-sizes", default="64,256", type=_ints)
    parser.add_argument("--cells", default=",".join(cell_specs.CELLS),
                        help="the recurrence cells to compile (fused_rnn.cells)")
    parser.add_argument("--families", default="persistent,blocked",
                        help="the kernel families to compile: persistent, blocked (with the token-table "
                             "gradient)")
    parser.add_argument("--sm-count", type=int, default=None,
                        help="SMs the planner plans for (default: 132 for sm_90, 108 for sm_80)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    match = re.fullmatch(r"sm_(\d+)a?", args.arch)
    if not match:
        parser.error(f"--arch must look like sm_90, got {args.arch!r}")
    arch = int(match.group(1))
    sm_count = args.sm_count or SM_COUNT.get(arch, 108)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            parser.error(f"--dtypes: {d!r} is not one of {sorted(DTYPES)}")
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    for c in cells:
        if c not in cell_specs.CELLS:
            parser.error(f"--cells: {c!r} is not one of {tuple(cell_specs.CELLS)}")
    families = {f.strip() for f in args.families.split(",") if f.strip()}
    if not families or not families <= {"persistent", "blocked"}:
        parser.error(f"--families: expected persistent and/or blocked, got {args.families!r}")
    configs, notes = [], []
    for cell in cells:
        for d in dtypes:
            for H in args.hidden_sizes:
                for B in args.batch_sizes:
                    c, n = kernel_configs(B, H, DTYPES[d], sm_count, arch, cell=cell,
                                          token_grad=d == dtypes[0] and B == args.batch_sizes[0])
                    configs += [cfg for cfg in c if cfg.family in families]
                    notes += n if "persistent" in families else []
    print(f"Triton kernels compiled for sm_{arch} ({sm_count} SMs planned for)\n")
    failures = check(configs, arch)
    for note in notes:
        print(f"- {note}")
    for failure in failures:
        print(f"FAIL: {failure}")
    print(f"\n{len(configs)} kernel configurations, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
