"""Registries a higher package fills: the tiny foundations' suites and reward rule are known by name without the
lower packages importing `hf_specgen.tiny`; committed results name models without a path of this machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hf_specgen.eval.suites import CLIP_SUITES, LM_SUITES, SUITES, ClipSuite, LMSuite, register_suite
from hf_specgen.registry import Registry


ROOT = Path(__file__).resolve().parents[1]


def test_registry_imports_its_providers_on_the_first_lookup(tmp_path, monkeypatch):
    (tmp_path / "provider_for_test.py").write_text(
        "from registry_target_for_test import REGISTRY\nREGISTRY.register('b', 2)\n"
    )
    (tmp_path / "registry_target_for_test.py").write_text(
        "from hf_specgen.registry import Registry\nREGISTRY = Registry('number', ['provider_for_test'], {'a': 1})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from registry_target_for_test import REGISTRY

    assert "provider_for_test" not in sys.modules  # not before a lookup
    assert dict(REGISTRY) == {"a": 1, "b": 2} and "provider_for_test" in sys.modules
    REGISTRY.register("a", 1)  # the same entry again (a module imported twice) is no conflict
    with pytest.raises(ValueError, match=r"number 'b' is registered already: 2"):
        REGISTRY.register("b", 3)
    with pytest.raises(KeyError):
        REGISTRY["c"]


def test_a_failing_provider_is_tried_again():
    registry = Registry("thing", ["hf_specgen_no_such_module"])
    for _ in range(2):
        with pytest.raises(ModuleNotFoundError):
            "x" in registry


def test_tiny_names_are_known_without_importing_the_tiny_package_first():
    """`hf_specgen.eval` and `hf_specgen.alignment` do not import `hf_specgen.tiny`; naming a tiny suite or the tiny
    reward rule finds it (the registries import their providers)."""
    code = (
        "import sys\n"
        "from hf_specgen.eval.suites import CLIP_SUITES, LM_SUITES, SUITES\n"
        "from hf_specgen.alignment.reward import is_rule\n"
        "assert not any(m.startswith('hf_specgen.tiny') for m in sys.modules), sorted(sys.modules)\n"
        "assert LM_SUITES['tiny_general'].role == 'generality' and 'tiny_clip' in CLIP_SUITES\n"
        "assert 'tiny_medmcqa' in SUITES and 'datasets' not in sys.modules  # listing suites loads no data\n"
        "assert is_rule('hf_specgen/tiny-instruction-reward') and not is_rule('hf_specgen/tiny-galactica')\n"
        "assert 'datasets' not in sys.modules  # the rule is made on demand\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_suite_names_are_unique_across_lm_and_clip():
    with pytest.raises(ValueError, match="suite 'tiny_clip' is registered already as CLIP suite"):
        register_suite(LMSuite("tiny_clip", ("a",), "generality", ""))
    with pytest.raises(ValueError, match="suite 'medmcqa' is registered already as LM suite"):
        register_suite(ClipSuite("medmcqa", "", lambda model, batch_size: {}))
    assert list(SUITES) == [*LM_SUITES, *CLIP_SUITES] and SUITES["tiny_clip"] == CLIP_SUITES["tiny_clip"].description


def test_committed_demo_results_name_models_as_configured():
    """The demo's records name each model as its preset does (a tiny name) or relative to the working directory:
    no absolute path of the machine that made them."""
    reports = sorted((ROOT / "benchmarks" / "results" / "demo").rglob("report.json"))
    assert len(reports) == 4

    def models(node):
        if isinstance(node, dict):
            yield from ([node["model"]] if isinstance(node.get("model"), str) else [])
            yield from (m for value in node.values() for m in models(value))
        elif isinstance(node, list):
            yield from (m for value in node for m in models(value))

    named = [m for report in reports for m in models(json.loads(report.read_text()))]
    assert {"hf_specgen/tiny-galactica", "hf_specgen/tiny-clip"} <= set(named)
    assert [m for m in named if Path(m).is_absolute() or m.startswith("~")] == []
