"""Facts every record carries: who ran it and from which commit. Computed here and nowhere else."""

from __future__ import annotations

import getpass
import os
import socket
import subprocess
from datetime import UTC, datetime

from opsbook.core.paths import ROOT


def operator() -> str:
    """user@host of whoever runs opsbook (a numeric uid when the user has no name)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def _git(*args: str) -> str:
    try:
        proc = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False)
    except OSError:
        return ""
    return proc.stdout.strip() if proc.returncode == 0 else ""


def git_sha(short: bool = False) -> str:
    """The commit of this checkout ("unknown" outside git)."""
    return _git("rev-parse", "--short=10" if short else "--verify", "HEAD") or "unknown"


def git_sha_dirty() -> str:
    """The commit of the opsbook that runs, with `-dirty` when tracked files were changed."""
    sha = git_sha()
    if sha == "unknown":
        return sha
    return f"{sha}-dirty" if _git("status", "--porcelain", "--untracked-files=no") else sha


def commit_time() -> str | None:
    """ISO time of this checkout's commit (lead time for changes starts there)."""
    return _git("log", "-1", "--format=%cI") or None


def uncommitted_changes(path: str) -> bytes:
    """What differs from the commit under `path` (status and diff), empty when nothing does: a
    build from a changed tree gets a version of its own."""
    status = _git("status", "--porcelain", "--", path)
    if not status:
        return b""
    try:
        diff = subprocess.run(["git", "-C", str(ROOT), "diff", "HEAD", "--", path], capture_output=True,
                              check=False).stdout
    except OSError:
        diff = b""
    return diff + status.encode()


def time_key(now: datetime | None = None) -> str:
    """`20260130-101500123` (UTC, to the millisecond): the time part of the names opsbook gives the
    things it makes and later keeps or deletes by age (clones, snapshots), so that names sort in the
    order they were made. To the second only, two made in the same second sorted by the random part
    after it, and a prune could keep the older one (seen in CI at 2100137)."""
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%d-%H%M%S}{now.microsecond // 1000:03d}"
