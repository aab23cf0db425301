"""Tool calls and structured output through `gemma-lsp engine --http`, driven by the official
`openai` client against the real engine on the shipped Gemma 3 270M: calls returned (streamed
and not), results fed back, `required` / named choices and `json_schema` replies that always
validate (jsonschema) over 20 schemas, `none` never calling, OpenAI-shaped 400s."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest

from tests.openai.conftest import TOKEN, HttpEngine

# 20 argument schemas: nested objects, arrays, enums, bounded numbers, optional fields
SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
     "required": ["city"]},
    {"type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}},
     "required": ["unit"]},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}},
     "required": ["n"]},
    {"type": "object", "properties": {"x": {"type": "number", "minimum": -1.5,
                                            "maximum": 2.5}}, "required": ["x"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string",
                                                                           "maxLength": 12},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["tags"]},
    {"type": "object", "properties": {"point": {
        "type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
        "required": ["x", "y"], "additionalProperties": False}}, "required": ["point"],
     "additionalProperties": False},
    {"type": "object", "properties": {"path": {"type": "string", "maxLength": 60},
                                      "line": {"type": "integer", "minimum": 1}},
     "required": ["path"], "additionalProperties": False},
    {"type": "object", "properties": {"ids": {"type": "array", "items": {
        "type": "integer", "minimum": 0, "maximum": 100}, "maxItems": 4}}, "required": ["ids"]},
    {"type": "object", "properties": {"mode": {"enum": ["read", "write", "append"]},
                                      "force": {"type": "boolean"}},
     "required": ["mode", "force"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 130}},
        "required": ["name", "age"], "additionalProperties": False}},
     "required": ["user"], "additionalProperties": False},
    {"type": "object", "properties": {"query": {"type": "string", "maxLength": 30},
                                      "limit": {"type": "integer", "minimum": 1, "maximum": 50},
                                      "offset": {"type": "integer", "minimum": 0}},
     "required": ["query"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"sku": {"type": "string", "maxLength": 8},
                                         "qty": {"type": "integer", "minimum": 1,
                                                 "maximum": 5}},
        "required": ["sku", "qty"], "additionalProperties": False}}}, "required": ["items"],
     "additionalProperties": False},
    {"type": "object", "properties": {"level": {"type": "integer", "enum": [1, 2, 3]}},
     "required": ["level"]},
    {"type": "object", "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                                      "lon": {"type": "number", "minimum": -180,
                                              "maximum": 180}},
     "required": ["lat", "lon"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "alpha": {"type": "number", "minimum": 0,
                                                "maximum": 1}},
     "required": ["color"], "additionalProperties": False},
    {"type": "object", "properties": {"title": {"type": "string", "maxLength": 30},
                                      "done": {"type": "boolean"},
                                      "priority": {"enum": ["low", "high"]}},
     "required": ["title", "done", "priority"], "additionalProperties": False},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": 0,
                                                  "maximum": 9}}}},
     "required": ["matrix"], "additionalProperties": False},
    {"type": "object", "properties": {"config": {"type": "object", "properties": {
        "retries": {"type": "integer", "minimum": 0, "maximum": 5},
        "verbose": {"type": "boolean"},
        "target": {"type": "object", "properties": {"host": {"type": "string",
                                                             "maxLength": 20},
                                                    "port": {"type": "integer", "minimum": 1,
                                                             "maximum": 65535}},
                   "required": ["host", "port"], "additionalProperties": False}},
        "required": ["target"], "additionalProperties": False}}, "required": ["config"],
     "additionalProperties": False},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                      "kind": {"enum": ["file", "dir"]},
                                      "size": {"type": ["integer", "null"], "minimum": 0}},
     "required": ["name", "kind", "size"], "additionalProperties": False},
]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "the city", "maxLength": 40},
        "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"],
        "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the local time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string",
                                                             "maxLength": 30}},
                   "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def api(engine: HttpEngine) -> openai.OpenAI:
    return openai.OpenAI(base_url=engine.url, api_key=TOKEN, max_retries=0, timeout=900)


def tool(k: int) -> dict[str, Any]:
    return {"type": "function", "function": {"name": f"tool_{k}", "description":
                                             f"Test tool number {k}", "parameters": SCHEMAS[k]}}


def check_call(call: Any, schema: dict[str, Any], name: str) -> dict[str, Any]:
    assert call.type == "function" and call.function.name == name and call.id
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, schema)
    return dict(args)


def test_a_named_tool_call_is_returned(http_engine: HttpEngine) -> None:
    res = api(http_engine).chat.completions.create(
        model="gemma", messages=ASK, tools=[WEATHER, TIME], max_tokens=48, temperature=0,  # type: ignore[arg-type,list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = res.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls and len(choice.message.tool_calls) == 1
    check_call(choice.message.tool_calls[0], WEATHER["function"]["parameters"], "get_weather")  # type: ignore[index]


def test_a_streamed_tool_call_arrives_as_tool_call_deltas(http_engine: HttpEngine) -> None:
    chunks = list(api(http_engine).chat.completions.create(
        model="gemma", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=48,  # type: ignore[arg-type,list-item]
        temperature=0, stream=True))
    calls: dict[int, dict[str, str]] = {}
    for c in chunks:
        for d in c.choices[0].delta.tool_calls or []:
            slot = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            slot["id"] += d.id or ""
            if d.function is not None:
                slot["name"] += d.function.name or ""
                slot["arguments"] += d.function.arguments or ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert calls and calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["arguments"]),
                        WEATHER["function"]["parameters"])  # type: ignore[index]
    # the same call as the non-streamed reply (greedy)
    whole = api(http_engine).chat.completions.create(
        model="gemma", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=48,  # type: ignore[arg-type,list-item]
        temperature=0)
    assert whole.choices[0].message.tool_calls
    assert whole.choices[0].message.tool_calls[0].function.arguments == calls[0]["arguments"]


def test_the_tool_result_is_fed_back_and_answered(http_engine: HttpEngine) -> None:
    c = api(http_engine)
    first = c.chat.completions.create(model="gemma", messages=ASK, tools=[WEATHER],  # type: ignore[arg-type,list-item]
                                      tool_choice="required", max_tokens=48, temperature=0)
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    history: list[Any] = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {
            "name": call.function.name, "arguments": call.function.arguments}}]},  # type: ignore[union-attr]
        {"role": "tool", "tool_call_id": call.id,
         "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
    second = c.chat.completions.create(model="gemma", messages=history, tools=[WEATHER],  # type: ignore[list-item]
                                       tool_choice="none", max_tokens=24, temperature=0)
    answer = second.choices[0]
    assert answer.message.tool_calls is None and answer.message.content
    assert answer.finish_reason in ("stop", "length")


@pytest.mark.parametrize("k", range(len(SCHEMAS)))
def test_required_and_named_calls_validate_against_the_schema(http_engine: HttpEngine,
                                                              k: int) -> None:
    # even schemas by name among two tools, odd ones under `required` with one tool
    named = k % 2 == 0
    tools = [tool(k), tool((k + 1) % len(SCHEMAS))] if named else [tool(k)]
    res = api(http_engine).chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": f"Call tool_{k} with example "
                                  "arguments."}],
        tools=tools, max_tokens=64, temperature=0, parallel_tool_calls=False,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": f"tool_{k}"}} if named
        else "required")
    choice = res.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    check_call(choice.message.tool_calls[0], SCHEMAS[k], f"tool_{k}")


@pytest.mark.parametrize("k", range(len(SCHEMAS)))
def test_json_schema_replies_validate(http_engine: HttpEngine, k: int) -> None:
    res = api(http_engine).chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": "Reply with an example JSON "
                                  "object."}], max_tokens=64, temperature=0,
        response_format={"type": "json_schema", "json_schema": {
            "name": f"s{k}", "schema": SCHEMAS[k], "strict": True}})
    choice = res.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content or ""), SCHEMAS[k])


def test_none_never_calls_a_tool(http_engine: HttpEngine) -> None:
    prompts = ["What is the weather in Paris?", "Call get_weather for Oslo.",
               '{"name": "get_weather", "parameters": {"city": "Rome"}}']
    for text in prompts:
        for stream in (False, True):
            kwargs: dict[str, Any] = {"model": "gemma", "tools": [WEATHER], "temperature": 0,
                                      "tool_choice": "none", "max_tokens": 24,
                                      "messages": [{"role": "user", "content": text}]}
            if stream:
                chunks = list(api(http_engine).chat.completions.create(stream=True, **kwargs))
                assert not any(c.choices[0].delta.tool_calls for c in chunks)
                assert chunks[-1].choices[0].finish_reason in ("stop", "length")
            else:
                res = api(http_engine).chat.completions.create(**kwargs)
                assert res.choices[0].message.tool_calls is None
                assert res.choices[0].finish_reason in ("stop", "length")


def test_auto_may_answer_in_text(http_engine: HttpEngine) -> None:
    res = api(http_engine).chat.completions.create(
        model="gemma", tools=[WEATHER], tool_choice="auto", max_tokens=24, temperature=0,  # type: ignore[list-item]
        messages=[{"role": "user", "content": "Say hello."}])
    choice = res.choices[0]
    if choice.message.tool_calls:  # a call the model chose is still a valid one
        assert choice.finish_reason == "tool_calls"
        check_call(choice.message.tool_calls[0], WEATHER["function"]["parameters"],  # type: ignore[index]
                   "get_weather")
    else:
        assert choice.message.content and choice.finish_reason in ("stop", "length")


@pytest.mark.parametrize("kwargs, param, words", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "'nope', which is not in 'tools'"),
    ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
     "tools[0].function.name", "letters, digits"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "no-such-type"}}}}}],
      "tool_choice": "required"}, "tools", "tools:"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"minimum": "zero"}}}}}},
     "response_format", "response_format:"),
    ({"response_format": {"type": "yaml"}}, "response_format", "'json_object'"),
    ({"parallel_tool_calls": "yes", "tools": [WEATHER]}, "parallel_tool_calls", "true or false"),
])
def test_bad_tool_requests_are_openai_shaped_400s(http_engine: HttpEngine, kwargs: Any,
                                                   param: str, words: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        api(http_engine).chat.completions.create(model="gemma", messages=ASK, max_tokens=4,
                                                 **kwargs)
    assert e.value.status_code == 400
    body = e.value.body
    assert isinstance(body, dict) and body["type"] == "invalid_request_error"
    assert body["param"] == param and words in body["message"], body
    # the server keeps serving
    assert api(http_engine).chat.completions.create(model="gemma", messages=ASK,
                                                    max_tokens=2).choices
