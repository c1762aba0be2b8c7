"""The steering panel of the static book: every cell of the grid is what steer() gives at that setting, and the
widget shows it through nested Stacks linked to the controls in the browser (the browser itself: test_interactive)."""

import json

import pytest
import torch
from planted import identity_model

from reflow_core import steering, steering_grid
from reflow_core.experiments import emotion
from reflow_core.tokenizer import single_token_id as tid

PROMPT = "The service was terrible and the food was"


@pytest.fixture(scope="module")
def model():
    m = identity_model(n_layer=3, seed=1)
    with torch.no_grad():
        m.vocab.recipe[tid(" ocean")] *= 6  # a concept the injection can make win
    return m


@pytest.fixture(scope="module")
def grid(model):
    directions = steering_grid.default_directions(model, [" ocean", " cat", " dog", " music"])
    return steering_grid.compute_grid(model, PROMPT, 1.5, directions, rel_alphas=(-2.0, 0.0, 2.0, 8.0),
                                      max_new_tokens=4)


@pytest.mark.parametrize("n_layer", [1, 2, 3, 4, 6, 12, 36])
def test_layer_ranges_extend_the_emotion_surgerys(n_layer):
    ranges = steering_grid.grid_ranges(n_layer)
    assert list(ranges) == list(steering_grid.RANGE_NAMES)
    assert ranges["early"] == emotion.layer_ranges(n_layer)["early"]
    assert ranges["late"] == emotion.layer_ranges(n_layer)["late"]
    assert ranges["all"] == (0, n_layer)
    lo, hi = ranges["middle"]
    assert 0 <= lo <= hi <= n_layer


def test_every_cell_is_what_steer_gives_at_that_setting(model, grid):
    assert [d.kind for d in grid.directions] == ["sentiment", "concept", "concept", "concept", "random"]
    assert len(grid.cells) == 5 * 4 * 4
    for d_i, layers, rel in [(0, "early", 2.0), (1, "all", 8.0), (2, "late", -2.0), (3, "middle", 0.0)]:
        cell, d = grid.cell(d_i, layers, rel), grid.directions[d_i]
        out = steering.steer(model, steering.SteeringSpec(
            prompt=PROMPT, layers=grid.ranges[layers], alpha=rel * 1.5, kind=d.kind, word=d.word, max_new_tokens=4,
            top_k=steering_grid.TOP_K))
        assert cell.continuation == out.continuation and cell.top_tokens == out.top_tokens
        assert cell.top_probs == pytest.approx(out.top_probs, rel=1e-4, abs=1e-7)
        base = dict(zip(out.baseline_top_tokens, out.baseline_top_probs))
        assert all(b == pytest.approx(base[t], rel=1e-4) for t, b in zip(cell.top_tokens, cell.base_probs)
                   if t in base)
    assert grid.baseline_continuation == grid.cell(0, "early", 0.0).continuation
    assert grid.cell(1, "all", 8.0).top_tokens[0] == " ocean"  # the concept wins when pushed hard enough
    # the random direction is the seeded null, the same on every run
    again = steering_grid.compute_grid(model, PROMPT, 1.5, grid.directions[-1:], rel_alphas=(8.0,), max_new_tokens=4)
    assert again.cells[0].top_tokens == grid.cell(4, "early", 8.0).top_tokens


def test_grid_round_trips_through_its_json(grid):
    back = steering_grid.SteeringGrid.from_json(json.loads(json.dumps(grid.to_json())))
    assert back == grid
    # result files are written with sorted keys: the ranges come back in the panel's order all the same
    stored = steering_grid.SteeringGrid.from_json(json.loads(json.dumps(grid.to_json(), sort_keys=True)))
    assert list(stored.ranges) == list(grid.ranges) == list(steering_grid.RANGE_NAMES) and stored == grid


def test_the_widget_nests_stacks_linked_to_the_controls(grid):
    pytest.importorskip("ipywidgets")
    import ipywidgets as W

    box = steering_grid.grid_widget(grid)
    _, direction, layers, alpha, outer = box.children
    assert isinstance(outer, W.Stack) and len(outer.children) == len(grid.directions)
    links = box._reflow_links
    assert len(links) == 1 + len(grid.directions) * (1 + len(grid.ranges))
    assert all(type(link).__name__ == "Link" for link in links)
    pairs = {(id(l.source[0]), l.source[1], id(l.target[0]), l.target[1]) for l in links}
    assert (id(direction), "index", id(outer), "selected_index") in pairs
    names = list(grid.ranges)
    for d_i, by_range in enumerate(outer.children):
        assert (id(layers), "index", id(by_range), "selected_index") in pairs
        for r_i, by_alpha in enumerate(by_range.children):
            assert (id(alpha), "index", id(by_alpha), "selected_index") in pairs
            assert by_alpha.selected_index == alpha.index == grid.rel_alphas.index(2.0)
            for a_i, html in enumerate(by_alpha.children):
                cell = grid.cell(d_i, names[r_i], grid.rel_alphas[a_i])
                assert html.value == steering_grid.cell_html(grid, cell)
    # the saved state is small: shared layout and style, one HTML model per cell
    from ipywidgets.embed import dependency_state, embed_data

    state = embed_data(views=[box], state=dependency_state([box, *links]))["manager_state"]
    assert len(json.dumps(state)) < 400_000
    models = [m["model_name"] for m in state["state"].values()]
    assert models.count("HTMLModel") == len(grid.cells) + 1 and models.count("LinkModel") == len(links)
