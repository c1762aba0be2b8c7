"""What each scale of the book trains, on which data, for how long, and where its results live.

One papermill parameter, ``scale``, selects a row of :data:`SCALES`.  Chapters never hard-code sizes, steps or
experiment budgets: they read them here (:func:`get_scale`, :func:`budget`).  This module is data and paths only:
it imports nothing from the package beyond the configuration layer, and training or loading models at a scale lives
one layer up, in :mod:`reflow_core.runs`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from reflow_core.config import TrainConfig
from reflow_core.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Scale:
    name: str
    data_source: str  # a source known to reflow_core.data.prepare
    size: str  # model size suffix for presets: "<family>@<size>", or "paper" for the paper's configs
    train: dict = field(default_factory=dict)  # TrainConfig fields shared by every model at this scale
    seeds: tuple[int, ...] = (1337,)
    budgets: dict = field(default_factory=dict)  # chapter -> its experiment budget at this scale (see budget())
    description: str = ""
    device: str = "auto"  # where chapters evaluate trained models: auto (CUDA when there is one, else CPU) | cpu | cuda


# Experiment budgets per chapter.  "sae" fields are those of reflow_core.sae.train.SAEConfig's budget (width as a
# multiple of d, k, NFM embedding size, steps, batch, activation vectors, held-out windows for the spliced metrics,
# SAE seeds); "steering" the sizes of the random-direction and random-edit nulls; "followups" the loop monitor's
# generations; "bench" the Cost chapter's timing.
_SAE = {
    "test": dict(width_mult=4, k=8, embed_dim=16, steps=120, batch_size=256, n_train=6000, n_val=2000, n_windows=4,
                 n_seeds=2, lr=1e-3),
    "smoke": dict(width_mult=4, k=16, embed_dim=64, steps=600, batch_size=256, n_train=100_000, n_val=8192,
                  n_windows=8, n_seeds=3, lr=1e-3),
    # small: what fits the 9-minute slot beside training (the SAE suite runs on the CPU): smoke's recipe at d = 512
    "small": dict(width_mult=4, k=32, embed_dim=64, steps=400, batch_size=512, n_train=100_000, n_val=8192,
                  n_windows=8, n_seeds=2, lr=1e-3),
    "medium": dict(width_mult=8, k=32, embed_dim=128, steps=5_000, batch_size=4096, n_train=1_000_000,
                   n_val=65536, n_windows=32, n_seeds=3, lr=4e-4),
    "paper": dict(width_mult=16, k=64, embed_dim=256, steps=100_000, batch_size=4096, n_train=20_000_000,
                  n_val=262144, n_windows=64, n_seeds=3, lr=2e-4),
}
_STEERING = dict(n_random_emotion=32, n_prompts_inception=3, n_random_inception=2, n_null_hijack=8)
_FOLLOWUPS = {"test": dict(monitor_prompts=4, monitor_tokens=32)}
_FOLLOWUPS_DEFAULT = dict(monitor_prompts=12, monitor_tokens=64)
# Short at test; at smoke a few repeats on half the training micro-batch (the Cost chapter stays near 2 minutes).
_BENCH = {
    "test": dict(steps=2, warmup=1, repeats=2, batch=4),
    "smoke": dict(steps=2, warmup=1, repeats=3, batch=8),
}
_BENCH_DEFAULT = dict(steps=5, warmup=2, repeats=5, batch=None)


# The families that chapters 02 (training) and 08 (sparsity variants) train, per scale; a chapter leaves out what its
# scale does not train and says so in its text. Every chapter that compares recipe spaces needs CORE_FAMILIES.
CORE_FAMILIES = ("reflow", "gpt2-new", "reflow-topk")
_FAMILIES_ALL = {"training": ("reflow", "gpt2-new", "gpt2"),
                 "sparsity_variants": ("reflow", "reflow-topk", "reflow-rmg", "reflow-routed")}
_FAMILIES_CORE = {"training": ("reflow", "gpt2-new"), "sparsity_variants": ("reflow", "reflow-topk")}
_FAMILIES = {
    # smoke: the three core models at 1,100 steps fit 45 minutes on 2 cores (a pair, then Top-K alone on both cores);
    # six at 700 did too, but there reFlow's E did not yet show three↔four or misspellings (3 of 8 semantic controls
    # passed; 5 of 8 at 1,100), and four at 1,100 took 46 minutes. GPT-2 (untied; no claim rests on it), reFlow-RMG and
    # reFlow-Routed are what go: thread.soft_sparsity is not testable at smoke.
    "smoke": _FAMILIES_CORE,
    # small: three models fit the one-GPU slot, six do not
    "small": _FAMILIES_CORE,
}


def _budgets(name: str) -> dict:
    return {"sae": _SAE[name], "steering": _STEERING, "followups": _FOLLOWUPS.get(name, _FOLLOWUPS_DEFAULT),
            "bench": _BENCH.get(name, _BENCH_DEFAULT), "families": _FAMILIES.get(name, _FAMILIES_ALL)}


SMOKE_STEPS = 1100  # 2.25M tokens per model: what three models and every chapter fit in 45 minutes on 2 cores

SCALES: dict[str, Scale] = {
    "test": Scale(
        name="test",
        data_source="tiny",
        size="test",
        train=dict(
            max_steps=30, tokens_per_step=512, micro_batch_size=8, block_size=64,
            lr=3e-3, min_lr=3e-4, warmup_steps=5, eval_interval=10, eval_batches=2,
            ckpt_interval=10, log_interval=5, snapshots=True,
        ),
        budgets=_budgets("test"),
        description="toy models, a few steps: proves every notebook runs (CI)",
    ),
    # smoke: the default, two CPU cores. Compact vocabulary (the 8,192 most frequent ids of the training corpus own a
    # row; reflow_core.vocab), the offline smoke-mix (`make corpora`; the embedded Wikipedia alone where apt is
    # missing), and the recipe the sweep chose (reflow_core/assets/sweeps/smoke.json, fig-cost-sweep): lr 4e-3 at
    # 2,048 tokens per step beat 1e-3/2e-3/8e-3 and 8,192 tokens per step at an equal token budget. Every family trains
    # the same steps, so every comparison is at one token budget. Snapshots every 200 steps feed the competence figure.
    "smoke": Scale(
        name="smoke",
        data_source="smoke-mix",
        size="smoke",
        train=dict(
            max_steps=SMOKE_STEPS, tokens_per_step=2048, micro_batch_size=16, block_size=128,
            lr=4e-3, min_lr=4e-4, warmup_steps=40, eval_interval=100, eval_batches=20,
            ckpt_interval=200, log_interval=20, snapshots=True,
        ),
        budgets=_budgets("smoke"),
        description="6-layer d=128 models with a compact 8k vocabulary on an offline English mix; "
                    "whole book on 2 CPU cores in under 45 minutes",
    ),
    # small: what one H100 does in a 9-minute slot, install and every chapter included (reflow_core/offline.py).
    # reFlow's run gets time_budget_s: after 20 steps its measured step time fixes max_steps (≤ 20,000) so that it
    # ends on time; every other family and seed then trains those same steps (reflow_core.runs.ensure_model), so
    # the comparisons stay at one token budget. ~65K tokens/step. compile stays off: torch.compile's first step (tens
    # of seconds for these blocks) would be paid by each of the three runs out of a 60-second budget, against a gain
    # nobody has measured here yet (no GPU was lent); `--set compile=true` or the bench's --compile measures it.
    "small": Scale(
        name="small",
        data_source="small-mix",
        size="small",
        train=dict(
            max_steps=20_000, time_budget_s=60.0, compile=False, tokens_per_step=65536, micro_batch_size=32,
            block_size=1024,
            lr=1.5e-3, min_lr=1.5e-4, warmup_steps=50, eval_interval=100, eval_batches=10,
            ckpt_interval=250, log_interval=25, snapshots=True,
        ),
        budgets=_budgets("small"),
        description="reFlow-Small-class models (≈46M), three families at one seed, on one GPU in a 9-minute slot",
    ),
    # medium: about one GPU-hour: the same models, every family at three seeds (18 runs of ~3 minutes each).
    "medium": Scale(
        name="medium",
        data_source="small-mix",
        size="small",
        train=dict(
            max_steps=50_000, time_budget_s=180.0, tokens_per_step=131072, micro_batch_size=32, block_size=1024,
            lr=1.5e-3, min_lr=1.5e-4, warmup_steps=200, eval_interval=250, eval_batches=40,
            ckpt_interval=500, log_interval=25, snapshots=True,
        ),
        seeds=(1337, 1338, 1339),
        budgets=_budgets("medium"),
        description="reFlow-Small-class models (≈46M), every family at three seeds, on one GPU in about an hour",
    ),
    "paper": Scale(
        name="paper",
        data_source="openwebtext",
        size="paper",
        train=dict(
            max_steps=50000, tokens_per_step=491520, micro_batch_size=12, block_size=1024,
            lr=6e-4, min_lr=6e-5, warmup_steps=2000, eval_interval=1000, eval_batches=200,
            ckpt_interval=1000, log_interval=50,
        ),
        budgets=_budgets("paper"),
        description="the paper's configurations on OpenWebText (multi-GPU node, network for data)",
    ),
}

SCALE_NAMES: tuple[str, ...] = tuple(SCALES)
"""The scales, smallest first: their order is the order of precedence for the figures of record."""


class UnknownScaleError(UserError, ValueError):
    """A scale name that is not in :data:`SCALES`."""


def get_scale(name: str) -> Scale:
    if name not in SCALES:
        raise UnknownScaleError(f"unknown scale {name!r}; expected one of {', '.join(SCALE_NAMES)}")
    return SCALES[name]


def scale_rank(name: str) -> int:
    """Position of ``name`` in :data:`SCALE_NAMES` (``test`` = 0 …); raises for an unknown scale."""
    get_scale(name)
    return SCALE_NAMES.index(name)


def budget(scale: str, chapter: str) -> dict:
    """The experiment budget of ``chapter`` ("sae", "steering", "followups", "bench", "families") at ``scale``."""
    return dict(get_scale(scale).budgets[chapter])


def chapter_families(scale: str, chapter: str, candidates=None) -> tuple[str, ...]:
    """The families ``chapter`` ("training", "sparsity_variants") trains at ``scale``: its ``families`` budget,
    kept to ``candidates`` (in their order) when given."""
    trained = budget(scale, "families").get(chapter, _FAMILIES_ALL.get(chapter, ()))
    return tuple(f for f in (candidates if candidates is not None else trained) if f in trained)


def trained_families(scale: str) -> tuple[str, ...]:
    """Every family the book trains at ``scale`` (CORE_FAMILIES first), in the order they are trained."""
    out = list(CORE_FAMILIES)
    for families in budget(scale, "families").values():
        out += [f for f in families if f not in out]
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# Paths


def find_repo_root(start: str | os.PathLike | None = None) -> Path:
    """The nearest directory at or above ``start`` (default: the working directory) that holds ``_toc.yml``.

    Falls back to the checkout this package was imported from. Notebooks run with ``cwd=notebooks/``, so this
    finds the repository from inside a kernel as well as from a shell.
    """
    here = Path(start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "_toc.yml").is_file():
            return candidate
    if (REPO_ROOT / "_toc.yml").is_file():
        return REPO_ROOT
    raise UserError(f"no _toc.yml found at or above {here} (nor next to the reflow_core package)")


def resolve_results_dir(results_dir: str | os.PathLike | None, scale: str,
                        repo_root: str | os.PathLike | None = None) -> Path:
    """The results folder of a scale: ``results_dir`` if given, else ``<repo_root>/results/<scale>``.

    ``repo_root`` defaults to the repository found from the working directory (:func:`find_repo_root`). Notebooks call
    this on their ``results_dir`` parameter, which is ``""`` when they are opened by hand; a relative path (what the
    book runner injects) is taken from the repository root, so the executed notebooks of record never print a
    machine's absolute path.
    """
    scale_rank(scale)
    root = Path(repo_root).resolve() if repo_root else find_repo_root()
    if results_dir:
        path = Path(results_dir)
        return (path if path.is_absolute() else root / path).resolve()
    return root / "results" / scale


def results_dir_for(scale: str, results_dir: str | os.PathLike | None = None) -> Path:
    """The per-scale results folder (created); papermill passes an explicit one, "" means the default."""
    path = resolve_results_dir(results_dir, scale, REPO_ROOT)
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir_for(scale: str) -> Path:
    """Prepared token files live outside results/ so that every scale sharing a corpus shares them."""
    root = Path(os.environ.get("REFLOW_DATA_DIR", REPO_ROOT / "data"))
    return root / get_scale(scale).data_source


def preset_for(scale: str, family: str) -> str:
    return f"{family}@{get_scale(scale).size}"


def checkpoint_dir(scale: str, family: str, results_dir=None, seed: int | None = None) -> Path:
    seed = get_scale(scale).seeds[0] if seed is None else seed
    return results_dir_for(scale, results_dir) / "checkpoints" / f"{family}-seed{seed}"


def train_config(scale: str, family: str, results_dir=None, seed: int | None = None, **overrides) -> TrainConfig:
    """The TrainConfig of ``family`` at ``scale`` (one seed), with its run folder under the scale's results."""
    spec = get_scale(scale)
    seed = spec.seeds[0] if seed is None else seed
    fields = dict(
        spec.train,
        model=preset_for(scale, family),
        data_dir=str(data_dir_for(scale)),
        out_dir=str(checkpoint_dir(scale, family, results_dir, seed)),
        seed=seed,
    )
    fields.update(overrides)
    return TrainConfig.from_dict(fields)
