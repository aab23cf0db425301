"""A coding agent's round trip against `gemma-lsp engine --http`: a small agent loop on the
official `openai` client reads a file through a tool, writes an edit through another, and
answers once the tool results are back: the files on disk show what the model did."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai

from tests.openai.conftest import TOKEN, HttpEngine

FILE = "notes.txt"
TOOLS: list[Any] = [
    {"type": "function", "function": {
        "name": "read_file", "description": "Read a file of the project",
        "parameters": {"type": "object", "properties": {"path": {"enum": [FILE]}},
                       "required": ["path"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "write_file", "description": "Replace a file's text",
        "parameters": {"type": "object", "properties": {
            "path": {"enum": [FILE]}, "content": {"type": "string", "minLength": 1,
                                                  "maxLength": 60}},
            "required": ["path", "content"], "additionalProperties": False}}},
]


def run_tool(root: Path, name: str, args: dict[str, Any]) -> str:
    path = root / args["path"]
    if name == "read_file":
        return path.read_text()
    assert name == "write_file"
    path.write_text(args["content"])
    return "ok"


def test_an_agent_reads_a_file_through_a_tool_and_writes_an_edit(http_engine: HttpEngine,
                                                                 tmp_path: Path) -> None:
    (tmp_path / FILE).write_text("todo: buy milk\n")
    client = openai.OpenAI(base_url=http_engine.url, api_key=TOKEN, max_retries=0, timeout=900)
    messages: list[Any] = [
        {"role": "system", "content": "You are a coding agent. Use the tools."},
        {"role": "user", "content": f"Read {FILE}, then rewrite it in capital letters."}]
    # the agent's policy: read first, then write, then report (the model fills the arguments)
    trace = []
    for choice in ({"type": "function", "function": {"name": "read_file"}},
                   {"type": "function", "function": {"name": "write_file"}}, "none"):
        res = client.chat.completions.create(model="gemma", messages=messages, tools=TOOLS,
                                             tool_choice=choice, max_tokens=64, temperature=0)  # type: ignore[arg-type]
        msg = res.choices[0].message
        if choice == "none":
            assert msg.tool_calls is None and msg.content
            trace.append(("answer", msg.content))
            break
        assert res.choices[0].finish_reason == "tool_calls" and msg.tool_calls
        call = msg.tool_calls[0]
        args = json.loads(call.function.arguments)  # type: ignore[union-attr]
        result = run_tool(tmp_path, call.function.name, args)  # type: ignore[union-attr]
        trace.append((call.function.name, args))  # type: ignore[union-attr]
        messages += [{"role": "assistant", "content": msg.content, "tool_calls": [
            {"id": call.id, "type": "function", "function": {
                "name": call.function.name, "arguments": call.function.arguments}}]},  # type: ignore[union-attr]
            {"role": "tool", "tool_call_id": call.id, "content": result}]
    assert [t[0] for t in trace] == ["read_file", "write_file", "answer"]
    written = trace[1][1]["content"]
    assert (tmp_path / FILE).read_text() == written and 1 <= len(written) <= 60
