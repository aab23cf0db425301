"""Constrained decoding: grammars compiled by llguidance, applied as a per-token mask on logits.

A grammar is llguidance's serialized form (a JSON string) built from a JSON Schema or a Lark
grammar; it travels in `Generate.grammar`. `TokenMask` holds one generation's matcher: before
each sample it sets the logits of every token the grammar forbids to -inf, after it advances
the matcher by the chosen token. Once a step's tokens are known (sampled and forced), the
next mask is computed on a helper thread while the forward pass runs (llguidance releases the
GIL): a mask inside a free-text string costs ~3.5 ms at 262k vocabulary, a forward pass ~50 ms,
so only applying the mask (~0.3 ms) stays on the decode path. The llguidance tokenizer is
built once per engine tokenizer (from our exact token bytes, ~2-6 s at 262k vocabulary) on
the first request that asks for structure; requests without a grammar never touch this
module.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

# compact JSON, as the chat formats render it: no whitespace freedom for a small model to abuse
JSON_STYLE: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ",
                              "key_separator": ": "}

_lock = threading.Lock()
_masker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-mask")
_tokenizers: dict[int, Any] = {}  # id(engine Tokenizer) -> (Tokenizer, llguidance.LLTokenizer)


class GrammarError(ValueError):
    """A schema or grammar llguidance cannot compile (the message says why)."""


SAFE_INT = 2**53 - 1  # the largest integer every JSON reader keeps exactly
NUMBER_STEP = 1e-6  # numbers are written with at most this many decimals


def closed(schema: Any) -> Any:
    """`schema` narrowed where it leaves a small model room to wander: `additionalProperties:
    false` where an object lists its properties and says nothing about others (no copying
    keys from the prompt), numbers within +-(2**53 - 1) unless bounded and with at most 6
    decimals (no endless digits).
    Every reply still matches the original schema."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k in ("enum", "const", "default", "examples", "required") else
               {p: closed(x) for p, x in v.items()} if k in ("properties", "$defs",
                                                              "definitions") and
               isinstance(v, dict) else closed(v)) for k, v in schema.items()}
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out and \
            "patternProperties" not in out:
        out["additionalProperties"] = False
    kind = out.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    if "integer" in kinds or "number" in kinds:
        out.setdefault("minimum", -SAFE_INT)
        out.setdefault("maximum", SAFE_INT)
    if "number" in kinds and "multipleOf" not in out:
        out["multipleOf"] = NUMBER_STEP  # at most 6 decimals: no endless "0.5000000..."
    return out


def json_schema_grammar(schema: Any) -> str:
    """The grammar of JSON documents matching `schema` (a dict, `closed`); GrammarError if
    invalid."""
    import llguidance as llg

    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON Schema must be an object, got {schema!r}")
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(closed(schema), overrides=JSON_STYLE)  # type: ignore[arg-type]
    except ValueError as e:
        raise GrammarError(f"invalid JSON Schema: {e}") from None
    check(grammar)
    return grammar


def lark_grammar(text: str) -> str:
    """A Lark grammar (llguidance's dialect: `%json {schema}` sub-grammars, `<[id]>` tokens)."""
    import llguidance as llg

    grammar = llg.LLMatcher.grammar_from_lark(text)
    check(grammar)
    return grammar


def check(grammar: str) -> None:
    """GrammarError naming the problem if llguidance cannot compile `grammar`."""
    import llguidance as llg

    error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    if error:
        raise GrammarError(messages[0] if messages else "invalid grammar")


def json_literal(value: Any) -> str:
    """`value` as a Lark string literal."""
    return json.dumps(value)


def ll_tokenizer(tok: Any) -> Any:
    """llguidance's view of the engine tokenizer (built once, then cached)."""
    key = id(tok)
    with _lock:
        hit = _tokenizers.get(key)
        if hit is not None and hit[0] is tok:
            return hit[1]
        import llguidance as llg

        wrapper = llg.TokenizerWrapper(_TokenBytes(tok))
        lt = llg.LLTokenizer(wrapper, n_vocab=tok.vocab_size, eos_token=sorted(tok.stop_ids))
        _tokenizers[key] = (tok, lt)
        return lt


class _TokenBytes:
    """What llguidance.TokenizerWrapper reads: each id's exact bytes, specials, encode."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok
        self.eos_token_id = tok.eos_id
        self.bos_token_id = tok.bos_id
        self.tokens = [tok.token_bytes(i) for i in range(tok.vocab_size)]
        self.special_token_ids = sorted(tok.special_ids)

    def __call__(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_bos=False))


class TokenMask:
    """One generation under a grammar: mask the logits, then advance by the sampled token."""

    def __init__(self, grammar: str, tok: Any) -> None:
        import llguidance as llg

        self.vocab_size = tok.vocab_size
        self.matcher = llg.LLMatcher(ll_tokenizer(tok), grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())
        self._bits = np.full((self.vocab_size + 31) // 32, -1, dtype=np.int32)  # (V/32,)
        self._pending: Future[None] | None = None  # the mask being computed for this state
        self._ready = False  # _bits holds the mask of the matcher's current state

    def _compute(self) -> None:
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)

    def _settle(self) -> None:
        """Wait for a mask computing in the background (the matcher is not shared)."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
            self._ready = True

    def prefetch(self) -> None:
        """Start computing the current state's mask on the helper thread; `apply` takes it."""
        if self._pending is None and not self._ready and not self.matcher.is_stopped():
            self._pending = _masker.submit(self._compute)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """`logits` with every forbidden token at -inf (a new array; the input is kept)."""
        self._settle()
        if not self._ready:
            self._compute()
            self._ready = True
        assert not self.matcher.is_error(), self.matcher.get_error()
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")  # (V',)
        allowed = allowed[: self.vocab_size].view(bool)  # (V,)
        return np.where(allowed, logits[: self.vocab_size], np.float32(-np.inf))  # (V,)

    def advance(self, token_id: int) -> None:
        self._settle()
        self._ready = False
        ok = self.matcher.consume_token(token_id)
        assert ok, f"token {token_id} outside the grammar: {self.matcher.get_error()}"

    def forced_tokens(self) -> list[int]:
        """Tokens that are the grammar's only way on from here (may be none)."""
        self._settle()
        return [int(t) for t in self.matcher.compute_ff_tokens()]

    @property
    def complete(self) -> bool:
        """No token can follow: the structure is finished."""
        self._settle()
        return bool(self.matcher.is_stopped())

    @property
    def accepting(self) -> bool:
        self._settle()
        return bool(self.matcher.is_accepting())
