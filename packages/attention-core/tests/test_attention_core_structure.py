"""The shape of attention_core's source: no import cycle, no module over 500 lines, every op
in its own package (DESIGN.md "One op, one place")."""

from __future__ import annotations

import ast
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

import attention_core

PACKAGE = Path(attention_core.__file__).parent
MAX_LINES = 500
OP_PACKAGES = (
    "causal_product",
    "local_product",
    "sparse_product",
    "aggregate",
    "hashing",
    "clustering/hamming",
    "linear_step",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def module_level_imports(name: str) -> set[str]:
    """The attention_core modules that ``name`` imports when it is imported: the import
    statements outside functions (imports inside a function run at call time)."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if is_package(name) else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in child.names)
            visit(child)

    visit(tree)
    return {m for m in found if m in MODULES and m != name}


def test_no_import_cycle():
    graph = {name: module_level_imports(name) for name in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                walk(nxt)
        path.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name)


def test_the_graph_sees_imports():
    """The cycle test would pass vacuously if the parser found no edges."""
    edges = module_level_imports("attention_core.causal_product")
    assert "attention_core.causal_product._op" in edges
    assert "attention_core._extension" in edges
    # the ops and their Triton kernels share the argument checks of a leaf module
    for user in ("_op", "_triton"):
        assert "attention_core.causal_product._validation" in module_level_imports(
            f"attention_core.causal_product.{user}"
        )
    # the Triton module is imported inside a function (on the first CUDA call) only
    assert "attention_core.causal_product._triton" not in module_level_imports(
        "attention_core.causal_product._op"
    )


def test_shared_checks_are_a_leaf():
    assert module_level_imports("attention_core.checks") == set()
    assert module_level_imports("attention_core._checks") == {"attention_core.checks"}
    for op in ("aggregate", "causal_product", "local_product", "sparse_product"):
        imported = module_level_imports(f"attention_core.{op}._validation")
        assert not {f"attention_core.{op}._op", f"attention_core.{op}._triton"} & imported


def test_every_module_imports_in_random_order():
    """Each module imported in a fresh interpreter, in a shuffled order, first: a cycle that
    depends on which module comes first fails here. The Triton modules need triton."""
    names = [n for n in MODULES if not n.endswith("._triton")]
    rng = random.Random(15)
    script = (
        "import importlib, json, sys\n"
        "failed = {}\n"
        "for name in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as error:\n"
        "        failed[name] = repr(error)\n"
        "print(json.dumps(failed))\n"
    )
    for _ in range(6):  # fresh interpreters, each with another order
        order = rng.sample(names, len(names))
        result = subprocess.run(
            [sys.executable, "-c", script, json.dumps(order)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert json.loads(result.stdout.strip().splitlines()[-1]) == {}


def test_no_module_over_500_lines():
    long = {
        name: n
        for name, path in MODULES.items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"modules over {MAX_LINES} lines: {long}"


CSRC = Path(__file__).resolve().parents[3] / "csrc"


@pytest.mark.skipif(not CSRC.is_dir(), reason="needs the repository's csrc/ (a source checkout)")
def test_no_csrc_file_over_500_lines():
    """The extension's sources too: each kernel in its header, each binding in its
    ``*_bindings.h``, and bindings.cpp only registers them."""
    long = {
        path.name: n
        for path in sorted(CSRC.iterdir())
        if path.suffix in {".h", ".cpp"} and (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"csrc files over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("op", OP_PACKAGES)
def test_one_op_one_place(op):
    """Each op package holds its public functions, its reference and its torch.library
    registration side by side; nothing gathers every op."""
    folder = PACKAGE / op
    assert (folder / "__init__.py").is_file()
    assert (folder / "reference.py").is_file()
    assert (folder / "_op.py").is_file()
    assert not (PACKAGE / "_kernels.py").exists()
    assert not (PACKAGE / "_triton").exists()
    text = (folder / "_op.py").read_text()
    assert "torch.library.custom_op" in text
    assert "register_fake" in text
