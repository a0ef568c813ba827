"""The shape of the repository: which top-level packages may import which (read with ``ast``, nothing imported)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmarks_never_import_the_tests() -> None:
    # bench/ runs without pytest and outside the test tree: what it shares with tests/ lives in the package or in
    # bench/ (tests may import bench, never the reverse). Function-level and importlib imports count too.
    offenders: dict[str, list[str]] = {}
    for path in sorted((ROOT / "bench").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        package = ".".join(path.relative_to(ROOT).parent.parts)
        names: list[str] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                names += [module] + [f"{module}.{alias.name}" for alias in node.names]
            elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                  and isinstance(node.args[0].value, str)
                  and ast.unparse(node.func) in ("importlib.import_module", "import_module", "__import__")):
                names.append(node.args[0].value)
        if bad := sorted({n for n in names if n == "tests" or n.startswith("tests.")}):
            offenders[str(path.relative_to(ROOT))] = bad
    assert offenders == {}
