"""Which metrics the figures show: one ``Panel`` per PNG, with its curves and the caption under it in
report.md. ``RUN_PANELS`` overlay runs; ``STUDY_PANELS`` overlay settings (mean over seeds, std band)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from entroclip import metrics as names
from entroclip.report.quantities import Rows, probe_entropy_curve
from entroclip.runio import metric_series

#: A run's rows -> ``(steps, values)`` of one line, e.g. a logged metric.
Curve = Callable[[Rows], tuple[np.ndarray, np.ndarray]]


def _metric(name: str) -> Curve:
    """The curve of one logged metric."""
    return partial(metric_series, name=name)


@dataclass(frozen=True)
class Panel:
    """One PNG: the curves it overlays for every run or setting, and the caption under it in reports."""

    name: str
    title: str
    ylabel: str
    curves: tuple[tuple[str, Curve], ...]
    caption: str


COUNTERFACTUAL_CURVES = (
    ("cf_effect_low", _metric("entropy/cf_effect_low")),
    ("cf_effect_high", _metric("entropy/cf_effect_high")),
)
COUNTERFACTUAL_CAPTION = (
    "The counterfactual probe (`diagnostics.counterfactual_every`): the probe entropy after the update "
    "minus the probe entropy after the same update replayed from the same weights with clip-low "
    "(cf_effect_low) or clip-high (cf_effect_high) switched off; the measured effect of each clip on the "
    "whole model, beside the per-token first-order effect_low / effect_high, which overstate it where the "
    "positions share weights."
)

RUN_PANELS = (
    Panel(
        "entropy",
        "Policy entropy",
        "entropy (nats)",
        (
            ("rollout", _metric("entropy/rollout")),
            ("probe before update", _metric("entropy/probe_before")),
            ("probe after update", _metric("entropy/probe_after")),
            ("rollout, trace", _metric("entropy/trace")),
            ("rollout, answer", _metric("entropy/answer")),
        ),
        "Rollout entropy: the pre-update (sampling) policy, exact over the full vocabulary at the sampling "
        "temperature ({temperature}), averaged over the sampled response positions (on tasks with a "
        "reasoning trace also over the trace and the answer positions alone). Probe entropy: exact, full "
        "vocabulary, on the same fixed probe prompts and continuations at every step, measured with the "
        "policy just before and just after each update.",
    ),
    Panel(
        "clip_fractions",
        "Clip fractions",
        "fraction of response tokens",
        (
            ("clip-low", _metric(names.CLIP_LOW)),
            ("clip-high", _metric(names.CLIP_HIGH)),
            ("dual-clip", _metric(names.CLIP_DUAL)),
        ),
        "Sign-gated clip fractions over the update's response tokens: clip-low (A < 0, r < 1 - eps_low), "
        "clip-high (A > 0, r > 1 + eps_high), dual-clip (A < 0, r > c).",
    ),
    Panel(
        "attribution",
        "Entropy attribution (first order, per unit lr)",
        "entropy change per unit lr",
        (
            ("effect_low", _metric("entropy/effect_low")),
            ("effect_high", _metric("entropy/effect_high")),
            ("effect_dual", _metric("entropy/effect_dual")),
            ("effect_pos", _metric("entropy/effect_pos")),
            ("effect_neg", _metric("entropy/effect_neg")),
        ),
        "First-order entropy change per unit learning rate at the updated response tokens, each token "
        "treated as having its own logits (a per-token proxy): effect_low/high/dual is the change caused "
        "by clipping those tokens (theory, for advantages independent of the action: effect_low >= 0, "
        "effect_high <= 0 in expectation), effect_pos/neg the change from the unclipped A > 0 / A < 0 "
        "tokens.",
    ),
    Panel(
        "counterfactual",
        "Counterfactual clip effects (nats per update)",
        "entropy change per update (nats)",
        COUNTERFACTUAL_CURVES,
        COUNTERFACTUAL_CAPTION,
    ),
    Panel(
        "reward",
        "Reward",
        "mean reward",
        (("reward/mean", _metric("reward/mean")),),
        "Mean reward of the rollout batch sampled by the pre-update policy.",
    ),
    Panel(
        "pass_at_k",
        "Held-out pass@k",
        "pass rate",
        (("pass@1", _metric("eval/pass@1")), ("pass@k", _metric("eval/pass@k"))),
        "pass@1 and unbiased pass@k on held-out prompts at the evaluation steps (k: see the runs table).",
    ),
    Panel(
        "ratio",
        "Importance ratio r = pi_new / pi_old",
        "ratio",
        (
            ("mean", _metric(names.RATIO_MEAN)),
            ("min", _metric(names.RATIO_MIN)),
            ("max", _metric(names.RATIO_MAX)),
        ),
        "Importance ratios over the update's response tokens (mean, min and max over all minibatches).",
    ),
)

STUDY_PANELS = (
    Panel(
        "probe_entropy",
        "Probe entropy per setting",
        "entropy (nats)",
        (("probe entropy", probe_entropy_curve),),
        "Probe entropy (exact, full vocabulary, the same fixed probe prompts and continuations throughout): "
        "mean over seeds (line) and one standard deviation across seeds (band); step 0 is the policy before "
        "the first update, step s the policy after update s.",
    ),
    Panel(
        "rollout_entropy",
        "Rollout entropy per setting",
        "entropy (nats)",
        (("rollout entropy", _metric("entropy/rollout")), ("target", _metric("control/target"))),
        "Rollout entropy (exact, full vocabulary, at the sampling temperature, {temperature}) of the policy "
        "that sampled each step's batch, over its response tokens; the quantity the controllers hold (their "
        "target dashed). Mean over seeds (line), one standard deviation across seeds (band).",
    ),
    Panel(
        "trace_answer_entropy",
        "Rollout entropy of the trace and of the answer per setting",
        "entropy (nats)",
        (("trace", _metric("entropy/trace")), ("answer", _metric("entropy/answer"))),
        "Rollout entropy (as above) over the reasoning-trace positions, which the reward does not read, and "
        "over the answer positions alone (tasks with a trace): mean over seeds (line), one standard "
        "deviation across seeds (band).",
    ),
    Panel(
        "clip_fractions",
        "Clip fractions per setting",
        "fraction of response tokens",
        (("clip-low", _metric(names.CLIP_LOW)), ("clip-high", _metric(names.CLIP_HIGH))),
        "Sign-gated clip-low and clip-high fractions of the update's response tokens: mean over seeds (line) "
        "and one standard deviation across seeds (band).",
    ),
    Panel(
        "clip_effects",
        "First-order clip effects per setting (per unit lr)",
        "entropy change per unit lr",
        (("effect_low", _metric("entropy/effect_low")), ("effect_high", _metric("entropy/effect_high"))),
        "First-order entropy change per unit learning rate caused by clip-low (effect_low) and clip-high "
        "(effect_high), each token treated as having its own logits: mean over seeds (line), one standard "
        "deviation (band). The counterfactual panel below measures the same two effects on the model.",
    ),
    Panel(
        "counterfactual",
        "Counterfactual clip effects per setting (nats per update)",
        "entropy change per update (nats)",
        COUNTERFACTUAL_CURVES,
        COUNTERFACTUAL_CAPTION + " Mean over seeds (line), one standard deviation (band).",
    ),
    Panel(
        "reward",
        "Reward per setting",
        "mean reward",
        (("reward", _metric("reward/mean")),),
        "Mean reward of each step's rollout batch: mean over seeds (line), one standard deviation (band).",
    ),
    Panel(
        "pass_at_1",
        "Held-out pass@1 per setting",
        "pass@1",
        (("pass@1", _metric("eval/pass@1")),),
        "pass@1 on held-out prompts at the evaluation steps: mean over seeds, one standard deviation (band).",
    ),
    Panel(
        "pass_at_k",
        "Held-out pass@k per setting",
        "pass@k",
        (("pass@k", _metric("eval/pass@k")),),
        "Unbiased pass@k on held-out prompts at the evaluation steps: mean over seeds, one standard "
        "deviation across seeds (band).",
    ),
    Panel(
        "eps_low",
        "eps_low per setting",
        "eps_low",
        (("eps_low", _metric("control/eps_low")),),
        "The clip-low bound each step's update used (moved by the clip_low controller, fixed otherwise).",
    ),
    Panel(
        "entropy_coef",
        "Entropy-bonus coefficient per setting",
        "coefficient",
        (("entropy coef", _metric("control/entropy_coef")),),
        "The entropy-bonus coefficient each step's update used (adapted by the entropy_bonus controller).",
    ),
)
