"""Scoring: the log-probability of given continuations of one prompt, teacher-forced.

Next-edit suggestions ask "how likely is each rewrite of this region?": every candidate is a
continuation of the same prompt, and they share most of their tokens. `score` evaluates the
shared part once and the candidates' own tails as one tree in the same pass, and computes the
LM head only for the rows whose probabilities are asked for.

On quantized weights the candidates' tree and the LM head run on int8 activations alone
(engine.kernels.quantized: half the work of the exact path; the prompt's K/V, which stays
in the cache, is computed exactly first). bench_nes: at the default threshold the same rates
as the exact path (exact 91.7%, wrong among shown 2.9%), p50 286 vs 423 ms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from engine.config import ModelConfig
from engine.kv_cache import KVCache
from engine.model import Weights, forward, lm_head
from engine.runtime import Model

# LM-head rows per product: (8, V) fp32 logits are 8 MB for Gemma 3; bigger blocks put
# their logits on fresh pages (slow here: ~20 us a page), 64 rows cost ~2x as much a row
ROWS_PER_HEAD = 8


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


def score(model: Model, kv: KVCache, prompt: Sequence[int],
          continuations: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Log-probabilities (one array per continuation, one value per token) of each
    continuation after ``prompt``, except for the tokens every continuation shares at its
    start (they would add the same amount to every score): those come back as zeros.

    ``kv`` holds a prefix of ``prompt`` (at most all of it but the last token); it is left
    holding ``prompt`` and the shared tokens, minus one.

    One forward pass does it all: what ``kv`` lacks of the prompt, then the continuations'
    own tokens as a tree (a prefix two of them share is one row, siblings do not see each
    other; `engine.model.tree_plan`). Only the final hidden states are kept, and the LM
    head runs on the rows that predict a token: a small matrix product costs about as much
    for a few rows as for dozens, so one pass and one head beat one per candidate.
    """
    cfg, w = model.config, model.weights
    assert len(prompt) > 0 and kv.length < len(prompt)
    shared = common_prefix_len(continuations)
    # every continuation keeps at least one token of its own to score
    shared = min(shared, min((len(c) for c in continuations), default=0) - 1)
    shared = max(shared, 0)
    head = list(prompt) + list(continuations[0][:shared]) if continuations else list(prompt)
    start, base = kv.length, len(head) - 1  # kv is left holding head[:-1]

    # the tree: what kv lacks of head[:-1] as a chain, head[-1], then a trie of the tails
    nodes: list[tuple[int, int]] = [(-1, head[-1])]  # (parent node, token); node 0 = head[-1]
    child: dict[tuple[int, int], int] = {}
    asks: list[list[tuple[int, int]]] = []  # per continuation: (node that predicts, token)
    for cont in continuations:
        at, mine = 0, []
        for tok in cont[shared:]:
            mine.append((at, int(tok)))
            nxt = child.get((at, int(tok)))
            if nxt is None:
                nxt = child[(at, int(tok))] = len(nodes)
                nodes.append((at, int(tok)))
            at = nxt
        asks.append(mine)
    used = sorted({n for mine in asks for n, _ in mine})  # nodes whose row predicts something
    pending = head[start:base]
    row_of = {n: len(pending) + i for i, n in enumerate(used)}
    fed = [*pending, *(nodes[n][1] for n in used)]  # (T,)
    parents = [i - 1 for i in range(len(pending))]
    parents += [len(pending) - 1 if n == 0 else row_of[nodes[n][0]] for n in used]
    if used and w.tok_embd is None:  # dense weights: one pass for the prompt and the tree
        hidden = np.empty((len(fed), cfg.d_model), dtype=np.float32)  # (T, d)
        forward(cfg, w, fed, kv, logits="none", hidden_out=hidden, parents=parents)
    elif used:  # quantized: the prompt exactly (its K/V stays), the tree on int8 activations
        if pending:
            forward(cfg, w, pending, kv, logits="none")
        tree = [p - len(pending) if p >= len(pending) else -1 for p in parents[len(pending):]]
        hidden = np.empty((len(fed), cfg.d_model), dtype=np.float32)  # (T, d) pending unused
        forward(cfg, replace(w, approximate=True), fed[len(pending):], kv, logits="none",
                hidden_out=hidden[len(pending):], parents=tree)
    elif pending:  # every continuation was shared whole: only the prompt to take in
        forward(cfg, w, pending, kv, logits="none")
    kv.truncate(base)
    if not used:
        return [np.zeros(len(c), dtype=np.float32) for c in continuations]

    rows = np.asarray([row_of[n] for mine in asks for n, _ in mine])  # (N,)
    ids = np.asarray([t for mine in asks for _, t in mine], dtype=np.int64)  # (N,)
    lps = _log_probs(cfg, w, hidden, rows, ids)  # (N,)
    out: list[np.ndarray] = []
    at = 0
    for mine in asks:
        out.append(np.concatenate([np.zeros(shared, dtype=np.float32),
                                   lps[at : at + len(mine)]]))
        at += len(mine)
    return out


def _log_probs(cfg: ModelConfig, w: Weights, hidden: np.ndarray, rows: np.ndarray,
               ids: np.ndarray) -> np.ndarray:
    """log p(ids[i]) under the LM head of final-normed row rows[i] of hidden (T, d) -> (N,).
    Each distinct row goes through the head once, in blocks so the logits stay small."""
    distinct = np.unique(rows)  # (U,)
    out = np.empty(len(ids), dtype=np.float32)  # (N,)
    for a in range(0, len(distinct), ROWS_PER_HEAD):
        block = distinct[a : a + ROWS_PER_HEAD]  # (u,)
        logits = lm_head(cfg, w, hidden[block], exact=False)  # (u, V) int8 activations
        m = logits.max(axis=-1, keepdims=True)  # (u, 1)
        lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=-1))  # (u,)
        sel = np.isin(rows, block)  # (N,)
        where = np.searchsorted(block, rows[sel])  # (n,)
        out[sel] = logits[where, ids[sel]] - lse[where]
    return out
