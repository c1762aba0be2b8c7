"""No machine paths in the record: what executed notebooks print and what result files store names paths relative
to the repository root (home and temp folders as ``~`` and ``$TMPDIR``), and the committed ``results/`` tree has none.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from reflow_core import public_paths
from reflow_core.public_paths import redact, redact_json, redact_notebook_outputs

REPO = Path(__file__).resolve().parent.parent
HOME, TMP = str(Path.home()), tempfile.gettempdir()


def machine_paths_in(text: str, repo_root: Path = REPO) -> list[str]:
    """The machine paths in ``text`` (checkout, home, temp), each with a little context."""
    found = []
    for prefix, _ in public_paths.machine_prefixes(repo_root):
        start = 0
        while (i := text.find(prefix, start)) >= 0:
            start = i + len(prefix)
            if redact(text[max(0, i - 1): i + len(prefix) + 1], repo_root) != text[max(0, i - 1): i + len(prefix) + 1]:
                found.append(text[max(0, i - 40): i + len(prefix) + 40].replace("\n", " "))
    return found


def test_redact_makes_checkout_paths_relative_and_names_home_and_temp():
    root = str(REPO)
    line = (f"$ {root}/.venv/bin/python -m torch.distributed.run --config {root}/results/smoke/checkpoints/x/t.json "
            f'{{"data": "{TMP}/reflow-test-data-1/tiny", "cache": "{HOME}/.cache/x", "cwd": "{root}"}}')
    out = redact(line)
    assert out.startswith("$ .venv/bin/python -m torch.distributed.run --config results/smoke/checkpoints/x/t.json")
    assert '"data": "$TMPDIR/reflow-test-data-1/tiny"' in out and '"cache": "~/.cache/x"' in out
    assert '"cwd": "."' in out
    assert not machine_paths_in(out)
    # only whole prefixes: a sibling folder that merely starts like the checkout, or /var/tmp, is left alone
    sibling = redact(f"{root}x/y and /var{TMP}/z")
    assert sibling.endswith(f"{Path(root).name}x/y and /var{TMP}/z")  # not made relative, /var/tmp untouched
    # (the sibling itself may still read $TMPDIR/… or ~/… when the checkout lies in the temp or home folder)
    assert not sibling.startswith("x/y")


def test_the_checkout_inside_home_is_relative_not_tilde(tmp_path):
    home_like = tmp_path / "home" / "me"
    root = home_like / "src" / "reflow-book"
    root.mkdir(parents=True)
    text = f"{root}/results/smoke and {home_like}/.cache"
    out = redact(text, repo_root=root)
    assert out.startswith("results/smoke and ")
    assert str(root) not in out


def test_result_files_and_notebook_outputs_are_redacted(tmp_path):
    from reflow_core.results import save_result

    path = save_result(tmp_path, "x", {"summary": {"out_dir": f"{REPO}/results/smoke/checkpoints/reflow-seed1337",
                                                   "steps": 3}, f"{REPO}/key": [f"{HOME}/a"]})
    stored = json.loads(path.read_text())
    assert stored == {"summary": {"out_dir": "results/smoke/checkpoints/reflow-seed1337", "steps": 3},
                      "key": ["~/a"]}
    assert redact_json([1, None, 2.5, "x"]) == [1, None, 2.5, "x"]
    nb = {"cells": [{"cell_type": "code", "source": f"print('{REPO}')", "outputs": [
        {"output_type": "stream", "name": "stdout", "text": [f"$ {REPO}/.venv/bin/python -m x\n"]},
        {"output_type": "error", "ename": "E", "evalue": f"{TMP}/f", "traceback": [f'File "{HOME}/lib/a.py"']},
        {"output_type": "execute_result", "data": {"text/plain": f"'{REPO}/results'", "image/png": "iVBOR"},
         "metadata": {}}]}]}
    assert redact_notebook_outputs(nb) == 3
    outs = nb["cells"][0]["outputs"]
    assert outs[0]["text"] == ["$ .venv/bin/python -m x\n"]
    assert outs[1]["evalue"] == "$TMPDIR/f" and outs[1]["traceback"] == ['File "~/lib/a.py"']
    assert outs[2]["data"] == {"text/plain": "'results'", "image/png": "iVBOR"}
    assert nb["cells"][0]["source"] == f"print('{REPO}')"  # sources run as they are


def test_launch_echoes_a_repository_relative_command(tmp_path):
    from reflow_core.launch import launch_command, shown_command

    config = REPO / "results" / "smoke" / "checkpoints" / "reflow-seed1337" / "train_config.json"
    shown = shown_command(launch_command(config, 1))
    assert str(REPO) not in shown
    assert shown.endswith("-m reflow_core train --config results/smoke/checkpoints/reflow-seed1337/train_config.json")
    exe = Path(sys.executable)
    assert shown.split()[1] == (exe.relative_to(REPO).as_posix() if exe.is_relative_to(REPO) else redact(str(exe)))


@pytest.mark.slow
def test_an_executed_notebook_of_record_prints_no_machine_path(tmp_path):
    """The book runner stores what a chapter printed with the machine's paths made public."""
    import nbformat

    from reflow_core import book

    repo = tmp_path / "repo"
    (repo / "book").mkdir(parents=True)
    (repo / "book" / "intro.md").write_text("# intro\n")
    (repo / "_config.yml").write_text("title: t\n")
    (repo / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n  - file: notebooks/01_paths\n")
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('scale = "smoke"\nresults_dir = ""')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(
        "import os, pathlib, sys, tempfile, warnings\n"
        "root = pathlib.Path.cwd().parent\n"
        "print('data in', root / 'data' / 'tiny', 'and', tempfile.gettempdir() + '/x', 'and', pathlib.Path.home())\n"
        "warnings.warn(f'from {root}/reflow_core/x.py')\n"
        "str(root / 'results' / scale)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    (repo / "notebooks").mkdir()
    nbformat.write(nb, repo / "notebooks" / "01_paths.ipynb")
    book.execute_notebooks("test", repo_root=repo, log_output=False)
    stored = (repo / "results" / "test" / "notebooks" / "01_paths.ipynb").read_text()
    executed = nbformat.reads(stored, as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])][0]
    assert 'results_dir = "results/test"' in injected.source
    text = json.dumps([c.get("outputs", []) for c in executed.cells])
    assert "data in data/tiny and $TMPDIR/x and ~" in text
    assert not machine_paths_in(text, repo) and not machine_paths_in(text, REPO)
    assert str(repo) not in stored


