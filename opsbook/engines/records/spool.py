"""Records that could not be stored wait here, and are uploaded by the next command that can.

When the record store refuses a finished run's record (a full disk, S3 refusing, the network),
the record is kept on this machine, private to this user, under
``$OPSBOOK_SPOOL`` (default ``~/.local/state/opsbook/spool``)/<store>/<record id>/, and the
operator is told where. The next run that reaches the same store uploads every spooled record
(oldest first) before its own, so the ledger stays complete and never edited.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opsbook.engines.records.store import Store


def root() -> Path:
    return Path(os.environ.get("OPSBOOK_SPOOL") or Path.home() / ".local" / "state" / "opsbook" / "spool")


def directory(store: Store) -> Path:
    return root() / hashlib.sha256(store.url.encode()).hexdigest()[:16]


def keep(store: Store, entry: dict[str, Any], notebook: bytes, html: bytes) -> Path:
    """Keep a record that `store` refused. Returns its directory."""
    d = directory(store) / entry["id"]
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name, data in (("notebook.ipynb", notebook), ("record.html", html),
                       ("entry.json", json.dumps(entry, indent=1).encode()), ("store", store.url.encode())):
        fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return d


def pending(store: Store) -> list[Path]:
    d = directory(store)
    return sorted(p for p in d.iterdir() if (p / "entry.json").is_file()) if d.is_dir() else []


def flush(store: Store, log: Callable[[str], None] = print) -> list[str]:
    """Upload every record spooled for `store`, oldest first; each one leaves the spool once it is
    stored. Returns the ids uploaded. Raises when the store still refuses (the rest stay)."""
    done = []
    for d in pending(store):
        entry = json.loads((d / "entry.json").read_bytes())
        store.write_record(entry, (d / "notebook.ipynb").read_bytes(), (d / "record.html").read_bytes(),
                           resume=True)
        shutil.rmtree(d)
        done.append(entry["id"])
        log(f"record {entry['id']}, kept on this machine when {store.url} refused it, is now stored there")
    return done
