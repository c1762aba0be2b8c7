"""The shipped GPT-2 tokenizer: right file, right ids, no network."""

import hashlib
import socket

import pytest
import tiktoken

from reflow_core import tokenizer as T


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket fails the test, so 'works offline' is checked, not assumed."""

    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer tried to use the network")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_rank_file_hash_matches_tiktoken_r50k():
    assert hashlib.sha256(T.RANK_FILE.read_bytes()).hexdigest() == T.RANK_FILE_SHA256
    assert T.RANK_FILE.stat().st_size == 835_554


def test_known_ids_and_sizes(no_network):
    enc = T.load_encoding()  # a fresh build, not the cached one: the build itself must be offline
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert T.encode("Hello world") == [15496, 995]
    assert enc.n_vocab == T.VOCAB_SIZE == 50257
    assert enc.eot_token == T.EOT_TOKEN == 50256
    assert T.PADDED_VOCAB_SIZE % 64 == 0 and T.PADDED_VOCAB_SIZE >= T.VOCAB_SIZE
    # a few more ids anyone can check against GPT-2: " the" and "," and the leading-space convention
    assert T.encode(" the,") == [262, 11]
    assert T.encode("The") != T.encode(" The")


def test_special_token_text_is_ordinary():
    ids = T.encode("a<|endoftext|>b")
    assert T.EOT_TOKEN not in ids
    assert T.decode(ids) == "a<|endoftext|>b"


UNICODE_SAMPLES = ["Héllo wörld — naïve café", "日本語のテキスト", "emoji 🤖🚀 and\ttabs\n\nnewlines", ""]


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_unicode_round_trip(text):
    assert T.decode(T.encode(text)) == text


def test_decode_accepts_arrays():
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    ids = T.encode("Paris is the capital of France.")
    assert T.decode(np.array(ids, dtype=np.uint16)) == T.decode(torch.tensor(ids)) == "Paris is the capital of France."


def test_corrupted_rank_file_refused(tmp_path):
    data = bytearray(T.RANK_FILE.read_bytes())
    data[100] ^= 0x01  # one flipped bit
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(bytes(data))
    with pytest.raises(T.TokenizerFileError, match="sha256"):
        T.load_encoding(bad)
    with pytest.raises(T.TokenizerFileError, match="not found"):
        T.load_encoding(tmp_path / "missing.tiktoken")


def test_intact_copy_accepted(tmp_path):
    good = tmp_path / "gpt2.tiktoken"
    good.write_bytes(T.RANK_FILE.read_bytes())
    assert T.load_encoding(good).encode_ordinary("Hello world") == [15496, 995]


def test_does_not_use_tiktoken_registry(monkeypatch):
    """get_encoding must never fall through to tiktoken.get_encoding (which downloads)."""
    T.get_encoding.cache_clear()

    def refuse(name):
        raise AssertionError("tiktoken.get_encoding called")

    monkeypatch.setattr(tiktoken, "get_encoding", refuse)
    try:
        assert T.get_encoding().name == "gpt2"
    finally:
        T.get_encoding.cache_clear()


def test_single_token_id():
    king = T.single_token_id(" king")
    assert isinstance(king, int) and T.decode([king]) == " king"
    assert T.single_token_id(" antidisestablishmentarianism") is None
    assert T.single_token_id("") is None
    assert T.single_token_id(" king") != T.single_token_id("king")  # the leading space matters
