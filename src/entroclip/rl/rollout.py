"""One step's data: sampled responses, their rewards, old and reference log-probs, and advantages."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from rich.console import Console
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from entroclip.advantages import gae, group_advantages, masked_whiten
from entroclip.compiling import CompileCache
from entroclip.config import Config
from entroclip.distributed import DistContext
from entroclip.entropy import token_stats
from entroclip.objectives import kl_penalty
from entroclip.policy.loading import format_prompts
from entroclip.policy.sampling import (
    Rollout,
    response_logits,
    response_logits_and_hidden,
    sample,
    token_logprobs,
)
from entroclip.policy.vllm_backend import VLLMSampler
from entroclip.rewards import Reward, RewardFailureMonitor, RewardResult, RewardsFailing, score_batch
from entroclip.rl.passes import compiled_passes, logp_and_entropy
from entroclip.runio import derive_seed
from entroclip.tasks import Example, Task, trace_answer_masks
from entroclip.update import UpdateBatch
from entroclip.value import ValueHead, terminal_rewards


@dataclass
class Sampler:
    """Samples ``repeats`` responses per example, through vLLM when the run has an engine (the policy's
    weights are synced into it after every update), else with transformers' ``generate``."""

    tokenizer: PreTrainedTokenizerBase
    config: Config
    vllm: VLLMSampler | None = None

    def prompts(self, examples: list[Example], repeats: int) -> list[str]:
        formatted = format_prompts(
            self.tokenizer, [e.prompt for e in examples], self.config.model.chat_template
        )
        return [p for p in formatted for _ in range(repeats)]

    def __call__(self, model: PreTrainedModel, examples: list[Example], repeats: int, seed: int) -> Rollout:
        settings = self.config.rollout
        prompts = self.prompts(examples, repeats)
        if self.vllm is not None:
            return self.vllm.sample(
                prompts, settings.max_new_tokens, settings.temperature, settings.top_p, seed
            )
        return sample(
            model,
            self.tokenizer,
            prompts,
            settings.max_new_tokens,
            settings.temperature,
            settings.top_p,
            seed=seed,
        )


@dataclass
class Policies:
    """The modules a step's passes run: the policy, its value head (GAE), the frozen reference (KL), and
    how the policy's no-grad passes run (eager or compiled)."""

    model: PreTrainedModel
    value_head: ValueHead | None
    ref_model: PreTrainedModel | None
    functions: CompileCache


def delimiter_token(tokenizer: PreTrainedTokenizerBase, delimiter: str) -> int | None:
    """The token id of a trace task's delimiter, or None when the tokenizer has no single token for it
    (then the trace / answer split is not measured)."""
    ids = tokenizer(delimiter, add_special_tokens=False).input_ids
    return ids[0] if len(ids) == 1 else None


