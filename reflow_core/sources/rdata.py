"""Jane Austen's novels, read from the R package janeaustenr's data (Debian r-cran-janeaustenr) by a small reader of
R's serialization format: R itself is never run.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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
