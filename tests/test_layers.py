"""The package's imports run one way (DESIGN.md): every import of ours, module-level or inside a
function, goes to the same layer or one below it, and no chain of imports comes back."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "detr_irpe"

BOTTOM = {"errors", "structures", "files", "optional", "panoptic_png"}
# layer -> the layers it may import besides itself (a layer may always import BOTTOM)
ALLOWED = {
    "errors": set(), "structures": set(), "files": set(), "optional": set(), "panoptic_png": set(),
    "irpe": set(),  # knows nothing of ours, not even the error classes
    "config": {"irpe"},
    "models": {"irpe", "config"},
    "data": {"config"},
    "evaluation": {"config"},
    "visualize": {"models", "data", "evaluation", "irpe", "config"},
    "interop": {"models", "irpe", "config"},
    "engine": {"visualize", "models", "data", "evaluation", "interop", "irpe", "config"},  # draws nothing itself
    "export": {"engine", "interop", "visualize", "models", "data", "evaluation", "irpe", "config"},
    "apps": {"engine", "export", "interop", "visualize", "models", "data", "evaluation", "irpe", "config"},
    "__main__": {"apps"},
    "__init__": {"apps"},  # the lazy ``from detr_irpe import Detector``
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def imports_of(path: Path):
    """The ``detr_irpe`` modules ``path`` imports, anywhere in the file, with line numbers."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "detr_irpe":
                continue
            for alias in node.names:  # ``from . import native`` imports a module
                candidate = f"{target}.{alias.name}"
                yield (candidate if _exists(candidate) else target), node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "detr_irpe":
                    yield alias.name, node.lineno


def _exists(module: str) -> bool:
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def import_graph():
    return {module_name(p): list(imports_of(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_layer_is_known():
    assert {layer(m) for m in import_graph()} <= set(ALLOWED)


@pytest.mark.parametrize("source", sorted(ALLOWED))
def test_imports_go_downward(source):
    wrong = [f"{module} imports {target} (line {line})"
             for module, targets in import_graph().items() if layer(module) == source
             for target, line in targets
             if layer(target) not in ALLOWED[source] | {source} | BOTTOM]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = {m: {t for t, _ in targets if t != m} for m, targets in import_graph().items()}
    # a package's __init__ re-exports its modules: importing it is importing them, not a cycle
    done, stack = set(), []

    def visit(module):
        if module in stack:
            cycle = stack[stack.index(module):] + [module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        stack.append(module)
        for target in graph.get(module, ()):
            if not (module.startswith(target + ".") and target in graph):  # a module importing its own package
                visit(target)
        stack.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_the_walker_sees_relative_and_function_level_imports():
    found = {t for t, _ in imports_of(PACKAGE / "irpe" / "attention.py")}
    assert {"detr_irpe.irpe.native", "detr_irpe.irpe.chunked", "detr_irpe.irpe.buckets"} <= found
    assert {t for t, _ in imports_of(PACKAGE / "__init__.py")} == {"detr_irpe.apps.detector"}  # inside __getattr__
