"""Mutants of Triton kernels for the tests: a copy of a ``@triton.jit`` function with its source
edited, to show that a test fails when the kernel is broken in a given way (e.g. a barrier that
waits for one arrival too few)."""
from __future__ import annotations

import inspect
import textwrap
from pathlib import Path


def mutant(kernel, edits, directory: Path, names: dict | None = None):
    """A copy of the Triton function ``kernel`` (interpreted or compiled) whose source has each
    ``(old, new)`` of ``edits`` applied (``old`` must occur exactly once). The copy is defined in
    a copy of its module's namespace, with ``names`` put in it (e.g. mutants of the functions it
    calls), from a file under ``directory`` (Triton reads a function's source from its file); the
    module itself is untouched."""
    fn = kernel.fn
    source = textwrap.dedent(inspect.getsource(fn))
    for old, new in edits:
        assert source.count(old) == 1, f"{fn.__name__}: {old!r} occurs {source.count(old)} times"
        source = source.replace(old, new)
    path = Path(directory) / f"{fn.__name__}_mutant.py"
    path.write_text(source)
    namespace = dict(fn.__globals__, **(names or {}))
    exec(compile(source, str(path), "exec"), namespace)
    return namespace[fn.__name__]


# The barrier's halves (`triton_persistent._arrive`, `_wait`) with relaxed atomics instead of its
# release arrival and acquire reads: correct under the interpreter (its atomics are sequentially
# consistent), wrong on a GPU; only the compiled code shows it.
RELAXED_ARRIVE = [('tl.atomic_add(arrivals_ptr, 1, sem="release", scope="gpu")',
                   'tl.atomic_add(arrivals_ptr, 1, sem="relaxed", scope="gpu")')]
RELAXED_WAIT = [
    ('seen = tl.atomic_add(arrivals_ptr, 0, sem="acquire", scope="gpu")\n    spins = 0',
     'seen = tl.atomic_add(arrivals_ptr, 0, sem="relaxed", scope="gpu")\n    spins = 0'),
    ('seen = tl.atomic_add(arrivals_ptr, 0, sem="acquire", scope="gpu")\n        spins += 1',
     'seen = tl.atomic_add(arrivals_ptr, 0, sem="relaxed", scope="gpu")\n        spins += 1'),
]


def relaxed_barrier(directory: Path):
    """`triton_persistent._group_barrier` made of the relaxed halves: set it on a kernel module
    that calls it before its kernels are first compiled."""
    from fused_rnn.ops import triton_persistent as tp

    halves = {"_arrive": mutant(tp._arrive, RELAXED_ARRIVE, directory),
              "_wait": mutant(tp._wait, RELAXED_WAIT, directory)}
    return mutant(tp._group_barrier, [], directory, halves)
