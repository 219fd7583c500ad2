"""Adapters that run entroclip's objective, metrics and entropy controller inside other trainers.

- :mod:`entroclip.integrations.verl`: the policy loss ``entroclip`` for verl
  (``actor_rollout_ref.actor.policy_loss.loss_mode=entroclip``), registered when verl is importable.
- :mod:`entroclip.integrations.trl`: :class:`~entroclip.integrations.trl.EntroclipGRPOTrainer`, a TRL
  ``GRPOTrainer`` whose loss is :func:`entroclip.objectives.clipped_surrogate`.

Neither framework is a dependency of entroclip: import the adapter module you need.
"""
