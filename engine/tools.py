"""Tool calls in each model family's own chat format: render prompts, build grammars, parse.

An OpenAI chat request (messages with `tool_calls` and `tool` results, `tools`, `tool_choice`,
`parallel_tool_calls`) becomes the prompt text the family was trained on, a grammar that
constrains the reply (engine.grammar) and, from the generated text, OpenAI tool calls.

- Gemma 3 has no tool tokens: its published chat template knows user and model turns only, and
  Google's function-calling guide for Gemma is a prompt convention. The tool list (JSON
  function declarations) and the instruction join the first user turn, as the template folds a
  system message; a call is one line `{"name": ..., "parameters": {...}}`; tool results go back
  in a user turn as ```tool_output fences.
- Gemma 4 has native tokens: `<|tool>declaration:...<tool|>` in the system turn,
  `<|tool_call>call:NAME{key:value}<tool_call|>` for calls, `<|tool_response>response:NAME{...}
  <tool_response|>` for results, strings quoted by the `<|"|>` token (the checkpoints'
  chat_template.jinja, which tests/engine/test_tools.py renders to check this module).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from engine import grammar as G

STR = '<|"|>'  # Gemma 4's string quote token
GEMMA4_TOKENS = ("<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                 "<tool_response|>", STR, "<|turn>", "<turn|>")
GEMMA3_INSTRUCTION = (
    "You have access to functions. If you decide to invoke any of the function(s), you MUST "
    "put it in the format of\n"
    '{"name": function name, "parameters": dictionary of argument name and its value}\n'
    "You SHOULD NOT include any other text in the response if you call a function\n")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class RequestError(ValueError):
    """A bad tools / tool_choice / messages / response_format value; `param` names it."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON Schema of the arguments (an object)
    raw: dict[str, Any]  # the request's function object, as the template sees it


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text

    def openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": "function",
                               "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            out["index"] = index
        return out


@dataclass(frozen=True)
class ToolPlan:
    """What one chat request asks of the tools machinery."""

    tools: tuple[Tool, ...]
    choice: str  # "none", "auto", "required" or "function" (one named tool)
    forced: str | None  # the named tool
    parallel: bool

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    def callable_tools(self) -> tuple[Tool, ...]:
        return tuple(t for t in self.tools if self.forced in (None, t.name))


# ----------------------------------------------------------------------------- request fields


