"""Rollouts with a KV cache (Hugging Face ``generate``) and the training-time forward pass.

Conventions shared by sampling and training, so that the trainer's recomputed log-probs equal the
sampler's: prompts are left-padded; position ids are ``cumsum(attention_mask) - 1``; the response's
log-probs are taken under ``softmax(logits / temperature)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor
from transformers import DynamicCache, GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase

from entroclip.distributed import is_sharded, unwrap
from entroclip.entropy import token_stats


@dataclass(frozen=True)
class SharedPrompts:
    """Which rows of a batch share their prompt (the same tokens and padding): ``firsts`` ``[D]``, the
    first row of each of the D distinct prompts, in order; ``slots`` ``[B]``, each row's prompt as an
    index into ``firsts``."""

    firsts: Tensor
    slots: Tensor

    @classmethod
    def of(cls, keys: Sequence[Hashable], device: torch.device) -> SharedPrompts | None:
        """From one key per row (rows with equal keys share the prompt); None where no key repeats."""
        firsts: dict[Hashable, int] = {}
        for row, key in enumerate(keys):
            firsts.setdefault(key, row)
        if len(firsts) == len(keys):
            return None
        slot = {key: k for k, key in enumerate(firsts)}
        return cls(
            torch.tensor(list(firsts.values()), device=device),
            torch.tensor([slot[key] for key in keys], device=device),
        )

    @classmethod
    def of_rows(cls, prompt_ids: Tensor, prompt_mask: Tensor) -> SharedPrompts | None:
        """From the left-padded prompt tokens and their attention mask ``[B, P]``: rows equal in both
        share their prompt."""
        rows = zip(prompt_ids.tolist(), prompt_mask.tolist(), strict=True)
        return cls.of([(tuple(ids), tuple(mask)) for ids, mask in rows], prompt_ids.device)

    def select(self, index: Tensor) -> SharedPrompts | None:
        """The sharing among the rows in ``index``."""
        return SharedPrompts.of(self.slots[index].tolist(), self.slots.device)


@dataclass
class Rollout:
    """A batch of prompts with one sampled response each (prompts repeated G times, consecutively).

    ``input_ids``/``attention_mask``: ``[B, P + T]`` (left-padded prompt, then response, pad after EOS);
    ``response_mask``: bool ``[B, T]``, True up to and including the first EOS; ``sampler_logp``:
    ``[B, T]`` log-probs of the sampled tokens under the sampling distribution (0 after EOS), or None
    when the sampler was not asked for them (the trainer recomputes them with its own forward pass);
    ``shared``: the rows that share a prompt, whose forward passes then share the prompt's (None: no
    row is known to share one).
    """

    input_ids: Tensor
    attention_mask: Tensor
    prompt_len: int
    response_mask: Tensor
    sampler_logp: Tensor | None
    texts: list[str]
    shared: SharedPrompts | None = None

    @property
    def responses(self) -> Tensor:
        return self.input_ids[:, self.prompt_len :]

    def select(self, index: Tensor) -> Rollout:
        """The rows in ``index`` (a minibatch)."""
        rows = index.tolist()
        return Rollout(
            self.input_ids[index],
            self.attention_mask[index],
            self.prompt_len,
            self.response_mask[index],
            self.sampler_logp[index] if self.sampler_logp is not None else None,
            [self.texts[i] for i in rows],
            self.shared.select(index) if self.shared is not None else None,
        )


def response_mask_from(responses: Tensor, eos_id: int | None) -> Tensor:
    """True on every response token up to and including the first EOS, ``[B, T]`` bool."""
    if eos_id is None:
        return torch.ones_like(responses, dtype=torch.bool)
    is_eos = responses == eos_id
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    return ~after_eos


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    return_logp: bool = False,
) -> Rollout:
    """Sample one response per prompt (repeat prompts for groups), with a KV cache, seeded.

    With ``return_logp``, ``generate`` keeps every step's scores ``[B, V]`` and the rollout carries the
    sampled tokens' log-probs (``sampler_logp``); without, it is None and the tokens are the same. Prompts
    that repeat share one forward pass over all but their last token (:func:`prompt_prefix_cache`). A
    sharded (FSDP) model keeps decoding until every rank is done, as each step is a collective."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    was_training = model.training
    model.eval()
    shared = SharedPrompts.of_rows(enc["input_ids"], enc["attention_mask"])
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        prompt_len = enc["input_ids"].shape[1]
        cache = prompt_prefix_cache(model, enc["input_ids"], enc["attention_mask"], prompt_len, shared)
        torch.manual_seed(seed)
        out = cast(GenerationMixin, model).generate(  # causal LMs mix generation in
            **enc,
            **({} if cache is None else {_cache_argument(model): cache}),
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            max_new_tokens=max_new_tokens,
            output_scores=return_logp,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            synced_gpus=is_sharded(model),
        )
    model.train(was_training)
    prompt_len = enc["input_ids"].shape[1]
    responses = out.sequences[:, prompt_len:]
    mask = response_mask_from(responses, tokenizer.eos_token_id)
    logp = None
    if return_logp:
        scores = torch.stack(out.scores, dim=1)  # [B, T, V], after temperature / top-p
        logp = torch.where(mask, token_logprobs(scores, responses), 0.0)
    attention = torch.cat([enc["attention_mask"], mask.long()], dim=1)
    texts = tokenizer.batch_decode(
        torch.where(mask, responses, tokenizer.pad_token_id), skip_special_tokens=True
    )
    return Rollout(out.sequences, attention, prompt_len, mask, logp, texts, shared)


