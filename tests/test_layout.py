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
    "entropy_probe.control",
    "entropy_probe.steer",
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


def with_parents(names: set[str]) -> set[str]:
    """Importing ``pkg.sub.mod`` runs ``pkg.sub``'s ``__init__`` first: it imports ``pkg.sub`` too. The root
    package is left out: its ``__init__`` runs before any module of it, whoever imports what."""
    out = set(names)
    for name in names:
        parts = name.split(".")
        out |= {".".join(parts[:k]) for k in range(2, len(parts))}
    return out


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {m for m in with_parents(imports_of(p)) if m in modules and m != name}
        for name, p in modules.items()
    }


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
    # a submodule counts as importing its package (its __init__ runs first)
    assert "entropy_probe.engines" in g["entropy_probe.sharded_passes"]


def test_a_circle_through_a_package_init_is_found():
    """The circle of issue 18 (the FSDP2 passes -> ``engines.projections``, whose package ``__init__``
    imported them back) is seen once ``pkg.sub.mod`` counts as importing ``pkg.sub``."""
    g = graph()
    g["entropy_probe.engines"] |= {"entropy_probe.sharded_passes"}  # the old line 12 (then in fsdp.py)
    state: dict[str, int] = {}
    found = []

    def visit(node: str) -> None:
        state[node] = 1
        for nxt in g[node]:
            if state.get(nxt) == 1 and not nxt.startswith(node + ".") and not node.startswith(nxt + "."):
                found.append((node, nxt))
            elif nxt not in state:
                visit(nxt)
        state[node] = 2

    for name in sorted(g):
        if name not in state:
            visit(name)
    assert found


MAX_REQUIRED_PARAMETERS = 6
MAX_FUNCTION_LINES = 60
SHORT_FUNCTIONS = {  # module path (under the package) -> functions that must fit on one screen
    "probe.py": ("EntropyProbe.run",),
    "validation/run.py": ("run_validation",),
    "demo/report.py": ("plot",),
    "validation/plots.py": ("calibration_plot",),
    "demo/train.py": ("rl_step",),
}


def functions(path: Path):
    """``(qualified name, node)`` of every function and method of the module at ``path``."""
    tree = ast.parse(path.read_text())

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield prefix + child.name, child
                yield from walk(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, prefix + child.name + ".")

    yield from walk(tree, "")


def required_parameters(fn: ast.FunctionDef) -> list[str]:
    """Parameters without a default, ``self`` and ``cls`` not counted."""
    a = fn.args
    positional = a.posonlyargs + a.args
    required = [p.arg for p in positional[: len(positional) - len(a.defaults)]]
    required += [p.arg for p, d in zip(a.kwonlyargs, a.kw_defaults) if d is None]
    return [p for p in required if p not in ("self", "cls")]


def test_no_function_takes_more_than_six_required_parameters():
    wide = {
        f"{module_name(p)}.{name}": len(req)
        for p in PACKAGE.rglob("*.py")
        for name, fn in functions(p)
        if len(req := required_parameters(fn)) > MAX_REQUIRED_PARAMETERS
    }
    assert not wide, f"functions with more than {MAX_REQUIRED_PARAMETERS} required parameters: {wide}"


def test_the_call_and_the_application_entry_points_fit_on_one_screen():
    long = {}
    for rel, names in SHORT_FUNCTIONS.items():
        found = dict(functions(PACKAGE / rel))
        for name in names:
            fn = found[name]
            n = fn.end_lineno - fn.lineno + 1
            if n > MAX_FUNCTION_LINES:
                long[f"{rel}:{name}"] = n
    assert not long, f"over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_size_checks_see_real_functions():
    """The checks above would pass on nothing: a known function is found, with its known parameters."""
    found = dict(functions(PACKAGE / "probe.py"))
    assert required_parameters(found["EntropyProbe._direction"]) == [
        "call",
        "source",
        "update_batch",
        "given",
    ]
