"""Rollouts with vLLM (``rollout.backend: vllm``): one colocated engine per rank, on that rank's GPU.

The engine runs in the trainer's process (vLLM's ``external_launcher`` executor, tensor parallel size 1),
is built once from the policy's local folder, and after every update the trainer's weights are loaded
into it in place and its prefix cache is cleared. Its output is turned into a ``Rollout`` with the
conventions of ``sampling.sample``: the prompts are tokenized here, without special tokens, and left-
padded; texts are decoded from the masked response tokens. The sampler's log-probs are kept for
reference only: the trainer recomputes ``logp_old`` with its own forward pass, so the ratio never mixes
two numerical implementations.

vLLM also stops at the end-of-sequence ids of the model's generation config, not only at the
tokenizer's EOS; such a response ends at that token and is padded after it.

The vLLM calls here (``LLM``'s arguments, ``SamplingParams``, ``generate`` with token-id prompts, the
engine's model reached through ``llm_engine.model_executor.driver_worker.model_runner.model``,
``reset_prefix_cache``, and the ``RequestOutput``/``CompletionOutput``/``Logprob`` attributes) were
checked against the source of vLLM 0.31.0 and 0.33.0, where they are the same; TRL 1.16's colocate mode
makes the same calls. ``logprobs_mode`` needs vLLM 0.10.0 or later (0.9.2 lacks it).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from entroclip.distributed import DistContext
from entroclip.policy.sampling import Rollout, SharedPrompts, response_mask_from


def vllm_available() -> str | None:
    """None when vLLM can be used here, else the reason it cannot."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "vLLM is not installed (pip install vllm, on a CUDA machine)"
    if not torch.cuda.is_available():
        return "vLLM needs a CUDA GPU and none is visible"
    return None


def set_launcher_env(ctx: DistContext) -> None:
    """Set the torchrun variables that vLLM's external launcher reads, keeping any already set."""
    defaults = {
        "RANK": ctx.rank,
        "LOCAL_RANK": ctx.device.index or 0,
        "WORLD_SIZE": ctx.world_size,
        "MASTER_ADDR": "localhost",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, str(value))
    if not os.environ.get("MASTER_PORT"):
        os.environ["MASTER_PORT"] = str(_free_port())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def engine_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``model``'s parameters as (name, whole tensor), tied ones once; gathered one at a time when
    sharded (then every rank must consume all of it)."""
    for name, param in model.named_parameters():
        yield name, param.full_tensor() if isinstance(param, DTensor) else param.detach()


def request_seeds(seed: int, n: int) -> list[int]:
    """``n`` distinct 63-bit seeds from ``seed``, one per request: vLLM seeds each request on its own, so
    repeated prompts with one seed would get identical responses."""
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(n, np.uint64) >> 1]


def sampled_logprobs(completion: Any) -> list[float]:
    """The log-prob of each sampled token of a vLLM ``CompletionOutput`` (empty when none came back)."""
    steps = completion.logprobs or []
    return [step[token].logprob for step, token in zip(steps, completion.token_ids, strict=False)]


def build_rollout(
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    response_logp: list[list[float]],
    device: torch.device,
) -> Rollout:
    """A ``Rollout`` from token lists: prompts left-padded, responses padded after their end, the mask
    True up to and including the first EOS (and never past a response's own length)."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    prompt_len = max(map(len, prompt_ids))
    width = max(max(map(len, response_ids)), 1)
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
    lengths = torch.tensor([len(r) for r in response_ids], device=device)
    mask = response_mask_from(responses, eos) & (torch.arange(width, device=device)[None] < lengths[:, None])
    logp = torch.tensor([row + [0.0] * (width - len(row)) for row in response_logp], device=device)
    logp = torch.where(mask, logp, torch.zeros_like(logp))
    texts = tokenizer.batch_decode(torch.where(mask, responses, pad), skip_special_tokens=True)
    shared = SharedPrompts.of_rows(input_ids[:, :prompt_len], prompt_mask)
    return Rollout(input_ids, torch.cat([prompt_mask, mask.long()], 1), prompt_len, mask, logp, texts, shared)


class VLLMSampler:
    """Samples one response per prompt with a colocated vLLM engine built from ``model_dir``."""

    def __init__(
        self,
        model_dir: Path,
        tokenizer: PreTrainedTokenizerBase,
        gpu_memory_utilization: float,
        ctx: DistContext,
    ) -> None:
        reason = vllm_available()
        if reason is not None:
            raise RuntimeError(reason)
        from vllm import LLM

        set_launcher_env(ctx)
        self.tokenizer = tokenizer
        self.device = ctx.device
        self.llm = LLM(
            model=str(model_dir),
            tokenizer=str(model_dir),
            tensor_parallel_size=1,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=True,
            dtype="auto",
            distributed_executor_backend="external_launcher",
            seed=ctx.rank,
            max_num_batched_tokens=4096,
            logprobs_mode="processed_logprobs",  # log-probs after temperature and top-p, as in sampling.py
        )

    @torch.no_grad()
    def sync_weights(self, model: PreTrainedModel) -> None:
        """Load the trainer's current weights into the engine and drop the KV cached under the old ones
        (when sharded, every rank must call it)."""
        # ``model_executor`` exists because the external launcher keeps the engine in this process
        engine_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        for name, tensor in engine_weights(model):
            engine_model.load_weights([(name, tensor)])
        if not self.llm.reset_prefix_cache():  # False when some KV blocks are still held
            raise RuntimeError("vLLM did not reset its prefix cache after the weight sync")

    def sample(
        self, prompts: list[str], max_new_tokens: int, temperature: float, top_p: float, seed: int
    ) -> Rollout:
        """One response per prompt (repeat prompts for groups), each request with its own seed."""
        prompt_ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        params = self._params(len(prompts), max_new_tokens, temperature, top_p, seed)
        requests = [{"prompt_token_ids": ids} for ids in prompt_ids]
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        completions = [o.outputs[0] for o in outputs]  # n=1: one completion per request
        response_ids = [list(c.token_ids) for c in completions]
        response_logp = [sampled_logprobs(c) for c in completions]
        return build_rollout(self.tokenizer, prompt_ids, response_ids, response_logp, self.device)

    @staticmethod
    def _params(n: int, max_new_tokens: int, temperature: float, top_p: float, seed: int) -> list[Any]:
        from vllm import SamplingParams

        return [
            SamplingParams(
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                seed=request_seed,
                logprobs=0,
                detokenize=False,  # texts are decoded from the masked tokens, as in sampling.py
            )
            for request_seed in request_seeds(seed, n)
        ]
