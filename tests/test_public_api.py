"""The public API: ``asyncorm.__all__`` lists exactly the public names, each documented."""

from __future__ import annotations

import inspect
import types

import asyncorm


def test_all_lists_exactly_the_public_names() -> None:
    public = {
        name
        for name, value in vars(asyncorm).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and name != "annotations"
    }
    assert set(asyncorm.__all__) == public


def test_all_is_sorted_and_importable() -> None:
    assert list(asyncorm.__all__) == sorted(asyncorm.__all__)
    for name in asyncorm.__all__:
        assert hasattr(asyncorm, name), name


def test_every_public_name_has_a_docstring_with_a_summary() -> None:
    for name in asyncorm.__all__:
        doc = inspect.getdoc(getattr(asyncorm, name))
        assert doc, f"asyncorm.{name} has no docstring"
        assert doc.splitlines()[0].strip(), f"asyncorm.{name} has no summary line"



def test_the_testing_module_lists_its_public_names_documented() -> None:
    import asyncorm.testing

    names = asyncorm.testing.__all__
    assert list(names) == sorted(names)
    for name in names:
        doc = inspect.getdoc(getattr(asyncorm.testing, name))
        assert doc, f"asyncorm.testing.{name} has no docstring"
        assert ".. versionadded:: 0.2" in doc, name
