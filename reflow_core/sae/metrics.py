"""Held-out metrics for the SAE family, named as the field names them.

* **FVU** — fraction of variance unexplained, Σ‖x − x̂‖² / Σ‖x − x̄‖² over held-out vectors (0 = perfect).
* **L0** — mean number of active latents per token (k for a Top-K SAE, by construction).
* **dead fraction** — latents that never fire: ``dead_train`` with the final weights on the first 65,536 train
  vectors (the training distribution over a window of tokens, as Gao et al. and SAELens count dead latents — they
  count during training, which flatters: aux-k makes a dead latent fire now and then without making it useful;
  computed once by :func:`reflow_core.sae.train.train_reconstructor`; the SAE competence gate's measure) and
  ``dead_frac`` on the held-out vectors (stricter still: a latent of a rare word of the train documents may not fire
  on other documents); ``live`` = width × (1 − dead_train), reported beside the parameter count.
* **ΔCE and KL when spliced** — the reconstruction (normalisation undone) replaces the residual stream at the *same*
  hook it was read from, for every position of held-out windows; ΔCE = CE(spliced) − CE(clean) on next-token targets,
  KL = KL(p_clean ‖ p_spliced) per token. References: zero-ablation of the hook (the worst case) and a
  norm-matched random error x + ‖x − x̂‖·u, u a random unit vector (Gurnee 2024: is the SAE's error worse for the
  model than a random error of the same size?).
* **nonlinear increment** — the full model vs the same model trained with the linear term only.

The decoder-norm analysis reports each latent's norm beside its activation frequency and how far its decoder column
moved from initialisation (a low-norm mode made of latents that never fired would be an artefact of training, not an
"integration" code), and a contribution analysis that is not a ratio with the decoder norm in its denominator.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from reflow_core.sae.nfm import NFM


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained: squared error over the variance of x around its mean (0 = perfect)."""
    x, x_hat = x.detach(), x_hat.detach()
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12))


@torch.no_grad()
def reconstruction_metrics(model, x: torch.Tensor, batch: int = 4096) -> dict:
    """FVU (full, linear-only, SAE-path-only), L0, dead fraction and per-latent frequency on normalised ``x``."""
    outs = {"full": [], "linear_only": [], "sae_only": []}
    fired = torch.zeros(model.sae.width)
    l0 = 0.0
    for i in range(0, len(x), batch):
        p = model.parts(x[i:i + batch])
        outs["full"].append(model.combine(p))
        outs["linear_only"].append(model.combine(p, interaction=False))
        outs["sae_only"].append(p["sae"])
        active = p["z"] > 0
        fired += active.float().sum(0)
        l0 += float(active.float().sum())
    freq = fired / len(x)
    return {
        "fvu": fvu(x, torch.cat(outs["full"])),
        "fvu_linear_only": fvu(x, torch.cat(outs["linear_only"])),
        "fvu_sae_only": fvu(x, torch.cat(outs["sae_only"])),
        "mse": float((x - torch.cat(outs["full"])).pow(2).sum(-1).mean()),
        "l0": l0 / len(x),
        "dead_frac": float((freq == 0).float().mean()),
        "freq": freq.numpy(),
    }


# ----------------------------------------------------------------------------------------------
# Splicing into the language model


def splice_fn(model, acts, *, part: str = "full"):
    """Raw residual (B, T, d) → its reconstruction in raw units (normalise, reconstruct, undo the normalisation)."""

    def fn(x):
        flat = acts.normalize(x.reshape(-1, x.shape[-1]).float())
        p = model.parts(flat)
        x_hat = model.combine(p, interaction=part != "linear_only") if part != "sae_only" else p["sae"]
        return acts.denormalize(x_hat).reshape(x.shape).to(x.dtype)

    return fn


def random_error_fn(model, acts, seed: int = 0):
    """x + ‖x − x̂‖·u per token, u a random unit vector: an error as large as ``model``'s, in a random direction."""
    recon = splice_fn(model, acts)
    g = torch.Generator().manual_seed(seed)

    def fn(x):
        err = (x - recon(x)).norm(dim=-1, keepdim=True)
        u = torch.randn(x.shape, generator=g)
        return x + err * u / u.norm(dim=-1, keepdim=True)

    return fn


def zero_fn(x):
    return torch.zeros_like(x)


def identity_fn(x):
    return x


