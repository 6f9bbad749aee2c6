"""The fast tier (``pytest -m fast``) needs neither the shared data nor a server."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.heavy  # runs the fast tier in a subprocess (about 20 s)
def test_fast_tier_runs_without_the_shared_data(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["DSM_SHARED"] = str(tmp_path / "no-shared-data")  # a test that needed it would skip here
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "fast", "-q", "-p", "no:cacheprovider", "-rs"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    tail = proc.stdout[-2000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary
    assert int(summary.split(" passed")[0].split()[-1]) >= 100, summary
