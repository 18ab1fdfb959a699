"""Tokenizers: a byte-level one for the tiny embedded model, and Hugging Face tokenizer.json.

Both expose the same small interface used by the chat renderer and the data pipeline:
    encode(text) -> list[int]      special tokens written in the text become their ids
    decode(ids) -> str
    vocab_size, eos_id, pad_id, special(name) -> id

ByteTokenizer: ids 0..255 are the UTF-8 bytes, then the Qwen chat special tokens (SPECIALS) from 256;
vocab_size = 256 + len(SPECIALS) = 265, which fits the tiny preset's 512-token vocabulary.
"""

from __future__ import annotations

import json
import os
import re

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>",
            "<tool_response>", "</tool_response>", "<think>", "</think>")


class ByteTokenizer:
    name = "bytes"

    def __init__(self):
        self._special = {s: 256 + i for i, s in enumerate(SPECIALS)}
        self._inverse = {i: s for s, i in self._special.items()}
        self._split = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")

    @property
    def vocab_size(self) -> int:
        return 256 + len(SPECIALS)

    @property
    def eos_id(self) -> int:
        return self._special["<|endoftext|>"]

    @property
    def pad_id(self) -> int:
        return self._special["<|endoftext|>"]

    def special(self, token: str) -> int:
        if token not in self._special:
            raise KeyError(f"byte tokenizer has no special token {token!r}")
        return self._special[token]

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for part in self._split.split(text):
            if not part:
                continue
            if part in self._special:
                out.append(self._special[part])
            else:
                out.extend(part.encode("utf-8"))
        return out

    def decode(self, ids) -> str:
        buf = bytearray()
        parts = []
        for i in ids:
            i = int(i)
            if i < 256:
                buf.append(i)
            else:
                parts.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                parts.append(self._inverse.get(i, ""))
        parts.append(buf.decode("utf-8", errors="replace"))
        return "".join(parts)


class HFTokenizer:
    """A Hugging Face fast tokenizer from DIR/tokenizer.json (the `tokenizers` library; no
    transformers). Special tokens come from tokenizer.json's added tokens; eos from
    tokenizer_config.json's eos_token when present, else <|im_end|> / <|endoftext|>."""

    name = "hf"

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        from kat_jax import storage

        file = path if path.endswith(".json") else os.path.join(path, "tokenizer.json")
        if not storage.isfile(file):
            raise FileNotFoundError(f"{file}: no tokenizer.json")
        self.path = file
        self._tok = Tokenizer.from_str(storage.read_text(file))
        cfg_file = os.path.join(os.path.dirname(file), "tokenizer_config.json")
        cfg = {}
        if storage.isfile(cfg_file):
            cfg = json.loads(storage.read_text(cfg_file))
        eos = cfg.get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        pad = cfg.get("pad_token")
        if isinstance(pad, dict):
            pad = pad.get("content")
        self._eos = self._first_id([eos, "<|im_end|>", "<|endoftext|>", "</s>"], file, "eos")
        self._pad = self._first_id([pad, "<|endoftext|>"], file, "pad", default=self._eos)

    def _first_id(self, names, file, what, default=None) -> int:
        for n in names:
            if n and self._tok.token_to_id(n) is not None:
                return self._tok.token_to_id(n)
        if default is not None:
            return default
        raise ValueError(f"{file}: no {what} token among {[n for n in names if n]}")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    def special(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise KeyError(f"{self.path}: no token {token!r}")
        return i

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(spec: str):
    """'bytes' -> ByteTokenizer; a directory or tokenizer.json path -> HFTokenizer."""
    if spec in ("bytes", "byte", ""):
        return ByteTokenizer()
    from kat_jax import storage

    if spec.endswith(".json") or storage.isdir(spec):
        return HFTokenizer(spec)
    raise ValueError(f"data.tokenizer: {spec!r} is neither 'bytes' nor a tokenizer directory / "
                     "tokenizer.json")
