"""The scheduler in-process with the real model: the prompt cache changes nothing but speed;
priorities, supersede and warm behave."""

from __future__ import annotations

import queue
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from engine import protocol as P
from engine.generate import GenerateOptions, Step, generate
from engine.prompt_cache import PromptCache
from engine.sampling import SamplingParams
from engine.scheduler import CHUNK_ROUND, MIN_CHUNK, Scheduler
from tests.conftest import TYPING_BASE, assert_same_top

BASE = TYPING_BASE


class Collector:
    def __init__(self) -> None:
        self.q: queue.Queue[P.Message] = queue.Queue()

    def send(self, msg: P.Message) -> None:
        self.q.put(msg)

    def until_end(self, req_id: int, timeout: float = 120) -> tuple[list[P.Token], P.Message]:
        toks: list[P.Token] = []
        while True:
            msg = self.q.get(timeout=timeout)
            if getattr(msg, "id", None) != req_id:
                continue
            if isinstance(msg, P.Token):
                toks.append(msg)
            else:
                return toks, msg


@pytest.fixture()
def sched(model: Any) -> Iterator[Scheduler]:
    c = model.config
    s = Scheduler(model, PromptCache(c.n_layers, c.n_kv_heads, c.head_dim, 256 << 20),
                  interactive_chunk=96, background_chunk=64)
    s.start()
    yield s
    s.stop()


def uncached(model: Any, prompt: str, n: int) -> tuple[list[int], list[list[tuple[int, float]]]]:
    ids = model.tokenizer.encode(prompt)
    opts = GenerateOptions(max_tokens=n, sampling=SamplingParams(), top_logprobs=5)
    steps = [e for e in generate(model, ids, opts) if isinstance(e, Step)]
    return [s.token_id for s in steps], [list(s.top) for s in steps]


def test_random_edits_and_cursor_jumps_cached_equals_uncached(model: Any, sched: Scheduler) -> None:
    rng = random.Random(7)
    doc = BASE.read_text()[:1400]
    client = Collector()
    for i in range(8):
        kind = rng.choice(["type", "edit", "jump"])
        if kind == "type":
            cursor = len(doc)
            doc += rng.choice(["x", " = ", "\n    ", "def f(", "return "])
            cursor = len(doc)
        elif kind == "edit":
            at = rng.randrange(len(doc))
            doc = doc[:at] + rng.choice(["# note\n", "y", ""]) + doc[at + rng.randrange(3):]
            cursor = at
        else:
            cursor = rng.randrange(len(doc))
        prompt = doc[:cursor]
        sched.submit(client, P.Generate(id=i, prompt=prompt, max_tokens=3, logprobs=5,
                                        doc="d"))
        toks, done = client.until_end(i)
        assert isinstance(done, P.Done), done
        want_ids, want_top = uncached(model, prompt, 3)
        assert [t.token_id for t in toks] == want_ids, (kind, cursor)
        for got, want in zip(toks, want_top, strict=True):
            assert_same_top([(int(i), lp) for i, lp in got.top], list(want))
    assert sched.cache.stats()["hit_rate"] > 0.5


def test_newer_completion_supersedes_and_completions_overtake(model: Any,
                                                               sched: Scheduler) -> None:
    client = Collector()
    text = BASE.read_text()
    # a long explanation-like job at low priority, then two completions for one document
    sched.submit(client, P.Generate(id=1, prompt=text, max_tokens=40, priority=10))
    sched.submit(client, P.Generate(id=2, prompt=text[:300], max_tokens=2, doc="a"))
    sched.submit(client, P.Generate(id=3, prompt=text[:310], max_tokens=2, doc="a"))
    order = []
    seen: dict[int, P.Message] = {}
    while len(seen) < 3:
        msg = client.q.get(timeout=120)
        if isinstance(msg, P.Done | P.Error):
            seen[msg.id] = msg
            order.append(msg.id)
    assert isinstance(seen[2], P.Error) and seen[2].code == P.E_SUPERSEDED
    assert isinstance(seen[3], P.Done) and isinstance(seen[1], P.Done)
    assert order.index(3) < order.index(1)  # the completion did not wait for the long job


