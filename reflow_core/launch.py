"""Start training from a notebook as a ``torchrun`` subprocess, with its output streamed into the notebook.

Why a subprocess even for one process: DDP needs one process per device, a crash (OOM, NCCL error, SIGKILL) must
not take the notebook's kernel with it, and the same command scales from a laptop (1–2 CPU processes) to a node::

    from reflow_core.launch import launch
    summary = launch(TrainConfig(model="reflow@smoke", data_dir=..., out_dir=...))   # N = visible GPUs, or 1

The child is ``python -m torch.distributed.run --standalone --nproc_per_node=N -m reflow_core train --config
<out_dir>/train_config.json``.  Its stdout and stderr are merged and printed line by line as they arrive; tqdm is
replaced by one log line per ``log_interval`` (``REFLOW_PROGRESS=lines``) because carriage-return bar updates arrive
as separate lines through a pipe and would flood the cell.  A failed child raises :class:`LaunchError` carrying the
child's own error lines and the tail of its output.

What is echoed — the command and the child's lines — names paths relative to the repository root (home and temp
folders as ``~`` and ``$TMPDIR``, :mod:`reflow_core.public_paths`): a notebook of record must not print the machine
that produced it.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

from reflow_core.config import TrainConfig
from reflow_core.errors import ERROR_PREFIX, InvalidArgumentError, UserError
from reflow_core.public_paths import redact
from reflow_core.runlock import check_unlocked
from reflow_core.train import ENV_PROGRESS

TAIL_LINES = 50


class LaunchError(UserError, RuntimeError):
    """The training subprocess failed; the message holds its error lines and the tail of its output."""

    def __init__(self, message: str, *, returncode: int, tail: list[str], errors: list[str]) -> None:
        super().__init__(message)
        self.returncode, self.tail, self.errors = returncode, tail, errors


def visible_gpus(env: dict[str, str] | None = None) -> int:
    """GPUs the child will see: CUDA_VISIBLE_DEVICES from ``env`` when given there, else this process's count."""
    if not torch.cuda.is_available():
        return 0
    if env and "CUDA_VISIBLE_DEVICES" in env:
        return min(torch.cuda.device_count(), len([d for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]))
    return torch.cuda.device_count()


def default_nproc(config: TrainConfig, env: dict[str, str] | None = None) -> int:
    """One process per visible GPU when training on CUDA, else one CPU process."""
    if config.device != "cpu" and visible_gpus(env) > 0:
        return visible_gpus(env)
    return 1


def launch_command(config_path: str | Path, nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "reflow_core", "train", "--config", str(config_path)]


def shown_command(cmd: list[str]) -> str:
    """``cmd`` as the notebook shows it: ``$ <command>`` with paths relative to the repository root."""
    return "$ " + " ".join(redact(part) for part in cmd)


_RUNNING: set[subprocess.Popen] = set()  # children of launch() still running, for stop_all()


def stop_all() -> None:
    """Stop every training child that :func:`launch` started and that still runs (its callers' threads do not see
    Ctrl-C: the thread that does calls this)."""
    for proc in list(_RUNNING):
        _stop(proc)


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop the child's whole process group (torchrun and its workers): SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


def launch(config: TrainConfig | dict, *, nproc: int | None = None, env: dict[str, str] | None = None,
           echo: Callable[[str], None] | None = None) -> dict:
    """Run ``train(config)`` under torchrun with ``nproc`` processes; returns the summary the run wrote.

    ``env`` adds environment variables for the child (e.g. ``{"CUDA_VISIBLE_DEVICES": "0,1"}``); ``echo`` receives
    each output line (default: print, so it shows in a notebook).  Interrupting the caller stops the child.
    """
    config = TrainConfig.from_dict(config) if isinstance(config, dict) else config.validate()
    nproc = default_nproc(config, env) if nproc is None else int(nproc)
    if nproc < 1:
        raise InvalidArgumentError(f"nproc must be >= 1, got {nproc}")
    gpus = visible_gpus(env)
    if config.device != "cpu" and gpus and nproc > gpus:
        raise InvalidArgumentError(f"nproc={nproc} but only {gpus} GPU(s) are visible: NCCL needs one process per GPU "
                                   "(use device='cpu' for CPU processes)")
    config.validate(world_size=nproc)
    out_dir = Path(config.out_dir)
    # A live run in out_dir: refuse before replacing its train_config.json or deleting its summary (the child would
    # be refused too, but only after that damage was done).
    check_unlocked(out_dir)
    config_path = config.to_json(out_dir / "train_config.json")
    summary_path = out_dir / "summary.json"
    summary_path.unlink(missing_ok=True)  # never return a previous run's summary

    child_env = {**os.environ, **(env or {})}
    child_env.setdefault(ENV_PROGRESS, "lines")
    child_env["PYTHONUNBUFFERED"] = "1"
    if config.threads is not None:
        child_env.setdefault("OMP_NUM_THREADS", str(config.threads))
    # the child must import this very reflow_core, also when it is not installed (a checkout on sys.path)
    package_root = str(Path(__file__).resolve().parent.parent)
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, child_env.get("PYTHONPATH")) if p)
    show = echo or (lambda line: print(line, flush=True))
    echo = lambda line: show(redact(line))  # noqa: E731  (what the child prints names its paths too)

    cmd = launch_command(config_path, nproc)
    show(shown_command(cmd))
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    errors: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env, text=True,
                            errors="replace", bufsize=1, start_new_session=True)
    _RUNNING.add(proc)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if line.startswith(ERROR_PREFIX) and line[len(ERROR_PREFIX):] not in errors:
                errors.append(line[len(ERROR_PREFIX):])  # every rank may report the same error: keep one copy
            echo(line)
        returncode = proc.wait()
    except BaseException:  # KeyboardInterrupt in a notebook, or echo failing: do not leave orphans behind
        _stop(proc)
        raise
    finally:
        _RUNNING.discard(proc)
        if proc.stdout is not None:
            proc.stdout.close()

    if returncode != 0:
        why = "\n".join(errors) if errors else "(the child printed no reflow_core error line; see its output below)"
        raise LaunchError(
            f"training failed (exit code {returncode}) for out_dir={out_dir}:\n{why}\n"
            f"--- last {len(tail)} lines of output ---\n" + "\n".join(tail),
            returncode=returncode, tail=list(tail), errors=errors)
    if not summary_path.is_file():
        raise LaunchError(f"training exited cleanly but wrote no {summary_path}\n--- last lines ---\n"
                          + "\n".join(tail), returncode=returncode, tail=list(tail), errors=errors)
    return json.loads(summary_path.read_text())
