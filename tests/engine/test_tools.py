"""Tool prompts equal the published chat templates' own output (rendered by transformers'
apply_chat_template on a tiny tokenizer), Gemma 4 calls parse back and their grammar accepts
what the template writes, and a model without tool tokens gets a clear 400."""

from __future__ import annotations

import json
from typing import Any

import pytest
from tokenizers import AddedToken, decoders, models
from tokenizers import Tokenizer as HFTokenizer

from engine import grammar as G
from engine import tools as T
from engine.http_api import ApiError, message_text, plan_chat
from engine.tokenizer import Tokenizer
from tests.conftest import DATA

transformers = pytest.importorskip("transformers")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "the city"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "description": "forecast days"},
        "hours": {"type": "array", "items": {"type": "integer"}},
        "where": {"type": "object", "properties": {"lat": {"type": "number"},
                                                   "lon": {"type": "number"}},
                  "required": ["lat"]},
        "note": {"type": "string", "nullable": True}},
        "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "now", "description": "The time",
                                          "parameters": {"type": "object", "properties": {}}}}
ARGS = {"city": "Paris", "days": 2, "hours": [9, 12], "where": {"lat": 48.85}, "unit": "celsius"}


def hf_tokenizer(template: str, specials: list[str]) -> Any:
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *specials])}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        pad_token="<pad>", chat_template=template)


def template_says(name: str, messages: list[dict[str, Any]], tools: Any = None) -> str:
    tok = hf_tokenizer((DATA / name).read_text(), [])
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False,
                                   add_generation_prompt=True)
    assert text.startswith("<bos>")
    return str(text[len("<bos>"):])  # the engine adds BOS when it tokenizes


def ours(messages: list[dict[str, Any]], tools: Any = None, family: str = "gemma4",
         **choice: Any) -> str:
    plan = T.parse_tools({"tools": tools, **choice})
    return T.render(T.parse_messages(messages, message_text), plan, family)


def openai_call(cid: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"id": cid, "type": "function", "function": {"name": name,
                                                        "arguments": json.dumps(args)}}