def test_warm_then_complete_evaluates_only_new_tokens(model: Any, sched: Scheduler) -> None:
    client = Collector()
    text = BASE.read_text()
    sched.submit(client, P.Warm(id=1, prompt=text, doc="w"))
    _, done = client.until_end(1)
    assert isinstance(done, P.Done) and done.reason == "warmed"
    sched.submit(client, P.Generate(id=2, prompt=text + "\n", max_tokens=1, doc="w"))
    _, done = client.until_end(2)
    assert isinstance(done, P.Done)
    assert done.evaluated_tokens <= 3  # the new text (and a re-tokenized boundary token)
    half = text[: len(text) // 2]
    sched.submit(client, P.Generate(id=3, prompt=half, max_tokens=1, doc="w"))
    _, done = client.until_end(3)
    assert isinstance(done, P.Done) and done.evaluated_tokens <= 3  # mid-file: cached too


def test_errors_are_replies(model: Any, sched: Scheduler) -> None:
    client = Collector()
    sched.submit(client, P.Generate(id=1, prompt="x", temperature=-1))
    _, err = client.until_end(1)
    assert isinstance(err, P.Error) and err.code == P.E_BAD_REQUEST and "temperature" in err.message
    assert sched.cancel(client, 99) is False  # nothing to cancel is not an error


class Ordered(Collector):
    """A client that also records, in one list shared by clients, when each request ended."""

    def __init__(self, name: str, ends: list[tuple[str, int]]) -> None:
        super().__init__()
        self.name, self.ends = name, ends

    def send(self, msg: P.Message) -> None:
        if isinstance(msg, P.Done | P.Error):
            self.ends.append((self.name, msg.id))
        super().send(msg)


def test_a_client_with_one_request_is_not_starved_by_a_busy_one(model: Any,
                                                                 sched: Scheduler) -> None:
    ends: list[tuple[str, int]] = []
    busy, quiet = Ordered("busy", ends), Ordered("quiet", ends)
    text = BASE.read_text()
    for i in range(6):  # six windows' worth of requests from one client, all the same priority
        sched.submit(busy, P.Generate(id=i, prompt=text[: 300 + 40 * i], max_tokens=2))
    sched.submit(quiet, P.Generate(id=99, prompt=text[:250], max_tokens=2))
    _, done = quiet.until_end(99)
    assert isinstance(done, P.Done)
    before = [e for e in ends[: ends.index(("quiet", 99))] if e[0] == "busy"]
    assert len(before) <= 2, ends  # it took its turn, not the seventh place in line
    for i in range(6):
        busy.until_end(i)


def test_a_waiting_request_ages_into_the_interactive_class(model: Any) -> None:
    c = model.config
    s = Scheduler(model, PromptCache(c.n_layers, c.n_kv_heads, c.head_dim, 64 << 20),
                  age_s=0.3)
    s.start()
    try:
        ends: list[tuple[str, int]] = []
        a, b, low = Ordered("a", ends), Ordered("b", ends), Ordered("low", ends)
        text = BASE.read_text()
        s.submit(low, P.Generate(id=50, prompt=text[:200], max_tokens=1, priority=10))
        for i in range(12):  # a steady stream of completions from two clients
            for who in (a, b):
                s.submit(who, P.Generate(id=i, prompt=text[: 220 + 10 * i], max_tokens=2))
        _, done = low.until_end(50)
        assert isinstance(done, P.Done)
        assert ends.index(("low", 50)) < 20, ends  # not behind all 24 of them
        for i in range(12):
            a.until_end(i)
            b.until_end(i)
    finally:
        s.stop()


def test_prefill_chunks_follow_the_measured_speed(model: Any, sched: Scheduler) -> None:
    client = Collector()
    sched.submit(client, P.Generate(id=1, prompt=BASE.read_text(), max_tokens=1))
    _, done = client.until_end(1)
    assert isinstance(done, P.Done)
    chunk = sched.status()["prefill_chunk"]
    assert MIN_CHUNK <= chunk <= sched.interactive_chunk and chunk % CHUNK_ROUND == 0
    per_tok, fixed = sched._chunk_s_per_tok, sched._fixed_s
    assert per_tok > 0 and fixed > 0
    room = max(sched.chunk_target_s - fixed, sched.chunk_target_s / 4)  # past the fixed cost
    want = min(sched.interactive_chunk,
               max(MIN_CHUNK, int(room / per_tok) // CHUNK_ROUND * CHUNK_ROUND))
    assert chunk == want


def test_a_busy_heavy_client_is_not_starved_by_light_ones_that_come_and_go(model: Any) -> None:
    """Fair queuing by compute time: accounts outlive a moment without work. Light clients
    used to be reset to the least-served level each time they came back, so one that stayed
    busy with heavy requests waited behind them for good (60 s under 8 windows)."""
    from engine.scheduler import DEBT_S, Job

    c = model.config
    s = Scheduler(model, PromptCache(c.n_layers, c.n_kv_heads, c.head_dim, 1 << 20))  # idle
    heavy, lights = Collector(), [Collector() for _ in range(3)]
    seq = iter(range(10_000))

    def job(client: Collector) -> Job:
        return Job(client, next(seq), "generate", np.array([2]), 1, "", None, 0.0, None,
                   next(seq))

    picks = {id(x): 0 for x in [heavy, *lights]}
    s._jobs = [job(heavy)]
    for _ in range(400):
        # every light client has one short request, then none for a moment: one unit each
        for light in lights:
            if not any(j.client is light for j in s._jobs):
                s._jobs.append(job(light))
        picked = s._pick()
        assert picked is not None
        picks[id(picked.client)] += 1
        s._charge(picked, 1.0 if picked.client is heavy else 0.1)  # heavy units cost more
        if picked.client is not heavy:
            s._finish(picked)  # a light request ends after its unit
    # time shares converge: the heavy client got its fair part of the compute seconds
    heavy_s = picks[id(heavy)] * 1.0
    light_s = [picks[id(x)] * 0.1 for x in lights]
    assert heavy_s >= min(light_s) - DEBT_S - 1.0, (heavy_s, light_s)
    assert max(light_s) - min(light_s) <= DEBT_S + 0.5


def test_memory_is_released_when_the_queue_empties_at_most_every_second(model: Any) -> None:
    """The daemon passes glibc's malloc_trim: the compute thread calls it once the queue is
    empty, not more often than RELEASE_EVERY_S, and never while work is queued."""
    import time

    from engine.daemon import malloc_trimmer

    trim = malloc_trimmer()
    calls: list[float] = []

    def release() -> None:
        calls.append(time.monotonic())
        if trim is not None:
            trim()

    c = model.config
    s = Scheduler(model, PromptCache(c.n_layers, c.n_kv_heads, c.head_dim, 64 << 20),
                  release_memory=release)
    s.start()
    try:
        client = Collector()
        s.submit(client, P.Generate(id=1, prompt="def add(a, b):", max_tokens=2))
        assert isinstance(client.until_end(1)[1], P.Done)
        for i in range(2, 5):  # a second within the first: not released again
            s.submit(client, P.Generate(id=i, prompt="def add(a, b):", max_tokens=1))
            assert isinstance(client.until_end(i)[1], P.Done)
        assert len(calls) == 1
        time.sleep(1.05)
        s.submit(client, P.Generate(id=9, prompt="def sub(a, b):", max_tokens=1))
        assert isinstance(client.until_end(9)[1], P.Done)
        time.sleep(0.1)  # the compute thread finishes the job after its reply
        assert len(calls) == 2
    finally:
        s.stop()


def test_a_long_cached_prefix_is_copied_a_bounded_piece_per_unit(model: Any,
                                                                 sched: Scheduler) -> None:
    """Copying thousands of cached positions into a fresh working K/V is a unit like any
    other (at most COPY_UNIT positions), so another client's keystroke is not held up by it;
    the answer is the uncached one."""
    from engine.scheduler import COPY_UNIT

    prompt = BASE.read_text()[:3000]
    client = Collector()
    sched.submit(client, P.Warm(id=1, prompt=prompt, doc=""))
    assert isinstance(client.until_end(1)[1], P.Done)
    sched._hot = None  # a fresh buffer: everything comes from the prompt cache
    copied: list[int] = []
    copy_into = sched.cache.copy_into

    def recording(m: Any, kv: Any, limit: int) -> int:
        before = kv.length
        out = copy_into(m, kv, limit)
        copied.append(kv.length - before)
        return out

    sched.cache.copy_into = recording  # type: ignore[method-assign]
    sched.submit(client, P.Generate(id=2, prompt=prompt + "\n", max_tokens=3))
    toks, done = client.until_end(2)
    assert isinstance(done, P.Done), done
    n = len(model.tokenizer.encode(prompt))
    assert sum(copied) >= n - 1 > 2 * COPY_UNIT and max(copied) <= COPY_UNIT
    assert [t.token_id for t in toks] == uncached(model, prompt + "\n", 3)[0]
