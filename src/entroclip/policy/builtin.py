"""Built-in tiny Llama-style models with a character-level tokenizer, for CPU experiments and tests.

A built-in model is created, saved with ``save_pretrained`` and loaded back through the same
``from_pretrained`` path as any local model, so the real loading code is always exercised.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"


@dataclass(frozen=True)
class TinyShape:
    layers: int
    hidden: int
    heads: int


#: name -> shape; parameter counts for a ~20-symbol vocabulary
BUILTIN_MODELS: dict[str, TinyShape] = {
    "tiny-0.1m": TinyShape(layers=2, hidden=64, heads=4),
    "tiny-0.8m": TinyShape(layers=4, hidden=128, heads=4),
    "tiny-3m": TinyShape(layers=4, hidden=256, heads=8),
    "tiny-10m": TinyShape(layers=6, hidden=384, heads=8),
}


def char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over ``alphabet`` plus pad/eos/bos/unk special tokens (ids 0-3)."""
    chars = sorted(set(alphabet))
    vocab = {tok: i for i, tok in enumerate([PAD, EOS, BOS, UNK, *chars])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, eos_token=EOS, bos_token=BOS, unk_token=UNK
    )


def build_builtin(
    name: str, alphabet: str, seed: int, max_positions: int = 256
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A freshly initialised tiny model (seeded) and its character tokenizer."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"model.builtin must be one of {sorted(BUILTIN_MODELS)}, got {name!r}")
    shape = BUILTIN_MODELS[name]
    tokenizer = char_tokenizer(alphabet)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=4 * shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model, tokenizer


def save_builtin(name: str, alphabet: str, seed: int, path: Path) -> Path:
    """Build a tiny model and save model + tokenizer to ``path`` (safetensors)."""
    model, tokenizer = build_builtin(name, alphabet, seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
