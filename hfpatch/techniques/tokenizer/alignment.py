"""Vocabulary alignment between an old and a new tokenizer.

Every token is reduced to a canonical form before comparing vocabularies:

- byte-level BPE pieces (GPT-2, SmolLM2, Qwen: `Ġworld`, `Ċ`) are mapped back to the bytes they stand for;
- SentencePiece pieces (Llama, Mistral, Gemma: `▁world`) have `▁` replaced by a space, and byte-fallback
  pieces `<0x0A>` become that one byte;
- special (added) tokens are compared by their text, and otherwise mapped by role (bos/eos/pad/unk).

Two tokens with the same canonical bytes are "shared": the new token gets the old token's rows
bit-for-bit. Every other new token gets a decomposition into old tokens (the old tokenizer's own
segmentation of its text; a greedy longest match over the old vocabulary's bytes when the text is not
valid UTF-8 on its own, e.g. a lone byte of a multi-byte character) which the initialisation methods use.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any

import torch

ROLES = ("bos", "eos", "pad", "unk")
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character -> byte table (the inverse of `bytes_to_unicode`)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _backend_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return {}
    try:
        return json.loads(backend.to_str())
    except Exception:  # pragma: no cover - a backend that cannot serialise itself
        return {}


def vocab_scheme(tokenizer) -> str:
    """"bytelevel" (GPT-2 style `Ġ`), "sentencepiece" (`▁`, maybe byte fallback) or "plain" (text as is)."""
    spec = json.dumps({k: _backend_json(tokenizer).get(k) for k in ("decoder", "pre_tokenizer")})
    if "ByteLevel" in spec:
        return "bytelevel"
    if "Metaspace" in spec or "\\u2581" in spec or "▁" in spec:
        return "sentencepiece"
    vocab = tokenizer.get_vocab()
    g = sum(1 for t in vocab if t.startswith("Ġ"))
    s = sum(1 for t in vocab if t.startswith("▁"))
    if max(g, s) < 0.01 * len(vocab):
        return "plain"
    return "bytelevel" if g > s else "sentencepiece"


def piece_bytes(piece: str, scheme: str) -> bytes | None:
    """The bytes a vocabulary piece stands for, or None when it cannot be read in this scheme."""
    if scheme == "bytelevel":
        table = _byte_decoder()
        try:
            return bytes(table[c] for c in piece)
        except KeyError:
            return None
    if scheme == "sentencepiece":
        m = _BYTE_FALLBACK.match(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.replace("▁", " ").encode("utf-8")
    return piece.encode("utf-8")


def special_tokens(tokenizer) -> dict[int, str]:
    """id -> text of the tokenizer's special tokens (added tokens marked special, and the role tokens)."""
    out: dict[int, str] = {}
    for idx, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(tok, "special", False):
            out[int(idx)] = str(tok.content)
    for role in ROLES:
        idx = getattr(tokenizer, f"{role}_token_id", None)
        if idx is not None:
            out[int(idx)] = tokenizer.convert_ids_to_tokens(int(idx))
    return out


def role_ids(tokenizer) -> dict[str, int]:
    """role -> token id for bos/eos/pad/unk where the tokenizer defines them."""
    roles = {}
    for role in ROLES:
        idx = getattr(tokenizer, f"{role}_token_id", None)
        if idx is not None:
            roles[role] = int(idx)
    return roles


def canonical_vocab(tokenizer) -> tuple[int, dict[int, Any]]:
    """(vocabulary size, id -> canonical key): bytes for text pieces, ("special", text) for special tokens."""
    scheme = vocab_scheme(tokenizer)
    specials = special_tokens(tokenizer)
    added = {int(i): t for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    vocab = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocab.values()) + 1)
    keys: dict[int, Any] = {}
    for piece, idx in vocab.items():
        if idx in specials:
            keys[idx] = ("special", specials[idx])
        elif idx in added:  # a non-special added token matches its literal text
            keys[idx] = str(added[idx].content).encode("utf-8")
        else:
            b = piece_bytes(piece, scheme)
            keys[idx] = b if b is not None else ("unreadable", piece)
    return size, keys


@dataclass
class Alignment:
    """How the new vocabulary relates to the old one.

    `shared_new[i]` and `shared_old[i]` are the ids of one token in both vocabularies (its rows are copied
    exactly); `pieces[new_id]` is the old-token decomposition of every other new token (empty when the
    token has no text, e.g. an unmatched special token); `new_bytes[new_id]` its bytes (None for specials).
    """

    old_size: int
    new_size: int
    shared_new: torch.Tensor
    shared_old: torch.Tensor
    pieces: dict[int, list[int]] = field(default_factory=dict)
    new_bytes: dict[int, bytes | None] = field(default_factory=dict)
    special_map: dict[int, int] = field(default_factory=dict)  # new special id -> old id (by text or role)
    old_schema: str = ""
    new_schema: str = ""
    old_bytes: dict[int, bytes] = field(default_factory=dict)  # old id -> bytes (text tokens only)
    old_specials: set[int] = field(default_factory=set)  # old special token ids

    @property
    def todo(self) -> list[int]:
        """New ids that need an initialisation (not shared), ascending."""
        return sorted(self.pieces)

    def summary(self) -> dict[str, Any]:
        unreadable = sum(1 for i in self.pieces if not self.pieces[i])
        return {"old_vocab": self.old_size, "new_vocab": self.new_size, "shared": int(self.shared_new.numel()),
                "initialised": len(self.pieces), "without_pieces": unreadable,
                "special_map": dict(self.special_map), "old_scheme": self.old_schema,
                "new_scheme": self.new_schema}


