"""Post-hoc interpretability on our own models: Top-K SAE, NFM, sequential and joint SAE+NFM, matched baselines.

One file per piece (SAELens-style): :mod:`activations` (residual vectors from a hook, held-out kept apart),
:mod:`topk` (the SAE), :mod:`nfm` (the factorization machine and the control heads), :mod:`train` (every variant under
the same budget), :mod:`metrics` (FVU, L0, dead latents, spliced ΔCE/KL, decoder norms, contributions),
:mod:`factorial` (the 2×2 intervention with a two-way ANOVA) and :mod:`native` (reFlow's signals vs the SAEs).
"""
