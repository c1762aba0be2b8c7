"""Post-hoc interpretability on our own models: Top-K SAE, NFM, sequential and joint SAE+NFM, matched baselines.

One file per piece (SAELens-style; where we differ from SAELens, :mod:`topk` says so): :mod:`activations` (residual
vectors from a hook, held-out kept apart), :mod:`topk` (the SAE, aux-k), :mod:`nfm` (the factorization machine and the
control heads), :mod:`train` (every variant under the same budget), :mod:`metrics` (FVU, L0, dead and live latents,
spliced ΔCE/KL, decoder norms, contributions), :mod:`gates` (the positive controls of the SAE claims: competence,
planted interactions, planted norm modes), :mod:`factorial` (the 2×2 intervention with a two-way ANOVA) and
:mod:`native` (reFlow's signals vs the SAEs).
"""
