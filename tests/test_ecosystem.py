"""The fused op inside the PyTorch ecosystem: torch.compile, autocast, DistributedDataParallel."""
import pytest
import torch
import torch.multiprocessing as mp

from fused_rnn import fused_rnn as rnn
from conftest import backend_device, exhaustive, requires_cuda
from helpers import cast, make_problem, rel_err, run_with_grads
import ddp_worker


@pytest.mark.parametrize("backend,tokens,padded", [
    ("cpu", True, False), pytest.param("cpu", False, False, marks=exhaustive),
    pytest.param("triton", True, False, marks=exhaustive), ("triton", False, True)],
    ids=["cpu-tokens", "cpu-dense", "triton-tokens", "triton-dense-lengths"])
def test_torch_compile_fullgraph(backend, tokens, padded):
    """fullgraph=True: backend resolution (which imports the Triton module on first use) must not
    break the graph; the fake ops must match the kernels' outputs (shapes and strides)."""
    device = backend_device(backend)
    args = make_problem(4, 6, 16, tokens=tokens, device=device)
    lengths = torch.tensor([6, 2, 5, 1], device=device) if padded else None
    torch._dynamo.reset()
    compiled = torch.compile(lambda **a: rnn(**a, lengths=lengths, backend=backend), fullgraph=True)
    got = run_with_grads(compiled, args)
    want = run_with_grads(lambda **a: rnn(**a, lengths=lengths, backend=backend), args)
    for name in want:
        assert rel_err(got[name], want[name]) < 1e-5, name


def test_autocast_runs_in_the_autocast_dtype():
    """On the CPU this never reaches a fused kernel: bf16 CPU tensors go to the reference loop
    (the C++ extension is fp32/fp64 only). The CUDA test below runs the Triton kernels."""
    args = make_problem(4, 6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, h_n = rnn(**args)
    assert output.dtype == h_n.dtype == torch.bfloat16
    want, _ = rnn(**cast(args, torch.float64))
    assert rel_err(output, want) < 2e-2
    output.float().sum().backward()  # gradients reach the fp32 parameters
    assert args["w_h"].grad is not None and args["w_h"].grad.dtype == torch.float32


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_on_cuda_runs_the_triton_kernels(dtype, monkeypatch):
    from fused_rnn.ops import triton_rnn
    launches = []
    original = triton_rnn.rnn_fwd

    def spy(*args, **kwargs):
        launches.append(args[2].dtype)  # w_h
        return original(*args, **kwargs)
    monkeypatch.setattr(triton_rnn, "rnn_fwd", spy)
    args = make_problem(8, 12, 64, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        output, h_n = rnn(**args)
    assert launches == [dtype] and output.dtype == h_n.dtype == dtype
    want, _ = rnn(**cast(args, torch.float64), backend="reference")
    assert rel_err(output, want) < 2e-2
    output.float().sum().backward()
    assert args["w_h"].grad is not None and args["w_h"].grad.dtype == torch.float32


@pytest.mark.parametrize("backend,cell", [("cpu", "course"), pytest.param("reference", "course", marks=exhaustive),
                                          pytest.param("cpu", "elman", marks=exhaustive)])
def test_distributed_data_parallel_two_processes(backend, cell, tmp_path):
    out_file = tmp_path / "grads.pt"
    mp.spawn(ddp_worker.worker, args=(2, str(tmp_path / "init"), str(out_file), backend, cell), nprocs=2)
    ddp_grads = torch.load(out_file)
    single = ddp_worker.model(backend, cell)
    ddp_worker.loss_of(single, *ddp_worker.batch()).backward()
    for name, p in single.named_parameters():
        torch.testing.assert_close(ddp_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
