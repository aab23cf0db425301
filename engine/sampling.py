"""Turning logits into a token: greedy, temperature, top-k, top-p, seed; logprobs. No model here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Full log-softmax over the last axis in fp64-safe fp32 (max-shifted): (..., V)."""
    shifted = logits - logits.max(axis=-1, keepdims=True)  # (..., V)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))  # (..., V)


def logprob_of(logits: np.ndarray, token_id: int) -> float:
    """log p(token) under the untempered distribution."""
    m = float(logits.max())
    lse = m + float(np.log(np.exp(logits - m).sum()))
    return float(logits[token_id]) - lse


def top_logprobs(logits: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The n most likely ids with their logprobs, best first."""
    n = min(n, logits.shape[0])
    idx = np.argpartition(-logits, n - 1)[:n]  # (n,)
    idx = idx[np.argsort(-logits[idx], kind="stable")]
    m = float(logits.max())
    lse = m + float(np.log(np.exp(logits - m).sum()))
    return [(int(i), float(logits[i]) - lse) for i in idx]


class Sampler:
    """Picks the next id from logits; holds the RNG so a seed gives a repeatable run."""

    def __init__(self, params: SamplingParams, vocab_size: int) -> None:
        self.params = params
        self.vocab_size = vocab_size  # never pick an id the tokenizer does not have
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> tuple[int, float]:
        """Return (token id, its logprob under the untempered distribution)."""
        logits = logits[: self.vocab_size]  # (V,)
        p = self.params
        if p.greedy:
            tid = int(np.argmax(logits))
            return tid, logprob_of(logits, tid)
        # candidates: top-k (or all), sorted by logit
        k = p.top_k if p.top_k > 0 else logits.shape[0]
        if k < logits.shape[0]:
            cand = np.argpartition(-logits, k - 1)[:k]  # (k,)
        else:
            cand = np.arange(logits.shape[0])  # (V,)
        cand = cand[np.argsort(-logits[cand], kind="stable")]
        z = logits[cand].astype(np.float64) / p.temperature  # (k,)
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            probs = probs[:keep] / probs[:keep].sum()
            cand = cand[:keep]
        tid = int(cand[self.rng.choice(len(cand), p=probs)])
        return tid, logprob_of(logits, tid)
