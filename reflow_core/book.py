"""The book runner: execute the chapter notebooks with papermill, keep the results per scale, build the HTML.

Why it is shaped this way (see ``DESIGN.md``, "Results of record" and "The book"):

* **Only papermill executes.** ``_config.yml`` says ``execute_notebooks: off``; the book shows exactly the
  notebooks this module ran and stored, never a silent re-execution by Sphinx.
* **Results are kept per scale** under ``results/<scale>/`` (executed notebooks, figures, data, ``RUN.json``), so
  a laptop ``smoke`` run never clobbers a ``small`` run made on a GPU, and the book can be rebuilt from any stored
  scale without retraining (``run_book(..., execute=False)``).
* **Figures of record** live in the top-level ``figures/`` and come from the largest scale that has run
  (:func:`promote_figures`); ``figures/RECORD.json`` says which.
* **The HTML is built from a staging copy** (config, TOC, prose pages, executed notebooks, that scale's figures),
  so the source notebooks in ``notebooks/`` stay clean (no outputs in git) and the build cannot see results of a
  different scale.
* **A failed chapter never replaces a good one.** A chapter executes into a temporary file that replaces the stored
  copy only on success; a failure is kept beside it as ``<chapter>.failed.ipynb`` and recorded in ``RUN.json``,
  and staging refuses a chapter recorded as failed (``--no-strict`` publishes the earlier copy under a warning).
  Ctrl-C stops the kernel and every process it started, and leaves the stored copy as it was.

Nothing heavy is imported at module level: ``python -m reflow_core --help`` stays fast, and papermill is only
needed when notebooks are executed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from reflow_core.errors import UserError, run_command
from reflow_core.fileio import read_json, write_json_atomic
from reflow_core.scales import SCALE_NAMES, find_repo_root, resolve_results_dir, scale_rank

RECORD_FILE = "RECORD.json"
RUN_FILE = "RUN.json"
FAILED_SUFFIX = ".failed.ipynb"  # <chapter>.failed.ipynb: the last failed execution, with its traceback
_FIGURE_SUFFIXES = (".png", ".svg")


class BookError(UserError, RuntimeError):
    """A book step failed; the message says which step and what to do."""


class NotebookExecutionError(BookError):
    """A chapter notebook raised while papermill executed it.

    ``notebook`` is the chapter's name (file stem), ``executed_path`` the failed copy ``<chapter>.failed.ipynb``
    (it shows the failing cell and its traceback), ``__cause__`` papermill's ``PapermillExecutionError``.  The
    stored ``<chapter>.ipynb`` of an earlier success is left as it was.
    """

    def __init__(self, message: str, *, notebook: str, executed_path: Path):
        super().__init__(message)
        self.notebook = notebook
        self.executed_path = executed_path


class ChapterInterrupted(KeyboardInterrupt):
    """Ctrl-C while a chapter executed; its kernel and every process below it were stopped, nothing was stored.

    A KeyboardInterrupt still (code that stops on Ctrl-C keeps stopping), whose message is the one line the command
    line prints.
    """


# --------------------------------------------------------------------------------------------------------------
# the table of contents


def toc_entries(repo_root: str | os.PathLike) -> list[str]:
    """Every ``file:`` entry of ``_toc.yml`` (root first), in reading order, as written (usually no suffix)."""
    import yaml  # a jupyter-book dependency

    toc_path = Path(repo_root) / "_toc.yml"
    if not toc_path.is_file():
        raise BookError(f"{toc_path} not found")
    toc = yaml.safe_load(toc_path.read_text(encoding="utf8")) or {}
    files: list[str] = []
    if toc.get("root"):
        files.append(str(toc["root"]))

    def walk(entries: Iterable[Any]) -> None:
        for entry in entries or ():
            if not isinstance(entry, dict):
                continue
            if entry.get("file"):
                files.append(str(entry["file"]))
            for key in ("parts", "chapters", "sections"):
                walk(entry.get(key))

    for key in ("parts", "chapters", "sections"):
        walk(toc.get(key))
    return files


def _resolve_toc_entry(repo_root: Path, entry: str) -> Path:
    path = repo_root / entry
    if path.suffix in (".ipynb", ".md") and path.is_file():
        return path
    for suffix in (".ipynb", ".md"):
        if path.with_suffix(suffix).is_file():
            return path.with_suffix(suffix)
    raise BookError(f"_toc.yml lists {entry!r} but neither {entry}.ipynb nor {entry}.md exists under {repo_root}")


def toc_notebooks(repo_root: str | os.PathLike) -> list[Path]:
    """The ``.ipynb`` chapters of the book, as absolute paths, in ``_toc.yml`` order (markdown pages left out).

    A TOC entry whose file is missing is an error: the build would fail on it later anyway, with a vaguer message.
    Chapter names (file stems) must be unique, because executed copies are stored flat in
    ``results/<scale>/notebooks/<stem>.ipynb``.
    """
    repo_root = Path(repo_root).resolve()
    notebooks = [p for p in (_resolve_toc_entry(repo_root, e) for e in toc_entries(repo_root)) if p.suffix == ".ipynb"]
    stems = [p.stem for p in notebooks]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise BookError(f"notebook names must be unique across the book; repeated: {', '.join(duplicates)}")
    return notebooks


def _run_rank(notebook: Path) -> int:
    """0 for an ordinary chapter; ``{"reflow": {"run_after_all": true}}`` (or a rank N ≥ 1) runs it after every
    chapter of a lower rank — the Cost chapter (1) reads the others' wall times, the scorecard (2) everyone's rows."""
    meta = json.loads(notebook.read_text(encoding="utf8")).get("metadata", {})
    return int(meta.get("reflow", {}).get("run_after_all", 0))


def _select(notebooks: list[Path], only: Sequence[str] | None) -> list[Path]:
    if not only:
        return notebooks
    wanted = {Path(n).stem for n in only}
    known = {p.stem for p in notebooks}
    unknown = sorted(wanted - known)
    if unknown:
        raise BookError(f"--only names not in _toc.yml: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return [p for p in notebooks if p.stem in wanted]


def execution_order(notebooks: Sequence[Path]) -> list[Path]:
    """TOC order, except that notebooks with a ``run_after_all`` rank go last, by rank (ties in TOC order)."""
    return sorted(notebooks, key=_run_rank)


# --------------------------------------------------------------------------------------------------------------
# execution


def _git_commit(repo_root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    commit = out.stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_root,
                           capture_output=True, text=True, timeout=30)
    return commit + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def execute_notebooks(scale: str, *, repo_root: str | os.PathLike, results_dir: str | os.PathLike | None = None,
                      only: Sequence[str] | None = None, parameters: dict | None = None,
                      log_output: bool = True, progress_bar: bool = False, training: dict | None = None) -> dict:
    """Run the book's notebooks with papermill at ``scale``; return the run record (also written to ``RUN.json``).

    Each TOC notebook ``src`` is executed into ``<results_dir>/notebooks/<src.stem>.ipynb`` with the parameters
    ``scale``, ``results_dir`` (absolute) and any extra ``parameters``, the kernel ``python3`` and its own folder
    as working directory. ``only`` restricts the run to some chapters (names are file stems); the other chapters'
    entries in an existing ``RUN.json`` are kept, so the record describes every stored notebook.

    The repository root is put on the kernel's ``PYTHONPATH``, so notebooks import this checkout's
    ``reflow_core`` even when the package is not installed.

    ``RUN.json`` holds the scale, start date, device, git commit (``-dirty`` if tracked files changed), and per
    chapter its status and wall seconds; ``run_seconds`` is this invocation's wall time, ``total_seconds`` the sum
    over every stored chapter. ``training`` (each run's wall seconds from :func:`reflow_core.runs.train_all`, when
    the book trained its models before the chapters) is stored as ``training``, with its wall time as
    ``training_seconds``; otherwise an earlier record's entry for the same scale is kept.

    A chapter executes into a temporary file that replaces ``<stem>.ipynb`` only when every cell ran. On a failing
    cell (or a dead kernel) the partial copy is kept as ``<stem>.failed.ipynb``, the stored copy of an earlier
    success stays untouched, ``RUN.json`` is written with what ran so far (the failed chapter marked ``"failed"``,
    with ``last_ok``, the entry of the copy that is still stored) and a :class:`NotebookExecutionError` naming the
    chapter and the failed copy is raised. Ctrl-C stops the kernel and everything below it and raises
    :class:`ChapterInterrupted`; ``RUN.json`` then keeps the interrupted chapter's previous entry.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    scale_rank(scale)
    repo_root = Path(repo_root).resolve()
    results = resolve_results_dir(results_dir, scale, repo_root)
    out_dir = results / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = execution_order(_select(toc_notebooks(repo_root), only))

    run_path = results / RUN_FILE
    previous = read_json(run_path, {})
    kept = previous.get("notebooks", {}) if previous.get("scale") == scale else {}
    record: dict[str, Any] = {
        "scale": scale,
        "date": _now(),
        "device": _device(repo_root),
        "commit": _git_commit(repo_root),
        "python": sys.version.split()[0],
        "only": list(only) if only else None,
        "notebooks": {name: entry for name, entry in kept.items() if name not in {p.stem for p in chosen}},
        "run_seconds": 0.0,
        "total_seconds": 0.0,
    }
    if training is not None:
        record["training"], record["training_seconds"] = training["runs"], training["seconds"]
    elif previous.get("scale") == scale and "training" in previous:
        record["training"], record["training_seconds"] = previous["training"], previous.get("training_seconds")

    def finish() -> None:
        record["run_seconds"] = round(time.perf_counter() - started, 2)
        record["total_seconds"] = round(sum(e.get("seconds", 0.0) for e in record["notebooks"].values()), 2)
        write_json_atomic(run_path, record)

    env_backup = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo_root), env_backup]))
    started = time.perf_counter()
    try:
        for src in chosen:
            dst = out_dir / f"{src.stem}.ipynb"
            failed_copy = out_dir / f"{src.stem}{FAILED_SUFFIX}"
            running = out_dir / f".{src.stem}.running-{os.getpid()}.ipynb"  # becomes dst only if every cell ran
            params = {"scale": scale, "results_dir": _repo_relative(results, repo_root), **(parameters or {})}
            print(f"[book] {scale}: executing {src.relative_to(repo_root)} -> {dst}", flush=True)
            t0 = time.perf_counter()
            try:
                with _stop_everything_on_ctrl_c(src.stem, scale):
                    papermill.execute_notebook(
                        str(src), str(running), parameters=params, kernel_name="python3", cwd=str(src.parent),
                        progress_bar=progress_bar, log_output=log_output,
                    )
            except Exception as exc:  # a failing cell (PapermillExecutionError), a dead kernel, a cell timeout
                if running.exists():
                    os.replace(running, failed_copy)
                if isinstance(exc, PapermillExecutionError):
                    error, where = f"{exc.ename}: {exc.evalue}", f" in cell [{exc.exec_count}]"
                else:
                    error, where = f"{type(exc).__name__}: {exc}", ""
                before = kept.get(src.stem) or {}
                last_ok = before if before.get("status") == "ok" else before.get("last_ok")
                record["notebooks"][src.stem] = {
                    "status": "failed", "seconds": round(time.perf_counter() - t0, 2), "finished": _now(),
                    "error": error, "cell": getattr(exc, "exec_count", None), "failed_copy": failed_copy.name,
                    # the entry of the copy that is still stored, if any: what --no-strict would publish
                    "last_ok": last_ok if dst.is_file() else None,
                }
                finish()
                kept_note = f"\n  the earlier good copy is kept: {dst}" if dst.is_file() else ""
                raise NotebookExecutionError(
                    f"notebook {src.stem!r} failed at scale {scale!r}{where}: {error}\n  failed copy with the "
                    f"traceback: {failed_copy}{kept_note}\n  run record: {run_path}",
                    notebook=src.stem, executed_path=failed_copy,
                ) from exc
            except BaseException:  # Ctrl-C (ChapterInterrupted): nothing of this execution is stored
                running.unlink(missing_ok=True)
                raise
            _redact_outputs(running, dst, repo_root)
            os.replace(running, dst)
            failed_copy.unlink(missing_ok=True)  # the chapter is fixed: its old failure no longer describes it
            seconds = round(time.perf_counter() - t0, 2)
            record["notebooks"][src.stem] = {"status": "ok", "seconds": seconds, "finished": _now()}
            print(f"[book] {scale}: {src.stem} done in {seconds:.1f} s", flush=True)
            finish()
    finally:
        if env_backup is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = env_backup
    finish()
    return record


