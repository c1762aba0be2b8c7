"""Saving the book's figures: stable names, one style, and a stamp saying what produced each figure.

Every figure the notebooks write is cited by its file name (``fig-<chapter>-<name>.png|.svg``) and must say which
scale and checkpoint produced it (DESIGN.md, "Results of record"): :func:`save_figure` enforces the name, stamps
``scale · checkpoint · device · date`` in small grey type under the plot (so the provenance travels with the image,
even when it is copied out of the book), and writes PNG + SVG into ``<results_dir>/figures``. :func:`caption`
puts the same provenance into the figure's caption text.

Importing this module applies the book's matplotlib style (:func:`apply_style`) but never chooses a backend:
notebooks keep their inline backend, and headless scripts get matplotlib's own default (Agg without a display).
"""

from __future__ import annotations

import datetime as _dt
import functools
import os
import re
from pathlib import Path
from typing import Any

from reflow_core.scales import scale_rank

FIGURE_NAME_RE = re.compile(r"^fig-[a-z0-9]+(?:-[a-z0-9]+)+$")
"""``fig-<chapter>-<name>``: lowercase letters, digits and single hyphens, e.g. ``fig-02-loss-curves``."""

STAMP_GID = "reflow-provenance-stamp"
PNG_DPI = 150

_STYLE: dict[str, Any] = {
    "figure.figsize": (7.0, 4.2),
    "figure.dpi": 100,
    "savefig.dpi": PNG_DPI,
    "font.size": 10.5,
    "axes.titlesize": 12,
    "axes.labelsize": 10.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
    "lines.linewidth": 1.8,
    # deterministic SVG ids, so re-saving an unchanged figure gives an identical file (clean git diffs)
    "svg.hashsalt": "reflow-book",
    "svg.fonttype": "none",
}


def apply_style() -> None:
    """Apply the book's look: seaborn's white-grid style plus a few sizes. Safe to call more than once."""
    import matplotlib.style

    matplotlib.style.use("seaborn-v0_8-whitegrid")
    matplotlib.rcParams.update(_STYLE)


@functools.lru_cache(maxsize=1)
def device_description() -> str:
    """``"cuda:<GPU name> bf16"`` (with ``×N`` for several GPUs) or ``"cpu fp32"`` / ``"cpu bf16"``: the device and the
    precision training autocasts to there (:func:`reflow_core.device.auto_dtype`), as a stamp and RUN.json name them —
    a reader's number then says what produced it."""
    import torch

    from reflow_core.device import auto_dtype

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        where = f"cuda:{torch.cuda.get_device_name(0)}" + (f" ×{n}" if n > 1 else "")
        device = torch.device("cuda")
    else:
        where, device = "cpu", torch.device("cpu")
    return f"{where} {'bf16' if auto_dtype(device) == torch.bfloat16 else 'fp32'}"


def validate_figure_name(name: str) -> str:
    """Return ``name`` if it is a valid stable figure name (no suffix), else raise ``ValueError`` saying why."""
    if not isinstance(name, str) or not FIGURE_NAME_RE.fullmatch(name):
        raise ValueError(
            f"figure name {name!r} must look like 'fig-<chapter>-<name>' (lowercase letters, digits, single hyphens, "
            "no suffix), e.g. 'fig-02-loss-curves'"
        )
    return name


def _short_checkpoint(checkpoint: Any) -> str:
    """A checkpoint label for print: absolute paths shortened to their last two parts.

    Absolute paths are machine-specific (and would print a home directory into the book); the last two parts
    (``<run>/<file>``) identify the checkpoint within a results folder.
    """
    text = os.fspath(checkpoint) if isinstance(checkpoint, os.PathLike) else str(checkpoint)
    if os.path.isabs(text):
        parts = Path(text).parts
        text = "/".join(parts[-2:])
    return text


