"""Gemma 4 assistant (MTP drafter): draft logits equal transformers' on tiny random target +
assistant checkpoints (plain and ordered-embedding heads), speculative greedy decoding with
it equals plain greedy, directly and through the scheduler; bad checkpoints are named."""

from __future__ import annotations

import json
import queue
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine import protocol as P
from engine.assistant import Assistant
from engine.generate import Final, GenerateOptions, generate
from engine.kv_cache import KVCache
from engine.model import forward
from engine.prompt_cache import PromptCache
from engine.runtime import Model
from engine.scheduler import Scheduler
from engine.speculate import ForwardCost, Speculator

V = 300
P_LEN = 39  # positions the target has seen before the drafts


class Eager(Speculator):
    def draft_length(self) -> int:
        return self.max_draft


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny Gemma 4 target (K/V sharing, so transformers hands out its K/V), two tiny
    assistants, and transformers' draft logits for three drafts after a prompt."""
    torch = pytest.importorskip("torch", reason="the `ref` extra (torch, transformers) is needed")
    tf = pytest.importorskip("transformers")
    if not hasattr(tf, "Gemma4AssistantForCausalLM"):
        pytest.skip("this transformers has no Gemma 4 assistant")
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("mtp")
    common: dict[str, Any] = dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
        num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=8,
        max_position_embeddings=2048, hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0, attn_implementation="eager",
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                         "full_attention": {"rope_type": "proportional", "rope_theta": 1e6,
                                            "partial_rotary_factor": 0.25}})
    kinds = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
             "full_attention", "sliding_attention", "full_attention"]
    target = tf.Gemma4ForCausalLM(tf.Gemma4TextConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=7,
        num_kv_shared_layers=2, use_double_wide_mlp=True, layer_types=kinds,
        final_logit_softcapping=30.0, **common)).eval()
    models = {"target": target}
    for name, ordered in (("assistant", False), ("ordered", True)):
        cfg = tf.Gemma4AssistantConfig(
            text_config=tf.Gemma4TextConfig(
                vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                layer_types=["sliding_attention", "full_attention"], **common),
            backbone_hidden_size=64, use_ordered_embeddings=ordered, num_centroids=4,
            centroid_intermediate_top_k=2)
        models[name] = tf.Gemma4AssistantForCausalLM(cfg).eval()
    with torch.no_grad():
        for m in models.values():
            for pname, p in m.named_parameters():
                p.normal_(1.0 if "norm" in pname else 0.0, 0.1 if "norm" in pname else 0.04)
            for bname, b in m.named_buffers():
                if bname.endswith("layer_scalar"):
                    b.uniform_(0.5, 1.5)
        perm = torch.randperm(V, generator=torch.Generator().manual_seed(2))
        models["ordered"].masked_embedding.token_ordering.copy_(perm)
    ids = torch.randint(4, V, (1, P_LEN + 1), generator=torch.Generator().manual_seed(1))
    want: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        out = target(ids[:, :P_LEN], output_hidden_states=True, return_shared_kv_states=True)
        for name in ("assistant", "ordered"):
            h, tok, rows = out.hidden_states[-1][:, -1:], ids[:, P_LEN:], []
            for _ in range(3):  # every draft at the newest token's position
                emb = target.get_input_embeddings()(tok)
                a = models[name](inputs_embeds=torch.cat([emb, h], -1),
                                 position_ids=torch.tensor([[P_LEN]]),
                                 shared_kv_states=out.shared_kv_states)
                rows.append(a.logits[0, -1].numpy())
                tok, h = a.logits[:, -1:].argmax(-1), a.last_hidden_state
            want[name] = rows
    for name, m in models.items():
        m.save_pretrained(d / name)
    _word_tokenizer_json(d / "target" / "tokenizer.json")
    return {"dir": d, "ids": ids[0].tolist(), "want": want}


