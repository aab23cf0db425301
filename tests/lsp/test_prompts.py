"""Prompts: FIM templates, the prefix-only cache property, instruction prompts, code blocks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gemma_lsp.actions import reindent
from gemma_lsp.context import Budgets, CompletionContext, Snippet, build_context
from gemma_lsp.documents import DocumentStore
from gemma_lsp.prompts import (
    FIM_TEMPLATES,
    InstructionTemplates,
    completion_prompt,
    docstring_prompt,
    explain_prompt,
    extract_code_block,
    fix_prompt,
    refactor_prompt,
    render_template,
    template_for_model,
)

CTX = CompletionContext(
    prefix="def f(x):\n    ", suffix="\n\nprint(f(2))\n", language_id="python", path="src/a.py"
)
SNIP = Snippet("file:///w/b.py", "b.py", "def g():\n    pass", 0, 1, "python")
CTX_EXTRAS = CompletionContext(
    prefix="x = ", suffix="\n", extras=[SNIP], language_id="python", path="src/a.py"
)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("codegemma", "<|fim_prefix|>def f(x):\n    <|fim_suffix|>\n\nprint(f(2))\n<|fim_middle|>"),
        (
            "qwen2.5-coder",
            "<|fim_prefix|>def f(x):\n    <|fim_suffix|>\n\nprint(f(2))\n<|fim_middle|>",
        ),
        ("starcoder2", "<fim_prefix>def f(x):\n    <fim_suffix>\n\nprint(f(2))\n<fim_middle>"),
        (
            "deepseek-coder",
            "<｜fim▁begin｜>def f(x):\n    <｜fim▁hole｜>\n\nprint(f(2))\n<｜fim▁end｜>",
        ),
        ("codestral", "[SUFFIX]\n\nprint(f(2))\n[PREFIX]def f(x):\n    "),
        ("prefix-only", "def f(x):\n    "),
    ],
)
def test_fim_templates_exact(name: str, expected: str) -> None:
    prompt, stop = completion_prompt(CTX, FIM_TEMPLATES[name])
    assert prompt == expected
    assert stop and all(isinstance(s, str) for s in stop)


def test_stop_strings_per_family() -> None:
    assert "<|file_separator|>" in FIM_TEMPLATES["codegemma"].stop
    assert "<|endoftext|>" in FIM_TEMPLATES["qwen2.5-coder"].stop
    assert "<|file_sep|>" in FIM_TEMPLATES["qwen2.5-coder"].stop
    assert "<file_sep>" in FIM_TEMPLATES["starcoder2"].stop
    assert "<｜end▁of▁sentence｜>" in FIM_TEMPLATES["deepseek-coder"].stop
    assert "[PREFIX]" in FIM_TEMPLATES["codestral"].stop


def test_extras_with_file_separator_tokens() -> None:
    prompt, _ = completion_prompt(CTX_EXTRAS, FIM_TEMPLATES["qwen2.5-coder"], repo="proj")
    assert prompt == (
        "<|repo_name|>proj\n"
        "<|file_sep|>b.py\ndef g():\n    pass\n"
        "<|file_sep|>src/a.py\n"
        "<|fim_prefix|>x = <|fim_suffix|>\n<|fim_middle|>"
    )
    prompt, _ = completion_prompt(CTX_EXTRAS, FIM_TEMPLATES["codegemma"])
    assert prompt == (
        "<|file_separator|>b.py\ndef g():\n    pass\n"
        "<|file_separator|>src/a.py\n"
        "<|fim_prefix|>x = <|fim_suffix|>\n<|fim_middle|>"
    )


def test_extras_as_comments_without_file_separator() -> None:
    block = "# Path: b.py\n# def g():\n#     pass\n"
    assert completion_prompt(CTX_EXTRAS, FIM_TEMPLATES["prefix-only"])[0] == block + "x = "
    assert completion_prompt(CTX_EXTRAS, FIM_TEMPLATES["deepseek-coder"])[0] == (
        block + "<｜fim▁begin｜>x = <｜fim▁hole｜>\n<｜fim▁end｜>"
    )
    assert completion_prompt(CTX_EXTRAS, FIM_TEMPLATES["codestral"])[0] == (
        "[SUFFIX]\n[PREFIX]" + block + "x = "
    )


def test_braces_and_placeholders_in_code_are_safe() -> None:
    ctx = CompletionContext(prefix="s = '{suffix}' + f'{x}'", suffix="{prefix}}")
    prompt, _ = completion_prompt(ctx, FIM_TEMPLATES["codegemma"])
    assert prompt == "<|fim_prefix|>s = '{suffix}' + f'{x}'<|fim_suffix|>{prefix}}<|fim_middle|>"
    assert render_template("{a} {b} {{c}}", {"a": "{b}"}) == "{b} {b} {{c}}"


@pytest.mark.parametrize(
    "model, name",
    [
        ("google/codegemma-2b", "codegemma"),
        ("CodeGemma-7B-Q4.gguf", "codegemma"),
        ("Qwen/Qwen2.5-Coder-1.5B", "qwen2.5-coder"),
        ("qwen2.5-coder:7b-base", "qwen2.5-coder"),
        ("bigcode/starcoder2-3b", "starcoder2"),
        ("deepseek-coder-6.7b-base", "deepseek-coder"),
        ("Codestral-22B-v0.1", "codestral"),
        ("gemma-3-270m-q4_k_m.gguf", "prefix-only"),
        ("Gemma 4 12B", "prefix-only"),
        ("", "prefix-only"),
        ("llama-3-8b", "prefix-only"),
    ],
)
def test_template_for_model(model: str, name: str) -> None:
    assert template_for_model(model, None).name == name


def test_template_override() -> None:
    assert template_for_model("gemma-3", "starcoder2").name == "starcoder2"
    custom = template_for_model("x", "<PRE> {prefix} <SUF>{suffix} <MID>")
    assert custom.name == "custom"
    assert completion_prompt(CompletionContext(prefix="a", suffix="b"), custom)[0] == (
        "<PRE> a <SUF>b <MID>"
    )
    first = template_for_model("x", "<S>{suffix}<P>{prefix}")
    assert first.suffix_first
    assert template_for_model("codegemma", "no-such-template").name == "codegemma"


# --- the cache property of prefix-only prompts --------------------------------------------------

code_text = st.lists(
    st.sampled_from(["def ", "x", " = ", "1", "\n", "    ", "(", ")", ":", "é", "😀", "\r\n"]),
    max_size=80,
).map("".join)


@given(code_text, st.data())
def test_prefix_only_prompt_is_prefix_of_prompt_at_end(text: str, data: st.DataObject) -> None:
    store = DocumentStore()
    store.open("file:///w/other.py", "import os\nVALUE = 3\n", 1, "python")
    doc = store.open("file:///w/a.py", text, 1, "python")
    template = template_for_model("gemma-3-270m")
    budgets = Budgets(prefix_tokens=10_000)
    end = build_context(doc, len(text), store, budgets)
    offset = data.draw(st.integers(0, len(text)))
    ctx = build_context(doc, offset, store, budgets)
    assert ctx.extras == end.extras and ctx.extras
    p_cursor = completion_prompt(ctx, template)[0]
    p_end = completion_prompt(end, template)[0]
    assert p_end.startswith(p_cursor)
    assert p_cursor.endswith(text[:offset])


# --- instruction prompts ------------------------------------------------------------------------

SEL = "def add(a, b):\n    return a+b\n"
DOC_CTX = CompletionContext(
    prefix="import math\n\n", suffix="\nprint(add(1, 2))\n", language_id="python", path="src/m.py"
)


def test_chat_form_uses_gemma_template_without_bos() -> None:
    prompt, stop = explain_prompt(DOC_CTX, SEL, "python", chat=True)
    assert prompt.startswith("<start_of_turn>user\n" + InstructionTemplates().system + "\n\n")
    assert prompt.endswith("<end_of_turn>\n<start_of_turn>model\n")
    assert "<bos>" not in prompt
    assert "<end_of_turn>" in stop
    # file context first, the request and selection last
    file_at = prompt.index("import math\n\ndef add(a, b)")
    assert file_at < prompt.index("Explain") < prompt.rindex("return a+b")
    assert "src/m.py" in prompt


def test_chat_prompts_share_the_file_context_prefix() -> None:
    a = explain_prompt(DOC_CTX, SEL, "python", chat=True)[0]
    b = refactor_prompt(DOC_CTX, SEL, "python", chat=True, instruction="use sum")[0]
    c = fix_prompt(DOC_CTX, SEL, "python", True, ["E1: bad"])[0]
    common = len("<start_of_turn>user\n") + len("File `src/m.py`:\n```python\n")
    assert a[:common] == b[:common] == c[:common]
    shared = a[: a.index("Explain")]
    assert b.startswith(shared) and c.startswith(shared)


def test_fewshot_refactor_for_base_models() -> None:
    prompt, stop = refactor_prompt(DOC_CTX, SEL, "python", chat=False, instruction="Add types.")
    assert prompt.startswith("import math\n\n" + SEL + "\nprint(add(1, 2))\n")
    assert prompt.endswith(
        "### Code\n```python\ndef add(a, b):\n    return a+b\n```\n### Instruction\nAdd types.\n"
        "### Refactored code\n```python\n"
    )
    assert "```" in stop
    assert "<start_of_turn>" not in prompt


def test_an_indented_selection_is_shown_dedented_like_the_examples() -> None:
    method = "    def f(self):\n        if x:\n            return 1\n        return 2\n"
    for chat in (False, True):
        prompt, _ = refactor_prompt(None, method, "python", chat=chat, instruction="Go.")
        assert "```python\ndef f(self):\n    if x:\n        return 1\n    return 2\n```" in prompt
    # the answer comes back at the selection's indent
    assert reindent("def f(self):\n    return 2\n", method) == (
        "    def f(self):\n        return 2\n")


def test_fewshot_prompt_starts_with_the_completion_prompt() -> None:
    """The file context of a base-model action prompt begins with the prefix-only completion
    prompt at the selection start, so the engine's cached prefix is reused."""
    store = DocumentStore()
    store.open("file:///w/o.py", "A = 1\n", 1, "python")
    text = "import math\n\n" + SEL + "\nprint(add(1, 2))\n"
    doc = store.open("file:///w/m.py", text, 1, "python")
    start = text.index("def add")
    ctx = build_context(doc, start, store)
    ctx_after = build_context(doc, start + len(SEL), store)
    completion = completion_prompt(ctx, FIM_TEMPLATES["prefix-only"])[0]
    ctx_sel = CompletionContext(**{**ctx.__dict__, "suffix": ctx_after.suffix})
    prompt, _ = docstring_prompt(ctx_sel, SEL, "python", chat=False)
    assert prompt.startswith(completion + SEL)


