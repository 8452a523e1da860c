"""GPU checks beyond the test suite, for both Triton kernel families (blocked and persistent):

* determinism: with torch.use_deterministic_algorithms(True), two calls give bitwise-identical
  outputs and gradients (token input: its table gradient has a deterministic kernel);
* no host sync per call: a forward+backward with token input and lengths runs under
  torch.cuda.set_sync_debug_mode("error");
* bad token ids on CUDA stop the program with a device-side assert (in a child process: it ends
  the CUDA context);
* offsets past 2^31 elements: the [B, T+1, H] workspace of B=256, T=32769, H=256 fp32 (8.6 GB;
  about 26 GB in all with the backward chain), forward and backward chain checked on sampled rows
  against a float64 loop over those rows only (rows are independent).

Usage: python benchmarks/gpu_extra_checks.py [--skip-large]. Exits non-zero on any failure.
``--cpu-dry-run`` runs the determinism and offset checks on small shapes through the Triton
interpreter: it checks this script, not the GPU.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

# cuBLAS is deterministic only with a fixed workspace; set before CUDA starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
DRY = "--cpu-dry-run" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton kernels are defined
DEVICE = "cpu" if DRY else "cuda"

import torch  # noqa: E402

from stress_barrier import reference_chain, reference_forward  # noqa: E402  (this folder)

from fused_rnn import cells  # noqa: E402

KERNELS = ("blocked", "persistent")
failures = []


def synchronize():
    if not DRY:
        torch.cuda.synchronize()


def report(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        failures.append(name)


def problem(B, T, H, V=85, E=42, seed=0, dtype=torch.float32):
    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def rand(*shape, scale=1.0):
        t = (torch.rand(*shape, generator=g, device=DEVICE, dtype=torch.float32) * 2 - 1) * scale
        return t.to(dtype).requires_grad_()

    return dict(x=torch.randint(0, V, (B, T), generator=g, device=DEVICE),
                embedding=rand(V, E), w_in=rand(H, E, scale=E ** -0.5), b_in=rand(H, scale=0.5),
                w_h=rand(H, H, scale=1.5 * H ** -0.5), b_h=rand(H, scale=0.5), h0=rand(B, H, scale=0.9))


def outputs_and_grads(args, **kwargs):
    from fused_rnn import fused_rnn
    out, h_n = fused_rnn(**args, backend="triton", **kwargs)
    floats = [v for v in args.values() if v.is_floating_point()]
    g = torch.Generator(device=DEVICE).manual_seed(1)
    go = torch.randn(out.shape, generator=g, device=DEVICE).to(out.dtype)
    grads = torch.autograd.grad((out * go).sum() + h_n.float().sum(), floats)
    return [out, h_n, *grads]


def check_determinism():
    torch.use_deterministic_algorithms(True)
    try:
        for kernel in KERNELS:
            os.environ["FUSED_RNN_TRITON_KERNEL"] = kernel
            for B, T, H in (((256, 64, 256), (37, 33, 100)) if not DRY else ((5, 3, 20),)):
                args = problem(B, T, H, V=5)  # few ids: many positions per table row
                first, second = outputs_and_grads(args), outputs_and_grads(args)
                same = all(torch.equal(a, b) for a, b in zip(first, second))
                report(f"determinism {kernel} B={B} T={T} H={H}", same)
    finally:
        torch.use_deterministic_algorithms(False)


def check_no_sync():
    from fused_rnn import fused_rnn
    for kernel in KERNELS:
        os.environ["FUSED_RNN_TRITON_KERNEL"] = kernel
        args = problem(64, 32, 256)
        lengths = torch.randint(1, 33, (64,), device=DEVICE)
        outputs_and_grads(args, lengths=lengths)  # warm up: compile, allocate
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.no_grad():  # the ids and lengths range checks
                fused_rnn(**args, backend="triton", lengths=lengths)
            outputs_and_grads(args)  # forward and backward (lengths' index backward is PyTorch's)
            report(f"no host sync per call ({kernel})", True)
        except RuntimeError as exc:
            report(f"no host sync per call ({kernel})", False, str(exc).splitlines()[0])
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()


def check_bad_ids_assert():
    code = ("import torch; from fused_rnn import fused_rnn\n"
            "w_in = torch.randn(16, 4, device='cuda'); w_h = torch.randn(16, 16, device='cuda')\n"
            "x = torch.full((2, 3), 9, device='cuda')\n"
            "out, _ = fused_rnn(x, w_in, None, w_h, None, embedding=torch.randn(5, 4, device='cuda'))\n"
            "torch.cuda.synchronize()\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    # torch's CUDA assert cannot carry the message: any device-side assert before a result
    ok = run.returncode != 0 and ("device-side assert" in run.stderr or "Assertion" in run.stderr)
    report("bad token ids stop the program on CUDA", ok, "" if ok else run.stderr[-300:])


def check_large_offsets():
    from fused_rnn.ops import triton_rnn
    B, T, H, V = (256, 32769, 256, 85) if not DRY else (20, 4, 33, 7)
    print(f"large offsets: B={B} T={T} H={H}: workspace {B * (T + 1) * H / 2 ** 31:.3f} x 2^31 elements",
          flush=True)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    ids = torch.randint(0, V, (B, T), generator=g, device=DEVICE)
    proj = torch.rand(V, H, generator=g, device=DEVICE) - 0.5
    w_h = (torch.rand(H, H, generator=g, device=DEVICE) * 2 - 1) * 1.5 * H ** -0.5
    b_h = torch.rand(H, generator=g, device=DEVICE) - 0.5
    h0 = torch.rand(B, H, generator=g, device=DEVICE) - 0.5
    rows = torch.tensor([0, B // 2, B - 2, B - 1], device=DEVICE)  # B - 1: offsets past 2^31
    want = reference_forward(proj[ids[rows]], w_h, b_h, h0[rows])[:, 1:]
    for kernel in KERNELS:
        os.environ["FUSED_RNN_TRITON_KERNEL"] = kernel
        start = time.time()
        ws = triton_rnn.rnn_fwd(proj, ids, w_h, b_h, h0)
        synchronize()
        err = (ws[rows, 1:].double() - want).abs().max().item()
        report(f"offsets past 2^31 forward ({kernel})", err < 1e-3, f"max abs error {err:.2e}, "
               f"{time.time() - start:.1f} s")
        grad_out = torch.empty(B, T, H, device=DEVICE).uniform_(-1e-3, 1e-3, generator=g)
        grad_h_n = torch.rand(B, H, generator=g, device=DEVICE)
        c = triton_rnn._bwd_chain(grad_out, grad_h_n, ws, w_h, False, cells.COURSE, True, True)
        synchronize()
        want_c0 = reference_chain(grad_out[rows], ws[rows], w_h, grad_h_n[rows])[:, 0]
        err = ((c[rows, 0].double() - want_c0).abs().max() / want_c0.abs().max()).item()
        report(f"offsets past 2^31 backward chain ({kernel})", err < 1e-3, f"relative error {err:.2e}")
        del ws, grad_out, c
        if not DRY:
            torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-large", action="store_true", help="skip the 2^31-offset case (26 GB)")
    parser.add_argument("--cpu-dry-run", action="store_true", help="check this script without a GPU")
    args = parser.parse_args()
    if DRY:
        check_determinism()
        check_large_offsets()
        print(f"dry run: {len(failures)} failures")
        return 1 if failures else 0
    if not torch.cuda.is_available():
        print("FAIL: no CUDA device: these checks need a GPU (--cpu-dry-run checks this script)")
        return 2
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    for check in (check_determinism, check_no_sync, check_bad_ids_assert):
        check()
    if not args.skip_large:
        check_large_offsets()
    print(f"{len(failures)} failures" + (": " + ", ".join(failures) if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