def _forward_takes(model: torch.nn.Module, keyword: str) -> bool:
    """Whether the forward pass of ``model`` (of the module a DDP wrapper holds) takes ``keyword``."""
    return _takes(type(unwrap(model)), keyword)


@torch.compiler.assume_constant_result
def _takes(model_type: type[torch.nn.Module], keyword: str) -> bool:
    return keyword in inspect.signature(model_type.forward).parameters


def _cache_argument(model: torch.nn.Module) -> str:
    """The keyword under which ``model`` takes a KV cache: ``cache`` (newer transformers, where
    ``past_key_values`` is deprecated) or ``past_key_values``."""
    return "cache" if _forward_takes(model, "cache") else "past_key_values"


def prompt_prefix_cache(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    prompt_len: int,
    shared: SharedPrompts | None,
) -> DynamicCache | None:
    """The KV cache of every row's prompt but its last token, computed once per distinct prompt and
    repeated to the rows that share it (a group's G copies); differentiable where gradients are on.
    None where no row shares its prompt, the prompt is a single token, or the model is sharded (FSDP: its
    forward passes are collectives that every rank must make alike).

    A forward pass that starts from this cache runs only the last prompt token and what follows: with
    groups of G, the prompt costs 1/G of what it did. The cache holds what one pass over all rows would:
    rows are independent and keep their (left-padded) positions.

    Args:
        input_ids, attention_mask: ``[B, L]``, the left-padded prompt in the first ``prompt_len`` >= 2
            columns (the rest, if any, is not read); shared: the rows' prompt sharing.
    Returns: a cache of ``B`` rows and ``prompt_len - 1`` positions.
    """
    if shared is None or prompt_len < 2 or is_sharded(model):
        return None
    ids = input_ids[shared.firsts, : prompt_len - 1]
    mask = attention_mask[shared.firsts, : prompt_len - 1]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=getattr(unwrap(model), "config", None))
    # the cache is what this pass is for: the logits of one position, not of all, where the model allows
    last_only = {"logits_to_keep": 1} if _forward_takes(model, "logits_to_keep") else {}
    model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        **last_only,
        **{_cache_argument(model): cache},
    )
    cache.batch_select_indices(shared.slots)
    return cache


def _response_forward(
    model: torch.nn.Module, rollout: Rollout, temperature: float, hidden: bool
) -> tuple[Tensor, Tensor | None]:
    """The forward pass over the rollout; rows that share a prompt share its pass over all but the last
    prompt token (:func:`prompt_prefix_cache`)."""
    positions = (rollout.attention_mask.cumsum(-1) - 1).clamp(min=0)
    length, t = rollout.input_ids.shape[1], rollout.response_mask.shape[1]
    prefix = prompt_prefix_cache(
        model, rollout.input_ids, rollout.attention_mask, rollout.prompt_len, rollout.shared
    )
    start = 0 if prefix is None else rollout.prompt_len - 1
    cache = {} if prefix is None else {_cache_argument(model): prefix}
    # the positions that predict the response tokens; the logits come out contiguous, [B, T, V]
    predicting = torch.arange(length - t - 1 - start, length - 1 - start, device=rollout.input_ids.device)
    out = model(
        input_ids=rollout.input_ids[:, start:],
        attention_mask=rollout.attention_mask,
        position_ids=positions[:, start:],
        logits_to_keep=predicting,
        use_cache=bool(cache),
        output_hidden_states=hidden,
        **cache,
    )
    logits = out.logits
    if temperature != 1.0:
        logits = logits / temperature
    states = out.hidden_states[-1][:, predicting] if hidden else None
    return logits, states


def response_logits(model: torch.nn.Module, rollout: Rollout, temperature: float) -> Tensor:
    """Logits / temperature that predict each response token, ``[B, T, V]`` (model dtype)."""
    return _response_forward(model, rollout, temperature, hidden=False)[0]


def response_logits_and_hidden(
    model: torch.nn.Module, rollout: Rollout, temperature: float
) -> tuple[Tensor, Tensor]:
    """``response_logits`` and the final hidden states at those positions, ``[B, T, H]`` (value head)."""
    logits, states = _response_forward(model, rollout, temperature, hidden=True)
    assert states is not None
    return logits, states


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log softmax(logits)[token] in float32, ``[B, T]``, computed chunk by chunk (no float32 copy of
    ``[B, T, V]``, in the forward or the backward pass); see :func:`entroclip.entropy.token_stats`."""
    logp = token_stats(logits, tokens, entropy=False).logp
    assert logp is not None
    return logp
