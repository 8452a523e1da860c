"""python -m fused_rnn train / sample: a real (tiny) run, and one-line errors for bad input."""
import pytest

from fused_rnn.__main__ import main

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
    losses = [float(line.split("val loss ")[1].split()[0]) for line in out.splitlines() if "val loss" in line]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.5, out
    assert main(["sample", "--checkpoint", str(ckpt), "--length", "25", "--prime", "def"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("def") and len(text.rstrip("\n")) == 28


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


def test_train_under_torchrun_with_two_processes(corpus, tmp_path):
    import subprocess
    import sys

    ckpt = tmp_path / "ddp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fused_rnn", "train", "--corpus", str(corpus), "--seq-len", "16", "--hidden-size", "16",
           "--batch-size", "4", "--epochs", "1", "--steps", "5", "--checkpoint", str(ckpt),
           "--sample-chars", "10", "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "x 2 processes" in out.stdout and out.stdout.count("epoch 1: train loss") == 1
    assert ckpt.exists()


def test_mismatched_checkpoint_is_one_line(tmp_path, capsys):
    import torch

    from fused_rnn.train import CharLanguageModel, ModelConfig

    path = tmp_path / "other.pt"
    small = CharLanguageModel(ModelConfig("abc", hidden_size=8))
    torch.save({"config": {"vocab": "abc", "hidden_size": 16}, "model": small.state_dict()}, path)
    assert main(["sample", "--checkpoint", str(path)]) == 1
    err = capsys.readouterr().err
    assert "not a fused_rnn char model" in err and len(err.strip().splitlines()) == 1, err
