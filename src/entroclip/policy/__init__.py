"""Policies: loading Hugging Face causal LMs (local folder, GGUF, built-in tiny models) and sampling."""
