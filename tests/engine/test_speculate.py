"""Speculative decoding: prompt lookup, the draft-length policy, greedy equality with plain
decoding, the sampled distribution, cancellation mid-verify, and the prompt cache never
seeing a rejected draft."""

from __future__ import annotations

import queue
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine import protocol as P
from engine.generate import Final, GenerateOptions, Step, TokenStream, generate, speculate
from engine.model import Cancelled, forward
from engine.prompt_cache import PromptCache
from engine.runtime import Model
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from engine.speculate import (
    ForwardCost,
    PromptLookup,
    SpecStats,
    Speculator,
    expected_tokens,
)
from gemma_lsp.context import CompletionContext
from gemma_lsp.prompts import (
    completion_prompt,
    docstring_prompt,
    explain_prompt,
    refactor_prompt,
    template_for_model,
)
from tests.conftest import QUANT_ATOL, TYPING_BASE, assert_same_top
from tests.engine.tiny import tiny_config, tiny_tensors, tiny_vocab, write_tiny_gguf

CODE = TYPING_BASE.read_text()


class Eager(Speculator):
    """Drafts as much as the drafter offers at every step: exercises verification."""

    def draft_length(self) -> int:
        return self.max_draft


def run(model: Any, ids: Sequence[int], spec: Speculator | None = None,
        **kw: Any) -> tuple[list[Step], Final]:
    steps: list[Step] = []
    final = None
    for ev in generate(model, list(ids), GenerateOptions(**kw), speculator=spec):
        if isinstance(ev, Final):
            final = ev
        else:
            steps.append(ev)
    assert final is not None
    return steps, final


# ----------------------------------------------------------------------------- units


def test_prompt_lookup_drafts_the_longest_most_recent_match_incrementally() -> None:
    d = PromptLookup([1, 2, 3, 4, 9, 2, 3, 5, 6, 2, 3], max_ngram=3, min_ngram=2)
    assert d.propose(2) == [5, 6]  # "2 3" last continued with 5 (most recent)
    d.append([4])  # now "2 3 4" matches the start, a longer match than "3 4"
    assert d.propose(3) == [9, 2, 3]
    d.append([7])  # "4 7" never seen
    assert d.propose(3) == []
    assert d.propose(0) == []
    with pytest.raises(ValueError, match="n-gram"):
        PromptLookup([1], max_ngram=2, min_ngram=3)
    # the prompt's index (built per n-gram size at once) equals one built token by token
    toks = [t % 7 for t in range(0, 400, 3)] * 2
    one_by_one = PromptLookup([])
    one_by_one.append(toks)
    assert PromptLookup(toks).index == one_by_one.index


def test_draft_length_follows_acceptance_and_cost() -> None:
    cheap = ForwardCost()
    for rows in range(1, 14):
        cheap.observe(rows, 0.010 + 0.001 * (rows - 1))  # +10% per extra row
    dear = ForwardCost()
    for rows in range(1, 14):
        dear.observe(rows, 0.010 * rows)  # a row costs as much as a decode step
    s = Speculator(PromptLookup([1, 2]), cheap, prior=0.9)
    assert s.draft_length() >= 8
    assert Speculator(PromptLookup([1, 2]), dear, prior=0.9).draft_length() == 0
    low = Speculator(PromptLookup([1, 2]), cheap, prior=0.05)
    assert low.draft_length() == 0  # switched off where it does not pay
    # a request may start where the last one of its kind ended
    assert Speculator(PromptLookup([1, 2]), cheap, accept=0.05).draft_length() == 0
    for _ in range(10):  # repeated misses lower the estimate until drafting stops
        s.observe(drafted=4, accepted=0, rows=5, seconds=0.014)
    assert s.draft_length() == 0
    for _ in range(100):  # plain steps drift back toward the prior: drafting is probed again
        s.observe(drafted=0, accepted=0, rows=1, seconds=0.010)
    assert s.draft_length() > 0
    assert expected_tokens(0.0, 5) == 1.0 and expected_tokens(1.0, 5) == 6.0
    # unmeasured row counts interpolate
    c = ForwardCost()
    c.observe(1, 1.0)
    c.observe(5, 3.0)
    assert c.relative(3) == pytest.approx(2.0) and c.relative(9) > 3.0


