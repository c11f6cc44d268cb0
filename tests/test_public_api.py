"""The public surface: everything importable from together_async, __all__ honest and sorted."""

from __future__ import annotations

import together_async


def test_all_is_sorted() -> None:
    """__all__ is kept in sorted order so additions are easy to review."""
    assert list(together_async.__all__) == sorted(together_async.__all__)


def test_all_names_exist() -> None:
    """Every name in __all__ is importable from the package."""
    missing = [name for name in together_async.__all__ if not hasattr(together_async, name)]
    assert missing == []


def test_public_classes_are_listed() -> None:
    """Every public class or function defined by the package is listed in __all__."""
    public = {
        name
        for name, value in vars(together_async).items()
        if not name.startswith("_")
        and getattr(value, "__module__", "").startswith("together_async")
        and callable(value)
    }
    assert public <= set(together_async.__all__)
