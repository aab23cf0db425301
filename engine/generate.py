"""Prefill, decode one token, speculate (verify drafts), and generate with stop rules;
cancellation between steps.

These are the only functions that drive the forward pass; sampling is delegated to
`engine.sampling`, drafting to `engine.speculate`, K/V lives in an `engine.kv_cache.KVCache`
the caller may reuse.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from engine.grammar import TokenMask
from engine.kv_cache import KVCache
from engine.model import Cancelled, forward
from engine.runtime import Model
from engine.sampling import Sampler, SamplingParams, top_logprobs
from engine.speculate import ForwardCost, PromptLookup, Speculator
from engine.tokenizer import IncrementalDecoder

DEFAULT_PREFILL_CHUNK = 512


@dataclass(frozen=True)
class GenerateOptions:
    max_tokens: int = 128
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_strings: tuple[str, ...] = ()
    stop_ids: frozenset[int] | None = None  # None: the tokenizer's end tokens
    top_logprobs: int = 0  # also report this many alternatives per step
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    speculate: bool = False  # draft by prompt lookup and verify drafts in batches
    # llguidance grammar (engine.grammar); "" = unconstrained. A grammar rules out speculative
    # decoding: draft tokens are not masked.
    grammar: str = ""

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.prefill_chunk <= 0:
            raise ValueError(f"prefill_chunk must be > 0, got {self.prefill_chunk}")


@dataclass(frozen=True)
class Step:
    """One generated token and the text it completed (may be '' mid-character)."""

    token_id: int
    logprob: float
    text: str
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Final:
    """How a generation ended, with its timings."""

    reason: str  # "stop" (end token), "stop_string", "length"
    text: str  # the whole generated text (stop string excluded)
    tail: str  # text released only at the end (held-back stop-string prefix, cut character)
    token_ids: tuple[int, ...]
    prompt_tokens: int
    prefill_tokens: int  # prompt tokens actually evaluated (less when K/V was reused)
    prefill_s: float
    decode_s: float

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        n = max(len(self.token_ids) - 1, 0)  # the first token comes out of prefill
        return n / self.decode_s if self.decode_s > 0 else 0.0


def prefill(
    model: Model,
    kv: KVCache,
    tokens: Sequence[int],
    *,
    chunk: int = DEFAULT_PREFILL_CHUNK,
    should_stop: Callable[[], bool] | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Evaluate `tokens` after kv.length in chunks; return the logits after the last one.

    `on_chunk(kv.length)` runs after each finished chunk (a prompt cache can keep it).
    """
    assert len(tokens) > 0
    logits: np.ndarray | None = None
    for s in range(0, len(tokens), chunk):
        part = tokens[s : s + chunk]
        last = s + chunk >= len(tokens)
        logits = forward(
            model.config,
            model.weights,
            part,
            kv,
            logits="last" if last else "none",
            should_stop=should_stop,
        )
        if on_chunk is not None:
            on_chunk(kv.length)
    assert logits is not None
    return logits


def decode_one(model: Model, kv: KVCache, token_id: int) -> np.ndarray:
    """Append one token and return the next-token logits (V,)."""
    out = forward(model.config, model.weights, [token_id], kv, logits="last")
    assert out is not None
    return out


def speculate(
    model: Model,
    kv: KVCache,
    stream: TokenStream,
    last: int | Sequence[int],
    drafts: Sequence[int],
    *,
    should_stop: Callable[[], bool] | None = None,
    hidden_out: np.ndarray | None = None,
) -> list[Step]:
    """Feed `last` (the newest emitted token, or the emitted tokens the cache lacks: the
    newest sampled one and any a grammar forced after it) and `drafts` in one batched
    forward; emit tokens row by row through `stream` while the drafts match what it picks.

    Row i holds the logits after `last` and the first i drafts, exactly what plain decoding
    would compute once those tokens were emitted, so `stream` samples from each the way it
    would have (greedy: identical ids). With sampling, drawing the token from the target
    distribution and accepting the draft iff it equals the draw is speculative sampling for a
    deterministic draft: the draft is accepted with probability p(draft), and otherwise the
    token is distributed as p with the draft removed, renormalised; a seed gives the same
    text as plain decoding. With no drafts this is one plain decode step.

    Afterwards `kv` holds `last` and the accepted drafts only: the rejected drafts' K/V is cut
    back (`truncate`), so nothing of them can reach a prompt cache. Raises Cancelled between
    layers if `should_stop()` turns true; `kv` is then as it was before the call.
    `hidden_out` (1 + k, d), if given, receives each row's final-normed hidden state.
    """
    fed = [last] if isinstance(last, int) else list(last)
    assert fed and (hidden_out is None or len(fed) == 1)
    start = kv.length
    rows = forward(model.config, model.weights, [*fed, *drafts], kv, logits="all",
                   should_stop=should_stop, hidden_out=hidden_out)  # (n + k, V)
    assert rows is not None
    rows = rows[len(fed) - 1 :]  # (1 + k, V): the logits after the newest fed token, then drafts
    steps: list[Step] = []
    used = 0  # rows whose input token is right (last, then accepted drafts)
    for i in range(len(drafts) + 1):
        used = i + 1
        step = stream.step(rows[i])
        if step is None:
            break
        steps.append(step)
        if stream.done or i == len(drafts) or step.token_id != drafts[i]:
            break
    kv.truncate(start + len(fed) - 1 + used)
    return steps


