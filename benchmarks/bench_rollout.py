"""Rollout throughput: ``entroclip.policy.sampling.sample`` against plain ``model.generate``.

Same model, prompts (batch), sampling settings (temperature 1, top-p 1, top-k off), max new tokens and seed,
so both produce the same tokens (checked). ``sample`` is timed as the trainer calls it: tokenise +
``generate`` + response mask + decode (no scores: the trainer recomputes the log-probs in its own forward
pass); the plain side is tokenise + ``generate`` + decode. Throughput = generated response tokens (up to
and including EOS) per second of wall time. One untimed ``sample(return_logp=True)`` per case checks the
sampler's log-probs against the training forward.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import harness
import torch

from entroclip.policy.sampling import response_logits, response_mask_from, sample, token_logprobs

NAME = "rollout"
TITLE = "Rollout throughput: sample vs model.generate"
#: |ratio - 1| below this counts as equal within noise
NOISE = 0.03


def plain_generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, seed: int) -> Any:
    """What a user would write with ``model.generate`` for the same rollout."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    model.eval()
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    responses = out[:, enc["input_ids"].shape[1] :]
    tokenizer.batch_decode(responses, skip_special_tokens=True)
    return out


#: Words per prompt of the wide model's prompts (the built-in models take 2-digit additions).
SHORT, LONG = 8, 256


def cases(quick: bool) -> list[tuple[str, str, int, int, int, int]]:
    """(label, kind, vocab, batch, max new tokens, words per prompt of the wide model)."""
    if quick:
        return [("tiny-0.1m", "tiny-0.1m", 16, 128, 6, 0), ("vocab 32,000", "wide", 32_000, 32, 16, SHORT)]
    return [
        ("tiny-0.1m (quick.yaml)", "tiny-0.1m", 16, 128, 6, 0),
        ("tiny-0.1m", "tiny-0.1m", 16, 128, 64, 0),
        ("tiny-3m", "tiny-3m", 16, 128, 64, 0),
        ("tiny-0.1m shape, vocab 32,000", "wide", 32_000, 128, 64, SHORT),
        (f"tiny-0.1m shape, vocab 32,000, {LONG}-word prompts", "wide", 32_000, 128, 16, LONG),
    ]


def run(quick: bool, threads: int) -> dict[str, Any]:
    reps = 3 if quick else 11
    rows, goals, data = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, kind, vocab, batch, new_tokens, words in cases(quick):
            folder = Path(tmp) / kind
            if kind == "wide":
                model, tokenizer = harness.wide_policy(folder, vocab)
                prompts = harness.word_prompts(vocab, batch // 8, 8, length=words)
            else:
                model, tokenizer = harness.builtin_policy(kind, folder)
                prompts = harness.addition_prompts(batch // 8, 8)
            rollout = sample(model, tokenizer, prompts, new_tokens, seed=0, return_logp=True)
            plain = plain_generate(model, tokenizer, prompts, new_tokens, seed=0)
            same = rollout.input_ids.shape == plain.shape and torch.equal(rollout.input_ids, plain)
            tokens = {
                "sample": int(rollout.response_mask.sum()),
                "generate": int(
                    response_mask_from(plain[:, rollout.prompt_len :], tokenizer.eos_token_id).sum()
                ),
            }
            with torch.no_grad():
                recomputed = token_logprobs(response_logits(model, rollout, 1.0), rollout.responses)
            assert rollout.sampler_logp is not None
            logp_error = float(((recomputed - rollout.sampler_logp).abs() * rollout.response_mask).max())
            times = harness.interleaved(
                {
                    "sample": lambda: sample(model, tokenizer, prompts, new_tokens, seed=0),  # noqa: B023
                    "generate": lambda: plain_generate(model, tokenizer, prompts, new_tokens, 0),  # noqa: B023
                },
                reps=reps,
                warmup=1,
            )
            data[label] = {"times": times, "tokens": tokens, "same_tokens": same, "logp_error": logp_error}
            tps = {k: tokens[k] / harness.median(v) for k, v in times.items()}
            ratio = tps["sample"] / tps["generate"]
            rows.append(
                [
                    label,
                    f"{batch} x {new_tokens}",
                    f"{tokens['sample']} / {tokens['generate']}",
                    harness.spread(times["sample"]),
                    harness.spread(times["generate"]),
                    f"{tps['sample']:.0f}",
                    f"{tps['generate']:.0f}",
                    f"{ratio:.3f}",
                    "yes" if same else "no",
                    f"{logp_error:.1e}",
                ]
            )
            goals.append(
                harness.goal(
                    f"sample throughput >= generate within noise ({label})",
                    f"ratio {ratio:.3f}",
                    ratio >= 1 - NOISE,
                )
            )
    header = [
        "model",
        "batch x max new tokens",
        "generated tokens (sample / generate)",
        "sample, ms median [min-max]",
        "generate, ms",
        "sample tokens/s",
        "generate tokens/s",
        "ratio sample / generate",
        "same tokens as generate",
        "max abs diff of sample(return_logp=True)'s log-probs vs the training forward",
    ]
    table = harness.table(f"median of {reps} interleaved repetitions, {threads} threads", header, rows)
    missed = [g for g in goals if not g["met"]]
    prose = (
        "`sample` is `model.generate` with a dynamic KV cache and batched prefill of the left-padded "
        "prompts, where the 8 copies of each prompt share one forward pass over all but its last token "
        f"(the cache is copied to their rows: the gain shows with the {LONG}-word prompts), timed as the "
        "trainer calls it: without the per-step "
        "scores, since the trainer "
        "recomputes the old log-probs in its own forward pass (`sample(return_logp=True)` keeps the "
        "scores and returns the sampled tokens' log-probs; the last column checks them). Equal within "
        f"noise means a ratio of at least {1 - NOISE:.2f}. "
        + (
            "The goal is met on every case measured."
            if not missed
            else "The goal is missed on: "
            + ", ".join(g["goal"].split("(", 1)[1].rstrip(")") + f" ({g['measured']})" for g in missed)
            + "."
        )
    )
    return harness.result(NAME, TITLE, quick, threads, [table], goals, prose, data=data)


if __name__ == "__main__":
    harness.main_for(NAME, run, __doc__)
