"""Training the SAE family: Top-K SAE, sequential SAE→NFM, joint SAE+NFM, and the matched baselines.

Every variant is a :class:`Reconstructor` — an SAE plus an optional head on its code z, x̂ = W_dec z + b_dec + head(z)
— trained by :func:`train_reconstructor` on the same normalised train vectors, the same number of steps, batch size
and learning-rate schedule, and the same sampling seed. The variants (:data:`VARIANTS`):

    sae          Top-K SAE, width w, k, trained independently            the baseline the seed names (its code compared
                                                                         the joint model minus its NFM instead)
    sae_wide     Top-K SAE, same k, width chosen to match joint's parameter count
    sae_linear   SAE + W_lin z, trained jointly                          "linear only": the nonlinear increment's base
    sae_mlp      SAE + W_lin z + MLP(z) of the NFM's nonlinear size      nonlinearity without FM pooling
    joint        SAE + NFM (linear + bi-interaction + MLP), one MSE      the seed's joint model
    sequential   frozen ``sae`` of the same seed + NFM on its residual   the seed's earlier workflow
    sae_paper, joint_paper   the same two models with the seed's recipe (free decoder norms) — for the norm claim

Training (:func:`train_reconstructor`): b_dec starts at the train vectors' geometric median, Adam on the squared error
summed over d and averaged over tokens, plus aux-k for dead latents in the same units (SAELens 6.x; see
:mod:`reflow_core.sae.topk`), gradients clipped to global norm 1, warm-up then linear decay to 0 over the last 20% of
steps (Gao et al.).  Every variant's dead latents are counted afterwards (:mod:`reflow_core.sae.metrics`); the chapter's
comparisons count only where the compared variants have fewer than 10% (:mod:`reflow_core.sae.gates`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from reflow_core.sae.nfm import NFM, MLPHead
from reflow_core.sae.topk import TopKSAE, width_for_params

VARIANTS = ("sae", "sae_wide", "sae_linear", "sae_mlp", "joint", "sequential")
PAPER_VARIANTS = ("sae_paper", "joint_paper")
VARIANT_LABELS = {
    "sae": "Top-K SAE", "sae_wide": "Top-K SAE, param-matched", "sae_linear": "SAE + linear",
    "sae_mlp": "SAE + linear + MLP", "joint": "joint SAE+NFM", "sequential": "sequential SAE→NFM",
    "sae_paper": "Top-K SAE (seed recipe)", "joint_paper": "joint SAE+NFM (seed recipe)",
}


@dataclass
class SAEConfig:
    width: int = 512
    k: int = 16
    embed_dim: int = 64  # NFM embedding size E
    steps: int = 2000
    batch_size: int = 512
    lr: float = 1e-3
    warmup_steps: int = 50
    decay_frac: float = 0.2  # linear decay to 0 over the last fraction of steps (Gao et al.)
    dead_steps: int = 200  # a latent that has not fired for this many steps is dead (aux-k revives it)
    aux_coef: float = 1.0  # aux-k coefficient (SAELens 6.x: 1, scaled by min(n_dead / k_aux, 1) in the loss)
    clip_grad: float | None = 1.0  # global gradient-norm clip (SAELens' trainer, and the seed's part15)
    # Train until live: after ``steps``, while more than ``until_dead`` of the latents never fire on the train check
    # vectors (metrics.train_check: the first 65,536 train vectors, final weights), train another phase of
    # ``extra_frac`` × steps (warm-up, then linear decay to 0), at most ``max_extra_phases`` times.  None: the fixed
    # budget only.
    until_dead: float | None = None
    extra_frac: float = 0.5
    max_extra_phases: int = 2
    log_interval: int = 50


class Reconstructor(nn.Module):
    """x̂ = W_dec z + b_dec + head(z), z = TopK SAE code."""

    def __init__(self, sae: TopKSAE, head: nn.Module | None = None, *, freeze_sae: bool = False) -> None:
        super().__init__()
        self.sae, self.head, self.freeze_sae = sae, head, freeze_sae
        if freeze_sae:
            for p in sae.parameters():
                p.requires_grad_(False)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def parts(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        pre = self.sae.pre_activations(x)
        k = self.sae.k
        values, indices = F.relu(pre).topk(k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, indices, values)
        out = {"pre": pre, "z": z, "sae": self.sae.decode(z)}
        if self.head is not None:
            out["linear"], out["interaction"] = self.head.parts(z, k)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.parts(x)
        return self.combine(p)

    @staticmethod
    def combine(p: dict, *, linear: bool = True, interaction: bool = True) -> torch.Tensor:
        x_hat = p["sae"]
        if "linear" in p and linear:
            x_hat = x_hat + p["linear"]
        if "interaction" in p and interaction:
            x_hat = x_hat + p["interaction"]
        return x_hat


def nfm_params(width: int, d: int, E: int) -> int:
    return width * E + E * E + E + E * d + d


def build_variant(name: str, d: int, cfg: SAEConfig, *, seed: int, frozen_sae: TopKSAE | None = None) -> Reconstructor:
    """One variant, initialised from ``seed`` (the same seed gives every variant the same SAE initialisation)."""
    torch.manual_seed(seed)
    w, k, E = cfg.width, cfg.k, cfg.embed_dim
    init = "paper" if name.endswith("_paper") else "careful"
    if name == "sae_wide":
        joint_params = (2 * d * w + w + d) + d * w + nfm_params(w, d, E)
        return Reconstructor(TopKSAE(d, width_for_params(d, joint_params), k, dead_steps=cfg.dead_steps,
                                     aux_coef=cfg.aux_coef))
    if name == "sequential":
        if frozen_sae is None:
            raise ValueError("the sequential variant needs the trained SAE of the same seed (frozen_sae=)")
        return Reconstructor(frozen_sae, NFM(w, d, E), freeze_sae=True)
    sae = TopKSAE(d, w, k, init=init, dead_steps=cfg.dead_steps, aux_coef=cfg.aux_coef)
    if name in ("sae", "sae_paper"):
        return Reconstructor(sae)
    if name == "sae_linear":
        return Reconstructor(sae, NFM(w, d, E, interaction=False))
    if name == "sae_mlp":
        return Reconstructor(sae, MLPHead(w, d, nfm_params(w, d, E)))
    if name in ("joint", "joint_paper"):
        return Reconstructor(sae, NFM(w, d, E))
    raise ValueError(f"unknown variant {name!r}; known: {VARIANTS + PAPER_VARIANTS}")


def lr_at(step: int, cfg: SAEConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_start = int(cfg.steps * (1 - cfg.decay_frac))
    if step >= decay_start:
        return cfg.lr * max(0.0, (cfg.steps - step) / max(1, cfg.steps - decay_start))
    return cfg.lr


def train_reconstructor(model: Reconstructor, acts, cfg: SAEConfig, *, seed: int, log_path: str | Path | None = None,
                        desc: str = "", progress: bool = True) -> dict:
    """Adam on the squared error of x̂ (Σ over d, mean over tokens — the same units as the aux-k term) plus aux-k for
    dead latents, gradients clipped to global norm ``cfg.clip_grad``; the sampling order depends only on ``seed``.
    With ``cfg.until_dead`` a careful (unit-norm, trainable) SAE is trained on in extra phases until its share of
    latents that never fire on the train check vectors (:func:`reflow_core.sae.metrics.train_check`) is below it (or
    the phases run out).

    Returns a summary (final train loss, steps and phases trained, that share of dead latents — ``dead_train`` —,
    seconds); writes one JSON line per ``log_interval`` steps to ``log_path``.
    """
    from reflow_core.sae import metrics

    sae = model.sae
    if not model.freeze_sae:  # b_dec at the geometric median of train vectors (a sample of its own generator)
        sae.init_b_dec(acts.sample(min(len(acts.train), 8192), torch.Generator().manual_seed(seed + 7919)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999))
    g = torch.Generator().manual_seed(seed)
    log = open(log_path, "a") if log_path else None
    t0 = time.time()
    model.train()
    ema = _phase(model, opt, params, acts, cfg, g, 0, log, desc, seed, t0, progress)
    steps, phases = cfg.steps, 0
    check = metrics.train_check(acts)
    dead = metrics.dead_share(model, check)
    if cfg.until_dead is not None and sae.unit_norm and not model.freeze_sae:
        while dead >= cfg.until_dead and phases < cfg.max_extra_phases:
            n = max(1, int(cfg.extra_frac * cfg.steps))
            phase = replace(cfg, steps=n, warmup_steps=max(1, n // 10))
            model.train()
            ema = _phase(model, opt, params, acts, phase, g, steps, log, f"{desc} (+{phases + 1})", seed, t0,
                         progress)
            steps, phases = steps + n, phases + 1
            dead = metrics.dead_share(model, check)
    if log:
        log.close()
    model.eval()
    return {"train_mse_ema": ema, "seconds": time.time() - t0, "params": model.num_params(), "steps": steps,
            "extra_phases": phases, "dead_train": dead, "dead_check_vectors": len(check)}


def _phase(model: Reconstructor, opt, params, acts, cfg: SAEConfig, g: torch.Generator, step0: int, log, desc: str,
           seed: int, t0: float, progress: bool) -> float:
    """``cfg.steps`` optimiser steps with ``cfg``'s learning-rate schedule; returns the EMA of the train MSE."""
    from tqdm.auto import tqdm

    sae, ema = model.sae, None
    bar = tqdm(range(cfg.steps), desc=desc or "sae", disable=not progress, leave=False, mininterval=1.0)
    for step in bar:
        x = acts.sample(cfg.batch_size, g)
        p = model.parts(x)
        x_hat = model.combine(p)
        mse = (x_hat - x).pow(2).sum(-1).mean()
        loss = mse
        if not model.freeze_sae:
            aux = sae.aux_loss(x, p["pre"], x_hat)
            loss = loss + sae.aux_coef * aux
            sae.update_fired(p["z"])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not model.freeze_sae:
            sae.remove_parallel_grad()
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        opt.step()
        if not model.freeze_sae:
            sae.normalize_decoder()
        mse_v = float(mse.detach())
        ema = mse_v if ema is None else 0.95 * ema + 0.05 * mse_v
        if step % cfg.log_interval == 0 or step == cfg.steps - 1:
            dead = float(sae.dead_mask().float().mean())
            bar.set_postfix(mse=f"{ema:.4f}", dead=f"{dead:.2f}")
            if log:
                log.write(json.dumps({"variant": desc.split(" (+")[0], "seed": seed, "step": step0 + step,
                                      "mse": mse_v, "dead": dead, "lr": lr_at(step, cfg),
                                      "time": round(time.time() - t0, 3)}) + "\n")
    return ema


