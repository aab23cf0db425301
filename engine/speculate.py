"""Speculative decoding policy: prompt-lookup drafts, adaptive draft length, cost model, stats.

A drafter proposes tokens that the target model then verifies in one batched forward
(`engine.generate.speculate`). Prompt lookup drafts the continuation of the longest recent
n-gram match in the prompt (document, selection being rewritten) and the text generated so
far: refactors, docstrings and repetitive completions copy most of their text.

The index is a hash of n-grams (dict: the last n tokens -> where that n-gram last ended with
a known continuation), updated per token. Measured here in CPU time (2,000 prompt tokens of
the typing benchmark file, n = 2..6): building it 2.2 ms, appending a token 2.1 us, a lookup
1.0 us. A pure-Python suffix automaton measured 2.2 ms / 2.4 us / 0.3 us, but its states
remember the first occurrence of a match; the most recent one (what a rewrite is copying
right now) would need a walk up the suffix links per token, so the hash won.

Whether to draft, and how much, is a cost decision: with per-token acceptance rate a
(an exponential moving average per request) a verify of k drafts emits on average
(1 - a^(k+1)) / (1 - a) tokens and costs c(k+1) / c(1) decode steps, where c(rows) is the
measured wall time of a forward over that many rows (`ForwardCost`, shared per engine, so it
follows the BLAS kernels and the machine's load). The draft length maximising tokens per
second is used; when no length beats plain decoding the request decodes plainly, and its
acceptance estimate drifts back toward the prior so drafting is probed again later.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

MAX_NGRAM = 6  # longest suffix looked up
MIN_NGRAM = 2  # shortest suffix that may propose a draft
MAX_DRAFT = 12  # drafts per verify step, at most
PRIOR_ACCEPT = 0.5  # acceptance estimate before anything was measured
ACCEPT_EMA = 0.3  # weight of the newest verify step in the acceptance estimate
RELAX = 0.05  # per plain step, the estimate moves this share back toward the prior
MIN_GAIN = 1.05  # speculate only if the expected speed-up is at least this


class Drafter(Protocol):
    """Proposes up to k next tokens for the sequence so far; learns the emitted tokens (and,
    if it `needs_hidden`, the target's final-normed hidden state before the newest one)."""

    needs_hidden: bool

    def propose(self, k: int) -> list[int]: ...

    def append(self, tokens: Sequence[int], hidden: np.ndarray | None = None) -> None: ...


class PromptLookup:
    """Drafts by n-gram lookup over the prompt and the generated tokens (incremental)."""

    needs_hidden = False

    def __init__(self, prompt: Sequence[int], max_ngram: int = MAX_NGRAM,
                 min_ngram: int = MIN_NGRAM) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min <= max, got {min_ngram}, "
                             f"{max_ngram}")
        self.max_n = max_ngram
        self.min_n = min_ngram
        toks = [int(t) for t in prompt]
        self.tokens: list[int] = toks
        # n-gram -> end index (exclusive) of its latest occurrence that has a continuation;
        # built per n-gram size with zip (C loops), later occurrences overwriting earlier ones
        self.index: dict[tuple[int, ...], int] = {}
        last = len(toks) - 1  # the n-grams ending at len(toks) have no continuation yet
        for n in range(min_ngram, max_ngram + 1):
            if last >= n:
                grams = zip(*(toks[j : last - n + j + 1] for j in range(n)), strict=True)
                self.index.update(zip(grams, range(n, last + 1), strict=True))

    def append(self, tokens: Sequence[int], hidden: np.ndarray | None = None) -> None:
        """Add tokens; index the n-grams that now have a next token."""
        toks = self.tokens
        index = self.index
        for t in tokens:
            end = len(toks)  # n-grams ending here get `t` as their continuation
            for n in range(self.min_n, min(self.max_n, end) + 1):
                index[tuple(toks[end - n : end])] = end
            toks.append(int(t))

    def propose(self, k: int) -> list[int]:
        """The k tokens that followed the longest (then most recent) match of the suffix."""
        toks = self.tokens
        end = len(toks)
        if k <= 0:
            return []
        for n in range(min(self.max_n, end), self.min_n - 1, -1):
            at = self.index.get(tuple(toks[end - n :]))
            if at is not None:
                return toks[at : at + k]
        return []


