"""Evaluate search candidates in parallel: local worker processes or an existing Ray cluster.

Every evaluator yields `(candidate, FitnessValue, seconds)` as results arrive; the search records each one
as it comes, so an interruption loses nothing. Workers build their fitness once, from a picklable
`WorkerSpec` (for a real search: the run directory, whose calibrated super-network they load), then score
the candidates they are sent. A candidate's fitness depends only on the candidate and its fixed seeds, so
the result does not depend on how many workers there are (given the same threads per worker).

Faults: a worker that dies or exceeds `timeout_s` on a candidate is replaced and its candidate re-queued;
a candidate that kills `max_attempts` workers in a row, or a pool that cannot be restarted, stops the search
with a clear error (its state is saved after every evaluation, so it resumes).
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from queue import Empty

from tmpq.errors import TmpqError
from tmpq.search.evolution import FitnessValue
from tmpq.search.space import Candidate

Result = tuple[Candidate, FitnessValue, float]


@dataclass(frozen=True)
class Execution:
    """Where a search evaluates candidates: this process (workers 0), `workers` local processes, or a Ray
    cluster (`ray_address`: an address, "auto" for a running cluster, "local" to start one). `threads` is
    torch's thread count per worker; `timeout_s` re-queues a candidate whose worker takes longer."""

    workers: int = 0
    ray_address: str | None = None
    threads: int = 1
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.workers < 0 or self.threads < 1:
            raise TmpqError(f"need workers >= 0 and threads >= 1, got {self.workers} and {self.threads}")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise TmpqError(f"a candidate timeout must be positive, got {self.timeout_s}")


@dataclass(frozen=True)
class WorkerSpec:
    """How a worker builds its fitness: `factory` is "package.module:function", called as factory(**kwargs)
    in the worker, returning a callable Candidate -> FitnessValue. Plain data, so it pickles everywhere."""

    factory: str
    kwargs: dict = field(default_factory=dict)
    threads: int = 1

    def build(self) -> Callable[[Candidate], FitnessValue]:
        import torch

        from tmpq.allocator import keep_freed_memory

        keep_freed_memory()  # a worker samples all its life: keep freed memory for reuse (tmpq.allocator)
        torch.set_num_threads(self.threads)
        module, _, name = self.factory.partition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise TmpqError(f"worker factory {self.factory!r} cannot be imported ({e})") from None
        return fn(**self.kwargs)


def lane_spec(spec: WorkerSpec, lane: int) -> WorkerSpec:
    """Local worker `lane`'s spec: with several CUDA devices, worker i uses device i mod count (Ray assigns its actors
    their own GPU instead); on one device or the CPU every worker shares it."""
    device = str(spec.kwargs.get("device", "cpu"))
    if device != "cuda":
        return spec
    import torch

    count = torch.cuda.device_count()
    return replace(spec, kwargs=spec.kwargs | {"device": f"cuda:{lane % count}"}) if count > 1 else spec


def _next_attempt(queue: list[Candidate], attempts: dict[str, int], max_attempts: int, hint: str) -> Candidate:
    """Pop the next candidate and count its attempt; one that already failed `max_attempts` times stops the search."""
    c = queue.pop(0)
    attempts[c.key] = attempts.get(c.key, 0) + 1
    if attempts[c.key] > max_attempts:
        raise TmpqError(
            f"candidate {c.key[:60]}... failed {max_attempts} times (worker died or timed out); the search state "
            f"is saved: {hint}, or raise --candidate-timeout"
        )
    return c


class SerialEvaluator:
    """In this process, one candidate after another (the default)."""

    workers = 1

    def __init__(self, fitness: Callable[[Candidate], FitnessValue]) -> None:
        self.fitness = fitness

    def evaluate(self, candidates: Sequence[Candidate]) -> Iterator[Result]:
        for c in candidates:
            t0 = time.perf_counter()
            fv = self.fitness(c)
            yield c, fv, time.perf_counter() - t0

    def close(self) -> None:
        pass


# --- local processes ------------------------------------------------------------------------------------------
_worker_fitness: Callable[[Candidate], FitnessValue] | None = None
"""The fitness of a pool worker process, built once by its initializer (the standard pattern for per-process
state in a process pool; it lives only in worker processes, never in the caller's)."""


