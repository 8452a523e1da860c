"""Mutants of Triton kernels for the tests: a copy of a ``@triton.jit`` function with its source
edited, to show that a test fails when the kernel is broken in a given way (e.g. a barrier that
waits for one arrival too few)."""
from __future__ import annotations

import inspect
import textwrap
from pathlib import Path


def mutant(kernel, edits, directory: Path):
    """A copy of the Triton function ``kernel`` (interpreted or compiled) whose source has each
    ``(old, new)`` of ``edits`` applied (``old`` must occur exactly once). The copy is defined in
    a copy of its module's namespace, from a file under ``directory`` (Triton reads a function's
    source from its file); the module itself is untouched."""
    fn = kernel.fn
    source = textwrap.dedent(inspect.getsource(fn))
    for old, new in edits:
        assert source.count(old) == 1, f"{fn.__name__}: {old!r} occurs {source.count(old)} times"
        source = source.replace(old, new)
    path = Path(directory) / f"{fn.__name__}_mutant.py"
    path.write_text(source)
    namespace = dict(fn.__globals__)
    exec(compile(source, str(path), "exec"), namespace)
    return namespace[fn.__name__]


# `triton_persistent._group_barrier` with relaxed atomics instead of its release arrival and
# acquire reads: correct under the interpreter (its atomics are sequentially consistent), wrong
# on a GPU; only the compiled code shows it.
RELAXED_BARRIER = [
    ('tl.atomic_add(arrivals_ptr, 1, sem="release", scope="gpu")',
     'tl.atomic_add(arrivals_ptr, 1, sem="relaxed", scope="gpu")'),
    ('seen = tl.atomic_add(arrivals_ptr, 0, sem="acquire", scope="gpu")\n    spins = 0',
     'seen = tl.atomic_add(arrivals_ptr, 0, sem="relaxed", scope="gpu")\n    spins = 0'),
    ('seen = tl.atomic_add(arrivals_ptr, 0, sem="acquire", scope="gpu")\n        spins += 1',
     'seen = tl.atomic_add(arrivals_ptr, 0, sem="relaxed", scope="gpu")\n        spins += 1'),
]
