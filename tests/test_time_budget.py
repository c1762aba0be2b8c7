"""Time-budgeted training (TrainConfig.time_budget_s): steps sized from the throughput of the first steps, a cosine
over the steps the run really takes, a plan kept by the checkpoint (exact resume), runs.ensure_model accepting such a
run, and the fused loss's chunk calibration (the code path a CUDA run takes, exercised on the CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from reflow_core import checkpoint as ckpt_io
from reflow_core import fused_loss, runs, scales
from reflow_core.config import ConfigError, TrainConfig
from reflow_core.train import ENV_KILL_AT_STEP, ENV_PROGRESS, PLAN_AFTER_STEPS, lr_at, plan_steps, train

REPO = Path(__file__).resolve().parent.parent


def budget_config(data: Path, out: Path, **changes) -> TrainConfig:
    """reflow@test on the tiny corpus, warmup as long as the planning window (so the steps before the plan follow
    the same schedule whatever the plan), a cap far beyond what the budget allows."""
    base = dict(model="reflow@test", data_dir=str(data), out_dir=str(out), max_steps=100_000, micro_batch_size=2,
                block_size=32, lr=3e-3, min_lr=3e-4, warmup_steps=PLAN_AFTER_STEPS, eval_interval=0, eval_batches=2,
                ckpt_interval=0, log_interval=1, threads=1, progress=False, time_budget_s=8.0, save_init=False)
    return TrainConfig(**{**base, **changes})


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_the_plan_fills_what_is_left_and_respects_the_cap():
    kw = dict(step=20, step_s=0.1, elapsed_s=2.0, budget_s=12.0, max_steps=10_000, eval_s=0.0, eval_interval=0,
              ckpt_s=0.0, ckpt_interval=0)
    assert plan_steps(**kw) == 20 + 97  # 97% of the 10 s left, 0.1 s a step
    assert plan_steps(**{**kw, "max_steps": 50}) == 50
    assert plan_steps(**{**kw, "elapsed_s": 30.0}) == 20  # budget already spent: stop where it is
    # an evaluation of 1 s every 10 steps and a final one + checkpoint of 1 s each: fewer steps
    assert plan_steps(**{**kw, "eval_s": 1.0, "eval_interval": 10, "ckpt_s": 1.0}) == 20 + int((9.7 - 2.0) / 0.2)


def test_time_budget_is_validated():
    with pytest.raises(ConfigError, match="time_budget_s"):
        TrainConfig(model="reflow@test", time_budget_s=0)
    with pytest.raises(ConfigError, match="time_budget_s"):
        TrainConfig(model="reflow@test", time_budget_s=float("inf"))
    assert TrainConfig(model="reflow@test", time_budget_s=5).time_budget_s == 5.0


def test_a_budgeted_run_ends_on_time_with_its_cosine_over_the_planned_steps(tiny_data, tmp_path):
    config = budget_config(tiny_data, tmp_path / "run")
    t0 = time.perf_counter()
    summary = train(config)
    wall = time.perf_counter() - t0
    planned = summary["max_steps"]
    assert summary["plan"]["at_step"] == PLAN_AFTER_STEPS and summary["plan"]["tokens_per_s"] > 0
    assert PLAN_AFTER_STEPS < planned < config.max_steps and summary["steps"] == planned
    # ends on budget (the machine is shared: generous bounds, but a cut or a run that ignores the budget fails)
    assert 0.5 * config.time_budget_s < wall < 1.5 * config.time_budget_s + 1.0, wall
    rows = metrics(config.out_dir)
    assert rows[-1]["step"] == planned
    planned_config = config.replace(max_steps=planned, time_budget_s=None)
    for r in rows:  # the cosine decays over the planned steps and reaches min_lr at the end
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, planned_config), rel=1e-12)
    assert rows[-1]["lr"] == pytest.approx(config.min_lr, rel=0.05)
    meta = ckpt_io.read_meta(config.out_dir)
    assert meta["train_config"]["max_steps"] == planned and meta["extra"]["plan"]["max_steps"] == planned
    assert meta["extra"]["loss_chunk"] == fused_loss.DEFAULT_CHUNK["cpu"]
    # the same run with max_steps fixed to the plan follows the very same trajectory
    fixed = train(planned_config.replace(out_dir=str(tmp_path / "fixed")))
    assert fixed["final_train_loss"] == summary["final_train_loss"]
    assert [r["train_loss"] for r in metrics(tmp_path / "fixed")] == [r["train_loss"] for r in rows]
    # a rerun keeps the plan: nothing left to train, no second plan
    again = train(config)
    assert again["steps"] == planned and again["steps_this_run"] == 0 and again["plan"] == summary["plan"]


def test_a_killed_budgeted_run_resumes_on_its_plan(tiny_data, tmp_path):
    """Killed after its plan (checkpoint every 25 steps, SIGKILL at step 30), the resumed run ends at the planned
    step on the trajectory of an uninterrupted run of that many steps."""
    config = budget_config(tiny_data, tmp_path / "killed", ckpt_interval=25, time_budget_s=10.0)
    env = {**os.environ, ENV_KILL_AT_STEP: "30", ENV_PROGRESS: "lines"}
    proc = subprocess.run([sys.executable, "-m", "reflow_core", "train", "--config",
                           str(config.to_json(tmp_path / "killed.json"))], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert "time budget 10 s" in proc.stdout
    meta = ckpt_io.read_meta(config.out_dir)
    planned = meta["extra"]["plan"]["max_steps"]
    assert meta["step"] == 25 and meta["train_config"]["max_steps"] == planned
    if planned <= 30:
        pytest.skip(f"the shared machine was so slow that the plan ({planned} steps) ended before the kill")
    summary = train(config)
    assert summary["resumed_from"] == 25 and summary["steps"] == planned and summary["plan"] == meta["extra"]["plan"]
    reference = train(config.replace(out_dir=str(tmp_path / "reference"), max_steps=planned, time_budget_s=None,
                                     ckpt_interval=0))
    assert summary["final_train_loss"] == pytest.approx(reference["final_train_loss"], rel=1e-6, abs=0)


def test_ensure_model_accepts_a_finished_budgeted_run(tmp_path):
    budgeted = TrainConfig(model="reflow@test", max_steps=1000, time_budget_s=60.0)
    plan = {"max_steps": 340}
    assert runs.finished({"steps": 340, "max_steps": 340, "plan": plan}, budgeted)
    assert not runs.finished({"steps": 200, "max_steps": 340, "plan": plan}, budgeted)  # cut short
    assert not runs.finished({"steps": 340, "max_steps": 340, "plan": None}, budgeted)  # not a budgeted run
    assert not runs.finished({"steps": 1200, "max_steps": 1200, "plan": {"max_steps": 1200}}, budgeted)  # above cap
    fixed = TrainConfig(model="reflow@test", max_steps=1000)
    assert runs.finished({"steps": 1000}, fixed) and not runs.finished({"steps": 340, "max_steps": 340}, fixed)


def test_every_other_run_trains_the_reference_runs_steps(tmp_path, monkeypatch):
    """Under a time budget only reFlow's first seed plans; the others take its steps (one token budget)."""
    calls = []

    def fake_ensure(scale, family, results_dir=None, seed=None, nproc=None):
        calls.append((family, seed))
        return {"steps": 345}

    monkeypatch.setattr(runs, "ensure_model", fake_ensure)
    reference = runs.run_config("small", "reflow", tmp_path)
    assert reference.time_budget_s == scales.SCALES["small"].train["time_budget_s"] and not calls
    other = runs.run_config("small", "gpt2-new", tmp_path)
    assert (other.max_steps, other.time_budget_s) == (345, None) and calls == [("reflow", None)]
    assert runs.run_config("test", "gpt2-new", tmp_path).max_steps == scales.SCALES["test"].train["max_steps"]


