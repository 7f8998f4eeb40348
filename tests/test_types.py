"""Static types: ``mypy teomq/`` is clean, and the core's stubs say what the compiled modules have.

Every compiled module ``teomq/_core/<name>.pyx`` has a stub ``teomq/_core/<name>.pyi`` (mypy reads
the stubs; it cannot read the .pyx). A stub that drifts from its module (a name added, renamed or
removed in the .pyx, a parameter changed) is caught here: for each module, the public names of the
module and of its stub are the same, and for each class of the module its public members, the
protocol methods it defines (``__len__``, ``__contains__``, ...), its base classes and whether it
can be subclassed (``@cython.final`` / ``@final``); every function and method whose signature the
module exposes has the stub's parameter names, kinds and defaults. (``mypy.stubtest`` does more,
at the cost of a second full mypy run.)
"""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import inspect
import subprocess
import sys
import types
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "teomq" / "_core"
MODULES = sorted(p.stem for p in CORE.glob("*.pyx"))

#: protocol methods a stub must declare when the class defines them
PROTOCOL = frozenset({
    "__len__", "__contains__", "__iter__", "__next__", "__getitem__", "__setitem__", "__delitem__",
    "__bool__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__hash__", "__call__",
    "__enter__", "__exit__", "__aenter__", "__aexit__", "__await__", "__buffer__",
})
_BASETYPE = 1 << 10  # Py_TPFLAGS_BASETYPE: the class can be subclassed

_KINDS = inspect.Parameter


