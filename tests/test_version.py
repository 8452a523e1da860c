"""``fused_rnn.__version__`` is the version that setup.py installs."""
import subprocess
import sys
from pathlib import Path

import fused_rnn

ROOT = Path(__file__).resolve().parents[1]


def test_version_matches_setup_py():
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == fused_rnn.__version__
    assert fused_rnn.__version__.count(".") == 2