def train_suite(acts, cfg: SAEConfig, seeds: list[int], *, variants=VARIANTS, paper_seeds: list[int] | None = None,
                log_path: str | Path | None = None, progress: bool = True) -> dict[str, list[Reconstructor]]:
    """Every variant for every seed, on the same activations, steps and sampling seed; ``{variant: [model per seed]}``.

    The ``*_paper`` variants are trained for ``paper_seeds`` only (default: the first seed).
    """
    models: dict[str, list[Reconstructor]] = {}
    paper_seeds = seeds[:1] if paper_seeds is None else paper_seeds
    plan = [(v, s) for s in seeds for v in variants] + [(v, s) for s in paper_seeds for v in PAPER_VARIANTS]
    for variant, seed in plan:
        frozen = None
        if variant == "sequential":
            frozen = models["sae"][seeds.index(seed)].sae
        m = build_variant(variant, acts.d, cfg, seed=seed, frozen_sae=frozen)
        init_W_dec = m.sae.W_dec.detach().clone()
        summary = train_reconstructor(m, acts, cfg, seed=seed, log_path=log_path, desc=f"{variant}/{seed}",
                                      progress=progress)
        m.summary = summary
        m.init_W_dec = init_W_dec  # what "moved from initialisation" is measured against
        models.setdefault(variant, []).append(m)
    return models


def config_dict(cfg: SAEConfig) -> dict:
    return asdict(cfg)
