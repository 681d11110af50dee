"""Micro-batching: concurrent requests for the same model and image size run as one batch in a
bounded thread pool, so the event loop never runs the model and throughput grows with load."""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests are waiting than the queue allows (the caller answers 503 with Retry-After)."""


class DeadlineExceeded(Exception):
    """A request was not answered within its deadline (the caller answers 504)."""


class ShuttingDown(Exception):
    """The batcher is draining and takes no new work."""


@dataclass
class _Job:
    key: Hashable
    item: Any
    deadline: float
    future: asyncio.Future = field(repr=False)
    arrived: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """Groups submitted items by key and calls ``run(key, items) -> results`` (one result per item,
    same order) in a pool of ``workers`` threads.

    A batch leaves when it holds ``max_batch`` items, or when its oldest item has waited ``window_s``,
    and only when a worker is free: while every worker is busy, waiting requests keep joining their
    groups, so batches grow with load. At most ``max_queue`` items may wait or run at once; past that
    ``submit`` raises ``QueueFull`` at once. An item still waiting at its deadline is dropped without
    running (``DeadlineExceeded``).
    """

    def __init__(self, run: Callable[[Hashable, list[Any]], Sequence[Any]], *, max_batch: int = 8,
                 window_s: float = 0.005, workers: int = 1, max_queue: int = 64,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.run, self.max_batch, self.window_s = run, max(1, max_batch), max(0.0, window_s)
        self.workers, self.max_queue = max(1, workers), max(1, max_queue)
        self.on_batch = on_batch
        self._groups: dict[Hashable, list[_Job]] = {}  # insertion order: the oldest group first
        self._depth = 0  # items accepted and not yet answered
        self._pool: ThreadPoolExecutor | None = None
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._free: asyncio.Semaphore | None = None
        self._running: set[asyncio.Future] = set()
        self._closing = False

    @property
    def depth(self) -> int:
        """Requests accepted and not yet answered (waiting or running)."""
        return self._depth

    async def start(self) -> None:
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="fcnseg-infer")
        self._wake, self._free = asyncio.Event(), asyncio.Semaphore(self.workers)
        self._closing = False
        self._task = asyncio.create_task(self._dispatch(), name="fcnseg-batcher")

    def check_capacity(self) -> None:
        """Raise ``ShuttingDown`` or ``QueueFull`` now if ``submit`` would (callers check this before
        reading and decoding an upload, so overload is refused cheaply)."""
        if self._task is None or self._closing:
            raise ShuttingDown("the server is shutting down")
        if self._depth >= self.max_queue:
            raise QueueFull(f"{self._depth} requests are already queued (limit {self.max_queue})")

    async def submit(self, key: Hashable, item: Any, timeout_s: float) -> Any:
        """The result for ``item``, computed in a batch with other items of the same ``key``."""
        self.check_capacity()
        loop = asyncio.get_running_loop()
        job = _Job(key, item, time.monotonic() + timeout_s, loop.create_future())
        self._groups.setdefault(key, []).append(job)
        self._depth += 1
        self._wake.set()
        try:
            # shield: a timed-out request leaves its job to be skipped (or finished) by the dispatcher
            return await asyncio.wait_for(asyncio.shield(job.future), timeout_s)
        except asyncio.TimeoutError:
            job.future.cancel()  # tells the dispatcher nobody waits for it
            raise DeadlineExceeded("no answer within the request's deadline") from None
        except asyncio.CancelledError:  # the client went away
            job.future.cancel()
            raise

    async def close(self) -> None:
        """Stop taking work, finish everything accepted, then stop the threads."""
        self._closing = True
        while self._depth:
            self._wake.set()
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # -- internals ----------------------------------------------------------------------------------

    def _finish(self, job: _Job, result: Any = None, error: BaseException | None = None) -> None:
        self._depth -= 1
        if job.future.done():  # its request was cancelled (client gone)
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    async def _dispatch(self) -> None:
        while True:
            try:
                await self._dispatch_one()
            except asyncio.CancelledError:
                raise
            except Exception:  # never leave the queue without a dispatcher
                log.exception("batch dispatch failed")

    async def _dispatch_one(self) -> None:
        loop = asyncio.get_running_loop()
        await self._free.acquire()  # wait for a worker before choosing a batch: batches grow meanwhile
        while not self._groups:
            self._wake.clear()
            await self._wake.wait()
        key = next(iter(self._groups))
        group = self._groups[key]
        # a few ms for companions, unless the batch is full or we are draining
        wait = group[0].arrived + self.window_s - time.monotonic()
        if wait > 0 and len(group) < self.max_batch and not self._closing:
            await asyncio.sleep(wait)
        batch, rest = group[:self.max_batch], group[self.max_batch:]
        if rest:
            self._groups[key] = rest
            self._groups[key] = self._groups.pop(key)  # the rest queue behind the other groups
        else:
            del self._groups[key]
        now = time.monotonic()
        live = []
        for job in batch:
            if job.future.done() or job.deadline <= now:  # nobody waits for it any more
                self._finish(job, error=DeadlineExceeded("deadline passed while queued"))
            else:
                live.append(job)
        if not live:
            self._free.release()
            return
        if self.on_batch:
            self.on_batch(len(live))
        try:
            fut = loop.run_in_executor(self._pool, self.run, key, [j.item for j in live])
        except Exception as e:  # the pool refused the work: answer these requests, free the slot
            self._free.release()
            for job in live:
                self._finish(job, error=e)
            raise
        self._running.add(fut)
        fut.add_done_callback(lambda f, jobs=live: self._done(f, jobs))

    def _done(self, fut: asyncio.Future, jobs: list[_Job]) -> None:
        self._running.discard(fut)
        self._free.release()
        error = fut.exception()
        if error is not None:
            log.error("inference failed for a batch of %d: %s", len(jobs), error)
            for job in jobs:
                self._finish(job, error=error)
            return
        for job, result in zip(jobs, fut.result()):
            self._finish(job, result)