# ----------------------------------------------------------------------------------------------
# The record itself


def committed_record_files() -> list[Path]:
    """The files of the committed ``results/`` tree (git's list; every file under results/ but checkpoints without
    git)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "results"], cwd=REPO, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        out = None
    if out is not None and out.returncode == 0:
        return [REPO / p for p in out.stdout.decode().split("\0") if p]
    return [p for p in (REPO / "results").rglob("*") if p.is_file() and "checkpoints" not in p.parts]


def test_the_committed_record_names_no_machine_path():
    """No file of the committed results/ tree names the checkout, a home or a temp directory (of this machine, or
    any /home/…, /root, /tmp, /Users/… folder). A record produced by the current code passes; an older one must be
    rebuilt (`make book`)."""
    generic = ["/home/", "/root/", "/tmp/", "/Users/", "/private/var/folders/"]
    offenders = {}
    for path in committed_record_files():
        if path.suffix.lower() in (".png", ".pt", ".safetensors", ".bin") or not path.is_file():
            continue
        text = path.read_text(encoding="utf8", errors="replace")
        hits = machine_paths_in(text) + [text[max(0, i - 40): i + 40].replace("\n", " ") for g in generic
                                         if (i := text.find(g)) >= 0]
        if hits:
            offenders[path.relative_to(REPO).as_posix()] = hits[0]
    assert not offenders, (f"{len(offenders)} file(s) under results/ name a machine path:\n"
                           + "\n".join(f"  {p}: …{hit}…" for p, hit in sorted(offenders.items())))
