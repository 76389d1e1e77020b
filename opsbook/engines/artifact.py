"""The release artifact: one immutable, versioned, checksummed tarball per version.

`dist/bl-api-<V>.tar.gz` holds `bl-api-<V>/` with
  manifest.json   version, git sha, build time, sha256 of every file below
  wheelhouse/     the service wheel and a wheel of every dependency (hosts install offline)
  migrations/     the migrations this version ships
  masking.yml     the masking rules for those migrations' columns (app/masking.yml): a staging
                  refresh masks with the rules of the version production runs, not of the checkout
and `dist/bl-api-<V>.tar.gz.sha256` beside it. Artifacts are never rebuilt in place.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from packaging.version import InvalidVersion, Version

from opsbook.core import facts
from opsbook.core.errors import OpsbookError
from opsbook.core.paths import APP, DIST, ROOT

NAME = "bl-api"
MASKING_FILE = "masking.yml"   # the same name opsbook.engines.masking reads next to the migrations
VERSION_RE = re.compile(r"^[0-9][0-9A-Za-z.+_-]{0,63}$")


class ArtifactError(OpsbookError):
    pass


@dataclass(frozen=True)
class Artifact:
    version: str
    path: Path

    @functools.cached_property
    def sha256(self) -> str:
        """Hashed once per Artifact (verify, the plan and a re-plan all ask; the file is immutable)."""
        return sha256_file(self.path)

    def manifest(self) -> dict:
        with tarfile.open(self.path) as tar:
            member = tar.extractfile(f"{NAME}-{self.version}/manifest.json")
            if member is None:
                raise ArtifactError(f"{self.path} has no manifest.json; rebuild it with `invoke build`.")
            return json.load(member)

    def extract_migrations(self, dest: Path) -> Path:
        """Unpack this version's migrations into dest and return their directory."""
        prefix = f"{NAME}-{self.version}/migrations/"
        with tarfile.open(self.path) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
            tar.extractall(dest, members=members, filter="data")
        return dest / prefix

    def rules(self) -> tuple[Path, Path]:
        """(masking.yml, migrations/) of this version, unpacked once beside the artifact
        (`dist/.rules/<version>/`: an artifact never changes), for reading; a half-made copy is never used."""
        dest = self.path.parent / ".rules" / self.version
        if not (dest / ".complete").exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{self.version}-", dir=dest.parent))
            self.extract_masking(tmp)
            self.extract_migrations(tmp)
            (tmp / ".complete").touch()
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
        root = dest / f"{NAME}-{self.version}"
        return root / MASKING_FILE, root / "migrations"

    def extract_masking(self, dest: Path) -> Path:
        """Unpack this version's masking rules into dest and return the file's path. It lands next to
        the migrations `extract_migrations` unpacks into the same dest, where `masking.lint` looks."""
        name = f"{NAME}-{self.version}/{MASKING_FILE}"
        with tarfile.open(self.path) as tar:
            try:
                member = tar.getmember(name)
            except KeyError:
                raise ArtifactError(
                    f"artifact {self.path.name} carries no {MASKING_FILE} (built before the masking rules travelled "
                    f"with the artifact). Nothing was changed. Release a version built since (`invoke build`), or "
                    f"give the masking file explicitly.") from None
            tar.extractall(dest, members=[member], filter="data")
        return dest / name


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def artifact_path(version: str) -> Path:
    return DIST / f"{NAME}-{version}.tar.gz"


def app_version() -> str:
    text = (APP / "bl_api" / "__init__.py").read_text()
    m = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    if not m:
        raise ArtifactError("app/bl_api/__init__.py has no __version__ line")
    return m.group(1)


def default_version() -> str:
    """The app's version plus the commit, and a content hash when app/ has uncommitted changes."""
    version = f"{app_version()}+g{facts.git_sha(short=True)}"
    changes = facts.uncommitted_changes("app")
    if changes:
        version += f".dirty{hashlib.sha256(changes).hexdigest()[:8]}"
    return version


def find(version: str) -> Artifact:
    # Checked before the version is used in a path or shown in a command to copy: a "version" like
    # `1.0;rm -rf /` must not come back as a command line an operator might paste.
    if not VERSION_RE.match(version):
        raise ArtifactError(f"{version!r} is not a release version: start with a digit; letters, digits, "
                            f". + _ - only (`invoke build` names them like 1.2.0+g1a2b3c4). No host was touched. "
                            f"Versions that exist: {', '.join(available()) or 'none built yet'}.")
    path = artifact_path(version)
    if not path.exists():
        raise ArtifactError(
            f"artifact {NAME} {version} does not exist ({path}). No host was touched. "
            f"Build it with `invoke build --version {version}`, or release a version that exists: "
            f"{', '.join(available()) or 'none built yet'}."
        )
    return verify(Artifact(version, path))


def available() -> list[str]:
    if not DIST.exists():
        return []
    out = []
    for p in sorted(DIST.glob(f"{NAME}-*.tar.gz"), key=lambda p: p.stat().st_mtime):
        out.append(p.name[len(NAME) + 1 : -len(".tar.gz")])
    return out


def verify(artifact: Artifact) -> Artifact:
    sums = artifact.path.with_name(artifact.path.name + ".sha256")
    if not sums.exists():
        raise ArtifactError(
            f"{artifact.path} has no checksum file ({sums.name}), so nothing proves it is the artifact that was "
            f"built. Nothing was deployed. Delete it and rebuild with `invoke build --version {artifact.version}`."
        )
    if sums.read_text().split()[0] != artifact.sha256:
        raise ArtifactError(
            f"{artifact.path} does not match its checksum file {sums.name}: it changed after it was "
            f"built. Nothing was deployed. Delete both files and rebuild with `invoke build --version "
            f"{artifact.version}`."
        )
    return artifact


