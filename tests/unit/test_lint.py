"""The code and the playbooks meet the project's bars: ruff, and ansible-lint's production profile."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from opsbook.core.paths import ROOT

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


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "lint-imports"), "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          check=False, env={**os.environ, "PYTHONPATH": str(cwd)})


def test_imports_only_point_down():
    proc = _lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize(
    ("module", "bad_import", "broken"),
    [
        pytest.param("opsbook/core/facts.py", "from opsbook.engines import lock", "Layers point down", id="core-up"),
        pytest.param("opsbook/engines/fleet.py", "from opsbook.operations import status", "Layers point down",
                     id="engine-up"),
        pytest.param("opsbook/operations/status.py", "from opsbook.operations import migrate",
                     "never imports another operation", id="operation-sideways"),
    ],
)
def test_an_import_that_points_up_fails_with_a_readable_message(tmp_path, module, bad_import, broken):
    """The contracts can fail: the same tree with one wrong import breaks the named contract."""
    shutil.copytree(ROOT / "opsbook", tmp_path / "opsbook", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{bad_import}  # noqa\n")
    proc = _lint_imports(tmp_path)
    assert proc.returncode != 0
    assert broken in proc.stdout, proc.stdout[-3000:]
    assert "BROKEN" in proc.stdout
