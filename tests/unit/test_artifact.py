"""The artifact's checksums: a tarball without its checksum file, or one that changed after it was
built, is refused before any host is touched. No build needed: the files are made here."""

from __future__ import annotations

import hashlib

import pytest

from opsbook.engines import artifact


@pytest.fixture
def dist(tmp_path, monkeypatch):
    monkeypatch.setattr(artifact, "DIST", tmp_path)
    return tmp_path


def _tarball(dist, version: str, data: bytes = b"not really a tarball") -> None:
    (dist / f"{artifact.NAME}-{version}.tar.gz").write_bytes(data)


def test_an_artifact_with_a_matching_checksum_is_found(dist):
    _tarball(dist, "9.9.9")
    digest = hashlib.sha256(b"not really a tarball").hexdigest()
    (dist / f"{artifact.NAME}-9.9.9.tar.gz.sha256").write_text(f"{digest}  {artifact.NAME}-9.9.9.tar.gz\n")
    assert artifact.find("9.9.9").sha256 == digest


def test_an_artifact_without_its_checksum_file_is_refused(dist):
    _tarball(dist, "9.9.8")
    with pytest.raises(artifact.ArtifactError, match=r"has no checksum file.*Nothing was deployed"):
        artifact.find("9.9.8")


def test_an_artifact_that_changed_after_it_was_built_is_refused(dist):
    _tarball(dist, "9.9.7")
    (dist / f"{artifact.NAME}-9.9.7.tar.gz.sha256").write_text(f"{'0' * 64}  {artifact.NAME}-9.9.7.tar.gz\n")
    with pytest.raises(artifact.ArtifactError, match="does not match its checksum file"):
        artifact.find("9.9.7")


def _wheels_in(path) -> list[str]:
    import tarfile

    with tarfile.open(path) as tar:
        return sorted(n.rsplit("/", 1)[-1] for n in tar.getnames() if n.endswith(".whl") and "/bl_api-" not in n)


def test_a_second_build_takes_its_dependencies_from_the_cache_with_no_network(dist):
    """The first build resolves the dependencies and keeps their wheels (and the build backend) in
    dist/.deps/; the next one, run here with no network at all, takes the same wheels from there."""
    import subprocess
    import sys

    from opsbook.core.paths import ROOT

    first = artifact.build("9.9.1+cache", log=lambda _m: None)
    assert (artifact._deps_cache(artifact.APP) / ".complete").exists()
    code = (f"from pathlib import Path; from opsbook.engines import artifact; artifact.DIST = Path({str(dist)!r}); "
            f"artifact.build('9.9.2+cache', log=print)")
    proc = subprocess.run(["unshare", "-n", sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    second = artifact.find("9.9.2+cache")
    assert _wheels_in(second.path) == _wheels_in(first.path)
    assert len(_wheels_in(first.path)) >= 3   # flask, gunicorn, psycopg and what they need


def test_the_masking_rules_travel_with_the_artifact_next_to_its_migrations(dist, tmp_path_factory):
    """A refresh masks with the rules of the version production runs: `invoke build` puts the masking
    file of the source it builds (not the checkout's at refresh time) into the artifact, beside the
    migrations, where masking.lint finds it once both are unpacked."""
    import shutil

    from opsbook.core.paths import APP
    from opsbook.engines import masking

    assert artifact.MASKING_FILE == masking.MASKING_FILE
    src = tmp_path_factory.mktemp("src") / "app"
    shutil.copytree(APP, src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist"))
    rules = (src / "masking.yml").read_text() + "\n# rules of version 9.9.3+masking\n"
    (src / "masking.yml").write_text(rules)
    built = artifact.build("9.9.3+masking", log=lambda _m: None, source=src)
    (src / "masking.yml").write_text("changed after the build\n")   # the artifact is what it was built from

    out = tmp_path_factory.mktemp("unpacked")
    migrations = built.extract_migrations(out)
    rules_file = built.extract_masking(out)
    assert rules_file.read_text() == rules
    assert rules_file == migrations.parent / masking.MASKING_FILE
    assert masking.MASKING_FILE in built.manifest()["files"]   # checksummed like every file it holds
    assert masking.lint(migrations) is not None   # the unpacked pair lints like app/ does


def test_a_source_without_masking_rules_is_not_built(dist, tmp_path_factory):
    import shutil

    from opsbook.core.paths import APP

    src = tmp_path_factory.mktemp("src") / "app"
    shutil.copytree(APP, src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist"))
    (src / "masking.yml").unlink()
    with pytest.raises(artifact.ArtifactError, match=r"masking.yml does not exist.*Nothing was built"):
        artifact.build("9.9.4+nomask", log=lambda _m: None, source=src)
    assert not list(dist.glob("*.tar.gz"))


@pytest.mark.parametrize("version", ["1.1.0.pa", "1.2-beta.x", "2.0+"])
def test_a_version_pip_cannot_build_is_refused_before_anything_is_built(dist, version):
    # Each passes the path-safety pattern; pip would fail on it deep inside setuptools, with a traceback.
    assert artifact.VERSION_RE.match(version)
    with pytest.raises(artifact.ArtifactError, match=r"PEP 440 version.*\+hotfix\.1.*Nothing was built"):
        artifact.build(version, log=lambda _m: None)
    assert not list(dist.iterdir())
