"""Data parallelism on CPU: 2 gloo processes take the same optimizer step as 1 process on the whole batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from entroclip.distributed import DistContext, global_loss_factor, init_distributed
from entroclip.policy.builtin import save_builtin
from entroclip.policy.loading import load_policy
from entroclip.policy.sampling import sample
from entroclip.update import UpdateBatch, UpdateSettings, run_update

ALPHABET = "0123456789+="


def settings(agg: str) -> UpdateSettings:
    return UpdateSettings(
        eps_low=0.2,
        eps_high=0.2,
        dual_clip=None,
        agg=agg,  # type: ignore[arg-type]
        max_len=6,
        temperature=1.0,
        epochs=1,
        minibatches=1,
        grad_clip=1.0,
    )


def make_batch(model_dir) -> UpdateBatch:
    model, tok = load_policy(model_dir)
    prompts = [f"{a}+{b}=" for a, b in [(1, 2), (13, 4), (7, 55), (9, 9)] for _ in range(4)]
    rollout = sample(model, tok, prompts, max_new_tokens=6, seed=3)
    gen = torch.Generator().manual_seed(0)
    # an old policy that differs from the current one, so that clipping acts
    logp_old = rollout.sampler_logp + 0.3 * torch.randn(rollout.sampler_logp.shape, generator=gen)
    advantages = torch.randn(len(prompts), generator=gen)
    return UpdateBatch(rollout, advantages, logp_old * rollout.response_mask)


def one_step(model_dir, batch, agg, ctx=None):
    torch.manual_seed(0)
    model, _ = load_policy(model_dir)
    wrapped = model
    if ctx is not None and ctx.enabled:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # parameters move by exactly -grad
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    kwargs = {"ctx": ctx} if ctx is not None else {}
    stats, _ = run_update(wrapped, optimizer, scheduler, batch, settings(agg), shuffle_seed=0, **kwargs)
    if ctx is not None:
        stats = stats.reduced(ctx)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, stats.metrics()


def _worker(rank, world, port, model_dir, agg, out_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    ctx = init_distributed()
    batch = make_batch(model_dir)
    rows = torch.arange(batch.advantages.shape[0])
    local = batch.select(torch.tensor(ctx.shard(rows.tolist())))
    weights, metrics = one_step(model_dir, local, agg, ctx)
    if ctx.is_main:
        torch.save({"weights": weights, "metrics": metrics}, out_file)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_builtin("tiny-0.1m", ALPHABET, seed=0, path=tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_two_ranks_equal_one_process(model_dir, tmp_path, agg):
    single_weights, single_metrics = one_step(model_dir, make_batch(model_dir), agg)
    out_file = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, free_port(), model_dir, agg, out_file), nprocs=2, join=True)
    got = torch.load(out_file)
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
    ):
        assert got["metrics"][key] == pytest.approx(single_metrics[key], rel=1e-4, abs=1e-7), key
    assert single_metrics["clip_ratio/low_mean"] > 0 and single_metrics["clip_ratio/high_mean"] > 0


def test_single_process_context():
    ctx = DistContext()
    assert not ctx.enabled and ctx.is_main
    assert ctx.shard([1, 2, 3]) == [1, 2, 3] and ctx.sum([1.0, 2.0]) == [1.0, 2.0]
    assert global_loss_factor(torch.ones(2, 3), "token-mean", ctx) == 1.0
    with pytest.raises(ValueError, match="cannot be split evenly"):
        DistContext(rank=0, world_size=2).shard([1, 2, 3])


TORCHRUN_SMALL = ["run.steps=2", "run.tensorboard=false", "task.prompts_per_step=4", "rollout.group_size=4"]


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).with_name("torchrun")), f"--nproc-per-node={nproc}"]
    command += ["--master-port", str(free_port()), "-m", "entroclip", *args, "--no-progress"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_torchrun_trains_and_resumes_at_another_world_size(tmp_path):
    out = tmp_path / "ddp"
    sets = [x for kv in TORCHRUN_SMALL for x in ("--set", kv)]
    first = torchrun("train", "configs/quick.yaml", "--out", str(out), *sets)
    assert first.returncode == 0, first.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # rank 0 alone writes
    assert (out / "checkpoints" / "step_000002").is_dir()
    # the same global batch is reduced over both ranks: 4 prompts x 4 samples
    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "entroclip",
            "train",
            "--resume",
            str(out),
            "--set",
            "run.steps=3",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    again = torchrun("train", "configs/quick.yaml", "--out", str(out), *sets)
    # each rank exits 2 without hanging; torchrun itself reports a failed child with exit code 1
    assert again.returncode != 0 and "already exists" in again.stderr
