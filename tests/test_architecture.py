"""The package's layers: imports point down only, no cycles, no private helpers across modules.

Layers (docs/architecture.md): core <- passes <- deployment, diagrams <- data, train <- io <- apps;
models beside (torch and timm only).
"""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "fxrelay"
MAY_IMPORT = {
    "core": {"core"},
    "passes": {"core", "passes"},
    "deployment": {"core", "passes", "deployment"},
    "diagrams": {"core", "passes", "diagrams"},
    "data": {"data"},
    "train": {"core", "passes", "deployment", "data", "train"},
    "io": {"core", "passes", "deployment", "data", "train", "io"},
    "apps": {"core", "passes", "deployment", "diagrams", "data", "train", "io", "apps", "models"},
    "models": {"models"},
}
# reason: the command line answers --help before torch is imported; these imports are for start-up time
LAZY_IMPORTS_ALLOWED = {"apps/cli.py", "io/zoo.py"}


def _modules() -> dict[str, ast.Module]:
    return {str(p.relative_to(PACKAGE)): ast.parse(p.read_text()) for p in PACKAGE.rglob("*.py")}


def _imports(path: str, tree: ast.Module) -> list[tuple[str, list[str], bool]]:
    """``(imported fxrelay module, imported names, inside a function)`` for every import of the package."""
    package = ["fxrelay", *pathlib.PurePath(path).parent.parts]
    found = []
    functions = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names = [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            module, names = next((a.name for a in node.names), ""), []
        else:
            continue
        if module.split(".")[0] == "fxrelay":
            found.append((module, names, id(node) in functions))
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


@pytest.mark.parametrize("path", sorted(p for p in _modules() if "/" in p))
def test_imports_point_down_only(path):
    layer = path.split("/")[0]
    for module, names, lazy in _imports(path, _modules()[path]):
        target = _layer(module)
        targets = {target} if target else {_layer(f"fxrelay.{n}") for n in names if not n.startswith("__")}
        assert targets <= MAY_IMPORT[layer], f"{path} ({layer}) imports {module} {names}"
        assert not lazy or path in LAZY_IMPORTS_ALLOWED, f"{path} imports {module} inside a function"
        private = [n for n in names if n.startswith("_") and not n.endswith("__")]
        assert not private, f"{path} uses private helpers of {module}: {private}"


def test_no_import_cycles_between_modules():
    graph: dict[str, set[str]] = {}
    for path, tree in _modules().items():
        name = "fxrelay." + path[:-3].replace("/", ".").removesuffix(".__init__")
        graph[name] = {m for m, _, lazy in _imports(path, tree) if not lazy}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in graph.get(node, ()):
            nxt = nxt if nxt in graph else nxt.rsplit(".", 1)[0]
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join([*trail, nxt])}"
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_private_torch_symbols_live_in_compat_only():
    for path, tree in _modules().items():
        if path == "core/_compat.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "torch":
                assert not any(p.startswith("_") for p in node.module.split(".")), f"{path}: from {node.module}"
                assert not any(a.name.startswith("_") for a in node.names), f"{path}: {node.module} private names"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch":
                assert not node.attr.startswith("_"), f"{path}: torch.{node.attr}"


def test_import_fxrelay_is_cheap():
    code = "import sys, fxrelay; print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _public(tree: ast.Module) -> set[str] | None:
    """A module's ``__all__`` as written, a literal list (None: it has none, or computes it)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            try:
                return set(ast.literal_eval(node.value))
            except ValueError:
                return None
    return None


def _defined(tree: ast.Module) -> set[str]:
    """The names a module binds at its top level (definitions, assignments, imports)."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def _defines_functions_or_classes(tree: ast.Module) -> bool:
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign)) for n in tree.body)


def test_every_module_lists_its_public_names_in_all_and_defines_them():
    # reason: the package root computes __all__ from its lazy export table (PEP 562); a layer's
    # __init__.py (a docstring) and __main__.py (runs the command line) define nothing
    modules = {p: t for p, t in _modules().items() if p != "__init__.py" and _defines_functions_or_classes(t)}
    missing = [p for p, t in modules.items() if _public(t) is None]
    assert not missing, f"modules without a literal __all__: {missing}"
    undefined = [f"{p}: {sorted(_public(t) - _defined(t))}" for p, t in modules.items() if _public(t) - _defined(t)]
    assert not undefined, f"__all__ names a module does not define: {undefined}"


def test_names_imported_across_modules_are_in_all():
    """A name another module or an example imports is the module's public API: it is in its ``__all__``.

    (Tests may import a module's private helpers to test them.)
    """
    modules = _modules()
    by_name = {"fxrelay." + p[:-3].replace("/", ".").removesuffix(".__init__"): t for p, t in modules.items()}
    examples = {f"../{p.relative_to(PACKAGE.parent)}": ast.parse(p.read_text())
                for p in (PACKAGE.parent / "examples").rglob("*.py")}
    missing = []
    for path, tree in {**modules, **examples}.items():
        for module, names, _ in _imports(path, tree):
            public = _public(by_name[module]) if module in by_name else None
            if public is None:
                continue
            missing += [f"{path}: {module}.{n}" for n in names if n not in public and not n.endswith("__")
                        and f"{module}.{n}" not in by_name]
    assert not missing, f"imported but missing from the source module's __all__: {missing}"


def test_import_fxrelay_registers_no_optimizer_hook():
    """Not by importing any module of the package (the guards included): with the first transformed model."""
    modules = sorted("fxrelay." + p[:-3].replace("/", ".").removesuffix(".__init__") for p in _modules()
                     if p != "__main__.py")
    code = ("import importlib, fxrelay, torch\nfrom torch.optim import optimizer\n"
            "before = len(optimizer._global_optimizer_pre_hooks)\n"
            "fxrelay.plan_of, fxrelay.transform, fxrelay.Trainer\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            "after_import = len(optimizer._global_optimizer_pre_hooks)\n"
            "fxrelay.transform(torch.nn.Sequential(torch.nn.Linear(4, 2)), 'standard')\n"
            "print(before, after_import, len(optimizer._global_optimizer_pre_hooks))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["0", "0", "1"]


def test_docs_architecture_names_every_module():
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    missing = [p for p in _modules() if not p.endswith("__init__.py") and "/" in p
               and pathlib.PurePath(p).name not in text and pathlib.PurePath(p).stem not in text]
    assert not missing, f"docs/architecture.md does not name {missing}"


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 450, 60


def _function_lines(f: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """A function's signature and code, its docstring not counted.

    reason: ``transform``'s signature and the documentation of its sixteen arguments alone
    take 60 lines; a limit meant to keep code readable should not shorten the user's help.
    """
    lines = f.end_lineno - f.lineno + 1
    first = f.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def _oversized() -> list[str]:
    found = []
    for path, tree in _modules().items():
        lines = len((PACKAGE / path).read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            found.append(f"{path}: {lines} lines")
        found += [f"{path}:{f.lineno} {f.name}: {_function_lines(f)} lines" for f in ast.walk(tree)
                  if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and _function_lines(f) > MAX_FUNCTION_LINES]
    return found


def test_no_module_over_450_lines_no_function_over_60():
    oversized = _oversized()
    assert not oversized, f"over {MAX_MODULE_LINES} lines a module or {MAX_FUNCTION_LINES} a function: {oversized}"
