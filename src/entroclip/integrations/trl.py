"""TRL adapter: a ``GRPOTrainer`` whose loss is entroclip's, with entroclip's metrics and entropy controller.

:class:`EntroclipGRPOTrainer` takes TRL's arguments unchanged plus ``control`` (an entroclip
:class:`~entroclip.config.ControlConfig`) and ``attribution``. The loss is entroclip's ``loss.kind`` for
TRL's ``loss_type`` and ``importance_sampling_level`` (:func:`trl_loss_kind`), normalised as TRL does, with
TRL's KL term (``beta``, k3, ``use_bias_correction_kl``), entropy bonus (``entropy_coef``) and vLLM
importance weights:

- grpo, bnpo, dr_grpo, dapo at the token level: ``ppo``, :func:`entroclip.objectives.clipped_surrogate`
  with ``eps_low = args.epsilon``, ``eps_high = args.epsilon_high``;
- the same at ``importance_sampling_level="sequence"``: ``gspo`` (:func:`entroclip.losses.gspo_loss`),
  the same bounds on the sequence ratio;
- cispo: ``cispo`` (:func:`entroclip.losses.cispo_loss`), no lower bound and ``eps_high =
  args.epsilon_high - 1`` (TRL's ``epsilon_high`` caps the ratio itself);
- sapo: ``sapo`` (:func:`entroclip.losses.sapo_loss`), ``tau_pos / tau_neg =
  args.sapo_temperature_pos / args.sapo_temperature_neg``.

It logs, besides TRL's own metrics:

- ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean``, ``clip_ratio/dual_mean``,
  ``ratio/mean``: the kind's event fractions over the micro-batch's completion tokens, token-weighted over
  ranks (PPO's and GSPO's are sign-gated; a GSPO event counts on every token of its sequence);
- ``entropy/effect_low``, ``entropy/effect_high``, ``entropy/effect_pos``, ``entropy/effect_neg``, ...:
  :func:`entroclip.entropy.clip_attribution` per micro-batch, for the other kinds their ledger
  (:func:`entroclip.losses.entropy_ledger`, with ``entropy/effect_rescale``), mean over micro-batches and
  ranks: an optimizer step's effect per unit learning rate. ``attribution="exact"`` uses the logit-space
  kappa and costs one extra forward without gradient per micro-batch; ``"npg"`` uses the natural-gradient
  kappa ``-(log pi_a + H)`` (keys ``entropy/npg_effect_*``), free; ``"off"`` skips it;
- ``control/eps_low``, ``control/eps_high`` (the bounds in force as entroclip's eps; sapo has none), and
  with a controller ``entropy/rollout`` (exact entropy of the policy that sampled the generation batch,
  over its completion tokens) and the controller's ``control/*``. The controller acts once per generation
  batch, before its first update.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOConfig, GRPOTrainer

from entroclip import metrics as names
from entroclip.config import ControlConfig, LossConfig
from entroclip.control import ControlAction, make_controller
from entroclip.entropy import entropy_sensitivity
from entroclip.integrations.common import (
    SURROGATE_KEYS,
    Attribution,
    LossEvents,
    attribution_metrics,
    npg_kappa,
    token_sums,
    weighted_advantages,
)
from entroclip.losses import PolicyLoss, PolicyLossKind
from entroclip.objectives import (
    LOG_RATIO_LIMIT,
    Aggregation,
    SurrogateOutput,
    aggregate,
    clipped_surrogate,
    kl_penalty,
)

#: TRL ``loss_type`` -> entroclip aggregation (the global normaliser of ``TRL_GLOBAL_TYPES`` and the row
#: count of ``TRL_ROW_TYPES`` are applied on top, as TRL does)
TRL_AGGREGATIONS: dict[str, Aggregation] = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dapo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "cispo": "token-mean",
    "sapo": "seq-mean-token-mean",
}
#: loss types with PPO's clip: entroclip's ppo at TRL's token level, gspo at its sequence level
TRL_CLIP_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
#: loss types that TRL divides by the generation batch's token count (``num_items_in_batch``)
TRL_GLOBAL_TYPES = ("dapo", "cispo")
#: loss types that TRL averages over all rows, empty ones included (entroclip: over the non-empty rows)
TRL_ROW_TYPES = ("grpo", "dr_grpo", "sapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
#: model inputs besides the token ids that TRL's generation batch may carry (multimodal models)
FORWARD_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)
#: batch entries that count images or tiles for TRL's row slicing; not model inputs
COUNT_KEYS = ("num_images", "num_tiles")
CONTROL_STATE_FILE = "entroclip_control.json"
TRL_CONTROL_KINDS = ("static", "clip_low", "entropy_bonus")


class EntroclipGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with entroclip's objective, clip/entropy metrics and entropy controller."""

    args: GRPOConfig

    def __init__(
        self,
        *args: Any,
        control: ControlConfig | None = None,
        attribution: Attribution = "exact",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        control = control or ControlConfig()
        _check_supported(self, control, attribution)
        self.entroclip_kind = trl_loss_kind(self)
        eps_low, eps_high = trl_bounds(self)
        loss = LossConfig(eps_low=eps_low, eps_high=eps_high, entropy_coef=float(self.entropy_coef))
        self.entroclip_controller = make_controller(control, loss)
        self.entroclip_action: ControlAction = self.entroclip_controller.static_action()
        self.entroclip_dynamic = control.kind != "static"
        self.entroclip_step = 0
        self.attribution: Attribution = attribution

    def _mode(self) -> str:
        """TRL's metrics bucket: train while the model is in training mode."""
        return "train" if self.model is not None and self.model.training else "eval"

    # ----- rollout side: the controller acts once per generation batch ------------------------------------

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        if self._mode() == "train" and self.entroclip_dynamic:
            entropy = self._rollout_entropy(output)
            self.entroclip_step += 1
            self.entroclip_action = self.entroclip_controller.act(self.entroclip_step, entropy)
            self._metrics["train"]["entropy/rollout"].append(entropy)
        return output

    @torch.no_grad()
    def _rollout_entropy(self, batch: dict[str, Any]) -> float:
        """Entropy of the current (sampling) policy over the batch's completion tokens, mean over ranks."""
        input_ids, attention_mask, mask, logits_to_keep = _sequences(batch)
        _, entropies, _ = self._get_per_token_logps_and_entropies(
            self.model,
            input_ids,
            attention_mask,
            logits_to_keep,
            batch_size=self.args.per_device_train_batch_size,
            compute_entropy=True,
            **_forward_kwargs(batch),
        )
        totals = torch.stack([(entropies * mask).sum(), mask.sum()]).float()
        total, count = self.accelerator.reduce(totals, reduction="sum").tolist()
        return total / max(count, 1.0)

    # ----- the loss ---------------------------------------------------------------------------------------

    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> Tensor:
        mode = self._mode()
        input_ids, attention_mask, mask, logits_to_keep = _sequences(inputs)
        logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            logits_to_keep,
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **_forward_kwargs(inputs),
        )
        old = inputs.get("old_per_token_logps")
        old = logps.detach() if old is None else old
        advantages = weighted_advantages(inputs["advantages"], mask, inputs.get("importance_sampling_ratio"))
        per_token_kl = self._per_token_kl(logps, old, mask, inputs)
        out, policy_loss = self._policy_loss(logps, old, advantages, mask, per_token_kl)
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        loss = policy_loss * self._loss_factor(inputs, mask, accumulation, mode)
        action = self.entroclip_action
        if action.entropy_coef != 0.0:
            # TRL's entropy bonus: the mean entropy over the micro-batch's tokens, whatever the loss type
            loss = loss - action.entropy_coef * aggregate(entropies, mask) / accumulation
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
        self._log_entroclip(mode, out, policy_loss, mask, entropies, per_token_kl)
        if self.attribution != "off":
            kappa = self._kappa(model, inputs, logps, entropies, mask)
            prefix = "entropy/" if self.attribution == "exact" else "entropy/npg_"
            effects = attribution_metrics(out, kappa, advantages, logps, old, mask, prefix)
            self._log_means(mode, effects)
        return loss

    def _policy_loss(
        self, logps: Tensor, old: Tensor, advantages: Tensor, mask: Tensor, per_token_kl: Tensor | None
    ) -> tuple[SurrogateOutput | PolicyLoss, Tensor]:
        """The kind's output on ``[B, T]`` inputs and the micro-batch loss with TRL's KL term, aggregated as
        the policy loss (TRL adds it per token first), before :meth:`_loss_factor`."""
        action = self.entroclip_action
        agg, max_len = TRL_AGGREGATIONS[self.loss_type], self.max_completion_length
        bounds = (action.eps_low, action.eps_high)
        out: SurrogateOutput | PolicyLoss
        if self.entroclip_kind is None:
            out = clipped_surrogate(logps, old, advantages, mask, *bounds, agg=agg, max_len=max_len)
        else:
            out = self.entroclip_kind(logps, old, advantages, mask, *bounds, None, agg, max_len)
        if per_token_kl is None:
            return out, out.loss
        return out, out.loss + self.beta * aggregate(per_token_kl, mask, agg, max_len)

    def _per_token_kl(
        self, logps: Tensor, old: Tensor, mask: Tensor, inputs: dict[str, Any]
    ) -> Tensor | None:
        """TRL's KL term: k3 to the reference model, times TRL's importance ratio (the token's, or at the
        sequence level the sequence's, differentiable) when ``use_bias_correction_kl``."""
        if self.beta == 0.0:
            return None
        kl = kl_penalty(logps, inputs["ref_per_token_logps"], "k3")
        if self.args.use_bias_correction_kl:
            log_ratio = logps - old
            if self.importance_sampling_level == "sequence":
                log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
            kl = kl * torch.exp(log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
        return kl

    def _loss_factor(self, inputs: dict[str, Any], mask: Tensor, accumulation: int, mode: str) -> float:
        """Scale of the micro-batch loss as TRL's loss types: 1/accumulation steps, times the share of
        non-empty rows where TRL's mean counts every row, or the global token count of dapo and cispo."""
        if self.loss_type in TRL_ROW_TYPES:
            # a row without completion tokens (mask_truncated_completions, tool masks) counts in TRL's mean
            return float((mask.sum(-1) > 0).sum() / mask.shape[0]) / accumulation
        if self.loss_type not in TRL_GLOBAL_TYPES:
            return 1.0 / accumulation
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * accumulation / self.args.steps_per_generation
        return float(mask.sum().clamp(min=1) / normalizer)

    @torch.no_grad()
    def _kappa(
        self, model: torch.nn.Module, inputs: dict[str, Any], logps: Tensor, entropies: Tensor, mask: Tensor
    ) -> Tensor:
        """Entropy sensitivity of the completion tokens at the current parameters (see ``attribution``)."""
        if self.attribution == "npg":
            return npg_kappa(logps, mask, entropies)
        input_ids, attention_mask, _, logits_to_keep = _sequences(inputs)
        # the logits at positions -L-1 .. -2 predict the L completion tokens
        extra = {k: v for k, v in _forward_kwargs(inputs).items() if v is not None and k not in COUNT_KEYS}
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep + 1, **extra
        ).logits[:, :-1]
        _, kappa = entropy_sensitivity(logits, inputs["completion_ids"], temperature=self.temperature)
        return kappa

    # ----- metrics ----------------------------------------------------------------------------------------

    def _log_entroclip(
        self,
        mode: str,
        out: LossEvents,
        policy_loss: Tensor,
        mask: Tensor,
        entropies: Tensor,
        per_token_kl: Tensor | None,
    ) -> None:
        """Event fractions, ratio, entropy and KL as token-weighted means over ranks; the policy loss with
        the KL term (``loss/pg``); the bounds in force."""
        per_token = {"entropy": entropies} | ({} if per_token_kl is None else {"kl": per_token_kl})
        sums = token_sums(out, mask, *per_token.values())
        totals = self.accelerator.reduce(sums, reduction="sum").tolist()
        for key, total in zip((*SURROGATE_KEYS, *per_token), totals[:-1], strict=True):
            self._metrics[mode][key].append(total / max(totals[-1], 1.0))
        self._log_means(mode, {names.LOSS_PG: float(policy_loss.detach())})
        action = self.entroclip_action
        bounds = {"control/eps_low": action.eps_low, "control/eps_high": action.eps_high}
        for key, value in bounds.items():
            if value is not None:
                self._metrics[mode][key].append(value)
        if mode == "train" and self.entroclip_dynamic:
            for key, value in self.entroclip_controller.metrics().items():
                self._metrics[mode][key].append(value)

    def _log_means(self, mode: str, values: dict[str, float]) -> None:
        """Append the mean over ranks of per-rank scalars."""
        device = self.accelerator.device
        means = self.accelerator.reduce(torch.tensor(list(values.values()), device=device), reduction="mean")
        for key, value in zip(values, means.tolist(), strict=True):
            self._metrics[mode][key].append(value)

    # ----- checkpoints: the controller's state travels with TRL's -----------------------------------------

    def _control_state(self) -> dict[str, Any]:
        return {
            "step": self.entroclip_step,
            "action": asdict(self.entroclip_action),
            "controller": self.entroclip_controller.state_dict(),
        }

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self.entroclip_dynamic and self.args.should_save:
            folder = (
                Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            (folder / CONTROL_STATE_FILE).write_text(json.dumps(self._control_state()))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        path = Path(checkpoint) / CONTROL_STATE_FILE if checkpoint is not None else None
        if self.entroclip_dynamic and path is not None and path.exists():
            state = json.loads(path.read_text())
            self.entroclip_step = state["step"]
            self.entroclip_action = ControlAction(**state["action"])
            self.entroclip_controller.load_state_dict(state["controller"])


def _sequences(batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, int]:
    """(prompt+completion ids, attention mask, completion loss mask, completion length) of a TRL batch."""
    completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
    input_ids = torch.cat([batch["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], completion_mask], dim=1)
    mask = completion_mask if "tool_mask" not in batch else completion_mask * batch["tool_mask"]
    return input_ids, attention_mask, mask, completion_ids.size(1)


def _forward_kwargs(batch: dict[str, Any]) -> dict[str, Any]:
    return {key: batch.get(key) for key in FORWARD_KEYS}


def trl_loss_kind(trainer: EntroclipGRPOTrainer) -> PolicyLossKind | None:
    """The entroclip ``loss.kind`` of the trainer's loss (None: ``ppo``, PPO's token clip)."""
    if trainer.loss_type == "sapo":
        return PolicyLossKind("sapo", trainer.args.sapo_temperature_pos, trainer.args.sapo_temperature_neg)
    if trainer.loss_type == "cispo":
        return PolicyLossKind("cispo")
    return PolicyLossKind("gspo") if trainer.importance_sampling_level == "sequence" else None


def trl_bounds(trainer: EntroclipGRPOTrainer) -> tuple[float | None, float | None]:
    """entroclip's (eps_low, eps_high) of the trainer's loss: TRL's ``epsilon`` and ``epsilon_high`` for
    PPO's clip; CISPO caps the ratio at ``epsilon_high`` (= 1 + eps_high) with no lower bound; SAPO has
    none."""
    if trainer.loss_type == "cispo":
        return None, trainer.epsilon_high - 1.0
    if trainer.loss_type == "sapo":
        return None, None
    return trainer.epsilon_low, trainer.epsilon_high


def _check_supported(trainer: EntroclipGRPOTrainer, control: ControlConfig, attribution: str) -> None:
    """Raise ValueError for TRL options whose loss this adapter does not reproduce."""
    args = trainer.args
    loss_type, level = trainer.loss_type, trainer.importance_sampling_level
    known = loss_type in TRL_AGGREGATIONS and level in IMPORTANCE_SAMPLING_LEVELS
    sequence_kind = known and level == "sequence" and loss_type not in TRL_CLIP_TYPES
    ppo = loss_type in TRL_CLIP_TYPES and level == "token"
    unsupported = {
        f"loss_type={loss_type!r} (use one of {sorted(TRL_AGGREGATIONS)})": loss_type not in TRL_AGGREGATIONS,
        f"importance_sampling_level={level!r} (use one of {IMPORTANCE_SAMPLING_LEVELS})": (
            level not in IMPORTANCE_SAMPLING_LEVELS
        ),
        f"importance_sampling_level='sequence' with loss_type={loss_type!r} (GSPO: use one of "
        f"{TRL_CLIP_TYPES})": sequence_kind,
        f"loss_type='cispo' with epsilon_high={trainer.epsilon_high} (the cap on the ratio: use >= 1)": (
            loss_type == "cispo" and trainer.epsilon_high < 1.0
        ),
        # as in entroclip's own config: the clip-low controller moves PPO's token clip, no other kind's bound
        f"control.kind='clip_low' with loss_type={loss_type!r}, importance_sampling_level={level!r} (use "
        "static or entropy_bonus)": known and not ppo and control.kind == "clip_low",
        "top_entropy_quantile < 1": trainer.top_entropy_quantile < 1.0,
        "off_policy_mask_threshold": trainer.off_policy_mask_threshold is not None,
        "delta (two-sided clipping)": args.delta is not None,
        "use_adaptive_entropy (use control=ControlConfig(kind='entropy_bonus', ...))": (
            trainer.use_adaptive_entropy
        ),
        f"control.kind={control.kind!r} (use one of {TRL_CONTROL_KINDS})": (
            control.kind not in TRL_CONTROL_KINDS
        ),
        f"attribution={attribution!r} (use exact, npg or off)": attribution not in ("exact", "npg", "off"),
    }
    bad = [name for name, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ValueError(f"EntroclipGRPOTrainer does not support {', '.join(bad)}")
