"""``env_flag``: boolean environment knobs, read strictly."""

from __future__ import annotations

import pytest

from mach.env import env_flag
from mach.errors import MachError

NAME = "MACH_TEST_FLAG"


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", "Yes", "on", " On "])
def test_true_spellings(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv(NAME, raw)
    assert env_flag(NAME, False) is True


@pytest.mark.parametrize("raw", ["0", "false", "False", "NO", "off", "OFF"])
def test_false_spellings(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv(NAME, raw)
    assert env_flag(NAME, True) is False


@pytest.mark.parametrize("default", [True, False])
def test_unset_or_empty_is_the_default(monkeypatch: pytest.MonkeyPatch, default: bool) -> None:
    monkeypatch.delenv(NAME, raising=False)
    assert env_flag(NAME, default) is default
    monkeypatch.setenv(NAME, "")
    assert env_flag(NAME, default) is default


@pytest.mark.parametrize("raw", ["2", "enable", "y", "truee"])
def test_anything_else_names_the_variable(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv(NAME, raw)
    with pytest.raises(MachError, match=rf"{NAME}={raw!r}"):
        env_flag(NAME, True)