def _shown(path: Path) -> str:
    """A path as an operator reads it: relative to the checkout when it is inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _deps_cache(src: Path) -> Path:
    """Where the dependency wheels of a service with this pyproject.toml are kept between builds
    (dist/.deps/<hash of pyproject.toml, Python version and platform>/)."""
    import platform

    key = hashlib.sha256((src / "pyproject.toml").read_bytes()
                         + f"{sys.version_info[:2]}{platform.machine()}".encode()).hexdigest()[:12]
    return DIST / ".deps" / key


def _wheels(src: Path, wheelhouse: Path) -> None:
    """The service wheel and every dependency wheel into `wheelhouse` (pip wheel).

    The dependency wheels (and the build backend the pyproject names) are kept in a cache the first
    time (`_deps_cache`), and later builds of a service with the same pyproject.toml take them from
    there with `--no-index`: the same wheels, no index asked, seconds instead of a resolve over the
    network. (pip's own HTTP cache still asks the index for every dependency; a find-links
    directory is pip's documented way to build offline.) Delete dist/.deps to refresh it."""
    import tomllib

    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    cache = _deps_cache(src)
    offline = ["--no-index", "--find-links", str(cache)] if (cache / ".complete").exists() else []
    proc = subprocess.run([*pip, "wheel", "--quiet", *offline, "--wheel-dir", str(wheelhouse), str(src)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ArtifactError(f"pip wheel failed; nothing was written to dist/:\n{proc.stderr[-3000:]}")
    if offline:
        return
    backend = tomllib.loads((src / "pyproject.toml").read_text()).get("build-system", {}).get("requires", [])
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{cache.name}.partial-", dir=cache.parent))   # builds may run at once
    for whl in wheelhouse.glob("*.whl"):
        if not whl.name.startswith(f"{NAME.replace('-', '_')}-"):
            shutil.copy2(whl, partial / whl.name)
    if backend:
        got = subprocess.run([*pip, "wheel", "--quiet", "--wheel-dir", str(partial), *backend],
                             capture_output=True, text=True, check=False)
        if got.returncode != 0:   # the artifact is fine; the next build resolves online again
            shutil.rmtree(partial, ignore_errors=True)
            return
    (partial / ".complete").touch()
    try:
        partial.rename(cache)          # atomic; refused when another build filled the cache first
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)


def build(version: str | None = None, log=print, source: Path = APP) -> Artifact:
    """Build dist/bl-api-V.tar.gz unless it exists already (artifacts are immutable).

    `source` is the service's source tree (app/); tests build deliberately broken versions
    from a patched copy."""
    version = version or default_version()
    if not VERSION_RE.match(version):
        raise ArtifactError(f"{version!r} is not a usable version: start with a digit; letters, digits, "
                            f". + _ - only. Nothing was built.")
    try:   # the version is stamped into the service's wheel, which pip builds only for a PEP 440 version
        Version(version)
    except InvalidVersion:
        raise ArtifactError(f"{version!r} is not a usable version: the service's wheel carries it, so it must be a "
                            f"PEP 440 version, e.g. 1.2.0, 1.2.0rc1 or 1.2.0+hotfix.1 (a label goes after a +). "
                            f"Nothing was built.") from None
    path = artifact_path(version)
    if path.exists():
        log(f"artifact {_shown(path)} exists; artifacts are immutable, not rebuilding")
        return find(version)
    masking_rules = source / MASKING_FILE
    if not masking_rules.is_file():
        raise ArtifactError(f"{_shown(masking_rules)} does not exist: every version ships the masking rules for "
                            f"its columns, which a staging refresh applies. Nothing was built.")
    DIST.mkdir(exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="opsbook-build-") as tmpdir:
        tmp = Path(tmpdir)
        src = tmp / "src"
        shutil.copytree(source, src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist"))
        init = src / "bl_api" / "__init__.py"
        stamped = re.sub(r'^__version__ = "[^"]+"', f'__version__ = "{version}"', init.read_text(), count=1,
                         flags=re.M)
        stamped, builds = re.subn(r"^RELEASE_BUILD = False$", "RELEASE_BUILD = True", stamped, count=1, flags=re.M)
        if not builds:
            raise ArtifactError(f"{init.relative_to(src)} has no `RELEASE_BUILD = False` line to stamp; a release "
                                f"build must ignore version overrides. Nothing was built.")
        init.write_text(stamped)
        root = tmp / f"{NAME}-{version}"
        wheelhouse = root / "wheelhouse"
        wheelhouse.mkdir(parents=True)
        log(f"building {NAME} {version}: service wheel and dependency wheelhouse")
        _wheels(src, wheelhouse)
        shutil.copytree(source / "migrations", root / "migrations")
        shutil.copy2(masking_rules, root / MASKING_FILE)
        files = {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}
        manifest = {
            "name": NAME,
            "version": version,
            "git_sha": facts.git_sha(),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "files": files,
        }
        (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        partial = path.with_suffix(".partial")
        with tarfile.open(partial, "w:gz") as tar:
            tar.add(root, arcname=root.name)
        partial.rename(path)
    artifact = Artifact(version, path)
    path.with_name(path.name + ".sha256").write_text(f"{artifact.sha256}  {path.name}\n")
    size = path.stat().st_size / 1e6
    log(f"built {_shown(path)} ({size:.1f} MB, {len(files)} files) in {time.monotonic() - t0:.1f}s")
    return artifact