def test_mypy_clean() -> None:
    """``python3 -m mypy teomq/`` with the [tool.mypy] settings of pyproject.toml finds nothing."""
    proc = subprocess.run([sys.executable, "-m", "mypy", "teomq/"], cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, f"mypy teomq/ exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    assert "Success: no issues found" in proc.stdout, proc.stdout


def test_every_compiled_module_has_a_stub() -> None:
    assert MODULES, f"no .pyx under {CORE}"
    missing = [name for name in MODULES if not (CORE / f"{name}.pyi").is_file()]
    assert not missing, f"compiled modules without a stub in teomq/_core: {missing}"


# -- the stub check -----------------------------------------------------------------------------


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[tuple[str, object, bool]]:
    """(name, kind, has a default) per parameter of a stub function."""
    a = node.args
    positional: list[tuple[ast.arg, object]] = [(arg, _KINDS.POSITIONAL_ONLY) for arg in a.posonlyargs]
    positional += [(arg, _KINDS.POSITIONAL_OR_KEYWORD) for arg in a.args]
    first_default = len(positional) - len(a.defaults)
    out: list[tuple[str, object, bool]] = [
        (arg.arg, kind, i >= first_default) for i, (arg, kind) in enumerate(positional)]
    if a.vararg is not None:
        out.append((a.vararg.arg, _KINDS.VAR_POSITIONAL, False))
    out += [(arg.arg, _KINDS.KEYWORD_ONLY, d is not None) for arg, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg is not None:
        out.append((a.kwarg.arg, _KINDS.VAR_KEYWORD, False))
    return out


def _runtime_signature(obj: Callable[..., object]) -> list[tuple[str, object, bool]] | None:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None  # not introspectable (e.g. a cdef class's __cinit__)
    return [(p.name, p.kind, p.default is not p.empty) for p in sig.parameters.values()]


def _is_property(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "property" or
               isinstance(d, ast.Attribute) and d.attr in ("setter", "getter", "deleter")
               for d in node.decorator_list)


def _names(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """What a stub body defines or explicitly re-exports (``import X as X``), by name."""
    out: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.setdefault(node.name, node)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.asname is not None and alias.asname == alias.name.rsplit(".", 1)[-1]:
                    out[alias.asname] = node
    return out


def _public(names: Iterable[str]) -> set[str]:
    return {n for n in names if not n.startswith("_")}


def _check_function(where: str, node: ast.AST, obj: Callable[..., object]) -> list[str]:
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return [f"{where}: a function in the module, not one in the stub"]
    if isinstance(obj, types.WrapperDescriptorType):
        return []  # a slot's wrapper (CommandTable.__init__): (self, /, *args, **kwargs) whatever the code
    runtime = _runtime_signature(obj)
    if runtime is None:
        return []
    stub = _signature(node)
    if stub != runtime:
        return [f"{where}: the stub has ({_shown(stub)}), the module ({_shown(runtime)})"]
    return []


def _shown(sig: list[tuple[str, object, bool]]) -> str:
    return ", ".join(f"{name}{'=' if default else ''}:{kind}" for name, kind, default in sig)


def _check_class(module: types.ModuleType, name: str, cls: type, node: ast.ClassDef) -> list[str]:
    problems = []
    where = f"{module.__name__}.{name}"
    members = _names(node.body)
    runtime_members = vars(cls)
    for missing in sorted(_public(runtime_members) - _public(members)):
        problems.append(f"{where}.{missing}: in the class, not in the stub")
    for extra in sorted(_public(members) - _public(runtime_members)):
        problems.append(f"{where}.{extra}: in the stub, not in the class")
    for dunder in sorted(PROTOCOL & set(runtime_members) - set(members)):
        problems.append(f"{where}.{dunder}: defined by the class, not in the stub")
    for dunder in sorted(n for n in members if n.startswith("__") and n != "__init__"):
        if not hasattr(cls, dunder):
            problems.append(f"{where}.{dunder}: in the stub, not in the class")
    bases = [ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases] or ["object"]
    if bases != [b.__name__ for b in cls.__bases__]:
        problems.append(f"{where}: the stub's bases are {bases}, the class's "
                        f"{[b.__name__ for b in cls.__bases__]}")
    stub_final = any(ast.unparse(d).rsplit(".", 1)[-1] == "final" for d in node.decorator_list)
    if stub_final != (not cls.__flags__ & _BASETYPE):
        problems.append(f"{where}: the stub says {'final' if stub_final else 'subclassable'}, the class is "
                        f"{'subclassable' if cls.__flags__ & _BASETYPE else 'final'}")
    for member, member_node in members.items():
        value = runtime_members.get(member)
        if value is None or member.startswith("_") and member != "__init__":
            continue
        is_property = isinstance(member_node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_property(member_node)
        if callable(value):
            if is_property:
                problems.append(f"{where}.{member}: a method in the class, a property in the stub")
            else:
                problems += _check_function(f"{where}.{member}", member_node, value)
        elif isinstance(member_node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not is_property:
            problems.append(f"{where}.{member}: an attribute in the class, a method in the stub")
    return problems


def stub_problems(module: types.ModuleType, stub_source: str) -> list[str]:
    """Every way the stub ``stub_source`` disagrees with the compiled ``module``."""
    stub = _names(ast.parse(stub_source).body)
    # An imported module (msgpack, binascii) is the implementation's business, not the API.
    runtime = {n: v for n, v in vars(module).items() if not isinstance(v, types.ModuleType)}
    problems = [f"{module.__name__}.{n}: in the module, not in the stub"
                for n in sorted(_public(runtime) - _public(stub))]
    problems += [f"{module.__name__}.{n}: in the stub, not in the module"
                 for n in sorted(_public(stub) - _public(runtime))]
    for name in sorted(_public(stub) & _public(runtime)):
        value, node = runtime[name], stub[name]
        if isinstance(value, type) and value.__module__ == module.__name__:
            if not isinstance(node, ast.ClassDef):
                problems.append(f"{module.__name__}.{name}: a class in the module, not in the stub")
            else:
                problems += _check_class(module, name, value, node)
        elif callable(value) and not isinstance(value, type) and getattr(value, "__module__", None) == module.__name__:
            problems += _check_function(f"{module.__name__}.{name}", node, value)
    return problems


@pytest.mark.parametrize("name", MODULES)
def test_stub_matches_compiled_module(name: str) -> None:
    module = importlib.import_module(f"teomq._core.{name}")
    assert module.__file__ is not None
    assert module.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), (
        f"{module.__name__} is not the compiled module: {module.__file__}")
    problems = stub_problems(module, (CORE / f"{name}.pyi").read_text())
    assert not problems, "the stub differs from the compiled module:\n" + "\n".join(problems)


def test_stub_check_catches_drift() -> None:
    """The check is not vacuous: a stub missing a name, with an extra one, a renamed parameter, a
    lost default, a property for a method and a subclassable final class is refused for each."""
    from teomq._core import crc32c, frame_codec

    assert stub_problems(crc32c, (CORE / "crc32c.pyi").read_text()) == []
    drifted = """
def crc32c(data: bytes, seed: int = 0) -> int: ...
def crc32c_software(data: bytes, crc: int) -> int: ...
def reframe_crc(frame_crc: int, old_head_crc: int, new_head_crc: int, payload_length: int) -> int: ...
def gone() -> None: ...
"""
    problems = stub_problems(crc32c, drifted)
    assert any("hardware: in the module, not in the stub" in p for p in problems), problems
    assert any("gone: in the stub, not in the module" in p for p in problems), problems
    assert any(p.startswith("teomq._core.crc32c.crc32c:") and "seed" in p for p in problems), problems
    assert any(p.startswith("teomq._core.crc32c.crc32c_software:") for p in problems), problems
    assert len(problems) == 4, problems

    source = (CORE / "frame_codec.pyi").read_text()
    drifted = source.replace("@final\nclass WriteBuffer:", "class WriteBuffer:").replace(
        "    def take(self) -> bytes:", "    @property\n    def take(self) -> bytes:").replace(
        "    def __len__(self) -> int: ...\n", "")
    assert drifted.count("class WriteBuffer:") == 1 and "@property\n    def take" in drifted
    problems = stub_problems(frame_codec, drifted)
    assert sorted(problems) == sorted([
        "teomq._core.frame_codec.WriteBuffer: the stub says subclassable, the class is final",
        "teomq._core.frame_codec.WriteBuffer.take: a method in the class, a property in the stub",
        "teomq._core.frame_codec.WriteBuffer.__len__: defined by the class, not in the stub",
    ]), problems