def _init_worker(spec: WorkerSpec, ready) -> None:
    global _worker_fitness
    _worker_fitness = spec.build()
    ready.put(os.getpid())  # start-up (imports, loading the super-network) does not count against a timeout


def _evaluate_in_worker(candidate: dict) -> tuple[float, int, dict, float]:
    t0 = time.perf_counter()
    fv = _worker_fitness(Candidate.from_json(candidate))
    return float(fv.value), int(fv.forwards), dict(fv.extra), time.perf_counter() - t0


class _Lane:
    """One worker process in a single-process pool of its own. A shared ProcessPoolExecutor breaks as a whole
    when one worker dies, failing the other workers' in-flight tasks even when they had finished, which would
    re-evaluate them; with a pool per worker, a death or a hang touches only that worker's candidate."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.pool: ProcessPoolExecutor | None = None
        self.ready_q = None
        self.ready_at: float | None = None

    def submit(self, c: Candidate) -> Future:
        if self.pool is None:
            ctx = mp.get_context("spawn")
            self.ready_q, self.ready_at = ctx.Queue(), None
            self.pool = ProcessPoolExecutor(
                1, mp_context=ctx, initializer=_init_worker, initargs=(self.spec, self.ready_q)
            )
        return self.pool.submit(_evaluate_in_worker, c.to_json())

    def started(self) -> float | None:
        """When the worker had finished starting (None: still starting); start-up does not count against a timeout."""
        if self.ready_at is None and self.ready_q is not None:
            try:
                self.ready_q.get_nowait()
                self.ready_at = time.monotonic()
            except Empty:
                pass
        return self.ready_at

    def kill(self) -> None:
        pool, self.pool = self.pool, None
        if pool is None:
            return
        # a hung task cannot be cancelled through the executor's API; terminating its process is the only way
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


class ProcessEvaluator:
    """`workers` local processes (spawned: safe with torch and threads), at most one candidate each at a time."""

    def __init__(self, spec: WorkerSpec, workers: int, timeout_s: float | None = None, max_attempts: int = 3) -> None:
        if workers < 1:
            raise TmpqError(f"workers must be >= 1, got {workers}")
        self.spec, self.workers, self.timeout_s, self.max_attempts = spec, workers, timeout_s, max_attempts
        self._lanes = [_Lane(lane_spec(spec, i)) for i in range(workers)]
        self.restarts = 0

    def _restart(self, lane: _Lane) -> None:
        lane.kill()
        self.restarts += 1

    def evaluate(self, candidates: Sequence[Candidate]) -> Iterator[Result]:
        queue = list(candidates)
        attempts: dict[str, int] = {}
        inflight: dict[Future, tuple[Candidate, float, _Lane]] = {}
        try:
            while queue or inflight:
                busy = {id(lane) for _, _, lane in inflight.values()}
                for lane in self._lanes:
                    if not queue:
                        break
                    if id(lane) in busy:
                        continue
                    c = _next_attempt(queue, attempts, self.max_attempts, "check the worker error")
                    try:
                        inflight[lane.submit(c)] = (c, time.monotonic(), lane)
                    except BrokenProcessPool:  # this lane broke between tasks: the candidate never ran
                        queue.insert(0, c)
                        attempts[c.key] -= 1
                        self._restart(lane)
                done, _ = wait(list(inflight), timeout=1.0, return_when=FIRST_COMPLETED)
                for fut in done:
                    c, _, lane = inflight.pop(fut)
                    try:
                        value, forwards, extra, wall = fut.result()
                    except BrokenProcessPool:  # its worker died: only this candidate is re-queued
                        queue.insert(0, c)
                        self._restart(lane)
                        continue
                    yield c, FitnessValue(value, forwards, extra), wall
                if self.timeout_s is not None:
                    now = time.monotonic()
                    for fut, (c, t0, lane) in list(inflight.items()):
                        ready_at = lane.started()
                        if ready_at is not None and now - max(t0, ready_at) > self.timeout_s:
                            del inflight[fut]
                            queue.insert(0, c)
                            self._restart(lane)
        finally:
            for _, _, lane in inflight.values():  # interrupted: nothing is left running behind the caller's back
                lane.kill()

    def close(self) -> None:
        for lane in self._lanes:
            lane.close()


# --- Ray ------------------------------------------------------------------------------------------------------
class RayEvaluator:
    """One Ray actor per worker (one GPU each where the cluster has GPUs) on an existing cluster."""

    def __init__(
        self,
        spec: WorkerSpec,
        address: str = "auto",
        workers: int | None = None,
        timeout_s: float | None = None,
        max_attempts: int = 3,
    ) -> None:
        try:
            import ray
        except ImportError:
            raise TmpqError("--ray needs Ray: pip install 'tmpq[ray]' (or pip install ray)") from None
        self.ray = ray
        if not ray.is_initialized():
            check_ray_address(address)
            try:
                ray.init(address=None if address == "local" else address, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise TmpqError(
                    f"could not connect to a Ray cluster at {address!r} ({e}); start one with `ray start --head`, "
                    "or use --ray local to start a local instance"
                ) from None
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        self.workers = workers or gpus or max(1, int(res.get("CPU", 1)) // max(spec.threads, 1))
        self.spec, self.timeout_s, self.max_attempts = spec, timeout_s, max_attempts
        self._actor_cls = ray.remote(num_cpus=spec.threads, num_gpus=1 if gpus else 0, max_restarts=0)(_RayWorker)
        self.actors = [self._actor_cls.remote(spec) for _ in range(self.workers)]
        self.restarts = 0

    def evaluate(self, candidates: Sequence[Candidate]) -> Iterator[Result]:
        ray = self.ray
        queue = list(candidates)
        attempts: dict[str, int] = {}
        idle = list(range(len(self.actors)))
        inflight: dict = {}  # ObjectRef -> (candidate, actor index, start)
        while queue or inflight:
            while queue and idle:
                c = _next_attempt(queue, attempts, self.max_attempts, "check the Ray worker logs")
                i = idle.pop(0)
                inflight[self.actors[i].evaluate.remote(c.to_json())] = (c, i, time.monotonic())
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            for ref in ready:
                c, i, _ = inflight.pop(ref)
                try:
                    value, forwards, extra, wall = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError):
                    queue.insert(0, c)
                    self._replace(i)
                    idle.append(i)
                    continue
                idle.append(i)
                yield c, FitnessValue(value, forwards, extra), wall
            if self.timeout_s is not None:
                now = time.monotonic()
                for ref, (c, i, t0) in list(inflight.items()):
                    if now - t0 > self.timeout_s:
                        inflight.pop(ref)
                        queue.insert(0, c)
                        self._replace(i)
                        idle.append(i)

    def _replace(self, i: int) -> None:
        self.ray.kill(self.actors[i], no_restart=True)
        self.actors[i] = self._actor_cls.remote(self.spec)
        self.restarts += 1

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a, no_restart=True)
        self.actors = []


class _RayWorker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.fitness = spec.build()

    def evaluate(self, candidate: dict) -> tuple[float, int, dict, float]:
        t0 = time.perf_counter()
        fv = self.fitness(Candidate.from_json(candidate))
        return float(fv.value), int(fv.forwards), dict(fv.extra), time.perf_counter() - t0


def check_ray_address(address: str, timeout_s: float = 5.0) -> None:
    """Ray retries an unreachable HOST:PORT for minutes; one plain TCP connect says at once whether it is there."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or address.startswith("ray://"):
        return  # auto, local, or a client address: Ray's own checks apply
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise TmpqError(
            f"no Ray cluster answers at {address} ({e.strerror or e}); start one with `ray start --head` and pass "
            "its address, or use --ray local"
        ) from None


def make_evaluator(
    fitness: Callable[[Candidate], FitnessValue] | None,
    spec: WorkerSpec | None,
    workers: int = 0,
    ray_address: str | None = None,
    timeout_s: float | None = None,
):
    """Serial in-process (workers 0, no Ray), N local processes, or Ray actors."""
    if ray_address is not None:
        return RayEvaluator(spec, ray_address, workers or None, timeout_s)
    if workers >= 1:
        return ProcessEvaluator(spec, workers, timeout_s)
    if fitness is None:
        raise TmpqError("a serial evaluator needs the fitness callable")
    return SerialEvaluator(fitness)