def decode_step(
    model: Model,
    kv: KVCache,
    stream: TokenStream,
    pending: Sequence[int],
    spec: Speculator | None,
    *,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[list[Step], list[int]]:
    """One unit of decoding after the emitted tokens the cache lacks (`pending`): a verify
    step if `spec` drafts, else a plain step, then the tokens a grammar forces; tells `spec`
    what happened (timing, acceptance, emitted tokens). Returns the steps and the new
    pending tokens (the newest sampled one and the forced ones after it)."""
    t0 = time.perf_counter()  # the cost of a step includes drafting it
    room = min(kv.capacity - kv.length, stream.max_new - len(stream.ids)) - 1
    drafts = spec.drafts(room) if spec is not None and room > 0 else []
    hidden = (np.empty((1 + len(drafts), model.config.d_model), dtype=np.float32)
              if spec is not None and spec.needs_hidden else None)
    steps = speculate(model, kv, stream, pending, drafts, should_stop=should_stop,
                      hidden_out=hidden)
    new_pending = [steps[-1].token_id] if steps else []
    if spec is not None:
        accepted = 0
        while (accepted < min(len(steps), len(drafts))
               and steps[accepted].token_id == drafts[accepted]):
            accepted += 1
        spec.observe(len(drafts), accepted, 1 + len(drafts), time.perf_counter() - t0)
        h = hidden[len(steps) - 1] if hidden is not None and steps else None
        spec.append([s.token_id for s in steps], h)
    forced = stream.forced()  # a grammar's only continuation: fed with the next step
    return steps + forced, new_pending + [f.token_id for f in forced]



def decode_steps(model: Model, kv: KVCache, token_ids: Sequence[int]) -> np.ndarray:
    """Append tokens already chosen (one sampled, then any a grammar forces) in one forward
    pass and return the next-token logits (V,)."""
    if len(token_ids) == 1:
        return decode_one(model, kv, token_ids[0])
    out = forward(model.config, model.weights, token_ids, kv, logits="last")
    assert out is not None
    return out

class StopStringFilter:
    """Holds back text that might be the start of a stop string; cuts at the first match."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""  # everything seen
        self.emitted = 0  # how much of it was released
        self.stopped = False

    def push(self, piece: str) -> str:
        self.text += piece
        if not self.stops:
            self.emitted = len(self.text)
            return piece
        longest = max(len(s) for s in self.stops)
        search_from = max(0, self.emitted - longest + 1)
        hits = [i for s in self.stops if (i := self.text.find(s, search_from)) >= 0]
        if hits:
            cut = min(hits)
            out = self.text[self.emitted : cut]
            self.text = self.text[:cut]
            self.emitted = cut
            self.stopped = True
            return out
        hold = 0
        for s in self.stops:  # longest suffix of text that is a proper prefix of a stop
            for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        safe = len(self.text) - hold
        out = self.text[self.emitted : safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out

    def flush(self) -> str:
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out


class TokenStream:
    """The decode side of one generation: sample, detokenize, apply stop rules, keep ids/text.

    Shared by `generate` and the daemon's scheduler, which drive the forward pass themselves.
    """

    def __init__(self, model: Model, opts: GenerateOptions, max_new: int) -> None:
        tok = model.tokenizer
        self.opts = opts
        self.max_new = max_new
        self.stop_ids = tok.stop_ids if opts.stop_ids is None else opts.stop_ids
        self.sampler = Sampler(opts.sampling, tok.vocab_size)
        self.detok = IncrementalDecoder(tok)
        self.stops = StopStringFilter(opts.stop_strings)
        # the grammar mask, only for requests that ask for structure (engine.grammar)
        self.mask = TokenMask(opts.grammar, tok) if opts.grammar else None
        self.ids: list[int] = []
        self.text: list[str] = []
        self.reason = ""  # set when done: stop, stop_string, length

    @property
    def done(self) -> bool:
        return bool(self.reason)

    def step(self, logits: np.ndarray) -> Step | None:
        """Pick the next token from `logits`; None if generation ended without a new token."""
        assert not self.done
        if len(self.ids) >= self.max_new:
            self.reason = "length"
            return None
        if self.mask is not None:
            logits = self.mask.apply(logits)  # (V,) forbidden tokens at -inf
        tid, lp = self.sampler(logits)
        if tid in self.stop_ids:
            self.reason = "stop"
            return None
        if self.mask is not None:
            self.mask.advance(tid)
        self.ids.append(tid)
        n_top = self.opts.top_logprobs
        top = tuple(top_logprobs(logits, n_top)) if n_top else ()
        piece = self.stops.push(self.detok.push(tid))
        self.text.append(piece)
        if self.stops.stopped:
            self.reason = "stop_string"
        elif self.mask is not None and self.mask.complete:
            self.reason = "stop"  # the grammar admits no further token
        elif len(self.ids) >= self.max_new:
            self.reason = "length"
        return Step(tid, lp, piece, top)

    def forced(self) -> list[Step]:
        """The tokens the grammar admits as the only continuation (llguidance's fast-forward
        tokens), taken at once: the caller evaluates them in one forward pass. Then the next
        token's mask starts computing in the background (`TokenMask.prefetch`)."""
        if self.mask is None or self.done:
            return []
        out = []
        for tid in self.mask.forced_tokens():
            if len(self.ids) >= self.max_new:
                break
            self.mask.advance(tid)
            self.ids.append(tid)
            piece = self.stops.push(self.detok.push(tid))
            self.text.append(piece)
            out.append(Step(tid, 0.0, piece))
            if self.stops.stopped:
                self.reason = "stop_string"
                return out
        if self.mask.complete:
            self.reason = "stop"
        elif len(self.ids) >= self.max_new:
            self.reason = "length"
        else:  # the step's tokens are known: the next mask computes while they are evaluated
            self.mask.prefetch()
        return out

    def finish(self) -> str:
        """Release held-back text; returns it (the `tail`)."""
        tail = ""
        if not self.stops.stopped:
            tail = self.stops.push(self.detok.flush()) + self.stops.flush()
        self.text.append(tail)
        return tail


def generate(
    model: Model,
    prompt_ids: Sequence[int],
    opts: GenerateOptions,
    *,
    kv: KVCache | None = None,
    should_stop: Callable[[], bool] | None = None,
    speculator: Speculator | None = None,
) -> Iterator[Step | Final]:
    """Prefill the prompt (reusing what `kv` already holds of its prefix), then sample;
    with `opts.speculate` (or a `speculator`) drafts are verified in batched steps.

    Yields a Step per token and one Final at the end. Raises engine.model.Cancelled when
    `should_stop()` turns true (checked between layers and between steps).
    """
    cfg = model.config
    n_prompt = len(prompt_ids)
    check_prompt_length(n_prompt, cfg.context_length)
    max_new = min(opts.max_tokens, cfg.context_length - n_prompt)
    if kv is None:
        kv = KVCache(cfg, n_prompt + max(max_new, 1))
    elif kv.capacity < n_prompt + max_new:
        raise ValueError(f"KV cache holds {kv.capacity} positions; need {n_prompt + max_new}")
    stream = TokenStream(model, opts, max_new)

    # reuse the K/V of the longest shared prefix already in the cache (keep >= 1 to evaluate)
    reuse = min(kv.common_prefix(np.asarray(prompt_ids, dtype=np.int64)), n_prompt - 1)
    kv.truncate(reuse)
    t0 = time.perf_counter()
    logits = prefill(
        model, kv, prompt_ids[reuse:], chunk=opts.prefill_chunk, should_stop=should_stop
    )
    prefill_s = time.perf_counter() - t0

    spec = speculator
    if spec is None and opts.speculate:
        spec = Speculator(PromptLookup(prompt_ids), ForwardCost())
    t1 = time.perf_counter()
    first = stream.step(logits)
    steps = [] if first is None else [first, *stream.forced()]
    pending = [s.token_id for s in steps]  # emitted, not yet in the K/V
    if spec is not None:
        spec.append([s.token_id for s in steps])
    while steps:
        yield from steps
        if stream.done:
            break
        if should_stop is not None and should_stop():
            raise Cancelled()
        steps, pending = decode_step(model, kv, stream, pending, spec, should_stop=should_stop)
    decode_s = time.perf_counter() - t1
    tail = stream.finish()
    yield Final(
        stream.reason,
        "".join(stream.text),
        tail,
        tuple(stream.ids),
        n_prompt,
        n_prompt - reuse,
        prefill_s,
        decode_s,
    )


def check_prompt_length(n_prompt: int, context_length: int) -> None:
    """ValueError for an empty prompt or one that leaves no room in the context."""
    if n_prompt == 0:
        raise ValueError("empty prompt: nothing to complete")
    if n_prompt >= context_length:
        raise ValueError(f"prompt is {n_prompt} tokens; the model's context is {context_length}")
