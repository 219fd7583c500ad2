"""verl adapter: entroclip's losses as the verl policy losses ``entroclip``, ``entroclip_gspo``,
``entroclip_cispo`` and ``entroclip_sapo``.

Turn one on with ``actor_rollout_ref.actor.policy_loss.loss_mode=entroclip`` (or another of
``POLICY_LOSSES``) and load this module in verl's workers
(``actor_rollout_ref.model.external_lib=entroclip.integrations.verl``); see docs/integrations.md. Each is
the verl loss of the same name without the prefix, with verl's global-batch aggregation and
rollout-correction weights, computed by entroclip's ``loss.kind``:

- ``entroclip``: verl's ``vanilla`` (decoupled ``clip_ratio_low`` / ``clip_ratio_high``, dual-clip at
  ``clip_ratio_c``), kind ppo, :func:`entroclip.objectives.clipped_surrogate`;
- ``entroclip_gspo``, ``entroclip_cispo``: verl's ``gspo`` / ``cispo`` (bounds ``clip_ratio_low`` /
  ``clip_ratio_high``), :func:`entroclip.losses.gspo_loss` / :func:`entroclip.losses.cispo_loss`;
- ``entroclip_sapo``: verl's ``sapo`` (``tau_pos``, ``tau_neg``; always ``seq-mean-token-mean``),
  :func:`entroclip.losses.sapo_loss`.

It returns verl's ``actor/pg_clipfrac``, ``actor/ppo_kl`` and ``actor/pg_clipfrac_lower`` (dual-clip) with
the values of verl's own loss, and entroclip's metrics:

- ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean``, ``clip_ratio/dual_mean``,
  ``ratio/mean``: the kind's event fractions (PPO's sign-gated clip fractions; see
  :mod:`entroclip.losses`) and the mean of the ratio it bounds or gates, over the call's response tokens;
- ``entropy/npg_effect_*``: :func:`entroclip.entropy.clip_attribution`, for the other kinds their ledger
  (:func:`entroclip.losses.entropy_ledger`, with ``entropy/npg_effect_rescale``), with the natural-gradient
  sensitivity of :func:`entroclip.integrations.common.npg_kappa` (verl gives a policy loss log-probs only,
  not logits, so the exact logit-space kappa of ``entropy/effect_*`` cannot be formed here);
- ``entropy/rollout_mc``: mean of ``-log pi_old`` over the call's response tokens, a Monte-Carlo estimate
  of the rollout policy's entropy at the sampled positions;
- ``control/eps_low``, ``control/eps_high`` (and the controller's ``control/*`` when one is configured).

The settings (the entropy controller, attribution on/off) come from the YAML file named by the environment
variable ``ENTROCLIP_VERL_CONFIG`` (see configs/verl_entroclip.yaml), or from :func:`configure`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import yaml
from pydantic import Field, ValidationError, model_validator
from torch import Tensor

from entroclip import metrics as names
from entroclip.config import ConfigError, ControlConfig, LossConfig, Section
from entroclip.control import ControlAction, Controller, make_controller
from entroclip.integrations.common import (
    attribution_metrics,
    event_metrics,
    npg_kappa,
    weighted_advantages,
)
from entroclip.losses import PolicyLoss, PolicyLossKind
from entroclip.objectives import LOG_RATIO_LIMIT, Aggregation, SurrogateOutput, clipped_surrogate

LOSS_NAME = "entroclip"
CONFIG_ENV = "ENTROCLIP_VERL_CONFIG"
VERL_CONTROL_KINDS = ("static", "clip_low")
#: the kinds of entroclip.losses that verl has as a loss_mode of the same name
VerlKind = Literal["gspo", "cispo", "sapo"]
#: verl loss_mode -> the kind it runs; LOSS_NAME runs ppo (verl's vanilla)
KIND_LOSS_NAMES: dict[str, VerlKind] = {
    "entroclip_gspo": "gspo",
    "entroclip_cispo": "cispo",
    "entroclip_sapo": "sapo",
}


class ConfigLike(Protocol):
    """What the loss reads from verl's actor config (``ActorConfig`` or an OmegaConf ``DictConfig``)."""

    def get(self, key: str, default: Any = None) -> Any: ...


