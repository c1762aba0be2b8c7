"""Unit tests of the book runner and the figure helper: TOC order, figures of record, names, staging.

These need no kernel and no Sphinx build (the end-to-end run is in ``test_book_build.py``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # tests only; the module itself never picks a backend
import matplotlib.pyplot as plt
import pytest

from reflow_core import book, scales
from reflow_core.figures import caption, provenance, save_figure, validate_figure_name, STAMP_GID

REPO = Path(__file__).resolve().parent.parent


def write_notebook(path: Path, *, run_after_all: bool | int = False, source: str = "x = 1") -> Path:
    """A minimal valid notebook (nbformat 4) with a parameters cell."""
    metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    if run_after_all:
        metadata["reflow"] = {"run_after_all": run_after_all}
    nb = {
        "nbformat": 4, "nbformat_minor": 5, "metadata": metadata,
        "cells": [
            {"cell_type": "code", "id": "p", "metadata": {"tags": ["parameters"]}, "execution_count": None,
             "outputs": [], "source": 'scale = "smoke"\nresults_dir = ""\n'},
            {"cell_type": "code", "id": "c", "metadata": {}, "execution_count": None, "outputs": [],
             "source": source},
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nb))
    return path


def make_repo(root: Path, toc: str, notebooks: dict[str, bool], pages: tuple[str, ...] = ("book/intro",)) -> Path:
    """A repository-shaped folder: ``_toc.yml``, ``_config.yml``, markdown ``pages`` and ``notebooks``
    (path without suffix -> run_after_all)."""
    (root / "_toc.yml").write_text(toc)
    (root / "_config.yml").write_text("title: t\n")
    for page in pages:
        (root / f"{page}.md").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{page}.md").write_text(f"# {page}\n")
    for name, after in notebooks.items():
        write_notebook(root / f"{name}.ipynb", run_after_all=after)
    return root


NESTED_TOC = """\
format: jb-book
root: book/intro
parts:
  - caption: Part one
    chapters:
      - file: book/scorecard
      - file: notebooks/01_architecture
        sections:
          - file: notebooks/01b_details
  - caption: Part two
    chapters:
      - file: notebooks/02_training.ipynb
      - file: book/data
