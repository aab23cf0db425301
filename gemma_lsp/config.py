"""Typed server options (frozen dataclasses) and their parsing from editor settings.

`parse_options` accepts ``initializationOptions`` or ``workspace/didChangeConfiguration``
settings, either ``{"gemma": {...}}`` or the bare dict, with camelCase or snake_case keys.
It never raises: a bad value keeps the default (or the ``base`` value) and yields a warning
naming the key and the value; unknown keys yield warnings too. ``null`` means "not set".
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from engine.protocol import QUANT_CHOICES
from gemma_lsp.context import Budgets
from gemma_lsp.documents import DEFAULT_MAX_FILE_BYTES

__all__ = [
    "ActionOptions",
    "CompletionOptions",
    "EngineOptions",
    "NextEditOptions",
    "ServerOptions",
    "parse_options",
]

Backend = Literal["builtin", "openai"]
BACKENDS: tuple[str, ...] = ("builtin", "openai")
SECTION_NAMES = ("gemma", "gemmaLsp", "gemma_lsp", "gemma-lsp")


CLASSIC_MODES = ("auto", "always", "never")


@dataclass(frozen=True)
class CompletionOptions:
    enabled: bool = True
    debounce_ms: int = 120
    max_tokens: int = 64
    max_lines: int = 8
    temperature: float = 0.0
    candidates: int = 1
    prefix_tokens: int = 1500
    suffix_tokens: int = 400
    extras_tokens: int = 512
    chars_per_token: float = 3.5
    warm_after_ms: int = 600
    latency_budget_ms: int = 250  # past it answer at a line end, past twice it at once; 0 = off
    # completion-menu items (clients without inline completion) are complete units, waited
    # for at most this long after the request arrived (else no item)
    menu_wait_ms: int = 2500
    disabled_languages: tuple[str, ...] = ()
    # classic `textDocument/completion` items: "auto" offers them only to clients without
    # inline completion (a client with both would show every suggestion twice)
    classic: str = "auto"

    def budgets(self) -> Budgets:
        return Budgets(
            prefix_tokens=self.prefix_tokens,
            suffix_tokens=self.suffix_tokens,
            extras_tokens=self.extras_tokens,
            chars_per_token=self.chars_per_token,
        )

    def enabled_for(self, language_id: str) -> bool:
        return self.enabled and language_id not in self.disabled_languages


@dataclass(frozen=True)
class ActionOptions:
    enabled: bool = True
    max_tokens: int = 256
    temperature: float = 0.2
    # the file around a selection that an action's prompt shows (tokens before / after it):
    # smaller than completion's, for the first text to come soon (bench_actions: 400 before
    # answers as well as 600 did, and its prompt is prefilled while the user picks)
    prefix_tokens: int = 400
    suffix_tokens: int = 150
    # snippets of other files an action's prompt shows (0: none; explaining or fixing the
    # selection reads its own file)
    extras_tokens: int = 0
    # a code-action list asked for this long ago (not by an automatic request with nothing
    # selected) prefills the prompt of the action most likely picked, while the user reads
    # the menu; 0 turns it off
    warm_after_ms: int = 150


@dataclass(frozen=True)
class EngineOptions:
    backend: Backend = "builtin"
    socket_path: str | None = None  # None: the engine client's default
    model: str | None = None  # builtin: GGUF path (None: the embedded model)
    draft_model: str | None = None  # builtin: a Gemma 4 assistant (MTP) checkpoint or repo id
    kernels: bool = True  # builtin: packed matmul kernels (False saves memory, runs slower)
    quant: str | None = None  # builtin: a Hugging Face checkpoint's weight type (None: by size)
    url: str = "http://127.0.0.1:8080/v1"  # openai: server base URL
    api_key: str | None = None
    model_name: str | None = None  # openai: the "model" field; also picks the FIM template
    request_timeout_s: float = 30.0
    autostart: bool = True


@dataclass(frozen=True)
class NextEditOptions:
    enabled: bool = True
    # shown only when the rewrite's log-likelihood beats the unchanged region's by this many
    # nats (calibrated on scripts/bench_nes.py with the shipped model)
    threshold: float = 1.5
    adaptive: bool = True  # raise the threshold while more suggestions are rejected than taken
    lines_above: int = 2  # the editable region around the last edit
    lines_below: int = 8


@dataclass(frozen=True)
class ServerOptions:
    completion: CompletionOptions = field(default_factory=CompletionOptions)
    actions: ActionOptions = field(default_factory=ActionOptions)
    engine: EngineOptions = field(default_factory=EngineOptions)
    next_edit: NextEditOptions = field(default_factory=NextEditOptions)
    fim_template: str | None = None  # a FIM_TEMPLATES name or a format string with {prefix}
    templates: dict[str, str] = field(default_factory=dict)  # InstructionTemplates overrides
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES


# --- validators: value -> (ok, converted, expectation) ---------------------------------------

Check = Callable[[Any], tuple[bool, Any]]


@dataclass(frozen=True)
class _Rule:
    check: Check
    expect: str


def _int(lo: int, hi: int) -> _Rule:
    def check(v: Any) -> tuple[bool, Any]:
        if isinstance(v, bool):
            return False, None
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        return (isinstance(v, int) and lo <= v <= hi), v

    return _Rule(check, f"an integer from {lo} to {hi}")


def _float(lo: float, hi: float) -> _Rule:
    def check(v: Any) -> tuple[bool, Any]:
        if isinstance(v, bool) or not isinstance(v, int | float):
            return False, None
        f = float(v)
        return (math.isfinite(f) and lo <= f <= hi), f

    return _Rule(check, f"a number from {lo:g} to {hi:g}")


def _bool() -> _Rule:
    return _Rule(lambda v: (isinstance(v, bool), v), "true or false")


def _str(optional: bool = False, nonempty: bool = True) -> _Rule:
    def check(v: Any) -> tuple[bool, Any]:
        if not isinstance(v, str):
            return False, None
        if nonempty and not v.strip():
            return (True, None) if optional else (False, None)
        return True, v

    return _Rule(check, "a string" + (" (or null)" if optional else ""))


def _choice(options: tuple[str, ...]) -> _Rule:
    def check(v: Any) -> tuple[bool, Any]:
        if not isinstance(v, str):
            return False, None
        low = v.strip().lower()
        return low in options, low

    return _Rule(check, "one of " + ", ".join(repr(o) for o in options))


def _str_list() -> _Rule:
    def check(v: Any) -> tuple[bool, Any]:
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list | tuple) or not all(isinstance(x, str) for x in v):
            return False, None
        return True, tuple(x for x in v if x)

    return _Rule(check, "a list of strings")


def _fim_template() -> _Rule:
    def check(v: Any) -> tuple[bool, Any]:
        from gemma_lsp.prompts import is_valid_fim_override

        if not isinstance(v, str):
            return False, None
        if not v.strip() or v.strip().lower() == "auto":
            return True, None
        return is_valid_fim_override(v), v

    return _Rule(check, "a template name or a format string with {prefix}")


_RULES: dict[type, dict[str, _Rule]] = {
    CompletionOptions: {
        "enabled": _bool(),
        "debounce_ms": _int(0, 10_000),
        "max_tokens": _int(1, 4096),
        "max_lines": _int(1, 1000),
        "temperature": _float(0.0, 2.0),
        "candidates": _int(1, 3),
        "prefix_tokens": _int(0, 1_000_000),
        "suffix_tokens": _int(0, 1_000_000),
        "extras_tokens": _int(0, 1_000_000),
        "chars_per_token": _float(0.5, 20.0),
        "warm_after_ms": _int(0, 3_600_000),
        "latency_budget_ms": _int(0, 600_000),
        "menu_wait_ms": _int(0, 600_000),
        "disabled_languages": _str_list(),
        "classic": _choice(CLASSIC_MODES),
    },
    ActionOptions: {
        "enabled": _bool(),
        "max_tokens": _int(1, 32_768),
        "temperature": _float(0.0, 2.0),
        "prefix_tokens": _int(0, 1_000_000),
        "suffix_tokens": _int(0, 1_000_000),
        "extras_tokens": _int(0, 1_000_000),
        "warm_after_ms": _int(0, 60_000),
    },
    EngineOptions: {
        "backend": _choice(BACKENDS),
        "socket_path": _str(optional=True),
        "model": _str(optional=True),
        "draft_model": _str(optional=True),
        "kernels": _bool(),
        "quant": _choice(QUANT_CHOICES),
        "url": _str(),
        "api_key": _str(optional=True),
        "model_name": _str(optional=True),
        "request_timeout_s": _float(0.1, 3600.0),
        "autostart": _bool(),
    },
    NextEditOptions: {
        "enabled": _bool(),
        "threshold": _float(-100.0, 100.0),
        "adaptive": _bool(),
        "lines_above": _int(0, 200),
        "lines_below": _int(0, 200),
    },
}
_SECTIONS = {"completion": CompletionOptions, "actions": ActionOptions, "engine": EngineOptions,
             "next_edit": NextEditOptions}
_TOP_RULES: dict[str, _Rule] = {
    "fim_template": _fim_template(),
    "max_file_bytes": _int(1, 1 << 40),
}
# other spellings users are likely to write
_ALIASES = {
    "disabled_languages": ("languages_disabled", "disable_languages", "disabled"),
    "request_timeout_s": ("request_timeout", "timeout_s", "timeout"),
    "socket_path": ("socket",),
    "actions": ("action", "code_actions"),
    "next_edit": ("next_edits", "nes"),
}


def _snake(key: str) -> str:
    s = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key)
    return s.replace("-", "_").lower()


def _canonical(key: str, names: Mapping[str, Any]) -> str | None:
    k = _snake(key)
    if k in names:
        return k
    for name, aliases in _ALIASES.items():
        if name in names and k in aliases:
            return name
    return None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _parse_section(cls: type, raw: Any, base: Any, path: str, warnings: list[str]) -> Any:
    if raw is None:
        return base
    if not isinstance(raw, Mapping):
        warnings.append(f"{path}: expected an object, got {_show(raw)}; using defaults")
        return base
    rules = _RULES[cls]
    defaults = {f.name: getattr(base, f.name) for f in dataclasses.fields(cls)}
    changes: dict[str, Any] = {}
    for key, value in raw.items():
        name = _canonical(str(key), rules)
        if name is None:
            warnings.append(f"{path}.{key}: unknown setting (ignored)")
            continue
        if value is None:
            continue
        ok, converted = rules[name].check(value)
        if ok:
            changes[name] = converted
        else:
            warnings.append(
                f"{path}.{key}: expected {rules[name].expect}, got {_show(value)}; "
                f"using {_show(defaults[name])}"
            )
    return dataclasses.replace(base, **changes) if changes else base


def _parse_templates(
    raw: Any, base: dict[str, str], path: str, warnings: list[str]
) -> dict[str, str]:
    from gemma_lsp.prompts import InstructionTemplates

    if raw is None:
        return base
    if not isinstance(raw, Mapping):
        warnings.append(f"{path}: expected an object of name -> template text, got {_show(raw)}")
        return base
    known = {n: n for n in InstructionTemplates.names()}
    out = dict(base)
    for key, value in raw.items():
        name = _canonical(str(key), known)
        if name is None:
            warnings.append(f"{path}.{key}: unknown template (known: {', '.join(sorted(known))})")
        elif value is None:
            out.pop(name, None)
        elif not isinstance(value, str):
            warnings.append(f"{path}.{key}: expected a string, got {_show(value)}; ignored")
        else:
            out[name] = value
    return out


def parse_options(raw: Any, base: ServerOptions | None = None) -> tuple[ServerOptions, list[str]]:
    """Options from editor settings, and warnings for whatever was not understood.

    Settings missing from ``raw`` keep the ``base`` value (default: `ServerOptions()`), so a
    partial ``didChangeConfiguration`` payload can be applied on top of the current options.
    """
    base = base or ServerOptions()
    warnings: list[str] = []
    if raw is None:
        return base, warnings
    prefix = ""
    if isinstance(raw, Mapping):
        for section in SECTION_NAMES:
            if section in raw:  # other keys beside it belong to other tools: not ours to judge
                raw, prefix = raw[section], f"{section}."
                break
        if raw is None:
            return base, warnings
    if not isinstance(raw, Mapping):
        warnings.append(f"{prefix.rstrip('.') or 'settings'}: expected an object, got {_show(raw)}")
        return base, warnings

    top_names: dict[str, Any] = {**_SECTIONS, **_TOP_RULES, "templates": None}
    changes: dict[str, Any] = {}
    for key, value in raw.items():
        name = _canonical(str(key), top_names)
        where = f"{prefix}{key}"
        if name is None:
            warnings.append(f"{where}: unknown setting (ignored)")
        elif name in _SECTIONS:
            cur = changes.get(name, getattr(base, name))
            changes[name] = _parse_section(_SECTIONS[name], value, cur, where, warnings)
        elif name == "templates":
            changes[name] = _parse_templates(value, base.templates, where, warnings)
        elif name == "fim_template" and value is None:
            changes[name] = None
        elif value is not None:
            rule = _TOP_RULES[name]
            ok, converted = rule.check(value)
            if ok:
                changes[name] = converted
            else:
                warnings.append(
                    f"{where}: expected {rule.expect}, got {_show(value)}; "
                    f"using {_show(getattr(base, name))}"
                )
    return (dataclasses.replace(base, **changes) if changes else base), warnings
