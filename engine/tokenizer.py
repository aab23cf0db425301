"""Gemma tokenization: exact SentencePiece-BPE encode, decode, incremental detokenize, specials.

The GGUF vocab is turned into a Hugging Face `tokenizers` BPE model once (merges = every
split of a normal token into two normal tokens, ranked by the merged token's score, which is
llama.cpp's SPM merge order), with byte fallback, `' ' -> '▁'`, user-defined pieces matched on
the raw text and control tokens as specials. It is saved as `tokenizer.json` (plus
`tokenizer_gemma.json` with the special ids) next to the engine-ready weights.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models, normalizers
from tokenizers import Tokenizer as HFTokenizer

# GGUF token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
START_OF_TURN, END_OF_TURN = 105, 106
META_FILE = "tokenizer_gemma.json"

# Text is encoded in line-aligned pieces (in parallel, in Rust). Safe for Gemma: no normal token
# contains a newline and newline runs are user-defined tokens, so no token crosses a line start.
_LINE_START = re.compile(r"(?<=\n)(?=[^\n])")
_PIECES = 16
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class Tokenizer:
    """Encode/decode for one model; `stop_ids` are the ids that end a generation."""

    def __init__(
        self,
        hf: HFTokenizer,
        *,
        bos_id: int,
        eos_id: int,
        pad_id: int,
        unk_id: int,
        special_ids: Iterable[int],
        stop_ids: Iterable[int],
        line_split: bool = True,
    ) -> None:
        self.hf = hf
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(special_ids)
        self.stop_ids = frozenset(stop_ids)
        self.line_split = line_split
        self._bytes: dict[int, bytes] = {}
        self._max_bytes = 0

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_gguf_vocab(
        cls,
        tokens: list[str],
        scores: Sequence[float],
        types: Sequence[int],
        *,
        bos_id: int = 2,
        eos_id: int = 1,
        unk_id: int = 3,
        pad_id: int = 0,
    ) -> Tokenizer:
        """Build the exact llama.cpp SPM tokenization as a `tokenizers` BPE model (~2 s)."""
        if not (len(tokens) == len(scores) == len(types)):
            raise ValueError("GGUF vocab: tokens, scores and token types differ in length")
        types = list(types)
        for tid in (START_OF_TURN, END_OF_TURN):  # some files mark these normal
            if tid < len(tokens) and tokens[tid] in ("<start_of_turn>", "<end_of_turn>"):
                types[tid] = CONTROL
        normal = {t for t, ty in zip(tokens, types, strict=True) if ty == NORMAL}
        merges: list[tuple[float, int, str, str]] = []
        for i, t in enumerate(tokens):
            if types[i] != NORMAL or len(t) < 2:
                continue
            for k in range(1, len(t)):
                a, b = t[:k], t[k:]
                if a in normal and b in normal:
                    merges.append((-float(scores[i]), i, a, b))
        merges.sort(key=lambda m: (m[0], m[1]))
        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ValueError("GGUF vocab has duplicate pieces")
        bpe = models.BPE(
            vocab=vocab,
            merges=[(a, b) for _, _, a, b in merges],
            byte_fallback=True,
            unk_token=tokens[unk_id],
            fuse_unk=False,
        )
        hf = HFTokenizer(bpe)
        hf.normalizer = normalizers.Replace(" ", "▁")
        hf.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        )
        user = [t for t, ty in zip(tokens, types, strict=True) if ty == USER_DEFINED]
        control = [t for t, ty in zip(tokens, types, strict=True) if ty in (CONTROL, UNKNOWN)]
        hf.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
        hf.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
        specials = [i for i, ty in enumerate(types) if ty in (CONTROL, UNKNOWN, UNUSED)]
        stops = {eos_id} | ({END_OF_TURN} if END_OF_TURN < len(tokens) else set())
        return cls(hf, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, unk_id=unk_id,
                   special_ids=specials, stop_ids=stops)

    @classmethod
    def from_gguf(cls, path: str | Path, reader: Any = None) -> Tokenizer:
        """Build from a GGUF file's vocab fields (pass an open `gguf.GGUFReader` to reuse it)."""
        from gguf import GGUFReader

        try:
            fields = (reader or GGUFReader(path)).fields
            f = fields["tokenizer.ggml.tokens"]
            tokens = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
            fs, ft = fields["tokenizer.ggml.scores"], fields["tokenizer.ggml.token_type"]
            scores = [float(fs.parts[i][0]) for i in fs.data]
            types = [int(ft.parts[i][0]) for i in ft.data]
        except (KeyError, ValueError, OSError) as e:
            raise ValueError(f"{path}: no usable tokenizer vocab ({e})") from e

        def scalar(key: str, default: int) -> int:
            field = fields.get(key)
            return int(field.contents()) if field is not None else default

        return cls.from_gguf_vocab(
            tokens, scores, types,
            bos_id=scalar("tokenizer.ggml.bos_token_id", 2),
            eos_id=scalar("tokenizer.ggml.eos_token_id", 1),
            unk_id=scalar("tokenizer.ggml.unknown_token_id", 3),
            pad_id=scalar("tokenizer.ggml.padding_token_id", 0),
        )

    @classmethod
    def from_hf_tokenizer_json(
        cls,
        path: Path,
        *,
        bos_id: int,
        eos_ids: Iterable[int],
        pad_id: int = 0,
        unk_id: int = 3,
    ) -> Tokenizer:
        """A Hugging Face checkpoint's own tokenizer.json (the ground truth there)."""
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from e
        specials = {int(i) for i, t in hf.get_added_tokens_decoder().items() if t.special}
        return cls(hf, bos_id=bos_id, eos_id=next(iter(eos_ids), 1), pad_id=pad_id,
                   unk_id=unk_id, special_ids=specials, stop_ids=eos_ids, line_split=False)

    @classmethod
    def load(cls, directory: Path) -> Tokenizer:
        """Load what `save` wrote; ValueError naming the path if missing or corrupt."""
        meta_path = directory / META_FILE
        try:
            meta = json.loads(meta_path.read_text())
            hf = HFTokenizer.from_file(str(directory / "tokenizer.json"))
            return cls(
                hf,
                bos_id=int(meta["bos_id"]),
                eos_id=int(meta["eos_id"]),
                pad_id=int(meta["pad_id"]),
                unk_id=int(meta["unk_id"]),
                special_ids=[int(i) for i in meta["special_ids"]],
                stop_ids=[int(i) for i in meta["stop_ids"]],
                line_split=bool(meta.get("line_split", False)),
            )
        except Exception as e:  # OSError, JSON errors, tokenizers' own exceptions
            raise ValueError(f"{directory}: missing or corrupt tokenizer files ({e})") from e

    def save(self, directory: Path) -> None:
        """Write tokenizer.json and the special-id sidecar, each atomically."""
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "unk_id": self.unk_id,
            "special_ids": sorted(self.special_ids),
            "stop_ids": sorted(self.stop_ids),
            "line_split": self.line_split,
        }
        _atomic_write(directory / "tokenizer.json", _compact_merges(self.hf.to_str(pretty=False)))
        _atomic_write(directory / META_FILE, json.dumps(meta))

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text` (control tokens written in the text are recognised)."""
        ids = [self.bos_id] if add_bos else []
        if not text:
            return ids
        if self.line_split and len(text) > 4096:
            lines = _LINE_START.split(text)
            step = -(-len(lines) // _PIECES)
            pieces = ["".join(lines[i : i + step]) for i in range(0, len(lines), step)]
            for enc in self.hf.encode_batch_fast(pieces, add_special_tokens=False):
                ids.extend(enc.ids)
        else:
            ids.extend(self.hf.encode(text, add_special_tokens=False).ids)
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD."""
        return self.token_bytes_of(ids, skip_special).decode("utf-8", errors="replace")

    def token_bytes_of(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        return b"".join(
            self.token_bytes(i) for i in ids if not (skip_special and i in self.special_ids)
        )

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for ('▁' -> space, <0xNN> -> that byte)."""
        b = self._bytes.get(token_id)
        if b is None:
            piece = self.id_to_piece(token_id)
            m = _BYTE_PIECE.match(piece)
            if m and token_id not in self.special_ids:
                b = bytes([int(m.group(1), 16)])
            else:
                b = piece.replace("▁", " ").encode("utf-8")
            self._bytes[token_id] = b
        return b

    def max_token_bytes(self) -> int:
        """The most text bytes one token can cover: a prompt longer than the context times
        this cannot fit, which is known before tokenizing it."""
        if self._max_bytes == 0:
            self._max_bytes = max(len(p.replace("▁", " ").encode("utf-8"))
                                  for p in self.hf.get_vocab(with_added_tokens=True))
        return self._max_bytes

    def id_to_piece(self, token_id: int) -> str:
        piece = self.hf.id_to_token(token_id)
        if piece is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary ({self.vocab_size})")
        return piece

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids


class IncrementalDecoder:
    """Feeds generated ids one at a time and returns only complete UTF-8 text."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._pending = b""

    def push(self, token_id: int) -> str:
        """Text newly completed by this token ('' while a multi-byte character is pending)."""
        if self.skip_special and self.tokenizer.is_special(token_id):
            return ""
        data = self._pending + self.tokenizer.token_bytes(token_id)
        cut = _complete_prefix_len(data)
        self._pending = data[cut:]
        return data[:cut].decode("utf-8", errors="replace")

    def flush(self) -> str:
        """Whatever bytes remain, decoded with replacement characters."""
        out = self._pending.decode("utf-8", errors="replace")
        self._pending = b""
        return out


def _complete_prefix_len(data: bytes) -> int:
    """Length of `data` without a trailing incomplete (but so far valid) UTF-8 sequence."""
    n = len(data)
    for back in range(1, min(4, n) + 1):
        lead = data[n - back]
        if lead & 0xC0 == 0x80:  # continuation byte: keep looking for the lead
            continue
        need = 2 if lead & 0xE0 == 0xC0 else 3 if lead & 0xF0 == 0xE0 else \
            4 if lead & 0xF8 == 0xF0 else 1
        return n - back if need > back else n
    return n  # only continuation bytes: invalid anyway, release them


def _compact_merges(tokenizer_json: str) -> str:
    """Write BPE merges as "a b" strings instead of ["a", "b"] pairs: `tokenizers` parses
    the 514k merges of the Gemma vocab in 0.6 s instead of 0.9 s (the warm start's largest
    cost). Only when no piece holds a space, the string form's separator."""
    data = json.loads(tokenizer_json)
    merges = data.get("model", {}).get("merges")
    if not merges or not isinstance(merges[0], list):
        return tokenizer_json
    if any(" " in a or " " in b for a, b in merges):
        return tokenizer_json
    data["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    return json.dumps(data, ensure_ascii=False)


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