def test_chunk_calibration_and_override_on_cpu():
    x = torch.randn(64, 16, requires_grad=True)
    w = torch.randn(100, 16, requires_grad=True)
    t = torch.randint(0, 100, (64,))
    best, timings = fused_loss.calibrate_chunk(torch.device("cpu"), 16, 100, 64, torch.float32,
                                               candidates=(8, 16, 32, 128), repeats=1)
    assert set(timings) == {8, 16, 32, 64} and best in timings  # 128 is capped at the 64 positions there are
    assert fused_loss.default_chunk("cpu") == fused_loss.DEFAULT_CHUNK["cpu"]
    with fused_loss.chunk_for("cpu", 8):
        assert fused_loss.default_chunk("cpu") == 8
        loss = fused_loss.linear_cross_entropy(x, w, t)
    assert fused_loss.default_chunk("cpu") == fused_loss.DEFAULT_CHUNK["cpu"]
    torch.testing.assert_close(loss, F.cross_entropy(x @ w.t(), t))


def test_small_and_medium_are_sized_by_time():
    from reflow_core.config import get_config
    from reflow_core.model import build_model

    small, medium = scales.get_scale("small"), scales.get_scale("medium")
    assert scales.SCALE_NAMES.index("small") < scales.SCALE_NAMES.index("medium") < scales.SCALE_NAMES.index("paper")
    for spec in (small, medium):
        config = scales.train_config(spec.name, "reflow")
        assert config.time_budget_s and config.warmup_steps >= PLAN_AFTER_STEPS and spec.device == "auto"
        assert spec.data_source == "small-mix" and spec.size == "small"
    # the paper's reFlow-1-Small shape: 6 layers, d = S = 512, ≈ 46M parameters
    model = build_model(get_config("reflow@small"), "meta")
    assert (model.config.n_layer, model.config.d_model, model.config.n_signals) == (6, 512, 512)
    assert 45e6 < model.num_params() < 48e6
    assert scales.trained_families("small") == ("reflow", "gpt2-new", "reflow-topk") and small.seeds == (1337,)
    assert scales.chapter_families("small", "training", ("reflow", "gpt2-new", "gpt2")) == ("reflow", "gpt2-new")
    assert scales.chapter_families("small", "sparsity_variants") == ("reflow", "reflow-topk")
    assert set(scales.trained_families("medium")) == {"reflow", "gpt2-new", "reflow-topk", "gpt2", "reflow-rmg",
                                                      "reflow-routed"} and len(medium.seeds) == 3
    assert scales.trained_families("test") == scales.trained_families("medium")


def test_parallel_runs_share_the_cores_and_a_lone_last_run_takes_them_all():
    # smoke on 2 cores: three runs, two at a time -> the pair on a core each, the third alone on both
    assert [runs.run_threads(i, 3, 2, 2) for i in range(3)] == [1, 1, 2]
    assert [runs.run_threads(i, 4, 2, 2) for i in range(4)] == [1, 1, 1, 1]
    assert [runs.run_threads(i, 5, 2, 16) for i in range(5)] == [8, 8, 8, 8, 16]
    assert runs.run_threads(0, 1, 1, 2) == 2


def test_the_scales_device_and_its_override(monkeypatch):
    monkeypatch.delenv(runs.ENV_EVAL_DEVICE, raising=False)
    assert runs.eval_device("small") == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv(runs.ENV_EVAL_DEVICE, "cpu")
    assert runs.eval_device("small") == "cpu"
