"""Session-wide settings: test-scale data and trained toy models are shared by every notebook test."""

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    # Prepared corpora go to a temporary folder, not into the checkout, unless the caller chose one.
    os.environ.setdefault("REFLOW_DATA_DIR", tempfile.mkdtemp(prefix="reflow-test-data-"))


@pytest.fixture(scope="session")
def test_results_dir(tmp_path_factory) -> Path:
    """One results folder for every notebook executed at scale="test" in this session (models train once)."""
    return Path(os.environ.get("REFLOW_TEST_RESULTS") or tmp_path_factory.getbasetemp() / "res-test")


@pytest.fixture(scope="session")
def real_book(test_results_dir, tmp_path_factory):
    """The real book executed once at scale="test" (every TOC chapter by papermill) and built offline.

    Chapter tests check their own notebook's figures, widget state and scorecard rows in this one run instead of
    executing the notebook a second time.  Returns ``(index.html, results folder)``.
    """
    from reflow_core import book

    out = tmp_path_factory.mktemp("book-out")
    index = book.run_book("test", repo_root=REPO, out_dir=out, results_dir=test_results_dir)
    return index, Path(test_results_dir)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The tests' models are tiny: thread start-up costs more than the matmuls, badly so on a shared 2-core machine.

    (Notebooks run in their own kernels and training subprocesses choose their own threads.)
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The `tiny` corpus prepared once per session (tests only read it)."""
    from reflow_core.data import prepare

    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare("tiny", out)
    return out
