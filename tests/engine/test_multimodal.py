"""Gemma 4 unified: a tiny random checkpoint built with transformers gives the same logits and
greedy continuation as ours for two images of different sizes and for audio; chunked prefill
keeps image blocks whole; the prompt cache reuses an image's K/V (also after a save/load);
text-only models refuse media; the placeholder layout."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine import multimodal as mm
from engine import protocol as P
from engine.kv_cache import KVCache
from engine.model import forward
from engine.prompt_cache import PromptCache
from engine.runtime import Model
from engine.scheduler import Scheduler
from tests.engine import tiny_unified as tu
from tests.engine.tiny import tiny_config

torch = pytest.importorskip("torch", reason="the `ref` extra (torch, transformers) is needed")
tf = pytest.importorskip("transformers")
if not hasattr(tf, "Gemma4UnifiedForConditionalGeneration"):
    pytest.skip("this transformers has no Gemma 4 unified", allow_module_level=True)

PROMPT_2IMG = "<|turn>user\nLook at <|image|> and then <|image|> what?<turn|>\n<|turn>model\n"
PROMPT_AUDIO = "<|turn>user\nHear <|audio|> ok?<turn|>\n<|turn>model\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Model]]:
    root = tmp_path_factory.mktemp("unified")
    mp = pytest.MonkeyPatch()
    mp.setenv("GEMMA_LSP_CACHE", str(root / "cache"))
    ref = tu.build(root / "tiny-gemma4-unified")
    yield ref, Model.load(root / "tiny-gemma4-unified", quant="f32")  # fp32: as transformers
    mp.undo()


def two_images() -> list[dict[str, Any]]:
    # different sizes and aspect ratios, one with alpha: 63 and 56 soft tokens
    return [{"kind": "image", "data": tu.png(50, 37, 1, "RGBA"), "max_soft_tokens": 70},
            {"kind": "image", "data": tu.png(90, 31, 2), "max_soft_tokens": 70}]


def reference_inputs(p: mm.MediaPrompt, budget: int = 70) -> dict[str, Any]:
    """transformers' inputs for the same prompt: placeholder ids, token types, padded
    pixel rows with (-1, -1) positions, audio frames with their mask."""
    ids = p.ids.copy()
    types = np.zeros_like(ids)
    images = [s for s in p.spans if s.image is not None]
    clips = [s for s in p.spans if s.audio is not None]
    for s in p.spans:
        ids[s.start:s.end] = tu.IMAGE_ID if s.image is not None else tu.AUDIO_ID
        types[s.start:s.end] = 1 if s.image is not None else 3
    out: dict[str, Any] = {"input_ids": torch.tensor(ids)[None],
                           "mm_token_type_ids": torch.tensor(types)[None],
                           "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    if images:
        F = tu.PATCH_PX * tu.PATCH_PX * 3
        pv = np.zeros((len(images), budget, F), np.float32)
        pos = -np.ones((len(images), budget, 2), np.int64)
        for i, s in enumerate(images):
            assert s.image is not None
            pv[i, :s.n] = s.image.pixels
            pos[i, :s.n] = s.image.positions
        out |= {"pixel_values": torch.tensor(pv), "image_position_ids": torch.tensor(pos)}
    if clips:
        T = max(s.n for s in clips)
        feats = np.zeros((len(clips), T, tu.AUDIO_FRAME), np.float32)
        mask = np.zeros((len(clips), T), bool)
        for i, s in enumerate(clips):
            assert s.audio is not None
            feats[i, :s.n] = s.audio.frames
            mask[i, :s.n] = True
        out |= {"input_features": torch.tensor(feats), "input_features_mask": torch.tensor(mask)}
    return out


def greedy(model: Model, p: mm.MediaPrompt, n: int) -> list[int]:
    kv = KVCache(model.config, len(p.ids) + n + 1)
    logits = forward(model.config, model.weights, p.ids, kv, soft=p.spans)
    out = []
    for _ in range(n):
        assert logits is not None
        out.append(int(logits.argmax()))
        logits = forward(model.config, model.weights, [out[-1]], kv)
    return out


def test_the_checkpoint_loads_with_its_embedders(tiny: tuple[Any, Model]) -> None:
    _, ours = tiny
    media = ours.config.media
    assert media is not None and media.patch_px == 12 and media.audio_frame == 40
    assert (media.image_token_id, media.boi_token_id, media.eoa_token_id) == (500, 503, 506)
    assert ours.weights.vision is not None and ours.weights.audio is not None
    assert ours.weights.vision.pos_embd.shape == (128, 2, 32)


def test_two_images_of_different_sizes_match_transformers(tiny: tuple[Any, Model],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    ref, ours = tiny
    p = mm.build_prompt(ours.config, ours.tokenizer, ours.name, PROMPT_2IMG, two_images())
    assert [(s.n, s.image.size) for s in p.spans if s.image] == [(63, (84, 108)), (56, (48, 168))]
    inputs = reference_inputs(p)
    with torch.no_grad():
        want = ref(**inputs).logits[0].numpy()  # (T, V)
    got = forward(ours.config, ours.weights, p.ids, KVCache(ours.config, 256), logits="all",
                  soft=p.spans)
    assert got is not None
    err = float(np.abs(got - want).max())
    print(f"max |logit diff| vs transformers, two images: {err:.2e}")
    assert err <= 1e-4, err
    # both image blocks (63 and 56 tokens) are far wider than the sliding window (8): the
    # bidirectional mask reaches across it, and a causal-only mask gives other logits
    with monkeypatch.context() as m:
        m.setattr("engine.model.blocks_in", lambda *a: [])
        causal = forward(ours.config, ours.weights, p.ids, KVCache(ours.config, 256),
                         logits="all", soft=p.spans)
    assert causal is not None and float(np.abs(causal - got).max()) > 1e-2

    # prefill in chunks that never split an image gives the same logits
    kv = KVCache(ours.config, 256)
    start, outs = 0, []
    while start < len(p.ids):
        end = mm.chunk_end(p.spans, start, min(len(p.ids), start + 40))
        outs.append(forward(ours.config, ours.weights, p.ids[start:end], kv, logits="all",
                            soft=p.spans))
        start = end
    assert float(np.abs(np.concatenate(outs) - want).max()) <= 1e-4

    # and the greedy continuation is transformers' (default generate: the forward-path mask)
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert greedy(ours, p, 12) == out[0, len(p.ids):].tolist()


def test_audio_matches_transformers(tiny: tuple[Any, Model]) -> None:
    ref, ours = tiny
    media = [{"kind": "audio", "data": tu.wav(0.37, rate=22050, channels=2)}]
    p = mm.build_prompt(ours.config, ours.tokenizer, ours.name, PROMPT_AUDIO, media)
    (span,) = p.spans
    assert span.n == 148  # 0.37 s at 16 kHz = 5920 samples = 148 frames of 40
    inputs = reference_inputs(p)
    with torch.no_grad():
        want = ref(**inputs).logits[0].numpy()
    got = forward(ours.config, ours.weights, p.ids, KVCache(ours.config, 256), logits="all",
                  soft=p.spans)
    assert got is not None
    err = float(np.abs(got - want).max())
    print(f"max |logit diff| vs transformers, audio: {err:.2e}")
    assert err <= 1e-4, err
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert greedy(ours, p, 12) == out[0, len(p.ids):].tolist()


def test_layout_and_content_keys(tiny: tuple[Any, Model]) -> None:
    _, ours = tiny
    a = mm.build_prompt(ours.config, ours.tokenizer, ours.name, PROMPT_2IMG, two_images())
    b = mm.build_prompt(ours.config, ours.tokenizer, ours.name, PROMPT_2IMG, two_images())
    s0, s1 = a.spans
    assert a.ids[s0.start - 1] == tu.BOI_ID and a.ids[s0.end] == tu.EOI_ID
    assert (a.ids[s0.start:s0.end] < 0).all() and len(set(a.ids[s0.start:s0.end])) == s0.n
    assert (a.ids == b.ids).all()  # the same pictures: the same keys
    swapped = list(reversed(two_images()))
    c = mm.build_prompt(ours.config, ours.tokenizer, ours.name, PROMPT_2IMG, swapped)
    assert not set(c.ids[c.spans[0].start:c.spans[0].end]) & set(a.ids[s0.start:s0.end])
    assert mm.safe_prefix(a.spans, s0.start + 5) == s0.start
    assert mm.chunk_end(a.spans, 0, s0.start + 5) == s0.start
    assert mm.chunk_end(a.spans, s0.start, s0.start + 5) == s0.end
    with pytest.raises(ValueError, match="markers .*image.* do not match .*image, image"):
        mm.build_prompt(ours.config, ours.tokenizer, ours.name, "<|image|> only one",
                        two_images())
    with pytest.raises(ValueError, match="max_soft_tokens must be one of"):
        mm.build_prompt(ours.config, ours.tokenizer, ours.name, "<|image|>",
                        [{"kind": "image", "data": tu.png(8, 8), "max_soft_tokens": 100}])


def test_text_only_models_refuse_media_naming_what_they_lack() -> None:
    cfg = tiny_config()
    for kind in ("image", "audio"):
        with pytest.raises(ValueError, match=rf"model gemma-3-x cannot take {kind} input: it "
                           r"is a text-only model \(gemma3\) and lacks any image or audio"):
            mm.build_prompt(cfg, None, "gemma-3-x", f"<|{kind}|>",
                            [{"kind": kind, "data": b"x"}])


class Collector:
    def __init__(self) -> None:
        self.q: queue.Queue[P.Message] = queue.Queue()

    def send(self, msg: P.Message) -> None:
        self.q.put(msg)

    def result(self, req_id: int) -> tuple[str, P.Message]:
        text = ""
        while True:
            msg = self.q.get(timeout=120)
            if isinstance(msg, P.Token):
                text += msg.text
            elif getattr(msg, "id", None) == req_id:
                return text, msg


def test_the_same_screenshot_twice_reuses_its_kv_also_after_a_restart(
        tiny: tuple[Any, Model], tmp_path: Path) -> None:
    _, ours = tiny
    c = ours.config
    cache = PromptCache(c.n_layers, c.kv_heads_max, c.head_dim_max, 64 << 20)
    sched = Scheduler(ours, cache, interactive_chunk=40)
    sched.start()
    client = Collector()
    try:
        first = P.Generate(id=1, prompt=PROMPT_2IMG, max_tokens=6, media=two_images())
        sched.submit(client, first)
        text1, done1 = client.result(1)
        assert isinstance(done1, P.Done) and done1.reused_tokens == 0
        # another question about the same two pictures: everything up to the question reused
        again = P.Generate(id=2, prompt=PROMPT_2IMG.replace("what?", "why?"), max_tokens=6,
                           media=two_images())
        sched.submit(client, again)
        _, done2 = client.result(2)
        p = mm.build_prompt(c, ours.tokenizer, ours.name, PROMPT_2IMG, two_images())
        assert isinstance(done2, P.Done) and done2.reused_tokens >= p.spans[1].end
        # a different second picture: only what precedes it is reused
        other = two_images()[:1] + [{"kind": "image", "data": tu.png(90, 31, 3),
                                     "max_soft_tokens": 70}]
        sched.submit(client, P.Generate(id=3, prompt=PROMPT_2IMG, max_tokens=6, media=other))
        _, done3 = client.result(3)
        assert isinstance(done3, P.Done)
        assert p.spans[0].end < done3.reused_tokens <= p.spans[1].start
        # a text-only request and status still work
        assert sched.status()["inputs"] == ["text", "image", "audio"]
    finally:
        sched.stop()
    # persisted and loaded: the same request reuses the saved K/V and answers the same
    cache.save(tmp_path / "pc.safetensors", "fp")
    fresh = PromptCache(c.n_layers, c.kv_heads_max, c.head_dim_max, 64 << 20)
    assert fresh.load(tmp_path / "pc.safetensors", "fp")
    sched = Scheduler(ours, fresh)
    sched.start()
    try:
        sched.submit(client, P.Generate(id=4, prompt=PROMPT_2IMG, max_tokens=6,
                                        media=two_images()))
        text4, done4 = client.result(4)
        assert isinstance(done4, P.Done) and done4.reused_tokens == len(p.ids) - 1
        assert text4 + done4.tail == text1 + done1.tail
    finally:
        sched.stop()


def test_media_errors_are_error_replies(tiny: tuple[Any, Model]) -> None:
    _, ours = tiny
    c = ours.config
    sched = Scheduler(ours, PromptCache(c.n_layers, c.kv_heads_max, c.head_dim_max, 1 << 20))
    client = Collector()
    sched.submit(client, P.Generate(id=7, prompt="<|image|>", media=[
        {"kind": "image", "data": b"not an image"}]))
    _, err = client.result(7)
    assert isinstance(err, P.Error) and err.code == P.E_BAD_REQUEST
    assert "not a readable image" in err.message
