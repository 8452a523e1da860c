import os, torch
from fused_rnn import fused_rnn
for kernel in ("blocked", "persistent"):
    os.environ["FUSED_RNN_TRITON_KERNEL"] = kernel
    for B, T, H in ((5, 7, 100), (33, 3, 300)):
        g = torch.Generator(device="cuda").manual_seed(0)
        w_in = torch.randn(H, 8, device="cuda", generator=g, requires_grad=True)
        w_h = (torch.randn(H, H, device="cuda", generator=g) / H ** 0.5).requires_grad_()
        emb = torch.randn(11, 8, device="cuda", generator=g, requires_grad=True)
        x = torch.randint(0, 11, (B, T), device="cuda", generator=g)
        out, h_n = fused_rnn(x, w_in, None, w_h, None, embedding=emb)
        (out.sum() + h_n.sum()).backward()
        torch.cuda.synchronize()
        print(kernel, B, T, H, "ok")
