"""A steering panel that answers in the static book: every setting of its controls precomputed.

A static page has no kernel, so nothing can be recomputed when a reader moves a control. What *can* happen in the
browser alone is switching between widgets that are already there: :func:`compute_grid` steers the model once for
every combination of the panel's controls — a direction from a fixed list, α from a few multiples of the median
residual norm ‖h‖, and a layer range (early / middle / late / all) — and stores, per cell, the greedy continuation
and the next-token top-k (with the unsteered probability of the same tokens). :func:`grid_widget` lays the cells out
as nested ipywidgets ``Stack`` containers (direction → layer range → α → cell) whose ``selected_index`` follows the
controls through ``jslink``: links live in the browser, so dragging α or choosing a direction changes what is shown
from the saved widget state alone (the vendored ``@jupyter-widgets/html-manager`` 1.0.15 renders ``Stack`` and
``Link``). In a live kernel the same widget switches between the same cells; for any prompt, the live
:class:`reflow_core.steering.SteeringPanel` recomputes (``make steer`` serves it with Voilà).

Each cell is one ``HTML`` widget; the widgets share one ``Layout`` and one style model, so the saved state stays
small (a few hundred kB for the default 5 × 4 × 7 grid).
"""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from reflow_core import tokenizer
from reflow_core.hooks import encode_prompt, expand_layers, last_logits, layer_hook_name
from reflow_core.steering import direction_for, random_directions

REL_ALPHAS = (-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0)  # α in units of the median residual norm ‖h‖
RANGE_NAMES = ("early", "middle", "late", "all")
N_CONCEPTS = 3  # concept directions on the panel (the first concept words with a recipe row of their own)
RANDOM_SEED = 20250  # the random direction's seed: the panel's null
TOP_K = 8
MAX_NEW_TOKENS = 12


def grid_ranges(n_layer: int) -> dict[str, tuple[int, int]]:
    """Inclusive layer-state ranges of the panel: the first third (early, as the Emotion Surgery), the second half
    (late), what lies between (middle: at least one layer state) and every layer state (all)."""
    third = max(0, round(n_layer / 3))
    half = min(n_layer, max(third + 1, round(n_layer / 2)))
    middle = (third + 1, half - 1) if half - 1 >= third + 1 else (third, half)
    return {"early": (0, third), "middle": middle, "late": (half, n_layer), "all": (0, n_layer)}


@dataclass
class GridDirection:
    """One direction of the panel: ``kind`` as :func:`reflow_core.steering.direction_for` takes it, or "random"."""

    label: str
    kind: str
    word: str = ""
    signal: int = 0


def default_directions(model, concepts: list[str]) -> list[GridDirection]:
    """Sentiment, the first :data:`N_CONCEPTS` concept words the model has a row of its own for, and one random
    direction (the null: any push of that size changes something)."""
    out = [GridDirection("sentiment (positive − negative)", "sentiment")]
    for word in concepts:
        if len(out) > N_CONCEPTS:
            break
        try:
            direction_for(model, "concept", word=word)
        except ValueError:
            continue
        out.append(GridDirection(f"concept {word.strip()!r}", "concept", word=word))
    out.append(GridDirection("random direction (null)", "random"))
    return out


@dataclass
class GridCell:
    direction: int  # index into SteeringGrid.directions
    layers: str  # a key of SteeringGrid.ranges
    rel_alpha: float
    alpha: float
    continuation: str
    top_tokens: list[str]
    top_probs: list[float]
    base_probs: list[float]  # the unsteered probability of each of top_tokens


@dataclass
class SteeringGrid:
    prompt: str
    unit_norm: float  # the median residual norm ‖h‖: α = rel_alpha · unit_norm
    directions: list[GridDirection]
    ranges: dict[str, tuple[int, int]]
    rel_alphas: list[float]
    baseline_continuation: str
    baseline_top_tokens: list[str]
    baseline_top_probs: list[float]
    cells: list[GridCell] = field(default_factory=list)

    def cell(self, direction: int, layers: str, rel_alpha: float) -> GridCell:
        for c in self.cells:
            if c.direction == direction and c.layers == layers and c.rel_alpha == rel_alpha:
                return c
        raise KeyError((direction, layers, rel_alpha))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "SteeringGrid":
        data = dict(data)
        data["directions"] = [GridDirection(**d) for d in data["directions"]]
        # the panel's order (early, middle, late, all), not the stored one: result files are written with sorted keys
        order = {n: i for i, n in enumerate(RANGE_NAMES)}
        data["ranges"] = {k: tuple(v) for k, v in sorted(data["ranges"].items(),
                                                         key=lambda kv: (order.get(kv[0], len(order)), kv[1]))}
        data["cells"] = [GridCell(**c) for c in data["cells"]]
        return cls(**data)