"""


@pytest.fixture
def nested_repo(tmp_path):
    return make_repo(
        tmp_path, NESTED_TOC,
        {"book/scorecard": True, "notebooks/01_architecture": False, "notebooks/01b_details": False,
         "notebooks/02_training": False},
        pages=("book/intro", "book/data"),
    )


# ---------------------------------------------------------------------------------------------- scales, TOC


def test_scales_are_ordered():
    assert scales.SCALE_NAMES == ("test", "smoke", "small", "medium", "paper")
    assert [scales.scale_rank(s) for s in scales.SCALE_NAMES] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="unknown scale 'huge'"):
        scales.scale_rank("huge")


def test_real_toc_starts_with_intro_then_scorecard_and_every_entry_exists():
    entries = book.toc_entries(REPO)
    assert entries[:2] == ["book/intro", "notebooks/00_scorecard"]
    assert entries[-1] == "book/references"
    for entry in entries:
        assert any((REPO / (entry + suffix)).is_file() for suffix in (".md", ".ipynb")), entry
    notebooks = book.toc_notebooks(REPO)
    assert [p.stem for p in book.execution_order(notebooks)][-1] == "00_scorecard"


def test_toc_notebooks_in_reading_order(nested_repo):
    names = [p.relative_to(nested_repo).as_posix() for p in book.toc_notebooks(nested_repo)]
    assert names == ["book/scorecard.ipynb", "notebooks/01_architecture.ipynb", "notebooks/01b_details.ipynb",
                     "notebooks/02_training.ipynb"]
    assert all(p.is_absolute() for p in book.toc_notebooks(nested_repo))


def test_run_after_all_goes_last_but_keeps_toc_order(nested_repo):
    order = [p.stem for p in book.execution_order(book.toc_notebooks(nested_repo))]
    assert order == ["01_architecture", "01b_details", "02_training", "scorecard"]


def test_run_after_all_ranks_order_the_late_notebooks(tmp_path):
    toc = "format: jb-book\nroot: book/intro\nchapters:\n  - file: n/last\n  - file: n/a\n  - file: n/late\n  - file: n/b\n"
    repo = make_repo(tmp_path, toc, {"n/last": 2, "n/a": False, "n/late": True, "n/b": False})
    assert [p.stem for p in book.execution_order(book.toc_notebooks(repo))] == ["a", "b", "late", "last"]


def test_missing_toc_file_is_named(nested_repo):
    (nested_repo / "notebooks" / "01b_details.ipynb").unlink()
    with pytest.raises(book.BookError, match="notebooks/01b_details"):
        book.toc_notebooks(nested_repo)


def test_duplicate_notebook_names_rejected(tmp_path):
    toc = "format: jb-book\nroot: book/intro\nchapters:\n  - file: a/x\n  - file: b/x\n"
    repo = make_repo(tmp_path, toc, {"a/x": False, "b/x": False})
    with pytest.raises(book.BookError, match="unique.*x"):
        book.toc_notebooks(repo)


def test_only_unknown_name_is_an_error(nested_repo):
    with pytest.raises(book.BookError, match="nope"):
        book.execute_notebooks("test", repo_root=nested_repo, only=["nope"])


def test_resolve_results_dir(nested_repo, tmp_path, monkeypatch):
    monkeypatch.chdir(nested_repo / "notebooks")  # where papermill runs a chapter
    assert scales.resolve_results_dir("", "small") == nested_repo / "results" / "small"
    assert scales.resolve_results_dir(str(tmp_path / "r"), "small") == tmp_path / "r"
    with pytest.raises(ValueError):
        scales.resolve_results_dir("", "huge")


# ---------------------------------------------------------------------------------------------- promotion


def fake_results(repo: Path, scale: str, names: dict[str, bytes], date: str = "2025-01-01T00:00:00+00:00") -> None:
    figures = repo / "results" / scale / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for name, content in names.items():
        (figures / name).write_bytes(content)
    (repo / "results" / scale / "RUN.json").write_text(json.dumps({"scale": scale, "date": date, "device": "cpu"}))


def record(repo: Path) -> dict:
    return json.loads((repo / "figures" / "RECORD.json").read_text())


def test_test_scale_never_promotes(tmp_path):
    fake_results(tmp_path, "test", {"fig-01-a.png": b"test"})
    assert book.promote_figures("test", repo_root=tmp_path) is False
    assert not (tmp_path / "figures").exists()


def test_promotion_rules(tmp_path):
    repo = tmp_path
    fake_results(repo, "smoke", {"fig-01-a.png": b"smoke-a", "fig-01-a.svg": b"<svg/>", "fig-02-b.png": b"smoke-b"})
    assert book.promote_figures("smoke", repo_root=repo) is True
    assert (repo / "figures" / "fig-01-a.png").read_bytes() == b"smoke-a"
    assert record(repo)["scale"] == "smoke"

    # small replaces smoke (only what it produced; the rest stays, recorded as smoke)
    fake_results(repo, "small", {"fig-01-a.png": b"small-a"}, date="2025-02-02T00:00:00+00:00")
    assert book.promote_figures("small", repo_root=repo) is True
    rec = record(repo)
    assert rec["scale"] == "small" and rec["date"].startswith("2025-02-02")
    assert rec["figures"]["fig-01-a.png"]["scale"] == "small"
    assert rec["figures"]["fig-02-b.png"]["scale"] == "smoke"
    assert (repo / "figures" / "fig-01-a.png").read_bytes() == b"small-a"

    # smoke never overwrites small
    fake_results(repo, "smoke", {"fig-01-a.png": b"smoke-again"})
    assert book.promote_figures("smoke", repo_root=repo) is False
    assert (repo / "figures" / "fig-01-a.png").read_bytes() == b"small-a"
    assert record(repo)["scale"] == "small"

    # the same scale refreshes, a larger one replaces
    fake_results(repo, "small", {"fig-01-a.png": b"small-rerun"})
    assert book.promote_figures("small", repo_root=repo) is True
    assert (repo / "figures" / "fig-01-a.png").read_bytes() == b"small-rerun"
    fake_results(repo, "paper", {"fig-01-a.png": b"paper-a"})
    assert book.promote_figures("paper", repo_root=repo) is True
    assert record(repo)["scale"] == "paper"
    fake_results(repo, "small", {"fig-01-a.png": b"small-late"})
    assert book.promote_figures("small", repo_root=repo) is False
    assert (repo / "figures" / "fig-01-a.png").read_bytes() == b"paper-a"


def test_promotion_ignores_other_files_and_empty_results(tmp_path):
    assert book.promote_figures("smoke", repo_root=tmp_path) is False  # nothing ran
    fake_results(tmp_path, "smoke", {"notes.txt": b"x", "fig-01-a.pdf": b"x"})
    assert book.promote_figures("smoke", repo_root=tmp_path) is False
    assert not (tmp_path / "figures" / "notes.txt").exists()


# ---------------------------------------------------------------------------------------------- figures


@pytest.mark.parametrize("name", ["fig-01-loss", "fig-02-loss-curves", "fig-architecture-param-table", "fig-7-a1"])
def test_valid_figure_names(name):
    assert validate_figure_name(name) == name


@pytest.mark.parametrize("name", ["fig-01", "fig01-loss", "Fig-01-loss", "fig-01-loss.png", "fig-01--loss",
                                  "fig-01-loss-", "fig-01_loss", "figure-01-loss", "fig-01-lóss", ""])
def test_invalid_figure_names(name):
    with pytest.raises(ValueError, match="fig-<chapter>-<name>"):
        validate_figure_name(name)


def test_save_figure_writes_png_and_svg_with_one_stamp(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png = save_figure(fig, "fig-01-line", results_dir=tmp_path, scale="smoke", checkpoint="reflow@100")
    assert png == tmp_path / "figures" / "fig-01-line.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = (tmp_path / "figures" / "fig-01-line.svg").read_text()
    assert "scale=smoke" in svg and "checkpoint=reflow@100" in svg
    save_figure(fig, "fig-01-line", results_dir=tmp_path, scale="smoke", checkpoint="reflow@200", note="seed 1")
    stamps = [t for t in fig.texts if t.get_gid() == STAMP_GID]
    assert len(stamps) == 1 and "reflow@200" in stamps[0].get_text() and stamps[0].get_text().endswith("seed 1")
    plt.close(fig)


def test_save_figure_rejects_bad_input(tmp_path):
    fig = plt.figure()
    with pytest.raises(ValueError):
        save_figure(fig, "loss", results_dir=tmp_path, scale="smoke", checkpoint="c")
    with pytest.raises(ValueError, match="unknown scale"):
        save_figure(fig, "fig-01-a", results_dir=tmp_path, scale="laptop", checkpoint="c")
    with pytest.raises(ValueError, match="results_dir"):
        save_figure(fig, "fig-01-a", results_dir="", scale="smoke", checkpoint="c")
    plt.close(fig)


def test_caption_and_provenance():
    assert caption("Loss curves. ", scale="small", checkpoint="reflow@2000") == \
        "Loss curves. (scale: small, checkpoint: reflow@2000)"
    # absolute checkpoint paths are shortened (no machine-specific paths in the book)
    assert caption("x", scale="smoke", checkpoint=Path("/home/me/results/smoke/ckpt/reflow")) == \
        "x (scale: smoke, checkpoint: ckpt/reflow)"
    text = provenance(scale="test", checkpoint="c", device="cpu")
    assert text.startswith("scale=test · checkpoint=c · device=cpu · 20")


# ---------------------------------------------------------------------------------------------- staging


def test_stage_book_uses_executed_copies(nested_repo, tmp_path):
    (nested_repo / "book" / "_static").mkdir()
    (nested_repo / "book" / "_static" / "custom.css").write_text("/* */")
    results = nested_repo / "results" / "small"
    for nb in book.toc_notebooks(nested_repo):
        write_notebook(results / "notebooks" / f"{nb.stem}.ipynb", source=f"executed = '{nb.stem}'")
    fake_results(nested_repo, "small", {"fig-01-a.png": b"png"})

    stage = book.stage_book("small", repo_root=nested_repo, stage_dir=tmp_path / "stage")
    assert (stage / "_config.yml").is_file() and (stage / "_toc.yml").is_file()
    assert (stage / "book" / "_static" / "custom.css").is_file()
    assert (stage / "figures" / "fig-01-a.png").read_bytes() == b"png"
    for rel in ("book/scorecard.ipynb", "notebooks/01_architecture.ipynb", "notebooks/02_training.ipynb"):
        nb = json.loads((stage / rel).read_text())
        assert nb["cells"][1]["source"] == f"executed = '{Path(rel).stem}'"
        assert "hide-cell" in nb["cells"][0]["metadata"]["tags"]  # parameters folded in the book
    # the stored result is untouched
    stored = json.loads((results / "notebooks" / "02_training.ipynb").read_text())
    assert stored["cells"][0]["metadata"]["tags"] == ["parameters"]

    # staging again starts from an empty folder
    (stage / "stale.md").write_text("old")
    book.stage_book("small", repo_root=nested_repo, stage_dir=stage)
    assert not (stage / "stale.md").exists()


def test_stage_book_missing_results_is_a_clear_error(nested_repo, tmp_path):
    with pytest.raises(book.BookError, match=r"(?s)no executed notebooks at scale 'paper'.*--scale paper"):
        book.stage_book("paper", repo_root=nested_repo, stage_dir=tmp_path / "stage")
    assert not (tmp_path / "stage").exists()  # nothing half-staged


def test_stage_book_allow_missing_leaves_chapters_out(nested_repo, tmp_path):
    """With --only, chapters that never ran at this scale are left out of the staged TOC (sections move up)."""
    import yaml

    results = nested_repo / "results" / "smoke" / "notebooks"
    for stem in ("scorecard", "01b_details"):
        write_notebook(results / f"{stem}.ipynb")
    stage = book.stage_book("smoke", repo_root=nested_repo, stage_dir=tmp_path / "stage", allow_missing=True)
    assert not (stage / "notebooks" / "02_training.ipynb").exists()
    assert not (stage / "notebooks" / "01_architecture.ipynb").exists()
    assert (stage / "notebooks" / "01b_details.ipynb").is_file()
    assert book.toc_entries(stage) == ["book/intro", "book/scorecard", "notebooks/01b_details", "book/data"]
    toc = yaml.safe_load((stage / "_toc.yml").read_text())
    assert [p["caption"] for p in toc["parts"]] == ["Part one", "Part two"]


def test_stage_refuses_repo_root(nested_repo):
    with pytest.raises(book.BookError, match="refusing"):
        book.stage_book("smoke", repo_root=nested_repo, stage_dir=nested_repo)


def test_build_from_missing_results_says_how_to_produce_them(nested_repo):
    with pytest.raises(book.BookError, match=r"(?s)no stored results for scale 'small'.*book --scale small"):
        book.run_book("small", execute=False, repo_root=nested_repo)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_arguments():
    parser = book.add_book_arguments(argparse.ArgumentParser())
    args = parser.parse_args([])
    assert (args.scale, args.execute, args.only, args.out, args.strict) == ("smoke", True, None, None, True)
    args = parser.parse_args(["--scale", "small", "--no-execute", "--only", "01_architecture", "02_training",
                              "--out", "/tmp/x"])
    assert (args.scale, args.execute, args.only, args.out) == ("small", False, ["01_architecture", "02_training"],
                                                               "/tmp/x")
    with pytest.raises(SystemExit):
        parser.parse_args(["--scale", "huge"])


def test_cli_reports_errors_as_exit_code(nested_repo, monkeypatch, capsys):
    monkeypatch.chdir(nested_repo)
    assert book.main(["--scale", "paper", "--no-execute"]) == 2  # a user error: message, no traceback
    err = capsys.readouterr().err
    assert err.startswith("reflow_core: error: BookError: no stored results for scale 'paper'")
    assert "Traceback" not in err


def test_glued_strings_show_without_quotes():
    from IPython.core.interactiveshell import InteractiveShell

    from reflow_core.results import _ProseText

    formatter = InteractiveShell.instance().display_formatter
    assert formatter.format("smoke")[0]["text/plain"] == "'smoke'"  # what a plain str would put into the prose
    assert formatter.format(_ProseText("smoke"))[0]["text/plain"] == "smoke"
