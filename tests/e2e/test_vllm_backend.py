"""The vLLM rollout glue (``VLLMSampler``) on CPU, against a fake ``vllm`` module put in ``sys.modules``.

These tests check our side of the interface only: the engine's construction arguments and environment,
the requests we send, the ``Rollout`` we build from vLLM-shaped outputs, and the weight sync. They do not
run vLLM itself, which needs a CUDA GPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch

from entroclip.config import load_config
from entroclip.distributed import DistContext
from entroclip.policy.builtin import build_builtin
from entroclip.policy.loading import load_policy
from entroclip.policy.sampling import Rollout, SharedPrompts, response_logits, sample, token_logprobs
from entroclip.policy.vllm_backend import VLLMSampler, build_rollout, request_seeds, sampled_logprobs
from entroclip.trainer import Trainer

ALPHABET = "0123456789+="
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ----- the fake vllm module ----------------------------------------------------------------------------
# It mirrors the source of vLLM 0.31.0 and 0.33.0 (the same there for all of this): the constructors and
# methods take vLLM's parameter names, with vLLM's defaults, and reject any other name, so that a misspelt
# or renamed argument fails here as it would on a GPU. Only the parameters we use are listed; add one
# here after checking it in vLLM's source.
LOGPROBS_MODES = ("raw_logits", "raw_logprobs", "processed_logits", "processed_logprobs")  # config/model.py
EXECUTOR_BACKENDS = ("ray", "mp", "uni", "external_launcher")  # config/parallel.py
# ``EngineArgs`` fields (engine/arg_utils.py) that ``LLM`` takes through ``**kwargs``
ENGINE_ARGS = frozenset(
    {"enable_prefix_caching", "distributed_executor_backend", "max_num_batched_tokens", "logprobs_mode"}
)
INT64_MAX = (
    2**63 - 1
)  # model runner V2 keeps request seeds in an int64 tensor (v1/worker/gpu/sample/states.py)


@dataclass
class Logprob:  # logprobs.py
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:  # outputs.py
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:  # outputs.py (its leading positional parameters)
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool


@dataclass(kw_only=True)
class SamplingParams:  # sampling_params.py (a msgspec Struct there), with the checks of its _verify_args
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int | None = 16
    logprobs: int | None = None
    detokenize: bool = True

    def __post_init__(self) -> None:
        assert self.n >= 1 and self.temperature >= 0 and 0 < self.top_p <= 1
        assert self.max_tokens is None or self.max_tokens >= 1
        assert self.logprobs is None or self.logprobs >= -1
        assert self.seed is None or -(2**63) <= self.seed <= INT64_MAX


class FakeModel:
    """The engine's ``nn.Module``: ``load_weights`` takes an iterable of (name, tensor) as vLLM models do
    (e.g. models/llama.py) and returns the names it loaded."""

    def __init__(self, engine: FakeLLM) -> None:
        self.engine = engine

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return self.engine.load_weights(weights)


class FakeLLM:
    """``vllm.LLM`` (entrypoints/llm.py). Records its arguments, requests, weight loads and cache resets;
    answers request ``i`` with ``script[i]`` (response tokens, their log-probs)."""

    script: ClassVar[list[tuple[list[int], list[float]]]] = []
    last: ClassVar[FakeLLM | None] = None

    def __init__(
        self,
        model: str,
        *,
        tokenizer: str | None = None,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        seed: int = 0,
        gpu_memory_utilization: float = 0.92,
        **kwargs: Any,
    ) -> None:
        unknown = set(kwargs) - ENGINE_ARGS
        if unknown:
            raise TypeError(f"EngineArgs.__init__() got unexpected keyword arguments {sorted(unknown)}")
        assert kwargs.get("logprobs_mode", "raw_logprobs") in LOGPROBS_MODES
        backend = kwargs.get("distributed_executor_backend")
        assert backend is None or backend in EXECUTOR_BACKENDS
        self.kwargs = {
            "model": model,
            "tokenizer": tokenizer,
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "dtype": dtype,
            "seed": seed,
            **kwargs,
        }
        self.events: list[str] = []
        self.loads: list[list[tuple[str, torch.Tensor]]] = []
        self.calls: list[tuple[list[dict], list[SamplingParams]]] = []
        self.reset_succeeds = True
        # v1/engine/llm_engine.py sets ``model_executor`` only for an in-process engine core, which the
        # external launcher forces (config/parallel.py); the executor's ``driver_worker`` forwards
        # attributes to the GPU worker (v1/worker/worker_base.py), whose ``model_runner.model`` is the model
        self.llm_engine = SimpleNamespace()
        if backend == "external_launcher":
            runner = SimpleNamespace(model=FakeModel(self))
            worker = SimpleNamespace(model_runner=runner)
            self.llm_engine.model_executor = SimpleNamespace(driver_worker=worker)
        FakeLLM.last = self

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        batch = [(name, tensor.clone()) for name, tensor in weights]
        self.loads.append(batch)
        self.events.append("load")
        return {name for name, _ in batch}

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        self.events.append("reset")
        return self.reset_succeeds

    def generate(
        self,
        prompts: dict | Sequence[dict],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        lora_request: Any = None,
        priority: Any = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        assert isinstance(prompts, list) and isinstance(sampling_params, list)
        assert len(sampling_params) == len(prompts)  # a list of params pairs one by one with the prompts
        self.calls.append((prompts, sampling_params))
        outputs = []
        for i, (prompt, p) in enumerate(zip(prompts, sampling_params, strict=True)):
            assert set(prompt) == {"prompt_token_ids"}  # a TokensPrompt (inputs/llm.py) as a plain dict
            tokens, logps = self.respond(i, prompt["prompt_token_ids"], p)
            steps = None
            if p.logprobs is not None:
                # the sampled token, then the p.logprobs most likely ones (stand-ins here)
                steps = [
                    {t: Logprob(lp, 1)} | {-(j + 1): Logprob(-99.0, j + 1) for j in range(p.logprobs)}
                    for t, lp in zip(tokens, logps, strict=True)
                ]
            text = "unused" if p.detokenize else ""
            completion = CompletionOutput(0, text, tokens, sum(logps), steps)
            outputs.append(RequestOutput(str(i), None, prompt["prompt_token_ids"], None, [completion], True))
        return outputs

    def respond(self, i: int, ids: list[int], params: SamplingParams) -> tuple[list[int], list[float]]:
        return self.script[i]


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> type[FakeLLM]:
    """A fake ``vllm`` module, a visible 'GPU', and launcher variables restored after the test."""
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM  # type: ignore[attr-defined]
    module.SamplingParams = SamplingParams  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for key in LAUNCHER_ENV:
        monkeypatch.setenv(key, "")  # records the original value, so that undo restores it
        monkeypatch.delenv(key)
    monkeypatch.setattr(FakeLLM, "last", None)
    monkeypatch.setattr(FakeLLM, "script", [])
    return FakeLLM


def tiny(seed: int = 0) -> tuple[Any, Any]:
    model, tokenizer = build_builtin("tiny-0.1m", ALPHABET, seed)
    tokenizer.padding_side = "left"
    return model, tokenizer


def make_sampler(tokenizer: Any, ctx: DistContext | None = None) -> VLLMSampler:
    return VLLMSampler(Path("/models/tiny"), tokenizer, 0.4, ctx or DistContext())


def assert_rollouts_equal(actual: Rollout, expected: Rollout) -> None:
    for field in dataclasses.fields(Rollout):
        a, e = getattr(actual, field.name), getattr(expected, field.name)
        if isinstance(e, torch.Tensor):
            assert a.dtype == e.dtype and a.device == e.device, field.name
            torch.testing.assert_close(a, e, msg=field.name)
        elif isinstance(e, SharedPrompts):
            assert isinstance(a, SharedPrompts), field.name
            assert torch.equal(a.firsts, e.firsts) and torch.equal(a.slots, e.slots), field.name
        else:
            assert a == e, field.name


# ----- construction -----------------------------------------------------------------------------------
def test_engine_arguments_and_launcher_env(fake_vllm, monkeypatch):
    _, tokenizer = tiny()
    make_sampler(tokenizer, DistContext(rank=0, world_size=1))
    assert fake_vllm.last.kwargs == {
        "model": "/models/tiny",
        "tokenizer": "/models/tiny",
        "tensor_parallel_size": 1,
        "gpu_memory_utilization": 0.4,
        "enable_prefix_caching": True,
        "dtype": "auto",
        "distributed_executor_backend": "external_launcher",
        "seed": 0,
        "max_num_batched_tokens": 4096,
        "logprobs_mode": "processed_logprobs",
    }
    assert [os.environ[k] for k in LAUNCHER_ENV[:4]] == ["0", "0", "1", "localhost"]
    assert int(os.environ["MASTER_PORT"]) > 0


def test_torchrun_env_is_kept_and_engine_seeded_by_rank(fake_vllm, monkeypatch):
    torchrun = {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
        "MASTER_ADDR": "node0",
        "MASTER_PORT": "29511",
    }
    for key, value in torchrun.items():
        monkeypatch.setenv(key, value)
    _, tokenizer = tiny()
    make_sampler(tokenizer, DistContext(rank=3, world_size=4))
    assert {k: os.environ[k] for k in LAUNCHER_ENV} == torchrun
    assert fake_vllm.last.kwargs["seed"] == 3


def test_the_fake_rejects_names_vllm_does_not_have(fake_vllm):
    with pytest.raises(TypeError, match="logprob_mode"):
        FakeLLM(model="m", logprob_mode="processed_logprobs")
    with pytest.raises(TypeError):
        FakeLLM(model="m", max_new_tokens=4)
    with pytest.raises(TypeError):
        SamplingParams(max_new_tokens=4)
    with pytest.raises(AssertionError):
        SamplingParams(seed=2**63)
    assert not hasattr(FakeLLM(model="m").llm_engine, "model_executor")  # engine core in another process


def test_missing_vllm_or_gpu_is_an_error(fake_vllm, monkeypatch):
    _, tokenizer = tiny()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        make_sampler(tokenizer)
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(RuntimeError, match="not installed"):
        make_sampler(tokenizer)


# ----- sampling ---------------------------------------------------------------------------------------
def test_requests_are_token_ids_with_distinct_seeds(fake_vllm):
    _, tokenizer = tiny()
    sampler = make_sampler(tokenizer)
    prompts = ["1+2=", "1+2=", "12+34="]
    fake_vllm.script = [([tokenizer.eos_token_id], [-0.1])] * 3
    sampler.sample(prompts, max_new_tokens=5, temperature=0.7, top_p=0.9, seed=11)
    requests, params = fake_vllm.last.calls[0]
    assert requests == [
        {"prompt_token_ids": tokenizer(p, add_special_tokens=False)["input_ids"]} for p in prompts
    ]
    seeds = [p.seed for p in params]
    assert seeds == request_seeds(11, 3) and len(set(seeds)) == 3  # repeated prompts differ
    for p in params:
        assert (p.temperature, p.top_p, p.max_tokens, p.logprobs, p.detokenize) == (0.7, 0.9, 5, 0, False)


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_rollout_padding_masks_and_texts(fake_vllm, pad_is_eos):
    _, tokenizer = tiny()
    if pad_is_eos:
        tokenizer.pad_token = tokenizer.eos_token
    pad, eos, bos = tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id
    ids = {c: tokenizer.convert_tokens_to_ids(c) for c in ALPHABET}
    responses = [
        [ids["3"], eos],  # EOS before the widest response
        [ids["4"], ids["6"], ids["1"]],  # hit max_tokens without EOS
        [],  # nothing sampled
        [ids["7"], bos],  # stopped on another stop id: ends there, no EOS
    ]
    fake_vllm.script = [(r, [-0.5 * (j + 1) for j in range(len(r))]) for r in responses]
    prompts = ["1+2=", "12+34=", "5=", "9+9="]
    rollout = make_sampler(tokenizer).sample(prompts, 3, 1.0, 1.0, seed=0)

    p = [tokenizer(x, add_special_tokens=False)["input_ids"] for x in prompts]
    assert rollout.prompt_len == 6
    expected_rows = [
        [pad, pad] + p[0] + [ids["3"], eos, pad],
        p[1] + [ids["4"], ids["6"], ids["1"]],
        [pad, pad, pad, pad] + p[2] + [pad, pad, pad],
        [pad, pad] + p[3] + [ids["7"], bos, pad],
    ]
    assert rollout.input_ids.tolist() == expected_rows
    assert rollout.response_mask.tolist() == [
        [True, True, False],
        [True, True, True],
        [False, False, False],
        [True, True, False],
    ]
    assert rollout.attention_mask.tolist() == [
        [0, 0, 1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 1, 1, 0],
    ]
    assert rollout.sampler_logp.tolist() == [
        [-0.5, -1.0, 0.0],
        [-0.5, -1.0, -1.5],
        [0.0] * 3,
        [-0.5, -1.0, 0.0],
    ]
    assert rollout.texts == ["3", "461", "", "7"]


def test_rollout_matches_hf_sample_on_the_same_tokens(fake_vllm):
    """Given the tokens and log-probs that ``sampling.sample`` drew, the vLLM path builds the same Rollout."""
    model, tokenizer = tiny(seed=3)
    prompts = ["1+2=", "12+34=", "5=", "98+7="] * 4
    reference = sample(model, tokenizer, prompts, max_new_tokens=6, seed=5, return_logp=True)
    mask = reference.response_mask
    assert not mask.all(-1).all() and mask[:, -1].any()  # some rows end early, some run to the limit
    fake_vllm.script = [
        (reference.responses[i][mask[i]].tolist(), reference.sampler_logp[i][mask[i]].tolist())
        for i in range(len(prompts))
    ]
    rollout = make_sampler(tokenizer).sample(prompts, 6, 1.0, 1.0, seed=5)
    assert_rollouts_equal(rollout, reference)


def test_sampled_logprobs_picks_the_sampled_token_among_the_top_ones():
    steps = [{7: Logprob(-0.3, 2), 4: Logprob(-0.1, 1)}, {5: Logprob(-2.0, 3), 4: Logprob(-0.2, 1)}]
    assert sampled_logprobs(CompletionOutput(0, "", [7, 5], -2.3, steps)) == [-0.3, -2.0]
    assert sampled_logprobs(CompletionOutput(0, "", [7, 5], None, None)) == []


def test_build_rollout_uses_the_given_device():
    _, tokenizer = tiny()
    rollout = build_rollout(tokenizer, [[4, 5]], [[6, 1]], [[-0.1, -0.2]], torch.device("cpu"))
    for field in dataclasses.fields(Rollout):
        value = getattr(rollout, field.name)
        if isinstance(value, torch.Tensor):
            assert value.device == torch.device("cpu")


# ----- weight sync ------------------------------------------------------------------------------------
def test_sync_weights_passes_every_weight_then_resets_the_prefix_cache(fake_vllm):
    model, tokenizer = tiny()
    sampler = make_sampler(tokenizer)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)  # values are read at sync time
    sampler.sync_weights(model)
    engine = fake_vllm.last
    assert all(len(batch) == 1 for batch in engine.loads)  # one tensor at a time
    loaded = dict(pair for batch in engine.loads for pair in batch)
    state = model.state_dict()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert list(loaded) == [name for name, _ in model.named_parameters()]
    assert set(loaded) == set(state) - {"lm_head.weight"}  # the tied head comes once, as the embedding
    for name, tensor in loaded.items():
        assert torch.equal(tensor, state[name]), name
    assert engine.events == ["load"] * len(loaded) + ["reset"]


def test_a_failed_prefix_cache_reset_is_an_error(fake_vllm):
    model, tokenizer = tiny()
    sampler = make_sampler(tokenizer)
    fake_vllm.last.reset_succeeds = False
    with pytest.raises(RuntimeError, match="prefix cache"):
        sampler.sync_weights(model)


# ----- a trainer run through the fake engine ------------------------------------------------------------
class HFBackedLLM(FakeLLM):
    """A fake engine that samples with the Hugging Face model saved in ``model`` and loads weights into it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hf, self.tokenizer = load_policy(kwargs["model"])

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        weights = list(weights)
        with torch.no_grad():
            for name, tensor in weights:
                self.hf.get_parameter(name).copy_(tensor)
        return super().load_weights(weights)

    @torch.no_grad()
    def respond(self, i: int, ids: list[int], p: SamplingParams) -> tuple[list[int], list[float]]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(p.seed)
            out = self.hf.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=True,
                temperature=p.temperature,
                top_p=p.top_p,
                top_k=0,
                max_new_tokens=p.max_tokens,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
            )
        tokens = out.sequences[0, len(ids) :]
        logp = torch.log_softmax(torch.stack(out.scores, 1)[0].float(), -1)
        return tokens.tolist(), logp.gather(-1, tokens[:, None])[:, 0].tolist()


