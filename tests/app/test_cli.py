"""python -m fused_rnn train / sample / inspect: a real (tiny) run, and one-line errors for bad input."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from fused_rnn.app.cli import main

TEXT = "def add(a, b):\n    return a + b\n\n" * 40


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def test_train_then_sample(corpus, tmp_path, capsys):
    ckpt = tmp_path / "model.pt"
    rc = main(["train", "--corpus", str(corpus), "--seq-len", "16", "--hidden-size", "32",
               "--batch-size", "8", "--epochs", "2", "--steps", "30", "--checkpoint", str(ckpt),
               "--sample-chars", "20"])
    out = capsys.readouterr().out
    assert rc == 0 and ckpt.exists()
    losses = [float(line.split("val loss ")[1].split()[0].rstrip(",")) for line in out.splitlines() if "val loss" in line]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.5, out
    assert main(["sample", "--checkpoint", str(ckpt), "--length", "25", "--prime", "def"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("def") and len(text.rstrip("\n")) == 28


@pytest.mark.parametrize("cell", ["lstm", "gru", "elman"])
def test_train_each_cell_then_resume_and_sample(cell, corpus, tmp_path, capsys):
    """``train --cell``: the val loss falls, the checkpoint remembers the cell (a resume asking for
    another cell is refused in one line), sample carries the cell's state (the LSTM's (h, c)), and
    inspect draws its gradients beside another cell's (--compare)."""
    ckpt = tmp_path / "model.pt"
    base = ["train", "--corpus", str(corpus), "--seq-len", "16", "--hidden-size", "24", "--batch-size", "8",
            "--steps", "15", "--checkpoint", str(ckpt), "--sample-chars", "5"]
    assert main(base + ["--cell", cell, "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    losses = [float(line.split("val loss ")[1].split()[0].rstrip(",")) for line in out.splitlines() if "val loss" in line]
    assert f"{cell} cell" in out and losses[-1] < losses[0] - 0.3, out
    assert main(base + ["--resume", "--cell", "course", "--epochs", "2"]) == 1
    assert "conflicts with the checkpoint's" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(ckpt), "--length", "12", "--prime", "def"]) == 0
    sampled = capsys.readouterr().out
    assert sampled.startswith("def") and len(sampled) == 16  # the prime, 12 chars, the line's end
    out_dir = tmp_path / "inspect"  # a twin's model: its units and gradients, beside the course's
    course = tmp_path / "course.pt"
    assert main(base[:-4] + ["--checkpoint", str(course), "--epochs", "1", "--steps", "2", "--sample-chars", "1"]) == 0
    assert main(["inspect", "--checkpoint", str(ckpt), "--compare", str(course), "--prime", "def", "--chars", "30",
                 "--out", str(out_dir)]) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["activations.png", "gradients.png", "index.html"]


