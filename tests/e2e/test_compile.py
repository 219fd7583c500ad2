"""run.compile: the minibatch steps compiled with torch.compile train like the eager ones.

The tests compile with the cheap ``aot_eager`` backend (the same graphs, traced and differentiated by
AOTAutograd, run by eager kernels), which checks the tracing of the update without inductor's C++
compilation; the benchmark (benchmarks/bench_step.py) runs inductor."""

import copy
from dataclasses import replace

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from entroclip import trainer as trainer_module
from entroclip.checkpoint import latest_checkpoint
from entroclip.compiling import CompileCache
from entroclip.config import load_config, parse_config
from entroclip.control import ControlAction
from entroclip.policy.builtin import save_builtin
from entroclip.policy.loading import load_policy
from entroclip.policy.sampling import sample
from entroclip.runio import config_fingerprint
from entroclip.trainer import Trainer
from entroclip.update import RunSettings, UpdateBatch, run_update

ALPHABET = "0123456789+="


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    folder = save_builtin("tiny-0.1m", ALPHABET, seed=0, path=tmp_path_factory.mktemp("tiny"))
    model, tok = load_policy(folder)
    prompts = [f"{a}+{b}=" for a, b in [(1, 2), (13, 4), (7, 55), (9, 9)] for _ in range(4)]
    rollout = sample(model, tok, prompts, max_new_tokens=6, seed=3, return_logp=True)
    gen = torch.Generator().manual_seed(0)
    # an old policy that differs from the current one, so that clipping acts
    logp_old = (rollout.sampler_logp + 0.3 * torch.randn(rollout.sampler_logp.shape, generator=gen)) * (
        rollout.response_mask
    )
    batch = UpdateBatch(rollout, torch.randn(len(prompts), generator=gen), logp_old)
    return model, batch


#: the update's fixed settings: token-mean, 6-token responses, 2 epochs of 2 minibatches of single rows
BASE = RunSettings.from_config(
    parse_config(
        {
            "rollout": {"max_new_tokens": 6},
            "optim": {"epochs": 2, "minibatches": 2, "grad_clip": 1.0, "group_minibatches": False},
        }
    )
)


def settings(
    eps_low: float | None = 0.2, eps_high: float | None = 0.28, entropy_coef: float = 0.0, **changes
) -> tuple[RunSettings, ControlAction]:
    """A run's fixed settings (``changes`` of BASE) and one step's action."""
    return replace(BASE, **changes), ControlAction(eps_low, eps_high, entropy_coef)


def update(policy, compiler, config):
    model, batch = policy
    model = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    stats, _ = run_update(model, optimizer, scheduler, batch, *config, 0, compiler=compiler)
    return model, stats.metrics()


def assert_same_optimizer_state(actual, expected):
    """The same hyperparameters (Python floats, the learning rate included) and step counts, and moments
    equal up to float32 rounding: relative 1e-5, absolute 1e-6 of the tensor's largest entry (the
    gradients of compiled and eager passes differ by ~1e-7 relative per operation; the moments of
    entries whose gradient is near zero carry that error without its scale)."""
    assert actual["param_groups"] == expected["param_groups"]
    assert all(type(g["lr"]) is float for g in actual["param_groups"])
    assert actual["state"].keys() == expected["state"].keys()
    for index, entry in expected["state"].items():
        assert actual["state"][index].keys() == entry.keys()
        for key, value in entry.items():
            got = actual["state"][index][key]
            assert got.dtype == value.dtype and got.shape == value.shape, (index, key)
            scale = float(value.abs().max())
            torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6 * scale, msg=f"{index} {key}")


