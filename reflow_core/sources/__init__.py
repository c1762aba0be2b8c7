"""Text sources by name: what `prepare` turns into token files (:mod:`reflow_core.data`).

Plain sources (tiny, wiki-offline, openwebtext, local:<path>) are in :mod:`~reflow_core.sources.documents`; the two
offline mixes (smoke-mix, small-mix) and their components in :mod:`~reflow_core.sources.mix`, Austen's novels through
an R data reader in :mod:`~reflow_core.sources.rdata`.
"""

from __future__ import annotations

from pathlib import Path

from reflow_core.errors import InvalidArgumentError
from reflow_core.sources.documents import (DEFAULT_SEED, DEFAULT_VAL_FRACTION, OPENWEBTEXT_SEED,
                                           OPENWEBTEXT_VAL_FRACTION, TEXT_UNITS, TINY_CORPUS, Corpus, CorpusError,
                                           CorpusNotFoundError, DatasetLoader, _documents_dataset, load_local,
                                           load_openwebtext, non_empty, wiki_offline_texts)
from reflow_core.sources.mix import MIXES, load_mix

__all__ = ["DEFAULT_SEED", "DEFAULT_VAL_FRACTION", "OPENWEBTEXT_SEED", "OPENWEBTEXT_VAL_FRACTION", "TEXT_UNITS",
           "NAMED_SOURCES", "SOURCES", "Corpus", "CorpusError", "CorpusNotFoundError", "DatasetLoader", "load_corpus",
           "load_local", "load_openwebtext", "load_mix", "non_empty", "wiki_offline_texts"]

NAMED_SOURCES = ("tiny", "wiki-offline", "smoke-mix", "small-mix", "openwebtext")
SOURCES = (*NAMED_SOURCES, "local:<path-or-glob>")


def load_corpus(
    source: str,
    *,
    seed: int = DEFAULT_SEED,
    num_proc: int = 1,
    text_unit: str = "paragraph",
    cache_dir: str | None = None,
    openwebtext_path: str | Path | None = None,
    dataset_loader: DatasetLoader | None = None,
) -> Corpus:
    """Resolve a source name to its documents (see the module docstring for the names)."""
    if source == "tiny":
        ds, detail = load_local(str(TINY_CORPUS), text_unit="paragraph", cache_dir=cache_dir)
        detail = {"file": detail["files"][0], "text_unit": "paragraph"}
        return Corpus(ds, detail)
    if source == "wiki-offline":
        texts, detail = wiki_offline_texts()
        return Corpus(_documents_dataset(texts), detail)
    if source in MIXES:
        ds, detail = load_mix(source, seed=seed)
        return Corpus(ds, detail, components=list(detail["components"]))
    if source == "openwebtext":
        ds, detail = load_openwebtext(num_proc=num_proc, openwebtext_path=openwebtext_path,
                                      dataset_loader=dataset_loader, cache_dir=cache_dir)
        return Corpus(ds, detail, val_fraction=OPENWEBTEXT_VAL_FRACTION, seed=OPENWEBTEXT_SEED)
    if source.startswith("local:"):
        ds, detail = load_local(source[len("local:"):], text_unit=text_unit, cache_dir=cache_dir)
        return Corpus(ds, detail)
    raise InvalidArgumentError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
