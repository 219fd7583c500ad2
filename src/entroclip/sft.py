"""Supervised warm-up on a task with answers, so that RL starts from a policy with room to improve."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from entroclip.consoles import unwrapped_console
from entroclip.policy.builtin import save_builtin
from entroclip.policy.loading import format_prompts, load_policy
from entroclip.policy.sampling import sample
from entroclip.rewards import make_reward, score_batch
from entroclip.runio import atomic_write_text
from entroclip.tasks import Example, Task


@dataclass(frozen=True)
class SFTSettings:
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 30
    seed: int = 0
    eval_prompts: int = 256
    chat_template: str = "auto"


def teacher_forcing_batch(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], answers: list[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` ``[B, L]`` for prompt + answer + EOS, right-padded;
    labels are -100 on the prompt and on padding, so only the answer and EOS are learned."""
    rows, label_rows = [], []
    for prompt, answer in zip(prompts, answers, strict=True):
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        a = [*tokenizer(answer, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
        rows.append(p + a)
        label_rows.append([-100] * len(p) + a)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in label_rows])
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, attention, labels


def accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    chat_template: str,
    seed: int,
) -> float:
    """Exact-match accuracy of one sample per prompt at temperature 1 (the RL sampling distribution)."""
    prompts = format_prompts(tokenizer, [e.prompt for e in examples], chat_template)
    width = max(len(e.answer or "") for e in examples) + 2
    rollout = sample(model, tokenizer, prompts, max_new_tokens=width, temperature=1.0, seed=seed)
    scored = score_batch(make_reward("exact_match"), rollout.texts, examples, timeout_s=5.0, seed=seed)
    return float((scored.rewards > 0.5).float().mean())


def supervised_warmup(
    task: Task, model_source: str, out_dir: Path, settings: SFTSettings, console: Console | None = None
) -> dict[str, float]:
    """Fine-tune on ``task`` examples and save the model + tokenizer to ``out_dir`` with save_pretrained.

    ``model_source`` is a built-in model name or a local model folder. Returns the held-out accuracy of
    the saved model, reloaded through ``from_pretrained``.
    """
    console = console or unwrapped_console()
    held_out = task.eval_examples(settings.eval_prompts, seed=settings.seed)  # fails before any training
    out_dir.mkdir(parents=True, exist_ok=True)
    source = Path(model_source)
    if not (source / "config.json").is_file():
        if task.alphabet is None:
            raise ValueError(
                f"a built-in model needs a task with a fixed alphabet; task {task.name!r} has none"
            )
        source = save_builtin(model_source, task.alphabet, settings.seed, out_dir / "init")
    model, tokenizer = load_policy(source)
    tokenizer.padding_side = "right"
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
    total = settings.steps

    def factor(i: int) -> float:
        if i < settings.warmup:
            return (i + 1) / settings.warmup
        return 0.5 * (1 + math.cos(math.pi * (i - settings.warmup) / max(total - settings.warmup, 1)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    loss_value = float("nan")
    with Progress(console=console) as progress:
        bar = progress.add_task("sft", total=total)
        for i in range(total):
            examples = task.examples(settings.batch_size, seed=settings.seed * 1_000_003 + i)
            prompts = format_prompts(tokenizer, [e.prompt for e in examples], settings.chat_template)
            ids, attention, labels = teacher_forcing_batch(
                tokenizer, prompts, [e.answer or "" for e in examples]
            )
            loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            loss_value = float(loss.detach())
            progress.update(bar, advance=1, description=f"sft loss={loss_value:.3f}")
    model.save_pretrained(out_dir)
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(out_dir)
    reloaded, reloaded_tokenizer = load_policy(out_dir)
    acc = accuracy(reloaded, reloaded_tokenizer, held_out, settings.chat_template, settings.seed)
    summary = {"final_loss": loss_value, "accuracy": acc, "steps": float(total)}
    atomic_write_text(out_dir / "sft_summary.json", json.dumps(summary, indent=1))
    return summary