@pytest.mark.parametrize(
    "config",
    [settings(), settings(entropy_coef=0.01, dual_clip=3.0, agg="seq-mean-token-mean")],
    ids=["default", "entropy-bonus-dual-clip"],
)
def test_compiled_update_takes_the_same_steps(policy, config):
    eager_model, eager = update(policy, CompileCache(), config)
    compiler = CompileCache(compile=True, backend="aot_eager")
    compiled_model, compiled = update(policy, compiler, config)
    assert compiler.compiled  # no fallback
    # 4 AdamW steps of lr 1e-3: a parameter moves by up to 4e-3; the compiled graphs (fused operations,
    # other summation orders) differ from eager by float32 rounding, ~1e-7 relative per operation
    for (name, a), b in zip(eager_model.named_parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert compiled.keys() == eager.keys()
    for key, value in eager.items():
        assert compiled[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key
    assert eager["clip_ratio/low_mean"] > 0 and eager["clip_ratio/high_mean"] > 0


def test_changing_bounds_do_not_recompile(policy):
    """A controller moves eps_low and the entropy coefficient every step: they enter the compiled step as
    tensors, so a new value reuses the graph."""
    counter = CompileCounterWithBackend("aot_eager")
    compiler = CompileCache(compile=True, backend=counter)
    update(policy, compiler, settings(eps_low=0.2, entropy_coef=0.01))
    compiled = counter.frame_count
    assert compiled >= 1
    update(policy, compiler, settings(eps_low=0.13, eps_high=0.3, entropy_coef=0.02))
    assert counter.frame_count == compiled


def test_a_failed_compilation_falls_back_to_eager_with_a_warning(policy):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    eager_model, eager = update(policy, CompileCache(), settings())
    compiler = CompileCache(compile=True, backend=broken)
    with pytest.warns(RuntimeWarning, match="training continues eagerly.*no C\\+\\+ compiler"):
        model, metrics = update(policy, compiler, settings())
    assert not compiler.compiled
    for a, b in zip(eager_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert metrics == eager


def test_trainer_with_compile_saves_plain_checkpoints_and_resumes(tmp_path, monkeypatch):
    def cheap(compile, options=None):
        return CompileCache(compile, backend="aot_eager")

    monkeypatch.setattr(trainer_module, "CompileCache", cheap)
    small = ["task.prompts_per_step=4", "rollout.group_size=4", "optim.minibatches=2", "optim.epochs=2"]
    small += ["optim.warmup_steps=3"]  # a learning rate that changes every optimizer step
    common = [*small, "run.tensorboard=false", "run.checkpoint_every=1", "diagnostics.probe_prompts=2"]

    def run(name, steps, compiled, resume=False):
        overrides = [*common, f"run.out_dir={tmp_path / name}", f"run.steps={steps}"]
        config = load_config("configs/quick.yaml", [*overrides, f"run.compile={str(compiled).lower()}"])
        t = Trainer(config, resume=resume, overwrite=not resume)
        t.train(show_progress=False)
        assert t.compiler.compiled == compiled
        return t

    run("eager", 2, False)
    run("eager-then-compiled", 1, False)  # run.compile switched on and off across resumes
    run("eager-then-compiled", 2, True, resume=True)
    run("compiled-then-eager", 1, True)
    run("compiled-then-eager", 2, False, resume=True)
    names = ("eager-then-compiled", "compiled-then-eager")
    eager, *others = (
        latest_checkpoint(tmp_path / name, config_fingerprint(load_config(tmp_path / name / "config.yaml")))
        for name in ("eager", *names)
    )
    assert eager is not None and eager.state["step"] == 2
    for name, other in zip(names, others, strict=True):
        assert other is not None and other.state["step"] == 2, name
        assert list(other.weights) == list(eager.weights)  # no "_orig_mod." prefixes
        assert not any("_orig_mod" in key for key in other.weights)
        for key, value in eager.weights.items():
            torch.testing.assert_close(other.weights[key], value, rtol=1e-5, atol=1e-6, msg=f"{name} {key}")
        assert_same_optimizer_state(other.state["optimizer"], eager.state["optimizer"])
        assert other.state["scheduler"] == eager.state["scheduler"]