def test_fewshot_explain_and_fix() -> None:
    prompt, stop = explain_prompt(None, SEL, "python", chat=False)
    assert prompt.endswith("```\n### Explanation\n")
    assert "\n### " in stop
    prompt, stop = fix_prompt(None, SEL, "python", False, ["undefined name 'c'", " ", "E302"])
    assert "### Problems\n- undefined name 'c'\n- E302\n### Fixed code\n```python\n" in prompt
    assert "```" in stop


def test_docstring_chat_and_language_in_fences() -> None:
    prompt, _ = docstring_prompt(None, "fn add() {}", "rust", chat=True)
    assert "```rust\nfn add() {}\n```" in prompt
    assert "File `" not in prompt  # no context given


def test_templates_can_be_overridden() -> None:
    t = InstructionTemplates().with_overrides(
        {"explain": "WHAT IS {selection}?", "system": "Be brief.", "bogus": "x"}
    )
    prompt, _ = explain_prompt(None, "x = 1", "python", chat=True, templates=t)
    assert (
        prompt == "<start_of_turn>user\nBe brief.\n\nWHAT IS x = 1?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert "explain_fewshot" in InstructionTemplates.names()


# --- code blocks --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, code",
    [
        ("Here:\n```python\ndef f():\n    pass\n```\nDone.", "def f():\n    pass"),
        ("```\nx = 1\n```", "x = 1"),
        ("```js\nlet a;\n```\n```js\nlet b;\n```", "let a;"),
        ("```py\nunclosed = True\n", "unclosed = True"),
        ("    indented = 1\n", "    indented = 1"),
        ("plain\n```", "plain"),
        ("~~~\ntilde\n~~~", "tilde"),
        ("````md\n```inner```\n````", "```inner```"),
        ("", ""),
    ],
)
def test_extract_code_block(text: str, code: str) -> None:
    assert extract_code_block(text) == code