class ForwardCost:
    """Measured seconds per forward pass by row count (1 = a plain decode step), shared by
    all requests of an engine; thread-safe."""

    def __init__(self, max_rows: int = MAX_DRAFT + 1, ema: float = 0.2) -> None:
        self.max_rows = max_rows
        self.ema = ema
        self.seconds: dict[int, float] = {}
        self._lock = threading.Lock()

    def observe(self, rows: int, seconds: float) -> None:
        with self._lock:
            old = self.seconds.get(rows)
            self.seconds[rows] = seconds if old is None else (1 - self.ema) * old + \
                self.ema * seconds

    def relative(self, rows: int) -> float:
        """Cost of a forward over `rows` rows in plain decode steps (estimated if unmeasured).

        Unmeasured sizes interpolate linearly between measured ones; before any multi-row
        measurement a mild prior (each extra row +10%) lets speculation be tried once.
        """
        with self._lock:
            known = dict(self.seconds)
        one = known.get(1)
        if one is None or one <= 0:
            return 1.0 + 0.1 * (rows - 1)
        if rows in known:
            return known[rows] / one
        below = max((r for r in known if r < rows), default=1)
        above = min((r for r in known if r > rows), default=None)
        lo = known.get(below, one) / one
        if above is None:  # extrapolate with the slope from 1 row to the largest measured
            slope = (lo - 1.0) / (below - 1) if below > 1 else 0.1
            return lo + max(slope, 0.02) * (rows - below)
        hi = known[above] / one
        return lo + (hi - lo) * (rows - below) / (above - below)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {str(r): round(s * 1000, 2) for r, s in sorted(self.seconds.items())}


def expected_tokens(accept: float, k: int) -> float:
    """Tokens a verify of k drafts emits on average (the bonus token included)."""
    if accept >= 1.0:
        return float(k + 1)
    return (1.0 - accept ** (k + 1)) / (1.0 - accept)


class Speculator:
    """Per request: asks the drafter for the draft length that pays, learns acceptance."""

    def __init__(self, drafter: Drafter, cost: ForwardCost, max_draft: int = MAX_DRAFT,
                 prior: float = PRIOR_ACCEPT, accept: float | None = None) -> None:
        """`accept`: the starting acceptance estimate (e.g. where the last request of the
        same kind ended), else `prior`."""
        if max_draft < 0:
            raise ValueError(f"max_draft must be >= 0, got {max_draft}")
        self.drafter = drafter
        self.cost = cost
        self.max_draft = min(max_draft, cost.max_rows - 1)
        self.prior = prior
        self.accept = prior if accept is None else accept
        self.drafted = 0
        self.accepted = 0
        self.verify_steps = 0  # forwards that carried drafts
        self.verify_tokens = 0  # tokens those forwards emitted
        self.plain_steps = 0

    def draft_length(self) -> int:
        """The k in 0..max_draft maximising expected tokens per unit of time (0: decode)."""
        best_k, best = 0, MIN_GAIN
        for k in range(1, self.max_draft + 1):
            gain = expected_tokens(self.accept, k) / self.cost.relative(k + 1)
            if gain > best:
                best_k, best = k, gain
        return best_k

    @property
    def needs_hidden(self) -> bool:
        return self.drafter.needs_hidden

    def drafts(self, limit: int) -> list[int]:
        """Drafts for the next verify step (at most `limit`); [] means decode plainly."""
        k = min(self.draft_length(), limit)
        return self.drafter.propose(k) if k > 0 else []

    def append(self, emitted: Sequence[int], hidden: np.ndarray | None = None) -> None:
        """Tokens emitted (by prefill or a step) go to the drafter."""
        self.drafter.append(emitted, hidden)

    def observe(self, drafted: int, accepted: int, rows: int, seconds: float) -> None:
        """One forward over `rows` rows took `seconds`; `accepted` of `drafted` drafts
        matched."""
        self.cost.observe(rows, seconds)
        if drafted:
            self.drafted += drafted
            self.accepted += accepted
            self.verify_steps += 1
            self.verify_tokens += accepted + 1
            # a rejection at position j says: a^j accepted then one miss; estimate per token
            rate = accepted / (accepted + (1 if accepted < drafted else 0) or 1)
            self.accept = (1 - ACCEPT_EMA) * self.accept + ACCEPT_EMA * rate
        else:
            self.plain_steps += 1
            self.accept += (self.prior - self.accept) * RELAX


@dataclass
class KindStats:
    """Speculation counters for one kind of request (completion, refactor, chat...)."""

    requests: int = 0
    tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    verify_steps: int = 0
    verify_tokens: int = 0
    plain_steps: int = 0

    def add(self, s: Speculator | None, tokens: int) -> None:
        self.requests += 1
        self.tokens += tokens
        if s is not None:
            self.drafted += s.drafted
            self.accepted += s.accepted
            self.verify_steps += s.verify_steps
            self.verify_tokens += s.verify_tokens
            self.plain_steps += s.plain_steps

    def as_dict(self) -> dict[str, float | int]:
        return {
            "requests": self.requests, "tokens": self.tokens, "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance": round(self.accepted / self.drafted, 3) if self.drafted else 0.0,
            "verify_steps": self.verify_steps,
            "tokens_per_verify_step": (round(self.verify_tokens / self.verify_steps, 2)
                                       if self.verify_steps else 0.0),
            "plain_steps": self.plain_steps,
        }


@dataclass
class SpecStats:
    """Per request kind counters, for `status`; thread-safe."""

    kinds: dict[str, KindStats] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, kind: str, s: Speculator | None, tokens: int) -> None:
        with self._lock:
            self.kinds.setdefault(kind or "other", KindStats()).add(s, tokens)

    def as_dict(self) -> dict[str, dict[str, float | int]]:
        with self._lock:
            return {k: v.as_dict() for k, v in sorted(self.kinds.items())}