def _unit(model, d: GridDirection) -> torch.Tensor:
    if d.kind == "random":
        g = torch.Generator().manual_seed(RANDOM_SEED)
        return random_directions(1, model.config.d_model, generator=g, device=model.device)[0]
    return direction_for(model, d.kind, word=d.word, signal=d.signal).to(model.device)


def _round(p) -> float:
    """A probability to 6 significant digits: what the stored grid keeps (the page shows 3 decimals)."""
    return float(f"{float(p):.6g}")


def _decode_rows(ids: torch.Tensor) -> list[str]:
    return [tokenizer.decode(row) for row in ids.tolist()]


@torch.no_grad()
def compute_grid(model, prompt: str, unit_norm: float, directions: list[GridDirection], *,
                 rel_alphas=REL_ALPHAS, ranges: dict[str, tuple[int, int]] | None = None, top_k: int = TOP_K,
                 max_new_tokens: int = MAX_NEW_TOKENS) -> SteeringGrid:
    """Steer ``model`` on ``prompt`` for every direction × layer range × α (greedy, deterministic).

    The α values of one (direction, range) run as one batch: row b adds ``rel_alphas[b] · unit_norm · v̂`` to every
    layer state of the range, at every position — exactly :func:`reflow_core.steering.steer`'s injection.

    On the CPU the grid runs on one thread: its batches are a few rows of a few dozen tokens, where threads only
    wait for each other (on a busy 2-core machine, 1 s on one thread against 49 s on two for the test-scale grid)."""
    if model.device.type == "cpu":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _compute_grid(model, prompt, unit_norm, directions, rel_alphas=rel_alphas, ranges=ranges,
                                 top_k=top_k, max_new_tokens=max_new_tokens)
        finally:
            torch.set_num_threads(threads)
    return _compute_grid(model, prompt, unit_norm, directions, rel_alphas=rel_alphas, ranges=ranges, top_k=top_k,
                         max_new_tokens=max_new_tokens)


@torch.no_grad()
def _compute_grid(model, prompt, unit_norm, directions, *, rel_alphas, ranges, top_k, max_new_tokens) -> SteeringGrid:
    ranges = dict(ranges or grid_ranges(model.config.n_layer))
    rel_alphas = [float(a) for a in rel_alphas]
    idx = encode_prompt(model, prompt)
    n0 = idx.shape[1]
    base_logits = last_logits(model, idx)
    base_p = F.softmax(base_logits.float(), dim=-1)[0]
    vals, ids = base_p.topk(top_k)
    base_cont = _decode_rows(model.generate(idx, max_new_tokens, temperature=0.0)[:, n0:])[0]
    grid = SteeringGrid(prompt=prompt, unit_norm=float(unit_norm), directions=list(directions), ranges=ranges,
                        rel_alphas=rel_alphas, baseline_continuation=base_cont,
                        baseline_top_tokens=[tokenizer.decode([i]) for i in ids.tolist()],
                        baseline_top_probs=[_round(v) for v in vals])
    batch = idx.expand(len(rel_alphas), -1)
    scale = torch.tensor(rel_alphas, device=model.device, dtype=torch.float32)[:, None] * float(unit_norm)
    for d_i, direction in enumerate(directions):
        v = _unit(model, direction).float()
        add = (scale * (v / v.norm().clamp_min(1e-12)))[:, None, :]  # (n_alpha, 1, d)

        def hook(x, add=add):
            return x + add[: x.shape[0]].to(x.dtype)

        for name, layers in ranges.items():
            hooks = {layer_hook_name(model, l): hook for l in expand_layers(tuple(layers))}
            with model.hooks.attach(hooks):
                p = F.softmax(last_logits(model, batch).float(), dim=-1)
                out = model.generate(batch, max_new_tokens, temperature=0.0)
            conts = _decode_rows(out[:, n0:])
            top_p, top_i = p.topk(top_k, dim=-1)
            for b, rel in enumerate(rel_alphas):
                grid.cells.append(GridCell(
                    direction=d_i, layers=name, rel_alpha=rel, alpha=rel * float(unit_norm), continuation=conts[b],
                    top_tokens=[tokenizer.decode([i]) for i in top_i[b].tolist()],
                    top_probs=[_round(x) for x in top_p[b]], base_probs=[_round(base_p[i]) for i in top_i[b].tolist()]))
    return grid


# ----------------------------------------------------------------------------------------------
# Rendering: plain HTML per cell, ipywidgets Stacks around them


