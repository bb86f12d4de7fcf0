"""docs/api.md lists exactly the public names (the `__all__`s); deprecated names still work."""

import importlib
import inspect
import os
import re
import sys
import warnings

import pytest

import keras_gradreg as kgr

API_MD = os.path.join(os.path.dirname(__file__), "..", "docs", "api.md")
NAMESPACES = {
    "kgr": "keras_gradreg",
    "kgr.attacks": "keras_gradreg.attacks",
    "kgr.callbacks": "keras_gradreg.callbacks",
    "kgr.layers": "keras_gradreg.layers",
    "kgr.networks": "keras_gradreg.networks",
    "kgr.robustness": "keras_gradreg.robustness",
    "kgr.visualize": "keras_gradreg.visualize",
}
MOVED_MODULES = ("ascent", "hashing", "kl", "randomness", "subsets", "train_function")


def _tables() -> dict[str, dict[str, str]]:
    """Section title -> {name: description} from docs/api.md's tables."""
    tables: dict[str, dict[str, str]] = {}
    section = None
    with open(API_MD, encoding="utf-8") as f:
        for line in f:
            heading = re.match(r"## (.+)", line)
            if heading:
                section = heading.group(1).strip().strip("`")
                tables[section] = {}
                continue
            row = re.match(r"\| `([^`]+)` \| (.*) \|$", line.rstrip("\n"))
            if row and section is not None:
                tables[section][row.group(1)] = row.group(2).strip()
    return tables


def test_api_md_lists_exactly_each_namespaces_all_with_a_description():
    tables = _tables()
    assert set(tables) == {*NAMESPACES, "Deprecated names"}
    for title, module_name in NAMESPACES.items():
        module = importlib.import_module(module_name)
        listed = tables[title]
        assert sorted(listed) == sorted(module.__all__), title
        for name, description in listed.items():
            assert len(description) > 10, (title, name)
            value = getattr(module, name)
            if callable(value) or inspect.ismodule(value):
                assert inspect.getdoc(value), (title, name)


def test_internal_modules_are_not_public():
    for name in ("objective", "compiled_kernel", "checkpoints"):
        assert name not in kgr.__all__ and name not in kgr.attacks.__all__
    for name in MOVED_MODULES:
        assert importlib.import_module(f"keras_gradreg._{name}").__doc__


@pytest.mark.parametrize("name", MOVED_MODULES)
def test_old_module_names_import_with_a_warning(name):
    old, new = f"keras_gradreg.{name}", f"keras_gradreg._{name}"
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=rf"`{old}` is an internal module.*`{new}`"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    # Importing the old name set it on the package; unset, it goes through kgr.__getattr__.
    kgr.__dict__.pop(name, None)
    with pytest.warns(DeprecationWarning, match=rf"`{old}` is an internal module"):
        assert getattr(kgr, name) is module


def test_renamed_names_warn_and_are_the_new_objects():
    with pytest.warns(DeprecationWarning, match=r"use `kgr\.RegularizedLossResult`"):
        assert kgr.RegularizedLoss is kgr.RegularizedLossResult
    with pytest.warns(DeprecationWarning, match=r"use `kgr\.callbacks\.RegularizerScheduler`"):
        callback = kgr.callbacks.RegularizerSchedule(lambda epoch: {"sigma": 0.1})
    assert isinstance(callback, kgr.callbacks.RegularizerScheduler)
    with pytest.raises(AttributeError, match=r"has no attribute 'no_such_name'"):
        kgr.no_such_name  # noqa: B018


def test_deprecated_names_in_api_md_still_exist():
    """Their warnings: the tests above, tests/test_attack_api.py and tests/test_schedule.py."""
    for old in _tables()["Deprecated names"]:
        module_name, _, attribute = old.replace("kgr", "keras_gradreg", 1).rpartition(".")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = importlib.import_module(module_name)
            assert getattr(module, attribute) is not None, old
