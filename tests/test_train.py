"""Trainer: config validation, a short run that learns, exact resume after a real kill, NaN stop, DDP equivalence
(2 gloo processes under torchrun vs 1 process on the same global batch) and launch() failure reporting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reflow_core import checkpoint as ckpt_io
from reflow_core.errors import ERROR_PREFIX
from reflow_core.cli import main
from reflow_core.config import ConfigError
from reflow_core.model import GPT, build_model
from reflow_core.config import TrainConfig
from reflow_core.divergence import TrainingDiverged
from reflow_core.train import ENV_KILL_AT_STEP, ENV_PROGRESS, lr_at, make_optimizer, train

REPO = Path(__file__).resolve().parent.parent


def tiny_config(data: Path, out: Path, **changes) -> TrainConfig:
    """reflow@test (1.7M params, mostly vocabulary) on a few KB: a step takes ~0.1 s on one thread."""
    base = dict(model="reflow@test", data_dir=str(data), out_dir=str(out), max_steps=6, micro_batch_size=4,
                lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_interval=0, eval_batches=2, ckpt_interval=0,
                log_interval=1, threads=1, progress=False)
    return TrainConfig(**{**base, **changes})


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------------
# Configuration


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match="learning_rate"):
        TrainConfig.from_dict({"model": "reflow@test", "learning_rate": 1e-3})


@pytest.mark.parametrize("field, value", [
    ("lr", 0.0), ("lr", -1e-3), ("lr", float("nan")), ("max_steps", 0), ("max_steps", "ten"), ("max_steps", 2.5),
    ("micro_batch_size", True), ("beta2", 1.0), ("grad_clip", -1.0), ("device", "tpu"), ("dtype", "float16"),
    ("resume", "maybe"), ("block_size", 100_000), ("model", "nope@test"), ("progress", "yes"), ("threads", 0),
    ("model_overrides", {"n_layers": 3}),
])
def test_bad_value_is_named(field, value):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        TrainConfig(**{"model": "reflow@test", field: value})


def test_warmup_longer_than_run_is_named():
    with pytest.raises(ConfigError, match="'warmup_steps'"):
        TrainConfig(model="reflow@test", max_steps=10, warmup_steps=11)


def test_tokens_per_step_must_divide():
    with pytest.raises(ConfigError, match="'tokens_per_step'"):
        TrainConfig(model="reflow@test", micro_batch_size=4, tokens_per_step=1000)
    config = TrainConfig(model="reflow@test", micro_batch_size=4, tokens_per_step=4 * 64 * 6)
    assert config.grad_accum_steps(1) == 6 and config.grad_accum_steps(2) == 3
    with pytest.raises(ConfigError, match="'tokens_per_step'"):
        config.validate(world_size=4)  # 6 micro-batches do not split over 4 ranks
    assert TrainConfig(model="reflow@test", micro_batch_size=4).grad_accum_steps(2) == 1  # None: one per rank


def test_int_is_accepted_for_float_fields_and_json_round_trip(tmp_path):
    config = TrainConfig.from_dict({"model": "reflow@test", "lr": 1, "min_lr": 0})
    assert isinstance(config.lr, float) and config.lr == 1.0
    assert TrainConfig.from_json(config.to_json(tmp_path / "c.json")) == config


def test_cli_set_overrides_are_parsed_with_field_types():
    config = TrainConfig(model="reflow@test").with_overrides(
        ["lr=3e-4", "max_steps=7", "warmup_steps=0", "block_size=none", "progress=false", "compile=1",
         "model_overrides.dropout=0.1", 'model_overrides={"dropout": 0.2, "n_layer": 1}'])
    assert (config.lr, config.max_steps, config.block_size, config.progress, config.compile) == (3e-4, 7, None, False,
                                                                                                 True)
    assert config.model_overrides == {"dropout": 0.2, "n_layer": 1} and config.model_config().n_layer == 1
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig(model="reflow@test").with_overrides(["lr=fast"])
    with pytest.raises(ConfigError, match="learning_rate"):
        TrainConfig(model="reflow@test").with_overrides(["learning_rate=1"])


def test_cli_reports_a_bad_field_without_traceback(capsys, tmp_path):
    code = main(["train", "--preset", "reflow@test", "--out-dir", str(tmp_path), "--set", "lr=-1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(ERROR_PREFIX) and "'lr'" in err and "Traceback" not in err


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    config = TrainConfig(model="reflow@test", max_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    lrs = [lr_at(s, config) for s in range(100)]
    assert lrs[0] < lrs[5] < lrs[9] <= config.lr
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine: monotone down
    assert lrs[10] == pytest.approx(config.lr) and lrs[-1] == pytest.approx(config.min_lr, rel=1e-2)
    assert lr_at(150, config) == config.min_lr


def test_weight_decay_only_on_2d_weights():
    model = build_model(TrainConfig(model="gpt2@test").model_config())
    optimizer = make_optimizer(model, TrainConfig(model="gpt2@test", weight_decay=0.1), "cpu")
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    norms = {id(p) for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm))
             for p in m.parameters()}
    assert {id(p) for p in no_decay["params"]} == norms and norms
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == model.num_params()


# ---------------------------------------------------------------------------------------------------------------------
# Training


def test_short_run_lowers_the_loss_and_writes_metrics(tiny_data, tmp_path):
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    summary = train(tiny_config(tiny_data, out, max_steps=16, lr=6e-3, log_interval=4, eval_interval=8,
                                ckpt_interval=8))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [4, 8, 12, 16]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 1.0
    assert rows[1]["val_loss"] is not None and rows[-1]["val_loss"] < rows[1]["val_loss"]
    assert rows[0]["val_loss"] is None and rows[-1]["tokens"] == 16 * 4 * 64
    assert rows[-1]["mfu"] is None  # CPU: no peak FLOP/s known unless REFLOW_PEAK_FLOPS is set
    assert summary["final_val_loss"] == rows[-1]["val_loss"] and summary["tokens_per_s"] > 0
    assert summary["steps"] == 16 and Path(summary["checkpoint"]) == out / "ckpt"
    assert json.loads((out / "summary.json").read_text())["final_train_loss"] == summary["final_train_loss"]
    model, meta = ckpt_io.load_model(out)
    assert meta["step"] == 16 and meta["extra"]["val_loss"] == summary["final_val_loss"]
    assert isinstance(model, GPT) and not model.training
    init, init_meta = ckpt_io.load_model(out / "init")  # the step-0 weights, rebuildable from (preset, seed) alone
    torch.manual_seed(1337)
    rebuilt = build_model(TrainConfig(model="reflow@test").model_config())
    assert init_meta["step"] == 0 and init_meta["optimizer"] is None
    assert all(torch.equal(init.state_dict()[k], v) for k, v in rebuilt.state_dict().items())
    assert not torch.equal(init.vocab.recipe, model.vocab.recipe)
    assert torch.get_num_threads() == threads  # threads=1 was for the run only


def test_mfu_uses_the_peak_from_the_environment(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("REFLOW_PEAK_FLOPS", "1e12")
    summary = train(tiny_config(tiny_data, tmp_path / "run", max_steps=2))
    assert summary["mfu"] == pytest.approx(summary["flops_per_token"] * summary["tokens_per_s"] / 1e12)


def test_resume_after_kill_follows_the_uninterrupted_run(tiny_data, tmp_path):
    """A real process death (SIGKILL after step 5, last checkpoint at step 3), then resume: same weights, same
    optimizer moments and the same losses as a run that was never interrupted."""
    steps = dict(max_steps=8, ckpt_interval=3, eval_interval=4)
    reference = tiny_config(tiny_data, tmp_path / "reference", **steps)
    train(reference)

    killed = tiny_config(tiny_data, tmp_path / "killed", **steps)
    config_path = killed.to_json(tmp_path / "killed.json")
    env = {**os.environ, ENV_KILL_AT_STEP: "5", ENV_PROGRESS: "lines"}
    proc = subprocess.run([sys.executable, "-m", "reflow_core", "train", "--config", str(config_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert "step 4 " in proc.stdout and ckpt_io.read_meta(killed.out_dir)["step"] == 3  # died before logging 5
    assert [r["step"] for r in read_metrics(Path(killed.out_dir))] == [1, 2, 3, 4]

    summary = train(killed)
    assert summary["resumed_from"] == 3 and summary["steps_this_run"] == 5
    want, want_opt, want_meta = ckpt_io.load_checkpoint(reference.out_dir)
    got, got_opt, got_meta = ckpt_io.load_checkpoint(killed.out_dir)
    assert got_meta["step"] == want_meta["step"] == 8 and got_meta["tokens_seen"] == want_meta["tokens_seen"]
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    for name in want_opt:
        torch.testing.assert_close(got_opt[name], want_opt[name], rtol=0, atol=1e-6, msg=name)
    assert got_meta["optimizer"]["state"] == want_meta["optimizer"]["state"]  # AdamW step counts
    ref_rows, res_rows = read_metrics(Path(reference.out_dir)), read_metrics(Path(killed.out_dir))
    assert [r["step"] for r in res_rows] == list(range(1, 9))  # the killed run's step 4 was replaced
    for a, b in zip(ref_rows, res_rows):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6, abs=0)
        assert (a["val_loss"] is None) == (b["val_loss"] is None)
        if a["val_loss"] is not None:
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6, abs=0)


def test_resume_modes(tiny_data, tmp_path):
    with pytest.raises(ckpt_io.CheckpointNotFoundError, match="resume='must'"):
        train(tiny_config(tiny_data, tmp_path / "empty", resume="must"))
    out = tmp_path / "run"
    train(tiny_config(tiny_data, out, max_steps=2))
    assert train(tiny_config(tiny_data, out, max_steps=2))["steps_this_run"] == 0  # auto: already finished
    assert train(tiny_config(tiny_data, out, max_steps=3))["resumed_from"] == 2
    assert train(tiny_config(tiny_data, out, max_steps=2, resume="never"))["resumed_from"] is None
    with pytest.raises(ConfigError, match="'out_dir'"):  # a different model's checkpoint is never loaded
        train(tiny_config(tiny_data, out, model="gpt2-new@test"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(tiny_config(tiny_data, out, max_steps=4, ckpt_interval=2))
    before = {f: ckpt_io.sha256_file(out / "ckpt" / f) for f in ("model.safetensors", "optimizer.safetensors",
                                                                  "meta.json")}
    original = GPT.forward
    calls = []

    def poisoned(self, idx, targets=None, **kwargs):  # from the second training step of the resumed run: NaN
        logits, loss = original(self, idx, targets, **kwargs)
        if self.training and loss is not None:
            calls.append(1)
            if len(calls) > 1:  # (at the first, the NaN would come from the checkpoint's own weights: not good)
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match=r"step 6: loss=nan.*last good checkpoint is .*step 4.*lower lr") as info:
        train(tiny_config(tiny_data, out, max_steps=8, ckpt_interval=2, log_interval=3))  # first sync at step 6
    assert info.value.step == 6 and info.value.checkpoint == str(out / "ckpt")
    after = {f: ckpt_io.sha256_file(out / "ckpt" / f) for f in before}
    assert after == before
    assert ckpt_io.verify_checkpoint(out)["step"] == 4
    monkeypatch.setattr(GPT, "forward", original)
    model, _ = ckpt_io.load_model(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_huge_learning_rate_diverges_with_a_clear_message(tiny_data, tmp_path):
    with pytest.raises(TrainingDiverged, match="lower lr"):
        train(tiny_config(tiny_data, tmp_path / "run", max_steps=6, lr=1e6, min_lr=0.0, warmup_steps=0,
                          grad_clip=0.0, ckpt_interval=1))
    meta = ckpt_io.read_meta(tmp_path / "run") if (tmp_path / "run" / "ckpt").exists() else None
    if meta is not None:  # whatever was saved before the divergence is finite and loadable
        model, _ = ckpt_io.load_model(tmp_path / "run")
        assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# torchrun


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tiny_data, tmp_path):
    """Same global batch (2 ranks × 1 micro-batch vs 1 rank × 2 accumulated): the same losses at every step."""
    from reflow_core.launch import launch

    common = dict(max_steps=6, tokens_per_step=2 * 4 * 64, eval_interval=3)
    lines: list[str] = []
    ddp = launch(tiny_config(tiny_data, tmp_path / "ddp", **common), nproc=2, echo=lines.append)
    single = train(tiny_config(tiny_data, tmp_path / "single", **common))
    assert ddp["world_size"] == 2 and ddp["grad_accum_steps"] == 1
    assert single["world_size"] == 1 and single["grad_accum_steps"] == 2
    assert any(line.startswith("step 6 ") for line in lines)  # progress was streamed as lines
    a, b = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "single")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-5)
        if rb["val_loss"] is not None:
            assert ra["val_loss"] == pytest.approx(rb["val_loss"], rel=1e-5)
    want, _, _ = ckpt_io.load_checkpoint(tmp_path / "single")
    got, _, _ = ckpt_io.load_checkpoint(tmp_path / "ddp")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_launch_raises_with_the_childs_error(tmp_path):
    from reflow_core.launch import LaunchError, launch

    lines: list[str] = []
    config = tiny_config(tmp_path / "no-such-data", tmp_path / "run")
    with pytest.raises(LaunchError) as info:
        launch(config, nproc=1, echo=lines.append)
    message = str(info.value)
    assert "DatasetNotPreparedError" in message and "python -m reflow_core prepare" in message
    assert info.value.returncode != 0 and info.value.errors
    assert any("DatasetNotPreparedError" in line for line in lines)  # it was also streamed to the caller
