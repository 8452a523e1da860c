"""A 2-process DistributedDataParallel run of a fused char model, on the course's cell or on
nn.RNN's (fused_rnn.RNN) (imported by test_ecosystem)."""
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import fused_rnn
from fused_rnn.app.model import CharLanguageModel, ModelConfig

VOCAB = "abcdefghijklmnop"


def batch():
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, len(VOCAB), (8, 12), generator=g)
    return x[:, :-1], x[:, 1:]


class ElmanCharModel(torch.nn.Module):
    """Embedding -> fused_rnn.RNN (2 layers, bidirectional) -> linear."""

    def __init__(self, backend):
        super().__init__()
        self.e = torch.nn.Embedding(len(VOCAB), 5)
        self.rnn = fused_rnn.RNN(5, 24, num_layers=2, batch_first=True, bidirectional=True, backend=backend)
        self.l_out = torch.nn.Linear(48, len(VOCAB))

    def forward(self, x):
        output, h_n = self.rnn(self.e(x))
        return self.l_out(output), h_n


def model(backend, cell="course"):
    torch.manual_seed(0)
    if cell == "elman":
        return ElmanCharModel(backend)
    return CharLanguageModel(ModelConfig(VOCAB, n_fac=5, hidden_size=24, num_layers=2), backend=backend)


def loss_of(m, x, y):
    logits, _ = m(x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def worker(rank, world_size, init_file, out_file, backend, cell="course"):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        ddp = DistributedDataParallel(model(backend, cell))
        x, y = batch()
        shard = slice(rank * len(x) // world_size, (rank + 1) * len(x) // world_size)
        loss_of(ddp, x[shard], y[shard]).backward()
        if rank == 0:
            torch.save({k: p.grad for k, p in ddp.module.named_parameters()}, out_file)
    finally:
        dist.destroy_process_group()
    # Leave without finalizing Python: a gloo worker thread may still be releasing a finished
    # all-reduce, which takes the GIL, and a finalizing interpreter makes that thread abort the
    # process (seen as an occasional SIGABRT of one worker).
    os._exit(0)
