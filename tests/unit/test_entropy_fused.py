"""The fused one-pass token statistics (log-prob, entropy, kappa) against float64 references."""

import math

import pytest
import torch

from entroclip import compiling, entropy
from entroclip.entropy import (
    CHUNK_LOGITS_CPU,
    chunk_rows,
    entropy_sensitivity,
    token_entropy,
    token_stats,
)
from entroclip.policy.sampling import token_logprobs


def reference64(logits, tokens, temperature=1.0):
    """(logp_a, H, kappa) from a float64 log_softmax, differentiable."""
    logp = torch.log_softmax(logits.double() / temperature, -1)
    p = logp.exp()
    h = -(p * logp).sum(-1)
    logp_a = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    kappa = -logp_a.exp() * (logp_a + h) + (p.square() * (logp + h.unsqueeze(-1))).sum(-1)
    return logp_a, h, kappa


def max_errors(got, ref):
    return [(g.double() - r).abs().max().item() for g, r in zip(got, ref, strict=True)]


@pytest.mark.parametrize("shape", [(7, 11), (2, 3, 50), (1, 1, 1, 300), (4, 1)])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_matches_float64(gen, shape, temperature, chunk_size):
    logits = 3 * torch.randn(*shape, generator=gen)
    tokens = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    got = token_stats(logits, tokens, temperature, chunk_size, kappa=True)
    assert all(t.shape == shape[:-1] and t.dtype == torch.float32 for t in got)
    errors = max_errors(got, reference64(logits, tokens, temperature))
    assert max(errors) < 1e-5, errors


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize(("use_logp", "use_entropy"), [(True, False), (False, True), (True, True)])
def test_gradients_match_float64_autograd(gen, temperature, use_logp, use_entropy):
    logits = 2 * torch.randn(6, 5, 40, generator=gen)
    tokens = torch.randint(0, 40, (6, 5), generator=gen)
    w_logp, w_ent = torch.randn(2, 6, 5, generator=gen)

    def loss(logp, h):
        return (use_logp * w_logp * logp).sum() + (use_entropy * w_ent * h).sum()

    x64 = logits.double().requires_grad_(True)
    logp, h, _ = reference64(x64, tokens, temperature)
    (expected,) = torch.autograd.grad(loss(logp, h), x64)
    x = logits.clone().requires_grad_(True)
    got = token_stats(x, tokens, temperature, chunk_size=7, entropy=use_entropy)
    (grad,) = torch.autograd.grad(loss(got.logp, got.entropy if use_entropy else 0.0), x)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-6)


def test_entropy_gradient_without_tokens(gen):
    """dH/dz = -pi (log pi + H), through ``token_entropy``."""
    logits = torch.randn(4, 30, generator=gen, requires_grad=True)
    w = torch.randn(4, generator=gen)
    (grad,) = torch.autograd.grad((token_entropy(logits, 1.3) * w).sum(), logits)
    logp = torch.log_softmax(logits.detach().double() / 1.3, -1)
    h = -(logp.exp() * logp).sum(-1, keepdim=True)
    expected = -logp.exp() * (logp + h) * w[:, None].double() / 1.3
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 13, 64, 10_000])
def test_chunk_size_does_not_change_values_or_gradients(gen, chunk_size):
    logits = torch.randn(4, 13, 97, generator=gen)
    tokens = torch.randint(0, 97, (4, 13), generator=gen)
    w = torch.randn(2, 4, 13, generator=gen)

    def run(size):
        x = logits.clone().requires_grad_(True)
        stats = token_stats(x, tokens, chunk_size=size, kappa=True)
        (grad,) = torch.autograd.grad((w[0] * stats.logp + w[1] * stats.entropy).sum(), x)
        return (*stats, grad)

    for got, ref in zip(run(chunk_size), run(52), strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=2e-6)


def test_bf16_large_vocabulary(gen):
    logits = (4 * torch.randn(6, 151_936, generator=gen)).to(torch.bfloat16).requires_grad_(True)
    tokens = torch.arange(6) * 1000
    got = token_stats(logits, tokens, kappa=True)
    # the reference sees the same bf16-rounded logits, so only float32 rounding remains
    x64 = logits.detach().double().requires_grad_(True)
    ref = reference64(x64, tokens)
    errors = max_errors(got, ref)
    assert max(errors) < 1e-5, errors
    (grad,) = torch.autograd.grad((got.logp + got.entropy).sum(), logits)
    (expected,) = torch.autograd.grad((ref[0] + ref[1]).sum(), x64)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.double(), expected, rtol=1e-2, atol=1e-5)  # bf16 output rounding


