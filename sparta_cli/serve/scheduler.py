"""Batching with one model-executing worker thread.

Queued inputs wait per adapter. The worker serves the adapter whose oldest input has waited
longest (so none starves), as soon as it has `max_batch` inputs queued or its oldest input has
waited `max_wait_s`, up to `max_batch` inputs per forward. An adapter that `mixes` (SpaRTA on a
classifier) shares its batch with every other adapter that mixes: the batch fills with their oldest
inputs, across adapters, and is due once `max_batch` of them are queued (`run_mixed`). Others
(LoRA/DoRA, generation) get same-adapter batches (`run_batch`). A swap happens only between batches.
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
RunMixed = Callable[[list[Any], list[Any]], list[Any]]  # (each input's adapter, inputs) -> one result per input


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
    def __init__(self, run_batch: RunBatch, max_batch: int, max_wait_s: float, on_batch: Callable[[int], None] = lambda size: None,
                 run_mixed: RunMixed | None = None, mixes: Callable[[Any], bool] = lambda adapter: False) -> None:
        self.run_batch = run_batch
        self.run_mixed = run_mixed
        self.mixes = mixes if run_mixed is not None else (lambda adapter: False)
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

    def next_batch(self) -> tuple[list[Hashable], list[_Item]] | None:
        """Block until a batch is due: each input's adapter and the inputs; None once stopping with nothing queued."""
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
                sharing = [name for name in waiting if self.mixes(name)] if self.mixes(adapter) else [adapter]
                queued = sum(len(waiting[name]) for name in sharing)
                wait = waiting[adapter][0].queued_at + self.max_wait_s - time.monotonic()
                if queued >= self.max_batch or wait <= 0 or self.stopping:
                    return self._oldest(sharing, min(self.max_batch, queued))
                self.condition.wait(wait)

    def _oldest(self, adapters: list[Hashable], count: int) -> tuple[list[Hashable], list[_Item]]:
        """The `count` oldest inputs queued for `adapters` (each queue is in arrival order), taken off their queues."""
        names: list[Hashable] = []
        items: list[_Item] = []
        for _ in range(count):
            name = min((name for name in adapters if self.queues[name]), key=lambda name: self.queues[name][0].queued_at)
            names.append(name)
            items.append(self.queues[name].popleft())
        return names, items

    def _work(self) -> None:
        while (due := self.next_batch()) is not None:
            adapters, items = due
            self.on_batch(len(items))
            features = [item.features for item in items]
            try:
                if all(adapter == adapters[0] for adapter in adapters):
                    results = self.run_batch(adapters[0], features)
                else:
                    assert self.run_mixed is not None
                    results = self.run_mixed(adapters, features)
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
