"""The C++ CPU extension (csrc/): built by setup.py, or just in time on first use.

Exposes the same two entry points as the Triton backend, ``rnn_fwd`` and ``rnn_bwd``; its states
are time-major, ``[T, B, H]`` (see ``fused_rnn.ops.states_shape``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

# The C++ source: inside the installed package, or in the source checkout (editable installs).
_CANDIDATES = [Path(__file__).resolve().parents[1] / "csrc", Path(__file__).resolve().parents[2] / "csrc"]
SOURCES = [next((d for d in _CANDIDATES if (d / "fused_rnn_cpu.cpp").exists()), _CANDIDATES[-1])
           / "fused_rnn_cpu.cpp"]
CPU_FLAGS = ["-O3", "-fno-trapping-math", "-ffp-contract=fast"]  # as in setup.py
_ext = None  # the loaded module, or the reason it could not be loaded (a str)


def load():
    """The extension module; raises RuntimeError saying how to fix it when it cannot be loaded."""
    global _ext
    if _ext is None:
        _ext = _load()
    if isinstance(_ext, str):
        raise RuntimeError(_ext)
    return _ext


def unavailable_reason():
    """None when the extension loads, else why not (builds it if needed)."""
    try:
        load()
    except RuntimeError as exc:
        return str(exc)
    return None


def _load():
    try:
        from fused_rnn import _C  # built by setup.py

        return _C
    except ImportError:
        pass
    if not all(p.exists() for p in SOURCES):
        return ("the fused_rnn CPU extension was not built and its source (csrc/) is missing; "
                "reinstall from a source checkout: pip install --no-build-isolation .")
    try:
        from torch.utils.cpp_extension import load as build

        if not _cached_build_is_current():
            print("fused_rnn: building the CPU extension (once; cached for later runs)...", file=sys.stderr)
        return build(name="fused_rnn_cpu", sources=[str(p) for p in SOURCES],
                     extra_cflags=CPU_FLAGS,
                     verbose=os.environ.get("FUSED_RNN_VERBOSE_BUILD") == "1")
    except Exception as exc:  # no compiler, no ninja, compile error
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return (f"the fused_rnn CPU extension could not be built ({first}); it needs a C++ compiler "
                f"and ninja (pip install ninja). Set FUSED_RNN_VERBOSE_BUILD=1 to see the build log.")


def _cached_build_is_current() -> bool:
    """Whether torch's build cache holds a build newer than the source, so that loading it
    compiles nothing (and the "building" line would be wrong): built from this checkout's source
    (the cache is shared by every checkout), after its last change."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        folder = Path(_get_build_directory("fused_rnn_cpu", verbose=False))
        built = (folder / "fused_rnn_cpu.so").stat().st_mtime
        same_source = all(str(p) in (folder / "build.ninja").read_text() for p in SOURCES)
        return same_source and built >= max(p.stat().st_mtime for p in SOURCES)
    except Exception:  # no build yet, or torch's private helper moved: say it builds
        return False


def rnn_fwd(proj, ids, w_h, b_h, h0, allow_tf32=False, cell="course"):
    return load().rnn_fwd(proj, ids, w_h, b_h, h0, cell)


def rnn_bwd(grad_out, grad_h_n, states, h0, proj, ids, w_h, has_bias, allow_tf32=False, cell="course"):
    return tuple(load().rnn_bwd(grad_out, grad_h_n, states, h0, proj, ids, w_h, has_bias, cell))
