"""Scoring: the log-probability of given continuations of one prompt, teacher-forced.

Next-edit suggestions ask "how likely is each rewrite of this region?": every candidate is a
continuation of the same prompt, and they share most of their tokens. `score` evaluates the
shared part once, then each candidate's own tail, and computes the LM head only for the rows
whose probabilities are asked for.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.kv_cache import KVCache
from engine.model import forward
from engine.runtime import Model


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix all sequences share."""
    if not seqs:
        return 0
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = seqs[0][i]
        if any(s[i] != t for s in seqs[1:]):
            return i
    return n


def _log_softmax_at(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """log p(ids[t]) under each row of logits (T, V) -> (T,)."""
    m = logits.max(axis=-1, keepdims=True)  # (T, 1)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=-1))  # (T,)
    return logits[np.arange(len(ids)), ids] - lse  # (T,)


def score(model: Model, kv: KVCache, prompt: Sequence[int],
          continuations: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Log-probabilities (one array per continuation, one value per token) of each
    continuation after ``prompt``, except for the tokens every continuation shares at its
    start (they would add the same amount to every score): those come back as zeros.

    ``kv`` holds a prefix of ``prompt`` (at most all of it but the last token); it is left
    holding ``prompt`` and the shared tokens, minus one.
    """
    cfg, w = model.config, model.weights
    assert len(prompt) > 0 and kv.length < len(prompt)
    shared = common_prefix_len(continuations)
    # every continuation keeps at least one token of its own to score
    shared = min(shared, min((len(c) for c in continuations), default=0) - 1)
    shared = max(shared, 0)
    head = list(prompt) + list(continuations[0][:shared]) if continuations else list(prompt)
    # the prompt and the shared tokens, without logits; the last one is evaluated per tail
    if kv.length < len(head) - 1:
        forward(cfg, w, head[kv.length : len(head) - 1], kv, logits="none")
    base = kv.length  # == len(head) - 1
    out: list[np.ndarray] = []
    for cont in continuations:
        kv.truncate(base)
        tail = [head[-1], *cont[shared:]]  # (1 + t,)
        if len(tail) == 1:
            out.append(np.zeros(len(cont), dtype=np.float32))
            continue
        logits = forward(cfg, w, tail, kv, logits="all")  # (1 + t, V)
        assert logits is not None
        lp = _log_softmax_at(logits[:-1], np.asarray(tail[1:]))  # (t,)
        out.append(np.concatenate([np.zeros(shared, dtype=np.float32), lp.astype(np.float32)]))
    kv.truncate(base)
    return out
