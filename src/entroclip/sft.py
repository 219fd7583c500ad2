"""Supervised warm-up on a task with answers, so that RL starts from a policy with room to improve."""

from __future__ import annotations

import json
import math
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from entroclip.consoles import unwrapped_console
from entroclip.policy.builtin import BUILTIN_MODELS, save_builtin
from entroclip.policy.loading import format_prompts, load_policy
from entroclip.policy.sampling import sample
from entroclip.rewards import make_reward, score_batch
from entroclip.runio import atomic_write_text
from entroclip.tasks import Example, Task, sft_target

#: the file sft writes last: a folder holding it is a finished sft output, which --overwrite may replace
SUMMARY_FILE = "sft_summary.json"

#: upper bounds of the sft settings: a typo is refused before it runs for days or exhausts the memory
MAX_STEPS, MAX_PROMPTS, MAX_SEED = 1_000_000, 65536, 2**32 - 1


def check_range(option: str, value: int, low: int, high: int) -> None:
    """Raise a one-line ValueError naming ``option`` and its range unless ``low <= value <= high``."""
    if not low <= value <= high:
        raise ValueError(f"{option} must be in [{low}, {high}], got {value}")


@dataclass(frozen=True)
class SFTSettings:
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 30
    seed: int = 0
    eval_prompts: int = 256
    chat_template: str = "auto"

    def __post_init__(self) -> None:
        """Refuse values that cannot train, naming the sft command's option and its range."""
        for option, value, low, high in (
            ("--steps", self.steps, 1, MAX_STEPS),
            ("--batch-size", self.batch_size, 1, MAX_PROMPTS),
            ("--seed", self.seed, 0, MAX_SEED),
            ("--eval-prompts", self.eval_prompts, 1, MAX_PROMPTS),
        ):
            check_range(option, value, low, high)
        if not 0 < self.lr <= 1:  # NaN is refused too
            raise ValueError(f"--lr must be in (0, 1], got {self.lr:g}")


def model_folder(model_source: str) -> Path | None:
    """The local Hugging Face model folder ``model_source`` names, or None for a built-in model name;
    anything else is refused (a mistyped path must not pass for a built-in name)."""
    source = Path(model_source)
    if (source / "config.json").is_file():
        return source
    if model_source in BUILTIN_MODELS:
        return None
    raise ValueError(
        f"--model must be a built-in model ({', '.join(sorted(BUILTIN_MODELS))}) or a local Hugging Face "
        f"model folder with config.json, got {model_source!r}"
    )


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse an ``out_dir`` that is not empty, unless it holds an earlier sft output and ``overwrite``."""
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return
    if not (out_dir / SUMMARY_FILE).is_file():
        raise ValueError(f"--out {out_dir} exists and is not an sft output folder (no {SUMMARY_FILE} in it)")
    if not overwrite:
        raise ValueError(f"--out {out_dir} holds an earlier sft output (use --overwrite to replace it)")


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
    reward: str = "exact_match",
) -> float:
    """Accuracy (``reward`` > 0.5) of one sample per prompt at temperature 1 (the RL sampling
    distribution), with room for the longest target (a reasoning trace's included)."""
    prompts = format_prompts(tokenizer, [e.prompt for e in examples], chat_template)
    width = max(len(sft_target(e)) for e in examples) + 2
    rollout = sample(model, tokenizer, prompts, max_new_tokens=width, temperature=1.0, seed=seed)
    scored = score_batch(make_reward(reward), rollout.texts, examples, timeout_s=5.0, seed=seed)
    return float((scored.rewards > 0.5).float().mean())


def supervised_warmup(
    task: Task,
    model_source: str,
    out_dir: Path,
    settings: SFTSettings,
    console: Console | None = None,
    overwrite: bool = False,
) -> dict[str, float]:
    """Fine-tune on ``task`` examples and save the model + tokenizer to ``out_dir`` with save_pretrained.

    ``model_source`` is a built-in model name or a local model folder. ``out_dir`` must be empty or absent,
    or (with ``overwrite``) hold an earlier sft output. Returns the held-out accuracy of the saved model,
    reloaded through ``from_pretrained``. Everything is written to a temporary folder beside ``out_dir``
    that takes its place once complete: a failure leaves ``out_dir`` as it was.
    """
    console = console or unwrapped_console()
    source = model_folder(model_source)
    check_out_dir(out_dir, overwrite)
    held_out = task.eval_examples(settings.eval_prompts, seed=settings.seed)  # fails before any training
    if source is None and task.alphabet is None:
        raise ValueError(f"a built-in model needs a task with a fixed alphabet; task {task.name!r} has none")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # a fresh name (not mkdtemp, whose folder is private to the user), hidden beside --out
    partial = out_dir.parent / f".{out_dir.name}.{secrets.token_hex(4)}.partial"
    partial.mkdir()
    try:
        if source is None:  # a built-in model, saved with the task's alphabet (checked above)
            source = save_builtin(model_source, task.alphabet or "", settings.seed, partial / "init")
        summary = _train_into(source, partial, held_out, settings, task, console)
        if out_dir.exists():  # empty, or an earlier output that check_out_dir let --overwrite replace
            shutil.rmtree(out_dir)
        partial.rename(out_dir)
    except BaseException:  # Ctrl+C included: a half-written folder would block the re-run
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return summary


def _train_into(
    source: Path, out_dir: Path, held_out: list[Example], settings: SFTSettings, task: Task, console: Console
) -> dict[str, float]:
    """supervised_warmup's training of the model in ``source``, saved into ``out_dir`` (its temporary
    folder) with the summary, written last."""
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
                tokenizer, prompts, [sft_target(e) for e in examples]
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
    # a reasoning-trace task is scored on its answer only
    reward = "trace_answer" if getattr(task, "delimiter", None) is not None else "exact_match"
    acc = accuracy(reloaded, reloaded_tokenizer, held_out, settings.chat_template, settings.seed, reward)
    summary = {"final_loss": loss_value, "accuracy": acc, "steps": float(total)}
    atomic_write_text(out_dir / SUMMARY_FILE, json.dumps(summary, indent=1))
    return summary
