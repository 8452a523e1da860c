"""The C++ CPU extension (csrc/): built by setup.py, or just in time on first use.

Exposes the same two entry points as the Triton backend, ``rnn_fwd`` and ``rnn_bwd``; its states
are time-major, ``[T, B, H]`` (see ``fused_rnn.ops.states_shape``).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Optional


from .. import cells

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

# The C++ source: inside the installed package, or in the source checkout (editable installs).
_CANDIDATES = [Path(__file__).resolve().parents[1] / "csrc", Path(__file__).resolve().parents[2] / "csrc"]
SOURCES = [next((d for d in _CANDIDATES if (d / "fused_rnn_cpu.cpp").exists()), _CANDIDATES[-1])
           / "fused_rnn_cpu.cpp"]
CPU_FLAGS = ["-O3", "-fno-trapping-math", "-ffp-contract=fast", "-fopenmp"]  # as in setup.py (why: there)
NAME = "fused_rnn_cpu"
STALE_LOCK_S = 900  # where flock is unavailable: no build of this one file takes this long
_ext = None  # the loaded module, or the reason it could not be loaded (a str)


def load():
    """The extension module; raises RuntimeError saying how to fix it when it cannot be loaded."""
    global _ext
    if _ext is None:
        _ext = _load()
    if isinstance(_ext, str):
        raise RuntimeError(_ext)
    return _ext


def loaded():
    """The extension module if it has been loaded already, else None (builds nothing)."""
    return None if _ext is None or isinstance(_ext, str) else _ext


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
    folder = _build_directory()
    try:
        from torch.utils.cpp_extension import load as build

        with _sole_builder(folder) as problem:
            if problem is not None:
                return problem
            if not _cached_build_is_current(folder):
                print("fused_rnn: building the CPU extension (once; cached for later runs)...", file=sys.stderr)
            return build(name=NAME, sources=[str(p) for p in SOURCES], extra_cflags=CPU_FLAGS,
                         extra_ldflags=["-fopenmp"],
                         build_directory=str(folder) if folder is not None else None,
                         verbose=os.environ.get("FUSED_RNN_VERBOSE_BUILD") == "1")
    except Exception as exc:  # no compiler, no ninja, compile error
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return (f"the fused_rnn CPU extension could not be built ({first}); it needs a C++ compiler "
                f"and ninja (pip install ninja). Set FUSED_RNN_VERBOSE_BUILD=1 to see the build log.")


def _build_directory() -> Optional[Path]:
    """torch's build cache folder for the extension (created if missing), or None if torch's
    private helper moved (then torch picks it, and stale locks are not looked for)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(NAME, verbose=False))
    except Exception:
        return None


@contextlib.contextmanager
def _sole_builder(folder: Optional[Path]):
    """Held around the build; yields None, or the one line to stop with instead of building.

    torch guards the build folder with a file ``lock`` that names no owner: a build killed
    midway leaves it behind, and torch then waits on it forever. So every build from here holds
    an flock on a side file, which the kernel drops when its holder dies: a ``lock`` found while
    holding the flock has no live owner, and is removed. Without flock, a ``lock`` older than
    any build of this one file is reported instead of waited on.
    """
    if folder is None:
        yield None
        return
    with contextlib.ExitStack() as held:
        if _hold_flock(folder / "fused_rnn_build.flock", held):
            yield _remove_stale_lock(folder / "lock")
        else:
            yield _wait_for_lock(folder / "lock")


