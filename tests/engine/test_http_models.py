"""`/v1/models` lists the loaded model, and the draft model when speculative decoding has one."""

from __future__ import annotations

from types import SimpleNamespace

from engine.http_api import ApiServer, HttpOptions


def test_models_list_the_draft_model_when_one_is_loaded() -> None:
    for draft, want in ((None, ["target.gguf"]), ("draft.gguf", ["target.gguf", "draft.gguf"])):
        server = ApiServer(HttpOptions("127.0.0.1", 0), SimpleNamespace(draft_model_name=draft),
                           "target.gguf")
        try:
            cards = server.model_cards()
        finally:
            server.server_close()
        assert [c["id"] for c in cards] == want
        assert all(c["object"] == "model" for c in cards)
        assert cards[-1].get("role") == ("draft" if draft else None)
