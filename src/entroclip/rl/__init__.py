"""The rooms of the RL loop that :class:`entroclip.trainer.Trainer` orchestrates: the optimizer and its
schedule, the probe set, held-out evaluation and the policy's no-grad passes."""
