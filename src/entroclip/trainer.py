"""The RLVR loop: rollout -> reward -> advantage -> mu epochs of minibatch updates -> metrics -> checkpoint.

The loop knows nothing about any particular task or model. Every random choice is seeded from
``(run.seed, step, stream)``, so a run resumed from a checkpoint continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
from transformers import PreTrainedModel

from entroclip.allocator import keep_freed_memory
from entroclip.checkpoint import (
    save_checkpoint,
)
from entroclip.compiling import CompileCache
from entroclip.config import Config, ConfigError, dump_config
from entroclip.consoles import unwrapped_console
from entroclip.control import make_controller
from entroclip.distributed import (
    DistContext,
    data_parallel,
    full_optimizer_state,
    load_optimizer_state,
    place,
)
from entroclip.logging import MetricsLogger
from entroclip.policy.builtin import save_builtin
from entroclip.policy.loading import load_policy
from entroclip.policy.sampling import (
    Rollout,
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
    make_reward,
)
from entroclip.rl.counterfactual import counterfactual_probe
from entroclip.rl.evaluate import pass_metrics
from entroclip.rl.optim import make_optimizer, make_scheduler, trainable_parameters
from entroclip.rl.passes import compiled_passes, response_entropy, response_logp
from entroclip.rl.probe import masked_mean, read_probe, write_probe
from entroclip.rl.rollout import Collector, Policies, Sampler
from entroclip.rl.state import gather_weights, load_weights, resume_point
from entroclip.runio import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    PROBE_FILE,
    atomic_write_text,
    config_fingerprint,
    derive_seed,
    prepare_run_dir,
)
from entroclip.tasks import Task, make_task
from entroclip.trust import check_config_code
from entroclip.update import RunSettings, run_update
from entroclip.value import ValueHead


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (e.g. too many consecutive non-finite steps); a checkpoint was written."""


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
                place(module, self.ctx, self.sharded)
        params = trainable_parameters(self.model, self.value_head)
        # weights and the two AdamW moments, plus room for metrics and events
        check_free_space(self.run_dir, 3 * sum(p.numel() * p.element_size() for p in params) + 2**20)
        self.optimizer = make_optimizer(params, config)
        self.scheduler = make_scheduler(self.optimizer, config)
        self.step = 0
        self.consecutive_skips = 0
        self.controller = make_controller(config.control, config.loss)
        self.sampler = Sampler(self.tokenizer, config)
        self.collector = Collector(config, self.task, self.reward_fn, self.sampler, self.ctx, self.console)
        self.skipped_total = 0
        if resume:
            self._restore()
        self.sampler.vllm = self._vllm_sampler()
        self.train_model = data_parallel(self.model, self.ctx, self.sharded)
        self.train_value_head = (
            data_parallel(self.value_head, self.ctx, self.sharded) if self.value_head is not None else None
        )
        # on a CPU, a C++ wrapper around inductor's kernels spares their Python calls (tiny-0.1m: the
        # compiled step about 7% faster, for a few more seconds of compilation)
        cpp_wrapper = {"cpp_wrapper": True} if self.ctx.device.type == "cpu" else None
        self.compiler = CompileCache(config.run.compile, options=cpp_wrapper)
        self.settings = RunSettings.from_config(config)
        self.policies = Policies(self.model, self.value_head, self.ref_model, self.compiler)
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
        source = self.config.model
        folder = self.run_dir / "init_model" if source.builtin is not None else Path(source.path or "")
        sampler = VLLMSampler(folder, self.tokenizer, self.config.rollout.vllm_gpu_memory, self.ctx)
        sampler.sync_weights(self.model)  # a resumed run starts from its checkpoint
        return sampler

    def _load_initial_policy(self) -> tuple[PreTrainedModel, Any]:
        source = self.config.model
        dtype = torch.bfloat16 if source.dtype == "bfloat16" else torch.float32
        if source.builtin is not None:
            folder = self.run_dir / "init_model"
            if self.ctx.is_main and not (folder / "config.json").is_file():
                save_builtin(source.builtin, self.task.alphabet or "", self.config.run.seed, folder)
            self.ctx.barrier()
            return load_policy(folder, dtype=dtype)
        return load_policy(source.path, source.gguf_file, dtype=dtype)

    @staticmethod
    def _frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
        ref = copy.deepcopy(model).eval()
        ref.requires_grad_(False)
        return ref

    def _state(self) -> dict[str, Any]:
        """What a checkpoint holds besides the weights (keys: ``CHECKPOINT_STATE_KEYS``)."""
        return {
            "step": self.step,
            "optimizer": full_optimizer_state(self.optimizer, self.ctx),
            "scheduler": self.scheduler.state_dict(),
            "consecutive_skips": self.consecutive_skips,
            "controller": self.controller.state_dict(),
            "skipped_total": self.skipped_total,
            "reward_monitor": self.collector.reward_monitor.state_dict(),
        }

    def save(self) -> Path:
        """Checkpoint the current state: every rank takes part in gathering it whole, rank 0 writes."""
        weights, state = gather_weights(self.model, self.value_head), self._state()
        if not self.ctx.is_main:
            return self.run_dir / CHECKPOINT_DIR
        run_files = [PROBE_FILE] if (self.run_dir / PROBE_FILE).is_file() else []
        return save_checkpoint(self.run_dir, self.step, weights, state, self.fingerprint, run_files)

    def _restore(self) -> None:
        ckpt = resume_point(self.run_dir, self.fingerprint, self.console)
        if ckpt is None:
            return
        load_weights(ckpt, self.model, self.value_head)
        load_optimizer_state(self.optimizer, ckpt.state["optimizer"])
        self.scheduler.load_state_dict(ckpt.state["scheduler"])
        self.step = ckpt.state["step"]
        self.consecutive_skips = ckpt.state["consecutive_skips"]
        self.skipped_total = ckpt.state["skipped_total"]
        self.controller.load_state_dict(ckpt.state["controller"])
        if "reward_monitor" in ckpt.state:  # absent from checkpoints of earlier versions
            self.collector.reward_monitor.load_state_dict(ckpt.state["reward_monitor"])
        self.console.print(f"resumed from {ckpt.path} (step {self.step})")

    # ----- data -------------------------------------------------------------------------------------
    def _load_or_make_probe(self) -> Rollout | None:
        """The fixed probe set: prompts with continuations sampled once from the initial policy and their
        log-probs under it, written by rank 0 to ``RUN/probe.safetensors`` and read from there by every
        rank (and on resume). A sharded policy samples on every rank, since its forward pass is a
        collective."""
        diagnostics = self.config.diagnostics
        if diagnostics.probe_prompts == 0:
            return None
        path = self.run_dir / PROBE_FILE
        if self.ctx.broadcast_flag(not path.is_file()) and (self.ctx.is_main or self.sharded):
            seed = derive_seed(self.config.run.seed, 0, "probe")
            probe = self.sampler(
                self.model,
                self.task.eval_examples(diagnostics.probe_prompts, seed=seed),
                diagnostics.probe_samples,
                seed,
            )
            logp = response_logp(self.model, probe, self.config.rollout.temperature)
            if self.ctx.is_main:
                write_probe(probe, logp, path)
        self.ctx.barrier()
        return read_probe(path, self.ctx.device)

    @torch.no_grad()
    def probe_entropy(self, model: PreTrainedModel | None = None) -> float:
        """Mean exact entropy (nats, full vocabulary, sampling temperature) over the probe tokens."""
        assert self.probe is not None
        temperature = self.config.rollout.temperature
        if model is None:  # the policy: compiled with run.compile; the counterfactual's copies: eager
            with self._compiled_passes():
                entropy = self.compiler.call(response_entropy, self.model, self.probe, temperature)
        else:
            entropy = response_entropy(model, self.probe, temperature)
        return masked_mean(entropy, self.probe.response_mask)

    def _compiled_passes(self) -> contextlib.AbstractContextManager[None]:
        return compiled_passes(self.model, self.compiler, self.ctx.device)

    # ----- one step ---------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        """One full RL step; returns its metrics."""
        config = self.config
        t0 = time.perf_counter()
        batch, metrics = self.collector.collect(step, self.policies)
        action = self.controller.act(step, metrics["entropy/rollout"])
        shuffle_seed = derive_seed(config.run.seed, step, "shuffle")
        probe_before = None
        if self.probe is not None:
            probe_before = self._probe_cache if self._probe_cache is not None else self.probe_entropy()
        counterfactual = None
        if (
            self.probe is not None
            and config.diagnostics.counterfactual_every
            and step % config.diagnostics.counterfactual_every == 0
        ):
            update = (batch, self.settings, action, shuffle_seed)
            counterfactual = counterfactual_probe(
                self.model,
                self.value_head,
                self.optimizer,
                self.scheduler,
                update,
                self.probe_entropy,
                config,
            )
        t1 = time.perf_counter()
        with self._compiled_passes():
            stats, self.consecutive_skips = run_update(
                self.train_model,
                self.optimizer,
                self.scheduler,
                batch,
                self.settings,
                action,
                shuffle_seed,
                self.consecutive_skips,
                self.train_value_head,
                self.ctx,
                self.compiler,
            )
        stats = stats.reduced(self.ctx)
        if self.sampler.vllm is not None:  # the engine samples the next rollout with the new weights
            self.sampler.vllm.sync_weights(self.model)
        self.skipped_total += stats.skipped_steps
        t2 = time.perf_counter()
        metrics.update(stats.metrics())
        metrics["train/skipped_steps"] = float(self.skipped_total)
        metrics["optim/lr"] = float(self.scheduler.get_last_lr()[0])
        metrics.update(action.metrics())
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
        if config.eval.every and step % config.eval.every == 0 and (self.ctx.is_main or self.sharded):
            metrics.update(self.evaluate(step))
        t3 = time.perf_counter()
        metrics["time/update_s"] = t2 - t1
        metrics["time/step_s"] = t3 - t0
        return metrics

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """pass@1 and unbiased pass@k on held-out prompts; correct means eval reward > 0.5."""
        evaluation, seed = self.config.eval, self.config.run.seed
        examples = self.task.eval_examples(evaluation.prompts, seed=derive_seed(seed, 0, "eval"))
        rollout = self.sampler(self.model, examples, evaluation.k, derive_seed(seed, step, "eval"))
        return pass_metrics(
            self.eval_reward_fn, rollout.texts, examples, evaluation.k, self.config.reward.timeout_s, seed
        )

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
        config = self.config
        logger = None
        if self.ctx.is_main:
            atomic_write_text(self.run_dir / CONFIG_FILE, dump_config(config))
            logger = MetricsLogger(
                self.run_dir,
                resume_step=self.step,
                tensorboard=config.run.tensorboard,
                wandb_project=config.run.wandb_project,
                config=config.model_dump(mode="json"),
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
                bar = progress.add_task(
                    self.run_dir.name, total=config.run.steps, completed=self.step, info=""
                )
                while self.step < config.run.steps:
                    step = self.step + 1
                    metrics = self.train_step(step)
                    self.step = step
                    if logger is not None:
                        logger.log(step, metrics)
                    progress.update(bar, completed=step, info=_progress_info(metrics))
                    if on_step is not None:
                        on_step(step, metrics)
                    if self.consecutive_skips >= config.optim.max_skipped_steps:
                        path = self._checkpoint(logger)
                        raise TrainingStopped(
                            f"{self.consecutive_skips} consecutive optimizer steps had a non-finite loss or "
                            f"gradient (optim.max_skipped_steps={config.optim.max_skipped_steps}); "
                            f"last good state saved to {path}"
                        )
                    every = config.run.checkpoint_every
                    if (every and step % every == 0) or step == config.run.steps:
                        self._checkpoint(logger)
        finally:
            if logger is not None:
                logger.close()
        return self.run_dir


def _progress_info(m: dict[str, float]) -> str:
    parts = [f"H={m['entropy/rollout']:.3f}", f"R={m['reward/mean']:.2f}"]
    parts.append(f"low={m['clip_ratio/low_mean']:.3f} high={m['clip_ratio/high_mean']:.3f}")
    if "entropy/probe_after" in m:
        parts.append(f"probe={m['entropy/probe_after']:.3f}")
    if "eval/pass@1" in m:
        parts.append(f"pass@1={m['eval/pass@1']:.2f}")
    return " ".join(parts)