def test_stats_per_kind() -> None:
    stats = SpecStats()
    s = Speculator(PromptLookup([1, 2]), ForwardCost())
    s.observe(drafted=4, accepted=3, rows=5, seconds=0.02)
    s.observe(drafted=0, accepted=0, rows=1, seconds=0.01)
    stats.add("refactor", s, tokens=5)
    stats.add("completion", None, tokens=3)
    d = stats.as_dict()
    assert d["refactor"]["drafted"] == 4 and d["refactor"]["accepted"] == 3
    assert d["refactor"]["tokens_per_verify_step"] == 4.0 and d["refactor"]["plain_steps"] == 1
    assert d["completion"] == {"requests": 1, "tokens": 3, "drafted": 0, "accepted": 0,
                               "acceptance": 0.0, "verify_steps": 0,
                               "tokens_per_verify_step": 0.0, "plain_steps": 0}


def test_protocol_carries_kind_and_the_speculate_option() -> None:
    import msgpack

    msg = P.decode(P.encode(P.Generate(id=1, prompt="x", kind="refactor", speculate=False))[4:])
    assert isinstance(msg, P.Generate) and msg.kind == "refactor" and msg.speculate is False
    with pytest.raises(P.ProtocolError, match="speculate"):
        P.decode(msgpack.packb({"type": "generate", "id": 1, "prompt": "x", "speculate": 1}))


# ----------------------------------------------------------------------------- shipped model


def _prompts(model: Any) -> dict[str, str]:
    lines = CODE.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith("def "))
    selection = "".join(lines[at : at + 12])
    ctx = CompletionContext(prefix="".join(lines[:at]), suffix="".join(lines[at + 12 : at + 30]),
                            language_id="python")
    completion, _ = completion_prompt(
        CompletionContext(prefix="".join(lines[: at + 40]), language_id="python"),
        template_for_model(model.name))
    refactor, _ = refactor_prompt(ctx, selection, "python", False, "add type hints")
    docstring, _ = docstring_prompt(ctx, selection, "python", False)
    chat, _ = explain_prompt(None, selection, "python", True)
    return {"completion": completion, "refactor": refactor, "docstring": docstring,
            "chat": chat}


@pytest.mark.parametrize("kind", ["completion", "refactor", "docstring", "chat"])
def test_greedy_speculation_equals_plain_greedy_on_the_shipped_model(model: Any,
                                                                     kind: str) -> None:
    ids = model.tokenizer.encode(_prompts(model)[kind], add_bos=True)
    plain, pf = run(model, ids, max_tokens=40, top_logprobs=3)
    spec = Eager(PromptLookup(ids), ForwardCost(), max_draft=8)
    fast, ff = run(model, ids, spec, max_tokens=40, top_logprobs=3)
    assert ff.token_ids == pf.token_ids and ff.text == pf.text and ff.reason == pf.reason
    assert [s.text for s in fast] == [s.text for s in plain]
    for a, b in zip(fast, plain, strict=True):  # logprobs as plain decoding reports them
        assert a.logprob == pytest.approx(b.logprob, abs=QUANT_ATOL)
        assert_same_top(list(a.top), list(b.top))
    assert spec.drafted > 0 and spec.verify_steps > 0
    if kind in ("refactor", "docstring"):  # these copy the selection: drafts are accepted
        assert spec.accepted > 0


def test_greedy_speculation_with_stop_strings_and_the_adaptive_policy(model: Any) -> None:
    ids = model.tokenizer.encode(_prompts(model)["refactor"], add_bos=True)
    plain, pf = run(model, ids, max_tokens=60, stop_strings=("```",))
    _, ff = run(model, ids, max_tokens=60, stop_strings=("```",), speculate=True)
    assert ff.token_ids == pf.token_ids and ff.text == pf.text and ff.reason == pf.reason


