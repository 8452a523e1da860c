"""Bad input raises a clear error before any kernel runs; backends() and dispatch."""
import subprocess
import sys
import warnings

import pytest
import torch

import fused_rnn
from fused_rnn import fused_rnn as rnn
from fused_rnn import dispatch
from fused_rnn.ops import cpu_ext
from helpers import make_problem


def problem(**overrides):
    args = make_problem(3, 4, 8, E=5, V=7)
    args = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    args.update(overrides)
    return args


BAD_INPUTS = {
    "token-id-too-large": (IndexError, r"\[0, 7\)", lambda a: {"x": torch.full((3, 4), 7)}),
    "token-id-negative": (IndexError, r"\[0, 7\)", lambda a: {"x": torch.full((3, 4), -1)}),
    "float-tokens": (TypeError, "integer", lambda a: {"x": a["x"].float()}),
    "int-dense-input": (TypeError, "embedding=", lambda a: {"embedding": None}),
    "tokens-rank-3": (ValueError, "2 dimensions", lambda a: {"x": a["x"][..., None]}),
    "dense-rank-2": (ValueError, "3 dimensions", lambda a: {"x": torch.randn(3, 4), "embedding": None}),
    "dense-wrong-E": (ValueError, r"\[B, T, 5\]", lambda a: {"x": torch.randn(3, 4, 6), "embedding": None}),
    "embedding-wrong-E": (ValueError, r"\[V, 5\]", lambda a: {"embedding": torch.randn(7, 4)}),
    "w_h-not-square": (ValueError, "square", lambda a: {"w_h": torch.randn(8, 7)}),
    "w_in-wrong-H": (ValueError, "w_in must have shape", lambda a: {"w_in": torch.randn(9, 5)}),
    "b_in-wrong-size": (ValueError, "b_in", lambda a: {"b_in": torch.randn(9)}),
    "b_h-wrong-size": (ValueError, "b_h", lambda a: {"b_h": torch.randn(8, 1)}),
    "h0-wrong-batch": (ValueError, "h0", lambda a: {"h0": torch.randn(2, 8)}),
    "empty-batch": (ValueError, "non-empty", lambda a: {"x": torch.zeros(0, 4, dtype=torch.long)}),
    "empty-sequence": (ValueError, "non-empty", lambda a: {"x": torch.zeros(3, 0, dtype=torch.long)}),
    "mixed-dtypes": (TypeError, "one dtype", lambda a: {"w_h": a["w_h"].double()}),
    "integer-weights": (TypeError, "float16, bfloat16", lambda a: {"w_h": torch.ones(8, 8, dtype=torch.int32)}),
    "not-a-tensor": (TypeError, "torch.Tensor", lambda a: {"w_in": [[1.0] * 5] * 8}),
    "mixed-devices": (ValueError, "one device", lambda a: {"h0": a["h0"].to("meta")}),
}


@pytest.mark.parametrize("backend", ["triton", "cpu", "reference", "auto"])
@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_raises_clear_error(case, backend):
    error, message, change = BAD_INPUTS[case]
    args = problem()
    args.update(change(args))
    with pytest.raises(error, match=message):
        rnn(**args, backend=backend)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        rnn(**problem(), backend="cudnn")


def test_backends_reports_availability():
    info = fused_rnn.backends()
    assert info["reference"].available
    assert info["cpu"].available, info["cpu"].note  # CI builds the extension: it must load
    triton = info["triton"]
    assert isinstance(triton.note, str) and triton.note
    assert triton.available == (torch.cuda.is_available() or "cpu" in triton.devices)


def test_auto_on_cpu_picks_the_extension_for_fp32_and_the_reference_for_bf16():
    args = problem()
    torch.testing.assert_close(rnn(**args, backend="auto"), rnn(**args, backend="cpu"), rtol=0, atol=0)
    half = {k: (v.bfloat16() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in args.items()}
    torch.testing.assert_close(rnn(**half, backend="auto"), fused_rnn.rnn_reference(**half), rtol=0, atol=0)


def test_cpu_backend_refuses_what_it_cannot_run():
    half = {k: (v.bfloat16() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in problem().items()}
    with pytest.raises(RuntimeError, match="float32 and float64"):
        rnn(**half, backend="cpu")


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(cpu_ext, "_ext", "the extension could not be built (test)")
    monkeypatch.setattr(dispatch, "_warned_fallback", set())
    args = problem()
    with pytest.warns(UserWarning, match="falling back to the reference"):
        got = rnn(**args)
    torch.testing.assert_close(got, fused_rnn.rnn_reference(**args), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rnn(**args)  # only one warning per process
    with pytest.raises(RuntimeError, match="could not be built"):
        rnn(**args, backend="cpu")
    info = fused_rnn.backends()["cpu"]
    assert not info.available and "could not be built" in info.note


def test_auto_on_cuda_without_triton_falls_back_with_one_warning(monkeypatch):
    """No silent fallback on CUDA either: a broken triton install is named once."""
    monkeypatch.setattr(dispatch, "_warned_fallback", set())
    monkeypatch.setattr(dispatch, "_triton_import_error", lambda: "ImportError: no triton (test)")
    with pytest.warns(UserWarning, match="falling back to the reference loop: triton does not import"):
        assert dispatch.resolve_backend("auto", torch.device("cuda"), torch.float32) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.resolve_backend("auto", torch.device("cuda"), torch.float32) == "reference"
    with pytest.raises(RuntimeError, match="needs triton"):
        dispatch.resolve_backend("triton", torch.device("cuda"), torch.float32)


EXT_ERRORS = {
    "ids-out-of-range": (IndexError, lambda a: dict(ids=torch.full((3, 4), 7))),
    "ids-not-int64": (TypeError, lambda a: dict(ids=a["ids"].int())),
    "proj-wrong-H": (ValueError, lambda a: dict(proj=torch.zeros(7, 9))),
    "w_h-int": (TypeError, lambda a: dict(w_h=torch.zeros(8, 8, dtype=torch.int32))),
    "w_h-not-square": (ValueError, lambda a: dict(w_h=torch.zeros(8, 7))),
    "b_h-dtype": (TypeError, lambda a: dict(b_h=torch.zeros(8, dtype=torch.float64))),
    "h0-shape": (ValueError, lambda a: dict(h0=torch.zeros(2, 8))),
}


@pytest.mark.parametrize("case", EXT_ERRORS, ids=list(EXT_ERRORS))
def test_extension_checks_its_inputs(case):
    """The C++ entry points check their own inputs, with the Python side's error classes."""
    error, change = EXT_ERRORS[case]
    args = dict(proj=torch.zeros(7, 8), ids=torch.zeros(3, 4, dtype=torch.long), w_h=torch.zeros(8, 8),
                b_h=torch.zeros(8), h0=torch.zeros(3, 8))
    args.update(change(args))
    with pytest.raises(error):
        cpu_ext.load().rnn_fwd(**args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_triton_on_cpu_without_interpreter_says_what_to_do():
    code = ("import os; os.environ.pop('TRITON_INTERPRET', None)\n"
            "import torch, fused_rnn\n"
            "w = torch.zeros(4, 4)\n"
            "try:\n"
            "    fused_rnn.fused_rnn(torch.zeros(1, 2, 3), torch.zeros(4, 3), None, w, None, backend='triton')\n"
            "except RuntimeError as e:\n"
            "    print('RuntimeError:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "RuntimeError:" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr
