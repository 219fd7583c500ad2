"""Worker processes that run a reward function under a hard per-sample time limit.

A Python thread that hangs cannot be stopped (and a long C call such as a huge integer power holds the
GIL), so rewards that may hang run in worker processes: each sample gets ``timeout_s`` from the moment it
is handed to a worker, after which that worker is killed and replaced. Workers load the reward once, and
say so before they get work, so imports never count against a sample's time. Processes come from the
``forkserver`` start method where available (fast to replace, safe with CUDA and threads in the parent),
else ``spawn``; a forked child of a process that uses a pool starts its own with ``spawn``.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from typing import Any, cast

from entroclip.rewards.base import Reward, Score, score_one
from entroclip.tasks.base import Example

#: Seconds a new worker may take to start and load the reward before the pool gives up.
STARTUP_TIMEOUT_S = 120.0


def default_workers() -> int:
    """Worker processes used when ``workers`` is not given: min(4, CPUs)."""
    return max(1, min(4, os.cpu_count() or 1))


_start_method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _context() -> Any:
    ctx = multiprocessing.get_context(_start_method)
    if _start_method == "forkserver":
        ctx.set_forkserver_preload(["__main__", "entroclip.rewards"])
    return ctx


def _worker_main(conn: Connection, payload: bytes) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the parent's to handle
    try:
        reward = pickle.loads(payload)
    except Exception as e:
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            index, completion, example, seed, step = conn.recv()
        except EOFError:
            return
        conn.send((index, score_one(reward, completion, example, seed, step, index)))


class _Worker:
    def __init__(self, ctx: Any, payload: bytes) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, payload), daemon=True)
        self.process.start()
        child.close()
        self.ready = False
        self.task: int | None = None
        self.deadline = time.monotonic() + STARTUP_TIMEOUT_S

    def idle(self) -> None:
        self.task, self.deadline = None, float("inf")

    def stop(self, grace_s: float = 0.0) -> int | None:
        """Kill the process unless it exits within ``grace_s``; returns its exit code."""
        self.conn.close()
        self.process.join(grace_s)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
        return self.process.exitcode


class WorkerPool:
    """``size`` worker processes running one reward function."""

    def __init__(self, reward: Reward, payload: bytes, size: int) -> None:
        self.reward = reward
        self.payload = payload
        self.size = size
        self._ctx = _context()
        self._workers = [_Worker(self._ctx, payload) for _ in range(size)]

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers = []

    def score(
        self,
        completions: Sequence[str],
        examples: Sequence[Example],
        *,
        timeout_s: float,
        seed: int,
        step: int,
    ) -> list[Score]:
        """Score every sample. After an exception the pool must be closed: workers may hold stale work."""
        results: list[Score | None] = [None] * len(completions)
        queue = deque(range(len(completions)))
        pending = len(completions)
        while pending:
            now = time.monotonic()
            for worker in self._workers:
                if worker.ready and worker.task is None and queue:
                    index = queue.popleft()
                    self._send(worker, (index, completions[index], examples[index], seed, step))
                    worker.task, worker.deadline = index, now + timeout_s
            next_deadline = min(worker.deadline for worker in self._workers)
            ready = wait([worker.conn for worker in self._workers], max(0.0, next_deadline - now))
            done = [self._receive(k) for k, worker in enumerate(self._workers) if worker.conn in ready]
            done += self._expire(timeout_s)
            for index, score in filter(None, done):
                results[index] = score
                pending -= 1
        return cast(list[Score], results)

    def _receive(self, k: int) -> tuple[int, Score] | None:
        """Handle the message of worker ``k``: a result, its start-up report, or its death."""
        worker = self._workers[k]
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            code = worker.stop(grace_s=1.0)
            if not worker.ready:
                raise RuntimeError(
                    f"a worker for reward {self.reward.name!r} exited on start (code {code})"
                ) from None
            self._workers[k] = _Worker(self._ctx, self.payload)
            if worker.task is None:
                return None
            return worker.task, Score(0.0, f"reward worker process died (exit code {code})")
        if worker.ready:
            worker.idle()
            return message
        if message[0] != "ready":
            raise RuntimeError(f"reward {self.reward.name!r} cannot be loaded in a worker: {message[1]}")
        worker.ready = True
        worker.idle()
        return None

    def _expire(self, timeout_s: float) -> list[tuple[int, Score]]:
        """Kill and replace the workers past their deadline; their samples time out."""
        expired = []
        now = time.monotonic()
        for k, worker in enumerate(self._workers):
            if worker.deadline > now:
                continue
            if worker.task is None:  # only a starting worker has a deadline and no task
                raise RuntimeError(
                    f"a worker for reward {self.reward.name!r} did not start in {STARTUP_TIMEOUT_S} s"
                )
            worker.stop()
            self._workers[k] = _Worker(self._ctx, self.payload)
            expired.append((worker.task, Score(0.0, f"timed out after {timeout_s:g} s", timed_out=True)))
        return expired

    def _send(self, worker: _Worker, task: tuple[Any, ...]) -> None:
        try:
            worker.conn.send(task)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            raise TypeError(f"sample {task[0]} cannot be sent to a reward worker process: {e}") from e


_lock = threading.Lock()
_pool: WorkerPool | None = None


def score_in_workers(
    reward: Reward,
    completions: Sequence[str],
    examples: Sequence[Example],
    *,
    timeout_s: float,
    seed: int,
    step: int,
    workers: int | None,
) -> list[Score]:
    """Score samples in the shared pool, (re)starting it when the reward or the worker count changes."""
    global _pool
    try:
        payload = pickle.dumps(reward)
    except Exception as e:
        raise TypeError(
            f"reward {reward.name!r} cannot be sent to a worker process ({e}); define its function at module "
            "level, or run it with isolation='inline' (no time limit)"
        ) from e
    if multiprocessing.current_process().daemon:
        raise RuntimeError(
            f"reward {reward.name!r} runs in worker processes, which a daemonic process (e.g. a "
            "multiprocessing.Pool worker) cannot start; launch runs with subprocess or ProcessPoolExecutor, "
            "or run the reward with isolation='inline' (no time limit)"
        )
    size = workers or default_workers()
    with _lock:
        if _pool is not None and (_pool.payload != payload or _pool.size != size):
            _pool.close()
            _pool = None
        if _pool is None:
            _pool = WorkerPool(reward, payload, size)
        try:
            return _pool.score(completions, examples, timeout_s=timeout_s, seed=seed, step=step)
        except BaseException:
            _pool.close()
            _pool = None
            raise


def close_workers() -> None:
    """Stop the reward worker processes (they are restarted on the next process-isolated scoring)."""
    global _pool
    with _lock:
        if _pool is not None:
            _pool.close()
            _pool = None


def _forget_pool_in_child() -> None:
    """A forked child must not use its parent's workers (it drops its copies of their pipes), nor the
    parent's fork server, which cannot serve it: it starts its own workers with ``spawn``."""
    global _lock, _pool, _start_method
    if _pool is not None:
        for worker in _pool._workers:
            worker.conn.close()
    _pool, _lock, _start_method = None, threading.Lock(), "spawn"


atexit.register(close_workers)
os.register_at_fork(after_in_child=_forget_pool_in_child)
