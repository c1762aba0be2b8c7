"""The package reads top down: no import cycle inside reflow_core, counting imports inside functions too.

Parses every module with ``ast`` (nothing is imported), resolves ``import``/``from … import`` statements to
reflow_core modules wherever they stand, and fails on any strongly connected component of more than one module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import reflow_core

PACKAGE_DIR = Path(reflow_core.__file__).resolve().parent


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The reflow_core modules ``name`` imports anywhere in its body (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule when there is one, else a name of pkg itself
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import reflow_core.x.y` also runs x's __init__
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    names = module_names()
    return {name: imports_of(name, path, set(names)) for name, path in names.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_in_the_package():
    found = cycles(import_graph())
    assert not found, "import cycles inside reflow_core:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_cycle_finder_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_inside_functions_count(tmp_path):
    mod = tmp_path / "m.py"
    mod.write_text("def f():\n    from reflow_core import model\n")
    assert imports_of("reflow_core.x", mod, {"reflow_core", "reflow_core.model", "reflow_core.x"}) == {
        "reflow_core.model"}


CONFIG_LEVEL = {"reflow_core", "reflow_core.config", "reflow_core.errors", "reflow_core.fileio"}


def test_scales_imports_only_the_configuration_layer():
    assert import_graph()["reflow_core.scales"] <= CONFIG_LEVEL


def test_lower_layers_never_import_the_upper_ones():
    graph = import_graph()
    top = {"reflow_core.book", "reflow_core.cli", "reflow_core.__main__", "reflow_core.offline",
           "reflow_core.steer_app"}
    top |= {n for n in graph if n.startswith("reflow_core.chapters")}
    experiments = {n for n in graph if n.startswith("reflow_core.experiments")}
    for name, deps in graph.items():
        if name not in top:
            assert not deps & top, f"{name} imports the top layer: {sorted(deps & top)}"
        if name.startswith("reflow_core.chapters"):
            assert not deps & {"reflow_core.book", "reflow_core.cli", "reflow_core.offline"}, \
                f"{name} imports the runner or the CLI"
        if name not in experiments and name not in top:
            assert not deps & experiments, f"{name} imports experiments: {sorted(deps & experiments)}"


def test_one_layer_numbering():
    """h_0 is the embedding output (block 0's input), h_l the output of block l−1, for hooks and the SAE alike."""
    from reflow_core import hooks
    from reflow_core.config import get_config
    from reflow_core.model import build_model

    torch.manual_seed(0)
    model = build_model(get_config("reflow@test", n_layer=3)).eval()  # random blocks: every state differs
    L = model.config.n_layer
    assert hooks.layer_hook_name(model, 0) == "blocks.0.resid_pre"
    assert [hooks.layer_hook_name(model, l) for l in range(1, L + 1)] == [f"blocks.{i}.resid_post" for i in range(L)]
    idx = torch.tensor([[464, 3139, 286]])
    states = hooks.residual_states(model, idx)
    assert states.shape[0] == hooks.n_states(model) == L + 1
    for layer in range(L + 1):  # reading one state (forward stopped early) gives the same tensor as the full pass
        torch.testing.assert_close(hooks.read_hook(model, idx, hooks.layer_hook_name(model, layer)), states[layer])
    assert not torch.allclose(states[1], states[2])
    torch.testing.assert_close(model.norm_final(states[L]), model.norm_final(model.residual(idx)))
    with pytest.raises(ValueError):
        hooks.layer_hook_name(model, L + 1)
