"""The import graph of kat_jax has no cycles and never runs up a layer.

Every module under kat_jax/ (the bundled data in kat_jax/assets/ aside) is parsed with the standard
library's `ast`; every import counts, including those inside functions (a lazy import is still a
dependency). `import kat_jax.x` and `from kat_jax.x import name` (name not a submodule) count as
importing the package kat_jax.x, i.e. its __init__; `from kat_jax.x import sub` counts as importing
the submodule. A package's __init__ may import its own submodules (no cycle allowed, as anywhere).

The layers, bottom to top. A module may import its own layer (without cycles) and the layers below
it, never one above. ARCHITECTURE.md says why each package sits where it does.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = "kat_jax"
ROOT = pathlib.Path(__file__).resolve().parent.parent / PACKAGE
SKIP = ("assets",)   # bundled data (the SWE task repositories), not kat_jax code

# (layer, what it holds, module prefixes). A prefix matches the module and everything below it.
LAYERS: list[tuple[int, str, tuple[str, ...]]] = [
    (0, "root utilities", ("kat_jax.__init__", "kat_jax.atomic_io", "kat_jax.storage",
                           "kat_jax.jsonl", "kat_jax.multihost")),
    (1, "ops", ("kat_jax.ops",)),
    (2, "models, trees", ("kat_jax.models", "kat_jax.trees")),
    (3, "data, envs", ("kat_jax.data", "kat_jax.envs")),
    (4, "rollout, training", ("kat_jax.rollout", "kat_jax.training")),
    (5, "flow", ("kat_jax.flow",)),
    (6, "commands, cli", ("kat_jax.commands", "kat_jax.cli")),
]

# Packages of one layer that must not import each other at all (either direction): models and
# trees; rollout and training (ARCHITECTURE.md: agents never import the trainer, the trainer never
# sees an agent; flow, above both, is where they meet).
INDEPENDENT = [("kat_jax.models", "kat_jax.trees"), ("kat_jax.rollout", "kat_jax.training")]


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, pathlib.Path]:
    """Dotted name -> file of every module of kat_jax (packages by their __init__)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        if path.relative_to(ROOT).parts[0] in SKIP:
            continue
        out[module_name(path)] = path
    return out


def _resolve(name: str, modules: dict[str, pathlib.Path]) -> str | None:
    """The kat_jax module `name` denotes: itself, else its longest prefix that is a module."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """The kat_jax modules that module `name` imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    out.add(_resolve(alias.name, modules))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: from the module's package, up level - 1 more
                pkg = name.split(".") if is_package else name.split(".")[:-1]
                pkg = pkg[:len(pkg) - (node.level - 1)]
                base = ".".join([*pkg, base] if base else pkg)
            if base != PACKAGE and not base.startswith(PACKAGE + "."):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in modules else _resolve(base, modules))
    out.discard(None)
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer_of(module: str) -> tuple[int, str] | None:
    key = f"{module}.__init__" if module == PACKAGE else module
    for layer, what, prefixes in LAYERS:
        if any(key == p or key.startswith(p + ".") for p in prefixes):
            return layer, what
    return None


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path a -> ... -> a) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:   # Tarjan; the graph is a few hundred nodes, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)

    cycles = []
    for comp in components:   # shortest cycle through the component's first module (BFS)
        members, start = set(comp), comp[0]
        parent: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in parent:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w not in parent:
                        parent[w] = v
                        nxt.append(w)
            frontier = nxt
        path = [start]
        while path[-1] != start or len(path) == 1:
            path.append(parent[path[-1]])
        cycles.append(path[::-1])
    return cycles


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for a in sorted(graph):
        la = layer_of(a)
        for b in sorted(graph[a]):
            lb = layer_of(b)
            if la is None or lb is None:
                continue   # reported by test_every_module_has_a_layer
            if lb[0] > la[0]:
                out.append(f"{a} (layer {la[0]}: {la[1]}) imports {b} (layer {lb[0]}: {lb[1]})")
            for p, q in INDEPENDENT:
                if (_in(a, p) and _in(b, q)) or (_in(a, q) and _in(b, p)):
                    out.append(f"{a} imports {b}: {p} and {q} are independent")
    return out


GRAPH = import_graph()
CYCLES = find_cycles(GRAPH)
VIOLATIONS = layer_violations(GRAPH)
# The packages (and top-level modules) of kat_jax: each gets its own verdict below.
AREAS = sorted({".".join(m.split(".")[:2]) for m in GRAPH})


def test_the_graph_sees_lazy_imports_and_package_inits():
    assert "kat_jax.ops.block_sparse" in GRAPH["kat_jax.ops.attention_impls"]   # inside a function
    assert "kat_jax.ops.pallas" in GRAPH["kat_jax.ops.attention_impls"]         # a package
    assert "kat_jax.envs.calculator" in GRAPH["kat_jax.envs.registry"]          # from pkg import sub
    assert not any(m.startswith("kat_jax.assets") for m in GRAPH)


def test_cycle_finder_and_layer_check_catch_what_they_should():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    bad = layer_violations({"kat_jax.ops.dense": {"kat_jax.models.config"},
                            "kat_jax.trees.trie": {"kat_jax.models.config"},
                            "kat_jax.models.config": set()})
    assert bad == ["kat_jax.ops.dense (layer 1: ops) imports kat_jax.models.config (layer 2: models, "
                   "trees)", "kat_jax.trees.trie imports kat_jax.models.config: kat_jax.models and "
                   "kat_jax.trees are independent"]


def test_every_module_has_a_layer():
    missing = sorted(m for m in GRAPH if layer_of(m) is None)
    assert not missing, f"modules with no layer (add them to LAYERS): {missing}"


@pytest.mark.parametrize("area", AREAS)
def test_no_import_cycle(area):
    mine = [c for c in CYCLES if any(_in(m, area) for m in c)]
    assert not mine, "import cycles:\n" + "\n".join(" -> ".join(c) for c in mine)


@pytest.mark.parametrize("area", AREAS)
def test_no_import_runs_up_a_layer(area):
    mine = [v for v in VIOLATIONS if _in(v.split(" ", 1)[0], area)]
    assert not mine, "imports against the layer order:\n" + "\n".join(mine)
