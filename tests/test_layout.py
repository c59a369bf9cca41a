"""The house rules of issue 9, checked on the source: small modules, no import circle, the core
never importing an application (DESIGN section 18).

The import graph is read with ``ast`` from every module of ``src/entropy_probe`` (imports inside
functions count too: a lazy import still ties the two modules together).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "entropy_probe"
APPLICATIONS = (
    "entropy_probe.demo",
    "entropy_probe.validation",
    "entropy_probe.integrations",
    "entropy_probe.guard",
    "entropy_probe.cli",
    "entropy_probe.__main__",
)
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = ("entropy_probe",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every ``entropy_probe`` module ``path`` imports (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("entropy_probe")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("entropy_probe"):
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names}  # `from . import x` may name a module
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(p) if m in modules and m != name} for name, p in modules.items()}


def is_application(name: str) -> bool:
    return any(name == a or name.startswith(a + ".") for a in APPLICATIONS)


def test_no_module_is_longer_than_the_limit():
    long = {
        module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_there_is_no_import_circle():
    g = graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                # A package __init__ re-exporting its own submodules is not a circle of meaning.
                if not nxt.startswith(node + ".") and not node.startswith(nxt + "."):
                    raise AssertionError("import circle: " + " -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(g):
        if name not in state:
            visit(name, [name])


def test_the_core_never_imports_an_application():
    g = graph()
    wrong = {
        name: sorted(m for m in deps if is_application(m))
        for name, deps in g.items()
        if not is_application(name) and name != "entropy_probe"
    }
    assert not {k: v for k, v in wrong.items() if v}, wrong


def test_the_walk_sees_real_edges():
    """The checks above would pass on an empty graph: make sure the walk finds known imports."""
    g = graph()
    assert "entropy_probe.engines.backward" in g["entropy_probe.probe"] | g["entropy_probe.engines"]
    assert "entropy_probe.probe" in g["entropy_probe.demo.train"]
    assert "entropy_probe.vectors" in g["entropy_probe.engines.jvp"]
