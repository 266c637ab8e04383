"""Architecture rules of rys_forge, checked on the source (nothing is imported or run).

- The import-linter contracts of ``pyproject.toml`` (``[tool.importlinter]``): layers (imports point
  downward), modeling_rys imports nothing of rys_forge, only cli imports click, nothing imports cli, internal
  modules do not import the package root, no import cycles between siblings. One test per contract, each
  failing with import-linter's report (run all by hand with ``lint-imports``).
- No module uses another module's private name (``_x``): not through ``from rys_forge.m import _x``, not as
  ``m._x`` after ``import rys_forge.m as m`` or ``from rys_forge import m``.
- Size: no module over 500 lines, no function over 80 lines, unless it carries a comment containing
  ``long because`` that says why. A module's marker goes in its header (any comment before its first
  ``def``/``class``); a function's marker goes in the comment block just above its ``def`` (or among its
  decorators) or anywhere in its body.
"""

from __future__ import annotations

import ast
import io
import subprocess
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rys_forge"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
MARKER = "long because"


# ----------------------------------------------------------------------------------------- helpers


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> list[tuple[str, Path]]:
    return sorted((_module_name(p), p) for p in PACKAGE.rglob("*.py"))


def _is_package(module: str) -> bool:
    return (ROOT / module.replace(".", "/") / "__init__.py").exists()


def _is_module(module: str) -> bool:
    return _is_package(module) or (ROOT / (module.replace(".", "/") + ".py")).exists()


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _absolute(node: ast.ImportFrom, module: str, path: Path) -> str | None:
    """The absolute module an ``ImportFrom`` names (relative imports resolved)."""
    if not node.level:
        return node.module
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
    return ".".join(base + ([node.module] if node.module else []))


def _dotted(node: ast.AST) -> list[str] | None:
    """``a.b.c`` -> ["a", "b", "c"]; None if the chain does not start at a plain name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


@dataclass
class Use:
    module: str
    line: int
    text: str


def _private_uses(module: str, path: Path) -> list[Use]:
    """Every use in `module` of a private name that belongs to another rys_forge module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    aliases: dict[str, str] = {}  # local name -> rys_forge module it is bound to (any scope, approximately)
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "rys_forge":
                    continue
                if alias.asname:
                    aliases[alias.asname] = alias.name
                else:
                    aliases["rys_forge"] = "rys_forge"
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(node, module, path)
            if not source or source.split(".")[0] != "rys_forge":
                continue
            for alias in node.names:
                target = f"{source}.{alias.name}"
                if _is_module(target):  # `from rys_forge import plots`: a module, bound to a local name
                    aliases[alias.asname or alias.name] = target
                    private_submodule_of_own_package = module == source or module.startswith(source + ".")
                    if _private(alias.name) and not private_submodule_of_own_package:
                        uses.append(Use(module, node.lineno, f"from {source} import {alias.name}"))
                elif _private(alias.name) and source != module:
                    uses.append(Use(module, node.lineno, f"from {source} import {alias.name}"))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or isinstance(getattr(node, "ctx", None), ast.Store):
            continue
        chain = _dotted(node)
        if not chain or chain[0] not in aliases:
            continue
        owner = aliases[chain[0]]
        for attr in chain[1:]:  # walk down through submodules to the first non-module attribute
            if _is_module(f"{owner}.{attr}"):
                if _private(attr) and not (module == owner or module.startswith(owner + ".")):
                    uses.append(Use(module, node.lineno, ".".join(chain)))
                    break
                owner = f"{owner}.{attr}"
                continue
            if _private(attr) and owner != module:
                uses.append(Use(module, node.lineno, ".".join(chain)))
            break
    unique = {(u.line, u.text): u for u in uses}
    return [unique[key] for key in sorted(unique)]


def _comments(path: Path) -> dict[int, str]:
    """line number -> comment text of every comment in the file."""
    source = path.read_text(encoding="utf-8")
    return {tok.start[0]: tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.COMMENT}


def _has_marker(comments: dict[int, str], first: int, last: int) -> bool:
    return any(MARKER in text.lower() for line, text in comments.items() if first <= line <= last)


def _comment_block_above(comments: dict[int, str], line: int) -> int:
    """First line of the run of comment lines directly above `line`."""
    while line - 1 in comments:
        line -= 1
    return line


def _long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    comments = _comments(path)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        length = node.end_lineno - node.lineno + 1
        if length <= MAX_FUNCTION_LINES:
            continue
        top = min([node.lineno] + [d.lineno for d in node.decorator_list])
        if not _has_marker(comments, _comment_block_above(comments, top), node.end_lineno):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}() has {length} lines")
    return found