def trainer_overrides(tmp_path: Path) -> list[str]:
    return [
        "rollout.backend=vllm",
        "task.prompts_per_step=4",
        "rollout.group_size=4",
        "rollout.max_new_tokens=4",
        "optim.epochs=2",
        "optim.minibatches=2",
        "optim.lr=1e-2",
        "diagnostics.probe_prompts=4",
        "diagnostics.probe_samples=2",
        "run.tensorboard=false",
        "run.steps=2",
        "run.checkpoint_every=0",
        f"run.out_dir={tmp_path / 'run'}",
    ]


def test_trainer_steps_with_the_vllm_backend(fake_vllm, monkeypatch, tmp_path):
    """Two trainer steps sampling through the fake engine. The probe set is sampled before any update, so
    the trainer's forward pass on the Rollout built from the engine's output gives its log-probs back."""
    monkeypatch.setattr(sys.modules["vllm"], "LLM", HFBackedLLM)
    trainer = Trainer(
        load_config("configs/quick.yaml", trainer_overrides(tmp_path)), resume=False, overwrite=True
    )
    probe = trainer.probe
    assert probe is not None and probe.response_mask.any()
    with torch.no_grad():
        logits = response_logits(trainer.model, probe, temperature=1.0)
    logp = torch.where(probe.response_mask, token_logprobs(logits, probe.responses), 0.0)
    torch.testing.assert_close(logp, probe.sampler_logp, atol=1e-5, rtol=1e-5)

    trainer.train(show_progress=False)
    engine = fake_vllm.last
    assert isinstance(engine, HFBackedLLM)
    assert engine.kwargs["model"] == str(tmp_path / "run" / "init_model")
    assert engine.events.count("reset") == 3  # at start-up and after each of the two updates
    assert len(engine.calls) == 3  # the probe set and two rollouts
    for name, param in trainer.model.named_parameters():
        assert torch.equal(engine.hf.get_parameter(name), param.detach()), name
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2
    for row in metrics:
        assert all(math.isfinite(row[k]) for k in ("reward/mean", "entropy/rollout", "grad/norm"))
        assert row["response/length_mean"] > 0