def _word_tokenizer_json(path: Path) -> None:
    """Words t4..t299 split on spaces: prompt text round-trips to ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3} | {f"t{i}": i for i in range(4, V)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))


@pytest.fixture()
def target(ckpts: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Model:
    monkeypatch.setenv("GEMMA_LSP_CACHE", str(tmp_path / "cache"))
    return Model.load(ckpts["dir"] / "target", quant="f32")  # fp32: compared to transformers


@pytest.mark.parametrize("name", ["assistant", "ordered"])
def test_draft_logits_match_transformers(ckpts: dict[str, Any], target: Model,
                                         name: str) -> None:
    a = Assistant.load(ckpts["dir"] / name)
    a.check_target(target.config)
    assert (a.centroids is not None) == (name == "ordered")
    ids = ckpts["ids"]
    kv = KVCache(target.config, 64)
    hidden = np.empty((P_LEN, target.config.d_model), dtype=np.float32)
    forward(target.config, target.weights, ids[:P_LEN], kv, logits="all", hidden_out=hidden)
    tok, h = ids[P_LEN], hidden[-1]
    for want in ckpts["want"][name]:
        logits, h = a.step(target.config, target.weights, kv, tok, h)
        err = float(np.abs(logits - want).max())
        print(f"{name}: max |draft logit diff| vs transformers {err:.2e}")
        assert err <= 1e-4, err
        tok = int(np.argmax(logits))
        assert tok == int(np.argmax(want))


def test_speculation_with_the_assistant_equals_plain_greedy(ckpts: dict[str, Any],
                                                            target: Model) -> None:
    a = Assistant.load(ckpts["dir"] / "assistant")
    ids = ckpts["ids"][:20]
    opts = GenerateOptions(max_tokens=24, stop_ids=frozenset())
    plain = [e for e in generate(target, ids, opts)][-1]
    kv = target.new_kv(64)
    spec = Eager(a.drafter(target, kv, ids), ForwardCost(), max_draft=4)
    fast = [e for e in generate(target, ids, opts, kv=kv, speculator=spec)][-1]
    assert isinstance(plain, Final) and isinstance(fast, Final)
    assert fast.token_ids == plain.token_ids
    assert spec.drafted > 0 and spec.verify_steps > 0

    # through the scheduler, as the daemon runs it with --draft-model
    c = target.config
    sched = Scheduler(target, PromptCache(c.n_layers, c.kv_heads_max, c.head_dim_max, 1 << 26),
                      draft_model=a)
    sched.start()
    try:
        q: queue.Queue[P.Message] = queue.Queue()

        class Client:
            def send(self, msg: P.Message) -> None:
                q.put(msg)

        prompt = " ".join(f"t{i}" for i in ids)
        assert target.tokenizer.encode(prompt, add_bos=True) == [2, *ids]
        sched.submit(Client(), P.Generate(id=1, prompt=prompt, max_tokens=24, kind="chat"))
        toks = []
        while not isinstance(msg := q.get(timeout=120), P.Done | P.Error):
            toks.append(msg)
        assert isinstance(msg, P.Done), msg
        status = sched.status()
    finally:
        sched.stop()
    want = [e for e in generate(target, target.tokenizer.encode(prompt, add_bos=True),
                                GenerateOptions(max_tokens=24))][-1]
    assert isinstance(want, Final)
    assert tuple(t.token_id for t in toks) == want.token_ids
    assert "assistant" in status["drafter"] and "chat" in status["speculation"]


def test_bad_assistants_are_named(ckpts: dict[str, Any], model: Any, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'gemma4_text' is not a Gemma 4 assistant"):
        Assistant.load(ckpts["dir"] / "target")
    a = Assistant.load(ckpts["dir"] / "assistant")
    with pytest.raises(ValueError, match="drafts for Gemma 4 models"):
        a.check_target(model.config)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text(json.dumps({"model_type": "gemma4_assistant"}))
    with pytest.raises(ValueError, match="no text_config"):
        Assistant.load(tmp_path / "x")
    with pytest.raises(ValueError, match="not found"):
        Assistant.load(tmp_path / "missing")
