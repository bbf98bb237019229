"""The run pipeline: studies prepared and finished in worker processes, one model forward.

A run goes through three stages:

1. *prepare* (worker): read, decode and preprocess the study (:meth:`BatchedModel.prepare`);
2. *forward* (service process): the one model instance runs on a batch of rows gathered
   across studies: up to ``max_batch`` rows, waiting at most ``batch_wait_seconds`` for
   studies still being prepared (a lone study never waits);
3. *finish* (worker): build the result objects, encode each once in memory, write those
   bytes atomically and check the same bytes and data sets with the conformance gate
   (:func:`service.conformance.check_dataset`: nothing is read back).

A model without stages runs whole in one worker task; a :class:`SplitModel` (``annotate``)
runs as one task per worker, each on a part of the study's instances, merged into one
result. With ``workers = 0``
every stage runs in the service process, in the same order. Worker tasks never touch the
ledger: the engine records what they report, so exactly-once bookkeeping stays in one
thread. Decoding and building DICOM are pure Python for the most part and hold the GIL,
hence processes rather than threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import importlib
import logging
import multiprocessing
import os
import queue
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset

from service.conformance import Finding, check_datasets
from service.errors import GatewayError, ModelNotReady, TransientError
from service.models.base import (
    BatchedModel,
    Model,
    ModelResult,
    Prepared,
    RunContext,
    SplitModel,
    nothing_produced,
)
from service.values import Study
from service.writers import encode_dataset, output_path, write_encoded

logger = logging.getLogger(__name__)

#: Errors a stage reports as the run's failure reason; anything else is a bug and is
#: reported the same way, with its traceback in the log.
EXPECTED_ERRORS = (GatewayError, OSError, ValueError, RuntimeError)


@dataclass(frozen=True)
class Written:
    """One output object as written by a worker."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str


@dataclass
class Finished:
    """What a worker reports for a run: written outputs and the gate's findings, or why
    the run failed. Values, not exceptions, so that they cross the process boundary."""

    written: list[Written] = field(default_factory=list)
    problems: list[Finding] = field(default_factory=list)
    findings: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> reason
    #: the error may pass by itself (I/O error, full disk): the run is tried again later
    transient: bool = False
    #: the worker ran out of its memory limit: it is replaced before it takes another task
    recycle: bool = False


@dataclass
class Job:
    """One run in flight."""

    run_id: int
    study: Study
    model: Model
    ctx: RunContext
    layout: str
    timings: dict[str, float] = field(default_factory=dict)
    prepared: Prepared | None = None
    ready_at: float = 0.0  # monotonic time the prepared rows became ready for the forward
    pool: int = 0  # the worker pool generation its current task went to
    retried: bool = False  # resubmitted once after a worker process died
    started: float = 0.0  # monotonic time its first task started in a worker (deadline)
    killed: str = ""  # why its worker was killed (deadline, memory): fails, not retried


@dataclass
class Outcome:
    job: Job
    finished: Finished

    @property
    def timings(self) -> dict[str, float]:
        """The run's timings: the service's (start, forward, batch) and the workers'."""
        return {**self.job.timings, **self.finished.timings}


# -- worker tasks (module level: they are pickled by reference) -----------------------------


def _value(future: Future[Any]) -> Any:
    """A done task's result, or its exception as a failure."""
    exc = future.exception()
    return future.result() if exc is None else _failure(exc)


def _failure(exc: BaseException) -> Finished:
    if isinstance(exc, MemoryError) and _MEMORY_MB:
        reason = f"run exceeded worker_memory_mb={_MEMORY_MB} (MemoryError): worker replaced"
        logger.error("%s", reason)
        return Finished(error=reason, recycle=True)
    if not isinstance(exc, EXPECTED_ERRORS):
        logger.error("unexpected error in a run stage", exc_info=exc)
    # a model whose network failed to load after its studies were accepted: they wait
    transient = isinstance(exc, TransientError | OSError | ModelNotReady)
    return Finished(error=f"{type(exc).__name__}: {exc}", transient=transient)


