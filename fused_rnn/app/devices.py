"""Which device and backend a command runs on: the user's choice checked before any work."""
from __future__ import annotations

import torch

from ..dispatch import backends
from .errors import UserError

DEVICE_HELP = "auto, cpu, cuda or cuda:N"


def resolve_device(name: str) -> torch.device:
    """The device named by ``--device``; UserError for one that is unknown, unsupported or absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {name!r} (expected {DEVICE_HELP})") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: the fused kernels run on CPU or CUDA devices (expected {DEVICE_HELP})")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {name} asked for, but no CUDA device is available")
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {name} asked for, but there {'is' if count == 1 else 'are'} "
                            f"only {count} CUDA device(s) (cuda:0 to cuda:{count - 1})")
    return device


def check_backend_runs_on(backend: str, device: torch.device):
    """UserError when ``--backend`` cannot run on ``device`` (the reason comes from
    :func:`fused_rnn.backends`)."""
    if backend in ("auto", "reference"):
        return
    info = backends()[backend]
    if not info.available:
        raise UserError(f"--backend {backend} cannot run here: {info.note}")
    if device.type not in info.devices:
        raise UserError(f"--backend {backend} runs on {' or '.join(info.devices)} tensors, not on --device {device}")
