"""Context -> prompt text per model family: FIM templates and instruction (chat / few-shot)
prompts. Templates are data; the user can override them.

Cache rule: the stable text comes first (extras, file context) and the volatile text last (the
cursor, the selection, the instruction). For the prefix-only template the prompt is exactly
``extras block + prefix``, so a prompt for a cursor is a prefix of the prompt for the same
document with the cursor further on.
"""

from __future__ import annotations

import dataclasses
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gemma_lsp.context import CompletionContext, Snippet, comment_syntax, render_extras_block
from gemma_lsp.documents import split_lines

__all__ = [
    "DEFAULT_FIM_TEMPLATE",
    "EXAMPLES",
    "FIM_TEMPLATES",
    "Example",
    "FimTemplate",
    "InstructionTemplates",
    "completion_prompt",
    "copies_example",
    "custom_fim_template",
    "docstring_prompt",
    "explain_insertion",
    "explain_prompt",
    "explanation_text",
    "extract_code_block",
    "fix_prompt",
    "is_valid_fim_override",
    "pick_examples",
    "refactor_prompt",
    "render_examples",
    "render_template",
    "template_for_model",
]

_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


def render_template(template: str, values: Mapping[str, str]) -> str:
    """Substitute ``{name}`` placeholders in one pass; unknown names and other braces stay as
    they are (so code with braces in a value or in the template is safe)."""

    def sub(m: re.Match[str]) -> str:
        return values.get(m.group(1), m.group(0))

    return _PLACEHOLDER.sub(sub, template)


# --- fill-in-the-middle -----------------------------------------------------------------------


@dataclass(frozen=True)
class FimTemplate:
    """How one model family wants a completion prompt.

    ``template`` holds ``{prefix}`` and ``{suffix}`` (absent ``{suffix}`` = prefix-only).
    Extras are written as ``{file_separator}{path}\\n{text}\\n`` blocks followed by a separator
    line for the current file when the family has a file separator token, else as comments in
    the document's language; either way they come before the template (for suffix-first
    templates they go right before the prefix).
    """

    name: str
    template: str
    stop: tuple[str, ...] = ()
    file_separator: str | None = None
    repo_name: str | None = None  # token that starts a repository-level prompt
    match: tuple[tuple[str, ...], ...] = ()  # model-name substrings (all of one tuple must match)
    suffix_first: bool = False

    @property
    def is_fim(self) -> bool:
        return "{suffix}" in self.template

    def extras_text(self, ctx: CompletionContext, repo: str | None = None) -> str:
        if self.file_separator is None:
            return render_extras_block(ctx.extras, ctx.language_id)
        out = []
        if repo and self.repo_name:
            out.append(f"{self.repo_name}{repo}\n")
        for s in ctx.extras:
            out.append(_file_block(self.file_separator, s))
        if ctx.extras or (repo and self.repo_name):
            out.append(f"{self.file_separator}{ctx.path or 'untitled'}\n")
        return "".join(out)

    def render(self, ctx: CompletionContext, repo: str | None = None) -> str:
        extras = self.extras_text(ctx, repo)
        if self.suffix_first:
            return render_template(
                self.template, {"prefix": extras + ctx.prefix, "suffix": ctx.suffix}
            )
        return extras + render_template(self.template, {"prefix": ctx.prefix, "suffix": ctx.suffix})


def _file_block(sep: str, s: Snippet) -> str:
    text = s.text if s.text.endswith("\n") else s.text + "\n"
    return f"{sep}{s.path}\n{text}"


