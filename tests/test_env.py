"""ragsite.env: typed environment readers that fail naming the variable."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured

from ragsite.env import env_bool, env_choice, env_float, env_int, env_list, env_str

VAR = "RAG_TEST_ENV_VALUE"


@pytest.fixture
def setenv(monkeypatch):
    def set_value(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv(VAR, raising=False)
        else:
            monkeypatch.setenv(VAR, value)

    return set_value


def test_env_str_strips_and_defaults(setenv):
    setenv(None)
    assert env_str(VAR, "fallback") == "fallback"
    setenv("  value \n")
    assert env_str(VAR, "fallback") == "value"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        (" Yes ", True),
        ("on", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
        ("", False),
    ],
)
def test_env_bool_good_values(setenv, raw, expected):
    setenv(raw)
    assert env_bool(VAR, default=not expected) is expected


@pytest.mark.parametrize("default", [True, False])
def test_env_bool_unset_gives_default(setenv, default):
    setenv(None)
    assert env_bool(VAR, default) is default


@pytest.mark.parametrize("raw", ["2", "maybe", "y e s", "enabled"])
def test_env_bool_bad_values_name_the_variable(setenv, raw):
    setenv(raw)
    with pytest.raises(ImproperlyConfigured, match=VAR) as excinfo:
        env_bool(VAR)
    assert repr(raw) in str(excinfo.value)


@pytest.mark.parametrize(("raw", "expected"), [("42", 42), (" 7 ", 7), ("-3", -3), ("0", 0)])
def test_env_int_good_values(setenv, raw, expected):
    setenv(raw)
    assert env_int(VAR, 99) == expected


@pytest.mark.parametrize("raw", [None, "", "   "])
def test_env_int_unset_or_blank_gives_default(setenv, raw):
    setenv(raw)
    assert env_int(VAR, 99, min_value=1) == 99


@pytest.mark.parametrize("raw", ["1.5", "ten", "12abc", "0x10"])
def test_env_int_rejects_non_integers(setenv, raw):
    setenv(raw)
    with pytest.raises(ImproperlyConfigured, match=f"{VAR}=.*whole number"):
        env_int(VAR, 1)


def test_env_int_range(setenv):
    setenv("5")
    assert env_int(VAR, 1, min_value=5, max_value=5) == 5
    with pytest.raises(ImproperlyConfigured, match=f"{VAR}=5 is too small: the minimum is 6"):
        env_int(VAR, 1, min_value=6)
    with pytest.raises(ImproperlyConfigured, match=f"{VAR}=5 is too large: the maximum is 4"):
        env_int(VAR, 1, max_value=4)


@pytest.mark.parametrize(("raw", "expected"), [("0.25", 0.25), (" 2 ", 2.0), ("1e-2", 0.01), ("-1.5", -1.5)])
def test_env_float_good_values(setenv, raw, expected):
    setenv(raw)
    assert env_float(VAR, 9.0) == pytest.approx(expected)


@pytest.mark.parametrize("raw", [None, ""])
def test_env_float_unset_or_blank_gives_default(setenv, raw):
    setenv(raw)
    assert env_float(VAR, 9.5) == 9.5


@pytest.mark.parametrize("raw", ["fast", "1,5", "2s"])
def test_env_float_rejects_non_numbers(setenv, raw):
    setenv(raw)
    with pytest.raises(ImproperlyConfigured, match=f"{VAR}=.*not a number"):
        env_float(VAR, 1.0)


def test_env_float_range(setenv):
    setenv("0.05")
    with pytest.raises(ImproperlyConfigured, match=f"{VAR}=0.05 is too small"):
        env_float(VAR, 1.0, min_value=0.1)
    setenv("2.5")
    with pytest.raises(ImproperlyConfigured, match=f"{VAR}=2.5 is too large"):
        env_float(VAR, 1.0, min_value=0.0, max_value=2.0)


@pytest.mark.parametrize("raw", ["nan", "NaN"])
def test_env_float_rejects_nan_even_with_bounds(setenv, raw):
    # NaN compares false with everything, so it slips through a min/max check
    # (RAG_TEMPERATURE=nan would be "between 0 and 2") unless rejected explicitly.
    setenv(raw)
    with pytest.raises(ImproperlyConfigured, match=VAR):
        env_float(VAR, 0.2, min_value=0.0, max_value=2.0)


@pytest.mark.parametrize("raw", ["inf", "-Infinity"])
def test_env_float_rejects_infinity(setenv, raw):
    setenv(raw)
    with pytest.raises(ImproperlyConfigured, match=VAR):
        env_float(VAR, 60.0, min_value=0.1)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a,b,c", ["a", "b", "c"]),
        (" a , b ,, c ,", ["a", "b", "c"]),
        ("example.com", ["example.com"]),
        ("", []),
    ],
)
def test_env_list(setenv, raw, expected):
    setenv(raw)
    assert env_list(VAR, ["default"]) == expected


def test_env_list_unset_gives_default(setenv):
    setenv(None)
    assert env_list(VAR, ["x", "y"]) == ["x", "y"]


@pytest.mark.parametrize(
    ("raw", "expected"), [("local", "local"), (" OpenAI ", "openai"), ("", "auto"), (None, "auto")]
)
def test_env_choice_good_values(setenv, raw, expected):
    setenv(raw)
    assert env_choice(VAR, "auto", ("auto", "openai", "local")) == expected


@pytest.mark.parametrize("raw", ["ollama", "open ai", "locals"])
def test_env_choice_bad_value_names_variable_and_choices(setenv, raw):
    setenv(raw)
    with pytest.raises(ImproperlyConfigured, match=VAR) as excinfo:
        env_choice(VAR, "auto", ("auto", "openai", "local"))
    assert "auto, openai, local" in str(excinfo.value)
