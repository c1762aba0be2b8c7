"""The twelve interpretability experiments of the reFlow paper, each against a null or a matched baseline.

Each module holds one experiment as a function (model in, result object out: the numbers, the data for its figure,
and the null/baseline numbers), a plot function that draws the figure from the result, and ``scorecard_rows`` that
turns results into the reproduction scorecard's rows.  Helpers shared by all of them — word lists, single-token
checks, vocabulary rows, cosine matrices, Gini, bootstrap and seed intervals, loading models at every seed — live in
:mod:`reflow_core.experiments.common`.

A. Signal identity (notebook ``03_signal_identity``)
    1. Recipe Atlas — :mod:`~reflow_core.experiments.atlas`
    2. Sparsity Profile — :mod:`~reflow_core.experiments.sparsity`
    3. Basis Geometry — :mod:`~reflow_core.experiments.geometry`
B. Semantic properties (notebook ``04_semantic_properties``)
    4. Semantic Galaxy — :mod:`~reflow_core.experiments.galaxy`
    5. Semantic Algebra — :mod:`~reflow_core.experiments.algebra`
    6. Typo Resilience — :mod:`~reflow_core.experiments.typo`
C. Mechanistic analysis (notebook ``05_mechanistic``)
    7. Layer Evolution — :mod:`~reflow_core.experiments.evolution`
    8. Signal Flow — :mod:`~reflow_core.experiments.flow`
    9. Causal Ablation — :mod:`~reflow_core.experiments.ablation`
D. Control & steering (notebook ``06_steering``)
    10. Emotion Surgery — :mod:`~reflow_core.experiments.emotion`
    11. Concept Inception — :mod:`~reflow_core.experiments.inception`
    12. Genetic Hijack — :mod:`~reflow_core.experiments.hijack`
"""
