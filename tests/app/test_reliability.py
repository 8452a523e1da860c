"""Training never loses work: atomic checkpoints, --resume, SIGINT/SIGTERM, SIGKILL; corpus checks."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fused_rnn.app import checkpoint as checkpoint_module
from fused_rnn.app.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from fused_rnn.app.cli import main
from fused_rnn.app.corpus import load_corpus
from fused_rnn.app.signals import stop_requests

TEXT = "def add(a, b):\n    return a + b\n\n" * 40
TINY = ["--seq-len", "16", "--hidden-size", "16", "--batch-size", "4", "--sample-chars", "10",
        "--device", "cpu"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def train_args(corpus, ckpt, *extra):
    return ["train", "--corpus", str(corpus), "--checkpoint", str(ckpt), *TINY, *extra]


def test_checkpoint_write_is_atomic(corpus, tmp_path, monkeypatch, capsys):
    """A save that dies half-way leaves the previous checkpoint, and no temporary file."""
    ckpt = tmp_path / "model.pt"
    assert main(train_args(corpus, ckpt, "--epochs", "1", "--steps", "3")) == 0
    before = ckpt.read_bytes()

    def dying_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", dying_save)
    model = load_checkpoint(str(ckpt))
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(str(ckpt), model, 99, 0.0)
    assert ckpt.read_bytes() == before
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_resume_continues_exactly_where_a_run_stopped(corpus, tmp_path, capsys):
    """1 epoch + --resume --epochs 2 gives bitwise the model of 2 epochs in one go (same
    optimizer state, step, windows and history); --epochs is the total."""
    straight, split = tmp_path / "straight.pt", tmp_path / "split.pt"
    assert main(train_args(corpus, straight, "--epochs", "2", "--steps", "4", "--dropout", "0.5",
                           "--num-layers", "2")) == 0
    assert main(train_args(corpus, split, "--epochs", "1", "--steps", "4", "--dropout", "0.5",
                           "--num-layers", "2")) == 0
    capsys.readouterr()
    # The run's options come from the checkpoint: only --epochs is given again.
    assert main(["train", "--resume", "--checkpoint", str(split), "--epochs", "2", "--device", "cpu",
                 "--sample-chars", "10"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 4" in out and "epoch 1:" not in out and "epoch 2:" in out
    a, b = read_checkpoint(str(straight)), read_checkpoint(str(split))
    assert a["step"] == b["step"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["history"] == b["history"]
    assert len(a["history"]["train_loss"]) == 8 and [s for s, _ in a["history"]["val"]] == [0, 4, 8]
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)

    # A finished 2-epoch run resumed with --epochs 3 trains epoch 3 only.
    assert main(["train", "--resume", "--checkpoint", str(split), "--epochs", "3", "--device", "cpu",
                 "--sample-chars", "10"]) == 0
    out = capsys.readouterr().out
    assert "epoch 2:" not in out and "epoch 3:" in out
    assert read_checkpoint(str(split))["step"] == 12


@pytest.mark.parametrize("extra, message", [
    (["--hidden-size", "32"], "--hidden-size 32 conflicts with the checkpoint's 16"),
    (["--seq-len", "8"], "--seq-len 8 conflicts"),
    (["--corpus", "OTHER"], "--corpus"),
], ids=["hidden-size", "seq-len", "corpus"])
def test_resume_refuses_conflicting_options_in_one_line(extra, message, corpus, tmp_path, capsys):
    ckpt = tmp_path / "model.pt"
    assert main(train_args(corpus, ckpt, "--epochs", "1", "--steps", "2")) == 0
    other = tmp_path / "other.txt"
    other.write_text(TEXT)
    extra = [str(other) if a == "OTHER" else a for a in extra]
    capsys.readouterr()
    # Giving an option again with the checkpoint's value is fine.
    assert main(["train", "--resume", "--checkpoint", str(ckpt), "--epochs", "2", "--steps", "2",
                 "--hidden-size", "16", "--device", "cpu", "--sample-chars", "5"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--checkpoint", str(ckpt), "--epochs", "3", *extra]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("case", ["missing", "garbage", "truncated", "old-format"])
def test_resume_from_a_bad_checkpoint_is_one_line(case, tmp_path, capsys):
    from fused_rnn.app.model import CharLanguageModel, ModelConfig

    ckpt = tmp_path / "model.pt"
    if case == "garbage":
        ckpt.write_bytes(b"not a checkpoint")
    elif case == "truncated":  # what a non-atomic write cut short would leave
        save_checkpoint(str(ckpt), CharLanguageModel(ModelConfig("abc", hidden_size=8)), 3, 1.0)
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
        assert main(["sample", "--checkpoint", str(ckpt)]) == 1
        err = capsys.readouterr().err
        assert "not a fused_rnn char model" in err and len(err.strip().splitlines()) == 1, err
    elif case == "old-format":  # what earlier versions saved: no training state
        model = CharLanguageModel(ModelConfig("abc", hidden_size=8))
        torch.save({"config": {"vocab": "abc", "hidden_size": 8}, "model": model.state_dict(),
                    "step": 3, "val_loss": 1.0}, ckpt)
        assert load_checkpoint(str(ckpt)).config.hidden_size == 8  # still loads for sampling
    assert main(["train", "--resume", "--checkpoint", str(ckpt)]) == 1
    err = capsys.readouterr().err
    message = {"missing": "not found", "garbage": "not a fused_rnn char model",
               "truncated": "not a fused_rnn char model", "old-format": "no training state"}[case]
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("content, message", [
    (b"abc\0def" * 100, "NUL bytes"),
    (bytes(range(128, 256)) * 20, "not valid UTF-8"),
    ("tr\u00e8s bien \ufffd\n".encode() * 100 + b"\xff" * 5, None),  # < 1% bad, own U+FFFD: fine
], ids=["nul-bytes", "binary", "mostly-text"])
def test_corpus_that_is_not_text_is_one_line(content, message, tmp_path, capsys):
    path = tmp_path / "corpus.bin"
    path.write_bytes(content)
    if message is None:
        assert load_corpus(str(path)).startswith("tr\u00e8s")
        return
    assert main(["train", "--corpus", str(path)]) == 1
    err = capsys.readouterr().err
    assert "is not a text file" in err and message in err and len(err.strip().splitlines()) == 1, err


def test_first_signal_asks_to_stop_second_one_kills():
    """The handler records the first signal and restores the default action, so a second Ctrl-C
    ends the process at once; leaving training restores the previous handlers."""
    previous = signal.getsignal(signal.SIGINT)
    with stop_requests() as received:
        os.kill(os.getpid(), signal.SIGTERM)
        assert received == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) == previous


def start_training(corpus, ckpt, *extra):
    cmd = [sys.executable, "-m", "fused_rnn", *train_args(corpus, ckpt, *extra)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("signum, status", [pytest.param(signal.SIGINT, 130, marks=pytest.mark.exhaustive),
                                            (signal.SIGTERM, 143)],
                         ids=["SIGINT", "SIGTERM"])
def test_signal_saves_the_current_step_and_exits(signum, status, corpus, tmp_path):
    ckpt = tmp_path / "model.pt"
    proc = start_training(corpus, ckpt, "--epochs", "1", "--steps", "100000", "--save-every", "5")
    wait_for(ckpt, proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == status, out + err
    lines = [line for line in out.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1 and str(ckpt) in lines[0], out
    step = int(lines[0].split("at step ")[1].split(":")[0])
    assert read_checkpoint(str(ckpt))["step"] == step >= 5
    assert "Traceback" not in err, err


@pytest.mark.exhaustive
def test_sigkill_while_training_leaves_a_loadable_checkpoint(corpus, tmp_path):
    """kill -9 at arbitrary moments of a run that saves every step (so some kills land inside a
    save): the checkpoint always loads, sample runs on it, and --resume continues it."""
    ckpt = tmp_path / "model.pt"
    steps = []
    for i, delay in enumerate([0.3, 0.05, 0.5]):
        extra = ["--resume"] if ckpt.exists() else ["--steps", "100000"]
        proc = start_training(corpus, ckpt, *extra, "--epochs", "1", "--save-every", "1")
        if i == 0:
            wait_for(ckpt, proc)
        else:  # the resumed run has started training once the checkpoint moves on
            deadline = time.monotonic() + 120
            while read_checkpoint(str(ckpt))["step"] == steps[-1]:
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.05)
        time.sleep(delay)
        proc.kill()
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        steps.append(read_checkpoint(str(ckpt))["step"])  # loads: not truncated
    assert steps == sorted(steps) and steps[0] >= 1, steps
    out = subprocess.run([sys.executable, "-m", "fused_rnn", "sample", "--checkpoint", str(ckpt),
                          "--length", "20", "--prime", "def", "--device", "cpu"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("def"), out.stdout + out.stderr
