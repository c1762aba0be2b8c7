"""Native vs post-hoc on the same reFlow model: its signal read-out against SAE latents and SAE+NFM.

reFlow reads a residual state h through s = RMSNorm_final(h)·W_basisᵀ. Before the per-token normalisation this is a
*linear* read, s_lin = h·Aᵀ with a_j = g ⊙ b_j (g the final norm's weight, b_j a basis row), and s_lin = rms(h)·s, so
within a token the ordering of the signals is the read-out's. The read directions a_j are the model's own dictionary.
A *k-sparse native code* of h keeps the k signals whose normalised read |(h − h̄)·â_j| is largest (the read-out's
own top-k; h̄ the mean on train vectors, the analogue of an SAE's decoder bias) and refits h − h̄ on those k atoms â_j
by least squares (one step of matching pursuit). Inverting the whole read-out instead (h = s_lin·pinv(Aᵀ)) is exact
with all S signals but useless sparsely: a trained basis is far from orthogonal and pinv amplifies its small singular
directions. The native code needs no training; it is set against the SAEs at the same L0 for reconstruction (FVU) and
fidelity (spliced KL/ΔCE).

The causal unit: on the Causal Ablation prompt, each method's units active at the last position are removed one at a
time at the SAE's hook (native: signal j's write s_lin,j·P_j; SAE: z_i·W_dec[:, i]; SAE+NFM: the change of the whole
reconstruction when z_i is set to 0), and the unit whose removal lowers log p(target) most is that method's causal
unit (native signals are removed as Causal Ablation's residual mode does: h is projected off the direction
a_j = g ⊙ b_j that signal j is read from). Whether the methods found "the same unit" is read from the cosine between the
units' residual directions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from reflow_core import tokenizer
from reflow_core.sae import metrics
from reflow_core.sae.train import VARIANT_LABELS
from reflow_core.hooks import read_hook

PAPER_PROMPT = "The capital of France is"
PAPER_TARGET = " Paris"


class NativeCode:
    """Top-k of reFlow's (pre-normalisation) signal read-out as a sparse code of the residual stream."""

    def __init__(self, lm, acts) -> None:
        if not lm.is_factored:
            raise TypeError("the native code needs a factored (reFlow) model")
        self.A = (lm.vocab.basis.detach() * lm.norm_final.weight.detach()).float()  # (S, d): s_lin = h Aᵀ
        self.atoms = self.A / self.A.norm(dim=1, keepdim=True)  # â_j
        sample = torch.from_numpy(np.asarray(acts.train[: min(len(acts.train), 20000)], dtype=np.float32))
        self.h_mean = sample.mean(0)
        self.S = self.A.shape[0]

    def signals(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.A.t()

    def reconstruct(self, h: torch.Tensor, k: int) -> torch.Tensor:
        centred = h - self.h_mean
        idx = (centred @ self.atoms.t()).abs().topk(min(k, self.S), dim=-1).indices  # the read-out's top-k
        D = self.atoms[idx]  # (N, k, d)
        coef = torch.linalg.lstsq(D.transpose(1, 2), centred.unsqueeze(-1)).solution  # (N, k, 1)
        return self.h_mean + (coef.transpose(1, 2) @ D).squeeze(1)

    def splice_fn(self, k: int):
        def fn(x):
            flat = x.reshape(-1, x.shape[-1]).float()
            return self.reconstruct(flat, k).reshape(x.shape).to(x.dtype)
        return fn


@torch.no_grad()
def native_sweep(lm, acts, ks: list[int], *, n_windows: int = 8) -> pd.DataFrame:
    """FVU (raw units, held-out vectors) and spliced KL/ΔCE of the k-sparse native code for each k."""
    code = NativeCode(lm, acts)
    x = acts.val
    rows = [{"k": k, "fvu": metrics.fvu(x, code.reconstruct(x, k))} for k in ks]
    if len(acts.val_windows):
        fns = {r["k"]: code.splice_fn(r["k"]) for r in rows}
        res = metrics.splice_eval(lm, acts.hook, fns, acts.val_windows[:n_windows], acts.val_targets[:n_windows])
        for r in rows:
            r["kl"], r["delta_ce"] = res[r["k"]]["kl"], res[r["k"]]["delta_ce"]
    return pd.DataFrame(rows)


@dataclass
class CausalUnit:
    method: str
    unit: int
    drop: float  # log p(target) clean − ablated
    null_drop: float  # median drop over the method's other active units
    direction: torch.Tensor  # residual-space direction of the unit (raw units, unit norm)
    n_candidates: int


def _logp_last(lm, idx, target, hook=None, fn=None) -> float:
    if fn is None:
        logits, _ = lm(idx, last_only=True)
    else:
        with lm.hooks.attach({hook: fn}):
            logits, _ = lm(idx, last_only=True)
    return float(F.log_softmax(logits[0, -1].float(), -1)[target])


@torch.no_grad()
def causal_units(lm, acts, models: dict, prompt: str = PAPER_PROMPT, target: int | None = None) -> dict:
    """Each method's most causal unit at the hook, last position (``models``: label → Reconstructor)."""
    idx = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long)
    if target is None:
        logits, _ = lm(idx, last_only=True)
        target = int(logits[0, -1, : lm.config.real_vocab_size].argmax())
    base = _logp_last(lm, idx, target)
    h = read_hook(lm, idx, acts.hook)[0, -1].float()
    candidates: dict[str, list[tuple[int, torch.Tensor]]] = {}
    code = NativeCode(lm, acts)
    a_hat = code.atoms
    candidates["reFlow signals"] = [(j, (h @ a_hat[j]) * a_hat[j]) for j in range(code.S)]
    for label, m in models.items():
        xn = acts.normalize(h).unsqueeze(0)
        p = m.parts(xn)
        full = m.combine(p)
        z = p["z"][0]
        units = []
        for i in torch.nonzero(z > 0).ravel().tolist():
            if m.head is None:
                write = z[i] * m.sae.W_dec[:, i]
            else:
                zi = p["z"].clone()
                zi[0, i] = 0
                lin, inter = m.head.parts(zi, m.sae.k)
                write = (full - (m.sae.decode(zi) + lin + inter))[0]
            units.append((i, acts.denormalize(write)))
        candidates[label] = units
    out = {}
    T = idx.shape[1]
    for label, units in candidates.items():
        drops = []
        for unit, write in units:
            def fn(x, write=write):
                x = x.clone()
                x[0, T - 1] -= write.to(x.dtype)
                return x
            drops.append(base - _logp_last(lm, idx, target, acts.hook, fn))
        drops = np.array(drops)
        best = int(drops.argmax())
        direction = units[best][1] / units[best][1].norm().clamp_min(1e-12)
        out[label] = CausalUnit(method=label, unit=units[best][0], drop=float(drops[best]),
                                null_drop=float(np.median(np.delete(drops, best))) if len(drops) > 1 else float("nan"),
                                direction=direction, n_candidates=len(units))
    out_meta = {"target": target, "target_token": tokenizer.decode([target]), "logp": base,
                "p": float(np.exp(base)), "prompt": prompt}
    return {"units": out, **out_meta}


