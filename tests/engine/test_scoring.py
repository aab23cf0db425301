"""Scoring continuations (next-edit candidates): equal to an uncached teacher-forced pass, the
shared start counted as zero, and the same through the scheduler with a cached prompt."""

from __future__ import annotations

import dataclasses
import queue
from typing import Any

import numpy as np
import pytest

from engine import protocol as P
from engine.model import forward
from engine.prompt_cache import PromptCache
from engine.scheduler import Scheduler
from engine.scoring import common_prefix_len, score
from tests.conftest import QUANT_ATOL

PROMPT = "def area(width, h):\n"
CANDIDATES = ["    return w * h\n", "    return width * h\n", "    return width * h  # area\n"]


INT8_SCORE_ATOL = 0.25


def teacher_forced(model: Any, ids: list[int], start: int) -> np.ndarray:
    """log p(ids[t] | ids[:t]) for t >= start, from one uncached forward pass."""
    kv = model.new_kv(len(ids) + 1)
    logits = forward(model.config, model.weights, ids, kv, logits="all")  # (T, V)
    assert logits is not None
    z = logits - logits.max(axis=-1, keepdims=True)
    lp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))  # (T, V)
    return np.array([lp[t - 1, ids[t]] for t in range(start, len(ids))])


def test_common_prefix_len() -> None:
    assert common_prefix_len([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_len([[5], [6]]) == 0 and common_prefix_len([]) == 0


@pytest.mark.parametrize("weights", ["dense", "quantized"])
def test_score_equals_uncached_teacher_forcing(model: Any, weights: str) -> None:
    # dense fp32 weights: one exact pass; the shipped quantized weights score the candidates
    # on int8 activations (engine/scoring.py): within INT8_SCORE_ATOL (measured 0.12)
    if weights == "dense":
        model = dataclasses.replace(model, weights=model.weights.dequantized())
    atol = 2e-4 if weights == "dense" else INT8_SCORE_ATOL
    tok = model.tokenizer
    prompt = tok.encode(PROMPT)
    full = [tok.encode(PROMPT + c) for c in CANDIDATES]
    assert all(f[: len(prompt)] == prompt for f in full)
    conts = [f[len(prompt):] for f in full]
    shared = common_prefix_len(conts)
    assert shared > 0  # "    return" starts them all
    kv = model.new_kv(256)
    got = score(model, kv, prompt, conts)
    for lp, f, c in zip(got, full, conts, strict=True):
        assert len(lp) == len(c)
        np.testing.assert_array_equal(lp[:shared], 0.0)
        want = teacher_forced(model, f, len(prompt) + shared)
        np.testing.assert_allclose(lp[shared:], want, atol=atol)
    # "width" after a parameter named width is more likely than "w"
    assert got[1].sum() > got[0].sum()
    # the K/V is left at the prompt plus the shared part, minus one token
    assert kv.length == len(prompt) + shared - 1


class Collector:
    def __init__(self) -> None:
        self.q: queue.Queue[P.Message] = queue.Queue()

    def send(self, msg: P.Message) -> None:
        self.q.put(msg)


def test_score_through_the_scheduler_uses_the_cache_and_reports_token_ends(model: Any) -> None:
    c = model.config
    sched = Scheduler(model, PromptCache(c.n_layers, c.n_kv_heads, c.head_dim, 64 << 20))
    sched.start()
    try:
        client = Collector()
        sched.submit(client, P.Score(id=1, prompt=PROMPT, continuations=CANDIDATES))
        first = client.q.get(timeout=120)
        assert isinstance(first, P.ScoreReply), first
        sched.submit(client, P.Score(id=2, prompt=PROMPT, continuations=CANDIDATES))
        again = client.q.get(timeout=120)
        assert isinstance(again, P.ScoreReply)
        assert again.reused_tokens > 0
        for a, b in zip(first.logprobs, again.logprobs, strict=True):
            np.testing.assert_allclose(a, b, atol=QUANT_ATOL)
        for ends, text in zip(first.ends, CANDIDATES, strict=True):
            assert ends == sorted(ends) and ends[-1] == len(text)
        sched.submit(client, P.Score(id=3, prompt=PROMPT, continuations=[]))
        err = client.q.get(timeout=60)
        assert isinstance(err, P.Error) and err.code == P.E_BAD_REQUEST
    finally:
        sched.stop()


def test_score_messages_round_trip_and_reject_bad_continuations() -> None:
    msg = P.Score(id=4, prompt="a", continuations=["b", "c"], doc="d")
    assert P.decode(P.encode(msg)[4:]) == msg
    bad = P.encode(P.Score(id=5, prompt="a", continuations=["b"]))[4:]
    import msgpack

    body = msgpack.unpackb(bad)
    body["continuations"] = ["b", 3]
    try:
        P.decode(msgpack.packb(body))
    except P.ProtocolError as e:
        assert "continuations" in str(e)
    else:
        raise AssertionError("a non-string continuation was accepted")