def _module_too_long(path: Path) -> str | None:
    lines = path.read_text(encoding="utf-8").count("\n")
    if lines <= MAX_MODULE_LINES:
        return None
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    defs = [n.lineno for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    header_end = min(defs) - 1 if defs else lines
    if _has_marker(_comments(path), 1, header_end):
        return None
    return f"{path.relative_to(ROOT)} has {lines} lines"


# ------------------------------------------------------------------------------------------- tests


def _contract_ids() -> list[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return [c["id"] for c in config.get("tool", {}).get("importlinter", {}).get("contracts", [])]


def test_import_linter_is_configured():
    ids = _contract_ids()
    for required in ("layers", "modeling-rys-standalone", "only-cli-imports-click", "nothing-imports-cli"):
        assert required in ids, f"import-linter contract {required!r} missing from pyproject.toml"


@pytest.mark.parametrize("contract", _contract_ids())
def test_import_contract(contract):
    try:
        import importlinter  # noqa: F401
    except ImportError:  # pragma: no cover
        pytest.fail("import-linter is not installed: pip install -e '.[test]'")
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    proc = subprocess.run(
        [sys.executable, "-c", code, "--no-cache", "--no-logo", "--contract", contract, "pyproject.toml"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"import contract {contract!r} broken:\n{report}"


def test_private_name_finder_catches_every_form(tmp_path, monkeypatch):
    """The checker itself: each forbidden form is caught, the allowed ones are not."""
    package = tmp_path / "rys_forge"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "other.py").write_text("def _helper(): pass\n")
    (package / "sub" / "_impl.py").write_text("")
    (package / "sub" / "inner.py").write_text("from . import _impl\nfrom ._impl import thing\n")  # allowed
    (package / "user.py").write_text(
        "from rys_forge.other import _helper\n"
        "from .other import _helper as h\n"
        "import rys_forge.other as o\n"
        "import rys_forge.other\n"
        "from rys_forge import other\n"
        "from rys_forge import __version__\n"  # dunder: not private
        "from rys_forge.sub import _impl\n"  # a private module of another package
        "def f():\n"
        "    o._helper(); rys_forge.other._helper(); other._helper(); other.public()\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = {u.text for u in _private_uses("rys_forge.user", package / "user.py")}
    assert found == {
        "from rys_forge.other import _helper", "o._helper", "rys_forge.other._helper", "other._helper",
        "from rys_forge.sub import _impl",
    }
    assert _private_uses("rys_forge.sub.inner", package / "sub" / "inner.py") == []


def test_no_module_uses_another_modules_private_names():
    uses = [u for module, path in _modules() for u in _private_uses(module, path)]
    listing = "\n".join(f"  {u.module} (line {u.line}): {u.text}" for u in uses)
    assert not uses, f"{len(uses)} use(s) of another module's private name:\n{listing}"


def test_size_checker_honours_markers(tmp_path, monkeypatch):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES + 1))
    plain = tmp_path / "plain.py"
    plain.write_text(f"def f():\n{body}\n")
    above = tmp_path / "above.py"
    above.write_text(f"# long because: one table, read top to bottom\n@staticmethod\ndef f():\n{body}\n")
    inside = tmp_path / "inside.py"
    inside.write_text(f"def f():\n    # long because: the steps share ten locals\n{body}\n")
    long_module = tmp_path / "long_module.py"
    long_module.write_text("\n" * (MAX_MODULE_LINES + 1))
    marked_module = tmp_path / "marked_module.py"
    marked_module.write_text("# long because: the card's sections are one template\n" + "\n" * MAX_MODULE_LINES
                             + "def g():\n    pass\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert len(_long_functions(plain)) == 1
    assert _long_functions(above) == [] and _long_functions(inside) == []
    assert _module_too_long(long_module) is not None
    assert _module_too_long(marked_module) is None


def test_modules_and_functions_are_short_or_say_why():
    problems = []
    for _, path in _modules():
        too_long = _module_too_long(path)
        if too_long:
            problems.append(f"{too_long} (> {MAX_MODULE_LINES})")
        problems += [f"{p} (> {MAX_FUNCTION_LINES})" for p in _long_functions(path)]
    listing = "\n".join(f"  {p}" for p in problems)
    assert not problems, (
        f"{len(problems)} over the size limits; split them, or add a comment containing {MARKER!r} that says why "
        f"(module: in its header; function: just above its def or in its body):\n{listing}"
    )
