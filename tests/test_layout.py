"""The package's shape: one concept a module, dependencies pointing one way, and fedgan_utils as a thin face."""
import ast
import json
import re
from collections import defaultdict
from pathlib import Path

import fedgan_utils as fu

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fedgan"
NOTEBOOKS = sorted(REPO.glob("*.ipynb"))


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Each package module -> the package modules it imports (at any depth of its code)."""
    graph = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                graph[module_name(path)].add(node.module)
            elif isinstance(node, ast.Import):
                graph[module_name(path)].update(alias.name for alias in node.names)
    return graph


def test_no_package_module_imports_the_face_or_its_own_importers():
    graph = imports()
    assert not [m for m, deps in graph.items() if "fedgan_utils" in deps]
    internal = {m: {d for d in deps if d.startswith("fedgan.")} for m, deps in graph.items()}

    def reaches(start: str, goal: str, seen=()) -> bool:
        return any(d == goal or (d not in seen and reaches(d, goal, (*seen, d))) for d in internal.get(start, ()))
    cycles = [m for m in internal if reaches(m, m)]
    assert not cycles, f"import cycles through {cycles}"


def test_the_engine_knows_nothing_of_the_federation():
    above = {"fedgan.federation", "fedgan.experiments", "fedgan.strategies", "fedgan.metrics", "fedgan.checkpoints",
             "fedgan.plots", "fedgan.privacy", "fedgan.compression", "fedgan.partition"}
    for module, deps in imports().items():
        if module.startswith("fedgan.engine"):
            assert not deps & above, f"{module} imports {deps & above}"
    lower = {"fedgan.config", "fedgan.checks", "fedgan.environment"}  # the bottom imports nothing of the package
    for module in lower:
        assert not {d for d in imports()[module] if d.startswith("fedgan")} - lower, module


def test_only_the_flower_package_imports_flwr():
    """Flower is an optional extra: the notebooks and the rest of the package work without it."""
    outside = {m for m, deps in imports().items() if any(d == "flwr" or d.startswith("flwr.") for d in deps)
               and not m.startswith("fedgan.flower")}
    assert not outside, outside
    assert any(d.startswith("flwr") for d in imports()["fedgan.flower.client_app"])  # the check sees them
    face = {d for d in imports().get("fedgan", set())} | {d for m, deps in imports().items() for d in deps
                                                        if not m.startswith("fedgan.flower")}
    assert not {d for d in face if d.startswith("fedgan.flower")}, "only fedgan.flower imports fedgan.flower"


def test_every_module_fits_in_a_sitting():
    sizes = {path.relative_to(REPO).as_posix(): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert max(sizes.values()) <= 600, sorted(sizes.items(), key=lambda item: -item[1])[:3]


def test_the_face_defines_nothing_and_exports_what_it_imports():
    tree = ast.parse(Path(fu.__file__).read_text())
    imported = [alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom)
                for alias in node.names]
    assert all(isinstance(node, (ast.ImportFrom, ast.Assign, ast.Expr)) for node in tree.body)  # no def, no class
    assert [node.targets[0].id for node in tree.body if isinstance(node, ast.Assign)] == ["__all__"]
    assert fu.__all__ == imported and len(set(imported)) == len(imported)
    assert all(getattr(fu, name).__module__.startswith("fedgan") for name in fu.__all__
               if hasattr(getattr(fu, name), "__module__") and callable(getattr(fu, name)))


def test_every_name_the_notebooks_use_is_on_the_face():
    used = set()
    for notebook in NOTEBOOKS:
        cells = json.loads(notebook.read_text())["cells"]
        used |= {name for cell in cells if cell["cell_type"] == "code"
                 for name in re.findall(r"\bfu\.([A-Za-z]\w*)", "".join(cell["source"]))}  # __file__ is a module's own
    assert len(used) > 30, "the notebooks use the face"
    assert sorted(used - set(fu.__all__)) == []
