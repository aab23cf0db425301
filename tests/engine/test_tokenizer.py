"""Tokenizer: llama.cpp's ids on the reference prompts, exact round trips, bytes, specials."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from engine.tokenizer import IncrementalDecoder, Tokenizer
from tests.conftest import reference_cases

CORPUS = [
    "plain ascii text",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧",
    "中文字符和日本語のテキスト、한국어",
    "\tindented\twith\ttabs\n\t\tand more",
    "windows\r\nline\r\nendings\r\n",
    "runs    of     spaces   and\n\n\n\nblank lines",
    "  leading and trailing spaces  ",
    "math ∑∫√ and arrows ⟶ ⇒, rare: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀",
    "control \x01\x02\x7f chars and a NUL \x00 byte",
    "<h1>user-defined pieces</h1> <table>",
    "",
]


@pytest.fixture(scope="module")
def tok(model: Any) -> Tokenizer:
    return model.tokenizer  # type: ignore[no-any-return]


@pytest.mark.parametrize("case", reference_cases(), ids=lambda c: c["name"])
def test_matches_llama_cpp(tok: Tokenizer, case: dict[str, Any]) -> None:
    assert tok.encode(case["prompt"]) == case["prompt_token_ids"]
    assert tok.decode(case["prompt_token_ids"], skip_special=True) == case["prompt"]


def test_long_text_split_path_equals_whole(tok: Tokenizer) -> None:
    text = "".join(c["prompt"] for c in reference_cases()) * 3  # > 4096 chars: line pieces
    assert len(text) > 4096
    whole = [tok.bos_id] + tok.hf.encode(text, add_special_tokens=False).ids
    assert tok.encode(text) == whole


@pytest.mark.parametrize("text", CORPUS)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id
    assert tok.decode(ids, skip_special=True) == text


def test_byte_fallback_and_invalid_utf8(tok: Tokenizer) -> None:
    ids = tok.encode("𓀀")[1:]  # a rare character: byte tokens
    assert all(tok.id_to_piece(i).startswith("<0x") for i in ids)
    assert b"".join(tok.token_bytes(i) for i in ids) == "𓀀".encode()
    broken = [tok.hf.token_to_id("<0xF0>"), tok.hf.token_to_id("<0x9F>")]  # a cut 4-byte char
    assert tok.decode(broken) == "\ufffd"
    assert tok.token_bytes_of(broken) == b"\xf0\x9f"


def test_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("<start_of_turn>user\nhi<end_of_turn>", add_bos=False)
    assert ids[0] == 105 and ids[-1] == 106
    assert tok.stop_ids >= {1, 106}
    assert tok.is_special(105) and not tok.is_special(ids[1])
    assert tok.decode(ids, skip_special=True) == "user\nhi"


def test_incremental_decoder(tok: Tokenizer) -> None:
    ids = tok.encode("a😀b", add_bos=False)
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) + dec.flush() == "a😀b"
    assert all("\ufffd" not in p for p in pieces)  # never half a character
    for case in reference_cases():
        dec = IncrementalDecoder(tok)
        out = "".join(dec.push(i) for i in case["greedy_token_ids"]) + dec.flush()
        assert out == tok.decode(case["greedy_token_ids"], skip_special=True)


def test_save_load_and_corrupt(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    merges = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["merges"]
    assert isinstance(merges[0], str)  # the compact form, parsed faster
    for text in [c["prompt"] for c in reference_cases()] + CORPUS:
        assert again.encode(text) == tok.encode(text)
    assert again.stop_ids == tok.stop_ids and again.special_ids == tok.special_ids
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=str(tmp_path)):
        Tokenizer.load(tmp_path)
    with pytest.raises(ValueError, match="missing"):
        Tokenizer.load(tmp_path / "nowhere")