FIM_TEMPLATES: dict[str, FimTemplate] = {
    t.name: t
    for t in (
        FimTemplate(
            name="codegemma",
            template="<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>",
            stop=(
                "<|file_separator|>",
                "<|fim_prefix|>",
                "<|fim_suffix|>",
                "<|fim_middle|>",
                "<eos>",
                "<end_of_turn>",
            ),
            file_separator="<|file_separator|>",
            match=(("codegemma",),),
        ),
        FimTemplate(
            name="qwen2.5-coder",
            template="<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>",
            stop=(
                "<|endoftext|>",
                "<|file_sep|>",
                "<|fim_prefix|>",
                "<|fim_suffix|>",
                "<|fim_middle|>",
                "<|fim_pad|>",
                "<|repo_name|>",
                "<|im_start|>",
                "<|im_end|>",
            ),
            file_separator="<|file_sep|>",
            repo_name="<|repo_name|>",
            match=(("qwen", "coder"),),
        ),
        FimTemplate(
            name="starcoder2",
            template="<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>",
            stop=(
                "<|endoftext|>",
                "<file_sep>",
                "<fim_prefix>",
                "<fim_suffix>",
                "<fim_middle>",
                "<repo_name>",
            ),
            file_separator="<file_sep>",
            repo_name="<repo_name>",
            match=(("starcoder",),),
        ),
        FimTemplate(
            name="deepseek-coder",
            template="<｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>",
            stop=(
                "<｜end▁of▁sentence｜>",
                "<｜fim▁begin｜>",
                "<｜fim▁hole｜>",
                "<｜fim▁end｜>",
                "<|EOT|>",
            ),
            match=(("deepseek", "coder"),),
        ),
        FimTemplate(
            name="codestral",
            template="[SUFFIX]{suffix}[PREFIX]{prefix}",
            stop=("[PREFIX]", "[SUFFIX]", "[MIDDLE]", "</s>"),
            match=(("codestral",),),
            suffix_first=True,
        ),
        FimTemplate(
            name="prefix-only",
            template="{prefix}",
            stop=("<eos>", "<end_of_turn>", "<start_of_turn>"),
            match=(("gemma",),),
        ),
    )
}
DEFAULT_FIM_TEMPLATE = "prefix-only"


def _normalized(name: str) -> str:
    return re.sub(r"[-_.\s]", "", name.lower())


def custom_fim_template(text: str) -> FimTemplate:
    """A template from a user format string holding ``{prefix}`` (and usually ``{suffix}``)."""
    suffix_first = "{suffix}" in text and text.index("{suffix}") < text.index("{prefix}")
    return FimTemplate(name="custom", template=text, suffix_first=suffix_first)


def is_valid_fim_override(value: str) -> bool:
    return value in FIM_TEMPLATES or "{prefix}" in value


def template_for_model(model_name: str, override: str | None = None) -> FimTemplate:
    """The template for a model: ``override`` (a name in `FIM_TEMPLATES` or a custom format
    string with ``{prefix}``) wins; otherwise by model-name substrings; default prefix-only
    (Gemma 3 and the shipped 270M base model have no FIM training)."""
    if override:
        if override in FIM_TEMPLATES:
            return FIM_TEMPLATES[override]
        if "{prefix}" in override:
            return custom_fim_template(override)
    name = _normalized(model_name or "")
    for template in FIM_TEMPLATES.values():  # dict order: codegemma is checked before gemma
        for words in template.match:
            if all(_normalized(w) in name for w in words):
                return template
    return FIM_TEMPLATES[DEFAULT_FIM_TEMPLATE]


def completion_prompt(
    ctx: CompletionContext, template: FimTemplate, repo: str | None = None
) -> tuple[str, list[str]]:
    """``(prompt, stop strings)`` for an inline completion."""
    return template.render(ctx, repo), list(template.stop)


# --- instruction prompts ----------------------------------------------------------------------

_CHAT = "<start_of_turn>user\n{system}\n\n{text}<end_of_turn>\n<start_of_turn>model\n"
_CHAT_STOP = ["<end_of_turn>", "<start_of_turn>", "<eos>"]

# Few-shot prompts for base models: worked examples, then the user's code last. The examples
# are picked per request from a pool, in other languages than the user's and sharing as few
# names with the selection as possible, so that a small model has nothing of theirs to copy
# into an answer about the user's code (`copies_example` checks that it did not).


@dataclass(frozen=True)
class Example:
    """One worked example: `code`, and what the answer to it is."""

    language: str
    code: str
    answer: str  # the explanation, or the fixed / refactored code
    problems: tuple[str, ...] = ()  # fix: the diagnostics
    instruction: str = ""  # refactor


