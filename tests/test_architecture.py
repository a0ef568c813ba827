"""The shape of the repository: import boundaries between packages and rooms, no import-time side effects.

Read with ``ast`` (nothing is imported; function-level and importlib imports count too), except the side-effect
checks, which import modules in a fresh interpreter and compare the process-wide state before and after.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dicom_node", "explain", "models")
FRAMEWORKS = ("tensorflow", "tf_keras", "keras", "jax", "jaxlib", "torch")
# Rooms that build or keep things and never decide what happens next (README, "Architecture").
LOWER_ROOMS = ("receive", "storage", "imaging", "outputs")
UPPER = ("dicom_node.process", "dicom_node.deliver", "dicom_node.node")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included), as absolute names."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ast.unparse(node.func) in ("importlib.import_module", "import_module", "__import__")):
            found.add(node.args[0].value)
    return found


def _sources(*packages: str) -> dict[str, Path]:
    return {_module_name(p): p for pkg in packages for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports_of(module: str, imports: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(i for i in imports if any(i == p or i.startswith(p + ".") for p in prefixes))


def test_benchmarks_never_import_the_tests() -> None:
    # bench/ runs without pytest and outside the test tree: what it shares with tests/ lives in the package or in
    # bench/ (tests may import bench, never the reverse).
    offenders = {name: _imports_of(name, _imports(path), ("tests",)) for name, path in _sources("bench").items()}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_models_and_explain_never_import_the_node() -> None:
    offenders = {
        name: _imports_of(name, _imports(path), ("dicom_node",)) for name, path in _sources("models", "explain").items()
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_only_models_and_explain_import_a_framework() -> None:
    offenders = {name: _imports_of(name, _imports(path), FRAMEWORKS) for name, path in _sources("dicom_node").items()}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_lower_rooms_never_import_process_deliver_or_the_node() -> None:
    offenders = {}
    for name, path in _sources("dicom_node").items():
        if name.split(".")[1:2] and name.split(".")[1] in LOWER_ROOMS:
            bad = _imports_of(name, _imports(path), UPPER)
            if bad:
                offenders[name] = bad
    assert offenders == {}


def _unit(module: str) -> str | None:
    """The unit of the package graph: a top-level package, or a room (subpackage) or top module of dicom_node."""
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return None
    return ".".join(parts[:2]) if parts[0] == "dicom_node" and len(parts) > 1 else parts[0]


def test_no_import_cycle_between_packages_or_rooms() -> None:
    sources = _sources(*PACKAGES)
    graph: dict[str, set[str]] = {}
    for name, path in sources.items():
        src = _unit(name)
        assert src is not None
        for imported in _imports(path):
            dst = _unit(imported)
            if dst is not None and dst != src and (dst in {_unit(n) for n in sources}):
                graph.setdefault(src, set()).add(dst)
    # Tarjan's strongly connected components: any component with more than one unit is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_package_reads_like_the_data_flow() -> None:
    node = ROOT / "dicom_node"
    modules = sorted(p.name for p in node.glob("*.py") if p.name != "__init__.py")
    assert len(modules) <= 8, modules
    for sub in sorted(p for p in node.iterdir() if p.is_dir() and not p.name.startswith("__")):
        init = sub / "__init__.py"
        assert init.is_file(), sub
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and len(doc.splitlines()) == 1, f"{sub.name}/__init__.py needs a one-line docstring"


def test_importing_the_package_changes_no_process_wide_state() -> None:
    script = textwrap.dedent(
        """
        import importlib, logging, pkgutil, warnings
        import cv2
        import pydicom.config

        def state():
            return (logging.getLogger("pynetdicom").level, pydicom.config.settings.reading_validation_mode,
                    len(warnings.filters), logging.getLogger().level, len(logging.getLogger().handlers),
                    cv2.getNumThreads())

        before = state()
        import dicom_node
        for info in pkgutil.walk_packages(dicom_node.__path__, "dicom_node."):
            importlib.import_module(info.name)
        after = state()
        assert before == after, (before, after)
        import sys
        assert "tensorflow" not in sys.modules, "importing dicom_node loaded TensorFlow"
        from dicom_node.startup import configure_process
        configure_process(log_to_stderr=False)
        assert state() != before, "configure_process changed nothing"
        assert cv2.getNumThreads() == 1, "OpenCV keeps its own thread pool"
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("module", ["dicom_node.outputs.secondary_capture", "dicom_node.node"])
def test_modules_that_used_to_change_globals_no_longer_do(module: str) -> None:
    # Kept apart from the sweep above so a failure names the module.
    script = (
        "import warnings, logging, pydicom.config\n"
        "n = len(warnings.filters); m = pydicom.config.settings.reading_validation_mode\n"
        f"import {module}\n"
        "assert len(warnings.filters) == n and pydicom.config.settings.reading_validation_mode == m\n"
        "assert logging.getLogger('pynetdicom').level == logging.NOTSET\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
