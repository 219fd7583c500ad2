"""The RLVR loop: rollout -> reward -> advantage -> mu epochs of minibatch updates -> metrics -> checkpoint.

The loop knows nothing about any particular task or model. Every random choice is seeded from
``(run.seed, step, stream)``, so a run resumed from a checkpoint continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from safetensors.torch import load_file, save
from transformers import PreTrainedModel

from entroclip.advantages import gae, group_advantages, masked_whiten
from entroclip.allocator import keep_freed_memory
from entroclip.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    save_checkpoint,
)
from entroclip.config import Config, ConfigError, dump_config
from entroclip.consoles import unwrapped_console
from entroclip.control import CLIP_COV_FRACTION, KL_COV_FRACTION, ControlAction, make_controller
from entroclip.distributed import (
    DistContext,
    full_optimizer_state,
    full_state_dict,
    load_full_state_dict,
    load_optimizer_state,
    shard_module,
)
from entroclip.entropy import token_entropy, token_stats
from entroclip.logging import MetricsLogger
from entroclip.objectives import kl_penalty
from entroclip.policy.builtin import save_builtin
from entroclip.policy.loading import format_prompts, load_policy
from entroclip.policy.sampling import (
    Rollout,
    SharedPrompts,
    response_logits,
    response_logits_and_hidden,
    sample,
    token_logprobs,
)
from entroclip.policy.vllm_backend import VLLMSampler
from entroclip.preflight import (
    check_context_length,
    check_distributed,
    check_free_space,
    check_held_out,
    check_memory,
    check_model_source,
    check_rollout_backend,
    check_sinks,
    configured,
    step_memory_bytes,
)
from entroclip.rewards import (
    RewardFailureMonitor,
    RewardResult,
    RewardsFailing,
    make_reward,
    score_batch,
)
from entroclip.runio import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    PROBE_FILE,
    atomic_write_bytes,
    atomic_write_text,
    config_fingerprint,
    derive_seed,
    logged_lines,
    prepare_run_dir,
)
from entroclip.tasks import Example, Task, make_task
from entroclip.trust import check_config_code
from entroclip.update import CovSettings, StepFunctions, UpdateBatch, UpdateSettings, run_update
from entroclip.value import ValueHead, terminal_rewards

VALUE_PREFIX = "value_head."

#: the trainer state saved in a checkpoint's state.pt besides the optimizer's own
CHECKPOINT_STATE_KEYS = (
    "step",
    "optimizer",
    "scheduler",
    "consecutive_skips",
    "controller",
    "skipped_total",
    "tied_weights",
)


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (e.g. too many consecutive non-finite steps); a checkpoint was written."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return float((values * mask).sum() / mask.sum().clamp(min=1))


class Trainer:
    """Owns the policy, optimizer, data streams and run folder of one RL run."""

    def __init__(
        self,
        config: Config,
        *,
        resume: bool = False,
        overwrite: bool = False,
        console: Console | None = None,
        ctx: DistContext | None = None,
        allow_code: bool | None = None,
    ) -> None:
        """Validate everything that can be checked without training, then create (or re-open) the run
        folder: a config that cannot run never leaves a folder behind. Under torchrun (``ctx``), rank 0
        alone writes the run folder; every rank trains on its share of the prompts. ``allow_code``: whether
        the config may name tasks and rewards by import path (default: ``ENTROCLIP_ALLOW_CODE=1``)."""
        self.config = config
        self.ctx = ctx or DistContext()
        self.console = console or unwrapped_console(quiet=not self.ctx.is_main)
        self.run_dir = Path(config.run.out_dir)
        check_config_code(config, allow_code)
        torch.set_num_threads(config.run.threads)
        if config.run.keep_freed_memory:
            keep_freed_memory()
        self.task: Task = configured("task", lambda: make_task(config.task.name, **config.task.options))
        if skipped_lines := getattr(self.task, "skipped_lines", 0):
            self.console.print(
                f"[yellow]warning:[/] skipped {skipped_lines} malformed dataset lines "
                "(task.options.on_bad_line=skip); counted in data/skipped_lines"
            )
        self.reward_fn = configured(
            "reward", lambda: make_reward(config.reward.name, **config.reward.options)
        )
        self.eval_reward_fn = configured("eval.reward", lambda: make_reward(config.eval.reward))
        seed = config.run.seed
        check_held_out(config, self.task, derive_seed(seed, 0, "probe"), derive_seed(seed, 0, "eval"))
        check_model_source(config, self.task)
        check_rollout_backend(config)
        check_distributed(config, self.ctx.world_size)
        check_sinks(config)
        created = self.ctx.is_main and not self.run_dir.exists()
        self._prepare_run_dir(resume, overwrite)
        try:
            self._set_up(resume)
        except BaseException:
            if created:  # a run that could not start leaves no folder to block the next try
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise

    def _set_up(self, resume: bool) -> None:
        """The policy, optimizer, controller and probe of a run whose folder exists; resumes its state."""
        config = self.config
        self.fingerprint = config_fingerprint(config)
        self.sharded = config.run.parallel == "fsdp" and self.ctx.enabled
        self.model, self.tokenizer = self._load_initial_policy()
        check_context_length(config, self.task, self.tokenizer, self.model.config)
        n_params = sum(p.numel() for p in self.model.parameters())
        check_memory(
            step_memory_bytes(config, self.model.config, n_params, self.ctx.world_size), self.ctx.device
        )
        self.ref_model = self._frozen_copy(self.model) if config.loss.kl.coef > 0 else None
        self.value_head = ValueHead(self.model.config.hidden_size) if config.advantage.kind == "gae" else None
        for module in (self.model, self.ref_model, self.value_head):
            if module is not None:
                self._place(module)
        params = self._trainable_parameters(self.model, self.value_head)
        # weights and the two AdamW moments, plus room for metrics and events
        check_free_space(self.run_dir, 3 * sum(p.numel() * p.element_size() for p in params) + 2**20)
        self.optimizer = torch.optim.AdamW(
            self._trainable_parameters(self.model, self.value_head),
            lr=config.optim.lr,
            betas=config.optim.betas,
            weight_decay=config.optim.weight_decay,
            fused=True,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step = 0
        self.consecutive_skips = 0
        self.controller = make_controller(config.control, config.loss)
        self.reward_monitor = RewardFailureMonitor(config.reward.max_failed_steps)
        self.skipped_total = 0
        if resume:
            self._restore()
        self.vllm = self._vllm_sampler()
        self.train_model = self._data_parallel(self.model)
        self.train_value_head = self._data_parallel(self.value_head) if self.value_head is not None else None
        # on a CPU, a C++ wrapper around inductor's kernels spares their Python calls (tiny-0.1m: the
        # compiled step about 7% faster, for a few more seconds of compilation)
        cpp_wrapper = {"cpp_wrapper": True} if self.ctx.device.type == "cpu" else None
        self.functions = StepFunctions(config.run.compile, options=cpp_wrapper)
        self.probe = self._load_or_make_probe()
        self._probe_cache: float | None = None
        if config.on_policy:
            self.console.print(
                "[yellow]warning:[/] optim.epochs=1 and optim.minibatches=1: every update is on-policy "
                "(ratio = 1), so clipping never acts and clip-based entropy control does nothing."
            )

    # ----- set-up -------------------------------------------------------------------------------------
    def _prepare_run_dir(self, resume: bool, overwrite: bool) -> None:
        """Rank 0 prepares the run folder; the other ranks learn whether it could."""
        error = None
        if self.ctx.is_main:
            try:
                prepare_run_dir(self.run_dir, resume=resume, overwrite=overwrite)
            except ConfigError as err:
                error = err
        if not self.ctx.broadcast_flag(error is None):
            raise error or ConfigError(f"rank 0 could not prepare run.out_dir {self.run_dir}")

    def _vllm_sampler(self) -> VLLMSampler | None:
        """The vLLM engine for ``rollout.backend: vllm``, built from the policy's folder."""
        if self.config.rollout.backend != "vllm":
            return None
        m = self.config.model
        folder = self.run_dir / "init_model" if m.builtin is not None else Path(m.path or "")
        sampler = VLLMSampler(folder, self.tokenizer, self.config.rollout.vllm_gpu_memory, self.ctx)
        sampler.sync_weights(self.model)  # a resumed run starts from its checkpoint
        return sampler

    def _place(self, module: torch.nn.Module) -> None:
        """Move ``module`` to this rank's device, or shard it over the ranks (``run.parallel: fsdp``)."""
        if self.sharded:
            shard_module(module, self.ctx)
        else:
            module.to(self.ctx.device)

    def _data_parallel(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` wrapped in DistributedDataParallel when there are several ranks (unless sharded)."""
        if not self.ctx.enabled or self.sharded:
            return module
        device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)

    def _load_initial_policy(self) -> tuple[PreTrainedModel, Any]:
        m = self.config.model
        dtype = torch.bfloat16 if m.dtype == "bfloat16" else torch.float32
        if m.builtin is not None:
            folder = self.run_dir / "init_model"
            if self.ctx.is_main and not (folder / "config.json").is_file():
                save_builtin(m.builtin, self.task.alphabet or "", self.config.run.seed, folder)
            self.ctx.barrier()
            return load_policy(folder, dtype=dtype)
        return load_policy(m.path, m.gguf_file, dtype=dtype)

    @staticmethod
    def _trainable_parameters(
        model: PreTrainedModel, value_head: ValueHead | None
    ) -> list[torch.nn.Parameter]:
        return [*model.parameters(), *(value_head.parameters() if value_head is not None else [])]

    @staticmethod
    def _frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
        ref = copy.deepcopy(model).eval()
        ref.requires_grad_(False)
        return ref

    def _lr_factor(self, optimizer_step: int) -> float:
        o = self.config.optim
        total = max(self.config.run.steps * o.epochs * o.minibatches, 1)
        if optimizer_step < o.warmup_steps:
            return (optimizer_step + 1) / o.warmup_steps
        progress = min((optimizer_step - o.warmup_steps) / max(total - o.warmup_steps, 1), 1.0)
        if o.schedule == "linear":
            return 1.0 - progress
        if o.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    def _state(self) -> dict[str, Any]:
        """What a checkpoint holds besides the weights (keys: ``CHECKPOINT_STATE_KEYS``)."""
        return {
            "step": self.step,
            "optimizer": full_optimizer_state(self.optimizer, self.ctx),
            "scheduler": self.scheduler.state_dict(),
            "consecutive_skips": self.consecutive_skips,
            "controller": self.controller.state_dict(),
            "skipped_total": self.skipped_total,
            "reward_monitor": self.reward_monitor.state_dict(),
        }

    def save(self) -> Path:
        """Checkpoint the current state: every rank takes part in gathering it whole, rank 0 writes."""
        weights = full_state_dict(self.model)
        if self.value_head is not None:
            weights.update({VALUE_PREFIX + k: v for k, v in full_state_dict(self.value_head).items()})
        state = self._state()
        if not self.ctx.is_main:
            return self.run_dir / CHECKPOINT_DIR
        run_files = [PROBE_FILE] if (self.run_dir / PROBE_FILE).is_file() else []
        return save_checkpoint(self.run_dir, self.step, weights, state, self.fingerprint, run_files)

    def _restore(self) -> None:
        """Load the newest checkpoint that ``metrics.jsonl`` covers: a log cut, emptied or edited before a
        later checkpoint's step makes the run replay from an earlier one (or from the start), so the log
        never has holes."""
        logged = len(logged_lines(self.run_dir))
        newest = list_checkpoints(self.run_dir)[-1:]
        ckpt = latest_checkpoint(self.run_dir, self.fingerprint, up_to_step=logged)
        if newest and (ckpt is None or ckpt.step < newest[0][0]):
            start = f"checkpoint step {ckpt.step}" if ckpt is not None else "the start"
            self.console.print(
                f"[yellow]warning:[/] {METRICS_FILE} logs steps 1-{logged} only, before checkpoint step "
                f"{newest[0][0]}: replaying from {start}",
                highlight=False,
            )
        if ckpt is None:
            return
        missing = [k for k in CHECKPOINT_STATE_KEYS if k not in ckpt.state]
        if missing:
            raise CheckpointError(f"{ckpt.path}: state.pt lacks {', '.join(missing)}")
        model_weights = {k: v for k, v in ckpt.weights.items() if not k.startswith(VALUE_PREFIX)}
        result = load_full_state_dict(self.model, model_weights, strict=False)
        if result.unexpected_keys or set(result.missing_keys) - set(ckpt.state["tied_weights"]):
            raise CheckpointError(
                f"{ckpt.path}: weights do not fit the model (missing {result.missing_keys}, "
                f"unexpected {result.unexpected_keys})"
            )
        if self.value_head is not None:
            head = {
                k.removeprefix(VALUE_PREFIX): v for k, v in ckpt.weights.items() if k.startswith(VALUE_PREFIX)
            }
            load_full_state_dict(self.value_head, head, strict=True)
        load_optimizer_state(self.optimizer, ckpt.state["optimizer"])
        self.scheduler.load_state_dict(ckpt.state["scheduler"])
        self.step = ckpt.state["step"]
        self.consecutive_skips = ckpt.state["consecutive_skips"]
        self.skipped_total = ckpt.state["skipped_total"]
        self.controller.load_state_dict(ckpt.state["controller"])
        if "reward_monitor" in ckpt.state:  # absent from checkpoints of earlier versions
            self.reward_monitor.load_state_dict(ckpt.state["reward_monitor"])
        self.console.print(f"resumed from {ckpt.path} (step {self.step})")

    # ----- data -------------------------------------------------------------------------------------
    def _prompts(self, examples: list[Example], repeats: int) -> list[str]:
        formatted = format_prompts(
            self.tokenizer, [e.prompt for e in examples], self.config.model.chat_template
        )
        return [p for p in formatted for _ in range(repeats)]

    def _sample(
        self, examples: list[Example], repeats: int, seed: int, model: PreTrainedModel | None = None
    ) -> Rollout:
        r = self.config.rollout
        if self.vllm is not None and model is None:
            return self.vllm.sample(
                self._prompts(examples, repeats), r.max_new_tokens, r.temperature, r.top_p, seed
            )
        return sample(
            model or self.model,
            self.tokenizer,
            self._prompts(examples, repeats),
            r.max_new_tokens,
            r.temperature,
            r.top_p,
            seed=seed,
        )

    def _load_or_make_probe(self) -> Rollout | None:
        """The fixed probe set: prompts with continuations sampled once from the initial policy and their
        log-probs under it, written by rank 0 to ``RUN/probe.safetensors`` and read from there by every
        rank (and on resume). A sharded policy samples on every rank, since its forward pass is a
        collective."""
        d = self.config.diagnostics
        if d.probe_prompts == 0:
            return None
        path = self.run_dir / PROBE_FILE
        if self.ctx.broadcast_flag(not path.is_file()) and (self.ctx.is_main or self.sharded):
            seed = derive_seed(self.config.run.seed, 0, "probe")
            probe = self._sample(self.task.eval_examples(d.probe_prompts, seed=seed), d.probe_samples, seed)
            logp = self._policy_logp(probe)
            if self.ctx.is_main:
                _write_probe(probe, logp, path)
        self.ctx.barrier()
        t = {k: v.to(self.ctx.device) for k, v in load_file(str(path)).items()}
        mask = t["response_mask"].bool()
        prompt_len = int(t["prompt_len"])
        prompts = t["input_ids"][:, :prompt_len], t["attention_mask"][:, :prompt_len]
        return Rollout(
            t["input_ids"],
            t["attention_mask"],
            prompt_len,
            mask,
            t["logp"],
            [],
            SharedPrompts.of_rows(*prompts),
        )

    @torch.no_grad()
    def _policy_logp(self, rollout: Rollout) -> torch.Tensor:
        """The policy's log-probs of the response tokens, ``[B, T]``, 0 after EOS."""
        logits = response_logits(self.model, rollout, self.config.rollout.temperature)
        return torch.where(rollout.response_mask, token_logprobs(logits, rollout.responses), 0.0)

    @torch.no_grad()
    def probe_entropy(self, model: PreTrainedModel | None = None) -> float:
        """Mean exact entropy (nats, full vocabulary, sampling temperature) over the probe tokens."""
        assert self.probe is not None
        temperature = self.config.rollout.temperature
        if model is None:  # the policy: compiled with run.compile; the counterfactual's copies: eager
            with self._compiled_passes():
                entropy = self.functions.run(_entropy, self.model, self.probe, temperature)
        else:
            entropy = _entropy(model, self.probe, temperature)
        return _masked_mean(entropy, self.probe.response_mask)

    @contextlib.contextmanager
    def _compiled_passes(self) -> Iterator[None]:
        """Around the policy's passes that ``run.compile`` compiles: on a CPU, the model's plain ("eager")
        attention instead of SDPA, since inductor fuses its masking and softmax with the neighbouring
        operations while the SDPA kernel stays a separate call (tiny-0.1m: the compiled update about 12%
        faster); sampling keeps SDPA. Both attentions compute the same up to float rounding."""
        model = self.model
        before = model.config._attn_implementation
        switch = (
            self.functions.compiled
            and self.ctx.device.type == "cpu"
            and before == "sdpa"
            and model._can_set_attn_implementation()
        )
        if switch:
            model.set_attn_implementation("eager")
        try:
            yield
        finally:
            if switch:
                model.set_attn_implementation(before)

    # ----- one step ---------------------------------------------------------------------------------
    def collect(self, step: int) -> tuple[UpdateBatch, dict[str, float]]:
        """Rollout, rewards, old/reference log-probs and advantages for ``step`` (this rank's share of
        the prompts); the metrics are over the global batch."""
        c, seed, ctx = self.config, self.config.run.seed, self.ctx
        t0 = time.perf_counter()
        examples = self.task.examples(c.task.prompts_per_step, seed=derive_seed(seed, step, "data"))
        examples = ctx.shard(examples)
        rollout = self._sample(examples, c.rollout.group_size, derive_seed(seed, step, "sample") + ctx.rank)
        t1 = time.perf_counter()
        repeated = [e for e in examples for _ in range(c.rollout.group_size)]
        scored = score_batch(
            self.reward_fn,
            rollout.texts,
            repeated,
            timeout_s=c.reward.timeout_s,
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
            if self.value_head is None:
                with self._compiled_passes():
                    logp_old, entropy = self.functions.run(
                        _logp_and_entropy, self.model, rollout, c.rollout.temperature
                    )
            else:
                logits, hidden = response_logits_and_hidden(self.model, rollout, c.rollout.temperature)
                old_values = self.value_head(hidden)
                sums["value/mean"] = ((old_values * mask).sum(), n_tokens)
                per_token = token_stats(logits, rollout.responses)
                assert per_token.logp is not None and per_token.entropy is not None
                logp_old, entropy = per_token.logp, per_token.entropy
                del logits
            sums["entropy/rollout"] = ((entropy * mask).sum(), n_tokens)
            logp_ref, kl_penalty_tokens = None, torch.zeros_like(logp_old)
            if self.ref_model is not None:
                ref_logits = response_logits(self.ref_model, rollout, c.rollout.temperature)
                logp_ref = token_logprobs(ref_logits, rollout.responses)
                kl = kl_penalty(logp_old, logp_ref, c.loss.kl.kind)
                sums["kl/ref"] = ((kl * mask).sum(), n_tokens)
                if c.loss.kl.in_reward:
                    kl_penalty_tokens = c.loss.kl.coef * kl * mask
        metrics = self._global_means(sums)
        n = float(c.task.prompts_per_step * c.rollout.group_size)
        variance = max(metrics.pop("reward/sq") - metrics["reward/mean"] ** 2, 0.0) * n / max(n - 1, 1)
        metrics["reward/std"] = math.sqrt(variance)
        (metrics["reward/errors"],) = ctx.sum([float(scored.errors)])
        if hasattr(self.task, "skipped_lines"):
            metrics["data/skipped_lines"] = float(self.task.skipped_lines)
        ref_for_loss = logp_ref if not c.loss.kl.in_reward else None
        metrics["time/rollout_s"] = t1 - t0
        metrics["time/reward_s"] = t2 - t1
        if old_values is None:
            kind = c.advantage.kind
            assert kind != "gae", "gae runs with a value head"
            rewards = rewards - kl_penalty_tokens.sum(-1)
            advantages = group_advantages(rewards, c.rollout.group_size, kind)
            return UpdateBatch(rollout, advantages, logp_old, ref_for_loss), metrics
        token_rewards = terminal_rewards(rewards, mask) - kl_penalty_tokens
        advantages, returns = gae(token_rewards, old_values, mask, c.advantage.gamma, c.advantage.lam)
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

    def update_settings(self, action: ControlAction) -> UpdateSettings:
        """The update's settings for this step, with the controller's bounds and entropy coefficient."""
        c = self.config
        cov = None
        if c.control.kind in ("clip_cov", "kl_cov"):
            default_fraction = CLIP_COV_FRACTION if c.control.kind == "clip_cov" else KL_COV_FRACTION
            cov = CovSettings(
                kind=c.control.kind,
                fraction=c.control.cov_fraction or default_fraction,
                lower=c.control.cov_lower,
                upper=c.control.cov_upper,
                coef=c.control.kl_cov_coef,
            )
        return UpdateSettings(
            eps_low=action.eps_low,
            eps_high=action.eps_high,
            dual_clip=c.loss.dual_clip,
            agg=c.loss.agg,
            max_len=c.loss.max_len or c.rollout.max_new_tokens,
            temperature=c.rollout.temperature,
            epochs=c.optim.epochs,
            minibatches=c.optim.minibatches,
            grad_clip=c.optim.grad_clip,
            group_size=c.rollout.group_size if c.optim.group_minibatches else 1,
            entropy_coef=action.entropy_coef,
            kl_coef=c.loss.kl.coef if not c.loss.kl.in_reward else 0.0,
            kl_kind=c.loss.kl.kind,
            attribution=c.diagnostics.attribution,
            value_coef=c.advantage.value_coef,
            value_clip=c.advantage.value_clip,
            cov=cov,
        )

    def counterfactual(
        self, batch: UpdateBatch, settings: UpdateSettings, shuffle_seed: int
    ) -> dict[str, float]:
        """Probe entropy after the same update taken without clip-low and without clip-high, on copies."""
        out = {}
        for name, variant in (
            ("no_low", replace(settings, eps_low=None)),
            ("no_high", replace(settings, eps_high=None)),
        ):
            model, head = copy.deepcopy(self.model), copy.deepcopy(self.value_head)
            optimizer = torch.optim.AdamW(self._trainable_parameters(model, head))
            optimizer.load_state_dict(copy.deepcopy(self.optimizer.state_dict()))
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
            scheduler.load_state_dict(self.scheduler.state_dict())
            run_update(
                model, optimizer, scheduler, batch, replace(variant, attribution=False), shuffle_seed, 0, head
            )
            out[name] = self.probe_entropy(model)
        return out

    def train_step(self, step: int) -> dict[str, float]:
        """One full RL step; returns its metrics."""
        c = self.config
        t0 = time.perf_counter()
        batch, metrics = self.collect(step)
        action = self.controller.act(step, metrics["entropy/rollout"])
        settings = self.update_settings(action)
        shuffle_seed = derive_seed(c.run.seed, step, "shuffle")
        probe_before = None
        if self.probe is not None:
            probe_before = self._probe_cache if self._probe_cache is not None else self.probe_entropy()
        cf_due = c.diagnostics.counterfactual_every and step % c.diagnostics.counterfactual_every == 0
        counterfactual = self.counterfactual(batch, settings, shuffle_seed) if cf_due and self.probe else None
        t1 = time.perf_counter()
        with self._compiled_passes():
            stats, self.consecutive_skips = run_update(
                self.train_model,
                self.optimizer,
                self.scheduler,
                batch,
                settings,
                shuffle_seed,
                self.consecutive_skips,
                self.train_value_head,
                self.ctx,
                self.functions,
            )
        stats = stats.reduced(self.ctx)
        if self.vllm is not None:
            self.vllm.sync_weights(self.model)
        self.skipped_total += stats.skipped_steps
        t2 = time.perf_counter()
        metrics.update(stats.metrics())
        metrics["train/skipped_steps"] = float(self.skipped_total)
        metrics["optim/lr"] = float(self.scheduler.get_last_lr()[0])
        if action.eps_low is not None:
            metrics["control/eps_low"] = action.eps_low
        if action.eps_high is not None:
            metrics["control/eps_high"] = action.eps_high
        metrics["control/entropy_coef"] = action.entropy_coef
        metrics.update(self.controller.metrics())
        if probe_before is not None:
            probe_after = self.probe_entropy()
            self._probe_cache = probe_after
            metrics["entropy/probe_before"] = probe_before
            metrics["entropy/probe_after"] = probe_after
            metrics["entropy/probe_delta"] = probe_after - probe_before
            if counterfactual is not None:
                metrics["entropy/cf_effect_low"] = probe_after - counterfactual["no_low"]
                metrics["entropy/cf_effect_high"] = probe_after - counterfactual["no_high"]
        if c.eval.every and step % c.eval.every == 0 and (self.ctx.is_main or self.sharded):
            metrics.update(self.evaluate(step))
        t3 = time.perf_counter()
        metrics["time/update_s"] = t2 - t1
        metrics["time/step_s"] = t3 - t0
        return metrics

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """pass@1 and unbiased pass@k on held-out prompts; correct means eval reward > 0.5."""
        e, seed = self.config.eval, self.config.run.seed
        examples = self.task.eval_examples(e.prompts, seed=derive_seed(seed, 0, "eval"))
        rollout = self._sample(examples, e.k, derive_seed(seed, step, "eval"))
        repeated = [x for x in examples for _ in range(e.k)]
        scored = score_batch(
            self.eval_reward_fn, rollout.texts, repeated, timeout_s=self.config.reward.timeout_s, seed=seed
        )
        correct = (scored.rewards > 0.5).reshape(len(examples), e.k).sum(-1).tolist()
        return {
            "eval/pass@1": float(np.mean([pass_at_k(e.k, c, 1) for c in correct])),
            "eval/pass@k": float(np.mean([pass_at_k(e.k, c, e.k) for c in correct])),
            "eval/k": float(e.k),
        }

    # ----- the loop ---------------------------------------------------------------------------------
    def _checkpoint(self, logger: MetricsLogger | None) -> Path:
        """Sync the log to disk, then save: a checkpoint on disk always has its steps' rows there too."""
        if logger is not None:
            logger.sync()
        return self.save()

    def train(
        self, show_progress: bool = True, on_step: Callable[[int, dict[str, float]], None] | None = None
    ) -> Path:
        """Run from the current step to ``run.steps``; returns the run folder. ``on_step(step, metrics)`` is
        called after each step is logged."""
        c = self.config
        logger = None
        if self.ctx.is_main:
            atomic_write_text(self.run_dir / CONFIG_FILE, dump_config(c))
            logger = MetricsLogger(
                self.run_dir,
                resume_step=self.step,
                tensorboard=c.run.tensorboard,
                wandb_project=c.run.wandb_project,
                config=c.model_dump(mode="json"),
            )
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            disable=not (show_progress and self.ctx.is_main),
        )
        try:
            with progress:
                bar = progress.add_task(self.run_dir.name, total=c.run.steps, completed=self.step, info="")
                while self.step < c.run.steps:
                    step = self.step + 1
                    metrics = self.train_step(step)
                    self.step = step
                    if logger is not None:
                        logger.log(step, metrics)
                    progress.update(bar, completed=step, info=_progress_info(metrics))
                    if on_step is not None:
                        on_step(step, metrics)
                    if self.consecutive_skips >= c.optim.max_skipped_steps:
                        path = self._checkpoint(logger)
                        raise TrainingStopped(
                            f"{self.consecutive_skips} consecutive optimizer steps had a non-finite loss or "
                            f"gradient (optim.max_skipped_steps={c.optim.max_skipped_steps}); "
                            f"last good state saved to {path}"
                        )
                    every = c.run.checkpoint_every
                    if (every and step % every == 0) or step == c.run.steps:
                        self._checkpoint(logger)
        finally:
            if logger is not None:
                logger.close()
        return self.run_dir


def _logp_and_entropy(
    model: PreTrainedModel, rollout: Rollout, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's log-probs of the response tokens and its entropy at those positions, ``[B, T]``."""
    logp, entropy, _ = token_stats(response_logits(model, rollout, temperature), rollout.responses)
    assert logp is not None and entropy is not None
    return logp, entropy


def _entropy(model: PreTrainedModel, rollout: Rollout, temperature: float) -> torch.Tensor:
    """The policy's entropy at the positions that predict the response tokens, ``[B, T]``."""
    return token_entropy(response_logits(model, rollout, temperature))


def _write_probe(probe: Rollout, logp: torch.Tensor, path: Path) -> None:
    """Write the probe set and its log-probs ``[B, T]`` to ``path`` atomically."""
    tensors = {
        "input_ids": probe.input_ids,
        "attention_mask": probe.attention_mask,
        "response_mask": probe.response_mask.to(torch.uint8),
        "logp": logp,
        "prompt_len": torch.tensor(probe.prompt_len),
    }
    atomic_write_bytes(path, save({k: v.cpu() for k, v in tensors.items()}))


def _progress_info(m: dict[str, float]) -> str:
    parts = [f"H={m['entropy/rollout']:.3f}", f"R={m['reward/mean']:.2f}"]
    parts.append(f"low={m['clip_ratio/low_mean']:.3f} high={m['clip_ratio/high_mean']:.3f}")
    if "entropy/probe_after" in m:
        parts.append(f"probe={m['entropy/probe_after']:.3f}")
    if "eval/pass@1" in m:
        parts.append(f"pass@1={m['eval/pass@1']:.2f}")
    return " ".join(parts)
