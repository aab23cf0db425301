"""Option parsing: defaults, both key styles, the "gemma" section, warnings, never raising."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gemma_lsp.config import (
    ActionOptions,
    CompletionOptions,
    EngineOptions,
    ServerOptions,
    parse_options,
)


def test_defaults() -> None:
    o = ServerOptions()
    c = o.completion
    assert (c.enabled, c.debounce_ms, c.max_tokens, c.max_lines) == (True, 120, 64, 8)
    assert (c.temperature, c.candidates, c.warm_after_ms) == (0.0, 1, 600)
    assert (c.prefix_tokens, c.suffix_tokens, c.extras_tokens) == (1500, 400, 512)
    assert c.disabled_languages == ()
    assert o.actions.max_tokens == 256 and o.actions.enabled
    e = o.engine
    assert (e.backend, e.autostart, e.api_key) == ("builtin", True, None)
    assert o.fim_template is None and o.templates == {}
    assert o.max_file_bytes == 20 * 1024 * 1024
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.max_lines = 3  # type: ignore[misc]


@pytest.mark.parametrize("raw", [None, {}, {"gemma": {}}, {"gemma": None}])
def test_empty_settings(raw: Any) -> None:
    assert parse_options(raw) == (ServerOptions(), [])


def test_camel_and_snake_case_with_and_without_section() -> None:
    camel = {
        "completion": {"debounceMs": 50, "maxLines": 3, "disabledLanguages": ["markdown"]},
        "engine": {
            "backend": "openai",
            "url": "http://localhost:1234/v1",
            "apiKey": "k",
            "modelName": "qwen2.5-coder",
            "requestTimeoutS": 5,
            "autostart": False,
        },
        "actions": {"maxTokens": 100, "temperature": 0.5},
        "fimTemplate": "qwen2.5-coder",
        "maxFileBytes": 1000,
        "templates": {"explain": "Explain {selection}"},
    }
    snake = {
        "completion": {"debounce_ms": 50, "max_lines": 3, "disabled_languages": ["markdown"]},
        "engine": {
            "backend": "openai",
            "url": "http://localhost:1234/v1",
            "api_key": "k",
            "model_name": "qwen2.5-coder",
            "request_timeout_s": 5.0,
            "autostart": False,
        },
        "actions": {"max_tokens": 100, "temperature": 0.5},
        "fim_template": "qwen2.5-coder",
        "max_file_bytes": 1000,
        "templates": {"explain": "Explain {selection}"},
    }
    a, wa = parse_options(camel)
    b, wb = parse_options({"gemma": snake})
    assert wa == [] and wb == []
    assert a == b
    assert a.completion.debounce_ms == 50 and a.completion.max_lines == 3
    assert a.completion.disabled_languages == ("markdown",)
    assert not a.completion.enabled_for("markdown") and a.completion.enabled_for("python")
    assert a.engine == EngineOptions(
        backend="openai",
        url="http://localhost:1234/v1",
        api_key="k",
        model_name="qwen2.5-coder",
        request_timeout_s=5.0,
        autostart=False,
    )
    assert a.actions == ActionOptions(max_tokens=100, temperature=0.5)
    assert a.fim_template == "qwen2.5-coder"
    assert a.max_file_bytes == 1000
    assert a.templates == {"explain": "Explain {selection}"}


@pytest.mark.parametrize(
    "raw, key, bad",
    [
        ({"completion": {"debounceMs": "fast"}}, "completion.debounceMs", "'fast'"),
        ({"completion": {"debounceMs": -1}}, "completion.debounceMs", "-1"),
        ({"completion": {"candidates": 4}}, "completion.candidates", "4"),
        ({"completion": {"candidates": True}}, "completion.candidates", "True"),
        ({"completion": {"temperature": 3}}, "completion.temperature", "3"),
        ({"completion": {"temperature": float("nan")}}, "completion.temperature", "nan"),
        ({"completion": {"enabled": "yes"}}, "completion.enabled", "'yes'"),
        ({"completion": {"maxLines": 2.5}}, "completion.maxLines", "2.5"),
        ({"completion": {"disabledLanguages": [1]}}, "completion.disabledLanguages", "[1]"),
        ({"engine": {"backend": "llamacpp"}}, "engine.backend", "'llamacpp'"),
        ({"engine": {"autostart": 1}}, "engine.autostart", "1"),
        ({"engine": {"url": ""}}, "engine.url", "''"),
        ({"actions": {"maxTokens": 0}}, "actions.maxTokens", "0"),
        ({"fimTemplate": "nonsense"}, "fimTemplate", "'nonsense'"),
        ({"maxFileBytes": "big"}, "maxFileBytes", "'big'"),
        ({"completion": 5}, "completion", "5"),
    ],
)
def test_bad_values_keep_defaults_and_warn(raw: dict[str, Any], key: str, bad: str) -> None:
    opts, warnings = parse_options({"gemma": raw})
    assert opts == ServerOptions()
    assert len(warnings) == 1
    assert f"gemma.{key}" in warnings[0] and bad in warnings[0]


def test_one_bad_value_does_not_spoil_the_others() -> None:
    opts, warnings = parse_options({"completion": {"maxLines": "x", "maxTokens": 32}})
    assert opts.completion.max_lines == 8 and opts.completion.max_tokens == 32
    assert len(warnings) == 1 and "maxLines" in warnings[0]


def test_unknown_keys_warn() -> None:
    opts, warnings = parse_options(
        {"gemma": {"bogus": 1, "completion": {"debounce": 3}, "templates": {"nope": "x"}}}
    )
    assert opts == ServerOptions()
    assert len(warnings) == 3
    assert any("gemma.bogus" in w for w in warnings)
    assert any("gemma.completion.debounce" in w for w in warnings)
    assert any("gemma.templates.nope" in w for w in warnings)


def test_other_tools_settings_next_to_the_section_are_ignored_quietly() -> None:
    opts, warnings = parse_options({"editor": {"tabSize": 4}, "gemma": {"completion": {}}})
    assert warnings == [] and opts == ServerOptions()


def test_null_means_unset_and_values_are_normalized() -> None:
    opts, warnings = parse_options(
        {
            "completion": {"maxLines": None, "maxTokens": 10.0, "disabledLanguages": "markdown"},
            "engine": {"backend": " OpenAI ", "socketPath": "", "model": None},
            "fimTemplate": "auto",
        }
    )
    assert warnings == []
    assert opts.completion.max_lines == 8 and opts.completion.max_tokens == 10
    assert isinstance(opts.completion.max_tokens, int)
    assert opts.completion.disabled_languages == ("markdown",)
    assert opts.engine.backend == "openai" and opts.engine.socket_path is None
    assert opts.fim_template is None


def test_custom_fim_format_is_accepted() -> None:
    opts, warnings = parse_options({"fimTemplate": "<PRE>{prefix}<SUF>{suffix}<MID>"})
    assert warnings == [] and opts.fim_template == "<PRE>{prefix}<SUF>{suffix}<MID>"


def test_base_options_are_kept_for_missing_keys() -> None:
    base, _ = parse_options({"completion": {"maxLines": 3}, "engine": {"backend": "openai"}})
    opts, warnings = parse_options({"completion": {"debounceMs": 10, "candidates": 9}}, base)
    assert opts.completion.max_lines == 3 and opts.completion.debounce_ms == 10
    assert opts.completion.candidates == 1 and len(warnings) == 1
    assert opts.engine.backend == "openai"


def test_template_overrides_validation() -> None:
    opts, warnings = parse_options({"templates": {"refactorFewshot": "R {selection}", "fix": 3}})
    assert opts.templates == {"refactor_fewshot": "R {selection}"}
    assert len(warnings) == 1 and "templates.fix" in warnings[0]


def test_budgets_from_completion_options() -> None:
    b = CompletionOptions(
        prefix_tokens=100, suffix_tokens=10, extras_tokens=0, chars_per_token=4.0
    ).budgets()
    assert (b.prefix_chars, b.suffix_chars, b.extras_chars) == (400, 40, 0)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
keys = st.sampled_from(
    [
        "gemma",
        "completion",
        "engine",
        "actions",
        "templates",
        "fimTemplate",
        "maxLines",
        "backend",
        "debounceMs",
        "enabled",
        "x",
    ]
)
settings_like = st.recursive(
    json_values, lambda inner: st.dictionaries(keys, inner, max_size=5), max_leaves=25
)


@given(settings_like)
def test_never_raises(raw: Any) -> None:
    opts, warnings = parse_options(raw)
    assert isinstance(opts, ServerOptions)
    assert all(isinstance(w, str) for w in warnings)
    assert 1 <= opts.completion.candidates <= 3
    assert opts.engine.backend in ("builtin", "openai")


def test_engine_kernels_option_reaches_the_engines_command() -> None:
    from gemma_lsp.backend import EngineBackend
    from gemma_lsp.engine_client import EngineClient

    opts, warnings = parse_options({"engine": {"kernels": False}})
    assert not warnings and opts.engine.kernels is False
    assert "--no-kernels" in EngineClient(autostart=False, connect=False,
                                          kernels=False)._command()
    assert "--no-kernels" not in EngineClient(autostart=False, connect=False)._command()
    EngineBackend(kernels=False)  # the option's way from the config to the client
    _, warnings = parse_options({"engine": {"kernels": "no"}})
    assert warnings and "kernels" in warnings[0]
