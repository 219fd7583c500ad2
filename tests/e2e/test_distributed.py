"""Data parallelism on CPU: 2 gloo processes (DDP or FSDP2) take the same optimizer step as 1 process on the
whole batch."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from entroclip.compiling import CompileCache
from entroclip.config import parse_config
from entroclip.control import ControlAction
from entroclip.distributed import (
    DistContext,
    full_optimizer_state,
    full_state_dict,
    global_loss_factor,
    init_distributed,
    load_full_state_dict,
    load_optimizer_state,
    shard_module,
    shutdown,
)
from entroclip.policy.builtin import save_builtin
from entroclip.policy.loading import load_policy
from entroclip.policy.sampling import sample
from entroclip.update import RunSettings, UpdateBatch, run_update
from entroclip.value import ValueHead

ALPHABET = "0123456789+="


def settings(agg: str) -> tuple[RunSettings, ControlAction]:
    """One on-policy minibatch step of 6-token responses, clip bounds (0.2, 0.2)."""
    config = parse_config(
        {
            "loss": {"agg": agg},
            "rollout": {"max_new_tokens": 6},
            "optim": {"epochs": 1, "minibatches": 1, "grad_clip": 1.0, "group_minibatches": False},
        }
    )
    return RunSettings.from_config(config), ControlAction(0.2, 0.2, 0.0)


def make_batch(model_dir, value_head: bool = False) -> UpdateBatch:
    model, tok = load_policy(model_dir)
    prompts = [f"{a}+{b}=" for a, b in [(1, 2), (13, 4), (7, 55), (9, 9)] for _ in range(4)]
    rollout = sample(model, tok, prompts, max_new_tokens=6, seed=3, return_logp=True)
    gen = torch.Generator().manual_seed(0)
    # an old policy that differs from the current one, so that clipping acts
    logp_old = rollout.sampler_logp + 0.3 * torch.randn(rollout.sampler_logp.shape, generator=gen)
    advantages = torch.randn(len(prompts), generator=gen)
    batch = UpdateBatch(rollout, advantages, logp_old * rollout.response_mask)
    if value_head:  # PPO: per-token advantages, rollout-time values and returns
        mask = rollout.response_mask
        batch.advantages = torch.randn(mask.shape, generator=gen) * mask
        batch.old_values = 0.1 * torch.randn(mask.shape, generator=gen) * mask
        batch.returns = torch.randn(mask.shape, generator=gen) * mask
    return batch


def parallelize(module, ctx, parallel):
    """``module`` as the update sees it: wrapped in DDP, sharded in place by FSDP2, or as it is."""
    if ctx is None or not ctx.enabled:
        return module
    if parallel == "fsdp":
        shard_module(module, ctx)
        return module
    return torch.nn.parallel.DistributedDataParallel(module)


def one_step(model_dir, batch, agg, ctx=None, parallel="ddp", compiled=False):
    """One update from the same initial weights; the whole weights (on rank 0) and the global metrics.
    ``compiled``: the minibatch steps compiled (torch.compile with the cheap aot_eager backend)."""
    torch.manual_seed(0)
    model, _ = load_policy(model_dir)
    modules = [model] + ([ValueHead(model.config.hidden_size)] if batch.returns is not None else [])
    wrapped = [parallelize(m, ctx, parallel) for m in modules]
    params = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.SGD(params, lr=1.0)  # parameters move by exactly -grad
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    head = wrapped[1] if len(wrapped) > 1 else None
    kwargs: dict = {"ctx": ctx} if ctx is not None else {}
    if compiled:
        kwargs["compiler"] = CompileCache(compile=True, backend="aot_eager")
    stats, _ = run_update(
        wrapped[0], optimizer, scheduler, batch, *settings(agg), 0, value_head=head, **kwargs
    )
    if compiled:
        assert kwargs["compiler"].compiled, "compilation failed, the update fell back to eager"
    if ctx is not None:
        stats = stats.reduced(ctx)
    weights = {
        f"{i}.{k}": v.detach().clone() for i, m in enumerate(modules) for k, v in full_state_dict(m).items()
    }
    return weights, stats.metrics()


def join_env(rank: int, world: int, port: int) -> DistContext:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    return init_distributed()


def _worker(rank, world, port, model_dir, agg, parallel, value_head, out_file, compiled=False):
    ctx = join_env(rank, world, port)
    batch = make_batch(model_dir, value_head)
    rows = torch.arange(batch.advantages.shape[0])
    local = batch.select(torch.tensor(ctx.shard(rows.tolist())))
    weights, metrics = one_step(model_dir, local, agg, ctx, parallel, compiled)
    if ctx.is_main:
        torch.save({"weights": weights, "metrics": metrics}, out_file)
    shutdown(ctx)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_two(worker, *args, timeout_s: float = 120.0) -> None:
    """Run ``worker(rank, 2, port, *args)`` in 2 processes; fail (not hang) if they do not finish."""
    context = mp.spawn(worker, args=(2, free_port(), *args), nprocs=2, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish within {timeout_s} s (a collective mismatch?)")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_builtin("tiny-0.1m", ALPHABET, seed=0, path=tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize(
    ("parallel", "agg", "value_head", "compiled"),
    [
        ("ddp", "token-mean", False, False),
        ("ddp", "seq-mean-token-mean", False, False),
        ("fsdp", "seq-mean-token-mean", True, False),
        ("ddp", "token-mean", False, True),
        ("fsdp", "seq-mean-token-mean", True, True),
    ],
)
def test_two_ranks_equal_one_process(model_dir, tmp_path, parallel, agg, value_head, compiled):
    """Also with the ranks' minibatch steps compiled (run.compile), against the eager single process."""
    single_weights, single_metrics = one_step(model_dir, make_batch(model_dir, value_head), agg)
    out_file = tmp_path / "rank0.pt"
    spawn_two(_worker, model_dir, agg, parallel, value_head, out_file, compiled)
    got = torch.load(out_file)
    assert got["weights"].keys() == single_weights.keys()
    for name, value in single_weights.items():
        torch.testing.assert_close(got["weights"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    for key in (
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "ratio/mean",
        "ratio/max",
        "loss/pg",
        "entropy/effect_low",
        "entropy/effect_high",
        "entropy/effect_pos",
        "grad/norm",
        *(["loss/value"] if value_head else []),
    ):
        assert got["metrics"][key] == pytest.approx(single_metrics[key], rel=1e-4, abs=1e-7), key
    assert single_metrics["clip_ratio/low_mean"] > 0 and single_metrics["clip_ratio/high_mean"] > 0


def sample_for_rank(model, tok, rank):
    """Rank 0 stops after 2 new tokens, rank 1 after 6: a sharded model must keep rank 0 in step."""
    return sample(model, tok, ["1+2=", "13+4="], max_new_tokens=2 + 4 * rank, seed=rank)


def sharded_adamw(model_dir, ctx):
    model, tok = load_policy(model_dir)
    shard_module(model, ctx)
    return model, tok, torch.optim.AdamW(model.parameters(), lr=1e-2)


def save_whole(model, optimizer, ctx, path):
    """Gather the whole weights and optimizer state (every rank) and let rank 0 save them."""
    gathered = full_state_dict(model), full_optimizer_state(optimizer, ctx)
    if ctx.is_main:
        torch.save(gathered, path)
    ctx.barrier()


def _sharded_worker(rank, world, port, model_dir, out):
    ctx = join_env(rank, world, port)
    model, tok, optimizer = sharded_adamw(model_dir, ctx)
    torch.save(sample_for_rank(model, tok, rank).input_ids, out / f"ids.{rank}.pt")
    model(input_ids=torch.tensor([[4 + rank, 5, 6, 7]])).logits.square().mean().backward()
    optimizer.step()
    save_whole(model, optimizer, ctx, out / "state.pt")
    weights, state = torch.load(out / "state.pt")
    model, _, optimizer = sharded_adamw(model_dir, ctx)  # a fresh start, resumed from the whole state
    load_full_state_dict(model, weights, strict=False)
    load_optimizer_state(optimizer, state)
    save_whole(model, optimizer, ctx, out / "again.pt")
    shutdown(ctx)


def test_sharded_model_samples_like_the_whole_model_and_its_whole_state_round_trips(model_dir, tmp_path):
    spawn_two(_sharded_worker, model_dir, tmp_path)
    model, tok = load_policy(model_dir)
    for rank in (0, 1):
        expected = sample_for_rank(model, tok, rank).input_ids
        assert torch.equal(torch.load(tmp_path / f"ids.{rank}.pt"), expected)
    (weights, state), (weights_again, state_again) = (
        torch.load(tmp_path / n) for n in ("state.pt", "again.pt")
    )
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in model.state_dict().items()}
    torch.testing.assert_close(weights_again, weights, rtol=0, atol=0)
    torch.testing.assert_close(state_again, state, rtol=0, atol=0)
    params = list(model.parameters())
    assert all(entry["exp_avg"].shape == params[i].shape for i, entry in state["state"].items())


def test_single_process_context():
    ctx = DistContext()
    assert not ctx.enabled and ctx.is_main
    assert ctx.shard([1, 2, 3]) == [1, 2, 3] and ctx.sum([1.0, 2.0]) == [1.0, 2.0]
    assert global_loss_factor(torch.ones(2, 3), "token-mean", ctx) == 1.0
    with pytest.raises(ValueError, match="cannot be split evenly"):
        DistContext(rank=0, world_size=2).shard([1, 2, 3])


TORCHRUN_SMALL = [
    "run.steps=2",
    "run.tensorboard=false",
    "task.prompts_per_step=4",
    "rollout.group_size=4",
    "optim.minibatches=2",  # minibatches of whole groups: 2 prompts per rank
]


def launch(*args: str, ranks: int = 2) -> subprocess.CompletedProcess:
    """``entroclip ARGS`` under torchrun with ``ranks`` processes, or as one plain process."""
    command = [sys.executable]
    if ranks > 1:
        command = [str(Path(sys.executable).with_name("torchrun")), f"--nproc-per-node={ranks}"]
        command += ["--master-port", str(free_port())]
    command += ["-m", "entroclip", *args, "--no-progress"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def overrides(*settings: str) -> list[str]:
    return [x for kv in settings for x in ("--set", kv)]


def test_torchrun_trains_and_resumes_at_another_world_size(tmp_path):
    out = tmp_path / "ddp"
    sets = overrides(*TORCHRUN_SMALL)
    first = launch("train", "configs/quick.yaml", "--out", str(out), *sets)
    assert first.returncode == 0, first.stderr[-2000:]
    assert [r["step"] for r in logged(out)] == [1, 2]  # rank 0 alone writes
    assert (out / "checkpoints" / "step_000002").is_dir()
    # the same global batch is reduced over both ranks: 4 prompts x 4 samples
    resumed = launch("train", "--resume", str(out), "--set", "run.steps=3", ranks=1)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["step"] for r in logged(out)] == [1, 2, 3]
    again = launch("train", "configs/quick.yaml", "--out", str(out), *sets)
    # each rank exits 2 without hanging; torchrun itself reports a failed child with exit code 1
    assert again.returncode != 0 and "already exists" in again.stderr


def test_fsdp_checkpoint_resumes_in_one_process_and_back(tmp_path):
    """A sharded PPO run (value head, reference model, evaluation, probe) writes whole checkpoints."""
    out = tmp_path / "fsdp"
    ppo = ["run.parallel=fsdp", "advantage.kind=gae", "loss.kl.coef=0.01", "eval.every=2", "eval.prompts=2"]
    first = launch("train", "configs/quick.yaml", "--out", str(out), *overrides(*TORCHRUN_SMALL, *ppo))
    assert first.returncode == 0, first.stderr[-2000:]
    single = launch("train", "--resume", str(out), "--set", "run.steps=3", ranks=1)
    assert single.returncode == 0 and "step_000002 (step 2)" in single.stderr, single.stderr[-2000:]
    sharded = launch("train", "--resume", str(out), "--set", "run.steps=4")
    assert sharded.returncode == 0 and "step_000003 (step 3)" in sharded.stderr, sharded.stderr[-2000:]
    rows = logged(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all("loss/value" in r and "kl/ref" in r for r in rows)
    assert ["eval/pass@1" in r for r in rows] == [False, True, False, True]
