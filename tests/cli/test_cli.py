"""The command line as users and outside checks run it: tokenize, generate, generate --json."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import reference_cases


def run(args: list[str], stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "gemma_lsp", *args], input=stdin, capture_output=True, timeout=600
    )


def test_tokenize_prints_reference_ids(model: Any) -> None:
    case = reference_cases()[2]  # non-ASCII text
    out = run(["tokenize"], case["prompt"].encode())
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == case["prompt_token_ids"]


def test_generate_json_from_stdin_is_greedy(model: Any) -> None:
    case = reference_cases()[4]
    n = 12
    out = run(["generate", "--json", "--temperature", "0", "--max-tokens", str(n)],
              case["prompt"].encode())
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["token_ids"] == case["fp32_greedy_token_ids"][:n]
    assert res["prompt_tokens"] == len(case["prompt_token_ids"])
    assert res["text"] == model.tokenizer.decode(res["token_ids"])
    assert res["prefill_tok_s"] > 0 and res["decode_tok_s"] > 0


def test_generate_streams_text_and_reports_speed(model: Any) -> None:
    out = run(["generate", "def add(a, b):\n    return", "--max-tokens", "5"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    assert b"tok/s" in out.stderr


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["generate", ""], b"", b"empty prompt"),
        (["generate", "--json"], b"", b"empty prompt"),
        (["generate", "x", "--max-tokens", "-1"], b"", b"--max-tokens"),
        (["generate", "x", "--temperature", "-2"], b"", b"temperature"),
        (["generate", "--file", "/nonexistent/file.py"], b"", b"/nonexistent/file.py"),
        (["generate", "x", "--model", "/nonexistent/m.gguf"], b"", b"/nonexistent/m.gguf"),
        (["tokenize"], b"\xff\xfe", b"not valid UTF-8"),
    ],
)
def test_bad_input_is_a_clear_message(args: list[str], stdin: bytes, message: bytes) -> None:
    out = run(args, stdin)
    assert out.returncode == 2
    assert message in out.stderr
    assert b"Traceback" not in out.stderr


def test_prompt_longer_than_context_is_a_clear_message(model: Any) -> None:
    out = run(["generate", "--json"], b"x = 1\n" * 12000)  # ~36k tokens > 32k context
    assert out.returncode == 2
    assert b"context" in out.stderr and b"Traceback" not in out.stderr
