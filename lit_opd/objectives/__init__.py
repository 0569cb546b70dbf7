"""The shared math of every method with a teacher: what turns a scored rollout into a loss.

* :mod:`~lit_opd.objectives.divergences`: per-token divergences between two distributions
  (generalized JSD, forward/reverse/skew KL, TVD), top-k with a tail bucket, masked reductions.
* :mod:`~lit_opd.objectives.sampled`: sampled-token objectives (reverse-KL reward, G-OPD
  extrapolation, importance sampling, PPO clip) on per-token log-probs.
* :mod:`~lit_opd.objectives.lean`: the memory-lean path — a divergence computed from hidden
  states and the output layer in chunks, its gradient fused in (no [B, T, V] logits).
* :mod:`~lit_opd.objectives.components`: the objectives a method is given (``Divergence``,
  ``SampledReward``), chosen in YAML by ``class_path``; :mod:`~lit_opd.objectives.paths` picks the
  logits or the hidden-state path for them, in one place.

All math functions are pure; method modules compose them and never re-derive a formula.
"""

from lit_opd.objectives.components import Divergence, Objective, SampledReward, TokenTerms

__all__ = ["Objective", "Divergence", "SampledReward", "TokenTerms"]