@pytest.mark.parametrize("argv, message", [
    (["train", "--corpus", "/nonexistent/corpus.txt"], "cannot read corpus"),
    (["train", "--corpus", "EMPTY"], "is empty"),
    (["sample", "--checkpoint", "/nonexistent/model.pt"], "not found"),
    (["sample", "--checkpoint", "GARBAGE"], "not a fused_rnn char model"),
], ids=["missing-corpus", "empty-corpus", "missing-checkpoint", "garbage-checkpoint"])
def test_user_errors_are_one_line(argv, message, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    argv = [str(tmp_path / "empty.txt") if a == "EMPTY" else str(tmp_path / "garbage.pt") if a == "GARBAGE"
            else a for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("argv", [["train", "--lr", "-1"], ["train", "--steps", "0"],
                                  ["train", "--dropout", "1.5"], ["train", "--backend", "cudnn"],
                                  ["sample", "--temperature", "x"], ["frobnicate"]])
def test_bad_options_exit_2_in_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def torchrun_train(corpus, ckpt, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "fused_rnn", "train", "--corpus", str(corpus), "--seq-len", "16", "--hidden-size", "16",
            "--batch-size", "4", "--checkpoint", str(ckpt), "--sample-chars", "10", "--device", "cpu", *extra]


@pytest.mark.parametrize("cell", ["course", pytest.param("lstm", marks=pytest.mark.exhaustive),
                                  pytest.param("gru", marks=pytest.mark.exhaustive)])
def test_train_under_torchrun_with_two_processes(cell, corpus, tmp_path):
    """DistributedDataParallel over the fused kernels (the twins' for the LSTM and GRU)."""
    ckpt = tmp_path / "ddp.pt"
    out = subprocess.run(torchrun_train(corpus, ckpt, "--epochs", "1", "--steps", "5", "--save-every", "2",
                                        "--cell", cell), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "x 2 processes" in out.stdout and out.stdout.count("epoch 1: train loss") == 1
    assert "Warning" not in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert torch.load(ckpt, weights_only=True)["step"] == 5


@pytest.mark.exhaustive
def test_sigterm_under_torchrun_saves_once(corpus, tmp_path):
    """torchrun passes SIGTERM to every process; they stop at the same step and rank 0 alone saves."""
    import signal
    import time

    ckpt = tmp_path / "ddp.pt"
    proc = subprocess.Popen(torchrun_train(corpus, ckpt, "--epochs", "1", "--steps", "100000", "--save-every", "3"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not ckpt.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0  # torchrun reports the signal itself
    stopped = [line for line in out.splitlines() if line.startswith("stopped by SIGTERM at step")]
    assert len(stopped) == 1 and str(ckpt) in stopped[0], out + err
    step = int(stopped[0].split("at step ")[1].split(":")[0])
    assert torch.load(ckpt, weights_only=True)["step"] == step
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_mismatched_checkpoint_is_one_line(tmp_path, capsys):
    from fused_rnn.app.model import CharLanguageModel, ModelConfig

    path = tmp_path / "other.pt"
    small = CharLanguageModel(ModelConfig("abc", hidden_size=8))
    torch.save({"config": {"vocab": "abc", "hidden_size": 16}, "model": small.state_dict()}, path)
    assert main(["sample", "--checkpoint", str(path)]) == 1
    err = capsys.readouterr().err
    assert "not a fused_rnn char model" in err and len(err.strip().splitlines()) == 1, err


def test_no_command_lists_the_commands(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    for command in ("train", "sample", "inspect"):
        assert any(line.split()[:1] == [command] for line in err.splitlines()), err


def test_inspect_is_wired_with_one_line_errors(tmp_path, capsys):
    assert main(["inspect", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("python -m fused_rnn inspect: error:") and len(err.strip().splitlines()) == 1, err


def test_training_history_and_loss_curve(corpus, tmp_path, capsys):
    ckpt = tmp_path / "model.pt"
    assert main(["train", "--corpus", str(corpus), "--seq-len", "16", "--hidden-size", "16", "--batch-size", "4",
                 "--epochs", "2", "--steps", "3", "--checkpoint", str(ckpt), "--sample-chars", "5"]) == 0
    out = capsys.readouterr().out
    history = torch.load(ckpt, weights_only=True)["history"]
    assert history["step"] == [1, 2, 3, 4, 5, 6] and len(history["train_loss"]) == 6
    assert [step for step, _ in history["val"]] == [0, 3, 6]
    png = tmp_path / "model_loss.png"
    if importlib.util.find_spec("matplotlib"):
        assert f"loss curve: {png}" in out and png.stat().st_size > 0, out
    else:
        assert "loss curve: not drawn" in out, out


def test_loss_curve_without_matplotlib_is_one_plain_line(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    ckpt = tmp_path / "model.pt"
    assert main(["train", "--corpus", str(corpus), "--seq-len", "16", "--hidden-size", "16", "--batch-size", "4",
                 "--epochs", "1", "--steps", "2", "--checkpoint", str(ckpt), "--sample-chars", "5"]) == 0
    captured = capsys.readouterr()
    assert 'loss curve: not drawn (pip install -e ".[viz]" for matplotlib)\n' in captured.out
    assert "Warning" not in captured.err and not (tmp_path / "model_loss.png").exists()


def test_progress_without_a_terminal_prints_plain_lines(capsys):
    from fused_rnn.app.progress import Progress

    progress = Progress(3, "epoch 1/1", True, interval=0)
    for _ in range(3):
        progress.update(loss="1.000")
    progress.close()
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines() == [f"epoch 1/1: step {i}/3, loss 1.000" for i in (1, 2, 3)]