def test_large_logits_have_no_cancellation(gen):
    """Logits around 1e3: H from sums of e (z - max) keeps float32 precision (absolute error ~1e-7 nats,
    also when H is nearly 0), where sums of e z would lose digits to lse ~ 1e3."""
    logits = 1e3 + 30 * torch.randn(8, 20_000, generator=gen)
    tokens = logits.argmax(-1)
    got = token_stats(logits, tokens, kappa=True)
    ref = reference64(logits, tokens)
    assert ref[1].min() < 1e-2  # some rows are nearly deterministic
    torch.testing.assert_close(got.entropy.double(), ref[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.kappa.double(), ref[2], rtol=1e-4, atol=1e-7)


def test_minus_infinity_logits_are_probability_zero():
    logits = torch.tensor([[0.5, -math.inf, 1.0, -2.0], [-math.inf, -math.inf, 3.0, -math.inf]])
    x = logits.clone().requires_grad_(True)
    tokens = torch.tensor([1, 2])
    got = token_stats(x, tokens, kappa=True)
    assert got.logp[0] == -math.inf and got.logp[1] == 0.0
    finite = torch.tensor([[0.5, 1.0, -2.0]])
    ref = reference64(finite, torch.tensor([0]))
    assert got.entropy[0].item() == pytest.approx(ref[1].item(), abs=1e-6)
    assert got.entropy[1] == 0.0 and got.kappa[1] == 0.0
    # kappa of a token of probability 0: sum_v pi_v^2 (log pi_v + H) over the others
    p = torch.softmax(finite.double(), -1)
    expected = (p.square() * (p.log() + ref[1])).sum().item()
    assert got.kappa[0].item() == pytest.approx(expected, abs=1e-6)
    (grad,) = torch.autograd.grad(got.logp[1] + got.entropy.sum(), x)
    assert torch.isfinite(grad).all()
    assert (grad[logits == -math.inf] == 0).all()


def test_nan_logits_are_not_hidden():
    logits = torch.tensor([[0.5, float("nan"), 1.0], [0.0, 1.0, 2.0]])
    stats = token_stats(logits, torch.tensor([0, 0]), kappa=True)
    assert all(t[0].isnan() and t[1].isfinite() for t in stats)


def test_empty_inputs():
    for shape in [(0, 7), (3, 0, 7)]:
        logits = torch.zeros(shape, requires_grad=True)
        stats = token_stats(logits, torch.zeros(shape[:-1], dtype=torch.long), kappa=True)
        assert all(t.shape == shape[:-1] for t in stats)
        (grad,) = torch.autograd.grad((stats.logp.sum() + stats.entropy.sum()), logits)
        assert grad.shape == shape


def test_backward_keeps_no_float32_copy(gen):
    """What autograd saves for the backward pass: the bf16 input and a few floats per row."""
    logits = torch.randn(64, 4096, generator=gen).to(torch.bfloat16).requires_grad_(True)
    tokens = torch.randint(0, 4096, (64,), generator=gen)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stats = token_stats(logits, tokens)
    logits_bytes = logits.numel() * logits.element_size()
    assert sum(saved) <= logits_bytes + 64 * 32
    stats.logp.sum().backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16


def test_wrappers_agree_with_token_stats(gen):
    logits = 2 * torch.randn(3, 5, 21, generator=gen)
    tokens = torch.randint(0, 21, (3, 5), generator=gen)
    stats = token_stats(logits, tokens, 0.8, kappa=True)
    torch.testing.assert_close(token_entropy(logits, 0.8), stats.entropy, rtol=0, atol=0)
    entropy, kappa = entropy_sensitivity(logits, tokens, 0.8)
    torch.testing.assert_close(entropy, stats.entropy, rtol=0, atol=0)
    torch.testing.assert_close(kappa, stats.kappa, rtol=0, atol=0)
    logp = token_logprobs(logits / 0.8, tokens)
    torch.testing.assert_close(logp, stats.logp, rtol=0, atol=2e-6)
    only_logp = token_stats(logits, tokens, entropy=False)
    assert only_logp.entropy is None and only_logp.kappa is None
    assert token_stats(logits).logp is None


def test_default_chunk_and_validation():
    assert chunk_rows(torch.zeros(2, 10**7), None) == 1  # one row is more than the budget
    rows = chunk_rows(torch.zeros(2, 151_936), None)
    assert rows * 151_936 <= CHUNK_LOGITS_CPU < (rows + 1) * 151_936
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        token_stats(torch.zeros(2, 3), chunk_size=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_stats(torch.zeros(2, 3), temperature=-1.0)
    with pytest.raises(ValueError, match="kappa needs the sampled tokens"):
        token_stats(torch.zeros(2, 3), kappa=True)
    with pytest.raises(ValueError, match="tokens must have shape"):
        token_stats(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))


def test_traced_into_a_compiled_graph_matches_float64(gen):
    """Inside torch.compile the forward and backward passes are traced as single loops over the rows."""
    logits = 2 * torch.randn(12, 50, generator=gen)
    tokens = torch.randint(0, 50, (12,), generator=gen)
    weights = torch.randn(2, 12, generator=gen)

    def stats(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        got = token_stats(x, tokens, kappa=True)
        loss = (weights[0] * got.logp).sum() + (weights[1] * got.entropy).sum()
        return loss, got.logp, got.entropy, got.kappa

    x = logits.clone().requires_grad_(True)
    loss, *got = torch.compile(stats, backend="aot_eager", fullgraph=True)(x)
    (grad,) = torch.autograd.grad(loss, x)
    x64 = logits.double().requires_grad_(True)
    reference = reference64(x64, tokens)
    reference_loss = (weights[0] * reference[0]).sum() + (weights[1] * reference[1]).sum()
    (expected,) = torch.autograd.grad(reference_loss, x64)
    assert max(max_errors(got, reference)) < 1e-5
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.fixture
def compile_everything(monkeypatch):
    """Every eager ``token_stats`` call with ``chunk_size=None`` on a CPU takes the compiled pass (a graph
    per vocabulary size, dtype and set of statistics: more than dynamo's default limit here)."""
    monkeypatch.setattr(compiling, "COMPILE_FROM", 1)
    with torch._dynamo.config.patch(recompile_limit=64):
        yield


@pytest.mark.parametrize(
    ("shape", "scale", "temperature"),
    [((5, 7, 300), 3.0, 1.0), ((33, 50), 2.0, 0.6), ((4, 1), 1.0, 1.0), ((3, 1000), 10.0, 1.7)],
)
def test_compiled_pass_matches_float64(gen, compile_everything, shape, scale, temperature):
    """Vocabularies below, at and past the summation block (128), a 1-word one, peaked rows."""
    logits = scale * torch.randn(*shape, generator=gen)
    tokens = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    for requested in ({"kappa": True}, {"entropy": True}, {"entropy": False}):
        got = token_stats(logits, tokens, temperature, **requested)
        reference = reference64(logits, tokens, temperature)
        errors = max_errors(
            [t for t in got if t is not None], reference[: 1 + sum(t is not None for t in got[1:])]
        )
        assert max(errors) < 1e-5, (requested, errors)
    assert entropy._fused_pass.compiled is not None


def test_compiled_pass_sums_a_large_vocabulary_exactly(gen, compile_everything):
    """At V = 151,936 a compiled sum over a whole row loses 1e-5 nats in H and kappa (each vector lane
    adds ~19,000 terms); the blocked sums keep eager's float32 accuracy (~1e-6)."""
    logits = 3 * torch.randn(48, 151_936, generator=gen)
    tokens = torch.randint(0, 151_936, (48,), generator=gen)
    got = token_stats(logits, tokens, kappa=True)
    errors = max_errors(got, reference64(logits, tokens))
    assert max(errors) < 5e-6, errors


def test_compiled_pass_keeps_infinities_nans_and_gradients(gen, compile_everything):
    logits = 2 * torch.randn(6, 200, generator=gen)
    logits[0, :150] = -math.inf
    logits[1, 7] = float("nan")
    tokens = torch.randint(150, 200, (6,), generator=gen)
    tokens[2] = 0
    logits[2, 0] = -math.inf
    x = logits.clone().requires_grad_(True)
    got = token_stats(x, tokens, kappa=True)
    assert all(t[1].isnan() for t in got) and got.logp[2] == -math.inf
    rows = [0, 3, 4, 5]
    reference = reference64(logits[rows], tokens[rows])
    assert max(max_errors([t[rows] for t in got], reference)) < 1e-5
    assert torch.isfinite(got.kappa[2]) and torch.isfinite(got.entropy[2])
    weights = torch.randn(2, 6, generator=gen)
    (grad,) = torch.autograd.grad((weights[0] * got.logp)[3:].sum() + (weights[1] * got.entropy)[:1].sum(), x)
    assert (grad[0, :150] == 0).all() and torch.isfinite(grad[0]).all()
    x64 = logits[3:].double().requires_grad_(True)
    (expected,) = torch.autograd.grad((weights[0, 3:] * reference64(x64, tokens[3:])[0]).sum(), x64)
    torch.testing.assert_close(grad[3:].double(), expected, rtol=1e-5, atol=1e-6)


def test_compiled_pass_takes_bf16(gen, compile_everything):
    logits = (4 * torch.randn(6, 3000, generator=gen)).to(torch.bfloat16)
    tokens = torch.randint(0, 3000, (6,), generator=gen)
    errors = max_errors(token_stats(logits, tokens, kappa=True), reference64(logits, tokens))
    assert max(errors) < 1e-5, errors


def test_chunks_where_asked_or_where_torch_compile_fails(gen, compile_everything, monkeypatch):
    logits = 2 * torch.randn(9, 300, generator=gen)
    tokens = torch.randint(0, 300, (9,), generator=gen)
    weights = torch.randn(2, 9, generator=gen)

    def values_and_gradient(chunk_size):
        x = logits.clone().requires_grad_(True)
        stats = token_stats(x, tokens, chunk_size=chunk_size, kappa=True)
        (grad,) = torch.autograd.grad((weights[0] * stats.logp + weights[1] * stats.entropy).sum(), x)
        return (*stats, grad)

    chunked = values_and_gradient(4)

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", no_compiler)
    passes = {
        "_fused_pass": (entropy._fused_sums, entropy._chunked_sums),
        "_gradient_pass": (entropy._fused_gradient, entropy._chunked_gradient),
    }
    fresh = {}
    for name, (function, eager) in passes.items():
        fresh[name] = compiling.CompiledForLargeInputs(function, "token_stats", eager=eager, dynamic=False)
        monkeypatch.setattr(entropy, name, fresh[name])
    assert all(map(torch.equal, values_and_gradient(4), chunked))
    assert all(p.compiled is None and p.compiles for p in fresh.values())
    with pytest.warns(UserWarning, match="token_stats runs eagerly.*no C\\+\\+ compiler"):
        fallback = values_and_gradient(None)
    assert not any(p.compiles for p in fresh.values())
    # the fallback is the default chunking (here one chunk), which chunk_size=4 agrees with to rounding
    for got, expected in zip(fallback, chunked, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("use_logp", "use_entropy"), [(True, False), (False, True), (True, True)])
def test_compiled_backward_matches_float64_autograd(gen, compile_everything, dtype, use_logp, use_entropy):
    logits = (2 * torch.randn(6, 5, 300, generator=gen)).to(dtype)
    tokens = torch.randint(0, 300, (6, 5), generator=gen)
    w_logp, w_ent = torch.randn(2, 6, 5, generator=gen)

    def loss(logp, h):
        return (use_logp * w_logp * logp).sum() + (use_entropy * w_ent * h).sum()

    x64 = logits.double().requires_grad_(True)
    logp, h, _ = reference64(x64, tokens, 0.7)
    (expected,) = torch.autograd.grad(loss(logp, h), x64)
    x = logits.clone().requires_grad_(True)
    got = token_stats(x, tokens, 0.7, entropy=use_entropy)
    (grad,) = torch.autograd.grad(loss(got.logp, got.entropy if use_entropy else 0.0), x)
    assert grad.dtype == dtype and entropy._gradient_pass.compiled is not None
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-5}
    torch.testing.assert_close(grad.double(), expected, **tolerance)
