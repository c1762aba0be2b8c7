"""One run per output folder: an exclusive lock on ``<out_dir>/.run.lock`` for as long as a run writes there.

Two runs pointed at one folder would interleave their metrics, overwrite each other's checkpoints and delete each
other's saves in progress, and both would exit 0.  So a run takes this lock before it writes anything, and a second
run is refused with the holder's PID::

    with RunLock(out_dir):
        ...  # train, save checkpoints, write the summary

``fcntl.flock`` is released by the kernel when its holder exits, however it exits (SIGKILL and OOM kills too), so
a lock can never outlive its run: a stale lock file is simply taken over.  The file holds the holder's PID and host
for the message only; the file itself is left in place, because deleting a lock file races with the next run that
has already opened it.

Imports only the error and file layers.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from reflow_core.errors import ConfigError, UserError

LOCK_FILE = ".run.lock"


class RunLockedError(UserError, RuntimeError):
    """Another live process is running in this output folder."""


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "an unknown process"


class RunLock:
    """Exclusive, non-blocking lock on one output folder (created if missing); a context manager."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ConfigError(f"train config field 'out_dir': {self.out_dir} exists and is not a directory; "
                              "choose a folder for the run")
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except (FileExistsError, NotADirectoryError):
            raise ConfigError(f"train config field 'out_dir': a parent of {self.out_dir} is a file, not a "
                              "directory") from None
        except PermissionError as e:
            raise ConfigError(f"train config field 'out_dir': cannot write in {self.out_dir} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(
                f"{self.out_dir} is in use by another run ({_holder(self.path)}); two runs in one folder would mix "
                "their metrics and checkpoints. Wait for it to finish, stop it, or choose another out_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"PID {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_unlocked(out_dir: str | os.PathLike) -> None:
    """Raise :class:`RunLockedError` if a live run holds ``out_dir`` (take the lock and give it back at once).

    For callers that must not touch a busy folder before their own child process takes the lock (launch()).
    """
    RunLock(out_dir).acquire().release()