@torch.no_grad()
def splice_eval(lm, hook: str, fns: dict, windows: torch.Tensor, targets: torch.Tensor, *,
                batch_windows: int = 8) -> dict[str, dict]:
    """CE and KL of ``lm`` with each replacement ``fns[name]`` at ``hook``, against the clean model, same windows.

    The clean distribution is computed once per batch and shared by every replacement.
    """
    sums = {name: {"ce": 0.0, "kl": 0.0} for name in fns}
    ce_clean, n_tok = 0.0, 0
    for i in range(0, len(windows), batch_windows):
        x, y = windows[i:i + batch_windows], targets[i:i + batch_windows]
        logits, _ = lm(x)
        logp = F.log_softmax(logits.float(), -1)
        ce_clean += float(F.nll_loss(logp.flatten(0, 1), y.reshape(-1), reduction="sum"))
        p = logp.exp()
        for name, fn in fns.items():
            with lm.hooks.attach({hook: fn}):
                lg, _ = lm(x)
            lq = F.log_softmax(lg.float(), -1)
            sums[name]["ce"] += float(F.nll_loss(lq.flatten(0, 1), y.reshape(-1), reduction="sum"))
            sums[name]["kl"] += float((p * (logp - lq)).sum())
        n_tok += y.numel()
    out = {}
    for name, s in sums.items():
        ce = s["ce"] / n_tok
        out[name] = {"ce": ce, "ce_clean": ce_clean / n_tok, "delta_ce": ce - ce_clean / n_tok, "kl": s["kl"] / n_tok}
    return out


# ----------------------------------------------------------------------------------------------
# Every variant, every seed


RANDOM_REFERENCE_FOR = ("sae", "sae_wide", "joint")  # variants whose norm-matched random error is spliced too
PARTS_FOR = {"joint": ("sae_only", "linear_only"), "joint_paper": ("sae_only",)}  # partial reconstructions spliced


DEAD_CHECK_VECTORS = 65536  # train vectors on which a latent must fire at least once to count as live


def train_check(acts, n: int = DEAD_CHECK_VECTORS) -> torch.Tensor:
    """The first ``n`` train vectors (random windows of the train split), normalised: where dead latents are counted."""
    import numpy as np_

    return acts.normalize(torch.from_numpy(np_.asarray(acts.train[: min(n, len(acts.train))], dtype=np_.float32)))


@torch.no_grad()
def fired_on(model, x: torch.Tensor, batch: int = 8192) -> torch.Tensor:
    """Per latent: how many of the vectors ``x`` it fires on."""
    fired = torch.zeros(model.sae.width)
    for i in range(0, len(x), batch):
        fired += (model.sae.encode(x[i:i + batch]) > 0).float().sum(0)
    return fired


def dead_share(model, x: torch.Tensor) -> float:
    """Share of ``model``'s latents that fire on none of the vectors ``x``."""
    return float((fired_on(model, x) == 0).float().mean())


@torch.no_grad()
def evaluate_suite(models: dict, acts, lm=None, *, n_windows: int = 16, batch_windows: int = 8,
                   random_for=RANDOM_REFERENCE_FOR, parts_for=PARTS_FOR) -> pd.DataFrame:
    """One row per (variant, seed): FVU, L0, dead fractions (held-out and train), live latents and — with ``lm`` —
    ΔCE/KL spliced, with references.

    Every spliced forward pass costs a full output projection, so the random-error reference and the partial
    reconstructions (the seed's "joint minus NFM", linear-only) are spliced only for the variants named.
    """
    x = acts.val_normalized()
    rows, fns = [], {}
    for variant, ms in models.items():
        for i, m in enumerate(ms):
            r = reconstruction_metrics(m, x)
            r.pop("freq")
            summary = getattr(m, "summary", {})
            dead_train = summary.get("dead_train", math.nan)
            rows.append({"variant": variant, "seed_index": i, "params": m.num_params(), "width": m.sae.width, **r,
                         "dead_train": dead_train, "live": m.sae.width * (1 - dead_train),
                         "steps": summary.get("steps", math.nan)})
            fns[(variant, i, "full")] = splice_fn(m, acts)
            if variant in random_for:
                fns[(variant, i, "random")] = random_error_fn(m, acts, seed=i)
            for part in parts_for.get(variant, ()) if m.head is not None else ():
                fns[(variant, i, part)] = splice_fn(m, acts, part=part)
    df = pd.DataFrame(rows)
    if lm is None or len(acts.val_windows) == 0:
        return df
    fns[("zero", 0, "full")] = zero_fn
    w, t = acts.val_windows[:n_windows], acts.val_targets[:n_windows]
    res = splice_eval(lm, acts.hook, fns, w, t, batch_windows=batch_windows)
    for col in ("kl", "delta_ce", "kl_random", "delta_ce_random", "kl_sae_only", "delta_ce_sae_only",
                "kl_linear_only", "delta_ce_linear_only"):
        df[col] = np.nan
    for (variant, i, kind), r in res.items():
        if variant == "zero":
            continue
        sel = (df.variant == variant) & (df.seed_index == i)
        suffix = "" if kind == "full" else f"_{kind}"
        df.loc[sel, f"kl{suffix}"] = r["kl"]
        df.loc[sel, f"delta_ce{suffix}"] = r["delta_ce"]
    z = res[("zero", 0, "full")]
    df.attrs["zero_ablation"] = {"kl": z["kl"], "delta_ce": z["delta_ce"], "ce_clean": z["ce_clean"]}
    return df


