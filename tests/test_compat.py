"""The internals of transformers, TRL and DeepSpeed that `hf_specgen.compat` reads: each still there, as relied on,
in the installed versions; and the version guard."""

from __future__ import annotations

import configparser
import re
import warnings
from pathlib import Path

import pytest

from hf_specgen import compat
from hf_specgen.compat import INTERNALS, CompatWarning, Internal, MissingInternalError


SETUP_CFG = Path(__file__).resolve().parent.parent / "setup.cfg"


@pytest.mark.parametrize("internal", INTERNALS, ids=lambda internal: internal.qualified_name)
def test_internal_is_there_as_relied_on(internal):
    if compat.installed_version(internal.package) is None:
        pytest.skip(f"{internal.package} is not installed")
    problems = compat.internal_problems(internal)
    assert not problems, (
        "an internal hf_specgen relies on changed; update hf_specgen/compat.py (and CHECKED_VERSIONS):\n"
        + "\n".join(problems)
    )


def test_installed_versions_are_the_checked_ones():
    assert compat.unchecked_versions() == []


def test_checked_versions_are_setup_cfg_ranges():
    """Widening a range in setup.cfg means checking the internals again, then widening it here."""
    config = configparser.ConfigParser()
    config.read(SETUP_CFG)
    requirements = config["options"]["install_requires"] + "\n".join(config["options.extras_require"].values())
    for package, (low, high) in compat.CHECKED_VERSIONS.items():
        match = re.search(rf"^\s*{re.escape(package)}\s*>=\s*([\w.]+)\s*,\s*<\s*([\w.]+)", requirements, re.M)
        assert match is not None, f"setup.cfg pins no range of {package}"
        assert match.groups() == (low, high), f"{package}: setup.cfg says {match.groups()}, compat {(low, high)}"


def test_outside_the_checked_range_warns(monkeypatch):
    monkeypatch.setattr(
        compat, "installed_version", lambda package: compat.Version("6.1.0") if package == "transformers" else None
    )
    with pytest.warns(CompatWarning, match=r"transformers 6\.1\.0 \(checked: >=5\.0,<6\)"):
        compat.warn_unchecked_versions()
    monkeypatch.setattr(compat, "installed_version", lambda package: None)  # not installed: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.warn_unchecked_versions()


def test_a_gone_internal_is_named():
    """The checks themselves: a renamed method, a dropped parameter, an attribute no longer set."""
    gone = Internal("transformers", "transformers.trainer:Trainer", "_no_such_method", ("inputs",))
    assert compat.internal_problems(gone) == [
        f"transformers {compat.installed_version('transformers')}: transformers.trainer.Trainer._no_such_method: gone"
    ]
    dropped = Internal("transformers", "transformers.trainer:Trainer", "_prepare_inputs", ("inputs", "no_such"))
    assert "takes no parameter 'no_such'" in compat.internal_problems(dropped)[0]
    unset = Internal(
        "transformers", "transformers.trainer:Trainer", "_no_such_attribute", set_by="transformers.trainer"
    )
    assert "no longer set by transformers.trainer" in compat.internal_problems(unset)[0]


def test_reading_a_missing_internal_names_it():
    class Trainer:
        pass

    with pytest.raises(MissingInternalError, match=r"Trainer has no '_loss_shifts_labels'.*>=5\.0,<6"):
        compat.loss_shifts_labels(Trainer())
    assert compat.accumulation_steps(Trainer()) == 1  # before the training loop sets it
    assert compat.hp_mapping(object()) is None  # no element of the weight in this rank's partition
