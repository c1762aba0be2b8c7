"""GPT-2 BPE through tiktoken, with no network.

tiktoken.get_encoding("gpt2") downloads the rank file on first use, which fails on an offline machine (and on the GPU
machines this project is lent, which never have a network). So we ship the rank file ourselves
(reflow_core/assets/gpt2.tiktoken, MIT, from the openai-whisper source distribution), check it against the sha256 that
tiktoken itself expects for r50k_base (the GPT-2 vocabulary), and build the tiktoken.Encoding by hand.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from pathlib import Path

import tiktoken

from reflow_core.errors import UserError

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
RANK_FILE = ASSETS_DIR / "gpt2.tiktoken"
# tiktoken_ext/openai_public.py: r50k_base(expected_hash=...); the GPT-2 ranks in base64 "token rank" lines.
RANK_FILE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
ENCODING_NAME = "gpt2"

# The split regex of r50k_base/gpt2, copied from tiktoken_ext/openai_public.py (equivalent to the GPT-2 release's
# r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""", but faster).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

EOT_STRING = "<|endoftext|>"
EOT_TOKEN = 50256
VOCAB_SIZE = 50257  # 50,000 merges + 256 byte tokens + <|endoftext|>
PADDED_VOCAB_SIZE = 50304  # nanoGPT's convention: VOCAB_SIZE rounded up to a multiple of 64 for faster matmuls


class TokenizerFileError(UserError, RuntimeError):
    """The shipped GPT-2 rank file is missing, altered or unreadable."""


def load_encoding(rank_file: str | Path = RANK_FILE, expected_sha256: str = RANK_FILE_SHA256) -> tiktoken.Encoding:
    """Build the GPT-2 encoding from a local rank file after checking its hash.

    We parse the file ourselves rather than through tiktoken.load.load_tiktoken_bpe, because that helper goes through
    tiktoken's download cache (TIKTOKEN_CACHE_DIR) and we want a path that can only ever read this one local file.
    """
    rank_file = Path(rank_file)
    if not rank_file.is_file():
        raise TokenizerFileError(
            f"GPT-2 rank file not found at {rank_file}. It ships with reflow_core (assets/gpt2.tiktoken); "
            "reinstall the package (pip install -e .) to restore it."
        )
    contents = rank_file.read_bytes()
    actual = hashlib.sha256(contents).hexdigest()
    if actual != expected_sha256:
        raise TokenizerFileError(
            f"GPT-2 rank file {rank_file} has sha256 {actual}, expected {expected_sha256} (tiktoken's r50k_base hash). "
            "The file is corrupt or was replaced; restore it from the package (or from openai-whisper's "
            "whisper/assets/gpt2.tiktoken)."
        )
    mergeable_ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(contents.splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            mergeable_ranks[base64.b64decode(token)] = int(rank)
        except Exception as e:  # a hash match makes this unreachable, but say where if it ever happens
            raise TokenizerFileError(f"cannot parse line {line_no} of {rank_file}: {line[:80]!r}") from e
    return tiktoken.Encoding(
        name=ENCODING_NAME,
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=mergeable_ranks,
        special_tokens={EOT_STRING: EOT_TOKEN},
        explicit_n_vocab=VOCAB_SIZE,
    )


@functools.lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    """The shipped GPT-2 encoding, built once per process (hash check and parsing take ~0.1 s)."""
    return load_encoding()


def encode(text: str) -> list[int]:
    """Ordinary encoding: special-token strings in `text` are encoded as plain text, never as EOT."""
    return get_encoding().encode_ordinary(text)


def decode(ids) -> str:
    """Token ids (any iterable of ints: list, numpy array, 1-D tensor) back to text; invalid UTF-8 is replaced."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return get_encoding().decode(list(ids))


def single_token_id(word: str) -> int | None:
    """The id of `word` if it is exactly one GPT-2 token (mind the leading space: " king"), else None.

    Experiments on word lists (recipe atlas, algebra, galaxy) compare rows of per-token matrices, so a word that
    splits into several tokens has no single row and must be dropped or reported.
    """
    ids = encode(word)
    return ids[0] if len(ids) == 1 else None