EXAMPLES: dict[str, tuple[Example, ...]] = {
    "explain": (
        Example("go", "func countWords(s string) map[string]int {\n\tcounts := map[string]int{}\n"
                "\tfor _, w := range strings.Fields(s) {\n\t\tcounts[w]++\n\t}\n"
                "\treturn counts\n}",
                "Splits `s` at whitespace and counts how often each word occurs; returns the "
                "map from word to count."),
        Example("javascript", "function debounce(fn, ms) {\n  let timer;\n  return (...args) => {\n"
                "    clearTimeout(timer);\n    timer = setTimeout(() => fn(...args), ms);\n"
                "  };\n}",
                "Wraps `fn` so that it runs only after calls have stopped for `ms` "
                "milliseconds; each new call restarts the timer."),
        Example("python", "def parse_pairs(line):\n"
                "    return dict(item.split(\"=\", 1) for item in line.split(\";\") if item)",
                "Turns a line such as `a=1;b=2` into a dict: splits it at `;`, skips empty "
                "items and splits each item at its first `=` into key and value."),
    ),
    "fix": (
        Example("go", "func maxOf(xs []int) int {\n\tm := xs[0]\n\tfor _, x := range xs {\n"
                "\t\tif x > m {\n\t\t\tm = y\n\t\t}\n\t}\n\treturn m\n}",
                "func maxOf(xs []int) int {\n\tm := xs[0]\n\tfor _, x := range xs {\n"
                "\t\tif x > m {\n\t\t\tm = x\n\t\t}\n\t}\n\treturn m\n}",
                problems=("undefined: y",)),
        Example("javascript", "function greet(user) {\n  console.log(\"Hello, \" + usr.name);\n}",
                "function greet(user) {\n  console.log(\"Hello, \" + user.name);\n}",
                problems=("'usr' is not defined",)),
        Example("python", "def celsius(fahrenheit):\n    return (farenheit - 32) * 5 / 9",
                "def celsius(fahrenheit):\n    return (fahrenheit - 32) * 5 / 9",
                problems=("undefined name 'farenheit'",)),
    ),
    "refactor": (
        Example("go", "func isEven(n int) bool {\n\tif n%2 == 0 {\n\t\treturn true\n\t}\n"
                "\treturn false\n}",
                "func isEven(n int) bool {\n\treturn n%2 == 0\n}",
                instruction="Make it simpler."),
        Example("javascript", "function names(people) {\n  const out = [];\n"
                "  for (const p of people) {\n    out.push(p.name);\n  }\n  return out;\n}",
                "function names(people) {\n  return people.map((p) => p.name);\n}",
                instruction="Make it simpler."),
        Example("python", "def squares(n):\n    result = []\n    for i in range(n):\n"
                "        result.append(i * i)\n    return result",
                "def squares(n):\n    return [i * i for i in range(n)]",
                instruction="Make it simpler."),
    ),
    "docstring": (
        Example("go", "func clampInt(v, lo, hi int) int {\n\treturn max(lo, min(v, hi))\n}",
                "// clampInt returns v limited to the range [lo, hi].\n"
                "func clampInt(v, lo, hi int) int {\n\treturn max(lo, min(v, hi))\n}"),
        Example("javascript", "function sleep(ms) {\n"
                "  return new Promise((resolve) => setTimeout(resolve, ms));\n}",
                "/** A promise that resolves after `ms` milliseconds. */\nfunction sleep(ms) {\n"
                "  return new Promise((resolve) => setTimeout(resolve, ms));\n}"),
        Example("python", "def initials(full_name):\n"
                "    return \"\".join(w[0].upper() for w in full_name.split())",
                "def initials(full_name):\n    \"\"\"The upper-case first letters of the words "
                "of full_name.\"\"\"\n"
                "    return \"\".join(w[0].upper() for w in full_name.split())"),
    ),
}

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# words too common to tell an answer about the user's code from one about an example
_COMMON = frozenset(
    "the and for that this with from into each when then than returns return value values "
    "function method code which what given list string number first last after before only "
    "calls call runs item items splits split turns such like".split())


def _names(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text) if len(w) >= 3}


