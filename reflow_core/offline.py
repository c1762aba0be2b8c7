"""A scale on an offline GPU host in one command, and its results of record brought back.

    here, with the registries   make offline-bundle       -> offline/ (≤ 36 MiB): wheels, corpus shards, run.sh
    copy the checkout with offline/ to the GPU host
    there, no network           offline/run.sh OUT_DIR    -> OUT_DIR: ≤ 8 files of ≤ 16 MiB (results) + run.log
    copy OUT_DIR back here      make book-stored SCALE=small FROM=OUT_DIR   (restore, promote figures, build HTML)

Why it is shaped this way:

* **Wheels, not a network.** Many GPU nodes have none, and a CUDA image ships its own torch (often another version,
  another Python) and the scientific stack, but no Jupyter. The bundle carries only what such an image lacks: the
  kernel stack papermill needs, myst-nb's glue (what ``reflow_core.results.glue`` imports in the kernel) and pytest.
  Everything the image has is left out by *resolution*, not by a hand-kept list: the dependency closure of
  :data:`IMAGE_PACKAGES` is resolved with the same pip and subtracted.
* **The target interpreter resolves.** pip evaluates environment markers with the interpreter it runs under, so the
  wheels are resolved by the target Python itself (``--python``, 3.12 for the common CUDA images): resolved from
  3.11, papermill's ``aiohttp ; python_version >= "3.12"`` silently vanishes. ``--platform`` pins manylinux wheels
  (glibc ≥ 2.17 … 2.28) whatever glibc this machine has.
* **The corpus travels prepared**, as the xz-compressed uint16 token stream in shards (≈ 0.95 bytes/token on
  small-mix) with its manifest; the host decompresses it with Python's ``lzma`` and checks it exactly as
  :func:`reflow_core.data.load_tokens` does (sizes and sha256 against the manifest) before anything trains.
* **Results come back small**: executed notebooks, figures, result JSON, RUN.json and the training runs' summaries
  and metrics — never weights — as one xz tar split into at most :data:`MAX_PACK_FILES` files of at most
  :data:`MAX_PART_BYTES` (PACK.json, counted among them, holds each part's sha256).

This module is a runner like :mod:`reflow_core.book` (the top layer): the host job executes the chapters through it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as _dt
import io
import json
import lzma
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from reflow_core import data
from reflow_core.errors import UserError, run_command
from reflow_core.fileio import read_json, sha256_file, write_json_atomic
from reflow_core.scales import (REPO_ROOT, SCALE_NAMES, data_dir_for, get_scale, resolve_results_dir,
                                trained_families)

BUNDLE_FILE = "BUNDLE.json"
PACK_FILE = "PACK.json"
LOG_FILE = "run.log"
OFFLINE_RECORD = "OFFLINE.json"  # results/<scale>/OFFLINE.json: the host job's probe and time split
MiB = 1 << 20
MAX_BUNDLE_BYTES = 36 * MiB  # beside a ~20 MB checkout, under the 64 MiB that travels to a GPU host
MAX_PART_BYTES = 16 * MiB
MAX_PACK_FILES = 8  # parts + PACK.json (the log comes on top)
SHARD_TOKENS = 8_000_000  # ≈ 7.6 MiB compressed: shards decompress in parallel on the host
XZ_PRESET = 9 | lzma.PRESET_EXTREME  # measured on small-mix: 0.957 bytes/token (preset 6: 0.963), same decode speed

# What the kernel needs on the host and a CUDA image usually lacks: resolved with their dependencies.
KERNEL_REQUIREMENTS = ("papermill", "ipykernel", "ipywidgets", "pytest")
# myst-nb's glue runs in the kernel (reflow_core.results.glue). myst-nb's own requirements are the Sphinx side of it
# (sphinx, jupyter-cache, ...) which only the book build here needs, so it comes without them, plus the one module
# its glue imports beyond the kernel stack (docutils, through myst_nb.core.loggers); both pinned to the versions
# that build the book here, so the glue it writes is the glue this side reads.
NO_DEPS_REQUIREMENTS = ("myst-nb", "docutils")
# A CUDA image has these (and so their dependencies): the bundle leaves their whole closure out.
IMAGE_PACKAGES = ("torch", "numpy", "scipy", "pandas", "matplotlib", "seaborn", "scikit-learn", "statsmodels",
                  "tiktoken", "safetensors", "tqdm", "requests", "aiohttp", "pyyaml")
# Resolved but not needed by a kernel that executes notebooks: the debugger and tab completion (ipykernel and IPython
# import them only if they are there; jedi alone is 4.9 MB) and the widgets' browser-side assets (the HTML is built
# here, from the widget state nbclient stores in the notebook).
LEFT_OUT = {"debugpy": "ipykernel's debugger, optional", "jedi": "IPython's tab completion, optional",
            "parso": "jedi's parser", "widgetsnbextension": "browser assets of ipywidgets",
            "jupyterlab-widgets": "browser assets of ipywidgets"}
# manylinux tags a host's glibc (≥ 2.17) can load, whatever this machine's glibc is
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_28_x86_64")
# where a kernel finds installed wheels; the process and its kernels share it
KERNEL_IMPORT_CHECK = "import papermill, nbclient, ipykernel, ipywidgets, myst_nb.ext.glue, pytest"


class OfflineError(UserError, RuntimeError):
    """A bundle, a host job or a pack that cannot go on; the message says what and what to do."""


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _say(text: str) -> None:
    print(f"[offline] {text}", flush=True)


# ======================================================================================================================
# Wheels
# ======================================================================================================================


def interpreter_info(python: str) -> dict:
    """Version, implementation and platform of ``python`` (asked in a subprocess: it is usually another one)."""
    code = ("import json, platform, sys; print(json.dumps({'version': '%d.%d.%d' % sys.version_info[:3], "
            "'tag': 'cp%d%d' % sys.version_info[:2], 'machine': platform.machine(), 'system': platform.system()}))")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        raise OfflineError(f"cannot run the target interpreter {python!r} ({e}); pass --python with a Python of the "
                           "version the GPU host runs (3.12 for the common CUDA images)") from None
    return json.loads(out.stdout.strip().splitlines()[-1])


def _pip_target_flags(info: dict, portable: bool) -> list[str]:
    if not portable:
        return ["--only-binary=:all:"]
    flags = ["--only-binary=:all:", "--implementation", "cp", "--python-version", info["version"].rsplit(".", 1)[0],
             "--abi", info["tag"]]
    for p in PLATFORMS:
        flags += ["--platform", p]
    return flags


def resolve(python: str, requirements: Sequence[str], info: dict, *, portable: bool = True) -> dict[str, str]:
    """``{canonical name: version}`` of ``requirements`` with all their dependencies, as ``python``'s pip resolves
    them for that interpreter (its markers) and, when ``portable``, for manylinux wheels."""
    with tempfile.TemporaryDirectory(prefix="reflow-resolve-") as tmp:
        report = Path(tmp) / "report.json"
        cmd = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
               "--target", str(Path(tmp) / "target"), *_pip_target_flags(info, portable), *requirements]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not report.is_file():
            raise OfflineError(f"pip could not resolve {' '.join(requirements)} for {python}:\n"
                               + "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:]))
        found = json.loads(report.read_text())["install"]
    return {_canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in found}


def local_version(name: str) -> str | None:
    """The version of ``name`` installed beside this package (what builds the book here), or None."""
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def wheel_plan(python: str, info: dict, *, portable: bool = True) -> tuple[dict[str, str], dict[str, str]]:
    """(``{name: version}`` to bundle, ``{name: why}`` of what was resolved and left out)."""
    wanted = resolve(python, KERNEL_REQUIREMENTS, info, portable=portable)
    image = resolve(python, IMAGE_PACKAGES, info, portable=portable)
    left_out = {n: "the image has it" for n in wanted if n in image}
    left_out.update({n: why for n, why in LEFT_OUT.items() if n in wanted})
    plan = {n: v for n, v in wanted.items() if n not in left_out}
    for name in NO_DEPS_REQUIREMENTS:
        plan[_canonical(name)] = local_version(name) or ""
    return dict(sorted(plan.items())), left_out


def download_wheels(python: str, plan: dict[str, str], dest: Path, info: dict, *, portable: bool = True) -> list[Path]:
    """Download exactly the wheels of ``plan`` (no dependency resolution: the plan is the closure) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    pins = [f"{n}=={v}" if v else n for n, v in plan.items()]
    cmd = [python, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest),
           *_pip_target_flags(info, portable), *pins]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise OfflineError("pip download failed:\n" + "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:]))
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != len(plan):
        raise OfflineError(f"expected {len(plan)} wheels in {dest}, found {len(wheels)}: {[w.name for w in wheels]}")
    return wheels


# ======================================================================================================================
# Corpus shards
# ======================================================================================================================


def write_corpus_shards(data_dir: Path, out_dir: Path, *, shard_tokens: int = SHARD_TOKENS,
                        preset: int = XZ_PRESET) -> dict:
    """Each split of a prepared dataset (checked against its manifest first) as xz shards of ≤ ``shard_tokens``
    uint16 tokens, plus its manifest verbatim; returns the bundle's corpus record."""
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = data.read_manifest(data_dir)
    shards = []
    for split in data.SPLITS:
        tokens = data.load_tokens(data_dir, split, verify_hash=True)
        for i, start in enumerate(range(0, len(tokens), shard_tokens)):
            part = np.ascontiguousarray(tokens[start:start + shard_tokens], dtype=np.dtype(data.TOKEN_DTYPE))
            path = out_dir / f"{split}-{i:03d}.u16.xz"
            path.write_bytes(lzma.compress(part.tobytes(), format=lzma.FORMAT_XZ, preset=preset))
            shards.append({"file": path.name, "split": split, "tokens": int(len(part)), "bytes": path.stat().st_size,
                           "sha256": sha256_file(path)})
    shutil.copy2(data_dir / data.MANIFEST_NAME, out_dir / data.MANIFEST_NAME)
    return {"source": manifest.get("source"), "dir": out_dir.name, "manifest": data.MANIFEST_NAME, "shards": shards,
            "tokens": {s: manifest["splits"][s]["tokens"] for s in data.SPLITS},
            "bytes": sum(s["bytes"] for s in shards)}


def _inflate(path: Path, sha256: str) -> bytes:
    if sha256_file(path) != sha256:
        raise OfflineError(f"{path} does not match its sha256 in {BUNDLE_FILE}: copy offline/ again")
    return lzma.decompress(path.read_bytes())


def unpack_corpus(corpus_dir: Path, record: dict, out: Path) -> Path:
    """Rebuild the prepared dataset at ``out`` from the shards (decompressed in parallel: lzma releases the GIL),
    then check it as :func:`reflow_core.data.load_tokens` does — sizes and sha256 against its manifest. A dataset
    already at ``out`` that passes those checks is kept."""
    manifest_path = corpus_dir / record["manifest"]
    try:
        current = data.read_manifest(out)
        if current.get("splits") == json.loads(manifest_path.read_text())["splits"]:
            for split in data.SPLITS:
                data.load_tokens(out, split, verify_hash=True)
            return out
    except (data.DatasetNotPreparedError, data.DatasetIntegrityError):
        pass
    staging = out.with_name(f".{out.name}.unpacking-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shards = record["shards"]
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        blobs = list(pool.map(lambda s: _inflate(corpus_dir / s["file"], s["sha256"]), shards))
    manifest = json.loads(manifest_path.read_text())
    for split in data.SPLITS:
        with open(staging / manifest["splits"][split]["file"], "wb") as f:
            for shard, blob in zip(shards, blobs):
                if shard["split"] == split:
                    f.write(blob)
    shutil.copy2(manifest_path, staging / data.MANIFEST_NAME)
    for split in data.SPLITS:  # exactly the checks training makes, before anything trains on it
        data.load_tokens(staging, split, verify_hash=True)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, out)
    return out


# ======================================================================================================================
# The bundle
# ======================================================================================================================

RUN_SH = """#!/usr/bin/env bash
# The whole job on an offline GPU host (reflow_core/offline.py): install the bundled wheels, check CUDA, run the
# CUDA tests, unpack the corpus, train, execute every chapter, pack the results into OUT_DIR.
#
#   offline/run.sh OUT_DIR [--allow-cpu] [--only CHAPTER ...] [--families FAMILY ...]   (the options: a rehearsal)
#
# Needs this checkout with offline/ inside it and a python3 (PYTHON=...) with torch and the scientific stack.
# Uses no network (PIP_NO_INDEX=1). Everything it prints is also in OUT_DIR/run.log.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
out="${1:?usage: offline/run.sh OUT_DIR [--allow-cpu] [--only CHAPTER ...]}"
shift
mkdir -p "$out"
out="$(cd "$out" && pwd)"
export PIP_NO_INDEX=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
cd "$repo"
set +e
"${PYTHON:-python3}" -m reflow_core.offline host --bundle "$here" --out "$out" "$@" 2>&1 | tee "$out/run.log"
status=${PIPESTATUS[0]}
set -e
exit "$status"
"""


def _git_commit(repo: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build_bundle(out: str | os.PathLike, *, scale: str = "small", python: str | None = None,
                 portable: bool = True, max_bytes: int = MAX_BUNDLE_BYTES, prepare_corpus: bool = True) -> dict:
    """Write the bundle for ``scale`` into ``out`` (replaced if it holds an earlier bundle) and return its record.

    ``python`` is the host's interpreter version to resolve wheels for (default: this one); ``portable`` pins
    manylinux wheels (off for a rehearsal on this machine). The corpus is the scale's prepared dataset
    (prepared first when ``prepare_corpus`` and it is missing). Fails if the bundle exceeds ``max_bytes``."""
    from reflow_core.runs import ensure_data

    get_scale(scale)
    out = Path(out).resolve()
    python = python or sys.executable
    if out.exists() and any(out.iterdir()) and not (out / BUNDLE_FILE).is_file():
        raise OfflineError(f"{out} exists and is not a bundle (no {BUNDLE_FILE}); choose an empty or new folder")
    staging = out.with_name(f".{out.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        info = interpreter_info(python)
        _say(f"resolving wheels for Python {info['version']} ({python}) …")
        plan, left_out = wheel_plan(python, info, portable=portable)
        wheels = download_wheels(python, plan, staging / "wheels", info, portable=portable)
        t_wheels = time.perf_counter() - t0
        data_dir = ensure_data(scale) if prepare_corpus else data_dir_for(scale)
        _say(f"compressing the {get_scale(scale).data_source} corpus from {data_dir} …")
        t1 = time.perf_counter()
        corpus = write_corpus_shards(Path(data_dir), staging / "corpus")
        t_corpus = time.perf_counter() - t1
        run_sh = staging / "run.sh"
        run_sh.write_text(RUN_SH)
        run_sh.chmod(0o755)
        record = {
            "format": 1, "scale": scale, "created": _now(), "commit": _git_commit(REPO_ROOT),
            "python": info, "portable": portable,
            "wheels": [{"file": w.name, "bytes": w.stat().st_size, "sha256": sha256_file(w)} for w in wheels],
            "left_out": left_out, "corpus": corpus,
            "build_seconds": {"wheels": round(t_wheels, 1), "corpus": round(t_corpus, 1)},
        }
        write_json_atomic(staging / BUNDLE_FILE, record)
        record["bytes"] = {"wheels": _tree_size(staging / "wheels"), "corpus": _tree_size(staging / "corpus"),
                           "total": _tree_size(staging)}
        write_json_atomic(staging / BUNDLE_FILE, record)
        total = _tree_size(staging)
        if total > max_bytes:
            raise OfflineError(f"the bundle is {total / MiB:.1f} MiB, over its {max_bytes / MiB:.0f} MiB: wheels "
                               f"{record['bytes']['wheels'] / MiB:.1f} MiB, corpus {corpus['bytes'] / MiB:.1f} MiB")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    b = record["bytes"]
    _say(f"{out}: {b['total'] / MiB:.1f} MiB = {len(wheels)} wheels {b['wheels'] / MiB:.1f} MiB + corpus "
         f"{len(corpus['shards'])} shards {b['corpus'] / MiB:.1f} MiB ({sum(corpus['tokens'].values()):,} tokens, "
         f"{b['corpus'] / max(sum(corpus['tokens'].values()), 1):.3f} bytes/token) + run.sh; limit "
         f"{max_bytes / MiB:.0f} MiB")
    _say("left out: " + ", ".join(f"{n} ({why})" for n, why in sorted(left_out.items())))
    return record


def read_bundle(bundle: str | os.PathLike) -> dict:
    path = Path(bundle) / BUNDLE_FILE
    record = read_json(path)
    if not isinstance(record, dict) or record.get("format") != 1:
        raise OfflineError(f"{path} is missing or not a bundle record: build the bundle with `make offline-bundle`")
    return record


# ======================================================================================================================
# On the host: wheels, kernel, CUDA probe
# ======================================================================================================================


def install_wheels(bundle: Path, record: dict, site: Path, python: str = sys.executable) -> None:
    """``pip install --no-index --no-deps --target site`` of every bundled wheel (checked against BUNDLE.json);
    where the image has no pip, the wheels are unpacked as the zip files they are (scripts are not needed)."""
    wheels = []
    for w in record["wheels"]:
        path = bundle / "wheels" / w["file"]
        if not path.is_file() or sha256_file(path) != w["sha256"]:
            raise OfflineError(f"{path} is missing or altered: copy offline/ again")
        wheels.append(str(path))
    site.mkdir(parents=True, exist_ok=True)
    has_pip = subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode == 0
    if has_pip:
        cmd = [python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--quiet",
               "--disable-pip-version-check", "--target", str(site), *wheels]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise OfflineError("installing the bundled wheels failed:\n" + (proc.stdout + proc.stderr)[-3000:])
    else:
        import zipfile

        for w in wheels:
            with zipfile.ZipFile(w) as z:
                z.extractall(site)


def kernel_environment(work: Path, site: Path) -> dict[str, str]:
    """Environment for this process and every kernel it starts: the wheels on PYTHONPATH, a ``python3`` kernelspec
    that runs *this* interpreter first on JUPYTER_PATH (an image may carry a system-wide ``python3`` spec for some
    other Python), and every Jupyter, IPython and matplotlib folder in ``work`` (the host's home may be read-only)."""
    spec = work / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True, exist_ok=True)
    write_json_atomic(spec / "kernel.json", {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (reflow offline)", "language": "python", "metadata": {"debugger": False}})
    for sub in ("jupyter-data", "jupyter-config", "jupyter-runtime", "ipython", "matplotlib"):
        (work / sub).mkdir(exist_ok=True)
    return {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), str(site), os.environ.get("PYTHONPATH")])),
        "JUPYTER_PATH": str(work / "jupyter"), "JUPYTER_DATA_DIR": str(work / "jupyter-data"),
        "JUPYTER_CONFIG_DIR": str(work / "jupyter-config"), "JUPYTER_RUNTIME_DIR": str(work / "jupyter-runtime"),
        "IPYTHONDIR": str(work / "ipython"), "MPLCONFIGDIR": str(work / "matplotlib"),
        "JUPYTER_PLATFORM_DIRS": "1", "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    }


def probe(seconds: float = 2.0) -> dict:
    """What the device is: name, compute capability, bf16, and a ``seconds`` bf16 matmul probe (TFLOP/s against the
    device's dense peak). Runs in its own process (``python -m reflow_core.offline probe``), so the job itself never
    holds a CUDA context while training runs."""
    import torch

    from reflow_core.device import peak_flops

    out = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda": torch.cuda.is_available(),
           "python": platform.python_version()}
    if not out["cuda"]:
        return out
    dev = torch.device("cuda", 0)
    out.update(name=torch.cuda.get_device_name(dev), capability=".".join(map(str, torch.cuda.get_device_capability(dev))),
               devices=torch.cuda.device_count(), bf16=torch.cuda.is_bf16_supported(),
               memory_gib=round(torch.cuda.get_device_properties(dev).total_memory / 2**30, 1),
               flash_sdp=torch.backends.cuda.flash_sdp_enabled())
    dtype = torch.bfloat16 if out["bf16"] else torch.float32
    n = 8192
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    (a @ b).sum().item()  # cuBLAS picks its kernel
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ b
        torch.cuda.synchronize(dev)
        done += 10
    tflops = 2 * n**3 * done / (time.perf_counter() - t0) / 1e12
    peak = peak_flops(dev, dtype)
    out.update(matmul_tflops=round(tflops, 1), peak_tflops=round(peak / 1e12, 1) if peak else None,
               matmul_share_of_peak=round(tflops * 1e12 / peak, 3) if peak else None)
    return out