class VerlSettings(Section):
    """entroclip's side of a verl run: the entropy controller and the attribution metrics."""

    control: ControlConfig = Field(
        default_factory=ControlConfig, description="entropy controller; kind static or clip_low"
    )
    updates_per_step: int = Field(
        1,
        ge=1,
        description="optimizer updates per RL step (ppo_epochs * train_batch_size / ppo_mini_batch_size): "
        "the controller acts once per this many updates",
    )
    attribution: bool = Field(True, description="report entropy/npg_effect_* (one extra reduction per call)")

    @model_validator(mode="after")
    def _supported(self) -> VerlSettings:
        if self.control.kind not in VERL_CONTROL_KINDS:
            raise ValueError(
                f"control.kind={self.control.kind!r} is not available in the verl loss (one of "
                f"{VERL_CONTROL_KINDS}); verl's own loss_mode clip_cov / kl_cov and entropy_coeff cover "
                "the others"
            )
        return self


def load_settings(path: str | Path) -> VerlSettings:
    """Read and validate a settings YAML (ConfigError naming the file and the field when invalid)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    try:
        return VerlSettings.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{path}: {err}") from None


class VerlControl:
    """Worker-local clip-bound control for the verl loss.

    Every training call of the loss reports its tokens' ``-log pi_old`` (a Monte-Carlo estimate of the
    rollout entropy). An optimizer update ends when a rank has seen ``global_batch_size / dp_size``
    sequences (verl's ``global_batch_info``; without it, every call is one update). After every
    ``updates_per_step`` updates the controller acts on the entropy measured over them, and the next update
    uses its bounds; until the first measurement the configured bounds hold. Each data-parallel rank
    measures its own shard, so ranks agree up to sampling noise. The state is not part of verl's
    checkpoints: a resumed run starts the controller afresh.
    """

    def __init__(self, control: ControlConfig, updates_per_step: int = 1) -> None:
        self.config = control
        self.updates_per_step = updates_per_step
        self.controller: Controller | None = None
        self.action: ControlAction | None = None
        self.step = 0
        self.entropy: float | None = None
        self._rows = 0
        self._updates = 0
        self._entropy_sum = 0.0
        self._tokens = 0

    def bounds(self, eps_low: float, eps_high: float) -> tuple[float | None, float | None]:
        """The bounds of the current update; the first call fixes verl's configured ones as the reference."""
        if self.controller is None or self.action is None:
            self.controller = make_controller(self.config, LossConfig(eps_low=eps_low, eps_high=eps_high))
            self.action = self.controller.static_action()
        return self.action.eps_low, self.action.eps_high

    def observe(self, entropy_sum: float, tokens: int, rows: int, batch_info: dict[str, Any]) -> None:
        """Record one training call (sum of ``-log pi_old`` over its ``tokens``, ``rows`` sequences); at the
        end of a step's last update, let the controller act."""
        self._entropy_sum += entropy_sum
        self._tokens += tokens
        if not self._update_done(rows, batch_info):
            return
        self._updates += 1
        if self._updates % self.updates_per_step == 0 and self._tokens > 0:
            self._act()

    def _update_done(self, rows: int, batch_info: dict[str, Any]) -> bool:
        dp_size, global_batch = batch_info.get("dp_size"), batch_info.get("global_batch_size")
        if not dp_size or not global_batch:
            return True
        self._rows += rows
        if self._rows < int(global_batch) // int(dp_size):
            return False
        self._rows = 0
        return True

    def _act(self) -> None:
        assert self.controller is not None
        self.entropy = self._entropy_sum / self._tokens
        self.step += 1
        self.action = self.controller.act(self.step, self.entropy)
        self._entropy_sum, self._tokens = 0.0, 0

    def metrics(self) -> dict[str, float]:
        return self.controller.metrics() if self.controller is not None else {}


class _Runtime:
    """The process's settings and controller (verl calls the loss with its config only)."""

    settings: VerlSettings | None = None
    control: VerlControl | None = None


def configure(settings: VerlSettings | None = None) -> VerlControl | None:
    """Set this process's settings (default: from ``$ENTROCLIP_VERL_CONFIG``, else the defaults); returns
    the controller, None for static bounds."""
    if settings is None:
        path = os.environ.get(CONFIG_ENV)
        settings = load_settings(path) if path else VerlSettings()
    _Runtime.settings = settings
    dynamic = settings.control.kind != "static"
    _Runtime.control = VerlControl(settings.control, settings.updates_per_step) if dynamic else None
    return _Runtime.control


def _settings() -> VerlSettings:
    if _Runtime.settings is None:
        configure()
    assert _Runtime.settings is not None
    return _Runtime.settings


def verl_bounds(config: ConfigLike) -> tuple[float, float, float]:
    """(eps_low, eps_high, dual-clip c) as verl's vanilla loss reads them from the actor config."""
    clip = config.get("clip_ratio", 0.2)
    low, high = config.get("clip_ratio_low"), config.get("clip_ratio_high")
    return (
        float(clip if low is None else low),
        float(clip if high is None else high),
        float(config.get("clip_ratio_c", 3.0)),
    )


def verl_aggregation(
    mask: Tensor, loss_agg_mode: str, batch_info: dict[str, Any]
) -> tuple[Aggregation, int | None, float]:
    """entroclip's (agg, max_len) for verl's ``loss_agg_mode``, and the factor that turns the call's loss
    into verl's share of the global-batch loss (``dp_size``, ``batch_num_tokens``, ``global_batch_size``,
    ``loss_scale_factor`` from ``config.global_batch_info``; absent: this call is the whole batch)."""
    dp_size = float(batch_info.get("dp_size") or 1)
    valid = mask.bool()
    if loss_agg_mode == "token-mean":
        total = batch_info.get("batch_num_tokens")
        local = float(valid.sum())
        return "token-mean", None, dp_size * (local / float(total) if total is not None else 1.0)
    sequences = float((valid.sum(-1) > 0).sum())
    if loss_agg_mode == "token-sum":
        return "seq-mean-token-sum", None, dp_size * sequences
    global_batch = batch_info.get("global_batch_size")
    factor = dp_size * (sequences / float(global_batch) if global_batch is not None else 1.0)
    if loss_agg_mode == "seq-mean-token-sum-norm":
        return "seq-mean-token-sum-norm", int(batch_info.get("loss_scale_factor") or mask.shape[-1]), factor
    if loss_agg_mode == "seq-mean-token-sum":
        return "seq-mean-token-sum", None, factor
    if loss_agg_mode == "seq-mean-token-mean":
        return "seq-mean-token-mean", None, factor
    raise ValueError(f"unsupported loss_agg_mode {loss_agg_mode!r}")


def _logp_totals(log_prob: Tensor, old_log_prob: Tensor, mask: Tensor) -> tuple[float, float, int]:
    """(verl's ``actor/ppo_kl``: mean log(pi_old / pi_theta); sum of ``-log pi_old``; valid tokens)."""
    valid = mask.bool()
    log_ratio = (log_prob.detach().float() - old_log_prob.float()).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    tokens = valid.sum().float()
    kl_sum = -torch.where(valid, log_ratio, 0.0).sum()
    neg_logp_old = -torch.where(valid, old_log_prob.float(), 0.0).sum()
    kl_sum, neg_logp_old, tokens = torch.stack([kl_sum, neg_logp_old, tokens]).tolist()
    return kl_sum / max(tokens, 1.0), neg_logp_old, int(tokens)


def _bound_metrics(eps_low: float | None, eps_high: float | None) -> dict[str, float]:
    """``control/eps_low`` / ``control/eps_high`` of the bounds in force (a side that is off is left out)."""
    bounds = {"control/eps_low": eps_low, "control/eps_high": eps_high}
    return {key: value for key, value in bounds.items() if value is not None}


def _kind_loss(
    kind: VerlKind | None,
    config: ConfigLike,
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    mask: Tensor,
    bounds: tuple[float | None, float | None, float],
    agg: Aggregation,
    max_len: int | None,
) -> SurrogateOutput | PolicyLoss:
    """The output of ``kind`` (None: ppo) on ``[B, T]`` inputs; ``bounds``: (eps_low, eps_high, dual c)."""
    low, high, dual_clip = bounds
    if kind is None:
        return clipped_surrogate(log_prob, old_log_prob, advantages, mask, low, high, dual_clip, agg, max_len)
    loss = PolicyLossKind(kind, float(config.get("tau_pos", 1.0)), float(config.get("tau_neg", 1.05)))
    # verl's gspo and cispo have no dual-clip
    return loss(log_prob, old_log_prob, advantages, mask, low, high, None, agg, max_len)


def entroclip_policy_loss(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config: ConfigLike | None = None,
    rollout_is_weights: Tensor | None = None,
    *,
    kind: VerlKind | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """verl policy loss (``register_policy_loss`` signature, tensors ``[B, T]``): entroclip's ``kind`` as
    verl's loss of that name (None: ppo, as verl's ``vanilla``) and its metrics."""
    if config is None:
        raise ValueError("the entroclip policy loss needs verl's actor config")
    settings, control = _settings(), _Runtime.control
    if control is not None and kind is not None:
        raise ValueError(
            f"control.kind={control.config.kind!r} moves PPO's token clip: it needs loss_mode={LOSS_NAME!r}, "
            f"not the {kind} loss (use control.kind static)"
        )
    eps_low, eps_high, dual_clip = verl_bounds(config)
    low, high = control.bounds(eps_low, eps_high) if control is not None else (eps_low, eps_high)
    if kind == "sapo":
        # verl's sapo has no bounds, and aggregates seq-mean-token-mean whatever loss_agg_mode says
        low = high = None
    mode = "seq-mean-token-mean" if kind == "sapo" else loss_agg_mode
    batch_info = dict(config.get("global_batch_info") or {})
    agg, max_len, factor = verl_aggregation(response_mask, mode, batch_info)
    adv = weighted_advantages(advantages, response_mask, rollout_is_weights)
    out = _kind_loss(
        kind, config, log_prob, old_log_prob, adv, response_mask, (low, high, dual_clip), agg, max_len
    )
    ppo_kl, neg_logp_old, tokens = _logp_totals(log_prob, old_log_prob, response_mask)
    stats = event_metrics(out, response_mask)
    metrics = {
        # verl's values: its gspo and cispo count the tokens whose ratio was clipped (the kinds' events), its
        # sapo reports 0
        "actor/pg_clipfrac": 0.0 if kind == "sapo" else stats[names.CLIP_REGION],
        "actor/ppo_kl": ppo_kl,
        "actor/pg_clipfrac_lower": stats[names.CLIP_DUAL],
        **stats,
        "entropy/rollout_mc": neg_logp_old / max(tokens, 1),
        **_bound_metrics(low, high),
    }
    if settings.attribution:
        kappa = npg_kappa(log_prob, response_mask)
        metrics.update(
            attribution_metrics(out, kappa, adv, log_prob, old_log_prob, response_mask, "entropy/npg_")
        )
    if control is not None:
        if log_prob.requires_grad:
            control.observe(neg_logp_old, tokens, response_mask.shape[0], batch_info)
        metrics.update(control.metrics())
    return out.loss * factor, metrics


#: verl loss_mode -> entroclip's loss registered under it
POLICY_LOSSES: dict[str, Callable[..., tuple[Tensor, dict[str, float]]]] = {
    LOSS_NAME: entroclip_policy_loss,
    **{name: partial(entroclip_policy_loss, kind=kind) for name, kind in KIND_LOSS_NAMES.items()},
}


def register() -> bool:
    """Register ``POLICY_LOSSES`` as verl's policy losses of those names; False without verl."""
    if importlib.util.find_spec("verl") is None:
        return False
    from verl.trainer.ppo.core_algos import register_policy_loss

    for name, loss in POLICY_LOSSES.items():
        register_policy_loss(name)(loss)
    return True


REGISTERED = register()
