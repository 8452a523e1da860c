"""Runs Triton interpreter launches with every program in its own thread, side by side, as a GPU
would, so that a kernel with a cross-program barrier (the persistent kernels with
``STEPWISE=False``) runs its real barrier in CI instead of deadlocking.

The interpreter (``TRITON_INTERPRET=1``) normally runs a grid's programs one after another. Two
facts of Triton 3.6's interpreter make a concurrent run possible:

* ``GridExecutor.__call__`` loops over the grid and stores the current program id on the one
  shared ``InterpreterBuilder`` (``set_grid_idx`` writes ``self.grid_idx``; ``tl.program_id``
  reads it). Here that attribute becomes a property backed by ``threading.local()``, and the
  launch starts one thread per program (each sets its own index and runs the kernel) and joins
  them.
* ``tl.atomic_add`` / ``tl.atomic_cas`` go to C atomics on the host memory that every program
  shares, so a program's spin sees its siblings' arrivals. ``sys.setswitchinterval`` is lowered
  so that a spinning thread hands the GIL on quickly.
* Not thread-safe there: the first call of a ``@triton.jit`` helper rewrites it and adds names to
  its module's globals, which another program's call of a helper iterates (``_patch_lang``:
  "dictionary changed size during iteration"). Both run under one lock here.

The patch touches the interpreter's internals, so it is applied only inside
:func:`concurrent_programs` (a context manager), and only on the Triton releases it has been run on
(``TESTED_TRITON``; the same internals in 3.6 and 3.9): elsewhere ``UNTESTED`` says why, and the
tests skip with that reason.

Extras for the tests:

* ``shake_seed``: before and after every atomic, each program sleeps a short random time or
  yields (its own seeded generator), so the tests see many interleavings of the arrivals.
* ``lost_arrivals``: program ids whose atomic *adds of 1* (their barrier arrivals) are dropped,
  a barrier that can never complete, to drive the failure path.
* ``stragglers``: ``{program id: seconds}``: each sleeps that long before every store it makes,
  so its siblings run ahead of it whatever the scheduling: a barrier that lets them read its
  values before it wrote them shows (as NaN, in workspaces filled with NaN) in every run.
* ``poll_interval``: seconds a program sleeps at every atomic *add of 0* (a barrier's poll of its
  counter), so that a spin limit stands for a time (spin limit x poll interval, at least).
* ``timeout``: a deadline for everything inside the context; a launch still running then is
  cancelled (each program stops at its next atomic) and raises ``TimeoutError``, so a hang
  fails the test instead of stalling CI.
"""
from __future__ import annotations

import contextlib
import inspect
import random
import sys
import threading
import time

import triton

TESTED_TRITON = ("3.6", "3.9")
_MINOR = ".".join(triton.__version__.split(".")[:2])
UNTESTED = (None if _MINOR in TESTED_TRITON else
            f"the concurrent interpreter patches Triton internals it has been run on only in "
            f"{' and '.join(TESTED_TRITON)}, not triton {triton.__version__}")


class LaunchCancelled(Exception):
    """Raised inside a program thread when its launch ran past the deadline."""


