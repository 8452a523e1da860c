"""The package's shape: no import circles (function-level imports included), the kernel library
never imports the application, every module opens with the one line that says its concern, and
no module outside the kernels grows past ~350 lines."""
import ast
from pathlib import Path

import pytest

import fused_rnn

PACKAGE = Path(fused_rnn.__file__).parent
KERNEL_FILES = {"ops/triton_rnn.py", "ops/triton_persistent.py", "ops/triton_gated.py"}
EXTENSIONS = {"fused_rnn._C"}  # the C++ extension: a module even where it is not built yet


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str, root: Path) -> bool:
    """Whether ``name`` (dotted, under the package) is a module or package here (.py, folder or
    a compiled extension)."""
    path = root.parent.joinpath(*name.split("."))
    return (name in EXTENSIONS or path.with_suffix(".py").exists() or (path / "__init__.py").exists()
            or any(path.parent.glob(path.name + ".*.so")) or any(path.parent.glob(path.name + ".*.pyd")))


def import_graph(root: Path) -> dict:
    """``{module: {modules of the package it imports}}`` from every import statement of every
    .py file under ``root`` (at any depth: inside functions too). ``from pkg import name``
    counts as importing ``pkg.name`` when that is a module, else ``pkg``."""
    top = root.name
    graph = {}
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if is_module(f"{base}.{a.name}", root) else base for a in node.names]
            else:
                continue
            for target in targets:
                if target == top or target.startswith(top + "."):
                    while target and not is_module(target, root):  # e.g. ``import a.b.c`` of a name
                        target = target.rpartition(".")[0]
                    if target and target != name:
                        edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict):
    """One import circle as a list ``[a, b, ..., a]``, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_circle():
    graph = import_graph(PACKAGE)
    assert "fused_rnn.app.cli" in graph and "fused_rnn.app.training" in graph["fused_rnn.app.cli"]
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_kernel_library_never_imports_the_application():
    graph = import_graph(PACKAGE)
    library = [m for m in graph if not m.startswith("fused_rnn.app") and m != "fused_rnn.__main__"]
    wrong = {m: sorted(t for t in graph[m] if t.startswith("fused_rnn.app")) for m in library}
    assert not any(wrong.values()), wrong


@pytest.mark.parametrize("files, cycle", [
    ({"a.py": "from . import b", "b.py": "def f():\n    from .a import x\n"}, True),  # inside a function
    ({"a.py": "import pkg.b", "b.py": "from pkg.sub import c", "sub/__init__.py": "", "sub/c.py": "from ..a import y"},
     True),
    ({"a.py": "from . import b", "b.py": "import os", "__init__.py": "from .a import x"}, False),
], ids=["function-level", "across-folders", "none"])
def test_the_circle_finder_itself(files, cycle, tmp_path):
    root = tmp_path / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    assert (find_cycle(import_graph(root)) is not None) == cycle


def python_files():
    return sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", python_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_says_its_concern_and_stays_small(path):
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    assert doc and doc.strip().splitlines()[0], f"{path.name}: no opening docstring line"
    if str(path.relative_to(PACKAGE)) not in KERNEL_FILES:
        lines = len(path.read_text(encoding="utf-8").splitlines())
        assert lines <= 360, f"{path.name}: {lines} lines"


def test_nothing_calls_torchscript():
    """pytest.ini silences torch's own `torch.jit.script` deprecation (its forward-mode AD loads
    jvp decompositions with it); that is sound only while no code or test here calls torch.jit."""
    root = PACKAGE.parent
    files = python_files() + sorted((root / "tests").rglob("*.py")) + sorted((root / "benchmarks").rglob("*.py"))
    users = [str(p.relative_to(root)) for p in files
             if "torch.jit" in p.read_text(encoding="utf-8") and p.name != "test_architecture.py"]
    assert not users, users


# Where a cell's name may be spelled out: its spec, the kernels switched on it, and the oracle.
CELL_NAME_FILES = {"cells.py", "reference.py", "ops/triton_rnn.py", "ops/triton_persistent.py",
                   "ops/triton_cells.py", "ops/triton_gated.py"}


def cell_name_literals(path: Path) -> list:
    """Lines of ``path`` where a string literal names a cell (docstrings aside)."""
    from fused_rnn.cells import CELLS

    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
            and node.value in CELLS]


def test_only_the_cell_spec_kernels_and_reference_name_cells():
    """Everything above the kernels takes a `cells.Cell`: adding a cell touches its spec, its
    pointwise maths per backend, its reference and its tests."""
    offenders = {str(p.relative_to(PACKAGE)): lines for p in python_files()
                 if str(p.relative_to(PACKAGE)) not in CELL_NAME_FILES and (lines := cell_name_literals(p))}
    assert not offenders, offenders


def test_the_cell_name_finder_itself(tmp_path):
    path = tmp_path / "m.py"
    path.write_text('"""course"""\ndef f(cell):\n    """elman_relu"""\n    return cell == "course"\n')
    assert cell_name_literals(path) == [4]
