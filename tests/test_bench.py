"""Bench: the reference loop computes the same loss as ours; the CLI writes valid JSON with the documented fields;
the Cost chapter runs at scale test (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


from reflow_core.bench import (TRAINING_ENTRY, auto_threads, chapter_times, format_table, run_bench,
                               stored_gpu_results)
from reflow_core.cli import main
from reflow_core.config import get_config
from reflow_core.model import build_model
from reflow_core.scales import trained_families
from reflow_core.reference_loop import ReferenceLoop, reference_forward
from reflow_core.config import TrainConfig
from reflow_core.train import make_optimizer

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("preset", ["reflow@test", "gpt2-new@test", "gpt2@test", "reflow-topk@test",
                                    "reflow@smoke"])  # smoke: a compact vocabulary, the loss over GPT-2 ids
def test_reference_forward_gives_our_loss(preset):
    torch.manual_seed(0)
    model = build_model(get_config(preset)).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(50257, (3, 40), generator=gen)
    y = torch.randint(50257, (3, 40), generator=gen)
    logits, loss = model(x, y)
    ref_logits, ref_loss = reference_forward(model, x, y)
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * max(1.0, loss.item())
    # a compact vocabulary's reference logits are over rows; ours over GPT-2 ids, the tail ids sharing the tail row
    torch.testing.assert_close(model.vocab.expand(ref_logits), logits, atol=1e-5, rtol=1e-4)


def test_gqa_reference_matches():
    torch.manual_seed(0)
    model = build_model(get_config("reflow@test", n_head=4, n_kv_head=2)).eval()
    x = torch.randint(50257, (2, 17))
    assert abs(model(x, x)[1].item() - reference_forward(model, x, x)[1].item()) < 1e-5


def test_one_step_of_each_loop_lands_on_the_same_weights():
    """Same start, same batch: our step (fused AdamW) and the reference step (single-tensor AdamW) agree."""
    torch.manual_seed(0)
    ours = build_model(get_config("reflow@test"))
    ref = build_model(get_config("reflow@test"))
    ref.load_state_dict(ours.state_dict())
    x = torch.randint(50257, (2, 32))
    y = torch.randint(50257, (2, 32))
    opt = make_optimizer(ours, TrainConfig(model="reflow@test", lr=1e-3, fused=True), "cpu")
    _, loss = ours(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0)
    opt.step()
    ref_loss = ReferenceLoop(ref, lr=1e-3).step(x, y)
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        # Adam's first update is about lr·sign(g): a gradient near 0 may flip it; 1e-5 is 1% of one update (lr 1e-3)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0.0)


def _check_result(result: dict, mode: str, n_rows: int, n_ratios: int) -> None:
    assert result["schema_version"] == 1 and result["mode"] == mode
    for key in ("cpu", "cpu_count", "torch_threads", "torch", "device", "gpu", "load_average"):
        assert key in result["machine"]
    for key in ("steps", "warmup", "repeats", "batch", "block", "dtype", "threads"):
        assert key in result["settings"]
    assert len(result["rows"]) == n_rows and len(result["ratios"]) == n_ratios
    for row in result["rows"]:
        t = row["tokens_per_s"]
        assert 0 < t["min"] <= t["median"] <= t["max"]
        assert len(t["samples"]) == result["settings"]["repeats"]
        assert row["flops_per_token"] > 0 and row["peak_memory_bytes"] > 0
        assert row["mfu"] is None or 0 < row["mfu"] < 1
        assert row["peak_memory_kind"] in ("process_rss_peak", "cuda_max_allocated")
    for ratio in result["ratios"]:
        assert ratio["min"] <= ratio["median"] <= ratio["max"]


def test_bench_cli_writes_valid_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--preset", "reflow@test", "--steps", "2", "--warmup", "1", "--repeats", "2",
               "--batch", "2", "--block", "16", "--threads", "1", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    _check_result(result, "train", 1, 0)
    assert "tok/s median" in capsys.readouterr().out


@pytest.mark.parametrize("mode,rows,ratios", [("side-by-side", 2, 1), ("factorisation", 2, 1), ("infer", 1, 0),
                                             ("all", 3, 2)])
def test_bench_modes(mode, rows, ratios, monkeypatch):
    monkeypatch.setenv("REFLOW_PEAK_FLOPS", "1e15")
    result = run_bench("reflow@test", mode, steps=2, warmup=1, repeats=2, batch=2, block=16, threads=1)
    _check_result(result, mode, rows, ratios)
    assert all(r["mfu"] is not None for r in result["rows"])
    json.dumps(result)  # JSON-ready
    assert f"bench {mode}" in format_table(result)
    if mode in ("factorisation", "all"):
        assert result["rows"][-1]["preset"] == "gpt2-new@test"


def test_auto_threads_is_within_the_cores():
    import os

    assert 1 <= auto_threads() <= (os.cpu_count() or 1)


def test_chapter_times_and_gpu_assets(tmp_path):
    assert chapter_times(tmp_path) is None
    (tmp_path / "RUN.json").write_text(json.dumps(
        {"scale": "test", "notebooks": {"01_architecture": {"status": "ok", "seconds": 3.0},
                                        "02_training": {"status": "ok", "seconds": 7.5}}, "total_seconds": 10.5}))
    times = chapter_times(tmp_path)
    assert times["chapters"] == {"01_architecture": 3.0, "02_training": 7.5} and times["total_seconds"] == 10.5
    # models trained before the chapters count as one more entry of the split and of the total
    (tmp_path / "RUN.json").write_text(json.dumps(
        {"scale": "test", "notebooks": {"02_training": {"status": "ok", "seconds": 7.5}}, "total_seconds": 7.5,
         "training": {"reflow-seed1337": 20.0}, "training_seconds": 20.5}))
    times = chapter_times(tmp_path)
    assert times["chapters"] == {TRAINING_ENTRY: 20.5, "02_training": 7.5} and times["total_seconds"] == 28.0
    assert stored_gpu_results(tmp_path / "none") == []


def test_bench_recipe_mode_compares_the_compact_recipe_with_the_full_vocabulary():
    result = run_bench("reflow@smoke", "recipe", steps=1, warmup=1, repeats=2, batch=2, block=16, threads=1)
    _check_result(result, "recipe", 2, 1)
    full, compact = result["rows"]
    assert full["preset"] == "reflow@smoke-full" and compact["preset"] == "reflow@smoke"
    assert compact["flops_per_token"] < full["flops_per_token"] / 2  # the head is most of a step at this width


def test_cost_chapter_stores_bench_and_chapter_times(real_book):
    from reflow_core.results import load_result

    _, results = real_book
    assert (results / "notebooks" / "10_cost.ipynb").is_file()
    assert (results / "figures" / "fig-cost-throughput.png").exists()
    cost = load_result(results, "cost")
    assert cost["scale"] == "test" and len(cost["bench"]) == 2
    # it runs after the other chapters, so the book runner's record of their wall times is complete
    assert cost["chapter_times"] and "02_training" in cost["chapter_times"]["chapters"]
    # the book trained every model before the chapters (reflow_core.runs.train_all), and its record says so
    run = json.loads((results / "RUN.json").read_text())
    assert set(run["training"]) == {f"{f}-seed1337" for f in trained_families("test")}
    assert TRAINING_ENTRY in cost["chapter_times"]["chapters"]
    # the sweep that chose the smoke recipe is drawn at every scale
    assert cost["sweep"]["best"]["lr"] > 0 and (results / "figures" / "fig-cost-sweep.png").exists()


def test_cost_chapter_bench_verdicts():
    from reflow_core.chapters.cost import bench_verdict

    assert bench_verdict({"median": 1.4, "min": 0.9, "max": 1.6}, 1.3).startswith("meets")
    assert bench_verdict({"median": 1.2, "min": 1.1, "max": 1.25}, 1.3).startswith("faster in every repeat")
    assert bench_verdict({"median": 0.8, "min": 0.7, "max": 0.9}, 1.0).startswith("slower in every repeat")
    assert bench_verdict({"median": 0.98, "min": 0.9, "max": 1.1}, 1.0).startswith("within this machine's noise")
