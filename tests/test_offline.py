"""The offline bundle's pieces without a network or a GPU: corpus shards round trip (checked against the manifest),
packing within the limits and unpacking only what verifies, the wheel plan, the wheel install and the kernelspec."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from reflow_core import data, offline


# ---------------------------------------------------------------------------------------------------------------------
# Corpus shards


def test_corpus_shards_round_trip(tiny_data, tmp_path):
    record = offline.write_corpus_shards(tiny_data, tmp_path / "bundle" / "corpus", shard_tokens=700, preset=1)
    train_shards = [s for s in record["shards"] if s["split"] == "train"]
    assert len(train_shards) > 1 and all(s["tokens"] <= 700 for s in record["shards"])
    assert record["tokens"]["train"] == sum(s["tokens"] for s in train_shards)
    out = offline.unpack_corpus(tmp_path / "bundle" / "corpus", record, tmp_path / "data" / "tiny")
    for split in data.SPLITS:
        np.testing.assert_array_equal(data.load_tokens(out, split, verify_hash=True),
                                      data.load_tokens(tiny_data, split, verify_hash=True))
    assert json.loads((out / data.MANIFEST_NAME).read_text()) == json.loads((tiny_data / "manifest.json").read_text())
    # a second unpack keeps the verified dataset (nothing rewritten)
    mtime = (out / "train.bin").stat().st_mtime_ns
    offline.unpack_corpus(tmp_path / "bundle" / "corpus", record, out)
    assert (out / "train.bin").stat().st_mtime_ns == mtime


def test_an_altered_shard_or_manifest_is_refused(tiny_data, tmp_path):
    corpus = tmp_path / "corpus"
    record = offline.write_corpus_shards(tiny_data, corpus, shard_tokens=700, preset=1)
    shard = corpus / record["shards"][0]["file"]
    good = shard.read_bytes()
    shard.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(offline.OfflineError, match="sha256"):
        offline.unpack_corpus(corpus, record, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    shard.write_bytes(good)
    manifest = json.loads((corpus / "manifest.json").read_text())
    manifest["splits"]["train"]["sha256"] = "0" * 64  # the tokens no longer match what the manifest says
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(data.DatasetIntegrityError):
        offline.unpack_corpus(corpus, record, tmp_path / "b")
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Packing and unpacking


def fake_results(root: Path, scale: str = "small", noise_bytes: int = 50_000) -> Path:
    results = root / "results" / scale
    rng = np.random.default_rng(0)
    for rel, content in {
        "RUN.json": json.dumps({"scale": scale, "notebooks": {}}).encode(),
        "notebooks/01_architecture.ipynb": b'{"cells": []}',
        "figures/fig-training-loss-curves.png": rng.bytes(noise_bytes),  # incompressible, like a PNG
        "data/training.json": b"{}",
        "checkpoints/reflow-seed1337/summary.json": b'{"steps": 5}',
        "checkpoints/reflow-seed1337/metrics.jsonl": b'{"step": 1}\n',
        "checkpoints/reflow-seed1337/ckpt/model.safetensors": rng.bytes(20_000),
        "checkpoints/reflow-seed1337/snapshots/step-000005/model.safetensors": rng.bytes(1000),
        "activations/blocks.3.resid_post-train.npy": rng.bytes(1000),
    }.items():
        (results / rel).parent.mkdir(parents=True, exist_ok=True)
        (results / rel).write_bytes(content)
    return results


PACKED = ["RUN.json", "checkpoints/reflow-seed1337/metrics.jsonl", "checkpoints/reflow-seed1337/summary.json",
          "data/training.json", "figures/fig-training-loss-curves.png", "notebooks/01_architecture.ipynb"]


def tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_pack_keeps_results_and_drops_weights_within_the_limits(tmp_path):
    results = fake_results(tmp_path / "host")
    assert [p.as_posix() for p in offline.results_files(results)] == PACKED
    record = offline.pack_results(results, tmp_path / "out", scale="small", part_bytes=20_000, max_files=8)
    parts = sorted((tmp_path / "out").glob("results-small.tar.xz.*"))
    assert len(parts) == len(record["parts"]) == 3 and all(p.stat().st_size <= 20_000 for p in parts)
    assert offline.check_pack_limits(tmp_path / "out", part_bytes=20_000) == sorted([*parts,
                                                                                     tmp_path / "out" / "PACK.json"])
    (tmp_path / "out" / "run.log").write_text("the log does not count\n")
    offline.check_pack_limits(tmp_path / "out", part_bytes=20_000)

    here = tmp_path / "here"
    scale, restored = offline.unpack_results(tmp_path / "out", repo_root=here)
    assert scale == "small" and restored == here / "results" / "small"
    want = tree(results)
    assert tree(restored) == {k: want[k] for k in PACKED}


def test_too_many_parts_is_refused_naming_the_largest_files(tmp_path):
    results = fake_results(tmp_path / "host", noise_bytes=200_000)
    with pytest.raises(offline.OfflineError, match=r"exceed 8 files.*fig-training-loss-curves.png"):
        offline.pack_results(results, tmp_path / "out", scale="small", part_bytes=20_000, max_files=8)
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "x").write_bytes(b"0" * 30)
    with pytest.raises(offline.OfflineError, match="over"):
        offline.check_pack_limits(tmp_path / "big", part_bytes=20)
    for i in range(9):
        (tmp_path / "big" / f"f{i}").write_bytes(b"")
    with pytest.raises(offline.OfflineError, match="at most 8"):
        offline.check_pack_limits(tmp_path / "big")


def test_a_pack_that_does_not_verify_changes_nothing(tmp_path):
    offline.pack_results(fake_results(tmp_path / "host"), tmp_path / "out", scale="small", part_bytes=20_000)
    here = tmp_path / "here"
    old = here / "results" / "small" / "RUN.json"
    old.parent.mkdir(parents=True)
    old.write_text("earlier results")
    part = tmp_path / "out" / "results-small.tar.xz.002"
    blob = bytearray(part.read_bytes())
    blob[100] ^= 0xFF
    part.write_bytes(bytes(blob))
    with pytest.raises(offline.OfflineError, match="altered"):
        offline.unpack_results(tmp_path / "out", repo_root=here)
    assert old.read_text() == "earlier results"
    part.unlink()
    with pytest.raises(offline.OfflineError, match="missing"):
        offline.unpack_results(tmp_path / "out", repo_root=here)
    with pytest.raises(offline.OfflineError, match="PACK.json"):
        offline.unpack_results(tmp_path / "nothing-here", repo_root=here)


# ---------------------------------------------------------------------------------------------------------------------
# Wheels and the kernel


def test_the_wheel_plan_subtracts_the_image_and_the_optional_packages(monkeypatch):
    resolved = {
        offline.KERNEL_REQUIREMENTS: {"papermill": "2.7.0", "aiohttp": "3.9", "requests": "2.3", "ipykernel": "7.0",
                                      "debugpy": "1.8", "jedi": "0.19", "pyzmq": "27", "attrs": "25"},
        offline.IMAGE_PACKAGES: {"torch": "2.13.0", "aiohttp": "3.9", "requests": "2.3", "attrs": "25"},
    }
    monkeypatch.setattr(offline, "resolve", lambda python, reqs, info, portable=True: resolved[tuple(reqs)])
    monkeypatch.setattr(offline, "local_version", lambda name: {"myst-nb": "1.4.0"}.get(name))
    plan, left_out = offline.wheel_plan("python3", {})
    assert plan == {"docutils": "", "ipykernel": "7.0", "myst-nb": "1.4.0", "papermill": "2.7.0", "pyzmq": "27"}
    assert set(left_out) == {"aiohttp", "requests", "attrs", "debugpy", "jedi"}
    assert left_out["aiohttp"] == "the image has it"


def make_wheel(path: Path, name: str = "reflow_offline_demo", version: str = "0.1") -> Path:
    wheel = path / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": "ANSWER = 42\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        for name_, text in files.items():
            z.writestr(name_, text)
    return wheel


@pytest.mark.parametrize("with_pip", [True, False])
def test_install_wheels_with_pip_or_as_zip_files(tmp_path, with_pip, monkeypatch):
    bundle = tmp_path / "bundle"
    (bundle / "wheels").mkdir(parents=True)
    wheel = make_wheel(bundle / "wheels")
    record = {"wheels": [{"file": wheel.name, "sha256": offline.sha256_file(wheel)}]}
    python = sys.executable
    if not with_pip:  # an interpreter whose `-m pip` fails, as on an image without pip
        fake = tmp_path / "python"
        fake.write_text(f'#!/bin/sh\n[ "$1 $2" = "-m pip" ] && exit 1\nexec {sys.executable} "$@"\n')
        fake.chmod(0o755)
        python = str(fake)
    offline.install_wheels(bundle, record, tmp_path / "site", python=python)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-c", "import reflow_offline_demo as m; print(m.ANSWER)"], env=env,
                         capture_output=True, text=True)
    assert out.stdout.strip() == "42", out.stderr
    wheel.write_bytes(wheel.read_bytes() + b"x")
    with pytest.raises(offline.OfflineError, match="altered"):
        offline.install_wheels(bundle, record, tmp_path / "site2", python=python)


def test_the_kernelspec_runs_this_interpreter_from_the_work_folder(tmp_path):
    env = offline.kernel_environment(tmp_path, tmp_path / "site")
    spec = json.loads((tmp_path / "jupyter" / "kernels" / "python3" / "kernel.json").read_text())
    assert spec["argv"][:3] == [sys.executable, "-m", "ipykernel_launcher"]
    assert env["JUPYTER_PATH"] == str(tmp_path / "jupyter")
    assert env["PYTHONPATH"].split(os.pathsep)[:2] == [str(offline.REPO_ROOT), str(tmp_path / "site")]
    for key in ("JUPYTER_DATA_DIR", "JUPYTER_CONFIG_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "MPLCONFIGDIR"):
        assert Path(env[key]).is_dir() and Path(env[key]).is_relative_to(tmp_path)


def test_the_bundle_script_is_a_thin_shell_around_the_host_job():
    assert "reflow_core.offline host" in offline.RUN_SH and "PIP_NO_INDEX=1" in offline.RUN_SH
    proc = subprocess.run(["bash", "-n"], input=offline.RUN_SH, text=True, capture_output=True)
    assert proc.returncode == 0, proc.stderr
