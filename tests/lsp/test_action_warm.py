"""Asking for the code-action list warms the prompt of the action most likely picked: Explain's
for a selection, Fix's for a diagnostic, exactly the prompt the action then sends (so the
engine's cache holds all of it); an automatic request with nothing selected warms nothing;
a newer list replaces the older warm, the same one is not warmed twice; closing the document
drops it."""

from __future__ import annotations

import asyncio
from typing import Any

from lsprotocol import types as t

from gemma_lsp.actions import ActionService
from gemma_lsp.config import parse_options
from gemma_lsp.documents import DocumentStore
from tests.lsp.inproc import ScriptedBackend

URI = "file:///w/stats.py"
CODE = ("import math\n\n\ndef mean(xs):\n    total = sum(xs)\n    return total / len(xs)\n\n\n"
        "def spread(xs):\n    m = mean(xs)\n    return math.sqrt(sum((x - m) ** 2 for x in xs))\n")
SEL = t.Range(t.Position(8, 0), t.Position(11, 0))


class RecordingBackend(ScriptedBackend):
    def __init__(self, answer: str) -> None:
        super().__init__(answer)
        self.warmed: list[tuple[str, str]] = []
        self.prompts: list[str] = []

    def warm(self, prompt: str, doc: str) -> None:
        self.warmed.append((prompt, doc))

    def start(self, prompt: str, **kw: Any) -> Any:
        self.prompts.append(prompt)
        return super().start(prompt, **kw)


def _service(answer: str, warm_ms: int = 20) -> tuple[ActionService, RecordingBackend]:
    store = DocumentStore()
    store.open(URI, CODE, 1, "python")
    backend = RecordingBackend(answer)
    opts, _ = parse_options({"actions": {"warmAfterMs": warm_ms}})
    return ActionService(store, lambda: backend, lambda: opts), backend


def _params(rng: t.Range, diagnostics: list[t.Diagnostic] | None = None,
            trigger: t.CodeActionTriggerKind = t.CodeActionTriggerKind.Invoked
            ) -> t.CodeActionParams:
    return t.CodeActionParams(t.TextDocumentIdentifier(URI), rng, t.CodeActionContext(
        diagnostics=diagnostics or [], trigger_kind=trigger))


async def _listed(svc: ActionService, params: t.CodeActionParams) -> None:
    assert svc.offer(params)
    svc.schedule_warm(params)
    await asyncio.sleep(0.15)


async def test_a_selection_warms_explains_own_prompt() -> None:
    svc, backend = _service(" computes the spread of `xs`.")
    await _listed(svc, _params(SEL))
    assert len(backend.warmed) == 1
    prompt, doc = backend.warmed[0]
    assert doc == URI + "#actions" and "def spread(xs):" in prompt
    await svc.explain(URI, SEL)
    assert backend.prompts == [prompt]  # all of what Explain reads is in the cache


async def test_a_diagnostic_warms_the_fix_prompt() -> None:
    code_range = t.Range(t.Position(9, 0), t.Position(10, 0))
    diag = t.Diagnostic(code_range, "undefined name 'meen'")
    svc, backend = _service("```python\n    m = mean(list(xs))\n```")
    await _listed(svc, _params(SEL, [diag]))
    assert len(backend.warmed) == 1
    await svc.edit("fix", URI, code_range, version=1, diagnostics=[diag.message])
    assert backend.prompts == [backend.warmed[0][0]]


async def test_automatic_requests_without_a_selection_warm_nothing() -> None:
    svc, backend = _service("x")
    at = t.Range(t.Position(9, 4), t.Position(9, 4))
    await _listed(svc, _params(at, trigger=t.CodeActionTriggerKind.Automatic))
    assert backend.warmed == []
    await _listed(svc, _params(at))  # asked for by the user (Helix, Neovim): warmed
    assert len(backend.warmed) == 1


async def test_a_newer_list_replaces_the_older_warm_and_close_drops_it() -> None:
    svc, backend = _service("x", warm_ms=100)
    svc.schedule_warm(_params(t.Range(t.Position(3, 0), t.Position(6, 0))))
    svc.schedule_warm(_params(SEL))
    await asyncio.sleep(0.3)
    assert len(backend.warmed) == 1 and "def spread(xs):" in backend.warmed[0][0]
    svc.schedule_warm(_params(SEL))  # the same selection again: its prompt is warm already
    await asyncio.sleep(0.3)
    assert len(backend.warmed) == 1
    svc.schedule_warm(_params(t.Range(t.Position(3, 0), t.Position(6, 0))))
    svc.forget(URI)
    await asyncio.sleep(0.3)
    assert len(backend.warmed) == 1


async def test_warm_after_ms_0_turns_it_off() -> None:
    svc, backend = _service("x", warm_ms=0)
    await _listed(svc, _params(SEL))
    assert backend.warmed == []


async def test_a_failed_warm_is_tried_again() -> None:
    from gemma_lsp.backend import BackendError

    svc, backend = _service("x")
    fails = [True]

    def warm(prompt: str, doc: str) -> None:
        if fails.pop() if fails else False:
            raise BackendError("no engine is listening")
        backend.warmed.append((prompt, doc))

    backend.warm = warm  # type: ignore[method-assign]
    await _listed(svc, _params(SEL))
    assert backend.warmed == []
    await _listed(svc, _params(SEL))  # the same selection: sent this time
    assert len(backend.warmed) == 1
