"""Small file helpers every layer shares: atomic JSON writes, file hashes, and who owns a leftover folder.

Imports nothing from the package.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def write_json_atomic(path: str | os.PathLike, data: Any, *, sort_keys: bool = False) -> Path:
    """Write ``data`` as indented JSON through a temporary file, fsync and a rename: readers never see half a file.

    The temporary name carries the PID, so two processes writing the same path never share a temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf8") as f:
            json.dump(data, f, indent=2, sort_keys=sort_keys)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """The JSON at ``path``, or ``default`` when the file does not exist."""
    try:
        return json.loads(Path(path).read_text(encoding="utf8"))
    except FileNotFoundError:
        return default


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large files do not have to fit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this machine (a zombie counts: its parent has not reaped it yet).

    Temporary folders carry their writer's PID in their name, so a later run can tell a dead writer's leftovers
    (safe to delete) from a live writer's work in progress (never to be touched).
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, but belongs to another user
        return True
    return True


def tree_bytes(path: str | os.PathLike) -> int:
    """Bytes of every file under ``path`` (links not followed); what deleting it frees."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total
