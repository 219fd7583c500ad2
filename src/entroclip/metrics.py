"""The names of the metrics the update reports, defined once: the trainer, the objectives' ``stats``, the
framework adapters and the reports use these."""

from __future__ import annotations

#: sign-gated clip fractions over the update's response tokens (TRL's meaning)
CLIP_LOW = "clip_ratio/low_mean"
CLIP_HIGH = "clip_ratio/high_mean"
CLIP_REGION = "clip_ratio/region_mean"
CLIP_DUAL = "clip_ratio/dual_mean"
#: fraction of the tokens that Clip-Cov / KL-Cov selected
CLIP_COV = "clip_ratio/cov_mean"
#: fraction of the tokens above control.high_prob, which EntroPIC's token weights act on
LIKELY_TOKENS = "token_weight/likely_mean"
#: the importance ratio over the update's tokens
RATIO_MEAN = "ratio/mean"
RATIO_MIN = "ratio/min"
RATIO_MAX = "ratio/max"
LOSS_PG = "loss/pg"
LOSS_VALUE = "loss/value"
GRAD_NORM = "grad/norm"
OPTIMIZER_STEPS = "train/optimizer_steps"


def entropy_metric(key: str) -> str:
    """The metric of a first-order entropy effect (``effect_low`` -> ``entropy/effect_low``)."""
    return f"entropy/{key}"
