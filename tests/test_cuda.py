"""The CUDA path, on a GPU (marker ``cuda``; skipped without one). ``offline/run.sh`` runs these first on the GPU host
and stops at the first failure, before anything trains: the fused loss in bf16 against ``F.cross_entropy``, one
training step of each family the ``small`` scale trains, a checkpoint round trip on the device, and ``launch`` under
torchrun with NCCL. Each takes seconds."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to torch)")]

REPO = Path(__file__).resolve().parent.parent


def small_step_config(data: Path, out: Path, family: str, **changes):
    """One optimizer step of the ``small`` shape (46M-class, head dim 64: the flash SDPA kernel) on short windows."""
    from reflow_core.config import TrainConfig

    base = dict(model=f"{family}@small", data_dir=str(data), out_dir=str(out), max_steps=1, micro_batch_size=4,
                block_size=64, lr=1e-3, min_lr=1e-4, warmup_steps=0, eval_interval=0, eval_batches=1,
                ckpt_interval=0, log_interval=1, device="cuda", save_init=False, progress=False)
    return TrainConfig(**{**base, **changes})


def test_fused_loss_matches_cross_entropy_in_bf16():
    from reflow_core.fused_loss import linear_cross_entropy

    torch.manual_seed(0)
    x = (torch.randn(4, 512, 512, device="cuda") * 0.5).requires_grad_(True)
    w = (torch.randn(50304, 512, device="cuda") * 0.02).requires_grad_(True)
    t = torch.randint(0, 50257, (4, 512), device="cuda")
    t[0, :7] = -1  # ignored positions
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = linear_cross_entropy(x, w, t, chunk=1000)  # several chunks, the last one short
    ours.backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = x @ w.t()
    ref = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), t.view(-1), ignore_index=-1)
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(gx, x.grad, rtol=0.05, atol=1e-5)
    torch.testing.assert_close(gw, w.grad, rtol=0.05, atol=1e-6)


def test_chunk_calibration_picks_a_candidate():
    from reflow_core.fused_loss import CUDA_CANDIDATES, calibrate_chunk

    best, timings = calibrate_chunk(torch.device("cuda"), 512, 50304, 32 * 1024, torch.bfloat16, repeats=1)
    assert best in timings and set(timings) <= set(CUDA_CANDIDATES) and all(s > 0 for s in timings.values())


@pytest.mark.parametrize("family", ["reflow", "gpt2-new", "reflow-topk"])
def test_one_training_step(tiny_data, tmp_path, family):
    from reflow_core.train import train

    summary = train(small_step_config(tiny_data, tmp_path / family, family))
    assert summary["device"].startswith("cuda") and summary["steps"] == 1
    assert summary["dtype"] == ("bfloat16" if torch.cuda.is_bf16_supported() else "float32")
    assert 0 < summary["final_train_loss"] < 12 and summary["loss_chunk"] > 0
    if summary["peak_flops_per_device"]:  # a device of the table: MFU is logged against its bf16 dense peak
        assert 0 < summary["mfu"] < 1


def test_checkpoint_round_trip_on_cuda(tmp_path):
    from reflow_core import checkpoint as ckpt_io
    from reflow_core.config import TrainConfig, get_config
    from reflow_core.model import build_model

    torch.manual_seed(0)
    model = build_model(get_config("reflow@small"), "cuda")
    config = TrainConfig(model="reflow@small", out_dir=str(tmp_path))
    ckpt_io.save_checkpoint(tmp_path, model, None, step=3, config=config)
    loaded, meta = ckpt_io.load_model(tmp_path, device="cuda")
    assert meta["step"] == 3 and next(loaded.parameters()).is_cuda
    want = model.state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, want[name]), name
    idx = torch.randint(0, 50257, (2, 32), device="cuda")
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)


def test_launch_under_torchrun_and_nccl(tiny_data, tmp_path):
    """What the chapters call: launch() starts torchrun (one process per GPU, here 1) and training runs on CUDA;
    then a one-process NCCL group all-reduces, the collective a multi-GPU run depends on."""
    from reflow_core.launch import launch

    summary = launch(small_step_config(tiny_data, tmp_path / "launched", "reflow", model="reflow@test", max_steps=2),
                     nproc=1)
    assert summary["steps"] == 2 and summary["device"].startswith("cuda")
    script = tmp_path / "nccl.py"
    script.write_text(textwrap.dedent("""
        import os, torch, torch.distributed as dist
        rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
        t = torch.ones(4, device="cuda")
        dist.all_reduce(t)
        assert t.tolist() == [1.0] * 4, t
        dist.destroy_process_group()
        print("nccl ok")
    """))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           str(script)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0 and "nccl ok" in proc.stdout, proc.stdout + proc.stderr