def pick_examples(kind: str, language: str, selection: str, n: int = 2,
                  skip: int = 0) -> list[Example]:
    """`n` examples for `kind`: other languages first, then fewest names shared with the
    selection; `skip` rotates to the next ones (a second try after a copied answer)."""
    pool = sorted(EXAMPLES[kind], key=lambda e: (e.language == language,
                                                 len(_names(e.code) & _names(selection))))
    start = (skip * n) % len(pool)
    return (pool[start:] + pool[:start])[:n]


def copies_example(answer: str, examples: Sequence[Example], own: str) -> Example | None:
    """The example `answer` copies, or None: it uses two or more of the example's own words
    (names in its code, words of its answer) that `own` (the user's code and its file) does
    not have, or repeats a line of the example's answer."""
    mine = _names(own)
    said = _names(answer)
    for ex in examples:
        theirs = (_names(ex.code) | _names(ex.answer)) - mine - _COMMON
        if len(said & theirs) >= 2:
            return ex
        lines = {ln.strip() for ln in ex.answer.splitlines() if len(ln.strip()) >= 16}
        if any(ln.strip() in lines and ln.strip() not in own for ln in answer.splitlines()):
            return ex
    return None


def render_examples(kind: str, examples: Sequence[Example]) -> str:
    """The examples in the few-shot form of `kind` (each ends with a blank line)."""
    out = []
    for ex in examples:
        code = f"### Code\n```{ex.language}\n{ex.code}\n```\n"
        if kind == "explain":
            out.append(f"{code}### Explanation\n{ex.answer}\n\n")
        elif kind == "fix":
            problems = "\n".join(f"- {p}" for p in ex.problems)
            out.append(f"{code}### Problems\n{problems}\n### Fixed code\n"
                       f"```{ex.language}\n{ex.answer}\n```\n\n")
        elif kind == "refactor":
            out.append(f"{code}### Instruction\n{ex.instruction}\n### Refactored code\n"
                       f"```{ex.language}\n{ex.answer}\n```\n\n")
        else:
            out.append(f"{code}### Code with documentation\n```{ex.language}\n{ex.answer}\n"
                       f"```\n\n")
    return "".join(out)


_FEWSHOT_EXPLAIN = """{examples}### Code
```{language}
{selection}
```
### Explanation
"""

_FEWSHOT_REFACTOR = """{examples}### Code
```{language}
{selection}
```
### Instruction
{instruction}
### Refactored code
```{language}
"""

_FEWSHOT_DOCSTRING = """{examples}### Code
```{language}
{selection}
```
### Code with documentation
```{language}
"""

_FEWSHOT_FIX = """{examples}### Code
```{language}
{selection}
```
### Problems
{diagnostics}
### Fixed code
```{language}
"""


@dataclass(frozen=True)
class InstructionTemplates:
    """Instruction prompts as data. Placeholders: ``{language}``, ``{path}``, ``{context}``,
    ``{selection}``, ``{instruction}``, ``{diagnostics}``, and ``{system}`` / ``{text}`` in
    ``chat``. Every field can be overridden by name (`with_overrides`)."""

    system: str = "You are a concise, careful programming assistant working inside a code editor."
    chat: str = _CHAT
    # chat form: the file first, then the request (shared file text -> shared cache)
    chat_context: str = "File `{path}`:\n```{language}\n{context}\n```\n\n"
    explain: str = (
        "Explain what this {language} code does, briefly and precisely:\n"
        "```{language}\n{selection}\n```"
    )
    refactor: str = (
        "Rewrite this {language} code: {instruction}\n"
        "Reply with only the new code in one fenced code block.\n"
        "```{language}\n{selection}\n```"
    )
    docstring: str = (
        "Add a documentation comment (docstring) to this {language} code, in the language's "
        "usual style, without changing the code. Reply with only the documented code in one "
        "fenced code block.\n```{language}\n{selection}\n```"
    )
    fix: str = (
        "Fix these problems in this {language} code:\n{diagnostics}\n"
        "Reply with only the fixed code in one fenced code block.\n"
        "```{language}\n{selection}\n```"
    )
    # few-shot form for base models: file context (raw), a blank line, then the examples
    # (`{examples}`, chosen per request by `pick_examples`) and the user's code last
    fewshot_context: str = "{context}\n\n"
    explain_fewshot: str = _FEWSHOT_EXPLAIN
    refactor_fewshot: str = _FEWSHOT_REFACTOR
    docstring_fewshot: str = _FEWSHOT_DOCSTRING
    fix_fewshot: str = _FEWSHOT_FIX

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def with_overrides(self, overrides: Mapping[str, str]) -> InstructionTemplates:
        """A copy with fields replaced by name; unknown names and non-strings are ignored
        (the config parser reports them)."""
        known = set(self.names())
        changes = {k: v for k, v in overrides.items() if k in known and isinstance(v, str)}
        return dataclasses.replace(self, **changes) if changes else self