def parse_tools(body: dict[str, Any]) -> ToolPlan:
    """`tools`, `tool_choice`, `parallel_tool_calls` validated; RequestError naming the field."""
    raw_tools = body.get("tools")
    tools: list[Tool] = []
    if raw_tools is not None:
        if not isinstance(raw_tools, list):
            raise RequestError("'tools' must be a list of function tools", "tools")
        for i, t in enumerate(raw_tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(t, dict) or t.get("type", "function") != "function" or \
                    not isinstance(fn, dict):
                raise RequestError(f"tools[{i}] must be {{'type': 'function', 'function': "
                                   "{...}}", f"tools[{i}]")
            name = fn.get("name")
            if not isinstance(name, str) or not _NAME.match(name):
                raise RequestError(f"tools[{i}].function.name must be 1-64 letters, digits, "
                                   f"'_', '.' or '-', got {name!r}", f"tools[{i}].function.name")
            if any(x.name == name for x in tools):
                raise RequestError(f"two tools are named {name!r}", f"tools[{i}].function.name")
            params = fn.get("parameters")
            if params is None:
                params = {"type": "object", "properties": {}}
            if not isinstance(params, dict) or params.get("type", "object") != "object":
                raise RequestError(f"tools[{i}].function.parameters must be a JSON Schema of "
                                   f"type object, got {params!r}",
                                   f"tools[{i}].function.parameters")
            desc = fn.get("description") or ""
            if not isinstance(desc, str):
                raise RequestError(f"tools[{i}].function.description must be a string",
                                   f"tools[{i}].function.description")
            tools.append(Tool(name, desc, params, fn))
    choice_raw = body.get("tool_choice")
    forced = None
    if choice_raw is None:
        choice = "auto" if tools else "none"
    elif choice_raw in ("none", "auto", "required"):
        choice = str(choice_raw)
    elif isinstance(choice_raw, dict) and isinstance(choice_raw.get("function"), dict) and \
            choice_raw.get("type", "function") == "function":
        forced = choice_raw["function"].get("name")
        if not any(t.name == forced for t in tools):
            raise RequestError(f"tool_choice names {forced!r}, which is not in 'tools' ("
                               f"{', '.join(t.name for t in tools) or 'none given'})",
                               "tool_choice")
        choice = "function"
    else:
        raise RequestError("'tool_choice' must be 'none', 'auto', 'required' or "
                           f"{{'type': 'function', 'function': {{'name': ...}}}}, got "
                           f"{choice_raw!r}", "tool_choice")
    if choice in ("required", "function") and not tools:
        raise RequestError(f"tool_choice {choice_raw!r} needs 'tools'", "tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise RequestError(f"'parallel_tool_calls' must be true or false, got {parallel!r}",
                           "parallel_tool_calls")
    return ToolPlan(tuple(tools), choice, forced, parallel and forced is None)


def response_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON Schema `response_format` asks for (json_object: any object), or None."""
    rf = body.get("response_format")
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        js = rf.get("json_schema")
        schema = js.get("schema") if isinstance(js, dict) else None
        if not isinstance(schema, dict):
            raise RequestError("response_format.json_schema.schema must be a JSON Schema "
                               "object", "response_format")
        return schema
    raise RequestError("response_format.type must be 'text', 'json_object' or 'json_schema', "
                       f"got {rf!r}", "response_format")


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


# ----------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Msg:
    """One chat message, text only, its tool calls parsed (arguments as a dict)."""

    role: str  # system, user, assistant, tool
    content: str | None
    tool_calls: tuple[tuple[str, str, Any], ...] = ()  # (id, name, arguments)
    tool_call_id: str = ""
    name: str = ""


def parse_messages(messages: Any, text_of: Callable[[int, Any], str]) -> list[Msg]:
    """The request's messages as Msg; `text_of(i, content)` flattens content parts."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages")
    out: list[Msg] = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise RequestError(f"messages[{i}] needs a role of system, user, assistant or "
                               "tool", f"messages[{i}].role")
        assert isinstance(m, dict)
        content = m.get("content")
        text = None if content is None and role in ("assistant", "tool") else \
            text_of(i, content)
        calls: list[tuple[str, str, Any]] = []
        if role == "assistant" and m.get("tool_calls") is not None:
            raw_calls = m["tool_calls"]
            if not isinstance(raw_calls, list):
                raise RequestError(f"messages[{i}].tool_calls must be a list",
                                   f"messages[{i}].tool_calls")
            for j, c in enumerate(raw_calls):
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise RequestError(f"messages[{i}].tool_calls[{j}] needs function.name",
                                       f"messages[{i}].tool_calls")
                args = fn.get("arguments") or "{}"
                if isinstance(args, str):
                    try:
                        args = json.loads(args)
                    except ValueError:
                        raise RequestError(f"messages[{i}].tool_calls[{j}].function.arguments "
                                           f"is not JSON: {args!r}",
                                           f"messages[{i}].tool_calls") from None
                calls.append((str(c.get("id") or ""), fn["name"], args))
        call_id = m.get("tool_call_id") or ""
        if role == "tool" and not isinstance(call_id, str):
            raise RequestError(f"messages[{i}].tool_call_id must be a string",
                               f"messages[{i}].tool_call_id")
        out.append(Msg("system" if role == "developer" else str(role), text, tuple(calls),
                       str(call_id), str(m.get("name") or "")))
    return out


def _call_names(msgs: Sequence[Msg]) -> dict[str, str]:
    return {cid: name for m in msgs for cid, name, _ in m.tool_calls if cid}


# ----------------------------------------------------------------------------- Gemma 3


def gemma3_call_text(name: str, args: Any) -> str:
    return json.dumps({"name": name, "parameters": args}, ensure_ascii=False)


def render_gemma3(msgs: Sequence[Msg], plan: ToolPlan) -> str:
    """Gemma 3's template (system folded into the first user turn, content trimmed) with the
    function-calling convention in its text. Consecutive same-role turns merge, as the
    template wants strict alternation."""
    system = [m.content or "" for m in msgs if m.role == "system"]
    if plan.active:
        decls = [{"name": t.name, "description": t.description, "parameters": t.parameters}
                 for t in plan.tools]
        system.append(GEMMA3_INSTRUCTION + json.dumps(decls, indent=2, ensure_ascii=False))
    turns: list[tuple[str, str]] = []

    def add(role: str, text: str) -> None:
        if turns and turns[-1][0] == role:
            turns[-1] = (role, turns[-1][1] + "\n\n" + text)
        else:
            turns.append((role, text))

    for m in msgs:
        if m.role == "system":
            continue
        if m.role == "tool":
            add("user", "```tool_output\n" + (m.content or "").strip() + "\n```")
        elif m.role == "assistant":
            parts = [(m.content or "").strip()] if (m.content or "").strip() else []
            parts += [gemma3_call_text(n, a) for _, n, a in m.tool_calls]
            add("model", "\n".join(parts))
        else:
            add("user", (m.content or "").strip())
    if not turns or turns[0][0] != "user":
        turns.insert(0, ("user", ""))
    prefix = "".join(s + "\n\n" for s in system)
    text = ""
    for k, (role, content) in enumerate(turns):
        text += f"<start_of_turn>{role}\n" + (prefix if k == 0 else "") + content.strip() + \
            "<end_of_turn>\n"
    return text + "<start_of_turn>model\n"


def gemma3_grammar(plan: ToolPlan, response: dict[str, Any] | None) -> str | None:
    """Lark for the reply: calls only (required / named), or text or calls (auto)."""
    if not plan.active:
        return G.json_schema_grammar(response) if response is not None else None
    rules = []
    alts = []
    for k, t in enumerate(plan.callable_tools()):
        head = '{"name": ' + json.dumps(t.name) + ', "parameters": '
        rules.append(f"call_{k}: {G.json_literal(head)} args_{k} \"}}\"\n"
                     f"args_{k}: %json {_json_sub(t.parameters)}\n")
        alts.append(f"call_{k}")
    calls = _repeat("call", '"\\n"', plan)
    if plan.choice == "auto":
        other = f"%json {_json_sub(response)}" if response is not None else "TEXT"
        start = f"start: {calls} | {other}\nTEXT: /[^{{\\s][\\s\\S]*/\n"
    else:
        start = f"start: {calls}\n"
    return G.lark_grammar(start + "call: " + " | ".join(alts) + "\n" + "".join(rules))


def _repeat(rule: str, sep: str, plan: ToolPlan) -> str:
    """One call, or with parallel calls up to one per tool (a small model would otherwise
    repeat a call until max_tokens)."""
    n = len(plan.callable_tools()) if plan.parallel else 1
    return rule + "".join(f" ({sep} {rule}" for _ in range(n - 1)) + ")?" * (n - 1)


def _json_sub(schema: dict[str, Any]) -> str:
    return json.dumps({**G.closed(schema), "x-guidance": G.JSON_STYLE})


def parse_gemma3(text: str, plan: ToolPlan) -> tuple[str | None, list[ToolCall]]:
    """(content, calls): lines `{"name", "parameters"}` naming a known tool become calls."""
    if not plan.active or not text.lstrip().startswith("{"):
        return text, []
    known = {t.name for t in plan.tools}
    calls: list[ToolCall] = []
    decoder = json.JSONDecoder()
    rest = text.strip()
    while rest:
        try:
            obj, end = decoder.raw_decode(rest)
        except ValueError:
            return text, []
        if not isinstance(obj, dict) or obj.get("name") not in known or \
                not isinstance(obj.get("parameters", {}), dict):
            return text, []
        calls.append(ToolCall(new_call_id(), obj["name"],
                              json.dumps(obj.get("parameters", {}), ensure_ascii=False)))
        rest = rest[end:].lstrip()
    return None, calls


# ----------------------------------------------------------------------------- Gemma 4


def _g4_arg(v: Any, escape_keys: bool = True) -> str:
    """The template's format_argument."""
    if isinstance(v, str):
        return STR + v + STR
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{" + ",".join((STR + k + STR if escape_keys else k) + ":" +
                              _g4_arg(x, escape_keys) for k, x in sorted(v.items())) + "}"
    if isinstance(v, list | tuple):
        return "[" + ",".join(_g4_arg(x, escape_keys) for x in v) + "]"
    return str(v)  # numbers (and None as the template prints it)


def _upper(v: Any) -> str:
    return "" if v is None else str(v).upper()


def _get(v: Any, key: str) -> Any:
    return v.get(key) if isinstance(v, dict) else None


def _g4_required(items: Any) -> str:
    return "[" + ",".join(STR + str(r) + STR for r in items) + "]"


def _g4_params(properties: dict[str, Any]) -> str:
    """The template's format_parameters: one `key:{...}` per non-standard key, sorted."""
    out = []
    for key, value in sorted(properties.items()):
        if key in ("description", "type", "properties", "required", "nullable"):
            continue
        parts = []
        if _get(value, "description"):
            parts.append(f"description:{STR}{value['description']}{STR}")
        kind = _upper(_get(value, "type"))
        if kind == "STRING" and _get(value, "enum"):
            parts.append("enum:" + _g4_arg(value["enum"]))
        elif kind == "ARRAY" and isinstance(_get(value, "items"), dict) and value["items"]:
            items = []
            for ik, iv in sorted(value["items"].items()):
                if iv is None:
                    continue
                if ik == "properties":
                    items.append("properties:{" + (_g4_params(iv) if isinstance(iv, dict)
                                                   else "") + "}")
                elif ik == "required":
                    items.append("required:" + _g4_required(iv))
                elif ik == "type":
                    items.append("type:" + _g4_arg(iv.upper() if isinstance(iv, str)
                                                   else [str(x).upper() for x in iv]))
                else:
                    items.append(f"{ik}:" + _g4_arg(iv))
            parts.append("items:{" + ",".join(items) + "}")
        if _get(value, "nullable"):
            parts.append("nullable:true")
        if kind == "OBJECT":
            if isinstance(_get(value, "properties"), dict):
                parts.append("properties:{" + _g4_params(value["properties"]) + "}")
            elif isinstance(value, dict):
                parts.append("properties:{" + _g4_params(value) + "}")
            if _get(value, "required"):
                parts.append("required:" + _g4_required(value["required"]))
        parts.append(f"type:{STR}{kind}{STR}}}")
        out.append(f"{key}:{{" + ",".join(parts))
    return ",".join(out)


def _g4_declaration(t: Tool) -> str:
    """The template's format_function_declaration (OpenAI tools have no `response`)."""
    text = f"declaration:{t.name}{{description:{STR}{t.raw.get('description') or ''}{STR}"
    params = t.raw.get("parameters")
    if params:
        text += ",parameters:{"
        if params.get("properties"):
            text += "properties:{" + _g4_params(params["properties"]) + "},"
        if params.get("required"):
            text += "required:" + _g4_required(params["required"]) + ","
        if params.get("type"):
            text += f"type:{STR}{_upper(params['type'])}{STR}}}"
    return (text + "}").strip()


def _strip_thinking(text: str) -> str:
    out = ""
    for part in text.split("<channel|>"):
        out += part.split("<|channel>")[0] if "<|channel>" in part else part
    return out.strip()


def _g4_response(name: str, response: Any) -> str:
    if isinstance(response, dict):
        body = ",".join(f"{k}:{_g4_arg(v, False)}" for k, v in sorted(response.items()))
        return f"<|tool_response>response:{name}{{{body}}}<tool_response|>"
    return f"<|tool_response>response:{name}{{value:{_g4_arg(response, False)}}}<tool_response|>"


def render_gemma4(msgs: Sequence[Msg], plan: ToolPlan) -> str:
    """Gemma 4's chat_template.jinja (thinking off), without the leading <bos>."""
    text = ""
    rest = list(msgs)
    tools = plan.tools if plan.active else ()
    prev: str | None = None
    if tools or (rest and rest[0].role == "system"):
        text += "<|turn>system\n"
        if rest and rest[0].role == "system":
            text += (rest[0].content or "").strip()
            rest = rest[1:]
        for t in tools:
            text += "<|tool>" + _g4_declaration(t) + "<tool|>"
        prev = "tool" if tools else None
        text += "<turn|>\n"
    for i, m in enumerate(rest):
        if m.role == "tool":
            continue
        prev = None
        role = "model" if m.role == "assistant" else m.role
        before = next((x.role for x in reversed(rest[:i]) if x.role != "tool"), None)
        if not (role == "model" and before == "assistant"):
            text += f"<|turn>{role}\n"
        for _, name, args in m.tool_calls:
            text += f"<|tool_call>call:{name}{{"
            if isinstance(args, dict):
                text += ",".join(f"{k}:{_g4_arg(v, False)}" for k, v in sorted(args.items()))
            elif isinstance(args, str):
                text += args
            text += "}<tool_call|>"
            prev = "tool_call"
        responded = False
        if m.tool_calls:
            ids = {cid: name for cid, name, _ in m.tool_calls}
            for follow in rest[i + 1:]:
                if follow.role != "tool":
                    break
                name = ids.get(follow.tool_call_id) or follow.name or "unknown"
                text += _g4_response(name, follow.content or "")
                responded = True
                prev = "tool_response"
        if m.content is not None:
            text += _strip_thinking(m.content) if role == "model" else m.content.strip()
        if prev == "tool_call" and not responded:
            text += "<|tool_response>"
        elif not (responded and not m.content):
            text += "<turn|>\n"
    if prev not in ("tool_response", "tool_call"):
        text += "<|turn>model\n"
    return text


def gemma4_grammar(plan: ToolPlan, response: dict[str, Any] | None, tok_id: Callable[[str], int]
                   ) -> str | None:
    """Lark for a Gemma 4 reply: native calls whose arguments follow each tool's schema in
    the call syntax (keys sorted, as the template writes them); text or calls under auto."""
    if not plan.active:
        return G.json_schema_grammar(response) if response is not None else None
    lark = _G4Lark(tok_id)
    alts = []
    for t in plan.callable_tools():
        args = lark.value(t.parameters)
        alts.append(f"{lark.tok('<|tool_call>')} {G.json_literal('call:' + t.name)} {args} "
                    f"{lark.tok('<tool_call|>')}")
    calls = _repeat("call", "", plan)
    if plan.choice == "auto":
        other = f"%json {_json_sub(response)}" if response is not None else "TEXT"
        start = f"start: {calls} | {other} | {other} {calls}\n"
    else:
        start = f"start: {calls}\n"
    return G.lark_grammar(start + "call: " + " | ".join(alts) + "\n" + "".join(lark.rules)
                          + "TEXT: /[\\s\\S]+/\nSTRTEXT: /[\\s\\S]*/\n")


class _G4Lark:
    """JSON Schema -> Lark rules for Gemma 4's argument syntax."""

    def __init__(self, tok_id: Callable[[str], int]) -> None:
        self.tok_id = tok_id
        self.rules: list[str] = []
        self.any_rule = ""

    def tok(self, piece: str) -> str:
        return f"<[{self.tok_id(piece)}]>"

    def rule(self, body: str) -> str:
        name = f"r{len(self.rules)}"
        self.rules.append(f"{name}: {body}\n")
        return name

    def literal(self, v: Any) -> str:
        if isinstance(v, str):
            return f"{self.tok(STR)} {G.json_literal(v)} {self.tok(STR)}"
        return G.json_literal(_g4_arg(v))

    def value(self, s: Any) -> str:
        if not isinstance(s, dict):
            return self.any_value()
        if "enum" in s and isinstance(s["enum"], list) and s["enum"]:
            return self.rule(" | ".join(self.literal(v) for v in s["enum"]))
        if "const" in s:
            return self.rule(self.literal(s["const"]))
        for key in ("anyOf", "oneOf"):
            if isinstance(s.get(key), list) and s[key]:
                return self.rule(" | ".join(self.value(x) for x in s[key]))
        kind = s.get("type")
        if isinstance(kind, list):
            return self.rule(" | ".join(self.value({**s, "type": k}) for k in kind))
        if kind == "string":
            return self.rule(f"{self.tok(STR)} STRTEXT {self.tok(STR)}")
        if kind in ("integer", "number", "boolean", "null"):
            sub = {k: v for k, v in s.items() if k not in ("description", "title")}
            if kind == "null":
                return self.rule('"None"')
            return self.rule(f"%json {_json_sub(sub)}")
        if kind == "array":
            item = self.value(s.get("items", {}))
            if s.get("minItems", 0) >= 1:
                return self.rule(f'"[" {item} ("," {item})* "]"')
            return self.rule(f'"[" ({item} ("," {item})*)? "]"')
        if kind == "object" or "properties" in s:
            return self.object(s)
        return self.any_value()

    def object(self, s: dict[str, Any]) -> str:
        props = s.get("properties") or {}
        required = set(s.get("required") or [])
        keys = sorted(props)
        if not keys:
            return self.rule('"{" "}"')
        # tail[i][c]: the fields from i on; c = a comma is needed before the next one
        nxt = {0: '""', 1: '""'}
        for k in reversed(keys):
            v = self.value(props[k])
            cur = {}
            for c in (0, 1):
                field = ('"," ' if c else "") + G.json_literal(k + ":") + f" {v} {nxt[1]}"
                body = field if k in required else f"{field} | {nxt[c]}"
                cur[c] = self.rule(body)
            nxt = cur
        return self.rule(f'"{{" {nxt[0]} "}}"')

    def any_value(self) -> str:
        if not self.any_rule:
            self.any_rule = "anyv"
            q = self.tok(STR)
            self.rules.append(
                f'anyv: {q} STRTEXT {q} | %json {{"type": ["number", "boolean"]}} | "None" '
                f'| "[" (anyv ("," anyv)*)? "]" '
                f'| "{{" (/[A-Za-z_][A-Za-z0-9_]*/ ":" anyv ("," /[A-Za-z_][A-Za-z0-9_]*/ ":" '
                f'anyv)*)? "}}"\n')
        return self.any_rule


def parse_gemma4(text: str, plan: ToolPlan) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) from a Gemma 4 reply decoded with its special tokens."""
    if not plan.active or "<|tool_call>" not in text:
        return text, []
    content, calls = "", []
    pos = 0
    for m in re.finditer(r"<\|tool_call>call:([A-Za-z0-9_.-]+)(\{.*?\})<tool_call\|>", text,
                         re.S):
        content += text[pos:m.start()]
        pos = m.end()
        try:
            args, end = _G4Parser(m.group(2)).value(0)
        except ValueError:
            return text, []
        calls.append(ToolCall(new_call_id(), m.group(1), json.dumps(args, ensure_ascii=False)))
    content += text[pos:]
    return (content.strip() or None), calls


class _G4Parser:
    """Gemma 4 argument syntax -> Python values."""

    def __init__(self, s: str) -> None:
        self.s = s

    def value(self, i: int) -> tuple[Any, int]:
        s = self.s
        if s.startswith(STR, i):
            j = s.find(STR, i + len(STR))
            if j < 0:
                raise ValueError("unterminated string")
            return s[i + len(STR):j], j + len(STR)
        if s.startswith("{", i):
            out: dict[str, Any] = {}
            i += 1
            while not s.startswith("}", i):
                if s.startswith(STR, i):
                    key, i = self.value(i)
                else:
                    m = re.compile(r"[^:{}\[\],]+").match(s, i)
                    if not m:
                        raise ValueError(f"bad key at {i}")
                    key, i = m.group(0), m.end()
                if not s.startswith(":", i):
                    raise ValueError(f"':' expected at {i}")
                out[key], i = self.value(i + 1)
                if s.startswith(",", i):
                    i += 1
            return out, i + 1
        if s.startswith("[", i):
            items = []
            i += 1
            while not s.startswith("]", i):
                v, i = self.value(i)
                items.append(v)
                if s.startswith(",", i):
                    i += 1
            return items, i + 1
        m = re.compile(r"true|false|None|null|-?\d+(\.\d+)?([eE][-+]?\d+)?").match(s, i)
        if not m:
            raise ValueError(f"bad value at {i}: {s[i:i + 20]!r}")
        word = m.group(0)
        value: Any = {"true": True, "false": False, "None": None, "null": None}.get(word)
        if value is None and word not in ("None", "null"):
            value = float(word) if any(c in word for c in ".eE") else int(word)
        return value, m.end()


# ----------------------------------------------------------------------------- per family


def family_of(arch: str) -> str:
    return "gemma4" if arch == "gemma4" else "gemma3"


def cannot_call_tools(arch: str, has_token: Callable[[str], bool]) -> str | None:
    """Why this model cannot call tools (None: it can)."""
    if arch == "gemma4":
        missing = [t for t in GEMMA4_TOKENS if not has_token(t)]
        if missing:
            return (f"this Gemma 4 model's vocabulary lacks the tool tokens {missing}: it cannot "
                    "call tools")
        return None
    if arch == "gemma3":
        return None
    return f"models of architecture {arch!r} have no tool-call format here"


def render(msgs: Sequence[Msg], plan: ToolPlan, family: str) -> str:
    return render_gemma4(msgs, plan) if family == "gemma4" else render_gemma3(msgs, plan)


def reply_grammar(plan: ToolPlan, response: dict[str, Any] | None, family: str,
                  tok_id: Callable[[str], int]) -> str | None:
    """The grammar for the reply, or None when the request asks for no structure."""
    if family == "gemma4":
        return gemma4_grammar(plan, response, tok_id)
    return gemma3_grammar(plan, response)


def parse_reply(text: str, plan: ToolPlan, family: str) -> tuple[str | None, list[ToolCall]]:
    return parse_gemma4(text, plan) if family == "gemma4" else parse_gemma3(text, plan)


def might_be_call(text: str) -> bool:
    """Gemma 3: whether streamed text so far may still turn into a tool call (hold it back)."""
    stripped = text.lstrip()
    return not stripped or stripped.startswith("{")
