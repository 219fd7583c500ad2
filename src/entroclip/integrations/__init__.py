"""Adapters that run entroclip's objective, metrics and entropy controller inside other trainers.

- :mod:`entroclip.integrations.verl`: the policy losses ``entroclip``, ``entroclip_gspo``,
  ``entroclip_cispo`` and ``entroclip_sapo`` for verl
  (``actor_rollout_ref.actor.policy_loss.loss_mode=entroclip``, ...), registered when verl is importable.
- :mod:`entroclip.integrations.trl`: :class:`~entroclip.integrations.trl.EntroclipGRPOTrainer`, a TRL
  ``GRPOTrainer`` whose loss is entroclip's ``loss.kind`` for TRL's loss type (ppo, gspo, cispo, sapo).

Neither framework is a dependency of entroclip: import the adapter module you need.
"""