class _Decomposer:
    """Old-tokenizer decomposition of arbitrary bytes."""

    def __init__(self, tokenizer, keys: dict[int, Any]):
        self.tokenizer = tokenizer
        self.keys = keys
        self.by_bytes: dict[bytes, int] = {}
        for idx in sorted(keys):
            key = keys[idx]
            if isinstance(key, bytes) and key and key not in self.by_bytes:
                self.by_bytes[key] = idx
        self.max_len = max((len(b) for b in self.by_bytes), default=1)

    def greedy(self, data: bytes) -> list[int]:
        """Longest-match segmentation over the old vocabulary's bytes (unknown bytes are skipped)."""
        out, i = [], 0
        while i < len(data):
            for j in range(min(len(data), i + self.max_len), i, -1):
                idx = self.by_bytes.get(data[i:j])
                if idx is not None:
                    out.append(idx)
                    i = j
                    break
            else:
                i += 1
        return out

    def many(self, items: list[bytes]) -> list[list[int]]:
        texts, where = [], []
        result: list[list[int] | None] = [None] * len(items)
        for n, data in enumerate(items):
            try:
                texts.append(data.decode("utf-8"))
                where.append(n)
            except UnicodeDecodeError:
                result[n] = self.greedy(data)
        if texts:
            encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            for n, ids, text in zip(where, encoded, texts):
                # The old tokenizer's own segmentation, unless it changed the text (a SentencePiece dummy
                # prefix, normalisation): then the byte-exact greedy one.
                parts = [self._bytes(i) for i in ids]
                if None not in parts and b"".join(parts) == items[n]:
                    result[n] = list(ids)
                else:
                    result[n] = self.greedy(items[n])
        return [r or [] for r in result]

    def _bytes(self, idx: int) -> bytes | None:
        return self.keys.get(idx) if isinstance(self.keys.get(idx), bytes) else None


def align(old_tokenizer, new_tokenizer) -> Alignment:
    """Align two vocabularies: shared tokens by canonical bytes (and special tokens by text, then by role),
    and an old-token decomposition of every other new token."""
    old_size, old_keys = canonical_vocab(old_tokenizer)
    new_size, new_keys = canonical_vocab(new_tokenizer)
    old_by_key: dict[Any, int] = {}
    for idx in sorted(old_keys):
        old_by_key.setdefault(old_keys[idx], idx)

    shared: dict[int, int] = {}
    special_map: dict[int, int] = {}
    for idx, key in new_keys.items():
        old = old_by_key.get(key)
        if old is not None:
            shared[idx] = old
            if isinstance(key, tuple):
                special_map[idx] = old
    old_roles, new_roles = role_ids(old_tokenizer), role_ids(new_tokenizer)
    taken = set(special_map.values())
    for role in ROLES:  # special tokens without a same-text twin: by role
        new_id, old_id = new_roles.get(role), old_roles.get(role)
        if new_id is None or old_id is None or new_id in shared or old_id in taken:
            continue
        shared[new_id] = old_id
        special_map[new_id] = old_id
        taken.add(old_id)

    decomposer = _Decomposer(old_tokenizer, old_keys)
    todo = sorted(set(range(new_size)) - set(shared))
    todo_bytes = [new_keys.get(i) for i in todo]
    texts = [k if isinstance(k, bytes) else None for k in todo_bytes]
    readable = [(i, b) for i, b in zip(todo, texts) if b]
    decomposed = decomposer.many([b for _, b in readable]) if readable else []
    pieces = {i: [] for i in todo}
    pieces.update({i: d for (i, _), d in zip(readable, decomposed)})
    order = sorted(shared)
    return Alignment(
        old_size=old_size,
        new_size=new_size,
        shared_new=torch.tensor(order, dtype=torch.long),
        shared_old=torch.tensor([shared[i] for i in order], dtype=torch.long),
        pieces=pieces,
        new_bytes={i: b for i, b in zip(todo, texts)},
        special_map=special_map,
        old_schema=vocab_scheme(old_tokenizer),
        new_schema=vocab_scheme(new_tokenizer),
        old_bytes={i: k for i, k in old_keys.items() if isinstance(k, bytes)},
        old_specials={i for i, k in old_keys.items() if isinstance(k, tuple)},
    )