def provenance(*, scale: str, checkpoint: Any, device: str | None = None, date: _dt.date | None = None,
               note: str = "") -> str:
    """The stamp text: ``scale=… · checkpoint=… · device=… · YYYY-MM-DD`` (``· note`` appended if given)."""
    scale_rank(scale)
    parts = [f"scale={scale}", f"checkpoint={_short_checkpoint(checkpoint)}",
             f"device={device or device_description()}", (date or _dt.date.today()).isoformat()]
    if note:
        parts.append(note)
    return " · ".join(parts)


def stamp_figure(fig, text: str) -> None:
    """Put ``text`` in small grey type just below everything drawn on ``fig`` (replacing an earlier stamp).

    The stamp is placed under the figure's tight bounding box (axis labels and legends included), so it never
    overlaps the plot; ``bbox_inches="tight"`` (used here and by the inline backend) then includes it.
    """
    for artist in list(fig.texts):
        if artist.get_gid() == STAMP_GID:
            artist.remove()
    renderer = fig.canvas.get_renderer()
    bbox = fig.get_tightbbox(renderer)  # in inches
    width, height = fig.get_size_inches()
    # Figure-fraction coordinates (may be < 0): savefig(bbox_inches="tight") shifts transFigure to the crop box,
    # but not dpi_scale_trans, so an inch-positioned stamp would land off the cropped image.
    fig.text(bbox.x1 / width, (bbox.y0 - 0.04) / height, text, transform=fig.transFigure, ha="right", va="top",
             fontsize=6.5, color="0.45", gid=STAMP_GID)


def save_figure(fig, name: str, *, results_dir: str | os.PathLike, scale: str, checkpoint: Any,
                note: str = "") -> Path:
    """Stamp ``fig`` and write ``<results_dir>/figures/<name>.png`` (150 dpi) and ``.svg``; return the PNG path.

    ``name`` is the stable citation name ``fig-<chapter>-<name>`` (validated), ``checkpoint`` whatever identifies
    the weights that produced the plot (a run name, a step, a path). The figure stays open, so a notebook can
    still display it inline (with the stamp).
    """
    validate_figure_name(name)
    scale_rank(scale)
    if not results_dir:
        raise ValueError("results_dir is empty; resolve it first (reflow_core.scales.resolve_results_dir)")
    out_dir = Path(results_dir) / "figures"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp_figure(fig, provenance(scale=scale, checkpoint=checkpoint, note=note))
    png = out_dir / f"{name}.png"
    svg = out_dir / f"{name}.svg"
    # No creation date / software metadata: re-saving an unchanged figure yields an identical file.
    fig.savefig(png, dpi=PNG_DPI, bbox_inches="tight", pad_inches=0.08, metadata={"Software": None})
    fig.savefig(svg, bbox_inches="tight", pad_inches=0.08, metadata={"Date": None, "Creator": None})
    return png


def figure_glue_key(name: str) -> str:
    """The glue key of a figure in a chapter's text: its stable name with ``_`` for ``-``
    (``fig-signal-identity-geometry`` → ``fig_signal_identity_geometry``)."""
    return validate_figure_name(name).replace("-", "_")


def publish_figure(fig, name: str, *, results_dir: str | os.PathLike, scale: str, checkpoint: Any,
                   note: str = "") -> Path:
    """Save ``fig`` under its stable name (:func:`save_figure`), glue it for a ``{glue:figure}`` directive
    (:func:`figure_glue_key`) and close it, so it is shown once, where the text places it. Returns the PNG path."""
    import matplotlib.pyplot as plt

    from reflow_core.results import glue

    png = save_figure(fig, name, results_dir=results_dir, scale=scale, checkpoint=checkpoint, note=note)
    glue(figure_glue_key(name), fig)
    plt.close(fig)
    return png


def caption(text: str, *, scale: str, checkpoint: Any) -> str:
    """``text`` followed by ``(scale: …, checkpoint: …)``, for figure captions and glued figure descriptions."""
    scale_rank(scale)
    return f"{text.rstrip()} (scale: {scale}, checkpoint: {_short_checkpoint(checkpoint)})"


apply_style()
