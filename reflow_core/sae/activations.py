"""Residual-stream activations for the SAEs: read at one hook point (a layer state of :mod:`reflow_core.hooks`),
held-out documents kept apart.

Train vectors come from random windows of the *train* split (``get_batch``), evaluation vectors from the fixed windows
of the *val* split (``iter_eval_batches``): the corpus is split by document, so no held-out metric ever sees a
document the SAE trained on. Activations are normalised by one scalar, c = √d / E‖x‖ estimated on the train vectors
(so the mean norm of c·x is √d), as SAELens' ``normalize_activations="expected_average_only_in"`` computes it; every
model is trained and scored in normalised units, and :meth:`ActivationSet.denormalize` undoes it before a
reconstruction is spliced back. (We used √(d / E‖x‖²) before; the two agree when norms are alike, but a few rows of
large norm — the residual stream's first positions — inflate E‖x‖² far more than E‖x‖, and the two then differ by a
factor 2–3 for the typical token.)
When the train vectors exceed ``max_bytes`` they are written to a float32 memmap on disk and streamed from there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from reflow_core import data
from reflow_core.hooks import read_hook


@dataclass
class ActivationSet:
    train: np.ndarray  # (N_train, d) float32, raw units (an in-memory array or a memmap)
    val: torch.Tensor  # (N_val, d) float32, raw units
    scale: float  # c: normalised = c · raw
    hook: str
    val_windows: torch.Tensor  # (n, T) int64: the held-out token windows the val vectors came from
    val_targets: torch.Tensor
    on_disk: bool = False
    meta: dict = field(default_factory=dict)

    @property
    def d(self) -> int:
        return self.train.shape[1]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.scale

    def val_normalized(self) -> torch.Tensor:
        return self.normalize(self.val)

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """A random batch of normalised train vectors (rows sorted so that a memmap is read forwards)."""
        rows = torch.randint(len(self.train), (batch_size,), generator=generator).sort().values.numpy()
        return self.normalize(torch.from_numpy(np.asarray(self.train[rows], dtype=np.float32)))


@torch.no_grad()
def collect(model, hook: str, data_dir: str | Path, *, n_train: int, n_val: int, block_size: int | None = None,
            batch_size: int = 32, seed: int = 0, max_bytes: int = 512 * 2**20, cache_dir: str | Path | None = None,
            progress: bool = True) -> ActivationSet:
    """Read ``n_train`` vectors from train windows and ``n_val`` from held-out windows at ``hook``."""
    from tqdm.auto import tqdm

    model.eval()
    T = block_size or model.config.block_size
    d = model.config.d_model
    train_tokens = data.load_tokens(data_dir, "train")
    val_tokens = data.load_tokens(data_dir, "val")
    T = min(T, len(val_tokens) - 1, len(train_tokens) - 1)

    n_bytes = n_train * d * 4
    on_disk = n_bytes > max_bytes
    if on_disk:
        cache_dir = Path(cache_dir or Path(data_dir) / "activations")
        cache_dir.mkdir(parents=True, exist_ok=True)
        store = np.lib.format.open_memmap(cache_dir / f"{hook}-train.npy", mode="w+", dtype=np.float32,
                                          shape=(n_train, d))
    else:
        store = np.empty((n_train, d), dtype=np.float32)
    g = torch.Generator().manual_seed(seed)
    filled, norm_sum = 0, 0.0
    bar = tqdm(total=n_train, desc=f"activations {hook} (train)", disable=not progress, leave=False)
    while filled < n_train:
        x, _ = data.get_batch(train_tokens, batch_size, T, g)
        h = read_hook(model, x, hook).reshape(-1, d).float()
        take = min(len(h), n_train - filled)
        store[filled:filled + take] = h[:take].numpy()
        norm_sum += float(h[:take].norm(dim=-1).double().sum())
        filled += take
        bar.update(take)
    bar.close()
    if on_disk:
        store.flush()

    vals, windows, targets, got = [], [], [], 0
    for x, y in data.iter_eval_batches(val_tokens, batch_size, T, max_batches=math.ceil(n_val / (batch_size * T)) + 1):
        windows.append(x)
        targets.append(y)
        vals.append(read_hook(model, x, hook).reshape(-1, d).float())
        got += x.numel()
        if got >= n_val:
            break
    val = torch.cat(vals)[:n_val]
    scale = expected_average_scale(d, norm_sum / n_train)
    return ActivationSet(train=store, val=val, scale=scale, hook=hook, val_windows=torch.cat(windows),
                         val_targets=torch.cat(targets), on_disk=on_disk,
                         meta=dict(n_train=n_train, n_val=len(val), block_size=T, seed=seed))


def expected_average_scale(d: int, mean_norm: float) -> float:
    """SAELens' ``expected_average_only_in`` factor: c = √d / E‖x‖, so that the mean norm of c·x is √d."""
    return math.sqrt(d) / max(mean_norm, 1e-12)


def from_arrays(train: np.ndarray, val: torch.Tensor, hook: str = "synthetic") -> ActivationSet:
    """An :class:`ActivationSet` over given vectors (tests, synthetic data); no token windows."""
    train = np.asarray(train, dtype=np.float32)
    scale = expected_average_scale(train.shape[1], float(np.linalg.norm(train.astype(np.float64), axis=1).mean()))
    empty = torch.zeros(0, 1, dtype=torch.long)
    return ActivationSet(train=train, val=val.float(), scale=scale, hook=hook, val_windows=empty, val_targets=empty)
