"""The public API's docstrings (HF style) and the API reference pages that render them.

Every public name of `hf_specgen` and of its subpackages (their `__all__`; for `eval` and `data`, which
have none, the modules the reference documents) has a docstring; a function or class whose constructor
takes parameters has an `Args:` section (a dataclass: an entry per field it declares, in its or an
`hf_specgen` base's docstring); a function that returns a value has `Returns:`, a generator `Yields:`.
The reference pages (`docs/reference/*.md`) list each package's `__all__`, so a new name cannot be left
out of the site.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import textwrap
from pathlib import Path

import pytest


DOCS = Path(__file__).resolve().parent.parent / "docs" / "reference"
PACKAGES = {  # package: its reference page
    "hf_specgen": "index.md",
    "hf_specgen.regularizers": "regularizers.md",
    "hf_specgen.trl": "trl.md",
    "hf_specgen.merge": "merge.md",
    "hf_specgen.experiment": "experiment.md",
    "hf_specgen.alignment": "alignment.md",
    "hf_specgen.tiny": "tiny.md",
}
MODULES = [  # the documented modules of the packages without `__all__`
    "hf_specgen.eval.lm",
    "hf_specgen.eval.clip",
    "hf_specgen.eval.suites",
    "hf_specgen.eval.report",
    "hf_specgen.data.medmcqa",
    "hf_specgen.data.image_classification",
    "hf_specgen.data.preferences",
]
VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _public(name: str) -> list[str]:
    module = importlib.import_module(name)
    if hasattr(module, "__all__"):
        return [n for n in module.__all__ if not n.startswith("__")]
    return [
        n
        for n, obj in vars(module).items()
        if not n.startswith("_")
        and (inspect.isfunction(obj) or inspect.isclass(obj))
        and obj.__module__ == module.__name__
    ]


PUBLIC = [(package, name) for package in [*PACKAGES, *MODULES] for name in _public(package)]


def _documented_fields(cls: type) -> set[str]:
    """The entries of the Args:/Attributes: sections of `cls`'s and its hf_specgen bases' docstrings."""
    entries: set[str] = set()
    for klass in cls.__mro__:
        if klass.__module__.startswith("hf_specgen") and klass.__doc__:
            entries |= set(re.findall(r"^\s+(\w+)(?: \([^)]*\))?:", inspect.cleandoc(klass.__doc__), re.M))
    return entries


def _own_fields(cls: type) -> list[str]:
    """The constructor's fields that `cls` or one of its hf_specgen bases declares."""
    declared = set()
    for klass in cls.__mro__:
        if klass.__module__.startswith("hf_specgen"):
            declared |= set(vars(klass).get("__annotations__", {}))
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name in declared]


def _parameters(obj) -> list[str]:
    if inspect.isclass(obj) and "__init__" not in vars(obj):
        return []  # the constructor and its documentation are a base class's
    return [
        p.name
        for p in inspect.signature(obj).parameters.values()
        if p.name not in ("self", "cls") and p.kind not in VARIADIC
    ]


def _returns(function) -> str | None:
    """`Yields:` for a generator, `Returns:` for a function that returns a value, else None."""
    if inspect.isgeneratorfunction(function):
        return "Yields:"
    node = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
    if node.returns is not None:
        return None if ast.unparse(node.returns) in ("None", "NoReturn", "Never") else "Returns:"
    returns = any(isinstance(n, ast.Return) and n.value is not None for n in ast.walk(node))
    return "Returns:" if returns else None


@pytest.mark.parametrize(("package", "name"), PUBLIC, ids=[f"{p}.{n}" for p, n in PUBLIC])
def test_public_name_has_hf_style_docstring(package, name):
    obj = getattr(importlib.import_module(package), name)
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        return  # a constant: documented where it is defined, in the module's source
    obj = inspect.unwrap(obj) if inspect.isfunction(obj) else obj  # a contextmanager: its generator
    doc = inspect.cleandoc(obj.__doc__ or "")
    assert doc, f"{package}.{name} has no docstring"
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
        missing = [f for f in _own_fields(obj) if f not in _documented_fields(obj)]
        assert not missing, f"{package}.{name}: fields without an Args: entry: {missing}"
    elif _parameters(obj):
        assert "Args:" in doc, f"{package}.{name} takes {_parameters(obj)} but its docstring has no Args:"
    if inspect.isfunction(obj):
        section = _returns(obj)
        assert section is None or section in doc, f"{package}.{name}'s docstring has no {section}"


@pytest.mark.parametrize("package", list(PACKAGES))
def test_reference_page_lists_the_package(package):
    """The page's `:::` blocks (the package, or the modules it imports its names from) list its `__all__`."""
    page = (DOCS / PACKAGES[package]).read_text()
    blocks = re.findall(rf"^::: {re.escape(package)}\b.*?\n(.*?)(?=^\S|\Z)", page, re.M | re.S)
    assert blocks, f"{PACKAGES[package]} renders nothing of {package}"
    members = [m for block in blocks for m in re.findall(r"^ +- (\w+)$", block, re.M)]
    assert sorted(members) == sorted(_public(package)), f"{PACKAGES[package]}'s members differ from {package}.__all__"