def test_cancellation_mid_verify_leaves_the_cache_as_before(model: Any) -> None:
    ids = model.tokenizer.encode(_prompts(model)["refactor"], add_bos=True)
    kv = model.new_kv(len(ids) + 16)
    forward(model.config, model.weights, ids, kv)
    n = kv.length
    k_before, v_before = kv.k[:, :, :n].copy(), kv.v[:, :, :n].copy()
    stream = TokenStream(model, GenerateOptions(max_tokens=16), 16)
    calls = 0

    def stop() -> bool:  # true once the verify forward is a few layers in
        nonlocal calls
        calls += 1
        return calls > 3

    drafts = ids[-6:]
    with pytest.raises(Cancelled):
        speculate(model, kv, stream, ids[-7], drafts, should_stop=stop)
    assert kv.length == n and not stream.ids
    assert (kv.tokens[:n] == np.asarray(ids)).all()
    assert np.array_equal(kv.k[:, :, :n], k_before) and np.array_equal(kv.v[:, :, :n], v_before)
    # the next step goes on as if the cancelled verify had never run
    steps = speculate(model, kv, stream, 1, [])
    fresh = model.new_kv(len(ids) + 16)
    forward(model.config, model.weights, ids, fresh)
    want = forward(model.config, model.weights, [1], fresh)
    assert want is not None and steps[0].token_id == int(np.argmax(want))


class Spoiled(PromptLookup):
    """Prompt lookup whose last draft token is replaced by another one."""

    def propose(self, k: int) -> list[int]:
        drafts = super().propose(k)
        return drafts[:-1] + [(drafts[-1] + 7919) % 262144] if drafts else drafts


class Collector:
    def __init__(self) -> None:
        self.q: queue.Queue[P.Message] = queue.Queue()

    def send(self, msg: P.Message) -> None:
        self.q.put(msg)

    def until_end(self, req_id: int, timeout: float = 600) -> tuple[list[P.Token], P.Message]:
        toks: list[P.Token] = []
        while True:
            msg = self.q.get(timeout=timeout)
            if isinstance(msg, P.Token):
                toks.append(msg)
            elif getattr(msg, "id", None) == req_id:
                return toks, msg


