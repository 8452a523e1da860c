"""The README's commands in a real process: no warning, no traceback, no carriage returns in a log."""
import os
import subprocess
import sys

import pytest


def run(args, cwd, log=None):
    """``python -m fused_rnn ARGS`` as a user runs it (no test-only environment variables);
    stdout and stderr apart, or both into the file ``log`` as in ``> log 2>&1``."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONWARNINGS")}
    cmd = [sys.executable, "-m", "fused_rnn", *args]
    if log is None:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    with open(log, "w") as fh:
        return subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=300)


def assert_clean(text):
    assert "Warning" not in text and "Traceback" not in text, text


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny `python -m fused_rnn train --steps 5 --epochs 1 > log 2>&1` on the default corpus."""
    cwd = tmp_path_factory.mktemp("run")
    log = cwd / "log"
    proc = run(["train", "--steps", "5", "--epochs", "1", "--hidden-size", "32", "--max-chars", "50000",
                "--sample-chars", "20", "--device", "cpu"], cwd, log)
    return proc, cwd, log.read_bytes().decode()


def test_train_log_is_plain_lines(trained):
    proc, cwd, log = trained
    assert proc.returncode == 0, log
    assert_clean(log)
    assert "\r" not in log and "epoch 1: train loss" in log and (cwd / "checkpoints" / "char_rnn.pt").exists()


def test_sample_is_clean(trained):
    _, cwd, _ = trained
    out = run(["sample", "--length", "20"], cwd)
    assert out.returncode == 0 and out.stdout.startswith("def "), out.stdout + out.stderr
    assert_clean(out.stderr)


def test_no_command_lists_commands_cleanly(tmp_path):
    out = run([], tmp_path)
    assert out.returncode == 2 and "train" in out.stderr and "inspect" in out.stderr
    assert_clean(out.stderr)
