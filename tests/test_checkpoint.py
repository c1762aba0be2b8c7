"""Checkpoints: round trip (weights, optimizer by name, tied tensors), atomic swap and crash recovery, refusal of
corrupt, truncated or pickled files (never unpickled), plus sample() and inspect on a tiny trained checkpoint."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from reflow_core import checkpoint as ckpt_io
from reflow_core.checkpoint import CorruptCheckpointError, load_checkpoint, load_model, save_checkpoint
from reflow_core.cli import main
from reflow_core.config import get_config
from reflow_core.data import prepare
from reflow_core.model import build_model
from reflow_core.sample import format_inspection, inspect_checkpoint, sample
from reflow_core.config import TrainConfig
from reflow_core.train import make_optimizer, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run directory with a 3-step reflow@test checkpoint (copy it before damaging it)."""
    root = tmp_path_factory.mktemp("ckpt")
    prepare("tiny", root / "data")
    config = TrainConfig(model="reflow@test", data_dir=str(root / "data"), out_dir=str(root / "run"), max_steps=3,
                         micro_batch_size=4, warmup_steps=1, eval_batches=2, log_interval=1, threads=1,
                         progress=False)
    train(config)
    return root / "run"


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


def _one_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    idx = torch.randint(0, 1000, (2, 16))
    _, loss = model(idx, idx)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_round_trip_restores_weights_and_optimizer_by_name(tmp_path):
    torch.manual_seed(0)
    config = get_config("reflow@test")
    model = build_model(config)
    optimizer = make_optimizer(model, TrainConfig(model="reflow@test"), "cpu")
    _one_step(model, optimizer)
    path = save_checkpoint(tmp_path, model, optimizer, step=1, config={"note": "x"}, tokens_seen=32,
                           extra={"val_loss": 1.5})
    assert path == tmp_path / "ckpt" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]

    state, opt_tensors, meta = load_checkpoint(tmp_path)
    assert meta["step"] == 1 and meta["tokens_seen"] == 32 and meta["extra"]["val_loss"] == 1.5
    assert meta["model_config"] == config.to_dict() and meta["train_config"] == {"note": "x"}
    for name, p in model.state_dict().items():
        assert torch.equal(state[name], p)
    assert set(opt_tensors) == {f"{k}/{n}" for n, _ in model.named_parameters() for k in ("exp_avg", "exp_avg_sq")}

    # a fresh model + optimizer, with parameters registered in a different order, continue identically
    fresh = build_model(config)
    fresh.load_state_dict(state)
    params = dict(fresh.named_parameters())
    shuffled = torch.optim.AdamW([{"params": [params[n] for n in reversed(params) if params[n].dim() >= 2],
                                   "weight_decay": 0.1},
                                  {"params": [params[n] for n in reversed(params) if params[n].dim() < 2],
                                   "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.95),
                                 fused=True)  # as make_optimizer's default, so both round alike
    ckpt_io.load_optimizer_state(shuffled, fresh, opt_tensors, meta)
    for n, p in model.named_parameters():
        assert torch.equal(shuffled.state[params[n]]["exp_avg"], optimizer.state[p]["exp_avg"])
        assert shuffled.state[params[n]]["step"].item() == 1
    torch.manual_seed(1)
    _one_step(model, optimizer)
    torch.manual_seed(1)
    _one_step(fresh, shuffled)
    for name, p in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], p), name


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # one tensor, two names: safetensors alone would refuse this


def test_tied_tensors_are_stored_once_and_restored(tmp_path):
    model = Tied()
    save_checkpoint(tmp_path, model, step=0)
    state, opt, meta = load_checkpoint(tmp_path)
    assert opt is None and meta["aliases"] == {"head.weight": "embed.weight"}
    assert torch.equal(state["head.weight"], model.embed.weight)
    restored = Tied()
    restored.load_state_dict(state)
    assert restored.head.weight is restored.embed.weight and torch.equal(restored.embed.weight, model.embed.weight)