def mean_ci(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and a t-interval over seeds (NaN half-width for one seed)."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    m = float(v.mean())
    if len(v) < 2:
        return m, math.nan, math.nan
    h = float(stats.t.ppf(0.5 + confidence / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return m, m - h, m + h


def summarize(df: pd.DataFrame, metrics=("fvu", "l0", "dead_frac", "dead_train", "live", "kl", "delta_ce",
                                         "kl_random", "delta_ce_random")) -> pd.DataFrame:
    rows = []
    for variant, g in df.groupby("variant", sort=False):
        row = {"variant": variant, "params": int(g.params.iloc[0]), "width": int(g.width.iloc[0]), "n_seeds": len(g)}
        for m in metrics:
            if m in g:
                row[m], row[f"{m}_lo"], row[f"{m}_hi"] = mean_ci(g[m])
        rows.append(row)
    return pd.DataFrame(rows).set_index("variant")


def paired_reduction(df: pd.DataFrame, metric: str, model: str, baseline: str) -> tuple[float, float, float]:
    """Per-seed 1 − model/baseline (as a %, positive = model better), mean and interval over seeds."""
    a = df[df.variant == model].sort_values("seed_index")[metric].to_numpy()
    b = df[df.variant == baseline].sort_values("seed_index")[metric].to_numpy()
    n = min(len(a), len(b))
    return mean_ci(100 * (1 - a[:n] / b[:n]))


def paired_p(df: pd.DataFrame, metric: str, model: str, baseline: str) -> float:
    """One-sided paired t-test over seeds that ``model``'s metric is lower than ``baseline``'s (log ratio, so that a
    constant relative gain is one effect); NaN with fewer than two seeds or no spread."""
    from scipy import stats

    a = df[df.variant == model].sort_values("seed_index")[metric].to_numpy(dtype=float)
    b = df[df.variant == baseline].sort_values("seed_index")[metric].to_numpy(dtype=float)
    n = min(len(a), len(b))
    d = np.log(a[:n]) - np.log(b[:n])
    d = d[np.isfinite(d)]
    if len(d) < 2 or d.std(ddof=1) == 0:
        return math.nan
    return float(stats.ttest_1samp(d, 0.0, alternative="less").pvalue)


def seed_style_reduction(df: pd.DataFrame, metric: str = "fvu", model: str = "joint") -> tuple[float, float, float]:
    """The seed's comparison: the joint model vs *itself with the NFM removed* (not an independent SAE)."""
    g = df[df.variant == model]
    only = {"fvu": "fvu_sae_only", "kl": "kl_sae_only"}[metric]
    return mean_ci(100 * (1 - g[metric].to_numpy() / g[only].to_numpy()))


# ----------------------------------------------------------------------------------------------
# Decoder norms, activation frequency, contributions


def effective_directions(model) -> torch.Tensor:
    """Each latent's total linear write, W_dec[:, i] + W_lin[:, i] (d × width): what the model can identify."""
    W = model.sae.W_dec.detach()
    lin = getattr(model.head, "linear", None) if model.head is not None else None
    return W + lin.weight.detach() if lin is not None else W


@torch.no_grad()
def norm_table(model, x: torch.Tensor, x_train: torch.Tensor | None = None) -> pd.DataFrame:
    """Per latent: decoder norm and squared norm, effective (decoder + linear) norm, held-out activation frequency,
    how often it fired on train vectors ``x_train`` (``fired_train``; a latent that never fires there got no gradient
    through the reconstruction), mean activation when firing, and how far the decoder column moved from its initial
    value."""
    r = reconstruction_metrics(model, x)
    z = torch.cat([model.parts(x[i:i + 4096])["z"] for i in range(0, len(x), 4096)])
    fires = (z > 0).float().sum(0)
    mean_act = z.sum(0) / fires.clamp_min(1)
    norms = model.sae.decoder_norms()
    init = getattr(model, "init_W_dec", None)
    moved = (model.sae.W_dec.detach() - init).norm(dim=0) / init.norm(dim=0) if init is not None else torch.full_like(norms, math.nan)
    return pd.DataFrame({
        "norm": norms.numpy(), "sq_norm": norms.pow(2).numpy(),
        "effective_norm": effective_directions(model).norm(dim=0).numpy(),
        "freq": r["freq"], "mean_act": mean_act.numpy(), "moved": moved.numpy(),
        "fired_train": (fired_on(model, x_train) if x_train is not None else fires).numpy(),
    })


BIMODAL_BIC_GAIN, BIMODAL_MIN_WEIGHT = 10.0, 0.05


def _mixture_stats(v: np.ndarray, seed: int) -> tuple:
    from sklearn.mixture import GaussianMixture

    g1 = GaussianMixture(1, random_state=seed).fit(v)
    g2 = GaussianMixture(2, random_state=seed, n_init=3).fit(v)
    mu, var = g2.means_.ravel(), g2.covariances_.ravel()
    D = float(math.sqrt(2) * abs(mu[1] - mu[0]) / math.sqrt(var.sum()))
    return g1, g2, D, float(g1.bic(v) - g2.bic(v))


def _em_ashman(x: np.ndarray, w: np.ndarray, mu: np.ndarray, var: np.ndarray, iters: int = 60) -> float:
    """Ashman's D of a two-component 1-D Gaussian mixture fitted by EM from a warm start (the bootstrap's refit)."""
    w, mu, var = w.copy(), mu.copy(), np.maximum(var.copy(), 1e-12)
    for _ in range(iters):
        logp = np.log(w) - 0.5 * np.log(2 * np.pi * var) - 0.5 * (x[:, None] - mu) ** 2 / var
        logp -= logp.max(1, keepdims=True)
        r = np.exp(logp)
        r /= r.sum(1, keepdims=True)
        nk = r.sum(0).clip(1e-12)
        w, mu = nk / len(x), (r * x[:, None]).sum(0) / nk
        var = np.maximum((r * (x[:, None] - mu) ** 2).sum(0) / nk, 1e-6 * x.var() + 1e-12)
    return float(math.sqrt(2) * abs(mu[1] - mu[0]) / math.sqrt(var.sum()))


def bimodality(values, seed: int = 0, *, n_boot: int = 0) -> dict:
    """Is a 1-D distribution bimodal? Two-component Gaussian mixture vs one by BIC, Ashman's D between the two
    components (> 2 = clean separation), the smaller component's weight, and Sarle's bimodality coefficient
    (> 0.555 suggests bimodality). Bimodal = BIC prefers 2 by > 10, D > 2, and the smaller weight ≥ 5%.

    With ``n_boot`` > 0, a percentile bootstrap over the values gives an interval for D (``ashman_lo``/``ashman_hi``):
    a D near 2 is a knife-edge that resampling the latents can tip either way."""
    from scipy import stats

    v = np.asarray(values, dtype=float).reshape(-1, 1)
    n = len(v)
    nan = {"bic_gain": math.nan, "ashman_d": math.nan, "ashman_lo": math.nan, "ashman_hi": math.nan,
           "min_weight": math.nan, "bimodality_coef": math.nan, "means": [math.nan, math.nan],
           "weights": [math.nan, math.nan], "low_mode": np.zeros(n, dtype=bool), "bimodal": False, "n": n}
    if n < 10 or float(v.std()) == 0.0:
        return nan
    g1, g2, D, d_bic = _mixture_stats(v, seed)
    mu = g2.means_.ravel()
    order = np.argsort(mu)
    skew, kurt = float(stats.skew(v.ravel())), float(stats.kurtosis(v.ravel()))
    bc = (skew**2 + 1) / (kurt + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3))) if n > 3 else math.nan
    w_min = float(g2.weights_.min())
    lo = hi = D
    if n_boot:
        rng = np.random.default_rng(seed)
        start = (g2.weights_.ravel(), mu, g2.covariances_.ravel())
        boots = [_em_ashman(v.ravel()[rng.integers(0, n, n)], *start) for _ in range(n_boot)]
        lo, hi = (float(q) for q in np.quantile(boots, [0.025, 0.975]))
    return {"bic_gain": d_bic, "ashman_d": D, "ashman_lo": lo, "ashman_hi": hi, "min_weight": w_min,
            "bimodality_coef": float(bc), "means": mu[order].tolist(), "weights": g2.weights_[order].tolist(),
            "low_mode": g2.predict(v).ravel() == order[0], "n": n,
            "bimodal": bool(d_bic > BIMODAL_BIC_GAIN and D > 2 and w_min >= BIMODAL_MIN_WEIGHT)}


@torch.no_grad()
def contributions(model, x: torch.Tensor, *, min_fires: int = 5) -> pd.DataFrame:
    """Per latent, averaged over the held-out tokens where it fires:

    * ``dec`` — ‖z_i W_dec[:, i]‖, its direct write through the SAE decoder;
    * ``lin`` — ‖z_i W_lin[:, i]‖, through the NFM's linear term;
    * ``inter`` — ‖MLP(pool) − MLP(pool without i)‖, what removing i from bi-interaction pooling changes
      (leave-one-out: pool₋ᵢ = pool − e_i ⊙ (Σ_j e_j − e_i), e_i = z_i v_i);
    * ``inter_per_act`` — ``inter`` / z_i: the interaction effect per unit of activation, which does *not* contain the
      decoder norm (the seed's share inter/(inter + dec) falls with the decoder norm by construction).
    """
    head = model.head
    if not isinstance(head, NFM) or head.V is None:
        raise TypeError("contributions need a model with an NFM interaction head")
    k = model.sae.k
    width = model.sae.width
    acc = {name: torch.zeros(width) for name in ("dec", "lin", "inter", "inter_per_act", "share")}
    count = torch.zeros(width)
    norms = model.sae.decoder_norms()
    lin_norms = head.linear.weight.norm(dim=0) if head.linear is not None else torch.zeros(width)
    for s in range(0, len(x), 2048):
        p = model.parts(x[s:s + 2048])
        values, idx = p["z"].topk(k, dim=-1)
        e = values.unsqueeze(-1) * head.V[idx]  # (B, k, E)
        S = e.sum(1, keepdim=True)
        pool = 0.5 * (S.pow(2) - e.pow(2).sum(1, keepdim=True))  # (B, 1, E)
        loo = pool - e * (S - e)  # (B, k, E)
        full = head.mlp(pool)  # (B, 1, d)
        inter = (full - head.mlp(loo)).norm(dim=-1)  # (B, k)
        dec = values * norms[idx]
        lin = values * lin_norms[idx]
        on = values > 0
        flat_idx = idx[on]
        count.index_add_(0, flat_idx, torch.ones_like(values[on]))
        for name, val in (("dec", dec), ("lin", lin), ("inter", inter),
                          ("inter_per_act", inter / values.clamp_min(1e-8)),
                          ("share", inter / (inter + dec).clamp_min(1e-12))):
            acc[name].index_add_(0, flat_idx, val[on])
    df = pd.DataFrame({name: (v / count.clamp_min(1)).numpy() for name, v in acc.items()})
    df["fires"] = count.numpy()
    df["norm"] = norms.numpy()
    df["effective_norm"] = effective_directions(model).norm(dim=0).numpy()
    return df[df.fires >= min_fires]


def contribution_tests(contrib: pd.DataFrame, norm_col: str = "norm") -> dict:
    """Spearman correlations of the decoder norm with the seed's share (biased by construction) and with the
    per-activation interaction effect (not)."""
    from scipy import stats

    out = {}
    for col in ("share", "inter_per_act", "inter"):
        rho, p = stats.spearmanr(contrib[norm_col], contrib[col])
        out[col] = {"rho": float(rho), "p": float(p)}
    out["n_latents"] = len(contrib)
    return out
