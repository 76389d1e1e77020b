"""opsbook-mark-good (roles/app/files): the program each app host runs once a release succeeded,
to mark it good and apply retention. Run here on a real directory tree laid out as on a host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opsbook.core.paths import ROOT

PROGRAM = ROOT / "roles" / "app" / "files" / "opsbook-mark-good"


def host(tmp_path: Path, releases: list[str], current: str, good: list[str] = ()) -> Path:
    """releases/<name> for each name, oldest first (mtimes 100 s apart), good markers in the given
    order (oldest first), an artifact per release and `current` pointing at one."""
    root = tmp_path / "srv"
    (root / "shared" / "artifacts").mkdir(parents=True)
    for name in releases:
        (root / "releases" / name).mkdir(parents=True)
        (root / "shared" / "artifacts" / f"bl-api-{name}.tar.gz").write_bytes(b"x")
    for i, name in enumerate(good):
        marker = root / "releases" / name / ".opsbook-good"
        marker.touch()
        os.utime(marker, (2_000_000 + i * 100, 2_000_000 + i * 100))
    for i, name in enumerate(releases):   # after the markers, whose creation touches the directory
        os.utime(root / "releases" / name, (1_000_000 + i * 100, 1_000_000 + i * 100))
    (root / "current").symlink_to(root / "releases" / current)
    return root


def mark(root: Path, version: str, keep: int, *extra: str) -> dict:
    proc = subprocess.run([sys.executable, str(PROGRAM), str(root), version, str(keep), "bl-api-", *extra],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def left(root: Path) -> tuple[list[str], list[str]]:
    return (sorted(p.name for p in (root / "releases").iterdir()),
            sorted(p.name for p in (root / "shared" / "artifacts").iterdir()))


def test_marks_the_release_and_keeps_current_the_newest_good_and_the_newest_others(tmp_path):
    names = [f"1.0.{i}" for i in range(8)]
    # 1.0.1 is the newest good before this run; 1.0.7 is current and is marked now.
    root = host(tmp_path, names, current="1.0.7", good=["1.0.3", "1.0.1"])
    out = mark(root, "1.0.7", keep=3)
    assert out["marked"] is True
    assert out["changed"] is True
    releases, artifacts = left(root)
    # current (1.0.7, also the newest good now), the newest other good one (1.0.1: a rollback's
    # target) and the 2 newest others (1.0.6, 1.0.5)
    assert releases == ["1.0.1", "1.0.5", "1.0.6", "1.0.7"]
    assert artifacts == [f"bl-api-{n}.tar.gz" for n in releases]
    assert (root / "releases" / "1.0.7" / ".opsbook-good").is_file()


def test_a_rollback_target_keeps_the_newest_good_release_it_is_not(tmp_path):
    names = [f"1.0.{i}" for i in range(6)]
    # Rolled back: current is the old 1.0.1; 1.0.4 was the newest marked good before.
    root = host(tmp_path, names, current="1.0.1", good=["1.0.4"])
    marker = root / "releases" / "1.0.1" / ".opsbook-good"
    marker.touch()
    os.utime(marker, (1_500_000, 1_500_000))   # marked long ago: 1.0.4's mark is newer
    mark(root, "1.0.1", keep=2)
    releases, _ = left(root)
    assert releases == ["1.0.1", "1.0.4", "1.0.5"]   # current, newest good, 1 newest other


def test_a_release_marked_good_again_is_the_newest_good_and_keeps_the_one_before(tmp_path):
    """An old release released again (its directory is old, its mark too): once it is marked good
    again, the release a rollback would return to is the one good before it, whatever its age."""
    names = [f"1.0.{i}" for i in range(7)]
    root = host(tmp_path, names, current="1.0.0", good=["1.0.0", "1.0.3", "1.0.5"])
    out = mark(root, "1.0.0", keep=2)
    assert out["marked"] is True                  # its mark renewed: the newest now
    releases, _ = left(root)
    assert releases == ["1.0.0", "1.0.5", "1.0.6"]   # current, the good one before it, 1 newest other
    marks = {n: (root / "releases" / n / ".opsbook-good").stat().st_mtime for n in ("1.0.0", "1.0.5")}
    assert marks["1.0.0"] > marks["1.0.5"]
    # The next release (1.0.6) marked good: 1.0.0 is what a rollback returns to, and it stays.
    (root / "current").unlink()
    (root / "current").symlink_to(root / "releases" / "1.0.6")
    mark(root, "1.0.6", keep=1)
    assert left(root)[0] == ["1.0.0", "1.0.6"]
    assert mark(root, "1.0.6", keep=1) == {"changed": False, "marked": False, "removed": [],
                                           "artifacts_removed": []}


def test_a_second_run_changes_nothing_and_keeps_the_first_marks_time(tmp_path):
    root = host(tmp_path, ["1.0.0", "1.0.1"], current="1.0.1")
    mark(root, "1.0.1", keep=5)
    marker = root / "releases" / "1.0.1" / ".opsbook-good"
    first = marker.stat().st_mtime
    out = mark(root, "1.0.1", keep=5)
    assert out == {"changed": False, "marked": False, "removed": [], "artifacts_removed": []}
    assert marker.stat().st_mtime == first


def test_check_mode_says_what_it_would_do_and_changes_nothing(tmp_path):
    root = host(tmp_path, [f"1.0.{i}" for i in range(4)], current="1.0.3")
    before = left(root)
    out = mark(root, "1.0.3", 1, "--check")
    assert out["removed"] == ["1.0.2", "1.0.1", "1.0.0"]
    assert out["changed"] is True
    assert left(root) == before
    assert not (root / "releases" / "1.0.3" / ".opsbook-good").exists()


def test_an_artifact_whose_release_is_gone_is_removed_and_hidden_dirs_are_not_releases(tmp_path):
    root = host(tmp_path, ["1.0.0", "1.0.1"], current="1.0.1")
    (root / "shared" / "artifacts" / "bl-api-0.9.tar.gz").write_bytes(b"x")   # its release is long gone
    (root / "releases" / ".tmp-unpack").mkdir()
    out = mark(root, "1.0.1", keep=5)
    assert out["artifacts_removed"] == ["bl-api-0.9.tar.gz"]
    assert (root / "releases" / ".tmp-unpack").is_dir()


@pytest.mark.parametrize("version", ["9.9.9", "../etc", ".hidden"])
def test_a_release_that_is_not_there_is_refused_and_nothing_changes(tmp_path, version):
    root = host(tmp_path, ["1.0.0", "1.0.1"], current="1.0.1")
    before = left(root)
    proc = subprocess.run([sys.executable, str(PROGRAM), str(root), version, "1", "bl-api-"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0
    assert "Nothing was changed" in proc.stderr
    assert left(root) == before