def _write_and_gate(
    result: ModelResult, study: Study, output_dir: Path, layout: str, timings: dict[str, float]
) -> Finished:
    t0 = time.perf_counter()
    written: list[Written] = []
    encoded: list[tuple[Path, Dataset, bytes]] = []  # what the gate checks is what is written
    for ds in result.datasets:
        try:
            target = output_path(output_dir, study.gateway_id, layout, ds)
            data = encode_dataset(ds)
            write_encoded(data, target)
        except Exception as exc:  # what was written so far is still reported
            failed = _failure(exc)
            failed.written = written
            return failed
        written.append(Written(target, ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID))
        encoded.append((target, ds, data))
    t1 = time.perf_counter()
    problems = check_datasets(
        encoded,
        source_sop_uids=study.sop_uids,
        run_sop_uids={w.sop_instance_uid for w in written},
    )
    timings.update(write_s=t1 - t0, gate_s=time.perf_counter() - t1)
    return Finished(written, problems, result.findings, "", timings, result.skipped_instances)


def run_whole(
    model: Model, study: Study, ctx: RunContext, output_dir: Path, layout: str
) -> Finished:
    """A model without stages: run, write, gate."""
    try:
        t0 = time.perf_counter()
        result = model.run(study, ctx)
        timings = {"model_s": time.perf_counter() - t0}
        return _write_and_gate(result, study, output_dir, layout, timings)
    except Exception as exc:
        return _failure(exc)


def run_part(
    model: SplitModel, study: Study, ctx: RunContext, output_dir: Path, layout: str
) -> Finished:
    """One part of a split model's run: run, write, gate."""
    try:
        t0 = time.perf_counter()
        result = model.run_part(study, ctx)
        timings = {"model_s": time.perf_counter() - t0}
        return _write_and_gate(result, study, output_dir, layout, timings)
    except Exception as exc:
        return _failure(exc)


