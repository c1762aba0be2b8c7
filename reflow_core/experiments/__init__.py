"""The experiments: each a function of a model (or a few) that returns a result with its null or baseline built in,
a plot of that result, and the scorecard rows it decides.  Chapters (:mod:`reflow_core.chapters`) compose them.

Helpers shared by all of them (vocabulary rows, cosine matrices, Gini, bootstrap and seed intervals, results over a
group of seeds) live in :mod:`~reflow_core.experiments.common`; word lists and prompts in :mod:`reflow_core.stimuli`;
reading and writing the residual stream in :mod:`reflow_core.hooks`.

The twelve experiments of the reFlow paper, by chapter:

A. Signal identity (``chapters.signal_identity``, notebook ``03``)
    1. Recipe Atlas — :mod:`~reflow_core.experiments.atlas`
    2. Sparsity Profile — :mod:`~reflow_core.experiments.sparsity`
    3. Basis Geometry — :mod:`~reflow_core.experiments.geometry`
B. Semantic properties (``chapters.semantic_properties``, ``04``)
    4. Semantic Galaxy — :mod:`~reflow_core.experiments.galaxy`
    5. Semantic Algebra — :mod:`~reflow_core.experiments.algebra` (also the Top-K collapse row)
    6. Typo Resilience — :mod:`~reflow_core.experiments.typo`
C. Mechanistic analysis (``chapters.mechanistic``, ``05``)
    7. Layer Evolution — :mod:`~reflow_core.experiments.evolution`
    8. Signal Flow — :mod:`~reflow_core.experiments.flow`
    9. Causal Ablation — :mod:`~reflow_core.experiments.ablation`
D. Control & steering (``chapters.steering``, ``06``)
    10. Emotion Surgery — :mod:`~reflow_core.experiments.emotion`
    11. Concept Inception — :mod:`~reflow_core.experiments.inception`
    12. Genetic Hijack — :mod:`~reflow_core.experiments.hijack`

The forum thread's follow-ups (``chapters.thread_followups``, ``09``): the crystallisation boundary under context
length — :mod:`~reflow_core.experiments.boundary`; the hidden-state loop monitor against an n-gram rule —
:mod:`~reflow_core.experiments.loop_monitor`.  Hard vs soft sparsity (``08``) and the post-hoc SAE / SAE+NFM
comparison (``07``) are chapter modules of their own (:mod:`reflow_core.chapters.sparsity_variants`,
:mod:`reflow_core.chapters.posthoc`) over the vocabularies of :mod:`reflow_core.vocab` and the SAE library
:mod:`reflow_core.sae`.
"""
