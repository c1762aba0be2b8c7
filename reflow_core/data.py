"""Prepared token files and batches.

`prepare` turns a text source (:mod:`reflow_core.sources`: tiny, wiki-offline, smoke-mix, small-mix, openwebtext,
local:<path>) into two flat token files (train.bin, val.bin: np.uint16 GPT-2 ids, every document followed by
<|endoftext|>) plus a manifest.json that `load_tokens` checks before anyone trains on the data. This is nanoGPT's
data/openwebtext/prepare.py generalised to the sources this project uses.

Splits are by document (a document never straddles train and val), seeded, through datasets'
Dataset.train_test_split, so a split is reproducible from (source, val_fraction, seed) alone.
A preparation is written in a temporary directory beside `out` and renamed into place at the end, with the manifest
written last: a preparation that crashes half-way leaves nothing at `out` that `load_tokens` would accept.  The
temporary directory is named `.<out>.preparing-<pid>-*`, so that the next preparation of the same `out` can remove
what a killed one left behind (its PID is dead) without touching one that is still running.

unigram_entropy gives the entropy of a prepared val split under its train split's unigram distribution: the loss a
model that learned only token frequencies reaches; most_frequent_ids the ids a compact vocabulary keeps.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from reflow_core.errors import InvalidArgumentError, UserError
from reflow_core.fileio import pid_alive, sha256_file, tree_bytes
from reflow_core.sources import (DEFAULT_SEED, DEFAULT_VAL_FRACTION, NAMED_SOURCES, OPENWEBTEXT_SEED,
                                 OPENWEBTEXT_VAL_FRACTION, SOURCES, TEXT_UNITS, CorpusError,
                                 DatasetLoader, load_corpus, non_empty)
from reflow_core.tokenizer import ENCODING_NAME, EOT_TOKEN, RANK_FILE_SHA256, VOCAB_SIZE, get_encoding

# --- prepared-data format ---------------------------------------------------------------------------------------------
FORMAT_VERSION = 1
TOKEN_DTYPE = np.uint16  # GPT-2 ids are < 50257 < 2**16, so two bytes per token (nanoGPT's choice)
SPLITS = ("train", "val")
MANIFEST_NAME = "manifest.json"
PREPARED_FILES = frozenset({"train.bin", "val.bin", MANIFEST_NAME})
SPLIT_FIELDS = frozenset({"file", "bytes", "tokens", "sha256"})  # what load_tokens reads of manifest["splits"][split]
HASH_VERIFY_MAX_BYTES = 100 * 2**20  # load_tokens hashes files up to this size by default (~0.3 s), else checks size


# --- splitting and tokenising ---------------------------------------------------------------------------------
DEFAULT_SOURCE = "wiki-offline"
TOKENIZE_BATCH_DOCS = 1000  # documents per datasets.map batch (tiktoken encodes a batch in threads)
WRITE_SHARDS = 1024  # nanoGPT writes each split in 1024 contiguous shards, so memory stays flat for 9B tokens
WRITE_MIN_DOCS_PER_SHARD = 1000  # ...but fewer for small splits: each shard costs ~2 ms of overhead
PROGRESS_MIN_DOCS = 5000  # show a tqdm bar for the write when a split has at least this many documents
PREPARE_COMMAND = "python -m reflow_core prepare --source {source} --out {out}"


class DatasetNotPreparedError(UserError, FileNotFoundError):
    """No finished preparation at a data directory (missing, half-written, or from an older format)."""


class DatasetIntegrityError(UserError, ValueError):
    """A prepared token file does not match its manifest (size or sha256)."""


class OutputNotReplaceableError(UserError, FileExistsError):
    """`out` is a file, or a folder holding something other than a prepared dataset."""




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
        docs = corpus.documents.filter(non_empty, batched=True, num_proc=nproc, desc="dropping empty documents")
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


def most_frequent_ids(tokens: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` most frequent GPT-2 ids of ``tokens``, most frequent first (ties: the smaller id first): the ids a
    compact vocabulary gives rows of their own."""
    counts = np.bincount(np.asarray(tokens), minlength=VOCAB_SIZE)[:VOCAB_SIZE]
    return np.lexsort((np.arange(counts.size), -counts))[:k].astype(np.int64)


def token_coverage(tokens: np.ndarray, ids: np.ndarray) -> float:
    """Share of ``tokens`` whose id is in ``ids``."""
    counts = np.bincount(np.asarray(tokens), minlength=VOCAB_SIZE)
    return float(counts[np.asarray(ids)].sum() / max(1, counts.sum()))


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
