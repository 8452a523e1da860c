"""The command line at its edges, in a real process: each mistake ends in one line on stderr
(exit 1, or 2 for a bad option), never a traceback, and before any training work is lost.

Each case starts a Python process (~4 s on 2 cores): the fast tier keeps one case per kind of
mistake, the exhaustive tier runs the others."""
import os
import stat
import subprocess
import sys

import pytest
import torch

from fused_rnn.app.checkpoint import read_checkpoint, save_checkpoint
from fused_rnn.app.model import CharLanguageModel, ModelConfig
from fused_rnn.app.training import RUN_DEFAULTS

TEXT = "def add(a, b):\n    return a + b\n\n" * 40
TINY = ["--seq-len", "16", "--hidden-size", "16", "--n-fac", "4", "--batch-size", "4", "--sample-chars", "5",
        "--device", "cpu"]


def cli(*args, umask=None, timeout=300):
    """``python -m fused_rnn ARGS`` as a user runs it (no test-only environment variables)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONWARNINGS")}
    return subprocess.run([sys.executable, "-m", "fused_rnn", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def one_line(proc, status, *messages):
    """The stderr line of a command that ended with ``status``, checked to be its only line."""
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == status and len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for message in messages:
        assert message in err[0], err[0]
    return err[0]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def saved_run(path, *, step=0, steps=4, corpus=None, finite=True, damage=None):
    """A checkpoint as train saves it (a tiny model), with ``damage`` replacing parts of it."""
    torch.manual_seed(0)
    model = CharLanguageModel(ModelConfig("".join(sorted(set(TEXT))), n_fac=4, hidden_size=16))
    if not finite:
        with torch.no_grad():
            model.l_out.weight[0, 0] = float("nan")
    optimizer = torch.optim.Adam(model.parameters())
    run = {**RUN_DEFAULTS, "corpus": str(corpus) if corpus else None, "steps": steps, "seq_len": 16,
           "hidden_size": 16, "n_fac": 4, "batch_size": 4}
    save_checkpoint(str(path), model, step, 1.0, optimizer=optimizer.state_dict(), run=run,
                    history={"step": list(range(1, step + 1)), "train_loss": [1.0] * step, "val": [[0, 1.0]]})
    if damage:
        ckpt = torch.load(path, weights_only=True)
        for key, value in damage.items():
            if "." in key:
                outer, inner = key.split(".")
                ckpt[outer][inner] = value
            else:
                ckpt[key] = value
        torch.save(ckpt, path)
    return path


# ----------------------------------------------------------------------------------------------
# --checkpoint is checked before training starts


@pytest.mark.parametrize("where, message", [
    pytest.param("DIR", "is a directory", marks=pytest.mark.exhaustive),
    pytest.param("", "--checkpoint is empty", marks=pytest.mark.exhaustive),
    ("FILE/model.pt", "cannot write the checkpoint"),
], ids=["directory", "empty", "unwritable"])
def test_bad_checkpoint_path_fails_before_training(where, message, corpus, tmp_path):
    (tmp_path / "FILE").write_text("a file, not a folder")
    (tmp_path / "DIR").mkdir()
    path = str(tmp_path / where) if where else ""
    proc = cli("train", "--corpus", corpus, "--checkpoint", path, "--steps", "100000", *TINY)
    one_line(proc, 1, message)
    assert proc.stdout == ""  # not even the first evaluation ran


# ----------------------------------------------------------------------------------------------
# devices, backends, sizes, seeds


@pytest.mark.parametrize("device, message", [
    ("meta", "the fused kernels run on CPU or CUDA devices"),
    pytest.param("mps", "the fused kernels run on CPU or CUDA devices", marks=pytest.mark.exhaustive),
    pytest.param("cuda:1", "--device cuda:1 asked for, but", marks=pytest.mark.exhaustive),
    pytest.param("banana", "unknown device 'banana'", marks=pytest.mark.exhaustive),
])
@pytest.mark.parametrize("command", ["train", pytest.param("sample", marks=pytest.mark.exhaustive)])
def test_unusable_device_is_one_line(command, device, message, corpus, tmp_path):
    if device == "cuda:1" and torch.cuda.device_count() > 1:
        pytest.skip("this machine has a second CUDA device")
    if command == "train":
        args = ["train", "--corpus", corpus, "--checkpoint", tmp_path / "m.pt", *TINY, "--device", device]
    else:  # the device is blamed, not the (good) checkpoint
        args = ["sample", "--checkpoint", saved_run(tmp_path / "m.pt"), "--device", device]
    line = one_line(cli(*args), 1, message)
    assert "checkpoint" not in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_triton_backend_without_a_gpu_is_one_line(corpus, tmp_path):
    proc = cli("train", "--corpus", corpus, "--checkpoint", tmp_path / "m.pt", *TINY, "--backend", "triton")
    one_line(proc, 1, "--backend triton cannot run here: no CUDA device")


@pytest.mark.exhaustive
def test_unallocatable_model_is_one_line(corpus, tmp_path):
    proc = cli("train", "--corpus", corpus, "--checkpoint", tmp_path / "m.pt", *TINY, "--hidden-size", 10**10)
    one_line(proc, 1, "cannot make a model with hidden size 10000000000")


@pytest.mark.parametrize("option, value", [("--seed", 2**64)] + [
    pytest.param(option, value, marks=pytest.mark.exhaustive)
    for option, value in [("--seed", -1), ("--hidden-size", "1e10"), ("--lr", "inf")]])
def test_out_of_range_option_exits_2(option, value, corpus, tmp_path):
    one_line(cli("train", "--corpus", corpus, "--checkpoint", tmp_path / "m.pt", option, value), 2, "expected")


@pytest.mark.exhaustive
def test_seed_up_to_64_bits_trains(corpus, tmp_path):
    proc = cli("train", "--corpus", corpus, "--checkpoint", tmp_path / "m.pt", *TINY, "--seed", 2**64 - 1,
               "--steps", "1", "--epochs", "1")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------------------------
# --resume


@pytest.mark.parametrize("damage", [{"config": "junk"}] + [pytest.param(damage, marks=pytest.mark.exhaustive) for damage in [
    {"config.vocab": 5}, {"config.hidden_size": -3}, {"config.colour": "red"},
    {"run.lr": "fast"}, {"run": [1, 2]}, {"step": "three"}, {"config": None}]], ids=["config-not-a-dict", "vocab-not-a-str", "negative-size", "unknown-key", "bad-lr", "run-not-a-dict",
        "bad-step", "no-config"])
def test_resume_from_a_damaged_checkpoint_is_one_line(damage, corpus, tmp_path):
    path = saved_run(tmp_path / "m.pt", corpus=corpus, damage=damage)
    one_line(cli("train", "--resume", "--checkpoint", path, "--device", "cpu"), 1, "is not a fused_rnn char model")


@pytest.mark.exhaustive
def test_resume_with_the_epochs_already_reached_says_so(corpus, tmp_path):
    path = saved_run(tmp_path / "m.pt", step=8, steps=4, corpus=corpus)
    one_line(cli("train", "--resume", "--checkpoint", path, "--epochs", "2", "--device", "cpu"), 1,
             "at step 8, already past --epochs 2", "give a larger one")


# ----------------------------------------------------------------------------------------------
# the corpus


@pytest.mark.exhaustive
def test_one_character_corpus_is_too_short_not_empty(tmp_path):
    (tmp_path / "one.txt").write_text("a")
    proc = cli("train", "--corpus", tmp_path / "one.txt", "--checkpoint", tmp_path / "m.pt", *TINY)
    line = one_line(proc, 1, "corpus too short (1 char)")
    assert "empty" not in line


@pytest.fixture(scope="module")
def bom_run(tmp_path_factory):
    """A tiny run on a corpus that starts with a UTF-8 byte-order mark, with --dropout on one
    layer, under umask 027."""
    folder = tmp_path_factory.mktemp("bom")
    corpus = folder / "bom.txt"
    corpus.write_bytes(b"\xef\xbb\xbf" + TEXT.encode())
    ckpt = folder / "m.pt"
    proc = cli("train", "--corpus", corpus, "--checkpoint", ckpt, *TINY, "--steps", "2", "--epochs", "1",
               "--dropout", "0.5", umask=0o027)
    assert proc.returncode == 0, proc.stderr
    return proc, ckpt


def test_byte_order_mark_is_not_a_vocabulary_char(bom_run):
    _, ckpt = bom_run
    vocab = read_checkpoint(str(ckpt))["config"]["vocab"]
    assert "\ufeff" not in vocab and vocab == "".join(sorted(set(TEXT)))


def test_dropout_with_one_layer_warns_in_one_line(bom_run):
    proc, _ = bom_run
    line = one_line(proc, 0, "--dropout 0.5 does nothing with one layer")
    assert line.startswith("warning:")


def test_checkpoint_follows_the_umask(bom_run):
    _, ckpt = bom_run
    assert stat.S_IMODE(ckpt.stat().st_mode) == 0o640  # as the loss curve beside it, not 0600


def test_sample_says_which_prime_chars_it_dropped(bom_run):
    _, ckpt = bom_run
    proc = cli("sample", "--checkpoint", ckpt, "--prime", "d\u00e9f\u00e9", "--length", "5", "--device", "cpu")
    line = one_line(proc, 0, "'\u00e9'", "dropped")
    assert proc.stdout.startswith("df") and "\u00e9" not in proc.stdout and line.count("'\u00e9'") == 1


# ----------------------------------------------------------------------------------------------
# a diverged run, and a non-finite model


@pytest.mark.exhaustive
def test_diverged_run_stops_at_the_first_non_finite_loss(corpus, tmp_path):
    ckpt = tmp_path / "m.pt"
    proc = cli("train", "--corpus", corpus, "--checkpoint", ckpt, *TINY, "--lr", "1e30", "--save-every", "1",
               "--steps", "50", "--epochs", "1")
    line = one_line(proc, 1, "training diverged at step", "lower --lr")
    step = int(line.split("diverged at step ")[1].split(":")[0])
    if step > 1:  # the checkpoint of the step before, finite
        assert f"step {step - 1}) is kept" in line
        saved = read_checkpoint(str(ckpt))
        assert saved["step"] == step - 1
        assert all(torch.isfinite(v).all() for v in saved["model"].values())
    else:
        assert "no checkpoint was saved" in line and not ckpt.exists()


@pytest.mark.parametrize("command", ["sample", pytest.param("inspect", marks=pytest.mark.exhaustive)])
def test_non_finite_model_is_refused_in_one_line(command, tmp_path):
    path = saved_run(tmp_path / "m.pt", finite=False)
    args = [command, "--checkpoint", path] + (["--out", tmp_path / "out"] if command == "inspect" else [])
    one_line(cli(*args), 1, "holds non-finite weights", "lower --lr")
