"""Checkpoints: written atomically, checked before a run starts, read back with one-line errors."""
from __future__ import annotations

import os
import tempfile
from dataclasses import asdict

import torch

from .errors import UserError
from .model import CharLanguageModel, ModelConfig, non_finite_parameters


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(path: str):
    """UserError unless a checkpoint can be written at ``path``: called before training starts,
    so that a bad ``--checkpoint`` costs no work. Makes the folder if needed."""
    if not path:
        raise UserError("--checkpoint is empty: give a file path")
    if os.path.isdir(path):
        raise UserError(f"--checkpoint {path!r} is a directory: give a file path")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"cannot write the checkpoint {path!r}: {exc.strerror}") from None


def save_checkpoint(path, model, step, val_loss, **state):
    """Writes the checkpoint atomically: to a temporary file in the same folder, flushed to disk,
    then renamed over the old one, so a crash at any moment leaves the old or the new checkpoint,
    never a truncated one. The file's mode follows the umask, like any other output.
    ``state``: the training state that ``train --resume`` needs."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600
        with os.fdopen(fd, "wb") as fh:
            torch.save({"config": asdict(model.config), "model": model.state_dict(), "step": step,
                        "val_loss": val_loss, **state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def not_a_model(path, exc) -> UserError:
    first = (str(exc).strip().splitlines() or [""])[0]
    return UserError(f"checkpoint {path!r} is not a fused_rnn char model ({type(exc).__name__}: {first})")


def read_checkpoint(path) -> dict:
    """The checkpoint's dict, on the CPU; UserError for a missing or damaged file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path!r} not found") from None
    except IsADirectoryError:
        raise UserError(f"checkpoint {path!r} is a directory") from None
    except Exception as exc:  # unpickling errors, truncated files
        raise not_a_model(path, exc) from None
    if not isinstance(ckpt, dict):
        raise not_a_model(path, TypeError(f"holds a {type(ckpt).__name__}, not a dict"))
    return ckpt


def checkpoint_config(ckpt: dict, path) -> ModelConfig:
    """The model config saved in ``ckpt``; UserError when it is missing or damaged."""
    try:
        return ModelConfig.from_dict(ckpt["config"])
    except Exception as exc:  # KeyError, TypeError, ValueError
        raise not_a_model(path, exc) from None


def check_finite(model, path):
    """UserError when the model's weights hold NaN or infinity (saved by a run that diverged)."""
    bad = non_finite_parameters(model)
    if bad:
        raise UserError(f"checkpoint {path!r} holds non-finite weights ({bad[0]}): the run that saved it "
                        f"diverged; train again with a lower --lr")


def load_checkpoint(path, device="cpu", backend="auto") -> CharLanguageModel:
    """The model saved at ``path`` on ``device``; UserError for a missing, damaged, foreign or
    non-finite checkpoint."""
    ckpt = read_checkpoint(path)
    model_state = ckpt.get("model")
    try:
        model = CharLanguageModel(checkpoint_config(ckpt, path), backend=backend)
        model.load_state_dict(model_state)
    except UserError:
        raise
    except Exception as exc:  # missing keys, shape mismatches
        raise not_a_model(path, exc) from None
    check_finite(model, path)
    return model.to(device)