def template_call(cid: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
    # chat templates see arguments as a mapping (transformers and llama.cpp parse the JSON)
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


def conversations() -> list[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    """(OpenAI messages, the same messages as chat templates receive them)."""
    ask = {"role": "user", "content": "  Weather in Paris?\n"}
    result = {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'}
    result2 = {"role": "tool", "tool_call_id": "c2", "content": "12:00"}
    call = [openai_call("c1", "get_weather", ARGS), openai_call("c2", "now", {})]
    tcall = [template_call("c1", "get_weather", ARGS), template_call("c2", "now", {})]
    return [
        ([ask], [ask]),
        ([{"role": "system", "content": "Be brief. "}, ask],
         [{"role": "system", "content": "Be brief. "}, ask]),
        ([ask, {"role": "assistant", "content": None, "tool_calls": call[:1]}, result],
         [ask, {"role": "assistant", "content": None, "tool_calls": tcall[:1]}, result]),
        ([{"role": "system", "content": "S"}, ask,
          {"role": "assistant", "content": "", "tool_calls": call}, result, result2,
          {"role": "assistant", "content": "It is 21 degrees at noon."},
          {"role": "user", "content": "Thanks"}],
         [{"role": "system", "content": "S"}, ask,
          {"role": "assistant", "content": "", "tool_calls": tcall}, result, result2,
          {"role": "assistant", "content": "It is 21 degrees at noon."},
          {"role": "user", "content": "Thanks"}]),
        ([ask, {"role": "assistant", "content": "Let me look.", "tool_calls": call[:1]}],
         [ask, {"role": "assistant", "content": "Let me look.", "tool_calls": tcall[:1]}]),
    ]


@pytest.mark.parametrize("case", range(5))
def test_gemma4_prompts_equal_the_chat_template(case: int) -> None:
    messages, as_template = conversations()[case]
    for tools in (None, [WEATHER, CLOCK]):
        if tools is None and any(m.get("tool_calls") for m in messages):
            continue
        assert ours(messages, tools) == template_says("gemma4_chat_template.jinja",
                                                      as_template, tools)


def test_gemma3_prompts_equal_the_chat_template() -> None:
    plain = [{"role": "system", "content": "Answer briefly."},
             {"role": "user", "content": " Name a colour. "},
             {"role": "assistant", "content": "Red.\n"}, {"role": "user", "content": "More"}]
    want = template_says("gemma3_chat_template.jinja", plain)
    assert ours(plain, family="gemma3") == want
    # tools live inside the template's turns: the same text the template makes of the
    # conversation written out by hand in the function-calling convention
    messages, _ = conversations()[3]
    by_hand = [
        {"role": "system", "content": "S\n\n" + T.GEMMA3_INSTRUCTION + json.dumps(
            [{"name": f["function"]["name"], "description": f["function"]["description"],
              "parameters": f["function"]["parameters"]} for f in (WEATHER, CLOCK)],
            indent=2)},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": json.dumps({"name": "get_weather", "parameters": ARGS})
         + "\n" + json.dumps({"name": "now", "parameters": {}})},
        {"role": "user", "content": '```tool_output\n{"temp": 21}\n```\n\n'
                                    "```tool_output\n12:00\n```"},
        {"role": "assistant", "content": "It is 21 degrees at noon."},
        {"role": "user", "content": "Thanks"}]
    assert ours(messages, [WEATHER, CLOCK], family="gemma3") == \
        template_says("gemma3_chat_template.jinja", by_hand)
    # `none`: the tools are not offered at all
    assert "You have access to functions" not in ours(messages[:2], [WEATHER], family="gemma3",
                                                      tool_choice="none")


def test_gemma3_calls_parse_and_unknown_or_broken_ones_stay_text() -> None:
    plan = T.parse_tools({"tools": [WEATHER, CLOCK]})
    text = '{"name": "get_weather", "parameters": {"city": "Oslo"}}\n{"name": "now", ' \
           '"parameters": {}}'
    content, calls = T.parse_gemma3(text, plan)
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == \
        [("get_weather", {"city": "Oslo"}), ("now", {})]
    for other in ('{"name": "rm", "parameters": {}}', '{"name": "now", "param', "Hello"):
        assert T.parse_gemma3(other, plan) == (other, [])


def gemma4_tokenizer() -> Tokenizer:
    """A byte-fallback vocabulary with Gemma 4's control tokens as specials."""
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    hf = HFTokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[],
                                byte_fallback=True, unk_token="<unk>"))
    hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t in T.GEMMA4_TOKENS])
    specials = [0, 1, 2, 3] + [hf.token_to_id(t) for t in T.GEMMA4_TOKENS]
    return Tokenizer(hf, bos_id=2, eos_id=1, pad_id=0, unk_id=3, special_ids=specials,
                     stop_ids=[1, hf.token_to_id("<turn|>")], line_split=False)


def test_gemma4_calls_parse_back_and_their_grammar_accepts_the_templates_form() -> None:
    tok = gemma4_tokenizer()
    rendered = ours([{"role": "user", "content": "x"}, {"role": "assistant", "content": None,
                                                        "tool_calls": [openai_call(
                                                            "c1", "get_weather", ARGS)]}],
                    [WEATHER])
    call = rendered[rendered.index("<|tool_call>"):rendered.index("<tool_call|>") + 12]
    plan = T.parse_tools({"tools": [WEATHER, CLOCK], "tool_choice": "required"})
    content, calls = T.parse_gemma4("Sure." + call, plan)
    assert content == "Sure." and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == ARGS
    grammar = T.gemma4_grammar(plan, None, lambda p: int(tok.hf.token_to_id(p)))
    assert grammar is not None
    mask = G.TokenMask(grammar, tok)
    ids = tok.encode(call, add_bos=False)
    assert mask.matcher.try_consume_tokens(ids) == len(ids) and mask.accepting
    # a required argument missing, a wrong enum value: both outside the grammar
    for bad in (call.replace(f'city:{T.STR}Paris{T.STR},', ""), call.replace("celsius", "K")):
        ids = tok.encode(bad, add_bos=False)
        assert G.TokenMask(grammar, tok).matcher.try_consume_tokens(ids) < len(ids)