def _probe_subprocess(env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "reflow_core.offline", "probe"], capture_output=True, text=True,
                          env=env, timeout=300)
    if proc.returncode != 0:
        raise OfflineError("the device probe failed:\n" + (proc.stdout + proc.stderr)[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ======================================================================================================================
# Packing the results, unpacking them here
# ======================================================================================================================

# What of results/<scale> is a result of record: everything but weights, the activation cache and temporaries.
# Training runs keep their summary, metrics and config (what the Training and Cost chapters quote).
RUN_FILES = {"summary.json", "metrics.jsonl", "train_config.json"}


def _packed(rel: Path) -> bool:
    parts = rel.parts
    if parts[0] == "checkpoints":
        return len(parts) == 3 and parts[2] in RUN_FILES
    if parts[0] == "activations" or rel.name.startswith(".") or rel.suffix in (".safetensors", ".npy", ".pt"):
        return False
    return True


def results_files(results: Path) -> list[Path]:
    """The files of ``results`` that travel back, relative to it, sorted."""
    return sorted(p.relative_to(results) for p in results.rglob("*") if p.is_file() and _packed(p.relative_to(results)))


def pack_results(results: str | os.PathLike, out: str | os.PathLike, *, scale: str, extra: dict | None = None,
                 part_bytes: int = MAX_PART_BYTES, max_files: int = MAX_PACK_FILES) -> dict:
    """``results`` (a scale's results folder) as ``results-<scale>.tar.xz.NNN`` parts of ≤ ``part_bytes`` plus
    PACK.json in ``out``, at most ``max_files`` files in all; returns the pack record."""
    results, out = Path(results), Path(out)
    files = results_files(results)
    if not files:
        raise OfflineError(f"nothing to pack in {results}")
    buf = io.BytesIO()
    with lzma.open(buf, "wb", preset=6) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
        for rel in files:
            info = tar.gettarinfo(str(results / rel), arcname=rel.as_posix())
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(results / rel, "rb") as f:
                tar.addfile(info, f)
    blob = buf.getvalue()
    n_parts = max(1, -(-len(blob) // part_bytes))
    if n_parts + 1 > max_files:
        biggest = sorted(files, key=lambda r: (results / r).stat().st_size, reverse=True)[:5]
        raise OfflineError(f"the results of {results} pack to {len(blob) / MiB:.1f} MiB: {n_parts} parts of "
                           f"{part_bytes / MiB:.0f} MiB + {PACK_FILE} exceed {max_files} files. Largest: "
                           + ", ".join(f"{r} ({(results / r).stat().st_size / MiB:.1f} MiB)" for r in biggest))
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"results-{scale}.tar.xz.*"):
        old.unlink()
    parts = []
    for i in range(n_parts):
        path = out / f"results-{scale}.tar.xz.{i + 1:03d}"
        chunk = blob[i * part_bytes:(i + 1) * part_bytes]
        path.write_bytes(chunk)
        parts.append({"file": path.name, "bytes": len(chunk), "sha256": sha256_file(path)})
    import hashlib

    record = {"format": 1, "scale": scale, "created": _now(), "files": len(files),
              "bytes_unpacked": sum((results / r).stat().st_size for r in files), "bytes_packed": len(blob),
              "archive_sha256": hashlib.sha256(blob).hexdigest(), "parts": parts, **(extra or {})}
    write_json_atomic(out / PACK_FILE, record)
    return record


def check_pack_limits(out: str | os.PathLike, *, part_bytes: int = MAX_PART_BYTES,
                      max_files: int = MAX_PACK_FILES) -> list[Path]:
    """The files of a pack folder besides the log, after checking the limits (count and size)."""
    files = sorted(p for p in Path(out).iterdir() if p.is_file() and p.name != LOG_FILE)
    if len(files) > max_files:
        raise OfflineError(f"{out} holds {len(files)} files besides {LOG_FILE}; at most {max_files} may travel")
    big = [p for p in files if p.stat().st_size > part_bytes]
    if big:
        raise OfflineError(f"over {part_bytes / MiB:.0f} MiB: {', '.join(p.name for p in big)}")
    return files


def _safe_members(tar: tarfile.TarFile):
    for m in tar.getmembers():
        path = Path(m.name)
        if not m.isfile() or path.is_absolute() or ".." in path.parts:
            raise OfflineError(f"the pack holds {m.name!r}, which is not a plain relative file: refusing to unpack it")
        yield m


def unpack_results(src: str | os.PathLike, *, repo_root: str | os.PathLike | None = None,
                   results_dir: str | os.PathLike | None = None) -> tuple[str, Path]:
    """Verify the parts in ``src`` (PACK.json), then replace ``results/<scale>`` by what they hold; return
    ``(scale, results folder)``. A results folder already there is replaced whole (its weights, which never travel,
    go with it); a pack that does not verify changes nothing."""
    import hashlib

    src = Path(src)
    record = read_json(src / PACK_FILE)
    if not isinstance(record, dict) or record.get("format") != 1 or record.get("scale") not in SCALE_NAMES:
        raise OfflineError(f"{src / PACK_FILE} is missing or not a pack record (the host job writes it last)")
    check_pack_limits(src)
    scale = record["scale"]
    blob = bytearray()
    for part in record["parts"]:
        path = src / part["file"]
        if not path.is_file() or path.stat().st_size != part["bytes"] or sha256_file(path) != part["sha256"]:
            raise OfflineError(f"{path} is missing, incomplete or altered (see {PACK_FILE}): copy it again")
        blob += path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != record["archive_sha256"]:
        raise OfflineError(f"the parts in {src} do not make the archive {PACK_FILE} names")
    root = Path(repo_root).resolve() if repo_root else REPO_ROOT
    results = resolve_results_dir(results_dir, scale, root)
    staging = results.with_name(f".{results.name}.unpacking-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with lzma.open(io.BytesIO(bytes(blob))) as xz, tarfile.open(fileobj=xz, mode="r") as tar:
            members = list(_safe_members(tar))
            for m in members:
                target = staging / m.name
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(m) as f, open(target, "wb") as g:
                    shutil.copyfileobj(f, g)
                os.utime(target, (m.mtime, m.mtime))
        if len(members) != record["files"]:
            raise OfflineError(f"the pack holds {len(members)} files, {PACK_FILE} says {record['files']}")
        if results.exists():
            trash = results.with_name(f".{results.name}.replaced-{os.getpid()}")
            os.replace(results, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(staging, results)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _say(f"restored {record['files']} files ({record['bytes_unpacked'] / MiB:.1f} MiB) into {results}")
    return scale, results


def stored_chapters(results: Path) -> list[str]:
    """The chapters whose executed notebook a results folder holds."""
    return sorted(p.stem for p in (results / "notebooks").glob("*.ipynb") if not p.name.endswith(".failed.ipynb")) \
        if (results / "notebooks").is_dir() else []


def unpack_and_build(src: str | os.PathLike, *, repo_root: str | os.PathLike | None = None,
                     out_dir: str | os.PathLike | None = None, strict: bool = True) -> Path:
    """Here: restore the results, promote the figures of record and build the HTML (``book --no-execute``).
    A pack with only some chapters (a rehearsal's ``--only``) builds those, warning about the others."""
    from reflow_core import book

    root = Path(repo_root).resolve() if repo_root else REPO_ROOT
    scale, results = unpack_results(src, repo_root=root)
    present = set(stored_chapters(results))
    toc = {p.stem for p in book.toc_notebooks(root)}
    only = sorted(present & toc) if present != toc else None
    return book.run_book(scale, execute=False, repo_root=root, out_dir=out_dir, results_dir=results, only=only,
                         strict=strict)


# ======================================================================================================================
# The host job
# ======================================================================================================================


class _Clock:
    """The time split the job prints at the end (and stores in OFFLINE.json and PACK.json)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.split: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.split[name] = round(seconds, 1)
        _say(f"{name}: {seconds:.1f} s (job at {time.perf_counter() - self.t0:.0f} s)")

    def total(self) -> float:
        return round(time.perf_counter() - self.t0, 1)


def host_job(bundle: str | os.PathLike, out: str | os.PathLike, *, scale: str | None = None,
             allow_cpu: bool = False, only: Sequence[str] | None = None,
             families: Sequence[str] | None = None) -> int:
    """Everything ``offline/run.sh`` does; returns the exit code (0: every step and chapter ran). ``only`` and
    ``families`` narrow the chapters executed and the models trained up front (a rehearsal); chapters still train
    whatever else they need."""
    from reflow_core import book, runs

    clock = _Clock()
    bundle, out = Path(bundle).resolve(), Path(out).resolve()
    record = read_bundle(bundle)
    scale = scale or record["scale"]
    spec = get_scale(scale)
    _say(f"scale {scale} | bundle of {record['created']} (commit {record.get('commit')}) | Python "
         f"{platform.python_version()} at {sys.executable}")
    if record["python"]["tag"] != f"cp{sys.version_info[0]}{sys.version_info[1]}":
        _say(f"warning: the wheels were resolved for Python {record['python']['version']}, this is "
             f"{platform.python_version()}; binary wheels may not load (rebuild with --python)")
    work = Path(tempfile.mkdtemp(prefix="reflow-offline-"))

    # 1. install: the wheels into a folder on PYTHONPATH, for this process and for every kernel
    t = time.perf_counter()
    site = work / "site"
    install_wheels(bundle, record, site)
    env = kernel_environment(work, site)
    os.environ.update(env)
    sys.path.insert(0, str(site))
    check = subprocess.run([sys.executable, "-c", KERNEL_IMPORT_CHECK], capture_output=True, text=True)
    if check.returncode != 0:
        raise OfflineError("the installed wheels do not import:\n" + check.stderr[-3000:])
    clock.add(f"install ({len(record['wheels'])} wheels)", time.perf_counter() - t)

    # 2. checks: the device, then the CUDA tests (stop at the first failure)
    t = time.perf_counter()
    device = _probe_subprocess(dict(os.environ))
    if device["cuda"]:
        _say(f"device {device['name']} ×{device['devices']} (sm {device['capability']}, {device['memory_gib']} GiB), "
             f"bf16 {device['bf16']}, flash SDPA {device['flash_sdp']}, torch {device['torch']} (CUDA "
             f"{device['cuda_build']}): bf16 matmul {device['matmul_tflops']} TFLOP/s"
             + (f" = {100 * device['matmul_share_of_peak']:.0f}% of the {device['peak_tflops']} TFLOP/s dense peak"
                if device.get("peak_tflops") else " (no peak known for this device: MFU will not be logged)"))
    elif allow_cpu:
        _say(f"no CUDA device (torch {device['torch']}): going on on the CPU (--allow-cpu, a rehearsal)")
    else:
        raise OfflineError(f"no CUDA device visible to torch {device['torch']} (built with CUDA "
                           f"{device['cuda_build']}); check the driver and CUDA_VISIBLE_DEVICES, or pass --allow-cpu")
    tests = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-x", "-q", "-p", "no:cacheprovider",
                            "tests/test_cuda.py"], cwd=REPO_ROOT, text=True, capture_output=True)
    print(tests.stdout[-4000:] + tests.stderr[-2000:], flush=True)
    if tests.returncode != 0:
        raise OfflineError("a CUDA test failed (above): stopping before anything trains")
    clock.add("checks (probe + CUDA tests)", time.perf_counter() - t)

    # 3. the corpus, checked against its manifest
    t = time.perf_counter()
    corpus = record["corpus"]
    if corpus["source"] != spec.data_source:
        raise OfflineError(f"the bundle carries {corpus['source']}, scale {scale} trains on {spec.data_source}")
    unpack_corpus(bundle / corpus["dir"], corpus, data_dir_for(scale))
    clock.add(f"corpus ({sum(corpus['tokens'].values()):,} tokens)", time.perf_counter() - t)

    # 4. training: every model the book needs, once (the chapters then find them)
    results = resolve_results_dir(None, scale, REPO_ROOT)
    models = {}
    for family in families or trained_families(scale):
        for seed in spec.seeds:
            t = time.perf_counter()
            summary = runs.ensure_model(scale, family, results, seed)
            models[f"{family}-seed{seed}"] = {k: summary.get(k) for k in ("steps", "tokens", "tokens_per_s", "mfu",
                                                                           "final_val_loss", "wall_s", "loss_chunk")}
            clock.add(f"train {family} seed {seed} ({summary['steps']} steps, "
                      f"{(summary.get('tokens_per_s') or 0):,.0f} tok/s"
                      + (f", MFU {100 * summary['mfu']:.1f}%" if summary.get("mfu") else "") + ")",
                      time.perf_counter() - t)

    # 5. every chapter, in book order; a chapter that fails on the GPU is tried once more on the CPU
    failed = []
    order = book.execution_order(book._select(book.toc_notebooks(REPO_ROOT), only))
    for src in order:
        t = time.perf_counter()
        try:
            book.execute_notebooks(scale, repo_root=REPO_ROOT, results_dir=results, only=[src.stem])
        except book.NotebookExecutionError as e:
            if runs.eval_device(scale) == "cuda":
                _say(f"{src.stem} failed on CUDA ({e}); once more with its models on the CPU")
                os.environ[runs.ENV_EVAL_DEVICE] = "cpu"
                try:
                    book.execute_notebooks(scale, repo_root=REPO_ROOT, results_dir=results, only=[src.stem])
                except book.NotebookExecutionError as e2:
                    failed.append(src.stem)
                    _say(f"{src.stem} failed: {e2}")
                finally:
                    os.environ.pop(runs.ENV_EVAL_DEVICE, None)
            else:
                failed.append(src.stem)
                _say(f"{src.stem} failed: {e}")
        clock.add(f"chapter {src.stem}", time.perf_counter() - t)

    # 6. pack
    t = time.perf_counter()
    offline_record = {"bundle": {k: record.get(k) for k in ("created", "commit", "python")}, "device": device,
                      "split_s": clock.split, "models": models, "failed": failed, "finished": _now()}
    write_json_atomic(results / OFFLINE_RECORD, offline_record)
    pack = pack_results(results, out, scale=scale, extra={"split_s": clock.split, "failed": failed})
    check_pack_limits(out)
    clock.add(f"packing ({len(pack['parts'])} parts, {pack['bytes_packed'] / MiB:.1f} MiB)", time.perf_counter() - t)
    total = clock.total()
    _say("time split: " + " | ".join(f"{k} {v:.1f} s" for k, v in clock.split.items()) + f" | total {total:.1f} s")
    offline_record["total_s"] = total
    write_json_atomic(out / PACK_FILE, {**read_json(out / PACK_FILE), "total_s": total})
    shutil.rmtree(work, ignore_errors=True)
    if failed:
        _say(f"failed chapters: {', '.join(failed)} (their failed copies are in the pack)")
        return 1
    _say(f"done in {total:.0f} s: bring {out} back and run `make book-stored SCALE={scale} FROM={out}`")
    return 0


# ======================================================================================================================
# Command line: python -m reflow_core offline {build,host,unpack,probe}
# ======================================================================================================================


def add_offline_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub = parser.add_subparsers(dest="offline_command", required=True)
    p = sub.add_parser("build", help="write the bundle (wheels, corpus shards, run.sh) for a scale")
    p.add_argument("--scale", choices=SCALE_NAMES, default="small")
    p.add_argument("--out", default=str(REPO_ROOT / "offline"), help="bundle folder (default: offline/)")
    p.add_argument("--python", default=None,
                   help="the interpreter of the host's Python version, to resolve wheels with (default: this one)")
    p.add_argument("--local", dest="portable", action="store_false",
                   help="wheels for this machine only (no manylinux pinning): a rehearsal")
    p.add_argument("--max-mib", type=float, default=MAX_BUNDLE_BYTES / MiB)
    p = sub.add_parser("host", help="the job on the GPU host (what offline/run.sh runs)")
    p.add_argument("--bundle", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--scale", choices=SCALE_NAMES, default=None, help="default: the bundle's")
    p.add_argument("--allow-cpu", action="store_true", help="go on without CUDA (the CPU rehearsal)")
    p.add_argument("--only", nargs="+", metavar="CHAPTER", help="execute only these chapters (a rehearsal)")
    p.add_argument("--families", nargs="+", metavar="FAMILY",
                   help="train only these up front (default: every family of the scale; a rehearsal)")
    p = sub.add_parser("unpack", help="restore results/<scale> from a host job's files (and build the book)")
    p.add_argument("src", help="the folder the host job wrote (OUT_DIR)")
    p.add_argument("--build", action="store_true", help="then promote the figures and build the HTML")
    p.add_argument("--no-strict", dest="strict", action="store_false")
    sub.add_parser("probe", help="print the device probe as JSON")
    return parser


def run_offline_cli(args: argparse.Namespace) -> int:
    if args.offline_command == "build":
        build_bundle(args.out, scale=args.scale, python=args.python, portable=args.portable,
                     max_bytes=int(args.max_mib * MiB))
        return 0
    if args.offline_command == "host":
        return host_job(args.bundle, args.out, scale=args.scale, allow_cpu=args.allow_cpu, only=args.only,
                        families=args.families)
    if args.offline_command == "unpack":
        if args.build:
            unpack_and_build(args.src, strict=args.strict)
        else:
            unpack_results(args.src)
        return 0
    print(json.dumps(probe()), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_offline_arguments(argparse.ArgumentParser(prog="python -m reflow_core.offline"))
    args = parser.parse_args(argv)
    return run_command(lambda: run_offline_cli(args))  # a user error: one line, exit 2; the job's own code else


if __name__ == "__main__":
    raise SystemExit(main())
