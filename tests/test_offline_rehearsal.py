"""The offline GPU job rehearsed on the CPU, by the same code path as the real one (slow; what CI runs).

1. A test-scale bundle is built from this checkout: wheels resolved and downloaded for the running interpreter (the
   CI machine has the registries), the ``tiny`` corpus as xz shards, run.sh.
2. A clean virtual environment holds only what a CUDA image has: ``torch==2.13.0`` (the CPU wheel on disk, pinned:
   never an unpinned torch) and the scientific stack; no Jupyter, no pytest, no reflow_core installed.
3. ``offline/run.sh`` runs there on a copy of the checkout with PIP_NO_INDEX=1 and ``--allow-cpu``, on a subset of
   the chapters (the whole book at test scale takes longer than a rehearsal should): installs the wheels, probes,
   runs the (skipped) CUDA tests, unpacks the corpus, trains every model of the scale, executes the chapters, packs.
4. Here, the packed files restore ``results/test`` in another copy of the checkout and ``book --no-execute`` builds
   the HTML from them; the packing limits hold.

``REFLOW_IMAGE_VENV=<folder>`` reuses (or creates once) the clean environment, for repeated local runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reflow_core import offline

REPO = Path(__file__).resolve().parent.parent
IMAGE_REQUIREMENTS = ["torch==2.13.0", "numpy", "scipy", "pandas", "matplotlib", "seaborn", "scikit-learn",
                      "statsmodels", "tiktoken", "safetensors", "tqdm", "requests", "aiohttp", "pyyaml"]
CHAPTERS = ["01_architecture", "02_training", "06_steering", "00_scorecard"]  # 06: ipywidgets in the kernel
FAMILIES = ["reflow", "gpt2-new", "gpt2"]  # what those chapters train at scale test


def copy_checkout(dest: Path) -> Path:
    """The files a GPU host gets: tracked and untracked-but-not-ignored files of this checkout (no .venv, no data,
    no results of other scales' checkpoints)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True)
    if listed.returncode == 0:
        for rel in filter(None, listed.stdout.decode().split("\0")):
            src = REPO / rel
            if src.is_file():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / rel)
    else:  # not a git checkout: everything but the usual build outputs
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".git", ".venv", "_build", "data", "offline",
                                                                  "__pycache__", "results"))
    return dest


def image_venv(tmp_path: Path) -> Path:
    """A virtual environment with what a CUDA image has (see the module docstring); its python."""
    root = Path(os.environ.get("REFLOW_IMAGE_VENV") or tmp_path / "image")
    python = root / "bin" / "python"
    marker = root / ".reflow-image"
    if marker.is_file() and marker.read_text() == json.dumps(IMAGE_REQUIREMENTS):
        return python
    shutil.rmtree(root, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    proc = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           *IMAGE_REQUIREMENTS], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    marker.write_text(json.dumps(IMAGE_REQUIREMENTS))
    return python


@pytest.mark.slow
def test_offline_job_rehearsed_on_the_cpu(tmp_path):
    t0 = time.perf_counter()
    split = {}
    host = copy_checkout(tmp_path / "host")
    record = offline.build_bundle(host / "offline", scale="test", python=sys.executable, portable=False)
    split["bundle"] = time.perf_counter() - t0
    assert record["bytes"]["total"] <= offline.MAX_BUNDLE_BYTES and (host / "offline" / "run.sh").is_file()
    assert not {w["file"].split("-")[0].lower() for w in record["wheels"]} & {"torch", "numpy", "debugpy", "jedi"}

    t = time.perf_counter()
    python = image_venv(tmp_path)
    split["image venv"] = time.perf_counter() - t
    jupyter = subprocess.run([str(python), "-c", "import papermill"], capture_output=True)
    assert jupyter.returncode != 0, "the clean environment must not have the notebook stack"

    t = time.perf_counter()
    out = tmp_path / "out"
    env = {"PATH": f"{python.parent}:/usr/bin:/bin", "HOME": str(tmp_path / "home"), "PYTHON": str(python),
           "PIP_NO_INDEX": "1", "LANG": "C.UTF-8", "TMPDIR": str(tmp_path)}
    (tmp_path / "home").mkdir()
    proc = subprocess.run(["bash", str(host / "offline" / "run.sh"), str(out), "--allow-cpu", "--only", *CHAPTERS,
                           "--families", *FAMILIES],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    split["run.sh"] = time.perf_counter() - t
    log = (out / offline.LOG_FILE).read_text() if (out / offline.LOG_FILE).is_file() else ""
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert log == proc.stdout  # run.sh tees everything into the log
    for step in ("install (", "checks (probe + CUDA tests)", "corpus (", "train reflow seed 1337",
                 "train gpt2-new seed 1337", "train gpt2 seed 1337", "chapter 02_training", "chapter 00_scorecard",
                 "packing (", "time split:"):
        assert f"[offline] {step}" in log or step in log, step
    assert "skipped" in log  # the CUDA tests were collected and skipped, not missing

    files = offline.check_pack_limits(out)  # ≤ 8 files of ≤ 16 MiB besides the log
    pack = json.loads((out / offline.PACK_FILE).read_text())
    assert pack["scale"] == "test" and not pack["failed"] and len(files) == len(pack["parts"]) + 1
    host_results = host / "results" / "test"
    assert (host_results / offline.OFFLINE_RECORD).is_file()

    t = time.perf_counter()
    here = copy_checkout(tmp_path / "here")
    index = offline.unpack_and_build(out, repo_root=here, out_dir=tmp_path / "book")
    split["unpack + build"] = time.perf_counter() - t
    restored = here / "results" / "test"
    assert [p.as_posix() for p in offline.results_files(restored)] == \
        [p.as_posix() for p in offline.results_files(host_results)]
    assert sorted(offline.stored_chapters(restored)) == sorted(CHAPTERS)
    run = json.loads((restored / "RUN.json").read_text())
    assert {c: run["notebooks"][c]["status"] for c in CHAPTERS} == {c: "ok" for c in CHAPTERS}
    assert index.is_file() and (index.parent / "notebooks" / "02_training.html").is_file()
    split["total"] = time.perf_counter() - t0
    print("rehearsal split: " + ", ".join(f"{k} {v:.0f} s" for k, v in split.items()))
