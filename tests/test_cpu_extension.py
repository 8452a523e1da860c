"""The C++ extension's build paths: setup.py's build, and the just-in-time build on first use."""
import subprocess
import sys

import torch

import fused_rnn
from fused_rnn.ops import cpu_ext

JIT_CHECK = """
import sys
sys.modules["fused_rnn._C"] = None  # as if setup.py had not built the extension
import torch
import fused_rnn
from fused_rnn.ops import cpu_ext
ext = cpu_ext.load()
assert ext.__name__ == "fused_rnn_cpu", ext
x = torch.randint(0, 5, (3, 4))
args = (torch.randn(6, 2), None, torch.randn(6, 6) * 0.3, torch.randn(6))
emb = torch.randn(5, 2)
got = fused_rnn.fused_rnn(x, *args, embedding=emb, backend="cpu")[0]
torch.testing.assert_close(got, fused_rnn.rnn_reference(x, *args, embedding=emb)[0])
print("jit ok")
"""


def test_installed_build_is_used():
    assert cpu_ext.load().__name__ == "fused_rnn._C"
    assert fused_rnn.backends()["cpu"].available


def test_just_in_time_build_when_not_built_at_install(tmp_path):
    out = subprocess.run([sys.executable, "-c", JIT_CHECK], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0 and "jit ok" in out.stdout, out.stdout + out.stderr
    assert "building the CPU extension" in out.stderr  # the one-line message says so


def test_parallel_results_do_not_depend_on_thread_count():
    """Rows are split across threads; any split must give the same numbers (to rounding: BLAS
    may block the GEMMs differently for another thread count)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 9, (37, 11), generator=g)
    args = [torch.randn(*s, generator=g) * 0.3 for s in [(24, 5), (24,), (24, 24), (24,)]]
    emb = torch.randn(9, 5, generator=g)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(fused_rnn.fused_rnn(x, *args, embedding=emb, backend="cpu")[0])
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)
