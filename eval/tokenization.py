"""Cached, special-token-aware tokenisation shared by scoring and generation.

The same prompts are scored at every checkpoint of a sequential-editing run, so encodings are memoised
per tokenizer object (weakly, so a dropped tokenizer frees its cache). Padding is done by the callers
from these id lists, so the caller's tokenizer (``padding_side``, ``pad_token``) is never modified.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any

__all__ = ["clear_cache", "encode", "pad_id", "special_affixes"]

_MAX_ENTRIES = 200_000  # per tokenizer; a CounterFact run over 10k cases needs ~250k strings at most


class _LRU(OrderedDict):
    def get_or(self, key: Any, make):  # small LRU: move hits to the end, evict from the front
        try:
            self.move_to_end(key)
            return self[key]
        except KeyError:
            value = self[key] = make()
            if len(self) > _MAX_ENTRIES:
                self.popitem(last=False)
            return value


_caches: "weakref.WeakKeyDictionary[Any, _LRU]" = weakref.WeakKeyDictionary()
_uncacheable: dict[int, _LRU] = {}  # tokenizers that refuse weak references (rare); keyed on id()


def _cache_for(tok: Any) -> _LRU:
    try:
        cache = _caches.get(tok)
        if cache is None:
            cache = _caches[tok] = _LRU()
        return cache
    except TypeError:
        return _uncacheable.setdefault(id(tok), _LRU())


def clear_cache() -> None:
    """Forget all memoised encodings (e.g. after adding tokens to a tokenizer)."""
    _caches.clear()
    _uncacheable.clear()


def encode(tok: Any, text: str, add_special_tokens: bool = True) -> tuple[int, ...]:
    """Token ids of ``text`` (with the tokenizer's BOS/EOS if ``add_special_tokens``), memoised."""
    return _cache_for(tok).get_or(
        (text, add_special_tokens),
        lambda: tuple(tok(text, add_special_tokens=add_special_tokens)["input_ids"]),
    )


def special_affixes(tok: Any) -> tuple[int, int]:
    """How many special tokens the tokenizer puts before and after a text (e.g. (1, 0) for a BOS-only LLaMA)."""
    def compute() -> tuple[int, int]:
        probe = "hello world"
        with_sp = list(encode(tok, probe, True))
        plain = list(encode(tok, probe, False))
        n = len(plain)
        for start in range(len(with_sp) - n + 1):
            if with_sp[start:start + n] == plain:
                return start, len(with_sp) - start - n
        return 0, 0  # post-processor rewrites the text tokens: assume no affixes
    return _cache_for(tok).get_or(("__affixes__",), compute)


def pad_id(tok: Any) -> int:
    """Id used to fill padded positions: the pad token, else EOS, else 0 (masked out either way)."""
    for value in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
        if value is not None:
            return int(value)
    return 0
