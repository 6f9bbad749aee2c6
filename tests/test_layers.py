"""The package's layers: no import cycle among dsm_export's modules, and no module imports from a
layer above its own (function-local imports included)."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "dsm_export")

# Lowest first. A module's layer is its first name under dsm_export (``dsm_export.core.merge``: core).
LAYERS = (
    ("errors", "fileio", "checks", "data", "_version"),  # leaves: errors, files, user input, images
    ("core",),  # schedule, merge maths, patched ViT, FLOPs, timm models
    ("graph", "metrics"),  # ONNX export and graph facts; KL, agreement, cosine
    ("engines",),  # ONNX Runtime, INT8, OpenVINO, TensorRT
    ("check",),  # validate, evaluate, analyze, inspect's report
    ("search",),  # schedule and engine search, tune
    ("serving",),  # Triton model repository, server
    ("cli", "__main__", "api"),  # the command line and the Python API
)
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
TOP = len(LAYERS)  # the package's own __init__: the curated API


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[name[:-9] if name.endswith(".__init__") else name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: str) -> set[str]:
    """The dsm_export modules that ``name`` imports, anywhere in its body."""
    deps = set()
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name.split(".")[0] == "dsm_export"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.endswith("__init__.py") else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "dsm_export":
                module = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                deps.add(sub if sub in MODULES else module)
    return deps - {name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def layer(name: str) -> int:
    parts = name.split(".")
    return TOP if len(parts) == 1 else LAYER[parts[1]]


def test_every_module_has_a_layer():
    missing = sorted({n.split(".")[1] for n in MODULES if "." in n and n.split(".")[1] not in LAYER})
    assert not missing, f"modules with no layer in LAYERS: {missing}"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Each import of a module from a higher layer than the importer's."""
    return sorted(f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
                  for a, deps in graph.items() for b in deps if layer(b) > layer(a))


def test_no_import_from_a_higher_layer():
    wrong = upward_imports(GRAPH)
    assert not wrong, "\n".join(wrong)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """An import cycle of ``graph`` (module -> imported modules) as a path, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep.startswith(node + "."):  # a package importing its own submodules is not a cycle
                continue
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state and (found := visit(name)):
            return found
    return None


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, " -> ".join(cycle)


def test_the_checks_catch_a_cycle_and_an_upward_import():
    """The same checks on a graph with a cycle (function-local imports count) and an upward import."""
    bad = {**GRAPH, "dsm_export.core.merge": GRAPH["dsm_export.core.merge"] | {"dsm_export.graph.export"}}
    assert "dsm_export.core.merge (layer 1) imports dsm_export.graph.export (layer 2)" in upward_imports(bad)
    assert find_cycle(bad) is not None  # graph.export imports core.patch, which imports core.merge
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"p": {"p.sub"}, "p.sub": set()}) is None


def test_the_test_tree_follows_the_layers():
    """tests/<layer>/ holds the tests of one layer (package-wide tests, the CLI's and the API's sit in
    tests/ itself), so a layer's tests are found where its code is."""
    here = os.path.dirname(os.path.abspath(__file__))
    folders = sorted(d for d in os.listdir(here) if os.path.isdir(os.path.join(here, d)) and not d.startswith(("_", ".")))
    assert folders and all(d in LAYER for d in folders), folders
    names = [f for _, _, files in os.walk(here) for f in files if f.startswith("test_") and f.endswith(".py")]
    assert len(names) == len(set(names)), "two test files share a name (pytest's rootdir imports need unique names)"
