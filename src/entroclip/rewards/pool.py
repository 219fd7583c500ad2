"""Worker processes that run a reward function under a hard per-sample time limit.

A Python thread that hangs cannot be stopped (and a long C call such as a huge integer power holds the
GIL), so rewards that may hang run in worker processes: each sample gets ``timeout_s`` from the moment it
is handed to a worker, after which that worker is killed and replaced.

A pool starts one *loader* process with ``spawn`` (safe with CUDA and threads in the parent; it sets up
``sys.path`` and ``__main__`` like the parent's), which loads the reward once and then forks the workers.
A replacement is thus a fork of a process that has everything imported, and costs milliseconds: started
any other way, each new worker would import the parent's ``__main__`` (the CLI: torch, transformers) and
the reward's modules again, seconds for every timed-out sample. ``forkserver`` does not avoid that: its
preload of ``__main__`` is a no-op before Python 3.13 (CPython gh-126631), and it cannot preload a reward
chosen after it started. The loader is single-threaded, so forking it is safe; as the workers' parent it
kills and reaps them, and it kills them all when the pool's connection to it closes, even when the pool's
process dies.
"""

from __future__ import annotations

import atexit
import math
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import reduction
from multiprocessing.connection import Connection, wait
from typing import Any, cast

from entroclip.rewards.base import Reward, Score, score_one
from entroclip.tasks.base import Example

#: Seconds the loader may take to start and load the reward before the pool gives up.
STARTUP_TIMEOUT_S = 120.0
#: Seconds a process whose connection closed may take to exit before it is killed (so its own exit code
#: is reported, not the kill's).
EXIT_GRACE_S = 1.0


def default_workers() -> int:
    """Worker processes used when ``workers`` is not given: min(4, CPUs)."""
    return max(1, min(4, os.cpu_count() or 1))


