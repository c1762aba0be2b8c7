"""The book's stimuli, shipped as package data: word lists (``assets/words``) and prompts (``assets/prompts``),
with the single-token checks the experiments rely on.

Experiments that compare rows of per-token matrices need each word to be exactly one GPT-2 token:
:func:`check_tokens` returns the ids of the words that are and, for every word that is not, *why* it was dropped
(it splits into several tokens, or duplicates an earlier word), so a chapter can print what it measured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from typing import Iterable

from reflow_core import tokenizer


@lru_cache(maxsize=None)
def _read_words(name: str) -> str:
    return files("reflow_core").joinpath(f"assets/words/{name}.json").read_text()


def load_words(name: str) -> dict:
    """``assets/words/<name>.json`` (``categories``, ``analogies``, ``typos``) as a fresh dict."""
    return json.loads(_read_words(name))


@dataclass
class TokenCheck:
    """The outcome of checking a word list against the GPT-2 vocabulary."""

    ids: dict[str, int]  # word -> its single token id, in input order
    dropped: dict[str, str]  # word -> why it was dropped

    @property
    def words(self) -> list[str]:
        return list(self.ids)

    def report(self) -> str:
        if not self.dropped:
            return f"all {len(self.ids)} words are single GPT-2 tokens"
        why = "; ".join(f"{w!r}: {r}" for w, r in self.dropped.items())
        return f"{len(self.ids)} kept, {len(self.dropped)} dropped ({why})"


NOT_IN_VOCABULARY = "not in this model's vocabulary (its compact vocabulary has no row of its own for it)"


def check_tokens(words: Iterable[str], vocab=None) -> TokenCheck:
    """Keep the words that are exactly one GPT-2 token (and, given a model's ``vocab``, that have a row of their own
    in it); say why each other word is dropped.

    Mind the leading space: ``" king"`` (inside text) and ``"king"`` (start of text) are different tokens.
    """
    ids: dict[str, int] = {}
    dropped: dict[str, str] = {}
    seen: dict[int, str] = {}
    for w in words:
        if w in ids or w in dropped:  # the same word twice: judged once
            continue
        toks = tokenizer.encode(w)
        if len(toks) != 1:
            pieces = [tokenizer.decode([t]) for t in toks]
            dropped[w] = f"splits into {len(toks)} tokens {pieces}" if toks else "empty"
        elif toks[0] in seen:
            dropped[w] = f"same token as {seen[toks[0]]!r}"
        elif vocab is not None and not bool(vocab.has_own_row([toks[0]])[0]):
            dropped[w] = NOT_IN_VOCABULARY
        else:
            seen[toks[0]] = w
            ids[w] = toks[0]
    return TokenCheck(ids, dropped)


def category_ids(categories: dict[str, list[str]], vocab=None) -> tuple[dict[str, dict[str, int]], dict[str, str]]:
    """Single-token ids per category, and the dropped words (with why) over all categories (see :func:`check_tokens`).

    A word listed in two categories is kept in the first only (a row cannot carry two labels).
    """
    check = check_tokens((w for ws in categories.values() for w in ws), vocab)
    out: dict[str, dict[str, int]] = {}
    taken: set[str] = set()
    for cat, ws in categories.items():
        out[cat] = {w: check.ids[w] for w in ws if w in check.ids and w not in taken}
        taken.update(out[cat])
    return out, check.dropped


def word_token_ids(word: str) -> list[int]:
    """All token ids of ``word`` (for experiments that handle multi-token words explicitly)."""
    ids = tokenizer.encode(word)
    if not ids:
        raise ValueError(f"empty word {word!r}")
    return ids


def token_str(i: int) -> str:
    return tokenizer.decode([int(i)])


@lru_cache(maxsize=None)
def load_stimuli(name: str) -> dict:
    """``assets/prompts/<name>.json`` (``factual``, ``sentiment``, ``concepts``) as a dict."""
    return json.loads(files("reflow_core").joinpath(f"assets/prompts/{name}.json").read_text())


def token_ids(words: list[str], *, strict: bool = True, vocab=None) -> tuple[list[int], list[str]]:
    """Ids of ``words`` that are exactly one GPT-2 token (with a row of their own in a model's ``vocab``, if given),
    and the words that are not.

    ``strict=True`` raises when a word is dropped: the experiments compare single rows of per-token matrices, so a
    multi-token word (or one sharing a compact vocabulary's tail row) would silently measure something else.
    """
    check = check_tokens(words, vocab)
    if strict and check.dropped:
        raise ValueError("words the experiment cannot use: " + "; ".join(f"{w!r} {why}" for w, why in
                                                                           check.dropped.items()))
    return [check.ids[w] for w in words if w in check.ids], [w for w in words if w in check.dropped]


def sentiment_ids(vocab=None) -> tuple[list[int], list[int]]:
    """The positive and negative sentiment words' ids (those with rows of their own in a model's ``vocab``)."""
    s = load_stimuli("sentiment")
    return token_ids(s["positive"], strict=False, vocab=vocab)[0], token_ids(s["negative"], strict=False,
                                                                             vocab=vocab)[0]
