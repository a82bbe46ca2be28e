"""The package imports one way: (_deferred_compile) -> parallel -> data -> transformer -> models -> checkpoint ->
the parts' plain-torch inference forms -> parts (the registry, and the model a config assembles from it) -> config
-> training -> the commands (inference, export, generate, evaluate, plan) -> cli. Every import of the package is
read from the source, those inside functions included, so a deferred import cannot hide a cycle or an import
against the order. data_tools (building datasets) stands apart: it imports nothing of megatron_p2t."""
import ast
import os

from tests.conftest import ROOT

PKG = "megatron_p2t"
# lowest first; a module may import its own layer and the layers below it
LAYERS = [
    ["_deferred_compile"],  # installed by the package's __init__ before anything imports megatron-core
    ["parallel"],
    ["data"],
    ["transformer"],
    ["models"],
    ["checkpoint"],
    ["hf"],             # the parts in plain torch, transformers + torch alone
    ["parts"],
    ["config"],
    ["training"],
    ["inference", "evaluation", "export", "plan", "hf_model"],
    ["cli", "__main__"],
]


def modules() -> dict:
    out = {}
    for d, _, files in os.walk(os.path.join(ROOT, PKG)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def imports(mods: dict) -> dict:
    """module -> {imported module of the package: line}, every import statement of the file."""
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(open(path).read(), path)
        found = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = name.split(".")[:-node.level] if not path.endswith("__init__.py") else name.split(".")
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t.startswith(PKG + ".") and t != name and t != PKG:
                    found.setdefault(t, node.lineno)
        graph[name] = found
    return graph


def layer_of(module: str) -> int:
    top = module.split(".")[1]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: in no layer of tests/test_layers.py; place it in LAYERS")


def test_every_module_has_a_layer():
    for m in modules():
        if m != PKG:
            layer_of(m)


def test_no_import_runs_against_the_layers():
    graph = imports(modules())
    against = [f"{a} (layer {LAYERS[layer_of(a)]}) imports {b} (layer {LAYERS[layer_of(b)]}) at line {line}"
               for a, deps in graph.items() if a != PKG for b, line in deps.items() if layer_of(b) > layer_of(a)]
    assert not against, "\n".join(against)


def test_no_import_cycles():
    graph = imports(modules())
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for d in graph.get(m, {}):
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_data_tools_imports_nothing_of_the_training_package():
    """data_tools builds datasets on machines without the training stack (and megatron_p2t reads what it writes):
    the dependency runs from megatron_p2t to data_tools only."""
    found = []
    for d, _, files in os.walk(os.path.join(ROOT, "data_tools")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                for node in ast.walk(ast.parse(open(path).read(), path)):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                        [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                    found += [f"{os.path.relpath(path, ROOT)}:{node.lineno} imports {n}" for n in names
                              if n == PKG or n.startswith(PKG + ".")]
    assert not found, "\n".join(found)


def test_no_stage_imports_another_stages_module():
    """Each training stage is one module over the one driver; what stages share lives below them (joined.py,
    batches.py, the trainer), so adding a stage touches no other stage."""
    stages = {m for m in modules() if m.startswith(f"{PKG}.training.stages.")}
    graph = imports(modules())
    crossing = [f"{a} imports {b}" for a in sorted(stages) for b in graph[a] if b in stages]
    assert stages and not crossing, "\n".join(crossing)