class Collector:
    """Builds the :class:`UpdateBatch` of each step from this rank's share of the prompts; its metrics are
    over the global batch."""

    def __init__(
        self,
        config: Config,
        task: Task,
        reward: Reward,
        sampler: Sampler,
        ctx: DistContext,
        console: Console,
    ) -> None:
        self.config, self.task, self.reward, self.sampler = config, task, reward, sampler
        self.ctx, self.console = ctx, console
        self.reward_monitor = RewardFailureMonitor(config.reward.max_failed_steps)
        delimiter = getattr(task, "delimiter", None)
        self.delimiter_id = delimiter_token(sampler.tokenizer, delimiter) if delimiter is not None else None

    def collect(self, step: int, policies: Policies) -> tuple[UpdateBatch, dict[str, float]]:
        """Rollout, rewards, old/reference log-probs and advantages for ``step``."""
        config, seed, ctx = self.config, self.config.run.seed, self.ctx
        model, value_head = policies.model, policies.value_head
        t0 = time.perf_counter()
        examples = self.task.examples(config.task.prompts_per_step, seed=derive_seed(seed, step, "data"))
        examples = ctx.shard(examples)
        rollout = self.sampler(
            model, examples, config.rollout.group_size, derive_seed(seed, step, "sample") + ctx.rank
        )
        t1 = time.perf_counter()
        repeated = [e for e in examples for _ in range(config.rollout.group_size)]
        scored = score_batch(
            self.reward,
            rollout.texts,
            repeated,
            timeout_s=config.reward.timeout_s,
            seed=derive_seed(seed, step, "reward") + ctx.rank,
        )
        self._watch_rewards(step, scored)
        rewards = scored.rewards.to(ctx.device)
        t2 = time.perf_counter()
        mask = rollout.response_mask
        n_tokens, n_seq = mask.sum(), float(mask.shape[0])
        sums: dict[str, tuple[torch.Tensor | float, torch.Tensor | float]] = {
            "reward/mean": (rewards.sum(), n_seq),
            "reward/sq": (rewards.square().sum(), n_seq),
            "response/length_mean": (n_tokens, n_seq),
        }
        with torch.no_grad():
            old_values = None
            if value_head is None:
                with compiled_passes(model, policies.functions, ctx.device):
                    logp_old, entropy = policies.functions.call(
                        logp_and_entropy, model, rollout, config.rollout.temperature
                    )
            else:
                logits, hidden = response_logits_and_hidden(model, rollout, config.rollout.temperature)
                old_values = value_head(hidden)
                sums["value/mean"] = ((old_values * mask).sum(), n_tokens)
                per_token = token_stats(logits, rollout.responses)
                assert per_token.logp is not None and per_token.entropy is not None
                logp_old, entropy = per_token.logp, per_token.entropy
                del logits
            sums["entropy/rollout"] = ((entropy * mask).sum(), n_tokens)
            if self.delimiter_id is not None:  # a reasoning-trace task: where the entropy sits
                trace, answer = trace_answer_masks(rollout.responses, mask, self.delimiter_id)
                sums["entropy/trace"] = ((entropy * trace).sum(), trace.sum())
                sums["entropy/answer"] = ((entropy * answer).sum(), answer.sum())
            logp_ref, kl_penalty_tokens = None, torch.zeros_like(logp_old)
            if policies.ref_model is not None:
                ref_logits = response_logits(policies.ref_model, rollout, config.rollout.temperature)
                logp_ref = token_logprobs(ref_logits, rollout.responses)
                kl = kl_penalty(logp_old, logp_ref, config.loss.kl.kind)
                sums["kl/ref"] = ((kl * mask).sum(), n_tokens)
                if config.loss.kl.in_reward:
                    kl_penalty_tokens = config.loss.kl.coef * kl * mask
        metrics = self._global_means(sums)
        n = float(config.task.prompts_per_step * config.rollout.group_size)
        variance = max(metrics.pop("reward/sq") - metrics["reward/mean"] ** 2, 0.0) * n / max(n - 1, 1)
        metrics["reward/std"] = math.sqrt(variance)
        (metrics["reward/errors"],) = ctx.sum([float(scored.errors)])
        if hasattr(self.task, "skipped_lines"):
            metrics["data/skipped_lines"] = float(self.task.skipped_lines)
        ref_for_loss = logp_ref if not config.loss.kl.in_reward else None
        metrics["time/rollout_s"] = t1 - t0
        metrics["time/reward_s"] = t2 - t1
        if old_values is None:
            kind = config.advantage.kind
            assert kind != "gae", "gae runs with a value head"
            rewards = rewards - kl_penalty_tokens.sum(-1)
            advantages = group_advantages(rewards, config.rollout.group_size, kind)
            return UpdateBatch(rollout, advantages, logp_old, ref_for_loss), metrics
        token_rewards = terminal_rewards(rewards, mask) - kl_penalty_tokens
        advantages, returns = gae(
            token_rewards, old_values, mask, config.advantage.gamma, config.advantage.lam
        )
        advantages = masked_whiten(advantages, mask)
        return UpdateBatch(rollout, advantages, logp_old, ref_for_loss, old_values, returns), metrics

    def _watch_rewards(self, step: int, scored: RewardResult) -> None:
        """Warn about new kinds of reward failure; stop (on every rank) once a rank's rewards have failed
        on every sample for ``reward.max_failed_steps`` steps in a row."""
        failing = None
        try:
            for line in self.reward_monitor.observe(step, scored):
                self.console.print(f"[yellow]warning:[/] {line}", highlight=False)
        except RewardsFailing as err:
            failing = err
        if self.ctx.sum([float(failing is not None)])[0] > 0:
            raise failing or RewardsFailing(
                f"the reward failed on every sample of another rank (step {step})"
            )

    def _global_means(
        self, sums: dict[str, tuple[torch.Tensor | float, torch.Tensor | float]]
    ) -> dict[str, float]:
        """name -> (sum, count) over this rank, reduced over ranks into name -> global sum / count."""
        flat = [float(x) for pair in sums.values() for x in pair]
        reduced = self.ctx.sum(flat)
        return {name: reduced[2 * i] / max(reduced[2 * i + 1], 1.0) for i, name in enumerate(sums)}