# --- examples that cannot leak -----------------------------------------------------------------


def test_examples_are_in_other_languages_and_the_users_code_comes_last() -> None:
    from gemma_lsp.prompts import pick_examples

    for kind in ("explain", "fix", "refactor", "docstring"):
        chosen = pick_examples(kind, "python", SEL)
        assert chosen and all(e.language != "python" for e in chosen)
        assert pick_examples(kind, "python", SEL, skip=1) != chosen  # a second try differs
    prompt, _ = fix_prompt(DOC_CTX, SEL, "python", False, ["undefined name 'c'"])
    assert prompt.rindex("```python\n" + SEL.rstrip("\n")) > prompt.rindex("### Fixed code\n```go")


def test_an_answer_that_copies_an_example_is_recognised() -> None:
    from gemma_lsp.prompts import EXAMPLES, copies_example

    examples = list(EXAMPLES["explain"])
    debounce = next(e for e in examples if "debounce" in e.code)
    copied = "This function runs only after calls have stopped for `ms` milliseconds."
    assert copies_example(copied, examples, SEL) is debounce
    assert copies_example("Adds `a` and `b` and returns the sum.", examples, SEL) is None
    # words the user's own code has are not a copy
    own = "def wait_milliseconds(ms, timer):\n    stopped = timer.stop(ms)\n"
    assert copies_example("Stops `timer` after `ms` milliseconds.", examples, own) is None
    fixed = "def maxOf(xs []int) int {\n\tm := xs[0]\n"
    assert copies_example(fixed, list(EXAMPLES["fix"]), SEL) is not None


def test_explain_for_a_base_model_is_a_comment_after_the_code() -> None:
    from gemma_lsp.prompts import explain_insertion, explanation_text

    ins = explain_insertion(DOC_CTX, SEL, "python")
    assert ins.prompt.endswith(SEL.rstrip("\n") + "\n# In short, `add`")
    answer = " adds its two arguments\n# and returns the sum.\nprint(1)"
    assert explanation_text(ins, answer, "python") == (
        "`add` adds its two arguments and returns the sum.")
    rust = explain_insertion(DOC_CTX, "fn size() -> usize {\n    4\n}\n", "rust")
    assert rust.prompt.endswith("}\n// In short, `size`")
