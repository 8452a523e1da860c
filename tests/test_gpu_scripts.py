"""The GPU check's scripts run without a GPU too, so that they cannot rot between the rare
sessions lent one (the first GPU run found gpu_extra_checks.py calling a kernel launcher with an
old signature)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_extra_checks_dry_run_on_the_cpu():
    done = subprocess.run([sys.executable, "benchmarks/gpu_extra_checks.py", "--cpu-dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "dry run: 0 failures" in done.stdout


def test_gpu_check_script_parses():
    done = subprocess.run(["bash", "-n", "benchmarks/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