def _file_context(ctx: CompletionContext | None, selection: str) -> str:
    """The file around the selection: extras + prefix + selection + suffix (the prefix-only
    completion prompt at the selection's start is a prefix of this)."""
    if ctx is None:
        return ""
    return render_extras_block(ctx.extras, ctx.language_id) + ctx.prefix + selection + ctx.suffix


def _build(
    kind: str,
    ctx: CompletionContext | None,
    selection: str,
    language: str,
    chat: bool,
    templates: InstructionTemplates | None,
    extra: Mapping[str, str],
    examples: Sequence[Example] | None = None,
) -> tuple[str, list[str]]:
    t = templates or InstructionTemplates()
    context = _file_context(ctx, selection)
    values = {
        "language": language,
        "path": (ctx.path if ctx else "") or "untitled",
        # dedented like the examples (a method shown at its class indent gets answered half
        # dedented by small models); the answer is re-indented to the selection's
        "selection": textwrap.dedent(selection).rstrip("\n"),
        **extra,
    }
    if chat:
        head = render_template(t.chat_context, {**values, "context": context.rstrip("\n")})
        text = (head if context else "") + render_template(getattr(t, kind), values)
        prompt = render_template(t.chat, {"system": t.system, "text": text})
        return prompt, list(_CHAT_STOP)
    head = render_template(t.fewshot_context, {"context": context}) if context else ""
    if examples is None:
        examples = pick_examples(kind, language, selection)
    values["examples"] = render_examples(kind, examples)
    prompt = head + render_template(getattr(t, f"{kind}_fewshot"), values)
    stop = ["\n### ", "<eos>"] if kind == "explain" else ["```", "<eos>"]
    return prompt, stop


def explain_prompt(
    ctx: CompletionContext | None,
    selection: str,
    language: str,
    chat: bool,
    templates: InstructionTemplates | None = None,
    examples: Sequence[Example] | None = None,
) -> tuple[str, list[str]]:
    """Ask for an explanation of ``selection`` (text answer)."""
    return _build("explain", ctx, selection, language, chat, templates, {}, examples)


def refactor_prompt(
    ctx: CompletionContext | None,
    selection: str,
    language: str,
    chat: bool,
    instruction: str,
    templates: InstructionTemplates | None = None,
    examples: Sequence[Example] | None = None,
) -> tuple[str, list[str]]:
    """Ask for ``selection`` rewritten per ``instruction`` (answer: code, see
    `extract_code_block`)."""
    extra = {"instruction": instruction.strip() or "Improve it."}
    return _build("refactor", ctx, selection, language, chat, templates, extra, examples)


def docstring_prompt(
    ctx: CompletionContext | None,
    selection: str,
    language: str,
    chat: bool,
    templates: InstructionTemplates | None = None,
    examples: Sequence[Example] | None = None,
) -> tuple[str, list[str]]:
    """Ask for ``selection`` with documentation comments added (answer: code)."""
    return _build("docstring", ctx, selection, language, chat, templates, {}, examples)


def fix_prompt(
    ctx: CompletionContext | None,
    selection: str,
    language: str,
    chat: bool,
    diagnostics: Sequence[str],
    templates: InstructionTemplates | None = None,
    examples: Sequence[Example] | None = None,
) -> tuple[str, list[str]]:
    """Ask for ``selection`` fixed for the given diagnostic messages (answer: code)."""
    items = [d.strip() for d in diagnostics if d.strip()] or ["(no messages)"]
    extra = {"diagnostics": "\n".join(f"- {m}" for m in items)}
    return _build("fix", ctx, selection, language, chat, templates, extra, examples)


_FENCE_OPEN = re.compile(r"^[ \t]*(`{3,}|~{3,})[^\n`]*\n", re.MULTILINE)