def split_study(study: Study, parts: int) -> list[Study]:
    """``study``'s instances in at most ``parts`` contiguous runs of (series, SOP) order."""
    ordered = sorted(study.instances, key=lambda i: (i.series_instance_uid, i.sop_instance_uid))
    size = -(-len(ordered) // max(1, parts))
    return [
        Study(study.gateway_id, study.study_uid, study.folder, ordered[i : i + size])
        for i in range(0, len(ordered), size)
    ]


def merge_parts(model: SplitModel, parts: list[Finished]) -> Finished:
    """The run's result from its parts' (in part order): it fails with the first part
    that failed, or when no part produced anything."""
    merged = Finished(
        written=[w for part in parts for w in part.written],
        problems=[f for part in parts for f in part.problems],
        findings=model.merge_findings([part.findings for part in parts if not part.error]),
        error=next((part.error for part in parts if part.error), ""),
        skipped={k: v for part in parts for k, v in part.skipped.items()},
        transient=any(part.transient for part in parts),
    )
    for part in parts:
        for key, seconds in part.timings.items():
            merged.timings[key] = merged.timings.get(key, 0.0) + seconds
    merged.timings["parts"] = float(len(parts))
    if not merged.error and not merged.written:
        merged.error = nothing_produced(model.name, merged.skipped)
    return merged


def prepare(
    model: BatchedModel, study: Study, ctx: RunContext
) -> tuple[Prepared, float] | Finished:
    """The prepared study and the seconds it took, or why it failed."""
    try:
        t0 = time.perf_counter()
        prepared = model.prepare(study, ctx)
        return prepared, time.perf_counter() - t0
    except Exception as exc:
        return _failure(exc)


def finish(
    model: BatchedModel,
    study: Study,
    prepared: Prepared,
    outputs: np.ndarray,
    ctx: RunContext,
    output_dir: Path,
    layout: str,
) -> Finished:
    try:
        t0 = time.perf_counter()
        result = model.finish(prepared, outputs, ctx)
        timings = {"build_s": time.perf_counter() - t0}
        return _write_and_gate(result, study, output_dir, layout, timings)
    except Exception as exc:
        return _failure(exc)


#: In a worker: the memory limit it runs under (MiB above its size after warm-up; 0 none)
#: and the queue on which each task reports its start.
_MEMORY_MB = 0
_STARTS: Any = None


def _task(token: int, fn: Callable[..., Any], *args: Any) -> Any:
    """Run one stage task in a worker, first telling the service which process runs it
    (so that it can kill that worker at the run's deadline); then give the memory the task
    freed back to the system."""
    if _STARTS is not None:
        _STARTS.put((token, os.getpid()))
    try:
        return fn(*args)
    finally:
        release_memory()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    return trim if callable(trim) else None


#: Freed heap memory is given back once the process holds this much more than after its
#: last trim: trimming after every task made the next study fault its pages in again
#: (``bench/cxr.py``: read+prep against "trimmed")
TRIM_ABOVE_MB = 64.0
_resident_after_trim = 0.0


def release_memory() -> None:
    """Return freed heap memory to the system (glibc ``malloc_trim``; nothing elsewhere)
    once the process's resident memory grew :data:`TRIM_ABOVE_MB` since the last time: a
    decoded radiograph's buffers or a batch's activations would otherwise stay resident
    between studies, up to that much."""
    global _resident_after_trim
    trim = _malloc_trim()
    if trim is None or _resident_mb(os.getpid()) - _resident_after_trim < TRIM_ABOVE_MB:
        return
    trim(0)
    _resident_after_trim = _resident_mb(os.getpid())


def _address_space() -> int:
    """This process's virtual memory size in bytes (``/proc/self/statm``)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _limit_memory(megabytes: int) -> None:
    """A backstop under the service's watchdog on the worker's resident memory
    (:meth:`Pipeline._police`): the worker's address space may grow by at most twice
    ``megabytes`` beyond its size now (RLIMIT_AS), so that a growth faster than the
    watchdog's polling still ends in a failed allocation, not in the machine's OOM killer."""
    global _MEMORY_MB
    if megabytes <= 0:
        return
    limit = _address_space() + 2 * megabytes * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    _MEMORY_MB = megabytes


def _resident_mb(pid: int) -> float:
    """Resident memory (RSS) of process ``pid`` in MiB; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as fh:
            pages = int(fh.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


def _exit_with_parent(parent: int) -> None:
    """A worker of a killed service would wait for tasks forever: exit when it is gone."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _init_worker(
    parent: int,
    modules: tuple[str, ...],
    log: tuple[int, str | None],
    memory_mb: int = 0,
    starts: Any = None,
) -> None:
    """Workers log like the service, leave signals to it (it drains them on SIGTERM and
    SIGINT), end with it even when it is killed, and import the models' modules, calling
    their ``warm_up()``, before the first study; then their memory is limited to
    ``memory_mb`` more (RLIMIT_AS) and each task reports its start on ``starts``. They never
    run a network and never import torch (the models' modules do not: ``tests/test_pipeline``
    checks it); one OpenMP thread each all the same, for any library that uses OpenMP."""
    global _STARTS
    _STARTS = starts
    level, fmt = log
    logging.basicConfig(level=level, format=fmt or logging.BASIC_FORMAT, stream=sys.stderr)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    os.environ["OMP_NUM_THREADS"] = "1"  # read when torch is first imported
    for name in modules:
        warm_up = getattr(importlib.import_module(name), "warm_up", None)
        if callable(warm_up):
            warm_up()
    _limit_memory(memory_mb)


def _log_settings() -> tuple[int, str | None]:
    """The service's root log level and format, for its workers."""
    root = logging.getLogger()
    formatter = root.handlers[0].formatter if root.handlers else None
    return root.level, formatter._fmt if formatter else None


def _ready() -> int:
    time.sleep(0.2)  # let every starting worker take one of these
    return os.getpid()


#: How often the service looks whether a loading network is ready for prepared studies.
LOADING_POLL_SECONDS = 0.05


def _loading(model: Model) -> bool:
    """Whether ``model``'s network is still loading (a model without one never is)."""
    return bool(getattr(model, "loading", False))


class _Inline(Executor):
    """``workers = 0``: every task runs at once in the calling thread."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(fn(*args, **kwargs))
        return future


# -- the pipeline --------------------------------------------------------------------------


class Pipeline:
    """Runs submitted jobs through the stages; :meth:`pump` returns finished ones."""

    def __init__(
        self,
        workers: int,
        output_dir: Path,
        max_batch: int = 8,
        batch_wait: float = 0.2,
        modules: tuple[str, ...] = (),
        memory_mb: int = 0,
        run_timeout: float = 0.0,
    ) -> None:
        self.workers = workers
        self.output_dir = output_dir
        self.max_batch = max_batch
        self.batch_wait = batch_wait
        self.modules = modules  # imported by each worker at its start
        self.memory_mb = memory_mb  # each worker's memory limit (MiB beyond warm-up; 0 none)
        self.run_timeout = run_timeout  # seconds a run may take in the workers (0 none)
        self._starts: Any = None  # the workers report each task's start here
        self._tasks: dict[int, tuple[Job, Future[Any], int]] = {}  # token -> job, task, pid
        self._tokens = 0
        self._killed: set[int] = set()  # pool generations whose worker we killed ourselves
        self._pool: Executor | None = None  # started by start() or the first submit
        self._warming: list[Future[Any]] = []  # each worker's first task, until all are done
        self._warming_since = 0.0
        self._generation = 0  # worker pools started so far, minus one
        self._preparing: list[tuple[Job, Future[Any]]] = []
        self._ready: list[Job] = []
        self._finishing: list[tuple[Job, Future[Any]]] = []
        self._parts: list[tuple[Job, list[Future[Any]]]] = []  # split runs, one task a part

    def start(self) -> None:
        """Start the worker processes now (the service does, before its first scan)."""
        if self._pool is None:
            self._pool = self._new_executor()

    @property
    def _executor(self) -> Executor:
        self.start()
        assert self._pool is not None
        return self._pool

    def _new_executor(self) -> Executor:
        """The worker pool, starting: each worker imports the models' modules and warms
        them up (about a second) while the service goes on; tasks submitted meanwhile
        queue. :attr:`started` tells when every worker took a first task."""
        if self.workers == 0:
            return _Inline()
        t0 = time.monotonic()
        context = multiprocessing.get_context("spawn")
        self._starts = context.Queue()
        self._tasks.clear()
        pool = ProcessPoolExecutor(
            self.workers,
            mp_context=context,
            initializer=_init_worker,
            initargs=(os.getpid(), self.modules, _log_settings(), self.memory_mb, self._starts),
        )
        self._warming = [pool.submit(_ready) for _ in range(self.workers)]
        self._warming_since = t0
        return pool

    @property
    def started(self) -> bool:
        """Whether every worker process is up (always, with ``workers = 0``)."""
        if self._warming and all(f.done() for f in self._warming):
            seconds = time.monotonic() - self._warming_since
            logger.info("%d worker process(es) ready in %.1f s", self.workers, seconds)
            self._warming = []
        return not self._warming

    @property
    def in_flight(self) -> int:
        return len(self._preparing) + len(self._ready) + len(self._finishing) + len(self._parts)

    @property
    def room(self) -> int:
        """How many more jobs may start now: enough to keep every worker busy and a batch
        forming, few enough that a study arriving on another gateway queues behind only
        a few others (fair share is decided before the pipeline, in the engine)."""
        if self.workers == 0:  # all finish within the engine's tick
            return max(0, self.max_batch - self.in_flight)
        return max(0, min(self.max_batch, 2 * self.workers) + 1 - self.in_flight)

    @property
    def has_capacity(self) -> bool:
        """Whether another job may start (:attr:`room`)."""
        return self.room > 0

    def _submit(self, job: Job, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Submit one stage task of ``job``; in workers, it reports which process runs it."""
        if self.workers == 0:
            return self._executor.submit(fn, *args)
        self._tokens += 1
        future = self._executor.submit(_task, self._tokens, fn, *args)
        self._tasks[self._tokens] = (job, future, 0)
        return future

    def submit(self, job: Job) -> None:
        model = job.model
        job.pool = self._generation
        if isinstance(model, BatchedModel):
            future = self._submit(job, prepare, model, job.study, job.ctx)
            self._preparing.append((job, future))
        elif isinstance(model, SplitModel) and self.workers > 1 and len(job.study.instances) > 1:
            parts = [
                self._submit(job, run_part, model, part, job.ctx, self.output_dir, job.layout)
                for part in split_study(job.study, self.workers)
            ]
            self._parts.append((job, parts))
        else:
            future = self._submit(
                job, run_whole, model, job.study, job.ctx, self.output_dir, job.layout
            )
            self._finishing.append((job, future))

    def _police(self) -> None:
        """Kill the worker of a run past its deadline (``run_timeout`` from its first task's
        start) and a worker that ran out of memory (it reported ``recycle``); the pool is
        then replaced (:meth:`_worker_died`) and such a run fails without a retry."""
        if self.workers == 0 or self._starts is None:
            return
        now = time.monotonic()
        while True:
            try:
                token, pid = self._starts.get_nowait()
            except (queue.Empty, OSError, ValueError):
                break
            if token in self._tasks:
                job, future, _ = self._tasks[token]
                self._tasks[token] = (job, future, pid)
                job.started = job.started or now
        for token, (job, future, pid) in list(self._tasks.items()):
            if future.done():
                del self._tasks[token]
                result = None if future.exception() else future.result()
                if isinstance(result, Finished) and result.recycle and pid:
                    self._kill(pid, job.pool)
                continue
            if not pid or job.killed:
                continue
            rss = _resident_mb(pid) if self.memory_mb else 0.0
            if self.run_timeout and job.started and now - job.started > self.run_timeout:
                job.killed = f"run exceeded run_timeout_seconds={self.run_timeout:g}"
            elif rss > self.memory_mb > 0:
                job.killed = f"worker exceeded worker_memory_mb={self.memory_mb} ({rss:.0f} MiB)"
            else:
                continue
            job.killed += ": worker killed and replaced; not retried"
            logger.error("run %d: %s", job.run_id, job.killed)
            self._kill(pid, job.pool)

    def _kill(self, pid: int, generation: int) -> None:
        self._killed.add(generation)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def pump(self) -> list[Outcome]:
        """Advance every stage without blocking (except for the forward pass itself)."""
        _ = self.started  # logs when the workers are up
        self._police()
        outcomes: list[Outcome] = []
        for job, result in self._collect("_preparing"):
            if isinstance(result, tuple):
                job.prepared, job.timings["prepare_s"] = result
                job.ready_at = time.monotonic()
                self._ready.append(job)
            else:
                outcomes.append(Outcome(job, result))
        while self._batch_due():
            outcomes.extend(self._forward(self._take_batch()))
        outcomes.extend(Outcome(job, result) for job, result in self._collect("_finishing"))
        outcomes.extend(self._collect_parts())
        return outcomes

    def _collect_parts(self) -> list[Outcome]:
        """Split runs whose every part is done, merged; a run that lost a part to a dead
        worker goes through :meth:`_worker_died` whole."""
        outcomes: list[Outcome] = []
        waiting: list[tuple[Job, list[Future[Any]]]] = []
        broken: list[Job] = []
        for job, parts in self._parts:
            if not all(f.done() for f in parts):
                waiting.append((job, parts))
            elif any(isinstance(f.exception(), BrokenProcessPool) for f in parts):
                broken.append(job)
            else:
                assert isinstance(job.model, SplitModel)
                outcomes.append(Outcome(job, merge_parts(job.model, [_value(f) for f in parts])))
        self._parts = waiting
        if broken:
            outcomes.extend(Outcome(job, done) for job, done in self._worker_died(broken))
        return outcomes

    def _collect(self, stage: str) -> list[tuple[Job, Any]]:
        done: list[tuple[Job, Any]] = []
        waiting: list[tuple[Job, Future[Any]]] = []
        broken: list[Job] = []
        for job, future in getattr(self, stage):
            if not future.done():
                waiting.append((job, future))
            elif isinstance(future.exception(), BrokenProcessPool):
                broken.append(job)
            else:
                done.append((job, _value(future)))
        setattr(self, stage, waiting)
        if broken:
            done.extend(self._worker_died(broken))
        return done

    def _worker_died(self, jobs: list[Job]) -> list[tuple[Job, Finished]]:
        """A worker process died (killed, out of memory): start a new pool and give each
        job one more try; a job whose second try dies too fails with the reason."""
        if any(job.pool == self._generation for job in jobs):  # else restarted already
            logger.error("a worker process exited unexpectedly; restarting the worker pool")
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_executor()
            self._generation += 1
        failed = []
        for job in jobs:
            if job.killed:  # over its deadline or memory: the content's fault, not retried
                failed.append((job, Finished(error=job.killed)))
                continue
            if job.pool in self._killed:
                pass  # a bystander of a worker we killed: tried again, not counted
            elif job.retried:
                failed.append((job, Finished(error="worker process exited unexpectedly twice")))
                continue
            else:
                job.retried = True
            if job.prepared is not None and isinstance(job.model, BatchedModel):
                self._ready.append(job)  # only its finish was lost: forward it again
            else:
                self.submit(job)
        return failed

    def _batch_due(self) -> bool:
        if not self._ready or _loading(self._ready[0].model):
            return False
        rows = sum(len(j.prepared.inputs) for j in self._ready if j.prepared is not None)
        waited = time.monotonic() - min(j.ready_at for j in self._ready)
        return rows >= self.max_batch or not self._preparing or waited >= self.batch_wait

    def _take_batch(self) -> list[Job]:
        """The oldest ready jobs of one model, up to ``max_batch`` rows (at least one job)."""
        model = self._ready[0].model
        batch: list[Job] = []
        rows = 0
        for job in list(self._ready):
            assert job.prepared is not None
            n = len(job.prepared.inputs)
            if job.model is not model or (batch and rows + n > self.max_batch):
                continue
            batch.append(job)
            rows += n
            self._ready.remove(job)
        return batch

    def _forward(self, batch: list[Job]) -> list[Outcome]:
        model = batch[0].model
        assert isinstance(model, BatchedModel)
        inputs = [j.prepared.inputs for j in batch if j.prepared is not None]
        t0 = time.perf_counter()
        try:
            outputs = model.forward(np.concatenate(inputs))
        except Exception as exc:
            return [Outcome(job, _failure(exc)) for job in batch]
        forward_s = time.perf_counter() - t0
        release_memory()
        start = 0
        for job, rows in zip(batch, inputs, strict=True):
            job.timings.update(forward_s=forward_s, batch=float(len(batch)))
            assert job.prepared is not None
            future = self._submit(
                job,
                finish,
                model,
                job.study,
                job.prepared,
                outputs[start : start + len(rows)],
                job.ctx,
                self.output_dir,
                job.layout,
            )
            start += len(rows)
            job.pool = self._generation
            self._finishing.append((job, future))
        return []

    def wait(self, timeout: float, others: Sequence[Future[Any]] = ()) -> None:
        """Sleep until some worker task (or one of ``others``) completes, a batch falls
        due, or ``timeout``."""
        if self._tasks and (self.memory_mb or self.run_timeout):
            timeout = min(timeout, 0.25)  # the watchdog (_police) runs at each pump
        futures = [f for _, f in (*self._preparing, *self._finishing)] + list(others)
        futures += [f for _, parts in self._parts for f in parts if not f.done()]
        if self._ready and _loading(self._ready[0].model):
            timeout = min(timeout, LOADING_POLL_SECONDS)  # the forward waits for the network
        elif self._ready:
            oldest = min(j.ready_at for j in self._ready)
            timeout = max(0.0, min(timeout, oldest + self.batch_wait - time.monotonic()))
        if futures:
            wait(futures, timeout=timeout, return_when="FIRST_COMPLETED")
        elif timeout > 0:
            time.sleep(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the workers; jobs still in flight are left (their runs resume at restart)
        and a worker still busy after ``timeout`` is terminated."""
        if self._pool is None:
            return
        processes = list((getattr(self._pool, "_processes", None) or {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None
        deadline = time.monotonic() + timeout
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
