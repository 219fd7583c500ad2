"""The policy's no-grad passes over sampled responses: log-probs and exact entropy, ``[B, T]``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import PreTrainedModel

from entroclip.compiling import CompileCache
from entroclip.entropy import token_entropy, token_stats
from entroclip.policy.sampling import Rollout, response_logits, token_logprobs


def logp_and_entropy(
    model: PreTrainedModel, rollout: Rollout, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's log-probs of the response tokens and its entropy at those positions, ``[B, T]``."""
    logp, entropy, _ = token_stats(response_logits(model, rollout, temperature), rollout.responses)
    assert logp is not None and entropy is not None
    return logp, entropy


def response_entropy(model: PreTrainedModel, rollout: Rollout, temperature: float) -> torch.Tensor:
    """The policy's entropy at the positions that predict the response tokens, ``[B, T]``."""
    return token_entropy(response_logits(model, rollout, temperature))


@torch.no_grad()
def response_logp(model: PreTrainedModel, rollout: Rollout, temperature: float) -> torch.Tensor:
    """The policy's log-probs of the response tokens, ``[B, T]``, 0 after EOS."""
    logits = response_logits(model, rollout, temperature)
    return torch.where(rollout.response_mask, token_logprobs(logits, rollout.responses), 0.0)


@contextlib.contextmanager
def compiled_passes(model: PreTrainedModel, functions: CompileCache, device: torch.device) -> Iterator[None]:
    """Around the policy's passes that ``run.compile`` compiles: on a CPU, the model's plain ("eager")
    attention instead of SDPA, since inductor fuses its masking and softmax with the neighbouring
    operations while the SDPA kernel stays a separate call (the compiled update is faster, see
    benchmarks/RESULTS.md); sampling keeps SDPA. Both attentions compute the same up to float rounding."""
    before = model.config._attn_implementation
    switch = (
        functions.compiled
        and device.type == "cpu"
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