def test_a_model_without_tool_tokens_cannot_take_tools() -> None:
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "a"]
    hf = HFTokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    tok = Tokenizer(hf, bos_id=2, eos_id=1, pad_id=0, unk_id=3, special_ids=[0, 1, 2, 3],
                    stop_ids=[1])
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER]}
    with pytest.raises(ApiError, match="lacks the tool tokens") as e:
        plan_chat(body, "gemma4", tok)
    assert e.value.status == 400 and e.value.param == "tools"
    # without tools the same model chats
    assert plan_chat({"messages": body["messages"]}, "gemma4", tok).prompt.endswith(
        "<|turn>model\n")


def test_gemma4_auto_takes_text_or_text_then_a_valid_call() -> None:
    tok = gemma4_tokenizer()
    plan = T.parse_tools({"tools": [WEATHER], "tool_choice": "auto"})
    grammar = T.gemma4_grammar(plan, None, lambda p: int(tok.hf.token_to_id(p)))
    assert grammar is not None
    call = (f"<|tool_call>call:get_weather{{city:{T.STR}Oslo{T.STR}}}<tool_call|>")
    for text, complete in (("Just text.", True), ("Let me check." + call, True),
                           (call, True), ("Hm" + call.replace("city", "town"), False)):
        mask = G.TokenMask(grammar, tok)
        ids = tok.encode(text, add_bos=False)
        assert (mask.matcher.try_consume_tokens(ids) == len(ids) and mask.accepting) == complete


def test_json_object_mode_admits_objects_only(model: Any) -> None:
    """response_format json_object: any object, nothing else (on the shipped tokenizer). The
    270M model is not checked end to end here: free-form objects it writes do not close
    within a small max_tokens (it repeats keys), so only the grammar's verdicts are."""
    tok = model.tokenizer
    grammar = G.json_schema_grammar(T.response_schema({"response_format": {
        "type": "json_object"}}))
    for text, ok in (('{"a": [1, {"b": null}], "c": "d"}', True), ("[1, 2]", False),
                     ('"text"', False), ('{"a": 1', False)):
        mask = G.TokenMask(grammar, tok)
        ids = tok.encode(text, add_bos=False)
        assert (mask.matcher.try_consume_tokens(ids) == len(ids) and mask.accepting) == ok


def test_numbers_keep_to_six_decimals_and_integers_to_safe_bounds(model: Any) -> None:
    tok = model.tokenizer
    grammar = G.json_schema_grammar({"type": "object", "properties": {
        "x": {"type": "number"}, "n": {"type": "integer"}}, "required": ["x", "n"]})
    for text, ok in (('{"x": 0.5, "n": 3}', True), ('{"x": 0.1234567, "n": 3}', False),
                     ('{"x": 1, "n": 90071992547409910}', False),
                     ('{"x": 1, "n": 3, "extra": 1}', False)):
        mask = G.TokenMask(grammar, tok)
        ids = tok.encode(text, add_bos=False)
        assert (mask.matcher.try_consume_tokens(ids) == len(ids) and mask.accepting) == ok


def test_a_mask_computed_ahead_equals_one_computed_in_line(model: Any) -> None:
    """TokenMask.prefetch computes the next mask on a helper thread during the forward pass;
    along a reply that goes through keys, numbers, enums and free-text strings, the mask it
    gives is the one computed in line at each step, and forced tokens are unchanged."""
    import numpy as np

    tok = model.tokenizer
    grammar = G.json_schema_grammar(G.closed({"type": "object", "properties": {
        "city": {"type": "string"}, "n": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["a", "bc"]}}},
        "required": ["city", "n", "tags"]}))
    ids = tok.encode('{"city": "New York, the big apple", "n": 42, "tags": ["bc", "a"]}',
                     add_bos=False)
    ahead, inline = G.TokenMask(grammar, tok), G.TokenMask(grammar, tok)
    logits = np.zeros(tok.vocab_size, dtype=np.float32)
    for tid in ids:
        ahead.prefetch()
        a, b = ahead.apply(logits), inline.apply(logits)
        assert np.array_equal(np.isinf(a), np.isinf(b))
        assert not np.isinf(a[tid])
        ahead.advance(tid)
        inline.advance(tid)
        assert ahead.forced_tokens() == inline.forced_tokens()
    assert ahead.accepting and inline.accepting
