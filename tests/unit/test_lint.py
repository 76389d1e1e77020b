"""The code and the playbooks meet the project's bars: ruff, and ansible-lint's production profile."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from opsbook import ROOT

BIN = Path(sys.executable).parent


def test_ruff_passes():
    proc = subprocess.run([str(BIN / "ruff"), "check", "."], cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:]


@pytest.mark.slow
def test_ansible_lint_production_profile_passes():
    proc = subprocess.run([str(BIN / "ansible-lint"), "playbooks", "roles"], cwd=ROOT, capture_output=True,
                          text=True, check=False, env={**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "production" in proc.stderr + proc.stdout
