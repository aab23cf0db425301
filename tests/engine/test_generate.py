"""Generation loop: stop ids, stop strings, max tokens, errors, cancellation, K/V reuse."""

from __future__ import annotations

from typing import Any

import pytest

from engine.generate import Final, GenerateOptions, Step, StopStringFilter, generate
from engine.model import Cancelled
from tests.conftest import reference_cases


def _run(model: Any, ids: list[int], **kw: Any) -> tuple[list[Step], Final]:
    steps: list[Step] = []
    final = None
    for ev in generate(model, ids, GenerateOptions(**kw)):
        if isinstance(ev, Final):
            final = ev
        else:
            steps.append(ev)
    assert final is not None
    return steps, final


def test_stop_string_filter_holds_back_and_cuts() -> None:
    f = StopStringFilter(["\n\n", "END"])
    out = [f.push(p) for p in ["ab", "c\n", "\nxyz"]]
    assert out == ["ab", "c", ""] and f.stopped and f.text == "abc"
    f = StopStringFilter(["END"])
    assert f.push("xE") == "x" and f.push("N") == "" and f.push("x") == "ENx"
    assert f.flush() == "" and not f.stopped
    assert StopStringFilter([]).push("E") == "E"


def test_max_tokens_and_stream_equals_final(model: Any) -> None:
    ids = reference_cases()[0]["prompt_token_ids"]
    steps, final = _run(model, ids, max_tokens=7, stop_ids=frozenset())
    assert len(steps) == 7 and final.reason == "length"
    assert "".join(s.text for s in steps) + final.tail == final.text
    assert final.text == model.tokenizer.decode(list(final.token_ids))
    assert all(s.logprob <= 0 for s in steps)


def test_stop_token_ends_generation(model: Any) -> None:
    case = next(c for c in reference_cases() if c["stop_type"] == "eos")
    steps, final = _run(model, case["prompt_token_ids"], max_tokens=64)
    assert final.reason == "stop"
    assert list(final.token_ids) == case["fp32_greedy_token_ids"][: len(final.token_ids)]


def test_stop_string_cuts_output(model: Any) -> None:
    ids = reference_cases()[0]["prompt_token_ids"]  # greedy text starts " total / self..."
    steps, final = _run(model, ids, max_tokens=20, stop_strings=("/",))
    assert final.reason == "stop_string"
    assert final.text == " total "


def test_errors_are_clear(model: Any) -> None:
    with pytest.raises(ValueError, match="empty prompt"):
        _run(model, [])
    with pytest.raises(ValueError, match="context"):
        _run(model, [2] * model.config.context_length)


def test_cancel_raises_between_steps(model: Any) -> None:
    ids = reference_cases()[0]["prompt_token_ids"]
    n = 0

    def stop() -> bool:
        return n >= 3

    gen = generate(model, ids, GenerateOptions(max_tokens=50), should_stop=stop)
    with pytest.raises(Cancelled):
        for _ in gen:
            n += 1
    assert n == 3


def test_reuses_kv_of_shared_prefix(model: Any) -> None:
    ids = reference_cases()[0]["prompt_token_ids"]
    kv = model.new_kv(len(ids) + 8)
    first = list(generate(model, ids, GenerateOptions(max_tokens=4), kv=kv))[-1]
    assert isinstance(first, Final) and first.prefill_tokens == len(ids)
    edited = ids[:-10] + [ids[-10] + 1] + ids[-9:]  # an edit 10 tokens from the end
    again = list(generate(model, edited, GenerateOptions(max_tokens=4), kv=kv))[-1]
    assert isinstance(again, Final) and again.prefill_tokens == 10
    back = list(generate(model, ids, GenerateOptions(max_tokens=4), kv=kv))[-1]
    assert isinstance(back, Final) and back.prefill_tokens == 10
    assert back.token_ids == first.token_ids
