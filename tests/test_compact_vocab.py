"""A compact vocabulary: own rows for the corpus's K most frequent ids and one shared tail row, exposed in GPT-2 ids."""

import math

import numpy as np
import pytest
import torch

from reflow_core.config import ConfigError, get_config
from reflow_core.data import most_frequent_ids, token_coverage
from reflow_core.experiments import atlas
from reflow_core.experiments.common import own_mask, vocab_rows
from reflow_core.model import build_model
from reflow_core.stimuli import NOT_IN_VOCABULARY, check_tokens
from reflow_core.tokenizer import single_token_id

K = 64


def compact(family: str = "reflow", kept=None, seed: int = 0):
    torch.manual_seed(seed)
    m = build_model(get_config(f"{family}@test", compact_vocab=K, vocab_size=K + 1)).eval()
    kept = torch.arange(1000, 1000 + K) if kept is None else kept
    m.vocab.set_kept_ids(kept)
    return m


@pytest.mark.parametrize("family", ["reflow", "gpt2-new", "reflow-topk", "reflow-rmg"])
def test_the_distribution_over_gpt2_ids_is_proper_and_the_tail_shares_one_row(family):
    m = compact(family)
    x = torch.randint(0, 50257, (2, 9))
    logits, _ = m(x)
    assert logits.shape[-1] == 50257
    p = torch.softmax(logits.double(), -1)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 9, dtype=torch.float64), atol=1e-5, rtol=0)
    tail = logits[..., :1000]  # ids without rows of their own: all the same logit
    assert torch.allclose(tail, tail[..., :1].expand_as(tail))
    assert not torch.allclose(logits[..., 1000:1000 + K], logits[..., 1000:1001].expand(2, 9, K))


@pytest.mark.parametrize("family", ["reflow", "gpt2-new"])
def test_the_training_loss_over_rows_is_the_cross_entropy_over_gpt2_ids(family):
    m = compact(family)
    x = torch.randint(0, 50257, (3, 12))
    y = torch.cat([torch.randint(1000, 1000 + K, (3, 6)), torch.randint(0, 50257, (3, 6))], 1)  # own and tail
    y[0, 2] = -1
    logits, loss = m(x, y)
    _, fused = m(x, y, return_logits=False)
    torch.testing.assert_close(fused, loss, atol=1e-4, rtol=1e-5)
    fused.backward()
    weight = m.vocab.recipe if m.is_factored else m.vocab.weight
    assert (weight.grad[: K + 1].abs().sum(1) > 0).all()  # every own row and the tail row learn


def test_inputs_without_own_rows_read_the_tail_row():
    m = compact()
    emb = m.vocab.embed(torch.tensor([5, 7, 1000]))
    torch.testing.assert_close(emb[0], emb[1])  # two tail ids: the same vector
    assert not torch.allclose(emb[0], emb[2])


def test_kept_ids_are_validated_and_drive_the_id_map():
    m = compact()
    with pytest.raises(ValueError, match="distinct"):
        m.vocab.set_kept_ids(torch.zeros(K, dtype=torch.long))
    assert m.vocab.has_own_row([1000, 1063]).all() and not m.vocab.has_own_row([999, 1064]).any()
    assert int(own_mask(m).sum()) == K
    rows = vocab_rows(m)
    assert rows.shape[0] == 50257 and torch.equal(rows[0], rows[5])
    assert m.vocab.tail_log_size() == pytest.approx(math.log(50257 - K))


def test_config_refuses_a_vocabulary_too_small_for_its_rows():
    with pytest.raises(ConfigError, match="vocab_size"):
        get_config("reflow@test", compact_vocab=K, vocab_size=K)
    with pytest.raises(ConfigError, match="compact_vocab"):
        get_config("reflow@test", compact_vocab=60000)


def test_most_frequent_ids_and_coverage():
    tokens = np.array([5, 5, 5, 9, 9, 1, 7, 7, 7, 7], dtype=np.uint16)
    assert most_frequent_ids(tokens, 3).tolist() == [7, 5, 9]
    assert token_coverage(tokens, np.array([7, 5])) == pytest.approx(0.7)


def test_words_without_own_rows_are_reported_not_mapped():
    king = single_token_id(" king")
    ids = torch.tensor([king, *[single_token_id(w) for w in (" one", " two", " three", " four", " red", " blue")]])
    ids = torch.cat([ids, torch.tensor([i for i in range(2000, 2200) if i not in ids][: K - len(ids)])])
    m = compact(kept=ids)  # " king" and a few curated words get rows, " queen" does not
    check = check_tokens([" king", " queen"], m.vocab)
    assert list(check.ids) == [" king"] and check.dropped[" queen"] == NOT_IN_VOCABULARY
    r = atlas.recipe_atlas(m, n_vocab_neighbours=3, n_random_pairs=200)
    assert " queen" not in r.words and " queen" in r.dropped
    kept = set(ids.tolist())
    assert all(single_token_id(t) in kept for nbrs in r.vocab_neighbours.values() for t, _ in nbrs
               if single_token_id(t) is not None)


def test_a_compact_run_keeps_the_corpus_most_frequent_ids_and_reloads_them(tmp_path):
    from reflow_core import data
    from reflow_core.checkpoint import load_model
    from reflow_core.config import TrainConfig
    from reflow_core.train import train

    data.prepare("tiny", tmp_path / "tiny")
    cfg = TrainConfig(model="reflow@test", model_overrides={"compact_vocab": K, "vocab_size": K + 1},
                      data_dir=str(tmp_path / "tiny"), out_dir=str(tmp_path / "run"), max_steps=3, micro_batch_size=4,
                      block_size=32, warmup_steps=1, eval_interval=3, eval_batches=1, ckpt_interval=3, log_interval=1,
                      progress=False)
    summary = train(cfg)
    assert math.isfinite(summary["final_val_loss"])
    model, _ = load_model(tmp_path / "run")
    expected = most_frequent_ids(data.load_tokens(tmp_path / "tiny", "train"), K)
    assert model.vocab.kept_ids.tolist() == expected.tolist()
