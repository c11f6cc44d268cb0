"""ClientConfig: arguments, environment defaults, base URL forms and validation (no event loop)."""

from __future__ import annotations

import pytest

from together_async import InvalidArgumentError
from together_async._config import DEFAULT_BASE_URL, ClientConfig, normalise_base_url


def test_key_and_base_url_come_from_the_environment() -> None:
    """TOGETHER_API_KEY and TOGETHER_BASE_URL are used when no argument is given."""
    config = ClientConfig.from_arguments(
        environ={"TOGETHER_API_KEY": "k-env", "TOGETHER_BASE_URL": "https://proxy.example/v1"}
    )
    assert config.api_key == "k-env"
    assert config.base_url == "https://proxy.example/v1"


def test_arguments_beat_the_environment() -> None:
    """An explicit api_key and base_url win over the environment."""
    config = ClientConfig.from_arguments(
        "k-arg",
        base_url="https://other.example/v1",
        environ={"TOGETHER_API_KEY": "k-env", "TOGETHER_BASE_URL": "https://proxy.example/v1"},
    )
    assert (config.api_key, config.base_url) == ("k-arg", "https://other.example/v1")


def test_defaults_without_environment() -> None:
    """With nothing set, the key is None and the base URL is Together's /v1."""
    config = ClientConfig.from_arguments(environ={})
    assert config.api_key is None
    assert config.base_url == DEFAULT_BASE_URL == "https://api.together.ai/v1"


def test_empty_environment_variables_count_as_unset() -> None:
    """An empty TOGETHER_API_KEY or TOGETHER_BASE_URL falls back to the defaults."""
    config = ClientConfig.from_arguments(environ={"TOGETHER_API_KEY": "", "TOGETHER_BASE_URL": ""})
    assert config.api_key is None
    assert config.base_url == DEFAULT_BASE_URL


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("https://api.together.xyz", "https://api.together.xyz/v1"),
        ("https://api.together.xyz/", "https://api.together.xyz/v1"),
        ("https://api.together.xyz/v1", "https://api.together.xyz/v1"),
        ("https://api.together.xyz/v1/", "https://api.together.xyz/v1"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080/v1"),
        ("https://gateway.example/together/v1", "https://gateway.example/together/v1"),
    ],
)
def test_base_url_forms(given: str, expected: str) -> None:
    """A base URL with no path means <host>/v1; a path is kept; a trailing slash is dropped."""
    assert normalise_base_url(given) == expected


@pytest.mark.parametrize(
    "bad", ["ftp://api.together.ai", "api.together.ai", "https://", "https://h/v1?x=1"]
)
def test_bad_base_url_is_rejected(bad: str) -> None:
    """A base URL that is not an http(s) URL with a host raises InvalidArgumentError."""
    with pytest.raises(InvalidArgumentError, match="base_url"):
        ClientConfig.from_arguments("k", base_url=bad, environ={})


@pytest.mark.parametrize(
    "kwargs",
    [{"timeout": 0}, {"timeout": -1.0}, {"max_retries": -1}, {"max_retries": 1.5}],
)
def test_bad_timeout_or_retries_is_rejected(kwargs: dict[str, float]) -> None:
    """A timeout <= 0 or a max_retries that is not an int >= 0 raises InvalidArgumentError."""
    with pytest.raises(InvalidArgumentError):
        ClientConfig.from_arguments("k", environ={}, **kwargs)  # type: ignore[arg-type]


def test_repr_and_str_hide_the_key() -> None:
    """Neither repr() nor str() of a config shows the key."""
    config = ClientConfig.from_arguments("sk-very-secret-value", environ={})
    assert "sk-very-secret-value" not in repr(config)
    assert "sk-very-secret-value" not in str(config)


def test_attempts_per_call_override() -> None:
    """attempts_for uses the per-call max_retries when given, else the client's, plus one."""
    config = ClientConfig.from_arguments("k", max_retries=3, environ={})
    assert config.attempts_for(None) == 4
    assert config.attempts_for(0) == 1
    with pytest.raises(InvalidArgumentError):
        config.attempts_for(-2)