def extract_code_block(text: str) -> str:
    """The code inside the first fenced block (to the end if it is not closed); the text
    itself (without a trailing closing fence) when there is no opening fence. Trailing line
    breaks are dropped in both cases; leading indentation is kept."""
    m = _FENCE_OPEN.search(text)
    if m is None:
        stripped = text.rstrip()
        if stripped.endswith("```"):
            stripped = stripped[:-3]
            return stripped.rstrip("\n")
        return text.rstrip("\n")
    fence = m.group(1)
    body = text[m.end() :]
    close = re.search(rf"^[ \t]*{re.escape(fence)}[ \t]*$", body, re.MULTILINE)
    if close is None:
        return body.rstrip("\n")
    return body[: close.start()].rstrip("\n")


@dataclass(frozen=True)
class Insertion:
    """A doc comment written in place: the model continues `prompt`; the document gets
    `head + answer.strip() + tail` at line `at_line` (an index into the selection's lines)."""

    prompt: str
    stop: list[str]
    head: str
    tail: str
    at_line: int


_DEFINES = re.compile(
    r"^\s*(?:(?:export|pub|public|private|static|async|inline)\s+)*"
    r"(?:def|class|fn|func|function|struct|enum|interface|impl|trait)\s+([A-Za-z_][\w]*)")


def explain_insertion(ctx: CompletionContext, selection: str, language: str) -> Insertion:
    """A completion-style Explain prompt that a base model follows without examples to copy:
    the file through the selection, then a comment that starts the explanation and names what
    the selection defines (the user's code is the last thing it read). The answer continues
    `head`'s sentence; `explanation_text` turns it into plain text."""
    start, end = comment_syntax(language)
    before = render_extras_block(ctx.extras, ctx.language_id) + ctx.prefix
    code = selection.rstrip("\n")
    first = next((ln for ln in code.splitlines() if ln.strip()), "")
    indent = first[: len(first) - len(first.lstrip(" \t"))]
    m = _DEFINES.match(first)
    subject = f"`{m.group(1)}`" if m else "the code above"
    head = f"{indent}{start} In short, {subject}"
    stop = ["\n\n", end] if end else ["\n\n"]
    return Insertion(before + code + "\n" + head, stop, head, "", 0)


def explanation_text(insertion: Insertion, answer: str, language: str) -> str:
    """The explanation as plain text: the started sentence and the comment lines that follow
    it, without comment signs; stops at the first line that is not a comment."""
    start, _ = comment_syntax(language)
    lead = insertion.head.strip()[len(start):].strip()
    lines = answer.split("\n")
    out = [lead + lines[0]]
    for line in lines[1:]:
        s = line.strip()
        if not s.startswith(start):
            break
        out.append(s[len(start):].strip())
    text = " ".join(x for x in out if x).strip()
    return text.removeprefix("In short, ")


def docstring_insertion(ctx: CompletionContext, selection: str, language: str) -> Insertion | None:
    """A completion-style docstring prompt that even base models follow: the file up to the
    definition, then the opening of the doc comment; the answer is the comment's text."""
    lines = split_lines(selection)  # LSP's lines, as the edit counts them
    if not lines or not lines[0].strip():
        return None
    first = lines[0]
    indent = first[: len(first) - len(first.lstrip(" \t"))]
    before = render_extras_block(ctx.extras, ctx.language_id) + ctx.prefix
    if language == "python":
        if not first.rstrip().endswith(":"):
            return None
        body = next((ln for ln in lines[1:] if ln.strip()), indent + "    ")
        inner = body[: len(body) - len(body.lstrip(" \t"))] or indent + "    "
        head = inner + '"""'
        return Insertion(before + first + "\n" + head, ['"""', "\n\n"], head, '"""\n', 1)
    start, end = comment_syntax(language)
    if start == "/*":
        head = f"{indent}/**\n{indent} * "
        return Insertion(before + head, ["*/", "\n\n"], head, f"\n{indent} */\n", 0)
    lead = {"rust": "///"}.get(language, start)
    head = f"{indent}{lead} "
    return Insertion(before + head, ["\n"], head, "\n", 0)