def _hold_flock(path: Path, held: contextlib.ExitStack) -> bool:
    """Takes the builders' flock (after any running build), kept until ``held`` closes; False
    where flock is unavailable."""
    if fcntl is None:
        return False
    try:
        side = held.enter_context(open(path, "a"))
        try:
            fcntl.flock(side, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("fused_rnn: waiting for another process to build the CPU extension...", file=sys.stderr)
            fcntl.flock(side, fcntl.LOCK_EX)
        return True
    except OSError:  # a read-only cache, or a file system without flock
        return False


def _remove_stale_lock(lock: Path) -> Optional[str]:
    try:
        lock.unlink()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return (f"the fused_rnn CPU extension's build is blocked by {lock}, left by a build that was "
                f"stopped, and it cannot be removed ({exc.strerror}): delete that file")
    print(f"fused_rnn: removed {lock}, left by a build that was stopped", file=sys.stderr)
    return None


def _wait_for_lock(lock: Path) -> Optional[str]:
    """Waits while ``lock`` is young enough to belong to a running build: None once it is gone,
    else the line saying to delete it."""
    waited = False
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return None
        if age > STALE_LOCK_S:
            return (f"the fused_rnn CPU extension's build is blocked by {lock}, {age / 60:.0f} minutes "
                    f"old: a build that was stopped left it; if no build is running, delete that file")
        if not waited:
            print(f"fused_rnn: waiting for {lock} (another build's; if none is running, delete it)",
                  file=sys.stderr)
            waited = True
        time.sleep(1.0)


def _cached_build_is_current(folder: Optional[Path] = None) -> bool:
    """Whether torch's build cache holds a build newer than the source, so that loading it
    compiles nothing (and the "building" line would be wrong): built from this checkout's source
    (the cache is shared by every checkout), after its last change."""
    try:
        folder = folder or _build_directory()
        built = (folder / f"{NAME}.so").stat().st_mtime
        same_source = all(str(p) in (folder / "build.ninja").read_text() for p in SOURCES)
        return same_source and built >= max(p.stat().st_mtime for p in SOURCES)
    except Exception:  # no build yet, or torch's private helper moved: say it builds
        return False


def rnn_fwd(proj, ids, w_h, b_h, h0, allow_tf32=False, cell=cells.COURSE.name, w_in=None, b_in=None):
    return load().rnn_fwd(proj, ids, w_h, b_h, h0, cell, w_in, b_in)


def rnn_bwd(grad_out, grad_h_n, states, h0, proj, ids, w_h, has_bias, allow_tf32=False, cell=cells.COURSE.name,
            w_in=None, b_in=None):
    return tuple(load().rnn_bwd(grad_out, grad_h_n, states, h0, proj, ids, w_h, has_bias, cell, w_in, b_in))


def release_cached_buffers() -> int:
    """Frees the idle buffers the C++ extension keeps for its large per-call tensors (up to 1 GiB
    between calls, so that a training loop's same-sized tensors are not page-faulted in again every
    iteration, as torch's CUDA caching allocator does); returns the bytes freed (0 when the
    extension is not loaded)."""
    ext = loaded()
    return 0 if ext is None else ext.release_cached_buffers()


@contextlib.contextmanager
def panel_products(on: bool):
    """Runs the block with the gated kernels' AVX-512 panel products switched on or off (where they
    apply: float32, no proj_size, a CPU with AVX-512; elsewhere the step products through oneDNN
    run either way). For tests and benchmarks that compare the two paths."""
    ext = load()
    was = ext.use_panel_products(on)
    try:
        yield
    finally:
        ext.use_panel_products(was)


def gated_fwd(q, w_hh, b_hh, h0, c0, w_hr, allow_tf32=False, cell=cells.LSTM.name, keep_saved=True, w_ih=None,
              b_ih=None):
    return tuple(load().gated_fwd(q, w_hh, b_hh, h0, c0, w_hr, cell, keep_saved, w_ih, b_ih))


def gated_bwd(grad_out, grad_cs, out, cs, saved, q, w_hh, b_hh, h0, c0, w_hr, allow_tf32=False, cell=cells.LSTM.name,
              w_ih=None, b_ih=None):
    grads = tuple(load().gated_bwd(grad_out, grad_cs, out, cs, saved, w_hh, b_hh is not None, h0, c0, w_hr, cell,
                                   q if w_ih is not None else None, w_ih, b_ih is not None))
    return grads if w_ih is not None else grads[:6]