def unit_cosines(units: dict) -> pd.DataFrame:
    """|cos| between the methods' causal-unit directions (1 = the same residual direction)."""
    labels = list(units)
    D = torch.stack([units[l].direction for l in labels])
    return pd.DataFrame((D @ D.t()).abs().numpy(), index=labels, columns=labels)


def plot_native(sweep: pd.DataFrame, summary: pd.DataFrame, k: int):
    """FVU and spliced KL against L0: native code over k, and the SAE family at their L0."""
    import matplotlib.pyplot as plt

    has_kl = "kl" in sweep
    fig, axes = plt.subplots(1, 2 if has_kl else 1, figsize=(10 if has_kl else 5.5, 3.8), squeeze=False)
    for ax, col, name in zip(axes[0], ("fvu", "kl"), ("FVU (held-out)", "KL spliced (nats/token)")):
        ax.plot(sweep.k, sweep[col].clip(lower=1e-6), "-o", color="k",
                label="reFlow signals, read-out top-k (exact at k = S, drawn at 1e-6)")
        for variant, marker in (("sae", "s"), ("sae_wide", "D"), ("sae_linear", "v"), ("joint", "*"),
                                ("sequential", "^")):
            if variant in summary.index and col in summary:
                r = summary.loc[variant]
                yerr = None
                if np.isfinite(r.get(f"{col}_lo", np.nan)):  # log axis: keep the lower bar above zero
                    yerr = [[min(r[col] - r[f"{col}_lo"], 0.9 * r[col])], [r[f"{col}_hi"] - r[col]]]
                ax.errorbar([r["l0"]], [r[col]], yerr=yerr, fmt=marker, ms=8, capsize=3,
                            label=VARIANT_LABELS.get(variant, variant))
        ax.axvline(k, color="0.7", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("L0 (active units per token)")
        ax.set_ylabel(name)
    axes[0, 0].legend(fontsize=7.5)
    fig.tight_layout()
    return fig
