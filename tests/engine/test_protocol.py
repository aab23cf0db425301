"""The wire protocol's boundary checks: every malformed or out-of-range field is a
ProtocolError (a ValueError) that names the field and value, and echoes the request's id."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest

from engine import protocol as P


def body(**fields: Any) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


@pytest.mark.parametrize(("fields", "named"), [
    ({"type": "hello", "client": 7}, "hello.client"),
    ({"type": "hello", "version": "1"}, "hello.version"),
    ({"type": "hello", "nickname": "x"}, "nickname"),
    ({"type": "generate", "id": 4, "prompt": "x", "seed": -1}, "generate.seed: -1"),
    ({"type": "generate", "id": 4, "prompt": "x", "max_tokens": -1}, "generate.max_tokens: -1"),
    ({"type": "generate", "id": 4, "prompt": "x", "max_tokens": 1 << 40}, "max_tokens"),
    ({"type": "generate", "id": 4, "prompt": "x", "temperature": -0.5}, "temperature: -0.5"),
    ({"type": "generate", "id": 4, "prompt": "x", "temperature": math.nan}, "temperature: nan"),
    ({"type": "generate", "id": 4, "prompt": "x", "temperature": math.inf}, "temperature: inf"),
    ({"type": "generate", "id": 4, "prompt": "x", "top_p": 0.0}, "top_p: 0.0"),
    ({"type": "generate", "id": 4, "prompt": "x", "top_p": 1.5}, "top_p: 1.5"),
    ({"type": "generate", "id": 4, "prompt": "x", "top_k": -2}, "top_k: -2"),
    ({"type": "generate", "id": 4, "prompt": "x", "priority": -1}, "priority: -1"),
    ({"type": "generate", "id": 4, "prompt": "x", "logprobs": 21}, "logprobs: 21"),
    ({"type": "generate", "id": 4, "prompt": "x", "deadline_ms": -5.0}, "deadline_ms: -5.0"),
    ({"type": "generate", "id": 4, "prompt": "x", "stop": ["a"] * 65}, "generate.stop"),
    ({"type": "generate", "id": 4, "prompt": "x", "stop": [1]}, "stop"),
    ({"type": "generate", "id": 4, "prompt": "x", "seed": True}, "generate.seed"),
])
def test_bad_fields_are_named(fields: dict[str, Any], named: str) -> None:
    with pytest.raises(P.ProtocolError) as err:
        P.decode(body(**fields))
    assert named in str(err.value)
    assert isinstance(err.value, ValueError)
    assert err.value.req_id == fields.get("id", 0)  # the error reply reaches the request


def test_not_a_map_and_unknown_type() -> None:
    with pytest.raises(P.ProtocolError, match="map"):
        P.decode(msgpack.packb([1, 2]))
    with pytest.raises(P.ProtocolError, match="unknown message type"):
        P.decode(body(type="explode", id=3))


def test_an_oversized_prompt_is_refused_by_its_size_alone() -> None:
    big = "é" * (P.MAX_PROMPT_BYTES // 2 + 1)  # two bytes each in UTF-8
    with pytest.raises(P.ProtocolError, match=f"{P.MAX_PROMPT_BYTES}-byte limit"):
        P.validate(P.Warm(id=1, prompt=big))
    P.validate(P.Generate(id=1, prompt="é" * 1000, seed=(1 << 64) - 1, temperature=0.7))
    with pytest.raises(P.ProtocolError, match="seed"):  # msgpack cannot carry it; in-process
        P.validate(P.Generate(id=1, prompt="x", seed=1 << 64))


def test_good_messages_round_trip() -> None:
    msg = P.Generate(id=9, prompt="def f(", max_tokens=5, temperature=0.3, top_p=0.9, seed=0,
                     stop=["\n\n"], priority=10, deadline_ms=250.0, logprobs=3)
    assert P.decode(P.encode(msg)[4:]) == msg