def test_scheduler_speculates_and_rejected_drafts_never_reach_the_prompt_cache(
    model: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    c = model.config
    cache = PromptCache(c.n_layers, c.n_kv_heads, c.head_dim, 256 << 20)
    sched = Scheduler(model, cache)
    # draft eagerly whatever the machine's timings, and end every draft with a token the
    # lookup did not propose (the model picks it with negligible probability): rejections
    monkeypatch.setattr("engine.scheduler.Speculator", Eager)
    monkeypatch.setattr("engine.scheduler.PromptLookup", Spoiled)
    sched.start()
    try:
        prompt = _prompts(model)["chat"]
        client = Collector()
        sched.submit(client, P.Generate(id=1, prompt=prompt, max_tokens=40, kind="chat"))
        toks, done = client.until_end(1)
        assert isinstance(done, P.Done), done
        status = sched.status()
    finally:
        sched.stop()
    ids = model.tokenizer.encode(prompt, add_bos=True)
    plain, _ = run(model, ids, max_tokens=40)
    assert [t.token_id for t in toks] == [s.token_id for s in plain]
    spec = status["speculation"]["chat"]
    assert spec["drafted"] > spec["accepted"], spec  # some drafts were rejected
    assert spec["verify_steps"] > 0 and status["forward_ms_by_rows"]
    # the weights as they are served: the GGUF's own types, their bytes, K/V per token
    w = status["weights"]
    assert w["weight_types"] == {"Q4_K": 27, "Q5_0": 36, "Q6_K": 9, "Q8_0": 10}
    assert 250e6 < w["weight_bytes"] < 350e6 and w["kv_bytes_per_token"] == 36864
    assert w["quant"] == "gguf" and "MatMulNBits" in status["kernels"]["backend"]
    # the cache holds exactly prompt + generated tokens (all but the last), with their K/V
    seq = ids + [t.token_id for t in toks][:-1]
    node, path = cache.root, []
    while node.children:
        assert len(node.children) == 1
        node = next(iter(node.children.values()))
        path += node.tokens.tolist()
    assert path == seq
    kv = model.new_kv(len(seq))
    forward(c, model.weights, seq, kv, logits="none")
    got = np.concatenate([n.k for n in _chain(cache)], axis=2)
    # the generation's rows went through the few-row kernel, this one-shot forward through the
    # dequantized sgemm: keys agree to ~0.05 (magnitudes up to ~10); a leaked draft's differ
    # by O(1)
    assert float(np.abs(got - kv.k[:, :, : len(seq)]).max()) < 0.15


def _chain(cache: PromptCache) -> list[Any]:
    out, node = [], cache.root
    while node.children:
        node = next(iter(node.children.values()))
        out.append(node)
    return out


# ----------------------------------------------------------------------------- sampling


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Model:
    d = tmp_path_factory.mktemp("tiny")
    mp = pytest.MonkeyPatch()
    mp.setenv("GEMMA_LSP_CACHE", str(d / "cache"))
    cfg = tiny_config(vocab_size=len(tiny_vocab()[0]))
    write_tiny_gguf(str(d / "tiny.gguf"), cfg, tiny_tensors(cfg, seed=3))
    try:
        return Model.load(Path(d / "tiny.gguf"))
    finally:
        mp.undo()


def chi2_999(df: int) -> float:
    """The chi-square distribution's 0.999 quantile (Wilson-Hilferty; scipy is not a
    dependency): 11.2 for 1 degree of freedom (exact 10.83), 26.3 for 8 (26.12)."""
    h = 2.0 / (9.0 * df)
    return float(df * (1.0 - h + 3.0902 * np.sqrt(h)) ** 3)


def test_speculative_sampling_preserves_the_target_distribution(tiny: Model) -> None:
    """Three sampled tokens, the last two drafted: their joint histogram over many seeds
    matches the model's exact probabilities (chi-square), and each seed gives plain
    decoding's text."""
    prompt = [2, 270, 271, 272, 270, 271]
    sp = dict(temperature=1.0, top_k=3)
    cfg, w = tiny.config, tiny.weights

    def dist(ids: list[int]) -> dict[int, float]:
        logits = forward(cfg, w, ids, tiny.new_kv(len(ids)))
        assert logits is not None
        top = np.argsort(-logits[: tiny.tokenizer.vocab_size])[:3]
        p = np.exp(logits[top] - logits[top].max())
        return dict(zip(top.tolist(), (p / p.sum()).tolist(), strict=True))

    # exact joint probabilities of (t1, t2, t3)
    exact: dict[tuple[int, ...], float] = {}
    for a, pa in dist(prompt).items():
        for b, pb in dist(prompt + [a]).items():
            for c, pc in dist(prompt + [a, b]).items():
                exact[(a, b, c)] = pa * pb * pc
    likely = max(exact, key=lambda k: exact[k])

    class Fixed:  # always drafts the most likely continuation: accepted or rejected by chance
        needs_hidden = False

        def __init__(self) -> None:
            self.n = 0

        def propose(self, k: int) -> list[int]:
            return list(likely[self.n : self.n + k])

        def append(self, tokens: Sequence[int], hidden: object = None) -> None:
            self.n += len(tokens)

    counts: dict[tuple[int, ...], int] = {}
    runs, drafted, accepted = 3000, 0, 0
    for seed in range(runs):
        spec = Eager(Fixed(), ForwardCost(), max_draft=2)  # type: ignore[arg-type]
        _, f = run(tiny, prompt, spec, max_tokens=3, stop_ids=frozenset(),
                   sampling=SamplingParams(seed=seed, **sp))  # type: ignore[arg-type]
        counts[f.token_ids] = counts.get(f.token_ids, 0) + 1
        drafted += spec.drafted
        accepted += spec.accepted
        if seed < 50:
            _, plain = run(tiny, prompt, max_tokens=3, stop_ids=frozenset(),
                           sampling=SamplingParams(seed=seed, **sp))  # type: ignore[arg-type]
            assert plain.token_ids == f.token_ids
    assert set(counts) <= set(exact)
    assert 0 < accepted < drafted  # both branches of the acceptance test ran
    # chi-square over cells with enough expected mass (the rest pooled)
    cells = sorted(exact, key=lambda k: -exact[k])
    big = [k for k in cells if exact[k] * runs >= 5]
    rest = [k for k in cells if k not in big]
    obs = [counts.get(k, 0) for k in big] + [sum(counts.get(k, 0) for k in rest)]
    exp = [exact[k] * runs for k in big] + [sum(exact[k] for k in rest) * runs]
    if exp[-1] < 5:
        obs[-2] += obs.pop()
        exp[-2] += exp.pop()
    chi2 = sum((o - e) ** 2 / e for o, e in zip(obs, exp, strict=True))
    assert chi2 < chi2_999(len(obs) - 1), (chi2, obs, exp)