@contextlib.contextmanager
def _stop_everything_on_ctrl_c(chapter: str, scale: str):
    """Turn Ctrl-C during a chapter into one :class:`ChapterInterrupted`, leaving no process behind.

    Left to itself, the interrupt unwinds through papermill, whose clean-up shuts the kernel down: the kernel prints
    tracebacks on the way, and whatever it had started (a training run under torchrun lives in its own session) is
    orphaned and can no longer be found below this process. So the SIGINT handler first kills every process the
    chapter started below this one, parents first, and only then lets the interrupt unwind. SIGKILL is enough:
    every file a run writes survives it (atomic checkpoints and preparations, metrics trimmed on resume), and a
    rerun resumes training from the checkpoints it stored. Processes that were there before the chapter (when the
    book runs inside a larger program) are not the chapter's to stop.
    """
    main = threading.current_thread() is threading.main_thread()  # signal handlers can only be set there
    previous = signal.getsignal(signal.SIGINT)
    earlier = set(_descendants(os.getpid()))

    def kill_the_chapters_processes():
        _kill_all([p for p in _descendants(os.getpid()) if p not in earlier])

    def on_sigint(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        kill_the_chapters_processes()
        raise KeyboardInterrupt

    if main:
        signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    except KeyboardInterrupt:
        kill_the_chapters_processes()  # anything started while the handler ran (or a Ctrl-C it did not see)
        raise ChapterInterrupted(
            f"chapter {chapter} (scale {scale}) was interrupted; its stored copy is unchanged and the kernel and "
            f"the processes it started were stopped. A rerun resumes from the checkpoints training stored"
        ) from None
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, parents before their children: from /proc, or psutil where there is none."""
    if not Path("/proc/self/stat").is_file():
        try:
            import psutil
        except ImportError:
            return []
        try:
            return [p.pid for p in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in (...) may hold spaces
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a killed child waiting to be reaped counts as stopped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        if Path("/proc/self/stat").is_file():
            return False  # Linux: no entry, no process
    try:  # elsewhere, existence is all we can tell
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _kill_all(pids: Sequence[int], wait_s: float = 5.0) -> None:
    """SIGKILL every process in ``pids`` in order (parents first, so none starts a new child meanwhile) and wait
    until they are gone."""
    alive = [p for p in dict.fromkeys(pids) if p != os.getpid()]
    for p in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _running(p)]
        time.sleep(0.02)


def _redact_outputs(notebook: Path, stored_as: Path, repo_root: Path) -> None:
    """What a chapter printed (a command, a warning's file name, a log line) and papermill's input and output paths
    name paths relative to the repository root and home or temp folders as ``~`` / ``$TMPDIR``, never this
    machine's (:mod:`reflow_core.public_paths`). ``stored_as``: the name the executed copy is kept under."""
    import nbformat

    from reflow_core.public_paths import redact_notebook_outputs

    nb = nbformat.read(notebook, as_version=4)
    if isinstance(nb.metadata.get("papermill"), dict):
        nb.metadata.papermill["output_path"] = str(stored_as)  # not the temporary file it was executed into
    redact_notebook_outputs(nb, repo_root)
    nbformat.write(nb, notebook)


def _repo_relative(path: Path, repo_root: Path) -> str:
    """``path`` relative to the repository when it lies inside it: what a notebook of record prints and stores must
    not name the machine that produced it."""
    return path.relative_to(repo_root).as_posix() if path.is_relative_to(repo_root) else str(path)


def _device(repo_root: Path) -> str:
    """The device the notebooks will see, asked in a child process.

    Asking in-process would import torch into the runner and, on a GPU machine, initialise CUDA in a process
    that then idles for the whole run while the notebooks' kernels need the memory.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo_root), os.environ.get("PYTHONPATH")])))
    try:
        code = "from reflow_core.figures import device_description as d; print(d())"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                             cwd=repo_root)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else "unknown"


# --------------------------------------------------------------------------------------------------------------
# figures of record


def promote_figures(scale: str, *, repo_root: str | os.PathLike, results_dir: str | os.PathLike | None = None) -> bool:
    """Copy ``results/<scale>/figures/*`` into the top-level ``figures/`` if ``scale`` may replace the record.

    Rules: ``test`` never promotes; otherwise promotion happens only when ``scale`` ranks at least as high as the
    scale in ``figures/RECORD.json`` (so ``smoke`` never overwrites ``small``, and a rerun at the same scale
    refreshes it). Figures of record not produced by this run (e.g. after ``--only``) stay, and ``RECORD.json``
    keeps, per file, the scale and date it came from. Returns whether anything was promoted.
    """
    rank = scale_rank(scale)
    repo_root = Path(repo_root).resolve()
    if scale == "test":
        return False
    results = resolve_results_dir(results_dir, scale, repo_root)
    src_dir = results / "figures"
    new = sorted(p for p in src_dir.glob("fig-*") if p.suffix in _FIGURE_SUFFIXES) if src_dir.is_dir() else []
    if not new:
        return False
    dest = repo_root / "figures"
    record_path = dest / RECORD_FILE
    record = read_json(record_path, {})
    if record.get("scale") in SCALE_NAMES and scale_rank(record["scale"]) > rank:
        print(f"[book] figures/ keeps the {record['scale']} record ({record.get('date')}); "
              f"{scale} figures stay in {src_dir}", flush=True)
        return False
    run = read_json(results / RUN_FILE, {})
    date = run.get("date") or _now()
    dest.mkdir(parents=True, exist_ok=True)
    files = record.get("figures", {}) if record.get("scale") in SCALE_NAMES else {}
    for path in new:
        shutil.copy2(path, dest / path.name)
        files[path.name] = {"scale": scale, "date": date}
    record = {
        "scale": scale,
        "date": date,
        "device": run.get("device"),
        "commit": run.get("commit"),
        "source": f"results/{scale}/figures",
        "figures": dict(sorted(files.items())),
    }
    write_json_atomic(record_path, record)
    print(f"[book] promoted {len(new)} figure files from {scale} into figures/", flush=True)
    return True


# --------------------------------------------------------------------------------------------------------------
# staging and building


def stage_book(scale: str, *, repo_root: str | os.PathLike, stage_dir: str | os.PathLike,
               results_dir: str | os.PathLike | None = None, allow_missing: bool = False,
               allow_failed: bool = False) -> Path:
    """Assemble a buildable book from stored results at ``scale`` in ``stage_dir`` (emptied first); return it.

    The stage holds ``_config.yml``, ``_toc.yml``, ``book/`` (prose, bibliography, static assets), each TOC
    notebook's *executed* copy from ``results/<scale>/notebooks/`` placed at the notebook's TOC path, and that
    scale's figures as ``figures/`` (so a page may link ``../figures/fig-….png``). A notebook with no executed
    copy is an error, unless ``allow_missing``: then that chapter is left out of the staged ``_toc.yml`` (with a
    warning). Staging it unexecuted instead would fail the strict build on its missing glue keys, and a chapter
    without its numbers is not worth showing.

    A chapter that ``RUN.json`` records as failed in its last execution is an error too: its stored copy (if any)
    is from an earlier run and would be published as if it were current. With ``allow_failed`` that earlier copy is
    staged under a warning that says so (and a failed chapter with no earlier copy counts as missing).
    """
    scale_rank(scale)
    repo_root = Path(repo_root).resolve()
    stage = Path(stage_dir).resolve()
    results = resolve_results_dir(results_dir, scale, repo_root)
    if stage == repo_root or repo_root.is_relative_to(stage):
        raise BookError(f"refusing to stage into {stage}: it contains the repository")
    notebooks = toc_notebooks(repo_root)
    run = read_json(results / RUN_FILE, {})
    entries = run.get("notebooks", {}) if run.get("scale") == scale else {}
    failed = {src.stem: entries[src.stem] for src in notebooks
              if isinstance(entries.get(src.stem), dict) and entries[src.stem].get("status") == "failed"}
    if failed and not allow_failed:
        names = " ".join(failed)
        raise BookError(
            f"chapter(s) failed in their last run at scale {scale!r}:\n"
            + "".join(f"  {stem}: {e.get('error')} (traceback in "
                      f"{results / 'notebooks' / (e.get('failed_copy') or stem + FAILED_SUFFIX)})\n"
                      for stem, e in failed.items())
            + f"  A build would show their earlier copies as if they were current. Fix them and rerun\n"
            f"  `python -m reflow_core book --scale {scale} --only {names}`, or build with --no-strict to publish the\n"
            f"  earlier copies marked as failed."
        )
    missing = [src for src in notebooks if not (results / "notebooks" / f"{src.stem}.ipynb").is_file()]
    if missing and not allow_missing:
        raise BookError(
            f"no executed notebooks at scale {scale!r} for: {', '.join(p.stem for p in missing)} "
            f"(looked in {results / 'notebooks'}).\n"
            f"  Produce them with `python -m reflow_core book --scale {scale}` on a machine that can run that scale,\n"
            f"  or copy results/{scale}/ from where it ran."
        )
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    shutil.copy2(repo_root / "_config.yml", stage / "_config.yml")
    shutil.copytree(repo_root / "book", stage / "book",
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__", "_build"))
    for src in notebooks:
        if src in missing:
            continue
        target = stage / src.relative_to(repo_root)
        target.parent.mkdir(parents=True, exist_ok=True)
        warning = _failed_warning(scale, failed[src.stem]) if src.stem in failed else None
        if warning:
            print(f"[book] warning: {src.stem} failed in its last run; staging its earlier copy, marked", flush=True)
        _stage_notebook(results / "notebooks" / f"{src.stem}.ipynb", target, warning=warning)
    if missing:
        _write_pruned_toc(repo_root, stage, {p.relative_to(repo_root).with_suffix("").as_posix() for p in missing})
        for src in missing:
            print(f"[book] warning: {src.stem} has no executed copy at scale {scale}; left out of this build",
                  flush=True)
    else:
        shutil.copy2(repo_root / "_toc.yml", stage / "_toc.yml")
    figures = results / "figures"
    if figures.is_dir():
        shutil.copytree(figures, stage / "figures")
    return stage


def _write_pruned_toc(repo_root: Path, stage: Path, drop: set[str]) -> None:
    """Write ``stage/_toc.yml`` without the entries in ``drop`` (paths without suffix); their sections move up."""
    import yaml

    toc = yaml.safe_load((repo_root / "_toc.yml").read_text(encoding="utf8"))

    def key(entry: dict) -> str:
        file = str(entry["file"])
        return file.removesuffix(".ipynb")

    def prune(entries: list | None) -> list:
        kept = []
        for entry in entries or []:
            if not isinstance(entry, dict):
                kept.append(entry)
                continue
            entry = dict(entry)
            for child in ("parts", "chapters", "sections"):
                if child in entry:
                    entry[child] = prune(entry[child])
                    if not entry[child]:
                        del entry[child]
            if "file" in entry and key(entry) in drop:
                kept.extend(entry.get("sections", []))
            elif "file" in entry or entry.get("chapters") or entry.get("sections"):
                kept.append(entry)
        return kept

    if str(toc.get("root", "")) in drop:
        raise BookError(f"the book's root page {toc['root']!r} has no executed copy")
    for child in ("parts", "chapters", "sections"):
        if child in toc:
            toc[child] = prune(toc[child])
    (stage / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False), encoding="utf8")


PARAMETER_CELL_TAGS = ("parameters", "injected-parameters")
_SHOW_HIDE_TAGS = {"hide-cell", "hide-input", "hide-output", "remove-cell", "remove-input", "remove-output"}


def _failed_warning(scale: str, entry: dict) -> str:
    last_ok = entry.get("last_ok") or {}
    return (f"```{{warning}}\nThis chapter **failed** when it was last executed at scale `{scale}` "
            f"({entry.get('finished', '?')}): `{entry.get('error')}`. What follows is the earlier copy, executed "
            f"{last_ok.get('finished', 'at an earlier date')}; its numbers may not match the other chapters.\n```\n")


def _stage_notebook(executed: Path, target: Path, *, warning: str | None = None) -> None:
    """Copy an executed notebook into the stage, folding its parameter cells (tag ``hide-cell``).

    The parameter cells are plumbing (and the injected one prints an absolute, machine-specific results path);
    folded, a reader can still open them to see the scale a chapter ran at. Cells that already carry a
    hide/remove tag are left as their author tagged them. The stored notebook itself is not modified.
    ``warning`` (markdown) goes right under the chapter's title, where no reader can miss it.
    """
    nb = json.loads(executed.read_text(encoding="utf8"))
    for cell in nb.get("cells", []):
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if any(t in PARAMETER_CELL_TAGS for t in tags) and not _SHOW_HIDE_TAGS.intersection(tags):
            tags.append("hide-cell")
    if warning:
        cells = nb.setdefault("cells", [])
        first = cells[0] if cells else {}
        titled = first.get("cell_type") == "markdown" and "".join(first.get("source", "")).lstrip().startswith("#")
        cells.insert(1 if titled else 0, {"cell_type": "markdown", "metadata": {}, "source": warning})
    target.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf8")


def _jupyter_book_executable() -> str:
    """The ``jupyter-book`` next to this interpreter (the venv's), else the one on ``PATH``."""
    local = Path(sys.executable).parent / "jupyter-book"
    if local.is_file():
        return str(local)
    found = shutil.which("jupyter-book")
    if not found:
        raise BookError("jupyter-book is not installed in this environment (pip install -e '.[book]')")
    return found


def build_html(stage_dir: str | os.PathLike, out_dir: str | os.PathLike, *, strict: bool = True) -> Path:
    """Build the staged book with ``jupyter-book build`` into ``<out_dir>/_build/html``; return its ``index.html``.

    ``strict`` (default) passes ``-W --keep-going``: every Sphinx warning fails the build, after reporting all of
    them. In this book a warning is nearly always a real defect a reader would see (a glue key that no notebook
    stored leaves a hole in a sentence, a ``{numref}`` to a missing figure label, an unknown citation), and the
    build from a clean stage has no benign warnings. Known-harmless ones should be silenced by name
    (``suppress_warnings`` in ``_config.yml``) rather than by turning strictness off.

    The full log is written to ``<out_dir>/_build/jupyter-book.log``; on failure its tail is in the exception.
    ``--all`` rebuilds every page, since stale pages or glue caches from an earlier stage would be wrong.
    """
    stage = Path(stage_dir).resolve()
    out = Path(out_dir).resolve()
    cmd = [_jupyter_book_executable(), "build", str(stage), "--path-output", str(out), "--builder", "html", "--all"]
    if strict:
        cmd += ["-W", "--keep-going"]
    (out / "_build").mkdir(parents=True, exist_ok=True)
    log_path = out / "_build" / "jupyter-book.log"
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(stage))
    log_path.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n--- stderr ---\n{proc.stderr}", encoding="utf8")
    index = out / "_build" / "html" / "index.html"
    if proc.returncode != 0 or not index.is_file():
        tail = "\n".join((proc.stdout + "\n" + proc.stderr).strip().splitlines()[-80:])
        raise BookError(f"jupyter-book build failed (exit {proc.returncode}); full log: {log_path}\n{tail}")
    return index


# --------------------------------------------------------------------------------------------------------------
# the whole job


def run_book(scale: str = "smoke", *, execute: bool = True, repo_root: str | os.PathLike | None = None,
             out_dir: str | os.PathLike | None = None, only: Sequence[str] | None = None,
             results_dir: str | os.PathLike | None = None, strict: bool = True,
             progress_bar: bool = False, train_first: bool = True) -> Path:
    """Execute (optionally), promote figures, stage and build the book at ``scale``; return ``index.html``.

    ``execute=False`` rebuilds from the notebooks stored in ``results/<scale>/notebooks`` (no kernel, no training).
    ``strict=False`` also lets a chapter whose last run failed be published as its earlier copy, under a warning.
    ``only`` executes just those chapters; the rest of the book is built from whatever is stored for the scale.
    ``train_first`` (the whole book only): train every model the chapters use before the first chapter, several at
    once where that is faster (:func:`reflow_core.runs.train_all`); the chapters then find them stored.
    The HTML lands in ``<out_dir>/_build/html`` (``out_dir`` defaults to the repository root).
    """
    scale_rank(scale)
    root = Path(repo_root).resolve() if repo_root else find_repo_root()
    out = Path(out_dir).resolve() if out_dir else root
    results = resolve_results_dir(results_dir, scale, root)
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    if execute:
        training = None
        if train_first and not only:
            from reflow_core.runs import train_all

            t0 = time.perf_counter()
            runs = train_all(scale, results)
            times["train"] = time.perf_counter() - t0
            training = {"runs": runs, "seconds": round(times["train"], 2)}
        t0 = time.perf_counter()
        execute_notebooks(scale, repo_root=root, results_dir=results, only=only, progress_bar=progress_bar,
                          training=training)
        times["execute"] = time.perf_counter() - t0
    elif not (results / "notebooks").is_dir() or not any((results / "notebooks").glob("*.ipynb")):
        raise BookError(
            f"no stored results for scale {scale!r} in {results / 'notebooks'}.\n"
            f"  Run `python -m reflow_core book --scale {scale}` (executes the notebooks, then builds), or copy\n"
            f"  results/{scale}/ from the machine where that scale ran, then retry with --no-execute."
        )

    promote_figures(scale, repo_root=root, results_dir=results)

    t0 = time.perf_counter()
    stage = out / "_build" / "stage"
    stage_book(scale, repo_root=root, stage_dir=stage, results_dir=results, allow_missing=bool(only),
               allow_failed=not strict)
    index = build_html(stage, out, strict=strict)
    times["build"] = time.perf_counter() - t0
    times["total"] = time.perf_counter() - t_all
    print("[book] wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()), flush=True)
    print(f"[book] {index}", flush=True)
    return index


def add_book_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``book`` sub-command's options to ``parser`` (``python -m reflow_core book ...``)."""
    parser.add_argument("--scale", choices=SCALE_NAMES, default="smoke",
                        help="papermill `scale` for every notebook (default: smoke)")
    parser.add_argument("--no-execute", dest="execute", action="store_false",
                        help="build from the notebooks stored in results/<scale>/notebooks; do not run any")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="execute only these chapters (notebook file stems, e.g. 02_training)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="write the HTML to DIR/_build/html (default: the repository root)")
    parser.add_argument("--results-dir", metavar="DIR", default=None,
                        help="results folder for this scale (default: results/<scale>)")
    parser.add_argument("--no-strict", dest="strict", action="store_false",
                        help="do not turn Sphinx warnings into errors; publish a chapter whose last run failed as "
                             "its earlier copy, under a warning")
    return parser


def _stream_notebook_output() -> None:
    """Show what the notebooks print (papermill logs each cell's output at INFO) while they run.

    A ``smoke`` book trains models for tens of minutes; without this the terminal would stay silent.
    """
    import logging

    logger = logging.getLogger("papermill")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def run_book_cli(args: argparse.Namespace) -> int:
    """Entry point for the parsed ``book`` sub-command; errors and Ctrl-C are reported by its caller
    (:func:`reflow_core.errors.run_command`: one line, exit code 2 or 130)."""
    _stream_notebook_output()
    run_book(args.scale, execute=args.execute, out_dir=args.out, only=args.only,
             results_dir=getattr(args, "results_dir", None), strict=getattr(args, "strict", True),
             progress_bar=sys.stderr.isatty())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m reflow_core.book`` works on its own as well."""
    parser = argparse.ArgumentParser(prog="python -m reflow_core.book", description="Execute and build the book.")
    add_book_arguments(parser)
    args = parser.parse_args(argv)
    return run_command(lambda: run_book_cli(args))


if __name__ == "__main__":
    raise SystemExit(main())
