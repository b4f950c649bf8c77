"""The layers of ``mach`` import only downward, function-local imports included."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).parents[2] / "mach-core" / "src"

# (package whose modules are checked, what they must not import, why). A trailing ``*`` matches
# any module name with that prefix; otherwise the module itself and its submodules.
RULES = [
    ("mach.experts", "mach.io", "stores and dispatch sit below the load pipeline"),
    ("mach.layers", "mach.io", "shared model pieces sit below the load pipeline"),
    ("mach.experts", "mach.cli", "the CLI is the top of core"),
    ("mach.layers", "mach.cli", "the CLI is the top of core"),
    ("mach.chat", "mach.decode", "chat parsing sits below decode"),
    ("mach.chat", "mach.io", "chat parsing sits below the load pipeline"),
    ("mach.chat", "mach.cli", "the CLI is the top of core"),
    ("mach.chat", "mach.adapter", "the adapter contract uses chat parsing, not the reverse"),
    ("mach.chat", "mach_serve", "the server uses chat parsing, not the reverse"),
    ("mach", "mach_serve", "mach-core installs and works without the server"),
    ("mach", "mach_adapter_*", "mach-core installs and works without any family"),
]


def _matches(name: str, pattern: str) -> bool:
    if pattern.endswith("*"):
        return name.startswith(pattern[:-1])
    return name == pattern or name.startswith(pattern + ".")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _called(call: ast.Call) -> str | None:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)


def imports(tree: ast.AST, module: str, is_package: bool = False) -> Iterator[tuple[int, str]]:
    """``(line, module)`` for every import anywhere in ``tree``, relative ones resolved.

    ``from a import b`` yields ``a.b`` as well as ``a``, since ``b`` may be a submodule;
    ``importlib.import_module("a.b")`` with a literal name counts too.
    """
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"
        elif isinstance(node, ast.Call) and _called(node) == "import_module" and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                yield node.lineno, first.value


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    found: dict[tuple[int, str], str] = {}
    for line, name in imports(ast.parse(source), module, is_package):
        for checked, banned, why in RULES:
            if _matches(module, checked) and _matches(name, banned):
                found.setdefault((line, banned), f"{module}:{line} imports {name} ({why})")
    return [found[k] for k in sorted(found)]


def test_core_imports_only_downward() -> None:
    files = sorted((SRC / "mach").rglob("*.py"))
    assert len(files) > 50
    found = [
        v
        for path in files
        for v in violations(_module_name(path), path.read_text(), path.name == "__init__.py")
    ]
    assert found == []


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("mach.experts.sources", "def f():\n    from mach.io.safetensors import TensorInfo\n"),
        ("mach.layers.x", "if TYPE_CHECKING:\n    import mach.io.load\n"),
        ("mach.experts.x", "from mach import io\n"),
        ("mach.chat.x", "from ..decode import events\n"),
        ("mach.registry", "importlib.import_module('mach_adapter_qwen.adapters')\n"),
    ],
)
def test_every_import_form_is_seen(module: str, source: str) -> None:
    assert violations(module, source)


def test_allowed_imports_pass() -> None:
    assert violations("mach.experts.sources", "from mach.tensors import TensorInfo\n") == []
    assert violations("mach.io.load", "from mach.experts.sources import stacked_source\n") == []
    assert violations("mach.experts.x", "import mach.iox\n") == []
    assert violations("mach.chat.tagged", "from mach.chat.reasoning import ReasoningTags\n") == []
