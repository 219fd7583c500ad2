"""Checks of a run that need more than its config: the model source, the data, the machine's memory and
disk. Each raises a ``ConfigError`` naming the config field, so a run that cannot go through is refused
with one line before it trains (and, for the checks that need no model, before its folder exists)."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase

from entroclip.config import Config, ConfigError
from entroclip.policy.loading import format_prompts, resolve_gguf
from entroclip.policy.vllm_backend import vllm_available
from entroclip.resources import available_memory, format_bytes
from entroclip.tasks import Task

T = TypeVar("T")

#: bytes per float32 element
_F32 = 4


def configured(section: str, build: Callable[[], T]) -> T:
    """``build()``, with its ValueError (bad option, missing file, missing module) turned into a
    ConfigError that names the config section."""
    try:
        return build()
    except (ValueError, TypeError, OSError, ImportError) as err:
        raise ConfigError(f"{section}: {err}") from None


def check_model_source(config: Config, task: Task) -> None:
    """The model folder holds a readable Hugging Face config, the GGUF file exists, a built-in model has
    a task with a fixed alphabet."""
    if config.model.path is not None:
        if not (Path(config.model.path) / "config.json").is_file():
            raise ConfigError(
                f"model.path is not a Hugging Face model folder (no config.json): {config.model.path}"
            )
        try:
            AutoConfig.from_pretrained(config.model.path, local_files_only=True)
        except (ValueError, OSError, KeyError, TypeError) as err:
            reason = " ".join(str(err).split())[:300]
            raise ConfigError(
                f"model.path: {config.model.path}/config.json is not a usable model config ({reason})"
            ) from None
    if config.model.gguf_file is not None:
        try:
            resolve_gguf(config.model.gguf_file)
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from None
    if config.model.builtin is not None and task.alphabet is None:
        raise ConfigError(f"model.builtin needs a task with a fixed alphabet; task.name={config.task.name!r}")


def check_rollout_backend(config: Config) -> None:
    if config.rollout.backend != "vllm":
        return
    reason = vllm_available()
    if reason is not None:
        raise ConfigError(f"rollout.backend=vllm: {reason}; use rollout.backend=hf")
    if config.model.gguf_file is not None:
        raise ConfigError("rollout.backend=vllm needs model.path or model.builtin, not model.gguf_file")


def check_distributed(config: Config, world: int) -> None:
    """Sizes that must divide over ``world`` ranks, and what runs in one process only."""
    if world == 1:
        return
    if config.task.prompts_per_step % world:
        raise ConfigError(
            f"task.prompts_per_step must be divisible by the number of ranks ({world}), "
            f"got {config.task.prompts_per_step}"
        )
    optim, per_rank = config.optim, config.task.prompts_per_step // world
    units = per_rank if optim.group_minibatches else per_rank * config.rollout.group_size
    if optim.minibatches > units:
        raise ConfigError(
            f"optim.minibatches must be <= the {'prompts' if optim.group_minibatches else 'responses'} of "
            f"one rank ({units} over {world} ranks), got {optim.minibatches}"
        )
    if config.diagnostics.counterfactual_every:
        raise ConfigError("diagnostics.counterfactual_every must be 0 under torchrun (single process only)")


def check_held_out(config: Config, task: Task, probe_seed: int, eval_seed: int) -> None:
    """The task's held-out split has the probe's and the evaluation's prompts (drawn as the run will)."""
    diagnostics, evaluation = config.diagnostics, config.eval
    if diagnostics.probe_prompts:
        configured(
            "diagnostics.probe_prompts",
            lambda: task.eval_examples(diagnostics.probe_prompts, seed=probe_seed),
        )
    if evaluation.every:
        configured("eval.prompts", lambda: task.eval_examples(evaluation.prompts, seed=eval_seed))


def check_sinks(config: Config) -> None:
    if config.run.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ConfigError("run.wandb_project is set but wandb is not installed: pip install wandb")


def check_free_space(run_dir: Path, need_bytes: int) -> None:
    """Raise a ConfigError when the run folder's disk has less than ``need_bytes`` free."""
    free = shutil.disk_usage(run_dir).free
    if free < need_bytes:
        raise ConfigError(
            f"not enough free disk space for run.out_dir {run_dir}: {format_bytes(free)} free, a "
            f"checkpoint needs about {format_bytes(need_bytes)}"
        )


def check_context_length(
    config: Config, task: Task, tokenizer: PreTrainedTokenizerBase, model_config: PretrainedConfig
) -> None:
    """A prompt of the task plus ``rollout.max_new_tokens`` fits the model's positions."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    prompt = format_prompts(tokenizer, [task.examples(1, seed=0)[0].prompt], config.model.chat_template)[0]
    length = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    if length + config.rollout.max_new_tokens > limit:
        raise ConfigError(
            f"rollout.max_new_tokens ({config.rollout.max_new_tokens}) plus a prompt of task "
            f"{config.task.name!r} ({length} tokens) exceed the model's {limit} positions; shorten the "
            "task's prompts (task.options) or lower rollout.max_new_tokens"
        )


def step_memory_bytes(config: Config, model_config: PretrainedConfig, n_params: int, world: int = 1) -> int:
    """A rough upper estimate of one rank's peak memory in a step, in bytes: the weights with their
    gradients and AdamW moments, plus the largest of the step's passes over full-vocabulary logits: the
    rollout's old log-probs (every response token), a minibatch's forward and backward (logits, their
    gradient and softmax), generation's KV cache and the probe's and evaluation's batches."""
    vocab = int(getattr(model_config, "vocab_size", 0) or 0)
    hidden = int(getattr(model_config, "hidden_size", 0) or 0)
    layers = int(getattr(model_config, "num_hidden_layers", 0) or 0)
    tokens = config.rollout.max_new_tokens
    batch = config.task.prompts_per_step * config.rollout.group_size // world
    minibatch = -(-batch // config.optim.minibatches)
    eval_batch = config.eval.prompts * config.eval.k if config.eval.every else 0
    probe_batch = config.diagnostics.probe_prompts * config.diagnostics.probe_samples
    passes = max(
        batch * tokens * vocab,  # old log-probs and entropy of the rollout
        3 * minibatch * tokens * vocab,  # logits, their gradient and the softmax of one minibatch
        probe_batch * tokens * vocab,
        max(batch, eval_batch) * (vocab + 2 * layers * hidden * tokens),  # generation: logits + KV cache
    )
    return _F32 * (4 * n_params + passes)


def check_memory(need_bytes: int, device: torch.device) -> None:
    """Refuse a step that cannot fit the device's free memory, with the estimate in the message."""
    free = available_memory(device)
    if free is not None and need_bytes > free:
        raise ConfigError(
            f"a step of this config needs about {format_bytes(need_bytes)} of memory and "
            f"{format_bytes(free)} is free on {device.type}; lower task.prompts_per_step, "
            "rollout.group_size, rollout.max_new_tokens, eval.prompts or eval.k, or raise optim.minibatches"
        )
