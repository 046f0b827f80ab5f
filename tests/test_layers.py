"""The import graph of ``src/reverie``: no cycles, and every module imports only its own layer or below.

Every import is parsed, those inside functions included (an import placed in a function to dodge a
cycle is still a dependency). The layers are those of ``shared/DESIGN.md`` and the package docstring
of ``reverie``: 1 core, 2 data, 3 model io, 4 use, 5 surfaces.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "reverie"

LAYERS = {  # module or package prefix -> layer; the longest matching prefix decides
    "reverie.utils": 1, "reverie.configs": 1, "reverie.schedules": 1, "reverie.process": 1, "reverie.denoisers": 1,
    "reverie.losses": 1, "reverie.guidance": 1, "reverie.likelihood": 1, "reverie.likelihood_ode": 1,
    "reverie.gmm": 1, "reverie.images": 1, "reverie.optional": 1, "reverie.weights": 1, "reverie.limits": 1,
    "reverie.vdm": 1, "reverie.mulan": 1, "reverie.precision": 1,
    "reverie.samplers": 1, "reverie.nets": 1, "reverie.text": 1, "reverie.discrete": 1,
    "reverie.sde": 1, "reverie.heat": 1, "reverie.pfgm": 1,
    "reverie.audio": 1, "reverie.sound": 4,
    "reverie.data": 2, "reverie.latent": 2, "reverie.layout": 2, "reverie.conditioning": 2,
    "reverie.modeldir": 3, "reverie.build": 3, "reverie.sd": 3,
    "reverie.sampling": 4, "reverie.train": 4, "reverie.language": 4, "reverie.provenance": 4, "reverie.editing": 4,
    "reverie.export": 4, "reverie.onnx_runtime": 4,
    "reverie": 5, "reverie.pipeline": 5, "reverie.eval": 5, "reverie.cli": 5, "reverie.demo": 5, "reverie.serve": 5,
    "reverie.__main__": 5,
}
CORE = ("reverie.schedules", "reverie.process", "reverie.denoisers", "reverie.losses", "reverie.samplers",
        "reverie.guidance", "reverie.nets")
NEVER_FROM_CORE = ("reverie.train", "reverie.pipeline", "reverie.cli", "reverie.eval")


def modules(src: Path = SRC) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package)."""
    found = {}
    for f in src.rglob("*.py"):
        parts = list(f.relative_to(src.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return found


def _targets(name: str, is_pkg: bool, node, known: dict) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    if node.level:
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]


def import_graph(src: Path = SRC, inside_functions_only: bool = False) -> dict[str, set[str]]:
    """Module -> the reverie modules it imports (anywhere in the file, or only inside functions)."""
    known, graph = modules(src), {}
    for name, (path, is_pkg) in known.items():
        graph[name] = set()
        tree = ast.parse(path.read_text())
        scopes = [f for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))] \
            if inside_functions_only else [tree]
        for node in (n for scope in scopes for n in ast.walk(scope)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(name, is_pkg, node, known):
                    while target not in known and "." in target:
                        target = target.rsplit(".", 1)[0]
                    if target.startswith("reverie") and target != name:
                        graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
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
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def layer(name: str) -> int:
    prefix = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def test_the_graph_is_read_whole():
    graph = import_graph()
    assert len(graph) > 60 and "reverie.build" in graph["reverie.train.diffusion"]
    assert "reverie.samplers.base" in graph["reverie.samplers.tuning"]  # relative imports resolve


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_has_a_layer():
    assert not [m for m in modules() if not any(m == p or m.startswith(p + ".") for p in LAYERS)]


@pytest.mark.parametrize("module", sorted(modules()))
def test_imports_stay_in_their_layer(module):
    graph = import_graph()
    upward = sorted(t for t in graph[module] if layer(t) > layer(module))
    assert not upward, f"{module} (layer {layer(module)}) imports from higher layers: {upward}"
    if module.startswith(CORE):
        assert not [t for t in graph[module] if t.startswith(NEVER_FROM_CORE)]


if __name__ == "__main__":  # the figures of the import graph: python tests/test_layers.py [path/to/src/reverie]
    import sys

    src = Path(sys.argv[1]) if len(sys.argv) > 1 else SRC
    graph, local = import_graph(src), import_graph(src, inside_functions_only=True)
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} import edges, "
          f"{sum(map(len, local.values()))} of them from inside functions; cycles: {cycles(graph) or 'none'}")