def test_second_save_replaces_the_first_atomically(tmp_path):
    model = build_model(get_config("gpt2@test"))
    save_checkpoint(tmp_path, model, step=1)
    (tmp_path / ".tmp-7").mkdir()  # what a run killed while writing leaves behind
    (tmp_path / ".tmp-7" / "model.safetensors").write_bytes(b"half a file")
    save_checkpoint(tmp_path, model, step=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"] and ckpt_io.read_meta(tmp_path)["step"] == 2


def test_crash_between_renames_falls_back_to_the_old_checkpoint(run_copy):
    (run_copy / "ckpt").rename(run_copy / "ckpt.old")  # died after `ckpt -> ckpt.old`, before `tmp -> ckpt`
    assert ckpt_io.find_checkpoint(run_copy) == run_copy / "ckpt.old"
    model, meta = load_model(run_copy)
    assert meta["step"] == 3
    save_checkpoint(run_copy, model, step=4)
    assert not (run_copy / "ckpt.old").exists() and ckpt_io.read_meta(run_copy)["step"] == 4


def test_flipped_bytes_are_refused(run_copy):
    path = run_copy / "ckpt" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="sha256"):
        load_checkpoint(run_copy)
    with pytest.raises(CorruptCheckpointError):
        load_model(run_copy)
    with pytest.raises(CorruptCheckpointError):
        inspect_checkpoint(run_copy)


def test_truncated_file_is_refused(run_copy):
    path = run_copy / "ckpt" / "optimizer.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        load_checkpoint(run_copy)
    load_model(run_copy)  # the weights alone are still intact and loadable


def test_edited_metadata_is_refused(run_copy):
    path = run_copy / "ckpt" / "meta.json"
    meta = json.loads(path.read_text())
    meta["step"] = 1000
    path.write_text(json.dumps(meta))
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        load_checkpoint(run_copy)
    path.write_text("{ not json")
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        load_checkpoint(run_copy)


class _Payload:
    """Unpickling this creates a file: proof that the loader ran pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_a_pickle_named_model_safetensors_is_refused_without_unpickling(run_copy, tmp_path, kind):
    marker = tmp_path / "pwned"
    path = run_copy / "ckpt" / "model.safetensors"
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"weights": _Payload(marker)}))
    else:
        torch.save({"weights": _Payload(marker)}, path)
    with pytest.raises(CorruptCheckpointError):
        load_model(run_copy)
    # even with meta.json rewritten to vouch for the file (hash, size, checksum), it is not unpickled
    meta_path = run_copy / "ckpt" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["files"]["model.safetensors"] = {"bytes": path.stat().st_size, "sha256": ckpt_io.sha256_file(path)}
    meta["checksum"] = ckpt_io.meta_checksum(meta)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CorruptCheckpointError, match="not a valid safetensors file"):
        load_model(run_copy)
    assert not marker.exists()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ckpt_io.CheckpointNotFoundError, match="no checkpoint"):
        load_model(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# sample and inspect


def test_sample_returns_text_deterministically(trained):
    texts = sample(trained, "The river", max_new_tokens=8, temperature=1.0, top_k=50, seed=3, num_samples=2)
    assert len(texts) == 2 and all(t.startswith("The river") and len(t) > len("The river") for t in texts)
    assert texts == sample(trained, "The river", max_new_tokens=8, temperature=1.0, top_k=50, seed=3, num_samples=2)
    model, _ = load_model(trained)
    greedy = sample(model, "", max_new_tokens=5, temperature=0, num_samples=2)  # an already loaded model works too
    assert greedy[0] == greedy[1] and greedy[0]


def test_inspect_lists_every_tensor_with_totals(trained, capsys):
    rows = inspect_checkpoint(trained)
    model, meta = load_model(trained)
    assert {r[0] for r in rows} == set(model.state_dict())
    assert sum(r[2] for r in rows) == model.num_params() == meta["num_params"]
    assert ("vocab.recipe", (50304, 32), 50304 * 32, "F32") in rows
    assert main(["inspect", str(trained)]) == 0
    out = capsys.readouterr().out
    assert "vocab.basis" in out and f"{model.num_params():,}" in out and "step 3" in out
    assert format_inspection(trained) in out


def test_sample_cli(trained, capsys):
    assert main(["sample", str(trained), "--prompt", "Hello", "--max-new-tokens", "4", "--num-samples", "2",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("Hello") == 2 and "-" * 40 in out
