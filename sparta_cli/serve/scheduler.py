"""Same-adapter batching with one model-executing worker thread.

Queued inputs wait per adapter. The worker serves the adapter whose oldest input has waited
longest (so none starves), as soon as it has `max_batch` inputs queued or its oldest input has
waited `max_wait_s`, up to `max_batch` inputs per forward. A swap happens only between batches.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

RunBatch = Callable[[Any, list[Any]], list[Any]]  # (adapter, inputs) -> one result per input


@dataclass
class _Request:
    future: Future
    results: list[Any]
    remaining: int


@dataclass
class _Item:
    request: _Request
    position: int
    features: Any
    queued_at: float = field(default_factory=time.monotonic)


class Scheduler:
    def __init__(self, run_batch: RunBatch, max_batch: int, max_wait_s: float, on_batch: Callable[[int], None] = lambda size: None) -> None:
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self.queues: dict[Hashable, deque[_Item]] = {}
        self.condition = threading.Condition()
        self.stopping = False
        self.worker = threading.Thread(target=self._work, name="sparta-serve-worker", daemon=True)

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        """Finish every queued input, then end the worker."""
        with self.condition:
            self.stopping = True
            self.condition.notify_all()
        self.worker.join()

    def queued(self) -> int:
        """Inputs waiting for a batch."""
        with self.condition:
            return sum(len(queue) for queue in self.queues.values())

    def submit(self, adapter: Hashable, inputs: list[Any]) -> Future:
        """A future of the results of `inputs`, in order; `adapter` is whatever `run_batch` takes (the
        server's entry objects, so an unloaded name can be loaded again while its last requests run)."""
        future: Future = Future()
        request = _Request(future, [None] * len(inputs), len(inputs))
        with self.condition:
            if self.stopping:
                raise RuntimeError("the server is shutting down")
            queue = self.queues.setdefault(adapter, deque())
            queue.extend(_Item(request, position, features) for position, features in enumerate(inputs))
            self.condition.notify_all()
        return future

    def next_batch(self) -> tuple[Hashable, list[_Item]] | None:
        """Block until a batch is due; None once stopping with nothing queued."""
        with self.condition:
            while True:
                for name in [name for name, queue in self.queues.items() if not queue]:
                    del self.queues[name]  # an unloaded adapter's entry is let go once its queue is empty
                waiting = self.queues
                if not waiting:
                    if self.stopping:
                        return None
                    self.condition.wait()
                    continue
                adapter = min(waiting, key=lambda name: waiting[name][0].queued_at)
                queue = waiting[adapter]
                wait = queue[0].queued_at + self.max_wait_s - time.monotonic()
                if len(queue) >= self.max_batch or wait <= 0 or self.stopping:
                    return adapter, [queue.popleft() for _ in range(min(self.max_batch, len(queue)))]
                self.condition.wait(wait)

    def _work(self) -> None:
        while (due := self.next_batch()) is not None:
            adapter, items = due
            self.on_batch(len(items))
            try:
                results = self.run_batch(adapter, [item.features for item in items])
            except Exception as exc:  # noqa: BLE001 - answered as the requests' error; the worker keeps serving
                for item in items:
                    if not item.request.future.done():
                        item.request.future.set_exception(exc)
                continue
            for item, result in zip(items, results):
                request = item.request
                request.results[item.position] = result
                request.remaining -= 1
                if request.remaining == 0 and not request.future.done():
                    request.future.set_result(request.results)
