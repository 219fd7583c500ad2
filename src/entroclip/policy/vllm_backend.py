"""Rollouts with vLLM (``rollout.backend: vllm``), colocated with the trainer on one GPU.

The engine is built once from the policy's local folder; after every update the trainer's weights are
loaded into it in place. The sampler's log-probs are kept for reference only: the trainer recomputes
``logp_old`` with its own forward pass, so the ratio never mixes two numerical implementations.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from entroclip.distributed import full_tensors
from entroclip.policy.sampling import Rollout, response_mask_from


def vllm_available() -> str | None:
    """None when vLLM can be used here, else the reason it cannot."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "vLLM is not installed (pip install vllm, on a CUDA machine)"
    if not torch.cuda.is_available():
        return "vLLM needs a CUDA GPU and none is visible"
    return None


class VLLMSampler:
    """Samples one response per prompt with a colocated vLLM engine built from ``model_dir``."""

    def __init__(
        self, model_dir: Path, tokenizer: PreTrainedTokenizerBase, gpu_memory_utilization: float
    ) -> None:
        reason = vllm_available()
        if reason is not None:
            raise RuntimeError(reason)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine lives in this process
        from vllm import LLM

        self.tokenizer = tokenizer
        self.llm = LLM(
            model=str(model_dir),
            tokenizer=str(model_dir),
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=True,
            dtype="auto",
        )

    def sync_weights(self, model: PreTrainedModel) -> None:
        """Load the trainer's current weights into the engine (when sharded, every rank must call it)."""
        engine_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        engine_model.load_weights(full_tensors(model))

    def sample(
        self, prompts: list[str], max_new_tokens: int, temperature: float, top_p: float, seed: int
    ) -> Rollout:
        from vllm import SamplingParams

        params = SamplingParams(
            temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed, logprobs=0
        )
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        prompt_ids = [list(o.prompt_token_ids) for o in outputs]
        response_ids = [list(o.outputs[0].token_ids) for o in outputs]
        response_logp = [
            [next(iter(step.values())).logprob for step in o.outputs[0].logprobs or []] for o in outputs
        ]
        prompt_len = max(map(len, prompt_ids))
        width = max(max(map(len, response_ids)), 1)
        device = torch.device("cuda")
        input_ids = torch.tensor(
            [
                [pad] * (prompt_len - len(p)) + p + r + [pad] * (width - len(r))
                for p, r in zip(prompt_ids, response_ids, strict=True)
            ],
            device=device,
        )
        prompt_mask = torch.tensor(
            [[0] * (prompt_len - len(p)) + [1] * len(p) for p in prompt_ids], device=device
        )
        responses = input_ids[:, prompt_len:]
        mask = response_mask_from(responses, eos) & (
            torch.arange(width, device=device)[None]
            < torch.tensor([len(r) for r in response_ids], device=device)[:, None]
        )
        logp = torch.zeros(mask.shape, device=device)
        for i, row in enumerate(response_logp):
            logp[i, : len(row)] = torch.tensor(row, device=device)
        texts = [o.outputs[0].text for o in outputs]
        return Rollout(
            input_ids, torch.cat([prompt_mask, mask.long()], 1), prompt_len, mask, logp * mask, texts
        )
