"""TRL 1.16's ``GRPOTrainer._compute_loss``, called on a stand-in trainer.

TRL has no pure loss function: the loss, the high-entropy mask and the adaptive entropy rule are written
inline in this trainer method, so the tests call it unbound on a stand-in that has the attributes it reads.
"""

from collections import defaultdict
from types import SimpleNamespace

import torch


class TRLStandIn:
    """What ``GRPOTrainer._compute_loss`` reads from the trainer, for one process in train mode with no
    gradient accumulation, no KL term, no vLLM; the model's log-probs (and per-token entropies, default 0)
    are given. ``top_entropy_quantile`` < 1 turns on the high-entropy mask; ``adaptive`` (a dict of
    ``entropy_target``, ``entropy_coef_delta``, ``entropy_coef_min``, ``entropy_coef_max`` and
    ``entropy_coef``) turns on the adaptive entropy bonus."""

    def __init__(
        self,
        loss_type,
        level,
        logp,
        epsilon=0.2,
        epsilon_high=0.2,
        tau_pos=1.0,
        tau_neg=1.05,
        entropies=None,
        top_entropy_quantile=1.0,
        adaptive=None,
    ):
        self.loss_type, self.importance_sampling_level = loss_type, level
        self.epsilon_low, self.epsilon_high = epsilon, epsilon_high
        self.beta, self.top_entropy_quantile, self.off_policy_mask_threshold = 0.0, top_entropy_quantile, None
        self.use_vllm, self.aux_loss_enabled = False, False
        self.current_gradient_accumulation_steps = 1
        self.model = SimpleNamespace(training=True)
        self.args = SimpleNamespace(
            delta=None, sapo_temperature_pos=tau_pos, sapo_temperature_neg=tau_neg, steps_per_generation=1
        )
        self.use_adaptive_entropy = adaptive is not None
        self._entropy_bonus_enabled = self.use_adaptive_entropy
        self.entropy_coef = 0.0
        if adaptive is not None:
            self.entropy_coef = adaptive.pop("entropy_coef")
            vars(self.args).update(adaptive)
        self._last_world_entropy, self._entropy_window_stats = float("inf"), None
        self.accelerator = SimpleNamespace(
            num_processes=1,
            gather=lambda t: t,
            reduce=lambda t, reduction: t,
            pad_across_processes=lambda t, dim, pad_index: t,
            sync_gradients=True,
        )
        self._metrics = {"train": defaultdict(list)}
        self._logp = logp
        self._entropies = entropies if entropies is not None else torch.zeros_like(logp.detach())

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        return self._logp, self._entropies, None

    def get_high_entropy_mask(self, entropies, mask, threshold):
        from trl.trainer.grpo_trainer import GRPOTrainer

        return GRPOTrainer.get_high_entropy_mask(self, entropies, mask, threshold)


def trl_loss(stand_in, old, adv, mask):
    """TRL's loss for one micro-batch: log-probs ``old`` ``[B, T]``, advantages ``adv`` ``[B]``, ``mask``."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    rows, length = mask.shape
    inputs = {
        "prompt_ids": torch.zeros(rows, 1, dtype=torch.long),
        "prompt_mask": torch.ones(rows, 1, dtype=torch.long),
        "completion_ids": torch.zeros(rows, length, dtype=torch.long),
        "completion_mask": mask.float(),
        "advantages": adv,
        "old_per_token_logps": old,
        "num_items_in_batch": mask.sum().float(),
    }
    return GRPOTrainer._compute_loss(stand_in, None, inputs)
