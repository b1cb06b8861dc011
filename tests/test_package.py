"""The package's face: `resnetkit --help` and every `resnetkit COMMAND --help` import no torch, `import resnetkit`
loads its parts lazily, and no module imports one that imports it back (checked over every import in src/, the
ones inside functions included)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
COMMANDS = [
    [],
    ["models"],
    ["summary"],
    ["data", "stats"],
    ["train"],
    ["compare"],
    ["tune"],
    ["lr-find"],
    ["eval"],
    ["report"],
    ["explain"],
    ["predict"],
    ["serve"],
    ["export"],
    ["quantize"],
    ["bench", "infer"],
]


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_help_imports_no_torch():
    code = (
        "import sys, contextlib, io\n"
        "from resnetkit.cli import main\n"
        f"for argv in {COMMANDS!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            main([*argv, '--help'])\n"
        "        except SystemExit as e:\n"
        "            assert e.code == 0, (argv, e.code)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'numpy', 'PIL'))\n"
        "print(heavy)\n"
    )
    assert _run(code).strip() == "[]"


def test_import_is_lazy_and_attributes_load_on_use():
    out = _run(
        "import sys, resnetkit\n"
        "print('torch' in sys.modules, resnetkit.__version__)\n"
        "model = resnetkit.create_model('resnet20')\n"
        "print('torch' in sys.modules, type(model).__name__, callable(resnetkit.train))\n"
        "import resnetkit.train.fit\n"
        "print(callable(resnetkit.train), sorted(set(resnetkit.__all__) - set(dir(resnetkit))))\n"
    ).splitlines()
    assert out[0].startswith("False ")
    assert out[1] == "True ResNet True"
    assert out[2] == "True []"  # the training package stays callable after its modules load; every name is there
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        import resnetkit

        resnetkit.nothing  # noqa: B018


def _imports(path: Path, package: str) -> set[str]:
    """The resnetkit modules `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("resnetkit")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("resnetkit"):
            # `from resnetkit.x import y`: the submodule x.y when y is one, else the names of x
            submodules = [
                a.name for a in node.names if (SRC / node.module.replace(".", "/") / f"{a.name}.py").is_file()
            ]
            found |= {f"{node.module}.{name}" for name in submodules}
            if len(submodules) < len(node.names):
                found.add(node.module)
    return found


def test_no_import_circles():
    modules = {}
    for path in sorted((SRC / "resnetkit").rglob("*.py")):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {name: {m for m in _imports(path, name) if m in modules and m != name} for name, path in modules.items()}
    # A package's __init__ that only lists its lazy attributes (strings) imports nothing: the edges are real imports.
    circles = []

    def visit(node: str, stack: list[str], done: set[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in stack:
                circles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in done:
                visit(nxt, [*stack, nxt], done)
        done.add(node)

    done: set[str] = set()
    for name in sorted(graph):
        if name not in done:
            visit(name, [name], done)
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)
