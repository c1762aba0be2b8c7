"""The vocabulary modules of the model family, by ``ModelConfig.vocab_style``.

``reflow_core.config.VOCAB_STYLES`` names the styles (configs are validated before any module is built);
:data:`VOCAB_MODULES` maps each of them to its class, and the two must agree (checked on import).
"""

from __future__ import annotations

from reflow_core.config import VOCAB_STYLES
from reflow_core.vocab.base import FactoredVocab, TiedVocab, TopKVocab, Vocab, head_costs
from reflow_core.vocab.gated import GatedVocab, RelativeMeanGatedVocab, RoutedVocab

VOCAB_MODULES: dict[str, type[Vocab]] = {
    "tied": TiedVocab,
    "factored": FactoredVocab,
    "topk": TopKVocab,
    "rmg": RelativeMeanGatedVocab,
    "routed": RoutedVocab,
}
assert tuple(VOCAB_MODULES) == VOCAB_STYLES, "config.VOCAB_STYLES and vocab.VOCAB_MODULES disagree"

__all__ = ["VOCAB_MODULES", "Vocab", "TiedVocab", "FactoredVocab", "TopKVocab", "GatedVocab",
           "RelativeMeanGatedVocab", "RoutedVocab", "head_costs"]