# ----- in the loader process ------------------------------------------------------------------------
def _loader_main(control: Connection, payload: bytes) -> None:
    """Load the reward, then start and stop workers as the pool asks; stop them all when it hangs up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the parent's to handle; workers inherit this
    try:
        reward = pickle.loads(payload)
    except Exception as e:
        control.send(("failed", f"{type(e).__name__}: {e}"))
        return
    control.send(("ready", None))
    workers: set[int] = set()
    try:
        while True:
            try:
                request, *args = control.recv()
            except EOFError:
                return
            if request == "start":
                workers.add(_fork_worker(control, reward))
            else:  # "stop"
                pid, grace_s = args
                workers.remove(pid)
                control.send(_reap(pid, grace_s))
    finally:
        for pid in workers:
            _reap(pid, 0.0)


def _fork_worker(control: Connection, reward: Reward) -> int:
    """Fork a worker with a connection of its own, whose other end is passed to the pool; returns its pid."""
    pool_end, worker_end = multiprocessing.Pipe()
    pid = os.fork()
    if pid == 0:  # the worker must never return into the loader's loop
        status = 1
        try:
            control.close()
            pool_end.close()
            _serve(worker_end, reward)
            status = 0
        finally:
            os._exit(status)
    worker_end.close()
    control.send(pid)
    reduction.send_handle(control, pool_end.fileno(), os.getppid())
    pool_end.close()
    return pid


def _serve(conn: Connection, reward: Reward) -> None:
    """Score the samples that come on ``conn`` until the pool closes it."""
    while True:
        try:
            completion, example, seed, step, index = conn.recv()
        except EOFError:
            return
        conn.send(score_one(reward, completion, example, seed, step, index))


def _reap(pid: int, grace_s: float) -> int:
    """Wait up to ``grace_s`` for worker ``pid`` to exit, else kill it; returns its exit code."""
    deadline = time.monotonic() + grace_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        time.sleep(0.01)


# ----- in the process that scores -------------------------------------------------------------------
@dataclass
class _Worker:
    pid: int
    conn: Connection
    task: int | None = None
    deadline: float = math.inf


class WorkerPool:
    """``size`` worker processes running one reward function, forked by a loader that holds the reward."""

    def __init__(self, reward: Reward, payload: bytes, size: int) -> None:
        self.reward = reward
        self.payload = payload
        self.size = size
        ctx = multiprocessing.get_context("spawn")
        self._control, loader_end = ctx.Pipe()
        self._loader = ctx.Process(target=_loader_main, args=(loader_end, payload), daemon=True)
        self._loader.start()
        loader_end.close()
        self._loaded = False
        self._workers: list[_Worker] = []
        try:
            self._wait_loaded()
            self._workers = [_Worker(*self._fork()) for _ in range(size)]
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the workers and the loader (which kills its workers once its connection closes)."""
        for worker in self._workers:
            worker.conn.close()
        self._workers = []
        self._control.close()
        # A loader still loading has no workers and nobody to answer: it need not finish.
        self._loader.join(EXIT_GRACE_S if self._loaded else 0.0)
        if self._loader.exitcode is None:
            self._loader.kill()
            self._loader.join()

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
        while queue or any(worker.task is not None for worker in self._workers):
            for worker in self._workers:
                if worker.task is None and queue:
                    index = queue.popleft()
                    self._send(worker, (completions[index], examples[index], seed, step, index))
                    worker.task, worker.deadline = index, time.monotonic() + timeout_s
            busy = [worker for worker in self._workers if worker.task is not None]
            ready = wait([w.conn for w in busy], max(0.0, min(w.deadline for w in busy) - time.monotonic()))
            now = time.monotonic()
            for worker in busy:
                index = cast(int, worker.task)
                if worker.conn in ready:
                    try:
                        results[index] = worker.conn.recv()
                    except (EOFError, OSError):
                        code = self._replace(worker, EXIT_GRACE_S)
                        results[index] = Score(0.0, f"reward worker process died (exit code {code})")
                    else:
                        worker.task, worker.deadline = None, math.inf
                elif worker.deadline <= now:
                    self._replace(worker, 0.0)
                    results[index] = Score(0.0, f"timed out after {timeout_s:g} s", timed_out=True)
        return cast(list[Score], results)

    def _wait_loaded(self) -> None:
        name = self.reward.name
        if not self._control.poll(STARTUP_TIMEOUT_S):
            raise RuntimeError(
                f"the worker loader of reward {name!r} did not start in {STARTUP_TIMEOUT_S:g} s"
            )
        try:
            status, error = self._control.recv()
        except EOFError:
            self._loader.join(EXIT_GRACE_S)
            raise RuntimeError(
                f"the worker loader of reward {name!r} exited on start (code {self._loader.exitcode})"
            ) from None
        if status != "ready":
            raise RuntimeError(f"reward {name!r} cannot be loaded in a worker: {error}")
        self._loaded = True

    def _fork(self) -> tuple[int, Connection]:
        """A new worker's pid and connection."""
        pid = self._ask("start")
        return pid, Connection(reduction.recv_handle(self._control))

    def _replace(self, worker: _Worker, grace_s: float) -> int:
        """Stop ``worker`` (killed after ``grace_s``), fork a new one in its place; returns its exit code."""
        code = self._ask("stop", worker.pid, grace_s)
        worker.conn.close()
        worker.pid, worker.conn = self._fork()
        worker.task, worker.deadline = None, math.inf
        return cast(int, code)

    def _ask(self, *request: Any) -> Any:
        """Send ``request`` to the loader and return its answer."""
        try:
            self._control.send(request)
            return self._control.recv()
        except (EOFError, OSError):
            raise RuntimeError(f"the worker loader of reward {self.reward.name!r} died") from None

    def _send(self, worker: _Worker, task: tuple[Any, ...]) -> None:
        try:
            worker.conn.send(task)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            raise TypeError(f"sample {task[-1]} cannot be sent to a reward worker process: {e}") from e


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
    """A forked child must not use its parent's workers: it drops its copies of their connections and of
    the loader's, and starts a pool of its own when it needs one."""
    global _lock, _pool
    if _pool is not None:
        for worker in _pool._workers:
            worker.conn.close()
        _pool._control.close()
    _pool, _lock = None, threading.Lock()


atexit.register(close_workers)
os.register_at_fork(after_in_child=_forget_pool_in_child)