STYLE = """<style>
.reflow-steer p { margin: 0.2em 0; }
.reflow-steer table { border-collapse: collapse; font-size: 0.85em; margin: 0.3em 0 0 0 !important; width: auto; }
.reflow-steer td { padding: 1px 6px 1px 0; border: none; text-align: left; }
.reflow-steer .tok { font-family: monospace; white-space: pre; }
.reflow-steer .bar { width: 240px; }
.reflow-steer .bar div { background: #4c72b0; height: 0.9em; }
.reflow-steer .base { color: #c0662a; }
</style>"""


def rel_alpha_label(rel: float) -> str:
    return "0" if rel == 0 else f"{rel:+g}×"


def range_label(name: str, layers) -> str:
    lo, hi = layers
    return f"{name} (L{lo}–L{hi})" if lo != hi else f"{name} (L{lo})"


def cell_html(grid: SteeringGrid, cell: GridCell) -> str:
    """One cell: the steered continuation and its next-token bars (steered probability, unsteered in brackets; bar
    lengths relative to the largest probability of the cell)."""
    d = grid.directions[cell.direction]
    e = html.escape
    top = max([*cell.top_probs, *cell.base_probs, 1e-12])  # the longest bar spans the column
    rows = "".join(
        f"<tr><td class='tok'>{e(repr(t))}</td><td class='bar'><div style='width:{100 * p / top:.1f}%'></div></td>"
        f"<td>{p:.3f}</td><td class='base'>({b:.3f})</td></tr>"
        for t, p, b in zip(cell.top_tokens, cell.top_probs, cell.base_probs))
    return (f"<div class='reflow-steer reflow-steer-cell' data-direction='{cell.direction}' "
            f"data-layers='{e(cell.layers)}' data-rel-alpha='{cell.rel_alpha:g}'>"
            f"<p><b>steered</b> ({e(d.label)}, {e(range_label(cell.layers, grid.ranges[cell.layers]))}, "
            f"α = {cell.rel_alpha:g} × ‖h‖ = {cell.alpha:.3g}): {e(grid.prompt)}"
            f"<b class='reflow-steer-continuation'>{e(cell.continuation)}</b></p>"
            f"<table><tr><td></td><td>next token: steered (bar)</td><td></td><td class='base'>(unsteered)</td></tr>"
            f"{rows}</table></div>")


def header_html(grid: SteeringGrid) -> str:
    e = html.escape
    return (STYLE + f"<div class='reflow-steer'><p><b>unsteered:</b> {e(grid.prompt)}"
            f"<b>{e(grid.baseline_continuation)}</b></p></div>")


def grid_widget(grid: SteeringGrid):
    """The panel: direction, layer range and α controls over nested Stacks of the precomputed cells, linked in the
    browser (``jslink``), so the static page answers without a kernel. Returns the ipywidgets ``VBox``."""
    import ipywidgets as W

    direction = W.Dropdown(options=[(d.label, i) for i, d in enumerate(grid.directions)], value=0,
                           description="direction", layout=W.Layout(width="26em"))
    names = list(grid.ranges)
    layers = W.ToggleButtons(options=[(range_label(n, grid.ranges[n]), i) for i, n in enumerate(names)], value=0,
                             description="layers", style={"button_width": "auto", "description_width": "initial"})
    start = grid.rel_alphas.index(2.0) if 2.0 in grid.rel_alphas else len(grid.rel_alphas) - 1
    alpha = W.SelectionSlider(options=[(rel_alpha_label(a), i) for i, a in enumerate(grid.rel_alphas)],
                              value=start, description="α / ‖h‖", continuous_update=True,
                              layout=W.Layout(width="26em"))
    from ipywidgets.widgets.widget_string import HTMLStyle

    cell_layout, cell_style = W.Layout(), HTMLStyle()
    outer_children, links = [], []
    for d_i in range(len(grid.directions)):
        by_range = []
        for name in names:
            cells = [W.HTML(cell_html(grid, grid.cell(d_i, name, a)), layout=cell_layout, style=cell_style)
                     for a in grid.rel_alphas]
            stack = W.Stack(cells, selected_index=start)
            links.append(W.jslink((alpha, "index"), (stack, "selected_index")))
            by_range.append(stack)
        stack = W.Stack(by_range, selected_index=0)
        links.append(W.jslink((layers, "index"), (stack, "selected_index")))
        outer_children.append(stack)
    outer = W.Stack(outer_children, selected_index=0)
    links.append(W.jslink((direction, "index"), (outer, "selected_index")))
    box = W.VBox([W.HTML(header_html(grid)), direction, layers, alpha, outer])
    box.add_class("reflow-steer-grid")
    box._reflow_links = links  # keep the Link models alive with the panel
    return box
