"""Cross-entropy of a linear head without materialising the logits: ``mean CE(x · Wᵀ, targets)``.

At the book's CPU scales the output head dominates a training step: N = 2,048 positions × V = 50,304 logits is a
412 MB float32 tensor that the textbook path writes, reads for log-softmax, writes again as log-probabilities, then
reads and writes twice more in the backward pass (log-softmax backward, the gradient of the NLL gather). Here the
N positions are taken a chunk at a time: the chunk's logits are computed, turned in place into the gradient of the
loss with respect to them (softmax − one-hot, one exponential per entry), and immediately contracted into the
gradients of ``x`` and ``W``. The loss is a scalar, so its gradients can be computed during the forward pass
and only scaled by the incoming gradient in the backward pass. Same mathematics, fewer passes over memory, and peak
memory of one chunk instead of N × V.

Under autocast the two matmuls per chunk run in the autocast dtype, exactly like ``x @ W.t()`` would; the softmax is
always float32, as ``F.cross_entropy(logits.float(), …)`` is on the textbook path.
"""

from __future__ import annotations

import contextlib
import time

import torch

# Positions per chunk.  CPU: 512 × 50,304 float32 logits ≈ 103 MB; on the book's 2-core machine a reflow@smoke
# forward+backward took 816/771/765/739/728 ms at 64/128/256/512/1,024 positions per chunk (one run each).
# CUDA: 8,192 positions ≈ 1.6 GB of float32 logits (far below the unchunked N × V) is only the fallback; a training
# run measures its own size (below). No GPU was lent while this was written, so neither is a measured number yet.
DEFAULT_CHUNK = {"cpu": 512, "cuda": 8192}
# On CUDA the size is measured instead (calibrate_chunk, at the start of every CUDA training run): which is fastest
# depends on the device, the head's width and the autocast dtype, and a guess can cost a few percent of every step.
CUDA_CANDIDATES = (2048, 4096, 8192, 16384, 32768)
CALIBRATION_LOGITS_BYTES = 4 << 30  # no candidate whose float32 logits (chunk × V) would exceed 4 GiB

_override: dict[str, int] = {}  # device type -> chunk set by chunk_for(), for the duration of a training run


def default_chunk(device_type: str) -> int:
    """Positions per chunk when the caller gives none: a training run's calibrated size, else the table."""
    return _override.get(device_type) or DEFAULT_CHUNK.get(device_type, 1024)


@contextlib.contextmanager
def chunk_for(device_type: str, chunk: int | None):
    """Use ``chunk`` positions per chunk on ``device_type`` inside the block (the model's loss passes no size)."""
    before = _override.get(device_type)
    if chunk:
        _override[device_type] = int(chunk)
    try:
        yield
    finally:
        if before is None:
            _override.pop(device_type, None)
        else:
            _override[device_type] = before


def calibrate_chunk(device: torch.device, k: int, vocab: int, positions: int, dtype: torch.dtype, *,
                    candidates=CUDA_CANDIDATES, repeats: int = 3) -> tuple[int, dict[int, float]]:
    """The fastest chunk size for a forward + backward of the loss over ``positions`` positions of width ``k``
    against a ``vocab`` × ``k`` head in autocast ``dtype`` on ``device``: each candidate (no larger than
    ``positions``, its logits within CALIBRATION_LOGITS_BYTES) is run once untimed, then ``repeats`` times; the best
    of the medians wins. Returns ``(chunk, {chunk: seconds})``. Random inputs: the time does not depend on values.
    A few tenths of a second on a GPU at the book's sizes."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(positions, k, generator=gen) * 0.02).to(device).requires_grad_(True)
    weight = (torch.randn(vocab, k, generator=gen) * 0.02).to(device).requires_grad_(True)
    targets = torch.randint(0, vocab, (positions,), generator=gen).to(device)
    sizes = sorted({min(c, positions) for c in candidates if c * vocab * 4 <= CALIBRATION_LOGITS_BYTES}) or [positions]
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    timings = {}
    for chunk in sizes:
        runs = []
        for i in range(repeats + 1):
            sync()
            t0 = time.perf_counter()
            with autocast:
                loss = linear_cross_entropy(x, weight, targets, chunk=chunk)
            loss.backward()
            sync()
            if i:  # the first run allocates and picks kernels
                runs.append(time.perf_counter() - t0)
            x.grad = weight.grad = None
        timings[chunk] = sorted(runs)[len(runs) // 2]
    return min(timings, key=timings.get), timings


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                chunk: int, need_x: bool, need_w: bool) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        t = targets.reshape(-1)
        valid = t != ignore_index
        n_valid = valid.sum().float()  # a tensor, not a Python number: no host synchronisation inside the step
        mm_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        w = weight.to(mm_dtype)
        grad_x = torch.empty_like(x2, dtype=torch.float32) if need_x else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        with torch.autocast(x.device.type, enabled=False):
            for start in range(0, x2.shape[0], chunk):
                xc = x2[start:start + chunk].to(mm_dtype)
                tc, vc = t[start:start + chunk], valid[start:start + chunk]
                logits = (xc @ w.t()).float()
                rows, tc = torch.arange(len(tc), device=x.device), tc.clamp(min=0)
                picked = logits[rows, tc]
                # softmax in place of the logits, one exp per entry (logsumexp would add a second and temporaries)
                top = logits.amax(dim=-1)
                probs = logits.sub_(top[:, None]).exp_()
                total = probs.sum(dim=-1)
                loss += ((top + total.log() - picked) * vc).sum()
                if not (need_x or need_w):
                    continue
                grad = probs.mul_((vc / total)[:, None])  # ignored rows get no gradient
                grad[rows, tc] -= vc.to(grad.dtype)
                grad = grad.to(mm_dtype)
                if need_x:
                    grad_x[start:start + chunk] = (grad @ w).float()
                if need_w:
                    grad_w += (grad.t() @ xc).float()
        ctx.save_for_backward(*(g / n_valid if g is not None else torch.empty(0) for g in (grad_x, grad_w)))
        ctx.shapes = (x.shape, x.dtype, weight.dtype, need_x, need_w)
        return loss / n_valid  # 0/0 = NaN when every position is ignored, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_x, grad_w = ctx.saved_tensors
        x_shape, x_dtype, w_dtype, need_x, need_w = ctx.shapes
        gx = (grad_x * grad_loss).reshape(x_shape).to(x_dtype) if need_x else None
        gw = (grad_w * grad_loss).to(w_dtype) if need_w else None
        return gx, gw, None, None, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -1,
                         chunk: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits ``x @ weight.T`` (``x``: (..., k), ``weight``: (V, k)) against ``targets``
    (positions equal to ``ignore_index`` do not count), as ``F.cross_entropy`` computes it, without the logits."""
    if x.shape[:-1] != targets.shape:
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not match inputs {tuple(x.shape[:-1])}")
    chunk = chunk or default_chunk(x.device.type)
    grad = torch.is_grad_enabled()  # (inside a Function's forward it is always off, so decide here)
    return _LinearCrossEntropy.apply(x, weight, targets, ignore_index, chunk, grad and x.requires_grad,
                                     grad and weight.requires_grad)
