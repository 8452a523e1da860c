"""The fused op inside the PyTorch ecosystem: torch.compile, autocast, DistributedDataParallel."""
import pytest
import torch
import torch.multiprocessing as mp

from fused_rnn import fused_rnn as rnn
from helpers import cast, make_problem, rel_err, run_with_grads
import ddp_worker


@pytest.mark.parametrize("tokens", [True, False], ids=["tokens", "dense"])
def test_torch_compile_fullgraph(tokens):
    args = make_problem(4, 6, 16, tokens=tokens)
    torch._dynamo.reset()
    compiled = torch.compile(lambda **a: rnn(**a, backend="cpu"), fullgraph=True)
    got = run_with_grads(compiled, args)
    want = run_with_grads(lambda **a: rnn(**a, backend="cpu"), args)
    for name in want:
        assert rel_err(got[name], want[name]) < 1e-5, name


def test_autocast_runs_in_the_autocast_dtype():
    args = make_problem(4, 6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, h_n = rnn(**args)
    assert output.dtype == h_n.dtype == torch.bfloat16
    want, _ = rnn(**cast(args, torch.float64))
    assert rel_err(output, want) < 2e-2
    output.float().sum().backward()  # gradients reach the fp32 parameters
    assert args["w_h"].grad is not None and args["w_h"].grad.dtype == torch.float32


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_distributed_data_parallel_two_processes(backend, tmp_path):
    out_file = tmp_path / "grads.pt"
    mp.spawn(ddp_worker.worker, args=(2, str(tmp_path / "init"), str(out_file), backend), nprocs=2)
    ddp_grads = torch.load(out_file)
    single = ddp_worker.model(backend)
    ddp_worker.loss_of(single, *ddp_worker.batch()).backward()
    for name, p in single.named_parameters():
        torch.testing.assert_close(ddp_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