@contextlib.contextmanager
def concurrent_programs(*, timeout: float = 60.0, shake_seed: int | None = None,
                        lost_arrivals: frozenset = frozenset(), stragglers: dict | None = None,
                        poll_interval: float = 0.0, switch_interval: float = 2e-4):
    """Inside the context, every interpreter launch runs its programs concurrently (see the
    module docstring). Raises ``RuntimeError`` on a Triton it has not been run on (``UNTESTED``)."""
    if UNTESTED:
        raise RuntimeError(UNTESTED)
    from triton.runtime import interpreter

    builder_cls, executor_cls = interpreter.InterpreterBuilder, interpreter.GridExecutor
    local = threading.local()
    deadline = time.monotonic() + timeout
    cancelled = threading.Event()

    def _program_id(self):
        return getattr(local, "grid_idx", None)

    def _set_program_id(self, value):
        local.grid_idx = value

    def _shake():
        if cancelled.is_set():
            raise LaunchCancelled("the launch ran past its deadline")
        rng = getattr(local, "rng", None)
        if rng is not None:
            r = rng.random()
            if r < 0.3:
                time.sleep(rng.uniform(0.0, 3e-4))
            elif r < 0.6:
                time.sleep(0)  # yield the GIL

    original_rmw, original_cas = builder_cls.create_atomic_rmw, builder_cls.create_atomic_cas
    original_store = builder_cls.create_masked_store
    original_patch_lang, original_rewrite = interpreter._patch_lang, interpreter.InterpretedFunction.rewrite
    globals_lock = threading.RLock()

    def patch_lang(fn):
        with globals_lock:
            return original_patch_lang(fn)

    def rewrite(self):
        with globals_lock:
            return original_rewrite(self)
    stragglers = dict(stragglers or {})

    def create_atomic_rmw(self, rmw_op, ptr, val, mask, sem, scope):
        _shake()
        if self.grid_idx in lost_arrivals and (val.data == 1).all():
            val = interpreter.TensorHandle(val.data * 0, val.dtype)  # this arrival is lost
        if poll_interval and (val.data == 0).all():
            time.sleep(poll_interval)
        result = original_rmw(self, rmw_op, ptr, val, mask, sem, scope)
        _shake()
        return result

    def create_masked_store(self, ptrs, value, mask, cache_modifier, eviction_policy):
        if self.grid_idx in stragglers:
            if cancelled.is_set():
                raise LaunchCancelled("the launch ran past its deadline")
            time.sleep(stragglers[self.grid_idx])
        return original_store(self, ptrs, value, mask, cache_modifier, eviction_policy)

    def create_atomic_cas(self, ptr, cmp, val, sem, scope):
        _shake()
        result = original_cas(self, ptr, cmp, val, sem, scope)
        _shake()
        return result

    def concurrent_call(self, *args_dev, **kwargs):
        # Mirrors Triton 3.6's (and 3.9's) GridExecutor.__call__, with the loop over the grid replaced by one
        # thread per program.
        argspec = inspect.getfullargspec(self.fn)
        kwargs = {k: v for k, v in kwargs.items() if k in argspec.args}
        args_hst, kwargs_hst = self._init_args_hst(args_dev, kwargs)
        for hook in self.pre_run_hooks:
            hook(*args_hst, **kwargs_hst)
        patch_scope = interpreter._patch_lang(self.fn)
        try:
            args = inspect.getcallargs(self.fn, *args_hst, **kwargs_hst)
            args = {name: arg if name in self.constexprs else interpreter._implicit_cvt(arg)
                    for name, arg in args.items()}
            grid = self.grid(args) if callable(self.grid) else self.grid
            grid = tuple(grid) + (1,) * (3 - len(grid))
            interpreter.interpreter_builder.set_grid_dim(*grid)
            errors = []

            def program(idx):
                try:
                    if shake_seed is not None:
                        local.rng = random.Random(hash((shake_seed, idx)))
                    interpreter.interpreter_builder.set_grid_idx(*idx)
                    self.fn(**args)
                except BaseException as exc:  # reported by the launching thread
                    errors.append(exc)

            threads = [threading.Thread(target=program, args=((x, y, z),), daemon=True)
                       for x in range(grid[0]) for y in range(grid[1]) for z in range(grid[2])]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            if any(thread.is_alive() for thread in threads):
                cancelled.set()  # the stragglers stop at their next atomic
                for thread in threads:
                    thread.join(5.0)
                raise TimeoutError(f"a {grid[0]}x{grid[1]} launch of {self.fn.__name__} did not "
                                   f"finish within {timeout} s: the barrier hangs")
            if errors:
                raise errors[0]
        finally:
            patch_scope.restore()
        self._restore_args_dev(args_dev, args_hst, kwargs, kwargs_hst)

    saved_interval = sys.getswitchinterval()
    saved_call = executor_cls.__call__
    builder_cls.grid_idx = property(_program_id, _set_program_id)
    builder_cls.create_atomic_rmw, builder_cls.create_atomic_cas = create_atomic_rmw, create_atomic_cas
    builder_cls.create_masked_store = create_masked_store
    interpreter._patch_lang, interpreter.InterpretedFunction.rewrite = patch_lang, rewrite
    executor_cls.__call__ = concurrent_call
    sys.setswitchinterval(switch_interval)
    try:
        yield
    finally:
        sys.setswitchinterval(saved_interval)
        executor_cls.__call__ = saved_call
        builder_cls.create_atomic_rmw, builder_cls.create_atomic_cas = original_rmw, original_cas
        builder_cls.create_masked_store = original_store
        interpreter._patch_lang, interpreter.InterpretedFunction.rewrite = original_patch_lang, original_rewrite
        del builder_cls.grid_idx
